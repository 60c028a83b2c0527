"""DoRA on the fused path (``lora_linear`` / ``lora_add`` with ``magnitude`` and ``weight_norm``, and
``FusedLinearLoRA``) against the PyTorch reference of ``automodel_lora.dora`` and a float64 reference written here:
output and every gradient (x, A, B, m, and a trainable base bias), odd shapes, a zero-magnitude column.

    y = f * (x W^T + drop_post(s (x A^T) B^T)) + b,   f = m / ||W + s B A||_row (detached)

Runs twice in CI, like ``test_kernels.py``: on the CPU (the PyTorch math of ``kernels/reference.py``) and under
``TRITON_INTERPRET=1`` (the Triton kernels: the column scale in the epilogues of the TMA GEMM, the portable GEMM
and ``expand``, one test per route; ``dora_grad``); the GPU test at a real shape is skipped without CUDA.

Tolerances (``check``: normwise against float64 on the same rounded inputs, and elementwise relative to max|ref|),
those of ``test_kernels.py``, with what DoRA adds:
  fp32: 2e-6 / 2e-5.  f and b are applied in fp32 on the fp32 accumulator, z = (y - b) / f recovers the
        unscaled output with two more fp32 roundings (1.2e-7 each); dm is an fp32 sum over M.  Measured 2e-7.
  fp16: 2e-3 / 8e-3.  y is rounded to fp16 once (4.9e-4 relative); z recovered from it carries that rounding
        times |y| / |y - b| (about 1-2 here: the bias is of the size of f z), and dz = dy * f is rounded once
        more before the LoRA backward reads it.  Measured 5e-4.
  bf16 (GPU, against fp32): 1e-2 normwise, as ``test_kernels_gpu.py`` (about 2.5 bf16 roundings); dm there
        sums z recovered from bf16 y (|y| about 1.4 |f z| with b ~ N(0, 1)): about one rounding, 3.9e-3.
A wrong scale, a missing bias or a zero dm for the zero-magnitude column is off by > 5e-2.  That column's dm is
recomputed from x, W, xa, B (not read from y); ``upstream`` gives it a dy with the signs of z, so its dm is a
sum without cancellation and ``check_dm`` checks it on its own scale.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import automodel_lora as al
from automodel_lora.dora import MAGNITUDE, dora_forward
from automodel_lora.kernels import backend as B
from automodel_lora.kernels import dropout_keep_mask, lora_add, lora_linear, lora_linear_dequant

from .conftest import reference_check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 8e-3)}
DTYPES = [torch.float32, torch.float16]
M, K, N = 37, 45, 29
ZERO = 3  # the column whose magnitude is 0
SCALE = 2.0


check = reference_check(TOL)


def check_dm(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """dm, and the zero-magnitude column's entry on its own scale (``upstream`` makes that entry a sum without
    cancellation, sum_i |dy_i z_i| / norm, so its rounding is relative to itself and 0 is far off)."""
    check(actual, expected, dtype, "dm")
    check(actual[ZERO:ZERO + 1], expected[ZERO:ZERO + 1], dtype, f"dm[{ZERO}] (magnitude 0)")


def upstream(x, W, A, B, s, p=0.0, keep=None) -> torch.Tensor:
    """A random dy (M, N) whose column ZERO has the signs of z there (z = x W^T + drop(s x A^T B^T), float64)."""
    x, W, A, B = (t.detach().double() for t in (x, W, A, B))
    lr = s * (x @ A.t()) @ B[ZERO]
    if keep is not None:
        lr = lr * keep[:, ZERO] / (1 - p)
    z = x @ W[ZERO] + lr  # (M,)
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    dy[:, ZERO] = dy[:, ZERO].abs() * z.sign()
    return dy


def operands(r: int, dtype: torch.dtype, bias: bool, adapter_dtype=None, shape=(M, K, N)):
    """x, W, b, A, B, m of ``shape`` (M, K, N): B nonzero, m away from ||V||_row and 0 in column ZERO; x, A, B,
    m require grad."""
    M, K, N = shape
    adt = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype).requires_grad_(True)
    W = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    A = (torch.randn(r, K) / K**0.5).to(adt).requires_grad_(True)
    B = (torch.randn(N, r) * 0.3).to(adt).requires_grad_(True)
    m = (1 + 0.3 * torch.rand(N))
    m[ZERO] = 0.0
    return x, W, b, A, B, m.to(adt).requires_grad_(True)


def reference(x, W, b, A, B, m, s, p, keep):
    """float64 y (M, N) with the norm of the dense V = W + s B A detached (PEFT); keep: the post mask or None."""
    lr = s * (x @ A.t()) @ B.t()
    if keep is not None:
        lr = lr * keep / (1 - p)
    f = m / (W.detach() + s * B.detach() @ A.detach()).norm(dim=1)
    y = f * (x @ W.t() + lr)
    return y if b is None else y + b


def weight_norm(W, A, B, s):
    return (W.detach().double() + s * B.detach().double() @ A.detach().double()).norm(dim=1).float()


def run_lora_linear(x, W, b, A, B, m, p, call_seed=7):
    """lora_linear with DoRA, backward with ``upstream``'s dy; returns (y, dy, keep-mask or None)."""
    torch.manual_seed(call_seed)
    y = lora_linear(x, W, b, A, B, SCALE, p, "post", magnitude=m, weight_norm=weight_norm(W, A, B, SCALE))
    keep = None
    if p > 0:
        torch.manual_seed(call_seed)  # the seed lora_linear drew
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        keep = dropout_keep_mask(seed, M, N, p, "cpu").double()
    dy = upstream(x, W, A, B, SCALE, p, keep).to(y.dtype)
    y.backward(dy)
    return y, dy, keep


