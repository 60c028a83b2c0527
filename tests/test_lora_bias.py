"""HF PEFT's `lora_bias` (a bias b_B on lora_B) on the layer: the PyTorch path against a float64 reference
written here, the fused path (`lora_linear`, `lora_linear_dequant`, `lora_add`, `FusedLinearLoRA`) against it
and against the PyTorch path, forward and every gradient (x, A, B, b_B).

    y = x W^T + b + s * (drop(x) A^T B^T + b_B)          "pre"  (PEFT's `lora_B(lora_A(drop(x))) * s`)
    y = x W^T + b + drop(s * (x A^T B^T + b_B))          "post"

Runs on the CPU (the reference math), under ``TRITON_INTERPRET=1`` (the Triton kernels in the interpreter;
in the Makefile's interpreter line) and on CUDA where present (the ``device`` parameter).

Tolerances (``check``: normwise ||a - e|| / ||e|| and elementwise |a - e| <= tol * max|e|), per dtype, for one
path against float64 on the same rounded inputs or two paths against each other (a few roundings apart):
  fp32: 2e-6 / 2e-5 (eps 1.2e-7, fp32 accumulation; a missing bias term is off by > 1e-2).
  fp16: 2e-3 / 8e-3 (output and the (M, r) projection rounded, 4.9e-4 each; measured ~4e-4).
  bf16: 1.6e-2 / 6e-2 (3.9e-3 per rounding, so ~4 roundings normwise; measured ~5e-3).
The merge, PEFT round trip and file checks are in ``test_lora_bias_io.py``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automodel_lora.kernels import KernelOptions, dropout_keep_mask, lora_add, lora_linear, lora_linear_dequant
from automodel_lora.kernels import backend as B
from automodel_lora.lora import FusedLinearLoRA, patch_linear_module

from .conftest import reference_check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 8e-3), torch.bfloat16: (1.6e-2, 6e-2)}
SCALE = 2.0


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    """The Triton interpreter computes through numpy, which has no bf16: its bf16 results are garbage for
    every kernel of the package (the interpreter runs of test_kernels.py use fp32 / fp16 only)."""
    if device == "cpu" and INTERPRET and B.HAS_TRITON and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 (numpy)")


check = reference_check(TOL)


def reference(x, W, b, A, B, b_B, s, p, pos, keep):
    """float64 y (M, N) for x (M, K); keep: the (M, K) (pre) / (M, N) (post) mask, or None for no dropout."""
    xd = x * keep / (1 - p) if (pos == "pre" and keep is not None) else x
    lr = s * (xd @ A.t() @ B.t() + b_B)
    if pos == "post" and keep is not None:
        lr = lr * keep / (1 - p)
    y = x @ W.t() + lr
    return y if b is None else y + b


def operands(M, K, N, r, dtype, device, *, base_bias=True, adapter_dtype=None):
    """x, W, b, A, B, b_B with A, B, b_B nonzero (b_B of the size of the rest of the term) and x, A, B, b_B
    requiring grad."""
    adt = adapter_dtype or dtype
    x = torch.randn(M, K).to(dtype).to(device).requires_grad_(True)
    W = (torch.randn(N, K) / K**0.5).to(dtype).to(device)
    b = torch.randn(N).to(dtype).to(device) if base_bias else None
    A = (torch.randn(r, K) / K**0.5).to(adt).to(device).requires_grad_(True)
    B = (torch.randn(N, r) * 0.3).to(adt).to(device).requires_grad_(True)
    b_B = torch.randn(N).to(adt).to(device).requires_grad_(True)
    return x, W, b, A, B, b_B


def seed_of_call(call_seed: int, device) -> torch.Tensor:
    """The Philox seed a lora_* call draws after torch.manual_seed(call_seed)."""
    torch.manual_seed(call_seed)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def run_entry(entry, x, W, b, A, B, b_B, p, pos, options):
    """The fused function `entry` on these operands, y (M, N): `lora_linear`, `lora_linear_dequant` (the dense
    W behind a dequantize callable) or `lora_add` (the base computed here)."""
    if entry == "lora_linear":
        return lora_linear(x, W, b, A, B, SCALE, p, pos, options=options, lora_bias=b_B)
    if entry == "dequant":
        return lora_linear_dequant(x, lambda: W, b, A, B, SCALE, p, pos, options=options, lora_bias=b_B)
    return lora_add(F.linear(x, W, b), x, A, B, SCALE, p, pos, options=options, lora_bias=b_B)


# ---------------------------------------------------------------------------------------------------------
# the fused functions against the float64 reference (dropout included: the mask comes from the call's seed)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pos,p", [("pre", 0.0), ("post", 0.0), ("pre", 0.25), ("post", 0.25)])
@pytest.mark.parametrize("entry", ["lora_linear", "dequant", "lora_add"])
@pytest.mark.parametrize("base_gemm", ["cublas", "triton"])
def test_fused_functions_match_float64_reference(entry, pos, p, dtype, device, base_gemm):
    skip_unsupported(device, dtype)
    M, K, N, r = 37, 64, 48, 8
    x, W, b, A, B, b_B = operands(M, K, N, r, dtype, device, base_bias=entry != "dequant")
    torch.manual_seed(7)
    y = run_entry(entry, x, W, b, A, B, b_B, p, pos, KernelOptions(base_gemm=base_gemm))
    g = torch.randn_like(y)
    y.backward(g)
    keep = None
    if p > 0:
        keep = dropout_keep_mask(seed_of_call(7, device), M, K if pos == "pre" else N, p, device).double().cpu()
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (x, A, B, b_B)]
    yr = reference(ref[0], W.double().cpu(), None if b is None else b.double().cpu(), *ref[1:], SCALE, p, pos, keep)
    yr.backward(g.double().cpu())
    check(y, yr, dtype, "y")
    for name, got, want in zip(("dx", "dA", "dB", "db_B"), (x, A, B, b_B), ref, strict=True):
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        check(got.grad, want.grad, dtype, name)


def test_fp32_master_bias_with_fp16_activations_and_no_base_bias():
    """lora_bias in fp32 (master weights) with fp16 compute: y in fp16, d b_B in fp32."""
    x, W, _, A, B, b_B = operands(33, 40, 24, 4, torch.float16, "cpu", adapter_dtype=torch.float32)
    y = lora_linear(x, W, None, A, B, SCALE, lora_bias=b_B)
    g = torch.randn_like(y)
    y.backward(g)
    assert y.dtype == torch.float16 and b_B.grad.dtype == torch.float32
    check(b_B.grad, SCALE * g.double().sum(0), torch.float16, "db_B = s * dy.sum(0)")


def test_bias_gradient_only_and_no_bias_is_unchanged():
    """A call needing d b_B alone computes it; lora_bias=None gives the same y as before (no bias term)."""
    x, W, b, A, B, b_B = operands(9, 16, 12, 2, torch.float32, "cpu")
    for t in (x, A, B):
        t.requires_grad_(False)
    g = torch.randn(9, 12)
    lora_linear(x, W, b, A, B, SCALE, lora_bias=b_B).backward(g)
    check(b_B.grad, SCALE * g.double().sum(0), torch.float32, "db_B")
    plain = lora_linear(x, W, b, A, B, SCALE)
    check(plain, reference(x.double(), W.double(), b.double(), A.double(), B.double(), 0.0, SCALE, 0.0, "pre", None),
          torch.float32, "y without lora_bias")


def test_bad_lora_bias_is_an_error_naming_the_shape():
    x, W, b, A, B, _ = operands(4, 8, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"lora_bias must be a floating \(6,\) tensor.*got \(5,\)"):
        lora_linear(x, W, b, A, B, 1.0, lora_bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"lora_bias must be a floating \(6,\).*torch.int64"):
        lora_add(F.linear(x, W, b), x, A, B, 1.0, lora_bias=torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_compile_fullgraph(p):
    """The bias folds, and with post-dropout the mask, trace with no graph break (the mask is a custom op)."""
    torch._dynamo.reset()
    x, W, b, A, B, b_B = operands(10, 16, 12, 4, torch.float32, "cpu")

    def fn(x, A, B, b_B):
        return lora_linear(x.reshape(2, 5, 16), W, b, A, B, SCALE, p, "post", lora_bias=b_B)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(x, A, B, b_B)
    y.sum().backward()
    assert y.shape == (2, 5, 12) and b_B.grad is not None
    if p == 0.0:  # no mask: exactly comparable with eager
        grad_c = b_B.grad.clone()
        b_B.grad = None
        fn(x, A, B, b_B).sum().backward()
        check(grad_c, b_B.grad, torch.float32, "compiled db_B")
    else:  # d b_B = s / (1 - p) * (kept rows per column): each entry a multiple of that
        units = b_B.grad / (SCALE / (1 - p))
        assert torch.allclose(units, units.round(), atol=1e-4) and (units <= 10).all()


# ---------------------------------------------------------------------------------------------------------
# the layer: PyTorch path against a plain reference, fused path against the PyTorch path
# ---------------------------------------------------------------------------------------------------------
class _OwnForward(nn.Linear):
    """A linear subclass with a forward of its own: the fused class adds its adapter through `lora_add`."""

    def forward(self, x):
        return super().forward(x)


def adapted_pair(base: nn.Linear, **settings) -> tuple[nn.Module, nn.Module]:
    """(PyTorch path, fused path) of the same base with the same nonzero adapter, lora_bias on."""
    torch_path = patch_linear_module(copy.deepcopy(base), use_triton=False, lora_bias=True, **settings)
    fused = patch_linear_module(copy.deepcopy(base), use_triton=True, lora_bias=True, **settings)
    with torch.no_grad():
        torch_path.lora_A.weight.normal_(std=0.3)
        torch_path.lora_B.weight.normal_(std=0.3)
        torch_path.lora_B.bias.normal_()
        fused.load_state_dict(torch_path.state_dict())
    return torch_path, fused


def test_patch_adds_a_zero_bias_of_the_lora_dtype_and_reset_zeroes_it():
    layer = patch_linear_module(nn.Linear(8, 6, dtype=torch.bfloat16), dim=2, lora_bias=True, lora_dtype="float32")
    bias = layer.lora_B.bias
    assert bias.shape == (6,) and bias.dtype == torch.float32 and bias.requires_grad and not bias.any()
    assert "lora_B.bias" in dict(layer.named_parameters()) and layer.lora_settings.lora_bias
    with torch.no_grad():
        bias.fill_(1.0)
    layer.reset_lora_parameters()
    assert not bias.any()
    assert patch_linear_module(nn.Linear(8, 6), dim=2).lora_B.bias is None  # default: PEFT's lora_bias=False


@pytest.mark.parametrize("pos", ["pre", "post"])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("base_bias", [True, False])
def test_pytorch_path_matches_plain_reference(pos, p, base_bias):
    """LinearLoRA.lora_delta is PEFT's `lora_B(lora_A(drop(x))) * s` (the bias scaled, and dropped with the
    rest under "post"); the dropout mask is reproduced from the same torch seed."""
    torch_path, _ = adapted_pair(nn.Linear(20, 12, bias=base_bias), dim=4, alpha=8, dropout=p, dropout_position=pos)
    torch_path.train()
    x = torch.randn(3, 5, 20, requires_grad=True)
    torch.manual_seed(3)
    y = torch_path(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(3)
    keep = None
    if p > 0:  # nn.Dropout draws one bernoulli mask of the dropped tensor's shape
        keep = (F.dropout(torch.ones(15, 20 if pos == "pre" else 12), p) != 0).double()
    params = [t.detach().double().requires_grad_(True) for t in (x, torch_path.lora_A.weight,
                                                                 torch_path.lora_B.weight, torch_path.lora_B.bias)]
    bias = None if torch_path.bias is None else torch_path.bias.double()
    yr = reference(params[0].reshape(15, 20), torch_path.weight.double(), bias, *params[1:], 2.0, p, pos, keep)
    yr.backward(g.double().reshape(15, 12))
    check(y.reshape(15, 12), yr, torch.float32, "y")
    for name, got, want in zip(("dx", "dA", "dB", "db_B"), (x, torch_path.lora_A.weight, torch_path.lora_B.weight,
                                                            torch_path.lora_B.bias), params, strict=True):
        check(got.grad, want.grad, torch.float32, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pos", ["pre", "post"])
@pytest.mark.parametrize("base", ["linear", "linear_no_bias", "own_forward"])
def test_fused_layer_matches_pytorch_path(base, pos, dtype, device):
    """FusedLinearLoRA (lora_linear for a dense base, lora_add for a subclass with its own forward) against
    LinearLoRA, forward and the gradients of x, A, B and b_B; dropout p = 0 (the two paths draw their masks
    differently; the masked fused math is checked above)."""
    skip_unsupported(device, dtype)
    cls = _OwnForward if base == "own_forward" else nn.Linear
    layer = cls(48, 40, bias=base != "linear_no_bias").to(device=device, dtype=dtype)
    torch_path, fused = adapted_pair(layer, dim=8, alpha=16, dropout_position=pos)
    assert isinstance(fused, FusedLinearLoRA) and not isinstance(torch_path, FusedLinearLoRA)
    x = torch.randn(2, 17, 48, device=device, dtype=dtype)
    outs = []
    for module in (torch_path, fused):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(torch.ones_like(y) * 0.5 + torch.arange(y.shape[-1], device=device, dtype=dtype) / 40)
        outs.append((y, xi.grad, module.lora_A.weight.grad, module.lora_B.weight.grad, module.lora_B.bias.grad))
    for name, want, got in zip(("y", "dx", "dA", "dB", "db_B"), *outs, strict=True):
        assert got.dtype == want.dtype, name
        check(got, want, dtype, name)


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 at a real shape, both base GEMMs (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base_gemm", ["triton", "cublas"])
@pytest.mark.parametrize("pos,p", [("pre", 0.0), ("post", 0.1)])
def test_gpu_bf16_real_shape(base_gemm, pos, p):
    """An 8B-sized projection (M = 4096 tokens, 4096 x 4096, r = 16) in bf16: y and every gradient within
    1e-2 normwise of an fp32 reference on the same bf16 inputs (see test_kernels_gpu.py for the bound)."""
    M, K, N, r = 4096, 4096, 4096, 16
    torch.manual_seed(0)
    x, W, b, A, B, b_B = operands(M, K, N, r, torch.bfloat16, "cuda")
    with torch.no_grad():
        B.mul_(0.2)
    torch.manual_seed(11)
    y = lora_linear(x, W, b, A, B, SCALE, p, pos, options=KernelOptions(base_gemm=base_gemm), lora_bias=b_B)
    g = torch.randn_like(y)
    y.backward(g)
    keep = None if p == 0 else dropout_keep_mask(seed_of_call(11, "cuda"), M, N, p, "cuda").float()
    ref = [t.detach().float().requires_grad_(True) for t in (x, A, B, b_B)]
    yr = reference(ref[0], W.float(), b.float(), *ref[1:], SCALE, p, pos, keep)
    yr.backward(g.float())
    for name, got, want in (("y", y, yr), *zip(("dx", "dA", "dB", "db_B"), (x.grad, A.grad, B.grad, b_B.grad),
                                               (t.grad for t in ref), strict=True)):
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{base_gemm} {pos} p={p} {name}: rel err {err:.2e}"
