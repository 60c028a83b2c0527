"""LoRA kernels vs a float64 PyTorch reference written here: output and every gradient.

Runs twice in CI:
    pytest tests/test_kernels.py                         # CPU reference path (pure PyTorch)
    TRITON_INTERPRET=1 pytest tests/test_kernels.py      # the Triton kernels, in the interpreter
Tests named *_interp run only under the interpreter; the rest run in both modes.

Tolerances (normwise ||out - ref|| / ||ref|| against float64 on the same rounded inputs, plus an
elementwise bound relative to max|ref| that catches a single wrong row or column):
  fp32: 2e-6 normwise / 2e-5 elementwise.  Accumulation is fp32 (eps 1.2e-7) over <= 257 terms
        plus one fp32 rounding of xa; measured ~1e-7.  A wrong mask or term is off by > 1e-2.
  fp16: 2e-3 / 8e-3.  The output and the [M, r] projection are rounded to fp16 (eps 9.8e-4,
        i.e. 4.9e-4 relative per rounding, two roundings in a row); measured ~4e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from automodel_lora.kernels import KernelOptions, dropout_keep_mask, lora_add, lora_linear
from automodel_lora.kernels import backend as B

from .conftest import reference_check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not (INTERPRET and B.HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")

TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 8e-3)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


check = reference_check(TOL)


def reference(x, W, b, A, B, s, p, pos, keep):
    """float64 y for x (..., K); keep (M, K) for pre / (M, N) for post, or None."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    xd = x2 * keep / (1 - p) if (pos == "pre" and keep is not None) else x2
    lr = s * (xd @ A.t()) @ B.t()
    if pos == "post" and keep is not None:
        lr = lr * keep / (1 - p)
    y = x2 @ W.t() + lr
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[0])


def _seed_for(call_seed: int, device="cpu") -> torch.Tensor:
    """The Philox seed lora_linear draws after torch.manual_seed(call_seed)."""
    torch.manual_seed(call_seed)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def make(M, K, N, r, dtype, bias=True, adapter_dtype=None, lead=None):
    adt = adapter_dtype or dtype
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, dtype=dtype).requires_grad_(True)
    W = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    A = (torch.randn(r, K) / K**0.5).to(adt).requires_grad_(True)
    B = (torch.randn(N, r) * 0.3).to(adt).requires_grad_(True)
    return x, W, b, A, B


def run_and_check(x, W, b, A, B, s, p, pos, dtype, call_seed=7, options=None):
    torch.manual_seed(call_seed)
    y = lora_linear(x, W, b, A, B, s, p, pos, options=options)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    g = torch.randn_like(y)
    y.backward(g)
    M = x.numel() // x.shape[-1]
    keep = None
    if p > 0:
        D = x.shape[-1] if pos == "pre" else W.shape[0]
        keep = dropout_keep_mask(_seed_for(call_seed), M, D, p, "cpu").double()
    xr = x.detach().double().requires_grad_(x.requires_grad)
    Ar = A.detach().double().requires_grad_(A.requires_grad)
    Br = B.detach().double().requires_grad_(B.requires_grad)
    yr = reference(xr, W.double(), None if b is None else b.double(), Ar, Br, s, p, pos, keep)
    yr.backward(g.double())
    check(y, yr, dtype, "y")
    for name, t, tr in (("dx", x, xr), ("dA", A, Ar), ("dB", B, Br)):
        if t.requires_grad:
            assert t.grad is not None, f"{name} missing"
            assert t.grad.dtype == t.dtype, f"{name} dtype {t.grad.dtype} != {t.dtype}"
            check(t.grad, tr.grad, dtype, name)
    return y, keep