def float64_grads(x, W, b, A, B, m, p, keep, dy):
    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B, m)]
    xr, Ar, Br, mr = leaves
    yr = reference(xr, W.double(), None if b is None else b.double(), Ar, Br, mr, SCALE, p, keep)
    yr.backward(dy.double())
    return yr, [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------------------
# lora_linear / lora_add with DoRA against float64
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_with_dora_matches_float64(dtype, r, bias, p):
    x, W, b, A, B, m = operands(r, dtype, bias)
    y, dy, keep = run_lora_linear(x, W, b, A, B, m, p)
    assert y.dtype == dtype
    yr, (dx, dA, dB, dm) = float64_grads(x, W, b, A, B, m, p, keep, dy)
    check(y, yr, dtype, "y")
    for name, t, ref in (("dx", x, dx), ("dA", A, dA), ("dB", B, dB)):
        assert t.grad.dtype == t.dtype, f"{name} dtype {t.grad.dtype} != {t.dtype}"
        check(t.grad, ref, dtype, name)
    assert m.grad.dtype == m.dtype
    check_dm(m.grad, dm, dtype)


@pytest.mark.skipif(not (INTERPRET and B.HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("route", ["fused_proj", "tma", "portable", "cublas"])
def test_every_forward_route_applies_the_scale_interp(route, dtype, kernel_options, monkeypatch):
    """f and b in the epilogue of each kernel that writes y: the TMA GEMM (with and without the fused projection),
    the portable GEMM (a Triton without TMA descriptors) and ``expand`` after cuBLAS's product, which the GEMMs
    get as their ``col_scale``.  K, N multiples of 16 bytes per row (TMA-addressable)."""
    from automodel_lora.kernels import dispatch as D
    from automodel_lora.kernels import tma_desc

    if route == "portable":
        monkeypatch.setattr(tma_desc, "TensorDescriptor", None)
    x, W, b, A, B, m = operands(16, dtype, True, adapter_dtype=torch.float32, shape=(M, 48, 40))
    options = kernel_options(base_gemm="cublas" if route == "cublas" else "triton", fuse_proj=route == "fused_proj")
    assert D.forward_route(x, W, None, A, B, 0.0, True, options) == route
    scales = []
    for name in ("gemm_lora_proj", "gemm_lora", "expand"):
        real = getattr(D, name)
        monkeypatch.setattr(D, name, lambda *a, _real=real, _name=name, **k: (
            scales.append((_name, k.get("col_scale") is not None)), _real(*a, **k))[1])
    torch.manual_seed(7)
    norm = weight_norm(W, A, B, SCALE)
    y = lora_linear(x, W, b, A, B, SCALE, options=options, magnitude=m, weight_norm=norm)
    writer = {"fused_proj": "gemm_lora_proj", "tma": "gemm_lora", "portable": "gemm_lora", "cublas": "expand"}[route]
    assert (writer, True) in scales, f"y must come from {writer} with the column scale, got {scales}"
    dy = upstream(x, W, A, B, SCALE).to(dtype)
    y.backward(dy)
    yr, (dx, dA, dB, dm) = float64_grads(x, W, b, A, B, m, 0.0, None, dy)
    check(y, yr, dtype, "y")
    for name, t, ref in (("dx", x, dx), ("dA", A, dA), ("dB", B, dB)):
        check(t.grad, ref, dtype, name)
    check_dm(m.grad, dm, dtype)


def test_fp32_master_adapters_get_fp32_gradients_from_fp16_compute():
    x, W, b, A, B, m = operands(8, torch.float16, True, adapter_dtype=torch.float32)
    y, dy, _ = run_lora_linear(x, W, b, A, B, m, 0.0)
    yr, (dx, dA, dB, dm) = float64_grads(x, W, b, A, B, m, 0.0, None, dy)
    check(y, yr, torch.float16, "y")
    for name, t, ref in (("dx", x, dx), ("dA", A, dA), ("dB", B, dB), ("dm", m, dm)):
        assert t.grad.dtype == t.dtype, f"{name} dtype {t.grad.dtype} != {t.dtype}"
        check(t.grad, ref, torch.float16, name)
    check_dm(m.grad, dm, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_lora_add_with_dora_and_a_trainable_base_bias(dtype):
    """The caller's base output holds b: y = f (base - b + term) + b; db = f sum dy (through the base's own
    graph, from dz) + (1 - f) sum dy (from the function), dW through the base's graph."""
    x, W, b, A, B, m = operands(8, dtype, True)
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = lora_add(torch.nn.functional.linear(x, W, b), x, A, B, SCALE, magnitude=m,
                 weight_norm=weight_norm(W, A, B, SCALE), base_bias=b, base_weight=W.detach())
    dy = upstream(x, W, A, B, SCALE).to(dtype)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, W, b, A, B, m)]
    xr, Wr, br, Ar, Br, mr = leaves
    yr = reference(xr, Wr, br, Ar, Br, mr, SCALE, 0.0, None)
    (yr * dy.double()).sum().backward()
    check(y, yr, dtype, "y")
    for name, t, ref in zip(("dx", "dW", "db", "dA", "dB"), (x, W, b, A, B), leaves[:5], strict=True):
        check(t.grad, ref.grad, dtype, name)
    check_dm(m.grad, mr.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_lora_linear_dequant_with_dora_dequantizes_once_each_way(dtype):
    """A compressed base (``dequantize()``): the forward's product and the backward's dx and zero-magnitude
    column read the weight of one call to it each."""
    x, W, b, A, B, m = operands(8, dtype, True)
    calls = []
    y = lora_linear_dequant(x, lambda: calls.append(1) or W.clone(), b, A, B, SCALE, magnitude=m,
                            weight_norm=weight_norm(W, A, B, SCALE))
    dy = upstream(x, W, A, B, SCALE).to(dtype)
    y.backward(dy)
    assert len(calls) == 2
    yr, (dx, dA, dB, dm) = float64_grads(x, W, b, A, B, m, 0.0, None, dy)
    check(y, yr, dtype, "y")
    for name, t, ref in (("dx", x, dx), ("dA", A, dA), ("dB", B, dB)):
        check(t.grad, ref, dtype, name)
    check_dm(m.grad, dm, dtype)


def test_the_magnitude_gradient_is_deterministic():
    x, W, b, A, B, m = operands(8, torch.float32, True)
    grads = []
    for _ in range(2):
        m.grad = None
        run_lora_linear(x, W, b, A, B, m, 0.0)
        grads.append(m.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_dora_inputs_are_checked():
    x, W, b, A, B, m = operands(4, torch.float32, True)
    norm = weight_norm(W, A, B, SCALE)
    with pytest.raises(ValueError, match=r"dropout_position='pre' and dropout_p=0.5.*dora_forward"):
        lora_linear(x, W, b, A, B, SCALE, 0.5, "pre", magnitude=m, weight_norm=norm)
    with pytest.raises(ValueError, match=r"weight_norm requires grad.*row_norms"):
        lora_linear(x, W, b, A, B, SCALE, magnitude=m, weight_norm=norm.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=rf"floating \({N},\) tensors.*weight_norm = None"):
        lora_linear(x, W, b, A, B, SCALE, magnitude=m)
    with pytest.raises(ValueError, match=r"magnitude = \(28,\)"):
        lora_linear(x, W, b, A, B, SCALE, magnitude=m[1:], weight_norm=norm)
    with pytest.raises(ValueError, match="DoRA does not take a lora_bias"):
        lora_linear(x, W, b, A, B, SCALE, magnitude=m, weight_norm=norm, lora_bias=torch.zeros(N))
    with pytest.raises(ValueError, match=rf"needs base_weight.*\({N}, {K}\).*got None"):
        lora_add(x @ W.t(), x, A, B, SCALE, magnitude=m, weight_norm=norm)
    with pytest.raises(ValueError, match="base_bias and base_weight are DoRA's.*no magnitude"):
        lora_add(x @ W.t() + b, x, A, B, SCALE, base_bias=b, base_weight=W)


# ---------------------------------------------------------------------------------------------------------
# FusedLinearLoRA against the reference layer math of dora.py
# ---------------------------------------------------------------------------------------------------------
def dora_module(r, dtype, bias, **settings):
    layer = nn.Linear(K, N, bias=bias)
    al.patch_linear_module(layer, dim=r, alpha=2 * r, use_dora=True, **settings)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.2)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(N))
        layer.lora_magnitude_vector[ZERO] = 0.0
    return layer.to(dtype)


def layer_grads(layer, x, fn, dy):
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    y.backward(dy)
    names = ["lora_A.weight", "lora_B.weight", MAGNITUDE] + (["bias"] if layer.bias is not None and
                                                             layer.bias.requires_grad else [])
    out = {"y": y.detach(), "dx": x.grad}
    for name in names:
        p = layer.get_parameter(name)
        out[name], p.grad = p.grad, None
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", ["frozen", "trainable", None])
def test_the_fused_layer_matches_dora_forward_in_float64(dtype, bias):
    """A frozen bias takes ``lora_linear``; a trainable one the caller's base and ``lora_add``."""
    layer = dora_module(8, dtype, bias is not None)
    if bias == "trainable":
        layer.bias.requires_grad_(True)
    exact = copy.deepcopy(layer).double()
    x = torch.randn(M, K).to(dtype)
    dy = upstream(x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_settings.scale).to(dtype)
    ours = layer_grads(layer, x, lambda mod, v: mod(v), dy)
    ref = layer_grads(exact, x.double(), dora_forward, dy.double())
    for name in ours:
        check(ours[name], ref[name], dtype, name)
    check_dm(ours[MAGNITUDE], ref[MAGNITUDE], dtype)


@pytest.mark.skipif(INTERPRET, reason="the PyTorch path: the Triton kernels compute in fp32 at most")
def test_a_float64_layer_keeps_float64_on_the_pytorch_path():
    """The fused function's DoRA math (y, dx, dm) runs in fp64 for an fp64 layer, fp32 only for narrower ones
    (dA and dB are the LoRA reference's, accumulated in fp32 whatever the dtype)."""
    layer = dora_module(4, torch.float64, True)
    x = torch.randn(M, K, dtype=torch.float64)
    dy = upstream(x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_settings.scale)
    ours = layer_grads(layer, x, lambda mod, v: mod(v), dy)
    ref = layer_grads(copy.deepcopy(layer), x, dora_forward, dy)
    for name in ("y", "dx", MAGNITUDE):
        a, e = ours[name], ref[name]
        assert ((a - e).norm() / e.norm()).item() < 1e-12, name


def test_the_output_is_saved_so_writing_it_in_place_before_backward_raises():
    """dm is recovered from y itself: autograd refuses a y changed after the forward (not a silent wrong dm)."""
    layer = dora_module(4, torch.float32, True)
    y = layer(torch.randn(5, K))
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_the_check_fails_for_a_wrong_zero_column_gradient_or_a_flipped_scale():
    """The comparisons above can fail: a magnitude gradient without the zero column's term, and an output
    scaled by 1 / f, are both caught."""
    x, W, b, A, B, m = operands(8, torch.float32, True)
    y, dy, _ = run_lora_linear(x, W, b, A, B, m, 0.0)
    yr, grads = float64_grads(x, W, b, A, B, m, 0.0, None, dy)
    wrong = m.grad.clone()
    wrong[ZERO] = 0.0
    with pytest.raises(AssertionError, match="dm"):
        check_dm(wrong, grads[3], torch.float32)
    f = (m / weight_norm(W, A, B, SCALE)).detach()
    flipped = torch.where(f > 0, (y - b) / f.clamp_min(1e-3) ** 2, 0.0) + b  # f z + b -> z / f + b
    with pytest.raises(AssertionError, match="y"):
        check(flipped, yr, torch.float32, "y")


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 at a real shape
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base_gemm", ["auto", "cublas", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_real_shape_against_fp32(base_gemm, p, kernel_options):
    """4096 x 4096, M = 4096, r = 16, bias, fp32 master adapters, a zero-magnitude column: y, dx, dA, dB, dm
    within 1e-2 normwise of the fp32 reference under the layer's own post-dropout mask."""
    Mg, Kg, Ng, r = 4096, 4096, 4096, 16
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(Mg, Kg, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(Ng, Kg, device=dev) / Kg**0.5).to(dt)
    b = torch.randn(Ng, device=dev).to(dt)
    A = (torch.randn(r, Kg, device=dev) / Kg**0.5).requires_grad_(True)
    B = (torch.randn(Ng, r, device=dev) * 0.05).requires_grad_(True)
    m = (1 + 0.3 * torch.rand(Ng, device=dev))
    m[ZERO] = 0.0
    m.requires_grad_(True)
    norm = (W.float() + SCALE * B.detach() @ A.detach()).norm(dim=1)
    torch.manual_seed(11)
    y = lora_linear(x, W, b, A, B, SCALE, p, "post", options=kernel_options(base_gemm=base_gemm), magnitude=m,
                    weight_norm=norm)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = None
    if p > 0:
        torch.manual_seed(11)
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=dev)
        keep = dropout_keep_mask(seed, Mg, Ng, p, dev).float()
    leaves = [t.detach().float().requires_grad_(True) for t in (x, A, B, m)]
    xr, Ar, Br, mr = leaves
    lr = SCALE * (xr @ Ar.t()) @ Br.t()
    if keep is not None:
        lr = lr * keep / (1 - p)
    yr = mr / norm * (xr @ W.float().t() + lr) + b.float()
    yr.backward(dy.float())
    for name, got, want in (("y", y, yr), ("dx", x.grad, xr.grad), ("dA", A.grad, Ar.grad), ("dB", B.grad, Br.grad),
                            ("dm", m.grad, mr.grad)):
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{base_gemm} p={p} {name}: rel err {err:.2e}"
    zero_err = (m.grad[ZERO].float() - mr.grad[ZERO]).abs() / mr.grad.abs().max()
    assert zero_err < 1e-2, f"{base_gemm} p={p} dm[{ZERO}] (magnitude 0): error {zero_err.item():.2e} of max|dm|"


@pytest.mark.skipif(not INTERPRET, reason="the norm kernel runs under TRITON_INTERPRET=1 on the CPU (CUDA: the GPU tests)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 5, 16, 70])
def test_the_norm_kernel_matches_the_dense_norm_in_float64(dtype, r):
    """``dora_norm`` (one launch after ``W A^T`` and ``A A^T``) against ``||W + s B A||_row`` built densely in float64
    from the same rounded W, A, B. The kernel's inputs carry ``wa``'s rounding to ``dtype`` (W A^T is computed in
    W's dtype, as ``row_norms`` does): the norm is off by about that rounding relative to ``||W_j||``, so the
    tolerance is the dtype's (elementwise bound of ``check``)."""
    from automodel_lora.kernels.dora_norm import dora_norm

    g = torch.Generator().manual_seed(r)
    W = torch.randn(N, K, generator=g).to(dtype)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype)
    Bw = torch.randn(N, r, generator=g).to(dtype)
    Bw[ZERO] = 0  # a row whose norm is W's own
    want = (W.double() + SCALE * Bw.double() @ A.double()).norm(dim=1)
    wsq = W.float().square().sum(1)
    aat = A.float() @ A.float().t()
    got = dora_norm(wsq, W @ A.t(), Bw.t().contiguous().t(), aat, SCALE)  # B through its strides
    assert got.dtype == torch.float32 and got.shape == (N,)
    check(got, want, dtype, f"norm r={r}")


def test_the_norm_kernel_refuses_shapes_that_do_not_chain():
    if not B.HAS_TRITON:
        pytest.skip("needs triton")
    from automodel_lora.kernels.dora_norm import MAX_RANK, dora_norm

    with pytest.raises(ValueError, match="do not chain"):
        dora_norm(torch.zeros(4), torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(3, 3), 1.0)
    r = MAX_RANK + 1
    with pytest.raises(ValueError, match=f"r <= {MAX_RANK}"):
        dora_norm(torch.zeros(4), torch.zeros(4, r), torch.zeros(4, r), torch.zeros(r, r), 1.0)
