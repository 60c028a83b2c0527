"""merge_and_save: a merged plain transformers model on disk; the adapted model in memory left untouched."""

import copy
import json
import os

import pytest
import torch
from torch import nn

import automodel_lora as al

from .conftest import assert_close, tiny_llama

IDS = (torch.arange(24) * 7 % 128).reshape(2, 12)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def adapted(dtype=torch.float32, **config):
    model = tiny_llama().to(dtype)
    original_keys = list(model.state_dict())
    al.apply_lora_to_linear_modules(model, al.PeftConfig(**{"target_modules": TARGETS, "dim": 4, "alpha": 8, **config}))
    with torch.no_grad():
        for _, m in al.lora_modules(model):
            m.lora_B.weight.normal_(std=0.1)
    return model, original_keys


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert len(al.lora_modules(model)) == 11 and not any(m.lora_merged for _, m in al.lora_modules(model))


@pytest.mark.parametrize("recompute", [False, True])
def test_merged_model_loads_as_plain_llama_with_the_adapted_logits(tmp_path, recompute):
    from transformers import AutoModelForCausalLM

    model, original_keys = adapted(recompute_mlp_input=recompute)
    expected, before = logits(model), snapshot(model)
    assert al.merge_and_save(model, tmp_path) == 11
    assert_unchanged(model, before)  # non-destructive: still adapted, base weights bit for bit
    assert_close(logits(model), expected)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "lora" not in json.dumps(config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert list(loaded.state_dict()) == original_keys
    assert not any("lora" in type(m).__name__.lower() or "Recomputed" in type(m).__name__ for m in loaded.modules())
    assert {type(m) for m in loaded.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert_close(logits(loaded), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_weights_are_the_bits_merge_lora_writes(tmp_path, dtype):
    from safetensors.torch import load_file

    model, original_keys = adapted(dtype)
    al.merge_and_save(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original_keys)
    al.merge_lora(model)
    for key, value in saved.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_bf16_merged_model_is_as_close_to_the_exact_logits_as_the_adapted_one(tmp_path):
    """Over a whole model bf16 logits drift beyond one matmul's tolerance, from the adapted and the merged
    model alike; so both are measured against the adapted model run in float64."""
    from transformers import AutoModelForCausalLM

    model, _ = adapted(torch.bfloat16, lora_dtype="bfloat16")
    exact = logits(copy.deepcopy(model).double())
    expected, before = logits(model), snapshot(model)
    al.merge_and_save(model, tmp_path)
    assert_unchanged(model, before)  # merge + unmerge in bf16 would not give these bits back
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    got = logits(loaded)
    assert got.dtype == torch.bfloat16

    def error(x):
        return ((x.double() - exact).norm() / exact.norm()).item()

    assert error(got) < 3e-2 and error(got) < 2 * error(expected), (error(got), error(expected))


def test_already_merged_adapters_are_saved_as_they_are(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = adapted()
    expected = logits(model)
    al.merge_lora(model)
    al.merge_and_save(model, tmp_path)
    assert all(m.lora_merged for _, m in al.lora_modules(model))
    assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), expected)


def test_nan_adapter_is_refused_naming_the_module_and_nothing_is_written(tmp_path):
    model, _ = adapted()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.lora_A.weight[0, 0] = float("nan")
    before = snapshot(model)
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*Nothing was written"):
        al.merge_and_save(model, out)
    assert not out.exists()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or k.endswith("lora_A.weight") for k, v in before.items())


def test_tied_adapted_weight_is_refused(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="tied"):
        al.merge_and_save(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_tied_embeddings_not_adapted_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie_word_embeddings=True)
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.normal_(std=0.1)
    expected = logits(model)
    al.merge_and_save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_close(logits(loaded), expected)


def test_not_a_pretrained_model_is_a_type_error_saying_what_to_do(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True))
    with pytest.raises(TypeError, match=r"remove_lora\(model, merge=True\)"):
        al.merge_and_save(model, tmp_path)
    assert os.listdir(tmp_path) == []


def test_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        al.merge_and_save(tiny_llama(), tmp_path / "merged")


def test_4bit_base_is_refused_and_nothing_is_written(tmp_path):
    pytest.importorskip("bitsandbytes")
    from .test_qlora import to_nf4

    model = to_nf4(tiny_llama())
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized"):
        al.merge_and_save(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