DTYPES = [torch.float32, torch.float16]
# (M, K, N, r, bias, position, p): odd sizes, every rank of the issue, both dropout positions
CASES = [
    (1, 33, 33, 1, True, "post", 0.0),
    (7, 100, 257, 8, False, "pre", 0.0),
    (129, 257, 100, 16, True, "post", 0.0),
    (129, 33, 100, 64, False, "post", 0.0),
    (7, 257, 33, 256, True, "pre", 0.0),
    (129, 100, 100, 16, True, "pre", 0.25),
    (129, 100, 257, 8, False, "post", 0.25),
    (7, 33, 100, 64, True, "pre", 0.5),
    (1, 100, 33, 1, False, "post", 0.5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,r,bias,pos,p", CASES)
def test_matches_reference(M, K, N, r, bias, pos, p, dtype):
    x, W, b, A, B = make(M, K, N, r, dtype, bias)
    run_and_check(x, W, b, A, B, 2.0, p, pos, dtype)


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_3d_and_noncontiguous(pos):
    K, N, r = 40, 24, 8
    base = torch.randn(3, K, 10)  # (B, K, T) -> transpose -> (B, T, K), non-contiguous
    x = base.transpose(1, 2).requires_grad_(True)
    assert not x.is_contiguous()
    _, W, b, A, B = make(1, K, N, r, torch.float32)
    run_and_check(x, W, b, A, B, 0.5, 0.2, pos, torch.float32)
    # strided last dim too (every other column of a wider tensor)
    wide = torch.randn(2, 5, 2 * K)
    x2 = wide[..., ::2].requires_grad_(True)
    run_and_check(x2, W, b, A.detach().requires_grad_(True), B.detach().requires_grad_(True), 0.5, 0.0, pos,
                  torch.float32)


def test_fp32_adapters_fp16_activations():
    x, W, b, A, B = make(33, 64, 48, 16, torch.float16, adapter_dtype=torch.float32)
    y, _ = run_and_check(x, W, b, A, B, 2.0, 0.0, "post", torch.float16)
    assert y.dtype == torch.float16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


@pytest.mark.parametrize("need", ["x", "A", "B", "AB", "xA"])
def test_needs_input_grad(need):
    x, W, b, A, B = make(17, 40, 24, 4, torch.float32)
    x.requires_grad_("x" in need)
    A.requires_grad_("A" in need)
    B.requires_grad_("B" in need)
    run_and_check(x, W, b, A, B, 1.5, 0.0, "post", torch.float32)
    assert (x.grad is not None) == ("x" in need)
    assert (A.grad is not None) == ("A" in need)
    assert (B.grad is not None) == ("B" in need)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(lead):
    x, W, b, A, B = make(0, 16, 12, 4, torch.float32, lead=lead)
    y = lora_linear(x, W, b, A, B, 2.0)
    assert y.shape == (*lead, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert A.grad.abs().sum() == 0 and B.grad.abs().sum() == 0


@pytest.mark.parametrize("pos,p", [("post", 0.0), ("pre", 0.3), ("post", 0.3)])
def test_lora_add(pos, p):
    dtype = torch.float32
    x, W, _, A, B = make(29, 36, 20, 8, dtype)
    Wp = W.clone().requires_grad_(True)  # a "base" with its own autograd (stands in for bnb 4-bit)
    base_out = x @ Wp.t()
    torch.manual_seed(3)
    y = lora_add(base_out, x, A, B, 2.0, p, pos)
    g = torch.randn_like(y)
    y.backward(g)
    keep = None
    if p > 0:
        D = 36 if pos == "pre" else 20
        keep = dropout_keep_mask(_seed_for(3), 29, D, p, "cpu").double()
    xr = x.detach().double().requires_grad_(True)
    Ar, Br = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    Wr = W.double().requires_grad_(True)
    yr = reference(xr, Wr, None, Ar, Br, 2.0, p, pos, keep)
    yr.backward(g.double())
    check(y, yr, dtype, "y")
    check(x.grad, xr.grad, dtype, "dx (base + adapter)")
    check(Wp.grad, Wr.grad, dtype, "dW through base_out (identity)")
    check(A.grad, Ar.grad, dtype, "dA")
    check(B.grad, Br.grad, dtype, "dB")


@pytest.mark.parametrize("compiled", [False, True])
def test_inplace_on_3d_output(compiled):
    """A layer's output with leading dims is an ordinary tensor to the caller: in-place ops on it (a
    residual add, relu_) work eagerly and under torch.compile(fullgraph=True), and every gradient,
    including the one lora_add passes through to a 3-D base_out, matches out-of-place math."""
    dtype = torch.float32
    x, W, b, A, B = make(0, 20, 12, 4, dtype, lead=(2, 3))
    Wp = W.clone().requires_grad_(True)  # lora_add's base, with its own autograd
    res = torch.randn(2, 3, 12)

    def inplace(x, A, B, Wp):
        y = lora_linear(x, W, b, A, B, 2.0)
        y += res
        z = lora_add(x @ Wp.t(), x, A, B, 0.5)
        z.relu_()
        return y, z

    def out_of_place(x, A, B, Wp):
        return lora_linear(x, W, b, A, B, 2.0) + res, torch.relu(lora_add(x @ Wp.t(), x, A, B, 0.5))

    if compiled:
        torch._dynamo.reset()
        inplace = torch.compile(inplace, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (inplace, out_of_place):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, Wp)]
        y, z = fn(*leaves)
        (y * 1.5 + z).sum().backward()
        grads.append((y, z, *(t.grad for t in leaves)))
    for name, got, want in zip(("y", "z", "dx", "dA", "dB", "dW"), *grads, strict=True):
        assert got.shape == want.shape, name
        check(got, want, dtype, name)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_post_mask_matches_forward(p):
    """The mask recovered from the forward output is the seed's mask; keep rate ~ 1 - p."""
    M, K, N, r = 64, 32, 48, 4
    x, W, _, A, B = make(M, K, N, r, torch.float32)
    torch.manual_seed(11)
    y = lora_linear(x, W, None, A, B, 1.0, p, "post")
    lr = y.detach() - x.detach() @ W.t()
    full = (x.detach() @ A.detach().t()) @ B.detach().t()
    recovered = (lr.abs() > 1e-4 * full.abs().max()) | (full.abs() < 1e-4 * full.abs().max())
    keep = dropout_keep_mask(_seed_for(11), M, N, p, "cpu")
    informative = full.abs() > 1e-3 * full.abs().max()
    assert torch.equal(recovered[informative], keep[informative])
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / keep.numel()) ** 0.5) + 1e-3
    # a second call draws a new seed: a different mask
    y2 = lora_linear(x, W, None, A, B, 1.0, p, "post")
    assert not torch.equal(y.detach(), y2.detach())


