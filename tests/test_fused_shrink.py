"""The shared q / k / v shrink of ``adapter_batch`` (``fused_shrink.py``): the logits equal those of one shrink per
projection (``fuse_qkv=False``) in prefill and decode, mixed adapters with base-only rows; one shrink per
attention block instead of three; a projection called with another tensor, or with the same one changed in
place, computes its own; nothing is kept once the siblings took their slices, nor after the block.

float64 on the PyTorch loop; float32 on the kernels under ``TRITON_INTERPRET=1`` (segmented for prefill, gather
for decode), where the fused shrink is the same sums in other tile shapes: fp32 roundings through two layers
and the head, 1e-5 of the largest logit (a wrong slice moves them by O(0.1)).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import automodel_lora as al
from automodel_lora import mixed_adapters

from .conftest import tiny_llama
from .test_adapter_batch import TOL, _decode_step, _model_with_adapters

BATCH = ["default", "b", None, "c", "b"]
# the rank of each shrink per layer: q (7: "b" has rank 7), k (4: no "b"), v (7), o, gate, up (4), down (7)
FUSED = 7 + 4 + 7


@pytest.fixture
def shrinks(monkeypatch):
    """The rank width of every shrink of the blocks, and a weak reference to each result."""
    calls, refs = [], []
    real = mixed_adapters._product

    def spy(x2, w, ids, kernel, add=None, **launch):
        out = real(x2, w, ids, kernel, add=add, **launch)
        if add is None:  # a shrink (the expand adds into the base output)
            calls.append(w.shape[1])
            refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(mixed_adapters, "_product", spy)
    return calls, refs


def _model(dtype):
    return _model_with_adapters().to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, 1e-5)])
def test_fused_prefill_and_decode_equal_one_shrink_per_projection(dtype, tol, shrinks):
    calls, _ = shrinks
    model = _model(dtype)
    g = torch.Generator().manual_seed(11)
    prompt, nxt = torch.randint(0, 128, (5, 6), generator=g), torch.randint(0, 128, (5, 1), generator=g)
    with torch.no_grad():
        with al.adapter_batch(model, BATCH):
            fused = model(input_ids=prompt).logits
        assert sorted(calls) == sorted([FUSED, 4, 4, 4, 7] * 2)  # one shrink per attention block of two layers
        calls.clear()
        with al.adapter_batch(model, BATCH, fuse_qkv=False):
            plain = model(input_ids=prompt).logits
        assert sorted(calls) == sorted([7, 4, 7, 4, 4, 4, 7] * 2)
        assert (fused - plain).abs().max() <= tol * plain.abs().max()
        fused = _decode_step(model, prompt, nxt, adapters=BATCH)
        plain = _decode_step(model, prompt, nxt, adapters=BATCH, fuse_qkv=False)
    assert (fused - plain).abs().max() <= tol * plain.abs().max()


def test_persistent_stacks_share_the_shrink_too(shrinks):
    calls, _ = shrinks
    model = _model(torch.float32)
    ids = torch.randint(0, 128, (5, 7), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), al.adapter_batch(model, BATCH, fuse_qkv=False):
        want = model(input_ids=ids).logits
    al.stack_adapters(model, ["default", "b", "c"], max_num_loras=4)
    calls.clear()
    with torch.no_grad(), al.adapter_batch(model, BATCH):
        got = model(input_ids=ids).logits
    assert calls.count(3 * 7) == 2 and len(calls) == 10  # the persistent stacks pad every module to rank 7
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_k_proj_fed_another_tensor_computes_its_own_shrink(shrinks):
    """A model that scales k_proj's input (a forward pre-hook returns a new tensor): k gets its own shrink, v
    still takes the kept slice; the logits equal those without sharing."""
    calls, _ = shrinks
    model = _model(torch.float64)
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    ids = torch.randint(0, 128, (5, 7), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        with al.adapter_batch(model, BATCH):
            fused = model(input_ids=ids).logits
        assert calls.count(FUSED) == 2 and len(calls) == 12  # k's own shrink in each layer
        with al.adapter_batch(model, BATCH, fuse_qkv=False):
            plain = model(input_ids=ids).logits
    assert (fused - plain).abs().max() <= TOL * plain.abs().max()


def _qkv(attn, x, order, change=None):
    """{name: output} of the projections called on ``x`` in ``order``; ``change(x)`` in place after the first."""
    out = {}
    for i, name in enumerate(order):
        out[name] = getattr(attn, name)(x)
        if i == 0 and change is not None:
            change(x)
    return out


@pytest.mark.parametrize("order, change, widths", [
    (("q_proj", "k_proj", "v_proj"), None, [FUSED]),
    (("v_proj", "q_proj", "k_proj"), None, [FUSED]),  # another order: the first called shares
    (("q_proj", "k_proj", "v_proj"), lambda x: x.mul_(2.0), [FUSED, 4, 7]),  # x changed in place: own shrinks
])
def test_direct_calls_take_the_kept_slice_only_for_the_same_unchanged_tensor(order, change, widths, shrinks):
    calls, _ = shrinks
    model = _model(torch.float64)
    attn = model.model.layers[1].self_attn
    x = torch.randn(5, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        with al.adapter_batch(model, BATCH):
            got = _qkv(attn, x.clone(), order, change)
        assert calls == widths
        with al.adapter_batch(model, BATCH, fuse_qkv=False):
            want = _qkv(attn, x.clone(), order, change)
    for name in order:
        assert (got[name] - want[name]).abs().max() <= TOL * want[name].abs().max(), name


def test_nothing_is_kept_once_taken_nor_after_the_block(shrinks):
    _, refs = shrinks
    model = _model(torch.float32)
    ids = torch.randint(0, 128, (5, 7), generator=torch.Generator().manual_seed(15))
    attn = model.model.layers[0].self_attn
    with torch.no_grad(), al.adapter_batch(model, BATCH):
        model(input_ids=ids)
        gc.collect()
        assert refs and all(r() is None for r in refs)  # every slice taken by its sibling
        attn.q_proj(torch.randn(5, 7, 32))  # k and v never called: their slices wait
        gc.collect()
        assert refs[-1]() is not None
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("targets, widths", [(["q_proj", "v_proj"], [2 * 3]), (["q_proj", "o_proj"], [3, 3])])
def test_two_adapted_siblings_share_and_a_lone_one_does_not(targets, widths, shrinks):
    """Only q and v adapted: those two share one shrink; q alone (o_proj is no sibling) keeps its own."""
    calls, _ = shrinks
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1)
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=targets, dim=3, alpha=6))
    model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(16))
        with al.adapter_batch(model, ["default", None]):
            fused = model(input_ids=ids).logits
        assert calls == widths
        with al.adapter_batch(model, ["default", None], fuse_qkv=False):
            plain = model(input_ids=ids).logits
    assert (fused - plain).abs().max() <= TOL * plain.abs().max()
