"""Recipe configuration: YAML parsing, every validation error, dotted overrides, the CLI front end."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from automodel_lora.cli import finetune_main, main
from automodel_lora.recipe.config import (
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    RecipeConfig,
    TrainConfig,
    apply_overrides,
    load_recipe,
    parse_override,
)

from .recipe_helpers import QUICKSTART, QUICKSTART_DATA, REPO, tiny_raw_recipe

DELETE = object()


def with_values(raw: dict, values: dict) -> dict:
    """Set dotted keys of ``raw`` in place (``DELETE`` removes one); independent of ``apply_overrides``."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return raw


# ---------------------------------------------------------------------------------------- parsing


def test_quickstart_parses_with_its_values_and_data_path_resolved_against_the_yaml():
    cfg = load_recipe(QUICKSTART)
    assert cfg.model.tiny["hidden_size"] == 128 and cfg.model.name_or_path is None
    assert cfg.peft.match_all_linear and cfg.peft.dim == 16 and cfg.peft.alpha == 32
    assert cfg.data.path == str(QUICKSTART_DATA)  # written as `data/quickstart.jsonl` in configs/
    assert cfg.data.tokenizer == "byte"  # not a path
    assert cfg.train.lr == 3e-3 and cfg.train.max_steps == 300 and cfg.train.bf16 == "auto"
    assert cfg.checkpoint.resume == "auto" and cfg.distributed.strategy == "auto"


def test_defaults_fill_every_section_and_round_trip_through_yaml(tmp_path):
    cfg = RecipeConfig.from_dict(tiny_raw_recipe(tmp_path))
    assert cfg.quantization.load_in_4bit is False and cfg.quantization.bnb_4bit_quant_type == "nf4"
    assert cfg.train.scheduler == "cosine" and cfg.train.betas == [0.9, 0.999]
    assert set(cfg.to_dict()) == set(SECTIONS)
    again = RecipeConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


def test_yaml_scalars_arrive_typed_and_only_what_yaml_cannot_give_is_converted(tmp_path):
    # YAML 1.2 floats: `1e-4` (no dot) is a number, not PyYAML's string; a whole float is an integer
    # where one is declared; an integer is a float where one is declared.
    text = f"""
model: {{tiny: {{vocab_size: 259, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 4}}}}
peft: {{target_modules: q_proj, alpha: 16.0, dim: 8, dropout: 5e-2}}
data: {{path: {tmp_path / "d.jsonl"}, tokenizer: byte}}
train: {{lr: 1e-4, eps: 1E-6, max_steps: 2.0, min_lr_ratio: 0, bf16: false}}
checkpoint: {{resume: false}}
"""
    (tmp_path / "r.yaml").write_text(text)
    cfg = load_recipe(tmp_path / "r.yaml")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.eps == 1e-6 and isinstance(cfg.train.eps, float)
    assert cfg.train.max_steps == 2 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.min_lr_ratio == 0.0 and isinstance(cfg.train.min_lr_ratio, float)
    assert cfg.train.bf16 is False
    assert cfg.peft.target_modules == ["q_proj"] and cfg.peft.alpha == 16 and cfg.peft.dim == 8
    assert cfg.peft.dropout == 0.05
    assert cfg.checkpoint.resume is None


def test_a_quoted_number_is_a_string_and_its_error_names_the_key(tmp_path):
    # A quoted value is a string in YAML; the recipe does not second-guess it.
    with pytest.raises(ConfigError, match=r"peft.dim must be a positive integer \(the LoRA rank\), got '8'"):
        RecipeConfig.from_dict(with_values(tiny_raw_recipe(tmp_path), {"peft.dim": "8"}))
    with pytest.raises(ConfigError, match=r"`train.lr` must be a number, got '1e-4'"):
        RecipeConfig.from_dict(with_values(tiny_raw_recipe(tmp_path), {"train.lr": "1e-4"}))


@pytest.mark.parametrize("written, stored", [("bf16", "bfloat16"), ("torch.float16", "float16"), ("fp32", "float32")])
def test_dtypes_take_every_spelling_of_the_core_parser_and_store_the_full_name(tmp_path, written, stored):
    raw = with_values(tiny_raw_recipe(tmp_path), {"model.dtype": written, "quantization.bnb_4bit_compute_dtype": written})
    cfg = RecipeConfig.from_dict(raw)
    assert cfg.model.dtype == stored and cfg.quantization.bnb_4bit_compute_dtype == stored


