"""A recipe at real size without weights (``model.random_init`` on a config-only directory), and the
MFU the recipe reports: the flop count against a hand computation, the field in the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from automodel_lora.recipe import load_recipe, setup_phase
from automodel_lora.recipe.config import ConfigError, RecipeConfig
from automodel_lora.recipe.flops import matmul_params, mfu, peak_bf16_flops, train_flops_per_token
from automodel_lora.recipe.model import load_model_config, prepare_model
from automodel_lora.recipe.progress import ProgressBar

from .recipe_helpers import REPO, TINY_MODEL, read_metrics, run_recipe, tiny_raw_recipe

REAL_RUNS = {  # recipe -> (config-only directory, parameters of the published model)
    "llama3_8b_lora": ("llama3.1-8b", 8_030_261_248),
    "llama3_8b_qlora": ("llama3.1-8b", 8_030_261_248),
    "qwen2_5_7b_lora": ("qwen2.5-7b", 7_615_616_512),
    "qwen3_30b_a3b_lora": ("qwen3-30b-a3b", 30_532_122_624),
}


def config_dir(tmp_path, **overrides):
    """A directory holding only the config.json of the tests' tiny Llama."""
    from transformers import LlamaConfig

    d = tmp_path / "tiny-config"
    LlamaConfig(**{**TINY_MODEL, **overrides}).save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    return d


def random_init_recipe(tmp_path, **sections):
    raw = tiny_raw_recipe(tmp_path, **sections)
    raw["model"] = {"name_or_path": str(config_dir(tmp_path)), "random_init": True, "dtype": "float32"}
    raw["data"]["tokenizer"] = None  # the directory has none: the byte tokenizer is taken
    return raw


# ------------------------------------------------------------------------------ random init


