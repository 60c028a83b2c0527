"""Adapter files in HF PEFT's format, proven against the real `peft` package in both directions."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import automodel_lora as al

from .conftest import assert_close, tiny_llama
from .test_faults_adapter import adapted as adapted_llama

peft = pytest.importorskip("peft")


IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_saved_files_follow_peft_layout(tmp_path):
    cfg = al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8, dropout=0.1)
    model = adapted_llama(cfg)
    al.save_adapter(model, tmp_path, cfg)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "automodel_lora_config.json"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.1, False)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    )
    state = al.lora_state_dict(model)
    assert sorted("base_model.model." + k for k in state) == sorted(tensors)


def test_target_modules_are_fqns_when_short_names_would_select_more(tmp_path):
    cfg = al.PeftConfig(target_modules=["layers.0.self_attn.q_proj"])
    al.save_adapter(adapted_llama(cfg), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path, use_rslora):
    cfg = al.PeftConfig(match_all_linear=True, dim=4, alpha=8, use_rslora=use_rslora)
    model = adapted_llama(cfg)
    al.save_adapter(model, tmp_path, cfg)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")
    assert not torch.allclose(logits(model), logits(tiny_llama()))  # the adapter does something


def test_mixed_ranks_are_written_as_rank_pattern_and_load_in_peft(tmp_path):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["down_proj"], dim=2, alpha=3))
    with torch.no_grad():
        for _, m in al.lora_modules(model):
            m.lora_B.weight.normal_(std=0.05)
    al.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path)
    settings = fresh.model.layers[1].mlp.down_proj.lora_settings
    assert settings.dim == 2 and settings.alpha == 3
    assert_close(logits(fresh), logits(model))


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 5}}])
def test_adapter_trained_with_peft_loads_here_with_same_logits(tmp_path, extra):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM", **extra)
    peft_model = peft.get_peft_model(tiny_llama(), config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path) == 6
    assert model.model.layers[0].self_attn.q_proj.lora_settings.dropout_position == "pre"  # PEFT's semantics
    assert_close(logits(model), logits(peft_model), what="logits")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 12 and all("lora_" in n for n in trainable)


def test_adapter_trained_with_peft_on_a_target_modules_regex_loads_the_modules_peft_adapted(tmp_path):
    """A single-string target_modules is PEFT's full-match regex: the file keeps the string, and loading it
    here adapts exactly the modules PEFT adapted, with PEFT's logits."""
    regex = r".*layers\.1\.self_attn\.(q|v)_proj"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=regex, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == regex
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path) == 2
    assert sorted(name for name, _ in al.lora_modules(model)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert_close(logits(model), logits(peft_model), what="logits")


def test_adapter_trained_with_peft_on_some_layers_loads_those_layers(tmp_path):
    """PEFT's layers_to_transform: the file's layers only are adapted, with PEFT's logits."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.eval().save_pretrained(str(tmp_path))
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path) == 1
    assert [name for name, _ in al.lora_modules(model)] == ["model.layers.1.self_attn.q_proj"]
    assert_close(logits(model), logits(peft_model), what="logits")


def test_load_into_already_patched_model_and_round_trip(tmp_path):
    cfg = al.PeftConfig(target_modules=["q_proj"], dim=4, dropout_position="pre", lora_dtype="float32")
    model = adapted_llama(cfg)
    al.save_adapter(model, tmp_path, cfg)
    patched = tiny_llama()
    al.apply_lora_to_linear_modules(patched, cfg)
    assert al.load_adapter(patched, tmp_path) == 2
    assert_close(logits(patched), logits(model))
    unpatched = tiny_llama()
    al.load_adapter(unpatched, tmp_path)  # restores the library-only settings from automodel_lora_config.json
    q_proj = unpatched.model.layers[0].self_attn.q_proj
    assert q_proj.lora_settings.dropout_position == "pre" and q_proj.lora_A.weight.dtype == torch.float32


def test_shape_mismatch_names_the_key(tmp_path):
    al.save_adapter(adapted_llama(al.PeftConfig(target_modules=["q_proj"], dim=4)), tmp_path)
    other = tiny_llama()
    al.apply_lora_to_linear_modules(other, al.PeftConfig(target_modules=["q_proj"], dim=8))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A.weight.*\(4, 32\).*\(8, 32\)"):
        al.load_adapter(other, tmp_path)


def test_name_mismatches_are_errors_naming_the_key(tmp_path):
    al.save_adapter(adapted_llama(al.PeftConfig(target_modules=["q_proj"])), tmp_path)
    patched_elsewhere = tiny_llama()
    al.apply_lora_to_linear_modules(patched_elsewhere, al.PeftConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="k_proj"):
        al.load_adapter(patched_elsewhere, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors = {k.replace("q_proj", "query"): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.query.*no such module"):
        al.load_adapter(tiny_llama(), tmp_path)


def test_missing_half_and_unsupported_adapters(tmp_path):
    al.save_adapter(adapted_llama(al.PeftConfig(target_modules=["q_proj"])), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has no lora_B.weight"):
        al.load_adapter(tiny_llama(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "layer_replication": [[0, 1]]}))
    with pytest.raises(ValueError, match="layer_replication.*not supported, only LoRA and DoRA"):
        al.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        al.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        al.save_adapter(tiny_llama(), tmp_path)


def test_a_failed_write_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    cfg = al.PeftConfig(target_modules=["q_proj"])
    al.save_adapter(adapted_llama(cfg), tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        al.save_adapter(adapted_llama(cfg), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("other", [dict(alpha=64), dict(use_rslora=True)])
def test_loading_into_a_model_patched_with_another_scale_is_an_error(tmp_path, other):
    cfg = al.PeftConfig(target_modules=["q_proj"], dim=4, alpha=4)
    al.save_adapter(adapted_llama(cfg), tmp_path, cfg)
    patched = tiny_llama()
    al.apply_lora_to_linear_modules(patched, al.PeftConfig(**{**cfg.to_dict(), **other}))
    with pytest.raises(ValueError, match=r"lora_alpha=4, use_rslora=False for 'model.layers.0.self_attn.q_proj'"):
        al.load_adapter(patched, tmp_path)


def test_resave_without_config_drops_the_stale_library_config(tmp_path):
    cfg = al.PeftConfig(target_modules=["q_proj"], dim=4, dropout_position="post")
    model = adapted_llama(cfg)
    al.save_adapter(model, tmp_path, cfg)
    assert os.path.exists(tmp_path / "automodel_lora_config.json")
    al.save_adapter(model, tmp_path)
    assert not os.path.exists(tmp_path / "automodel_lora_config.json")
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path)
    assert fresh.model.layers[0].self_attn.q_proj.lora_settings.dropout_position == "pre"  # PEFT's, not the stale file's


def test_adapter_files_are_readable_by_others(tmp_path):
    al.save_adapter(adapted_llama(al.PeftConfig(target_modules=["q_proj"], dim=4)), tmp_path)
    old = os.umask(0o022)
    os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~old, name