def test_validation_errors():
    x, W, b, A, B = make(4, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="dropout_position"):
        lora_linear(x, W, b, A, B, 1.0, 0.1, "middle")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, W, b, A[:, :4], B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, W, b, A, B[:, :1], 1.0)
    with pytest.raises(ValueError, match="weight"):
        lora_linear(x, W[:, :4], b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) = \(6, 8\)"):
        lora_linear(x, W[:5], b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        lora_linear(x, W, b[:5], A, B, 1.0)
    with pytest.raises(ValueError, match=r"x's dtype \(torch.float32\), but weight is torch.float16"):
        lora_linear(x, W.half(), b, A, B, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, W.clone().requires_grad_(True), b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"base_out must be \(4, 6\)"):
        lora_add(torch.zeros(4, 5), x, A, B, 1.0)


class _Tiny(torch.nn.Module):
    def __init__(self, K=24, N=16, r=4):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(N, K) / K**0.5, requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(N), requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(r, K) / K**0.5)
        self.B = torch.nn.Parameter(torch.randn(N, r) * 0.1)
        self.W2 = torch.nn.Parameter(torch.randn(K, N) / N**0.5, requires_grad=False)
        self.A2 = torch.nn.Parameter(torch.randn(r, N) / N**0.5)
        self.B2 = torch.nn.Parameter(torch.randn(K, r) * 0.1)

    def forward(self, x):
        h = torch.relu(lora_linear(x, self.W, self.b, self.A, self.B, 2.0))
        base = h @ self.W2.t()
        return lora_add(base, h, self.A2, self.B2, 2.0)