@pytest.mark.parametrize(
    "value, expected", [(True, "auto"), ("auto", "auto"), (False, None), ("none", None), (None, None), ("ck/step_1", "ck/step_1")]
)
def test_checkpoint_resume_spellings(tmp_path, value, expected):
    cfg = RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, checkpoint={"resume": value}))
    assert cfg.checkpoint.resume == expected


# ---------------------------------------------------------------------------------------- errors

ERRORS = [
    # model
    ({"model.tiny": DELETE}, "set exactly one of `model.name_or_path`"),
    ({"model.name_or_path": "/ckpt"}, "set exactly one of `model.name_or_path`"),
    ({"model.dtype": "int8"}, "`model.dtype` must be one of float32, bfloat16, float16, auto; got 'int8'"),
    ({"model.tiny.hidden_sizes": 64}, "unknown key `model.tiny.hidden_sizes`: `model.tiny` takes LlamaConfig arguments"),
    ({"model.trust_remote_code": "maybe"}, "`model.trust_remote_code` must be true or false, got 'maybe'"),
    ({"model.tiny": [1, 2]}, "`model.tiny` must be dict | null, got [1, 2]"),
    ({"model.foo": 1}, "unknown key `model.foo`; valid keys for `model` are: name_or_path, tiny, dtype"),
    # quantization
    ({"quantization.bnb_4bit_quant_type": "int4"}, "`quantization.bnb_4bit_quant_type` must be one of nf4, fp4; got 'int4'"),
    (
        {"quantization.bnb_4bit_compute_dtype": "int8"},
        "`quantization.bnb_4bit_compute_dtype` must be one of float32, bfloat16, float16; got 'int8'",
    ),
    ({"model.dtype": None}, "`model.dtype` must be a string, got None"),
    (
        {"quantization.load_in_4bit": True, "distributed.strategy": "fsdp2"},
        "`distributed.strategy: fsdp2` does not support a 4-bit base (`quantization.load_in_4bit: true`); "
        "use `distributed.strategy: ddp`",
    ),
    # data
    ({"data.path": DELETE}, "`data.path` is required"),
    ({"data.format": "csv"}, "`data.format` must be one of auto, text, prompt_completion; got 'csv'"),
    ({"data.seq_len": 1}, "`data.seq_len` must be at least 2, got 1"),
    ({"data.seq_len": "long"}, "`data.seq_len` must be an integer, got 'long'"),
    ({"data.validation_split": 1.0}, "`data.validation_split` must be in [0, 1), got 1.0"),
    ({"data.validation_path": "/v.jsonl"}, "Can't provide both `data.validation_split` and `data.validation_path`. Choose one."),
    ({"data.tokenizer": DELETE}, "`model.tiny` has no tokenizer of its own: set `data.tokenizer: byte`"),
    # train
    ({"train.lr": 0}, "`train.lr` must be a positive number, got 0"),
    ({"train.lr": "fast"}, "`train.lr` must be a number, got 'fast'"),
    ({"train.lr": float("nan")}, "`train.lr` must be a positive number, got nan"),
    ({"train.max_grad_norm": float("inf")}, "`train.max_grad_norm` must be a positive number, got inf"),
    ({"train.weight_decay": -0.1}, "`train.weight_decay` must be a non-negative number, got -0.1"),
    ({"train.betas": [0.9]}, "`train.betas` must be two numbers in [0, 1), got [0.9]"),
    ({"train.betas": [0.9, 1.0]}, "`train.betas` must be two numbers in [0, 1), got [0.9, 1.0]"),
    ({"train.eps": 0}, "`train.eps` must be a positive number, got 0"),
    ({"train.scheduler": "linear"}, "`train.scheduler` must be one of cosine, constant; got 'linear'"),
    ({"train.warmup_ratio": 0.1}, "Can't provide both `train.warmup_steps` and `train.warmup_ratio`. Choose one."),
    ({"train.warmup_steps": -1}, "`train.warmup_steps` must be a non-negative number, got -1"),
    ({"train.warmup_steps": DELETE, "train.warmup_ratio": 1.5}, "`train.warmup_ratio` must be in [0, 1), got 1.5"),
    ({"train.min_lr_ratio": 2}, "`train.min_lr_ratio` must be in [0, 1], got 2"),
    ({"train.batch_size": 0}, "`train.batch_size` must be a positive number, got 0"),
    ({"train.grad_accum_steps": 0}, "`train.grad_accum_steps` must be a positive number, got 0"),
    ({"train.epochs": 1}, "Can't provide both `train.max_steps` and `train.epochs`. Choose one."),
    ({"train.max_steps": 0}, "`train.max_steps` must be a positive number, got 0"),
    ({"train.max_steps": 2.5}, "`train.max_steps` must be int | null, got 2.5"),
    ({"train.max_steps": DELETE, "train.epochs": 0}, "`train.epochs` must be a positive number, got 0"),
    ({"train.bf16": "fp16"}, "`train.bf16` must be true, false or auto; got 'fp16'"),
    ({"train.max_grad_norm": 0}, "`train.max_grad_norm` must be a positive number, got 0"),
    ({"train.eval_every": -5}, "`train.eval_every` must be a non-negative number, got -5"),
    ({"train.eval_batch_size": 0}, "`train.eval_batch_size` must be a positive number, got 0"),
    ({"train.eval_max_batches": 0}, "`train.eval_max_batches` must be a positive number, got 0"),
    ({"train.log_every": 0}, "`train.log_every` must be a positive number, got 0"),
    ({"train.device": "tpu"}, "`train.device` must be one of auto, cpu, cuda; got 'tpu'"),
    ({"train.compile": "yes please"}, "`train.compile` must be true or false, got 'yes please'"),
    # checkpoint
    ({"checkpoint.save_every": -1}, "`checkpoint.save_every` must be a non-negative number, got -1"),
    ({"checkpoint.keep_last": 0}, "`checkpoint.keep_last` must be a positive number, got 0"),
    ({"checkpoint.save_base_model": "sometimes"}, "`checkpoint.save_base_model` must be true, false or auto; got 'sometimes'"),
    # distributed
    ({"distributed.strategy": "zero3"}, "`distributed.strategy` must be one of auto, fsdp2, ddp, none; got 'zero3'"),
    ({"distributed.backend": "mpi"}, "`distributed.backend` must be one of auto, nccl, gloo; got 'mpi'"),
    # peft (validated by the core PeftConfig)
    ({"peft.dim": 0}, "peft.dim must be a positive integer (the LoRA rank), got 0"),
    ({"peft.rank": 4}, "unknown PeftConfig key(s) ['rank']; valid keys are"),
    ({"peft.target_modules": ["q_proj"]}, "match_all_linear=True together with target_modules=['q_proj']"),
    ({"peft.dropout": 1.5}, "dropout must be a probability in [0, 1), got 1.5"),
    # whole recipe
    (
        {"optimizer": {"lr": 1}},
        "unknown section `optimizer`; valid sections are: model, peft, quantization, data, train, checkpoint, distributed",
    ),
    ({"data": DELETE}, "the `data` section is required"),
    ({"model": DELETE}, "the `model` section is required"),
    ({"train": 5}, "section `train` must be a mapping of keys to values, got 5"),
    ({"peft": "lora"}, "section `peft` must be a mapping of keys to values, got 'lora'"),
]


