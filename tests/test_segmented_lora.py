"""The segmented LoRA kernels (``kernels/segment_mm.py``, ``segment_tn.py``, ``segmented_lora.py``) against
a float64 per-row reference: under ``TRITON_INTERPRET=1`` on the CPU (fp32 / fp16, small odd shapes, empty
groups, one group holding every row, ranks 1 to 64) and in bf16 at a Qwen3-30B-A3B expert shape on a GPU.

Tolerances, normwise relative to the float64 result: fp32 accumulates in fp32 (~1e-7 per rounding over
~K terms): 1e-5. fp16 rounds the (S, r) projection and the output once each (eps 9.8e-4, half of it per
rounding on average; the norm averages many): 2e-3. bf16 (eps 7.8e-3): 1.6e-2. A wrong group, scale or
layout is off by O(1).
"""

from __future__ import annotations

import os

import pytest
import torch

from automodel_lora.grouped_mm import group_offsets

RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not RUNS, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _case(S, K, N, r, G, dtype, device="cpu", empty=(), one_group=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, G, (S,), generator=g)
    for e in empty:
        ids[ids == e] = (e + 1) % G
    if one_group is not None:
        ids.fill_(one_group)
    ids = torch.sort(ids)[0].to(device)
    x = torch.randn(S, K, generator=g).to(device, dtype).requires_grad_()
    A = (torch.randn(G, r, K, generator=g) / K**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(G, N, r, generator=g) / r**0.5).to(device, dtype).requires_grad_()
    base = torch.randn(S, N, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(S, N, generator=g).to(device, dtype)
    return ids, group_offsets(ids, G), x, A, B, base, dy


def _check(ids, offsets, x, A, B, base, dy, scale=0.7):
    from automodel_lora.kernels.segmented_lora import segmented_lora

    y = segmented_lora(x, A, B, base, ids, offsets, scale)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, A, B, base)]
    xr, Ar, Br, br = ref
    yr = br + scale * torch.einsum("sr,snr->sn", torch.einsum("sk,srk->sr", xr, Ar[ids]), Br[ids])
    yr.backward(dy.double())
    tol = TOL[x.dtype]
    for name, got, want in (("y", y, yr), ("dx", x.grad, xr.grad), ("dA", A.grad, Ar.grad), ("dB", B.grad, Br.grad),
                            ("dbase", base.grad, br.grad)):
        err = _rel(got.cpu(), want.cpu())
        assert err < tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S, K, N, r, G, empty", [
    (37, 45, 29, 3, 5, (2,)),     # odd shapes, an empty group in the middle
    (50, 20, 33, 1, 7, (0, 6)),   # rank 1, the first and last groups empty
    (23, 64, 16, 16, 1, ()),      # one group (a plain LoRA)
    (19, 17, 70, 64, 3, ()),      # rank 64 wider than N
    (26, 33, 21, 128, 2, ()),     # rank 128: several rank blocks, wider than K and N
])
def test_segmented_lora_matches_float64(dtype, S, K, N, r, G, empty):
    _check(*_case(S, K, N, r, G, dtype, empty=empty))


def test_every_row_in_one_group_leaves_the_others_zero_gradients():
    ids, offsets, x, A, B, base, dy = _case(21, 18, 13, 4, 6, torch.float32, one_group=4)
    _check(ids, offsets, x, A, B, base, dy)
    others = [e for e in range(6) if e != 4]
    assert A.grad[others].abs().max() == 0 and B.grad[others].abs().max() == 0
    assert A.grad[4].abs().max() > 0


def test_fp32_master_adapters_get_fp32_gradients_from_fp16_activations():
    from automodel_lora.kernels.segmented_lora import segmented_lora

    ids, offsets, x, A, B, base, dy = _case(29, 24, 19, 8, 4, torch.float16)
    A32, B32 = A.detach().float().requires_grad_(), B.detach().float().requires_grad_()
    segmented_lora(x, A32, B32, base, ids, offsets, 1.5).backward(dy)
    segmented_lora(x, A, B, base, ids, offsets, 1.5).backward(dy)
    assert A32.grad.dtype == B32.grad.dtype == torch.float32
    assert _rel(A32.grad, A.grad.double()) < TOL[torch.float16]


def test_the_experts_module_runs_the_kernels_and_agrees_with_its_pytorch_path():
    import automodel_lora as al
    from automodel_lora.experts_lora import patch_experts_module

    from .test_experts_lora import _qwen3_moe, _randomize

    model = _qwen3_moe(5, 2, layers=1)
    module = model.model.layers[0].mlp.experts
    patch_experts_module(module, ["gate_up_proj", "down_proj"], al.LoraSettings(dim=4, alpha=8))
    _randomize(model)
    x = torch.randn(13, 32, requires_grad=True)
    idx, w = torch.randint(0, 5, (13, 2)), torch.rand(13, 2)
    y = module(x, idx, w)
    y.square().sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in module.lora_A.values())]
    x.grad = None
    module.zero_grad()
    module.lora_use_triton = False
    want = module(x, idx, w)
    want.square().sum().backward()
    assert _rel(y, want.double()) < TOL[torch.float32]
    for g, r in zip(got, [x.grad, *(p.grad for p in module.lora_A.values())], strict=True):
        assert _rel(g, r.double()) < TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_at_a_qwen3_30b_a3b_expert_shape():
    """E = 128, top-8 of 1024 tokens (8192 rows), hidden 2048 -> 2 x 768, r = 16; routing skewed so some experts
    are empty and some crowded."""
    S, K, N, r, G = 8192, 2048, 1536, 16, 128
    ids, offsets, x, A, B, base, dy = _case(S, K, N, r, G, torch.bfloat16, device="cuda", empty=tuple(range(0, 128, 9)))
    _check(ids, offsets, x, A, B, base, dy, scale=2.0)


def test_rows_without_a_group_get_no_product():
    """Negative ids (a sequence without an adapter) and ids of G or more (a routing sentinel) add nothing."""
    from automodel_lora.kernels.segment_mm import segment_mm

    g = torch.Generator().manual_seed(5)
    x, w, add = torch.randn(9, 20, generator=g), torch.randn(3, 17, 20, generator=g), torch.randn(9, 17, generator=g)
    ids = torch.tensor([-1, 0, 0, 1, -1, 2, 3, 7, 2])
    out = segment_mm(x, w, ids, 0.5, add=add)
    for s, i in enumerate(ids.tolist()):
        want = add[s] + (0.5 * x[s] @ w[i].T if 0 <= i < 3 else 0)
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_gradient_are_read_in_place():
    """The kernels read x, base and dy through their strides: transposed views give the same result."""
    ids, offsets, x, A, B, base, dy = _case(23, 18, 13, 4, 3, torch.float32)
    xt = x.detach().T.contiguous().T.requires_grad_()  # column-major (S, K)
    bt = base.detach().T.contiguous().T.requires_grad_()
    _check(ids, offsets, xt, A, B, bt, dy.T.contiguous().T)
