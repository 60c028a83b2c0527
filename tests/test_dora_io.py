"""DoRA outside the layer: HF PEFT's format both ways against the real `peft` (logits equal after training, training
step for step, GPT-2 Conv1D), the errors for files whose magnitudes disagree with their config or the model, and the
recipe (`peft.use_dora: true`, one process and FSDP2 on two). The layer math, merge and named adapters are in
``test_dora.py``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import automodel_lora as al
from automodel_lora.dora import MAGNITUDE, magnitude_of

from .conftest import assert_close, edit_adapter_files, tiny_llama
from .recipe_helpers import adapter_tensors, run_recipe, tiny_raw_recipe
from .test_dora import IDS, TARGETS, adapted, logits, randomize

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


# ---------------------------------------------------------------------------------------------------------
# HF PEFT's format, both ways
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def train_a_few_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("use_triton", [True, False])
def test_adapter_trained_with_peft_loads_here_with_the_same_logits(tmp_path, peft, use_triton):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    train_a_few_steps(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    assert KEY in load_file(tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path, use_triton=use_triton) == 8
    assert all(m.lora_settings.use_dora and magnitude_of(m).requires_grad for _, m in al.lora_modules(model))
    assert_close(logits(model), logits(peft_model), what="logits")
    al.merge_lora(model)
    assert_close(logits(model), logits(peft_model.merge_and_unload()), what="merged logits")


@pytest.mark.parametrize("use_triton", [True, False])
def test_adapter_trained_here_loads_in_peft_with_the_same_logits(tmp_path, peft, use_triton):
    model, cfg = adapted(use_triton=use_triton)
    train_a_few_steps(model)
    al.save_adapter(model, tmp_path, cfg)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors[KEY].shape == (32,) and set(al.lora_state_dict(model)) == {
        k.removeprefix("base_model.model.") for k in tensors}
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path)
    al.load_adapter(fresh, tmp_path)  # into the patched model too
    assert_close(logits(fresh), logits(model), what="reloaded logits")


@pytest.mark.parametrize("use_triton", [True, False])
def test_training_from_the_same_start_follows_peft_step_for_step(tmp_path, peft, use_triton):
    """The gradients of A, B and the magnitude are PEFT's: the same SGD steps from the same adapter end at the same
    logits."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), config)
    randomize(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama()
    al.load_adapter(model, tmp_path, use_triton=use_triton)
    for m in (peft_model, model):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            m(IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        m.eval()
    ours = {k: v for k, v in al.lora_state_dict(model).items() if k.endswith(MAGNITUDE)}
    assert ours and not torch.equal(ours[KEY.removeprefix("base_model.model.")],
                                    load_file(tmp_path / "adapter_model.safetensors")[KEY])  # it moved
    assert_close(logits(model), logits(peft_model), dtype=torch.float32, what="logits after 3 SGD steps")


@pytest.mark.parametrize("use_triton", [True, False])
def test_gpt2_conv1d_dora_adapters_go_both_ways_with_peft(tmp_path, peft, use_triton):
    from .test_conv1d import tiny_gpt2

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True)
    peft_model = peft.get_peft_model(tiny_gpt2(), config)
    randomize(peft_model)
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    model = tiny_gpt2()
    assert al.load_adapter(model, tmp_path / "peft", use_triton=use_triton) == 4
    assert_close(logits(model), logits(peft_model), what="PEFT's GPT-2 DoRA adapter here")
    al.save_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
    assert_close(logits(back), logits(model), what="ours in PEFT")
    al.merge_lora(model)
    assert_close(logits(model), logits(back), what="merged Conv1D weights")


@pytest.fixture
def dora_adapter(tmp_path):
    model, cfg = adapted()
    al.save_adapter(model, tmp_path, cfg)
    return tmp_path


@pytest.mark.parametrize("change, match", [
    (dict(tensors=lambda t: {k: v for k, v in t.items() if not k.endswith(MAGNITUDE)}),
     r"use_dora=true, but .* has no base_model\.model\..*\.lora_magnitude_vector \(8 module\(s\) lack one\)"),
    (dict(config={"use_dora": False}), r"holds base_model\.model\..*lora_magnitude_vector, but .* use_dora=false"),
    (dict(tensors=lambda t: {**t, KEY: torch.ones(5)}), rf"{KEY} has shape \(5,\).*must be \(32,\)"),
    (dict(tensors=lambda t: {**t, KEY.replace("q_proj", "k_proj"): torch.ones(16)}),
     r"k_proj\.lora_magnitude_vector, but no .*lora_A\.weight / lora_B\.weight"),
    (dict(config={"use_dora": "yes"}), r"use_dora='yes' must be the JSON literal true or false"),
])
def test_a_file_whose_magnitudes_disagree_with_its_config_is_an_error_naming_key_and_fix(dora_adapter, change, match):
    edit_adapter_files(dora_adapter, **change)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=match):
        al.load_adapter(model, dora_adapter)
    assert not al.lora_modules(model)


def test_loading_dora_into_a_plain_lora_model_is_an_error(dora_adapter):
    patched = tiny_llama()
    al.apply_lora_to_linear_modules(patched, al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8))
    with pytest.raises(al.AdapterFormatError, match=r"is a plain LoRA adapter .* patch with use_dora=True"):
        al.load_adapter(patched, dora_adapter)


# ---------------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------------
def test_recipe_yaml_key_and_override(tmp_path):
    from automodel_lora.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_recipe(tmp_path, peft={"use_dora": True})))
    assert load_recipe(path).peft.use_dora is True
    assert load_recipe(path, ["peft.use_dora=false"]).peft.use_dora is False


@pytest.mark.slow
def test_recipe_trains_the_magnitudes_and_saves_them_in_peft_format(tmp_path):
    summary, _ = run_recipe(tiny_raw_recipe(tmp_path, peft={"use_dora": True}, train={"max_steps": 3}))
    tensors = adapter_tensors(summary["adapter"])
    magnitudes = [t for key, t in tensors.items() if key.endswith(MAGNITUDE)]
    assert len(magnitudes) == len([k for k in tensors if k.endswith("lora_B.weight")]) > 0
    assert json.loads(open(f"{summary['adapter']}/adapter_config.json").read())["use_dora"] is True
    assert all(torch.isfinite(t).all() and (t > 0).all() for t in magnitudes)


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_the_same_dora_adapter_as_one(tmp_path):
    """The magnitude is an ordinary parameter to FSDP2: sharded, gathered, reduced like lora_A / lora_B."""
    from .recipe_helpers import step_losses
    from .test_recipe_distributed import _recipe, _torchrun

    (tmp_path / "one").mkdir()
    run_recipe(_recipe(tmp_path / "one", "run", batch_size=2, peft={"use_dora": True}))
    summary, _, _ = _torchrun(tmp_path, "fsdp2", peft={"use_dora": True})
    assert summary["world_size"] == 2
    ref_losses, losses = step_losses(tmp_path / "one" / "run"), step_losses(tmp_path / "run")
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    ref, got = adapter_tensors(tmp_path / "one" / "run" / "adapter"), adapter_tensors(tmp_path / "run" / "adapter")
    assert got.keys() == ref.keys() and sum(k.endswith(MAGNITUDE) for k in ref) == len(ref) // 3
    for key in ref:
        assert_close(got[key], ref[key], what=f"fsdp2 {key}")