def test_random_init_trains_from_a_config_only_directory(tmp_path):
    summary, log = run_recipe(random_init_recipe(tmp_path))
    assert "has no tokenizer: using the byte tokenizer" in log
    losses = [r["loss"] for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(losses) == 6 and summary["steps"] == 6
    assert abs(losses[0] - torch.log(torch.tensor(259.0)).item()) < 0.2  # random weights: ~uniform over 259 ids


def test_random_init_builds_the_same_weights_as_the_config_with_the_same_seed(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = RecipeConfig.from_dict(random_init_recipe(tmp_path))
    torch.manual_seed(3)
    model, _ = prepare_model(cfg, torch.device("cpu"))
    torch.manual_seed(3)
    reference = LlamaForCausalLM(load_model_config(cfg.model))
    ref = dict(reference.named_parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(dict(model.named_parameters())[name], ref[name])
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"])


def test_random_init_qlora_quantizes_the_random_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    raw = random_init_recipe(tmp_path, quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"})
    model, desc = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit) and "4-bit nf4" in desc
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize(
    "model, fragment",
    [
        ({"random_init": True}, "needs `model.name_or_path`"),
        ({"random_init": True, "tiny": dict(TINY_MODEL)}, "`model.tiny` is random already"),
    ],
)
def test_random_init_without_a_config_directory_is_refused(tmp_path, model, fragment):
    raw = tiny_raw_recipe(tmp_path)
    raw["model"] = model
    with pytest.raises(ConfigError, match=fragment):
        RecipeConfig.from_dict(raw)


def test_random_init_names_a_missing_directory_and_a_missing_config_json(tmp_path):
    raw = random_init_recipe(tmp_path)
    for path, fragment in ((tmp_path / "nowhere", "is not a directory"), (tmp_path, "has no config.json")):
        raw["model"]["name_or_path"] = str(path)
        with pytest.raises(ConfigError, match=fragment) as e:
            run_recipe(raw)
        assert str(path) in str(e.value) and "configs/models/llama3.1-8b" in str(e.value)


@pytest.mark.parametrize("recipe", sorted(REAL_RUNS))
def test_shipped_config_directories_build_the_published_models(recipe):
    """Each real-model recipe, with the override the README gives, validates and builds (on the meta
    device, no memory) a model of the published parameter count."""
    from transformers import AutoModelForCausalLM

    directory, n_params = REAL_RUNS[recipe]
    cfg = load_recipe(
        REPO / "configs" / f"{recipe}.yaml",
        [
            "model.random_init=true",
            f"model.name_or_path={REPO / 'configs' / 'models' / directory}",
            f"data.path={REPO / 'configs' / 'data' / 'quickstart.jsonl'}",
            "train.max_steps=50",  # replaces the file's `epochs: 1`
        ],
    )
    assert cfg.train.max_steps == 50 and cfg.train.epochs is None and cfg.model.random_init
    config = load_model_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not config.tie_word_embeddings
    if directory == "qwen3-30b-a3b":  # the MoE recipe: every expert weight of every layer is targeted
        import automodel_lora as al

        assert config.num_experts == 128 and config.num_experts_per_tok == 8
        n = al.apply_lora_to_linear_modules(model, cfg.peft)
        assert n == 48 * 4 + 48 * 2
        assert model.model.layers[47].mlp.experts.lora_A["gate_up_proj"].shape == (128, 16, 2048)
        return
    assert config.max_position_embeddings == 131072
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (directory == "qwen2.5-7b")


def test_an_override_of_one_exclusive_key_drops_the_other_from_the_file():
    from automodel_lora.recipe.config import apply_overrides

    raw = {"train": {"epochs": 1, "warmup_ratio": 0.03}}
    assert apply_overrides(raw, ["train.max_steps=5", "train.warmup_steps=2"])["train"] == {"max_steps": 5, "warmup_steps": 2}
    assert apply_overrides(raw, ["train.max_steps=null"])["train"] == {"epochs": 1, "warmup_ratio": 0.03, "max_steps": None}


# ------------------------------------------------------------------------------ flops and MFU


def test_flops_per_token_of_a_tiny_llama_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(**TINY_MODEL)  # d 32, I 64, 2 layers, 4 heads of 8, 2 kv heads, vocab 259
    # per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; gate/up/down 3*32*64 = 6144
    assert matmul_params(config) == 2 * (3072 + 6144) + 32 * 259  # 26720, + the head
    # r=4 on all 7: q 4*(32+32), k 4*(32+16), v the same, o 4*(32+32), gate/up/down 4*(32+64) each
    n_adapter = 2 * (256 + 192 + 192 + 256 + 3 * 384)  # 4096
    # 4 * 26720 (frozen: no weight gradient) + 6 * 4096 + 12 * 2 layers * 32 * seq 64
    assert train_flops_per_token(config, 64, n_adapter) == 106_880 + 24_576 + 49_152


def test_flops_unknown_architecture_or_moe_gives_none():
    from transformers import GPT2Config, MixtralConfig

    assert train_flops_per_token(GPT2Config(), 64, 10) is None
    assert matmul_params(MixtralConfig(num_hidden_layers=1)) is None


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("Some GPU", None)],
)
def test_peak_lookup_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_bf16_flops("cuda:0") == peak
    assert peak_bf16_flops("cpu") is None
    assert mfu(1e9, 1e3, None) is None and mfu(1e9, 1e3, 1e12, n_devices=2) == pytest.approx(0.5)


def test_cpu_run_has_no_mfu(tmp_path):
    _, log = run_recipe(tiny_raw_recipe(tmp_path, train={"max_steps": 2}))
    assert all("mfu" not in r for r in read_metrics(tmp_path / "out")) and "MFU" not in log


def test_metrics_and_progress_bar_carry_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    peak = 1e9  # a pretend device peak: the CPU has none in the table
    monkeypatch.setattr(setup_phase, "peak_bf16_flops", lambda device: peak)
    _, log = run_recipe(tiny_raw_recipe(tmp_path, train={"max_steps": 3}))
    flops = train_flops_per_token(LlamaConfig(**TINY_MODEL), 64, 4096)
    steps = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / peak, rel=1e-12)
    assert "MFU " in log and "%" in log
    json.dumps(steps)  # plain floats


def test_progress_bar_renders_mfu_only_when_given():
    bar = ProgressBar(total=10)
    assert "MFU 41.2%" in bar.render(5, 1.0, 1e-4, 1000.0, mfu=0.412)
    assert "MFU" not in bar.render(5, 1.0, 1e-4, 1000.0)