@pytest.mark.parametrize("values, message", ERRORS, ids=[next(iter(v)) + f"#{i}" for i, (v, _) in enumerate(ERRORS)])
def test_every_invalid_value_is_a_config_error_naming_it(tmp_path, values, message):
    raw = with_values(tiny_raw_recipe(tmp_path), values)
    with pytest.raises(ConfigError) as info:
        RecipeConfig.from_dict(raw)
    assert isinstance(info.value, ValueError)  # callers may catch ValueError
    assert message in str(info.value)


def test_the_base_recipe_of_the_error_table_is_valid(tmp_path):
    # Otherwise each error case could fail for a reason other than the one it names.
    RecipeConfig.from_dict(tiny_raw_recipe(tmp_path))


def test_a_recipe_must_be_a_mapping():
    with pytest.raises(ConfigError, match="a recipe must be a mapping of sections, got list"):
        RecipeConfig.from_dict([1, 2])


def test_unknown_key_lists_every_valid_key_of_its_section(tmp_path):
    raw = with_values(tiny_raw_recipe(tmp_path), {"train.maxsteps": 5})
    with pytest.raises(ConfigError) as info:
        RecipeConfig.from_dict(raw)
    msg = str(info.value)
    assert msg.startswith("unknown key `train.maxsteps`; valid keys for `train` are: ")
    listed = msg.split(": ", 1)[1].split(", ")
    assert listed == [f.name for f in dataclasses.fields(TrainConfig)]


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {tiny: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="list.yaml: a recipe must be a mapping of sections"):
        load_recipe(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "item, keys, value",
    [
        ("peft.dim=16", ["peft", "dim"], 16),
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("train.lr=1e-4", ["train", "lr"], 1e-4),  # YAML 1.2: a float without a dot
        ("peft.kernels.base_gemm=cublas", ["peft", "kernels", "base_gemm"], "cublas"),
        ("train.bf16=false", ["train", "bf16"], False),
        ("checkpoint.resume=null", ["checkpoint", "resume"], None),
        ("data.path=", ["data", "path"], None),
        ("peft.target_modules=[q_proj,v_proj]", ["peft", "target_modules"], ["q_proj", "v_proj"]),
        ("model.tiny.hidden_size=64", ["model", "tiny", "hidden_size"], 64),
        ("--train.max_steps=5", ["train", "max_steps"], 5),
    ],
)
def test_parse_override_reads_values_as_yaml(item, keys, value):
    assert parse_override(item) == (keys, value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.max_steps", "override 'train.max_steps' must look like `section.key=value`"),
        ("max_steps=5", "override key 'max_steps' must be dotted as `section.key`"),
        ("train..lr=1", "override key 'train..lr' must be dotted as `section.key`"),
        ("train.betas=[0.9,", "override 'train.betas=[0.9,': value is not valid YAML"),
    ],
)
def test_malformed_overrides_are_errors(item, message):
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert message in str(info.value)