def test_torch_compile_fullgraph_matches_eager():
    """Custom ops + fake impls: fullgraph=True compiles with no graph break; same results."""
    torch._dynamo.reset()
    m = _Tiny()
    x = torch.randn(2, 5, 24, requires_grad=True)
    y_e = m(x)
    y_e.sum().backward()
    grads_e = [x.grad.clone(), m.A.grad.clone(), m.B.grad.clone(), m.A2.grad.clone(), m.B2.grad.clone()]
    x.grad = None
    m.zero_grad(set_to_none=True)
    mc = torch.compile(m, backend="aot_eager", fullgraph=True)
    y_c = mc(x)
    y_c.sum().backward()
    grads_c = [x.grad, m.A.grad, m.B.grad, m.A2.grad, m.B2.grad]
    check(y_c, y_e, torch.float32, "compiled y")
    for i, (a, e) in enumerate(zip(grads_c, grads_e, strict=True)):
        check(a, e, torch.float32, f"compiled grad {i}")


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "base_out"])
@pytest.mark.parametrize("pos,p", [("pre", 0.0), ("pre", 0.3), ("post", 0.3)])
def test_reference_module_matches_float64_autograd(pos, p, with_weight):
    """``kernels.reference`` called directly (the math its docstring states) against float64 autograd of the
    same formula with the same keep-mask, with the base as (weight, bias) and as a caller's base_out."""
    from automodel_lora.kernels import reference as R

    M, K, N, r, s = 19, 40, 24, 8, 1.5
    x, W, b, A, B = make(M, K, N, r, torch.float32, True)
    seed = torch.tensor([1234], dtype=torch.int64)
    keep = None
    if p > 0:
        keep = R.reference_keep(seed, M, K if pos == "pre" else N, p, "cpu").double()
        assert keep.dtype == torch.float64 and 0 < keep.mean() < 1
    base_out = None if with_weight else (x @ W.t() + b).detach()
    y, xa = R.reference_forward(x.detach(), W if with_weight else None, b if with_weight else None, base_out,
                                A.detach(), B.detach(), s, p, pos == "post", seed)
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    yr = reference(xr, W.double(), b.double(), Ar, Br, s, p, pos, keep)
    g = torch.randn(M, N)
    yr.backward(g.double())
    check(y, yr, torch.float32, "y")
    xd = xr.detach() * keep / (1 - p) if (pos == "pre" and keep is not None) else xr.detach()
    check(xa, xd @ Ar.detach().t(), torch.float32, "xa")
    dx, dA, dB = R.reference_backward(g, x.detach(), W if with_weight else None, A.detach(), B.detach(), xa, s, p,
                                      pos == "post", seed, True, True, True)
    dx_lora = xr.grad - (0 if with_weight else g.double() @ W.double())  # base_out: dx has the adapter part only
    check(dx, dx_lora, torch.float32, "dx")
    check(dA, Ar.grad, torch.float32, "dA")
    check(dB, Br.grad, torch.float32, "dB")
    assert R.reference_backward(g, x.detach(), None, A.detach(), B.detach(), xa, s, p, pos == "post", seed,
                                False, False, True)[:2] == (None, None)


def test_reference_path_without_triton():
    """With triton unimportable, the package imports and the CPU reference path runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from automodel_lora.kernels import lora_linear, HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "x = torch.randn(3, 8, requires_grad=True); W = torch.randn(5, 8)\n"
        "A = torch.randn(2, 8, requires_grad=True); B = torch.randn(5, 2, requires_grad=True)\n"
        "y = lora_linear(x, W, None, A, B, 2.0, 0.2, 'pre'); y.sum().backward()\n"
        "assert x.grad.shape == x.shape and A.grad is not None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# interpreter-only: the kernel launchers themselves, and the Triton base GEMM path
# ------------------------------------------------------------------------------------------
@interp_only
def test_backend_is_triton_under_interpreter_interp():
    assert B.use_kernels_for(torch.empty(1))


@interp_only
@pytest.mark.parametrize("base_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,r,bias,pos,p", [CASES[2], CASES[5], CASES[7]])
def test_base_gemm_choice_interp(M, K, N, r, bias, pos, p, dtype, base_gemm, kernel_options):
    x, W, b, A, B = make(M, K, N, r, dtype, bias)
    run_and_check(x, W, b, A, B, 2.0, p, pos, dtype, options=kernel_options(base_gemm=base_gemm))


# TMA-addressable shapes (16-byte aligned rows): the "triton" base GEMM runs the TMA kernel in
# forward and backward; M is odd (the store clips the last tile), r=8 pads the rank block to 16.
TMA_CASES = [(37, 64, 48, 16, True), (37, 64, 48, 8, False), (130, 96, 40, 64, True), (1, 32, 64, 16, False)]


def _spy(monkeypatch, module, name: str) -> list:
    """Record the first argument's shape and the ``tma`` keyword of every call of ``module.name`` (a public
    launcher as the dispatch module calls it) from now on, this test only."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((tuple(args[0].shape), kwargs.get("tma")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@interp_only
