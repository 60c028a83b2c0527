"""HF PEFT's `lora_bias` outside the layer: the config field (Python, YAML recipe), merge / unmerge / remove /
merge_and_save folding `s * lora_B.bias` into the base bias (refused for a base without one, as PEFT does),
and the PEFT file format both ways against the real `peft` package, with the errors for files whose tensors
disagree with their config. The layer math is in ``test_lora_bias.py``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import automodel_lora as al

from .conftest import assert_close, edit_adapter_files, tiny_llama
from .recipe_helpers import adapter_tensors, run_recipe, tiny_raw_recipe

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model):
    """Nonzero lora_B weights and biases (an adapter at init adds nothing, which would prove nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05 if name.endswith("weight") else 0.5)


def llama(biased=False):
    """The tiny Llama; with `biased`, every linear but lm_head has a bias (Llama's attention_bias, mlp_bias)."""
    return tiny_llama(attention_bias=biased, mlp_bias=biased)


def adapted(biased=False, use_triton=True, **config):
    """`llama(biased)` with lora_bias adapters on TARGETS, their lora_B weights and biases nonzero."""
    model = llama(biased)
    cfg = al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8, lora_bias=True, use_triton=use_triton, **config)
    al.apply_lora_to_linear_modules(model, cfg)
    randomize(model)
    return model, cfg


@pytest.fixture
def peft():
    peft = pytest.importorskip("peft")
    if "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no lora_bias (added in peft 0.14)")
    return peft


# ---------------------------------------------------------------------------------------------------------
# the config field
# ---------------------------------------------------------------------------------------------------------
def test_config_field_round_trips_and_is_checked():
    cfg = al.PeftConfig(match_all_linear=True, lora_bias=True)
    assert cfg.lora_settings().lora_bias and al.PeftConfig.from_dict(cfg.to_dict()) == cfg
    assert not al.PeftConfig(match_all_linear=True).lora_settings().lora_bias  # PEFT's default
    with pytest.raises(ValueError, match=r"PeftConfig.lora_bias must be true or false .* got 'true'"):
        al.PeftConfig(match_all_linear=True, lora_bias="true")


def test_recipe_yaml_key_and_override(tmp_path):
    from automodel_lora.recipe import load_recipe
    from automodel_lora.recipe.config import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_recipe(tmp_path, peft={"lora_bias": True})))
    assert "lora_bias: true" in path.read_text()
    assert load_recipe(path).peft.lora_bias is True
    assert load_recipe(path, ["peft.lora_bias=false"]).peft.lora_bias is False
    with pytest.raises(ConfigError, match=r"peft.lora_bias must be true or false"):
        load_recipe(path, ["peft.lora_bias=maybe"])


@pytest.mark.slow
def test_recipe_trains_the_bias_and_saves_it_in_peft_format(tmp_path):
    summary, _ = run_recipe(tiny_raw_recipe(tmp_path, peft={"lora_bias": True}, train={"max_steps": 3}))
    tensors = adapter_tensors(summary["adapter"])
    biases = [t for key, t in tensors.items() if key.endswith("lora_B.bias")]
    assert len(biases) == len([k for k in tensors if k.endswith("lora_B.weight")]) and all(b.any() for b in biases)
    assert json.loads(open(f"{summary['adapter']}/adapter_config.json").read())["lora_bias"] is True


# ---------------------------------------------------------------------------------------------------------
# merge / unmerge / remove / merge_and_save
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_triton", [True, False])
def test_merge_equals_the_unmerged_output_and_unmerge_restores_the_bias(use_triton):
    model, _ = adapted(biased=True, use_triton=use_triton)
    q_proj = model.model.layers[0].self_attn.q_proj
    bias_before, expected = q_proj.bias.detach().clone(), logits(model)
    assert al.merge_lora(model) == 8
    s = q_proj.lora_settings.scale
    assert_close(q_proj.bias, bias_before + s * q_proj.lora_B.bias.detach(), what="merged bias = b + s * b_B")
    assert_close(logits(model), expected, what="merged logits")
    al.unmerge_lora(model)
    assert_close(q_proj.bias, bias_before, what="unmerged bias")
    assert_close(logits(model), expected, what="unmerged logits")
    al.merge_lora(model)
    al.remove_lora(model)  # merged, merge=False: unmerged first
    assert_close(q_proj.bias, bias_before, what="bias after remove_lora")
    model, _ = adapted(biased=True, use_triton=use_triton)
    expected = logits(model)
    al.remove_lora(model, merge=True)
    assert_close(logits(model), expected, what="logits after remove_lora(merge=True)")


