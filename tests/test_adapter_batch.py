"""Many adapters in one batch (``adapter_batch``): every sequence's logits equal those of the model running
that sequence's adapter alone (``set_adapter``; the base model for None), in float64 on the CPU, on the
PyTorch loop and (under ``TRITON_INTERPRET=1``) on the segmented kernels; greedy generation likewise;
ranks that differ between adapters; modules that lack one of the adapters; integer ids; refusals.

float64 throughout, so the mixed batch and the one-adapter runs differ only by summation order: 1e-10 of
the largest logit. An adapter applied to the wrong sequence moves logits by O(0.1) here.
"""

from __future__ import annotations

import pytest
import torch

import automodel_lora as al

from .conftest import tiny_llama

TOL = 1e-10


def _model_with_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], dim=7,
                                                         alpha=3), adapter_name="b")
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=2, alpha=4, use_rslora=True),
                                    adapter_name="c")
    model.double()  # every adapter in float64 too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.eval()


def _alone(model, name, ids):
    if name is None:
        with al.disable_adapter(model):
            return model(input_ids=ids).logits
    al.set_adapter(model, name)
    try:
        return model(input_ids=ids).logits
    finally:
        al.set_adapter(model, "default")


@pytest.mark.parametrize("batch", [["default", "b", None, "c", "b"], [None, None], ["c"], [2, -1, 1, 0]])
def test_each_sequence_gets_exactly_its_own_adapter(batch):
    model = _model_with_adapters()
    ids = torch.randint(0, 128, (len(batch), 9), generator=torch.Generator().manual_seed(1))
    with al.adapter_batch(model, batch):
        mixed = model(input_ids=ids).logits
    names = al.adapter_names(model)
    for i, a in enumerate(batch):
        name = names[a] if isinstance(a, int) and a >= 0 else (None if a == -1 else a)
        want = _alone(model, name, ids[i : i + 1])[0]
        assert (mixed[i] - want).abs().max() <= TOL * want.abs().max(), (i, a)
    assert all("forward" not in m.__dict__ for _, m in al.lora_modules(model))  # nothing left behind


def test_the_check_can_tell_adapters_apart():
    model = _model_with_adapters()
    ids = torch.randint(0, 128, (2, 9))
    with al.adapter_batch(model, ["b", "c"]):
        mixed = model(input_ids=ids).logits
    assert (mixed[0] - _alone(model, "c", ids[:1])[0]).abs().max() > 1e3 * TOL * mixed.abs().max()


def test_greedy_generation_with_mixed_adapters_equals_each_alone():
    model = _model_with_adapters()
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    batch = ["b", None, "default"]
    with al.adapter_batch(model, batch):
        mixed = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for i, name in enumerate(batch):
        if name is None:
            with al.disable_adapter(model):
                want = model.generate(prompt[i : i + 1], max_new_tokens=6, do_sample=False)
        else:
            al.set_adapter(model, name)
            want = model.generate(prompt[i : i + 1], max_new_tokens=6, do_sample=False)
            al.set_adapter(model, "default")
        assert torch.equal(mixed[i], want[0]), (i, name)


def test_refusals_name_the_problem():
    model = _model_with_adapters()
    with pytest.raises(ValueError, match="has no adapter 'nope'; it has"):
        with al.adapter_batch(model, ["nope"]):
            pass
    with pytest.raises(ValueError, match="adapter id 7 is out of range"):
        with al.adapter_batch(model, [7]):
            pass
    model.train()
    with pytest.raises(ValueError, match="for inference: call model.eval"):
        with al.adapter_batch(model, ["b"]):
            pass
    model.eval()
    with al.adapter_batch(model, ["b", "c"]):
        with pytest.raises(ValueError, match=r"input of shape \(3, 4, 32\) is not 2 sequences"):
            model(input_ids=torch.randint(0, 128, (3, 4)))


def test_float32_mixed_batch_on_the_kernel_path_equals_each_alone():
    """float32 (the segmented kernels run under TRITON_INTERPRET=1 or on CUDA; float64 takes the PyTorch
    loop). The one-adapter run scales the projection before B, the stack folds the scale into B, and the
    sums run in other orders: float32 roundings (1.2e-7) through two layers and the head, measured 1.6e-5
    of the largest logit; 1e-4 keeps three orders of magnitude below a wrong adapter (O(0.1))."""
    model = _model_with_adapters().float()
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(3))
    batch = ["c", None, "b", "c"]
    with al.adapter_batch(model, batch):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(batch):
        want = _alone(model, name, ids[i : i + 1])[0]
        assert (mixed[i] - want).abs().max() <= 1e-4 * want.abs().max(), (i, name)