def test_overrides_apply_on_top_of_the_file_and_leave_the_input_alone(tmp_path):
    raw = tiny_raw_recipe(tmp_path)
    before = yaml.safe_dump(raw)
    merged = apply_overrides(raw, ["peft.dim=16", "train.lr=1e-4", "model.tiny.hidden_size=64", "quantization.load_in_4bit=true"])
    assert yaml.safe_dump(raw) == before
    cfg = RecipeConfig.from_dict(merged)
    assert cfg.peft.dim == 16 and cfg.train.lr == 1e-4 and cfg.model.tiny["hidden_size"] == 64
    assert cfg.quantization.load_in_4bit is True
    assert cfg.model.tiny["num_hidden_layers"] == 2  # siblings of an overridden nested key survive


def test_a_nested_override_creates_the_missing_mappings_and_keeps_siblings():
    merged = apply_overrides({"peft": {"dim": 4}}, ["peft.kernels.base_gemm=cublas", "peft.kernels.fuse_proj=false"])
    assert merged == {"peft": {"dim": 4, "kernels": {"base_gemm": "cublas", "fuse_proj": False}}}


def test_peft_kernels_override_reaches_the_kernel_options():
    from automodel_lora import PeftConfig

    if "kernels" not in {f.name for f in dataclasses.fields(PeftConfig)}:
        pytest.skip("this PeftConfig has no `kernels` field")
    cfg = load_recipe(QUICKSTART, ["peft.kernels.base_gemm=cublas", "peft.kernels.fuse_proj=false"])
    assert cfg.peft.kernels.base_gemm == "cublas" and cfg.peft.kernels.fuse_proj is False
    assert RecipeConfig.from_dict(yaml.safe_load(cfg.to_yaml())).peft.kernels == cfg.peft.kernels
    with pytest.raises(ConfigError, match=r"peft\.kernels\.base_gemm='cutlass' is not allowed"):
        load_recipe(QUICKSTART, ["peft.kernels.base_gemm=cutlass"])


def test_override_of_an_unknown_section_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        apply_overrides(tiny_raw_recipe(tmp_path), ["optim.lr=1"])
    assert str(info.value) == f"override `optim.lr`: unknown section `optim`; valid sections are: {', '.join(SECTIONS)}"


def test_override_of_an_unknown_key_names_the_section_keys():
    with pytest.raises(ConfigError) as info:
        load_recipe(QUICKSTART, ["checkpoint.every=5"])
    valid = ", ".join(f.name for f in dataclasses.fields(CheckpointConfig))
    assert str(info.value) == f"unknown key `checkpoint.every`; valid keys for `checkpoint` are: {valid}"