def test_merge_into_a_base_without_bias_is_refused_as_peft_does(tmp_path):
    model, _ = adapted(biased=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = r"cannot merge the adapter of 'model\.layers\.0\.self_attn\.q_proj'.*has no bias.*lora_bias=False"
    for merge in (al.merge_lora, lambda m: al.remove_lora(m, merge=True), lambda m: al.merge_and_save(m, tmp_path)):
        with pytest.raises(ValueError, match=match):
            merge(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert len(al.lora_modules(model)) == 8 and not list(tmp_path.iterdir())


def test_merge_and_save_writes_the_folded_bias(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = adapted(biased=True)
    original_keys = list(llama(True).state_dict())
    expected = logits(model)
    assert al.merge_and_save(model, tmp_path) == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == original_keys
    assert_close(logits(loaded), expected, what="logits of the merged checkpoint")


# ---------------------------------------------------------------------------------------------------------
# PEFT's format, both ways
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # PEFT: a base without bias cannot merge
@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")  # PEFT takes any 1-D tensor for a shard
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("biased", [False, True])
def test_adapter_trained_with_peft_loads_here_with_the_same_logits(tmp_path, peft, use_triton, biased):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(llama(biased), config)
    randomize(peft_model)
    peft_model.eval().save_pretrained(str(tmp_path))
    assert KEY in load_file(tmp_path / "adapter_model.safetensors")
    model = llama(biased)
    assert al.load_adapter(model, tmp_path, use_triton=use_triton) == 8
    assert all(m.lora_settings.lora_bias and m.lora_B.bias.requires_grad for _, m in al.lora_modules(model))
    assert_close(logits(model), logits(peft_model), what="logits")
    if biased:  # PEFT's merge and ours fold the same bias
        al.merge_lora(model)
        assert_close(logits(model), logits(peft_model.merge_and_unload()), what="merged logits")


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")  # PEFT takes any 1-D tensor for a shard
@pytest.mark.parametrize("use_triton", [True, False])
def test_adapter_saved_here_loads_in_peft_with_the_same_logits(tmp_path, peft, use_triton):
    model, cfg = adapted(use_triton=use_triton)
    al.save_adapter(model, tmp_path, cfg)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert KEY in tensors and tensors[KEY].shape == (32,) and tensors[KEY].any()
    assert set(al.lora_state_dict(model)) == {k.removeprefix("base_model.model.") for k in tensors}
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path)
    al.load_adapter(fresh, tmp_path)  # into the patched model too
    assert_close(logits(fresh), logits(model), what="reloaded logits")


# ---------------------------------------------------------------------------------------------------------
# files whose tensors disagree with their config, or with the patched model
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def bias_adapter(tmp_path):
    model, cfg = adapted()
    al.save_adapter(model, tmp_path, cfg)
    return tmp_path


@pytest.mark.parametrize("change, match", [
    (dict(tensors=lambda t: {k: v for k, v in t.items() if not k.endswith(".bias")}),
     r"lora_bias=true, but .* has no base_model\.model\..*\.lora_B\.bias \(8 module\(s\) lack one\); save the "
     r"adapter again, or set \"lora_bias\": false"),
    (dict(config={"lora_bias": False}),
     r"holds base_model\.model\..*lora_B\.bias, but .* lora_bias=false.*Set \"lora_bias\": true"),
    (dict(tensors=lambda t: {**t, KEY: torch.zeros(5)}), rf"{KEY} has shape \(5,\).*must be \(32,\)"),
    (dict(tensors=lambda t: {**t, KEY.replace("lora_B", "lora_A"): torch.zeros(4)}),
     r"lora_A\.bias: lora_A has no bias"),
    (dict(config={"lora_bias": "yes"}), r"lora_bias='yes' must be the JSON literal true or false"),
])
def test_a_file_whose_biases_disagree_with_its_config_is_an_error_naming_key_and_fix(bias_adapter, change, match):
    edit_adapter_files(bias_adapter, **change)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=match):
        al.load_adapter(model, bias_adapter)
    assert not al.lora_modules(model)


@pytest.mark.parametrize("model_bias", [False, True])
def test_loading_into_a_patched_model_with_the_other_lora_bias_is_an_error(tmp_path, model_bias):
    model, cfg = adapted()
    if model_bias:  # the file is the one without biases
        model, cfg = tiny_llama(), al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8)
        al.apply_lora_to_linear_modules(model, cfg)
    al.save_adapter(model, tmp_path, cfg)
    patched = tiny_llama()
    al.apply_lora_to_linear_modules(patched, al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8, lora_bias=model_bias))
    with pytest.raises(al.AdapterFormatError, match=rf"has {'a' if model_bias else 'no'} lora_B bias.*"
                                                    rf"patch with lora_bias={not model_bias}"):
        al.load_adapter(patched, tmp_path)


def test_mixed_lora_bias_cannot_be_written_in_one_peft_config(tmp_path):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"], lora_bias=True))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="one lora_bias flag per adapter"):
        al.save_adapter(model, tmp_path)