@pytest.mark.parametrize("fuse", [True, False], ids=["fused_proj", "proj_pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,r,bias", TMA_CASES)
def test_tma_base_gemm_interp(M, K, N, r, bias, dtype, fuse, kernel_options, monkeypatch):
    """The TMA GEMM computes y and dx; with the fused projection on (the default) it also makes xa and dyB."""
    from automodel_lora.kernels import dispatch as D
    from automodel_lora.kernels.tma_desc import tma_eligible, tma_eligible_proj

    x, W, b, A, B = make(M, K, N, r, dtype, bias, adapter_dtype=torch.float32)
    xa = torch.empty(M, r, dtype=dtype)
    assert tma_eligible(x.detach(), W.t(), xa, B.t()) and tma_eligible(torch.empty(M, N, dtype=dtype), W, xa, A)
    assert tma_eligible_proj(x.detach(), W.t(), A.t(), B.t()) and tma_eligible_proj(
        torch.empty(M, N, dtype=dtype), W, B, A)
    options = kernel_options(base_gemm="triton", fuse_proj=fuse)
    route = "fused_proj" if fuse else "tma"
    assert D.forward_route(x, W, None, A, B, 0.0, True, options) == route
    assert D.dx_route(torch.empty(M, N, dtype=dtype), W, A, B, 0.0, True, options) == route
    fused, gemms, projs = (_spy(monkeypatch, D, name) for name in ("gemm_lora_proj", "gemm_lora", "proj"))
    run_and_check(x, W, b, A, B, 1.5, 0.0, "post", dtype, options=options)
    assert fused == ([((M, K), None), ((M, N), None)] if fuse else []), "y (from x) and dx (from dy), xa / dyB made"
    assert gemms == ([] if fuse else [((M, K), True), ((M, N), True)]), "the TMA kernel must compute y and dx"
    assert projs == ([] if fuse else [((M, K), None), ((M, N), None)]), "a proj pass runs exactly when not fused"


@interp_only
@pytest.mark.parametrize("pos,p", [("pre", 0.25), ("post", 0.25)])
def test_tma_dropout_takes_proj_interp(pos, p, kernel_options, monkeypatch):
    """With dropout the masked products cannot be made inside the GEMM: proj runs, results still exact."""
    from automodel_lora.kernels import dispatch as D

    fused = _spy(monkeypatch, D, "gemm_lora_proj")
    options = kernel_options(base_gemm="triton")
    x, W, b, A, B = make(37, 64, 48, 16, torch.float32, True)
    assert D.forward_route(x, W, None, A, B, p, pos == "post", options) == ("cublas" if pos == "post" else "tma")
    run_and_check(x, W, b, A, B, 2.0, p, pos, torch.float32, options=options)
    assert not fused


# (M, K, N, R): one column block (no waiting tiles), several row and column blocks, padded rank, odd M
PROJ_CASES = [(37, 64, 32, 16), (37, 48, 96, 8), (130, 96, 40, 64), (1, 32, 64, 24)]


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("r_transposed", [True, False], ids=["rop_T", "rop_rowmajor"])
@pytest.mark.parametrize("M,K,N,R", PROJ_CASES)
def test_gemm_lora_proj_interp(M, K, N, R, r_transposed, dtype):
    """gemm_lora_proj against float64: pm = x @ rop and out = x @ y + pm @ (s q) + bias, with pm as rounded
    to dtype (what the kernel feeds its epilogue); twice in a row (the row-block locks are reset each launch)."""
    from automodel_lora.kernels.launch import tile_locks
    from automodel_lora.kernels.tma_gemm import gemm_lora_proj

    x = torch.randn(M, K, dtype=dtype)
    y = (torch.randn(N, K) / K**0.5).to(dtype).t()  # the forward's layout: W^T
    rop = (torch.randn(R, K) / K**0.5).t() if r_transposed else torch.randn(K, R) / K**0.5  # fp32 master
    q = torch.randn(N, R).to(dtype).t()
    bias = torch.randn(N).to(dtype)
    for _ in range(2):
        out, pm = gemm_lora_proj(x, y, rop, q, 1.5, bias=bias)
        check(pm, x.double() @ rop.to(dtype).double(), dtype, "pm")
        ref = x.double() @ y.double() + pm.double() @ (1.5 * q.double()) + bias.double()
        check(out, ref, dtype, "out")
        assert not tile_locks(x.device, 1).any(), "locks must be zero between launches"


def test_proj_tiles_fit_on_an_h100():
    """The projection tiles fit the TMA schedule's idle time where its short last wave has room for them,
    counted for 132 SMs (the H100 / H200)."""
    pytest.importorskip("triton")
    from automodel_lora.kernels.tma_gemm import proj_tiles_fit

    fits = {(8192, 4096): True, (8192, 14336): True, (4096, 4096): True, (4096, 14336): True,
            (4096, 1024): False,  # 128 tiles: less than one wave, no program is short
            (128 * 132, 256): False,  # 132 tiles: a whole wave, no program is short
            (100000, 4096): False}  # 782 row blocks: more than two projection tiles per short program
    assert {mn: proj_tiles_fit(*mn, 132) for mn in fits} == fits


@interp_only
def test_auto_fuses_proj_where_its_tiles_fit_interp(kernel_options):
    """"auto" makes xa in the GEMM launch only where the projection tiles fit (above) and the GEMM is one
    "auto" gives the TMA kernel; elsewhere a proj pass runs first.  "triton" fuses wherever the kernel can."""
    from automodel_lora.kernels.dispatch import AUTO_TMA_MIN_MNK, fuses_proj

    K = 16
    auto, triton_ = kernel_options(base_gemm="auto"), kernel_options(base_gemm="triton")
    for (M, N), fit in (((8192, 4096), True), ((4096, 1024), False)):
        x, W, A, B = torch.empty(M, K), torch.empty(N, K), torch.empty(16, K), torch.empty(N, 16)
        assert fuses_proj(x, W.t(), A.t(), B.t(), auto, n_sm=132, auto_min_mnk=1) is fit
        assert fuses_proj(x, W.t(), A.t(), B.t(), triton_, n_sm=132, auto_min_mnk=1)
        assert M * K * N < AUTO_TMA_MIN_MNK and not fuses_proj(x, W.t(), A.t(), B.t(), auto, n_sm=132)
        assert not fuses_proj(x, W.t(), A.t(), B.t(), auto.replace(fuse_proj=False), n_sm=132, auto_min_mnk=1)


@interp_only
def test_gemm_lora_proj_rejects_what_tma_cannot_take():
    from automodel_lora.kernels.tma_gemm import gemm_lora_proj

    x, W = torch.randn(8, 64), torch.randn(48, 64)
    with pytest.raises(ValueError, match="call proj\\(\\) and gemm_lora\\(\\) instead"):
        gemm_lora_proj(x, W.t(), torch.randn(64, 65), torch.randn(48, 65).t())  # rank 65 > one rank tile
    with pytest.raises(ValueError, match="rop \\(64, 16\\)"):
        gemm_lora_proj(x, W.t(), torch.randn(64, 16), torch.randn(48, 8).t())  # rop's rank is not q's


@interp_only
def test_auto_base_gemm_policy_interp():
    """"auto" fuses the low-rank term into the TMA GEMM up to rank 64 and from a GEMM size on; cuBLAS otherwise."""
    from automodel_lora.kernels.dispatch import base_gemm_route

    x, W = torch.randn(8, 64), torch.randn(48, 64)
    assert base_gemm_route(x, W.t(), torch.randn(48, 16).t(), 16, "auto") == "cublas"  # small GEMM
    for r, route in ((16, "tma"), (64, "tma"), (65, "cublas")):
        B = torch.randn(48, r)
        assert base_gemm_route(x, W.t(), B.t(), r, "auto", auto_min_mnk=8 * 64 * 48) == route, r
    assert base_gemm_route(x, W.t(), torch.randn(48, 65).t(), 65, "triton") == "portable"
    assert base_gemm_route(x, W.t(), torch.randn(48, 16).t(), 16, "cublas") == "cublas"


@interp_only
@pytest.mark.parametrize("M,K,N,r,bias", TMA_CASES[:2])
def test_portable_triton_gemm_interp(M, K, N, r, bias, monkeypatch, kernel_options):
    """Without TMA descriptors (older Triton) "triton" runs the portable GEMM kernel and "auto" cuBLAS's path."""
    from automodel_lora.kernels import dispatch as D
    from automodel_lora.kernels import tma_desc

    monkeypatch.setattr(tma_desc, "TensorDescriptor", None)  # a Triton without host-side TMA descriptors
    for kind, route in (("triton", "portable"), ("auto", "cublas")):
        options = kernel_options(base_gemm=kind)
        x, W, b, A, B = make(M, K, N, r, torch.float32, bias)
        assert not tma_desc.tma_eligible(x.detach(), W.t(), torch.empty(M, r), B.t())
        assert D.forward_route(x, W, None, A, B, 0.0, True, options) == route
        run_and_check(x, W, b, A, B, 2.0, 0.0, "post", torch.float32, options=options)


@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_tma_gemm_reads_pm_at_any_row_offset_interp(dtype):
    """pm is read with plain loads: a view starting mid-row-block (no 16-byte aligned base) still takes the TMA
    kernel, and rows with a stride wider than the rank are read from the right places; a pm strided along the
    rank does not take it."""
    from automodel_lora.kernels.tma_desc import tma_eligible
    from automodel_lora.kernels.tma_gemm import gemm_lora

    M, K, N, r = 37, 64, 48, 16
    x, W, q = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
    for pm in (torch.randn(M + 1, r, dtype=dtype)[1:], torch.randn(M, r + 8, dtype=dtype)[:, 3:3 + r]):
        assert tma_eligible(x, W.t(), pm, q.t())
        out = gemm_lora(x, W.t(), pm, q.t(), 2.0)
        check(out, x.double() @ W.double().t() + pm.double() @ (2.0 * q.double().t()), dtype, "out")
    assert not tma_eligible(x, W.t(), torch.randn(r, M, dtype=dtype).t(), q.t())


def test_kernel_options_reject_unknown_base_gemm():
    with pytest.raises(ValueError, match="base_gemm='cutlass' is not allowed"):
        KernelOptions(base_gemm="cutlass")
    x, W, b, A, B = make(4, 8, 6, 2, torch.float32)
    with pytest.raises(TypeError, match="options must be a KernelOptions"):
        lora_linear(x, W, b, A, B, 1.0, options={"base_gemm": "cublas"})


@interp_only
def test_split_m_partials_interp():
    """M large enough for several split-M partials in tn / tn2 (the multi-split sum path)."""
    from automodel_lora.kernels.grad_ab import num_splits, tn, tn2
    from automodel_lora.kernels.launch import sm_count, tile_locks

    M, D1, D2, R = 1100, 33, 20, 5
    pa, xa = torch.randn(M, R), torch.randn(M, D1)
    pb, xb = torch.randn(M, R), torch.randn(M, D2)
    assert num_splits(M, D1 + D2, R, 16, sm_count(xa.device)) > 1
    ref_a, ref_b = 0.5 * pa.double().t() @ xa.double(), 0.5 * (pb.double().t() @ xb.double()).t()
    dA, dB = tn2(pa, xa, pb, xb, 0.5)
    check(dA, ref_a, torch.float32, "tn2 A")
    check(dB, ref_b, torch.float32, "tn2 B")
    # the last slice of each tile resets its lock: a second launch sums the same way, bit for bit
    assert not tile_locks(xa.device, 1).any()
    dA2, dB2 = tn2(pa, xa, pb, xb, 0.5)
    assert torch.equal(dA, dA2) and torch.equal(dB, dB2)
    # the in-launch sum writes the output dtype directly
    dA16, dB16 = tn2(pa, xa, pb, xb, 0.5, dtype_a=torch.float16, dtype_b=torch.float32)
    assert dA16.dtype == torch.float16 and dB16.dtype == torch.float32
    check(dA16, ref_a, torch.float16, "tn2 A fp16 out")
    check(dB16, ref_b, torch.float32, "tn2 B")
    check(tn(pa, xa, 0.5), ref_a, torch.float32, "tn")
    check(tn(pb, xb, 0.5, transpose_out=True), ref_b, torch.float32, "tn transposed")


def test_tma_autotune_drops_configs_over_the_shared_memory_of_the_device(monkeypatch):
    """fp32 master adapters at rank block 64: the BN=256, 3-stage configs need 245760 bytes (the figure Triton
    reported on an H100, whose limit is 232448), so only the BN=128 config is timed; 16-bit Q keeps all five."""
    import torch as _torch

    from automodel_lora.kernels import tma_gemm as T

    monkeypatch.setattr(T, "shared_memory_per_block", lambda device: 232448)
    monkeypatch.setattr(_torch.cuda, "current_device", lambda: 0)
    configs = T._tma_gemm_tuned.configs
    big = next(c for c in configs if c.kwargs["BN"] == 256)
    assert T.tma_smem_floor(big.kwargs, 4, 64) == 245760
    kept = T._prune_to_fit(configs, {}, Q_BYTES=4, BR=64)
    assert [c.kwargs["BN"] for c in kept] == [128]
    assert T._prune_to_fit(configs, {}, Q_BYTES=2, BR=64) == configs
    assert T._prune_to_fit(configs, {}, Q_BYTES=4, BR=16) == configs