def test_relative_paths_yaml_against_its_file_overrides_against_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(yaml.safe_dump(with_values(tiny_raw_recipe(tmp_path), {"data.path": "d.jsonl"})))
    assert load_recipe(tmp_path / "sub" / "r.yaml").data.path == str(tmp_path / "sub" / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(tmp_path / "sub" / "r.yaml", ["data.path=other.jsonl"]).data.path == "other.jsonl"


# ---------------------------------------------------------------------------------------- command line


def test_print_config_prints_the_merged_config_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = finetune_main(["--config", str(QUICKSTART), "--print-config", "peft.dim=4", "train.max_steps=5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(f"# merged config from {QUICKSTART} + peft.dim=4 train.max_steps=5\n")
    printed = yaml.safe_load(out)
    assert printed == load_recipe(QUICKSTART, ["peft.dim=4", "train.max_steps=5"]).to_dict()
    assert printed["peft"]["dim"] == 4 and printed["train"]["max_steps"] == 5
    assert not (tmp_path / "outputs").exists()


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    rc = finetune_main(["--config", str(QUICKSTART), "train.maxsteps=5"], prog="finetune.py")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("finetune.py: error: unknown key `train.maxsteps`; valid keys for `train` are: lr,")


def test_console_script_dispatch(capsys):
    assert main(["finetune", "--config", str(QUICKSTART), "--print-config"]) == 0
    assert "match_all_linear: true" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "usage: automodel-lora {finetune}" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert main([]) == 2


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("automodel-lora") == "automodel_lora.cli:main"


def test_scripts_finetune_py_runs_as_a_program(tmp_path):
    # One subprocess (~5-8 s of imports on 2 cores); the error paths are checked in-process above.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "finetune.py"),
            "--config",
            str(QUICKSTART),
            "--print-config",
            "train.max_steps=7",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 7


# ---------------------------------------------------------------------------------------- shipped recipes

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_the_real_model_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "llama3_8b_lora", "llama3_8b_qlora", "qwen2_5_7b_lora"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates_and_its_header_gives_the_launch_command(path):
    cfg = load_recipe(path)  # no weights are loaded: only the YAML is validated
    header = path.read_text().split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"scripts/finetune.py --config configs/{path.name}" in header
    if cfg.model.name_or_path is not None:  # a real model: placeholders the user overrides
        assert f"torchrun --nproc-per-node 8 scripts/finetune.py --config configs/{path.name}" in header
        assert cfg.model.name_or_path.startswith("/path/to/") and cfg.data.path.startswith("/path/to/")
        assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing and cfg.train.bf16 is True
        assert cfg.checkpoint.resume == "auto" and cfg.checkpoint.save_every > 0
    else:
        assert (REPO / "configs" / "data").resolve() in (REPO / cfg.data.path).resolve().parents


def _architecture(stem: str):
    """The published shapes of each real-model recipe's model (as in its config.json)."""
    from transformers import LlamaConfig, Qwen2Config

    if stem.startswith("llama3_8b"):
        return LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
        )
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
    )


@pytest.mark.parametrize("stem", ["llama3_8b_lora", "llama3_8b_qlora", "qwen2_5_7b_lora"])
def test_real_model_recipes_adapt_every_projection_of_their_architecture(stem):
    import torch
    from transformers import AutoModelForCausalLM

    import automodel_lora as al

    cfg = load_recipe(REPO / "configs" / f"{stem}.yaml")
    arch = _architecture(stem)
    with torch.device("meta"):  # full-size shapes, no memory
        model = AutoModelForCausalLM.from_config(arch)
    assert al.apply_lora_to_linear_modules(model, cfg.peft) == 7 * arch.num_hidden_layers
    assert cfg.data.seq_len <= arch.max_position_embeddings
    assert cfg.quantization.load_in_4bit == stem.endswith("qlora")


def test_a_peft_name_override_replaces_our_name_in_the_yaml_and_back(tmp_path):
    """`peft.r=16` on the command line over a YAML that sets `dim:` (or `peft.dim=` over `r:`) sets the rank:
    an override replaces the other spelling of its field instead of colliding with it."""
    from automodel_lora.recipe.config import apply_overrides

    raw = {"peft": {"dim": 8, "alpha": 16}}
    assert apply_overrides(raw, ["peft.r=16"])["peft"] == {"alpha": 16, "r": 16}
    assert apply_overrides({"peft": {"r": 4}}, ["peft.dim=32"])["peft"] == {"dim": 32}
    assert apply_overrides({"peft": {"lora_alpha": 4}}, ["peft.alpha=2"])["peft"] == {"alpha": 2}
    assert raw == {"peft": {"dim": 8, "alpha": 16}}  # the input is not changed
