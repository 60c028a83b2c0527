"""LoRA linear as two torch custom ops (forward, backward) inside one autograd.Function.

    lora_linear: y = x W^T + b + s * (drop(x) A^T) B^T          (dropout_position="pre")
                 y = x W^T + b + drop(s * (x A^T) B^T)           (dropout_position="post")
    lora_linear_dequant: lora_linear with W = dequantize(), called in forward and again in backward
                 (a 4-bit base; the dense W is never saved)
    lora_add:    y = base_out + <the same low-rank term>          (base computed by the caller)

Shapes: x ``(..., K)``, weight ``(N, K)``, bias ``(N,)``, lora_A ``(r, K)``, lora_B ``(N, r)``.
Compute runs in x.dtype with fp32 accumulation; adapter gradients come back in the
adapters' dtype (fp32 master weights work).  Saved for backward: x and ``xa = drop(x) A^T``
``(M, r)`` only; the dropout mask is regenerated from a Philox seed.

Backends (chosen per call inside the custom op, so torch.compile sees one opaque op):
  * CUDA + triton, or CPU with ``TRITON_INTERPRET=1`` at import: the Triton kernels of
    ``triton_lora``.  The base GEMM (``set_base_gemm``) is by default, on Hopper for large GEMMs at
    rank <= 64, a Triton TMA GEMM that takes the low-rank term as an extra K step (no pass over y
    or dx for it); elsewhere, and with dropout on the fused side, it is cuBLAS with the low-rank
    term written first and accumulated through the GEMM's beta=1 epilogue (``t.addmm_(x, W^T)``).
  * otherwise: the pure-PyTorch reference math below (same autograd.Function).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is optional: without it the reference path runs everywhere
    from . import triton_lora as _tl

    HAS_TRITON = True
except ImportError as _e:  # pragma: no cover - depends on the environment
    _tl = None
    HAS_TRITON = False
    if torch.cuda.is_available():
        warnings.warn(f"Triton is not importable ({_e}); LoRA layers on CUDA run the slower PyTorch reference path",
                      stacklevel=2)

# Base GEMM of the kernel path:
#   "cublas": the low-rank term is written first and added through cuBLAS's beta=1 epilogue;
#   "triton": one Triton GEMM with the low-rank term as an extra K step (TMA kernel on Hopper,
#             the portable kernel elsewhere);
#   "auto":   the Triton GEMM where its TMA kernel applies and measured faster (Hopper, 16-bit,
#             rank <= 64, M * K * N >= 2**34), else cuBLAS.
# Default chosen by measurement on H100: see benchmarks/NOTES.md.
_BASE_GEMMS = ("auto", "cublas", "triton")
_BASE_GEMM = os.environ.get("AUTOMODEL_LORA_BASE_GEMM", "auto")
if _BASE_GEMM not in _BASE_GEMMS:
    raise ValueError(f"AUTOMODEL_LORA_BASE_GEMM must be one of {_BASE_GEMMS}, got {_BASE_GEMM!r}")


def set_base_gemm(kind: str) -> None:
    """Select the base GEMM of the kernel path: ``"auto"`` (default), ``"cublas"`` or ``"triton"``.

    Raises:
        ValueError: for any other value.
    """
    global _BASE_GEMM
    if kind not in _BASE_GEMMS:
        raise ValueError(f"base gemm must be one of {_BASE_GEMMS}, got {kind!r}")
    _BASE_GEMM = kind


def get_base_gemm() -> str:
    return _BASE_GEMM


# "auto" takes the TMA GEMM (ranks up to 64, where it has one rank tile) from this GEMM size
# (M * K * N) on.  Measured on an H100 side by side with the cuBLAS path (benchmarks/NOTES.md,
# "Version 3: host time"), after the launch path stopped costing more host time than cuBLAS's:
#   * 8B-shaped 4-layer model, M = 4096 (GEMMs 1.7e10 (k/v) to 2.4e11): 0.966x of frozen throughput
#     with TMA wherever it applies, 0.935x with cuBLAS;
#   * layer, M = 8192: 4096^2 (1.4e11) 1.20x / 1.24x (r=16 / r=64) against 1.24x / 1.30x; at 4.8e11
#     (4096 x 14336, 14336 x 4096) 1.06x-1.12x against 1.10x-1.15x.
# Smaller GEMMs were not measured; there the 128 x 256 tiles leave SMs idle, so cuBLAS keeps them.
_AUTO_TMA_MIN_MNK = 2**34  # 1.7e10: the k/v projections of an 8B model at 4096 tokens


def _base_gemm_route(x, y, pm, q) -> Optional[bool]:
    """How ``x @ y`` takes the low-rank term ``pm @ q``: None for the cuBLAS path (term written first,
    added through beta=1), else the Triton GEMM with it as an extra K step, True when that GEMM runs
    its TMA kernel (the value ``gemm_lora(..., tma=)`` takes)."""
    if _BASE_GEMM == "cublas":
        return None
    if _BASE_GEMM == "triton":
        return _tl.tma_eligible(x, y, pm, q)
    if _below_auto_tma_size(x, y):
        return None
    return True if _tl.tma_eligible(x, y, pm, q) else None


def _below_auto_tma_size(x, y) -> bool:
    """``x @ y`` is smaller than the GEMMs ``"auto"`` gives the TMA kernel."""
    return x.shape[0] * x.shape[1] * y.shape[1] < _AUTO_TMA_MIN_MNK


# Whether the TMA GEMM's launch also makes the skinny product (``triton_lora.gemm_lora_proj``): xa = x A^T with
# the forward's GEMM and dyB = dy B with the backward's dx GEMM, in time the GEMM's schedule leaves idle,
# instead of a ``proj`` launch before them.  Only without dropout (the masked products take ``proj``), and
# with "auto" only where that idle time is enough (``proj_tiles_fit``).
_FUSE_PROJ = os.environ.get("AUTOMODEL_LORA_FUSE_PROJ", "1") == "1"


def set_fuse_proj(on: bool) -> None:
    """Let the TMA base GEMM make ``x A^T`` / ``dy B`` itself (default on; off: a ``proj`` pass first)."""
    global _FUSE_PROJ
    _FUSE_PROJ = bool(on)


def get_fuse_proj() -> bool:
    return _FUSE_PROJ


def _fuses_proj(x, y, rop, q) -> bool:
    """Whether ``x @ y`` with the low-rank term ``(x @ rop) @ q`` runs as one ``gemm_lora_proj`` launch: the
    base GEMM route would be the TMA kernel, and that kernel can take ``rop`` as well."""
    if not _FUSE_PROJ or _BASE_GEMM == "cublas":
        return False
    if _BASE_GEMM == "auto" and (_below_auto_tma_size(x, y) or not _tl.proj_tiles_fit(x.shape[0], y.shape[1],
                                                                                       x.device)):
        return False
    return _tl.tma_eligible_proj(x, y, rop, q)


def use_kernels_for(t: torch.Tensor) -> bool:
    """True when the Triton kernels run for tensors on ``t``'s device (CUDA, or the CPU interpreter)."""
    return HAS_TRITON and (t.is_cuda or (_INTERPRET and t.device.type == "cpu"))


def on_device_of(t: torch.Tensor, fn, *args):
    """``fn(*args)`` with ``t``'s GPU as the current device: Triton launches on the current device, so a
    layer on cuda:1 while cuda:0 is current needs the guard (entered only then: it costs host time)."""
    idx = t.get_device()
    if idx < 0 or idx == torch.cuda.current_device():
        return fn(*args)
    with torch.cuda.device(idx):
        return fn(*args)


# ----------------------------------------------------------------------------------------
# dropout keep-masks
# ----------------------------------------------------------------------------------------
def _ref_keep(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return torch.rand((M, D), generator=g, device=device) >= p


def dropout_keep_mask(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    """The ``(M, D)`` bool keep-mask the active backend derives from ``seed`` (tests, debugging)."""
    device = torch.device(device)
    if HAS_TRITON and (device.type == "cuda" or (_INTERPRET and device.type == "cpu")):
        seed = seed.to(device)
        return on_device_of(seed, _tl.keep_mask, seed, M, D, p, device)
    return _ref_keep(seed, M, D, p, device)


# ----------------------------------------------------------------------------------------
# pure-PyTorch reference math (CPU path; also the semantics the kernels implement)
# ----------------------------------------------------------------------------------------
def _ref_fwd(x, weight, bias, base_out, A, B, scale, p, post, seed):
    cdt = x.dtype
    A_c, B_c = A.to(cdt), B.to(cdt)
    M, K = x.shape
    xd = x
    if p > 0.0 and not post:
        xd = x * _ref_keep(seed, M, K, p, x.device).to(cdt) / (1.0 - p)
    xa = xd @ A_c.t()
    lr = (xa @ B_c.t()) * scale
    if p > 0.0 and post:
        lr = lr * _ref_keep(seed, M, lr.shape[1], p, x.device).to(cdt) / (1.0 - p)
    if base_out is None:
        return F.linear(x, weight, bias) + lr, xa
    return (base_out + lr).to(base_out.dtype), xa


def _ref_bwd(dy, x, weight, A, B, xa, scale, p, post, seed, need_dx, need_dA, need_dB):
    cdt = x.dtype
    A_c, B_c = A.to(cdt), B.to(cdt)
    M, K = x.shape
    N = dy.shape[1]
    dyd = dy
    if p > 0.0 and post:
        dyd = dy * _ref_keep(seed, M, N, p, x.device).to(cdt) / (1.0 - p)
    keep_pre = None
    if p > 0.0 and not post and (need_dx or need_dA):
        keep_pre = _ref_keep(seed, M, K, p, x.device).to(cdt) / (1.0 - p)
    dx = dA = dB = None
    dyB = dyd @ B_c if (need_dx or need_dA) else None
    if need_dx:
        lr = (dyB @ A_c) * scale
        if keep_pre is not None:
            lr = lr * keep_pre
        dx = lr if weight is None else dy @ weight + lr
    if need_dA:
        xd = x if keep_pre is None else x * keep_pre
        dA = ((dyB.t().float() @ xd.float()) * scale).to(A.dtype)
    if need_dB:
        dB = ((dyd.t().float() @ xa.float()) * scale).to(B.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------
def _tri_fwd(x, weight, bias, base_out, A, B, scale, p, post, seed):
    # A, B go to the kernels in their own dtype (fp32 masters too): the kernels cast the adapter
    # tiles to x's dtype after loading, so no per-step cast kernel runs
    if base_out is None and p == 0.0 and _fuses_proj(x, weight.t(), A.t(), B.t()):  # (y, xa) in one launch
        return _tl.gemm_lora_proj(x, weight.t(), A.t(), B.t(), scale, bias=bias, eligible=True)
    xa = _tl.proj(x, A.t(), seed=None if post else seed, p=0.0 if post else p)  # (M, r)
    if base_out is not None:  # lora_add: one pass writing base_out + low-rank term
        y = _tl.expand(xa, B.t(), scale, add=base_out, seed=seed if post else None, p=p if post else 0.0,
                       out_dtype=base_out.dtype)
        return y, xa
    wt, bt = weight.t(), B.t()
    tma = None if (post and p > 0.0) else _base_gemm_route(x, wt, xa, bt)
    if tma is not None:
        y = _tl.gemm_lora(x, wt, xa, bt, scale, bias=bias, tma=tma)
    else:
        y = _tl.expand(xa, bt, scale, bias=bias, seed=seed if post else None, p=p if post else 0.0)
        y.addmm_(x, wt)  # cuBLAS, low-rank term accumulated through beta=1
    return y, xa


def _tri_bwd(dy, x, weight, A, B, xa, scale, p, post, seed, need_dx, need_dA, need_dB):
    pre_drop = p > 0.0 and not post
    post_drop = p > 0.0 and post
    dx = dA = dB = None
    dyB = None
    if need_dx and weight is not None and p == 0.0 and _fuses_proj(dy, weight, B, A):
        dx, dyB = _tl.gemm_lora_proj(dy, weight, B, A, scale, eligible=True)  # dyB (M, r) made in the dx GEMM
    elif need_dx or need_dA:
        dyB = _tl.proj(dy, B, seed=seed if post_drop else None, p=p if post_drop else 0.0)  # (M, r)
    if need_dx and dx is None:
        if weight is None:
            dx = _tl.expand(dyB, A, scale, seed=seed if pre_drop else None, p=p if pre_drop else 0.0)
        else:
            tma = None if pre_drop else _base_gemm_route(dy, weight, dyB, A)
            if tma is not None:
                dx = _tl.gemm_lora(dy, weight, dyB, A, scale, tma=tma)
            else:
                dx = _tl.expand(dyB, A, scale, seed=seed if pre_drop else None, p=p if pre_drop else 0.0)
                dx.addmm_(dy, weight)
    if need_dA and need_dB:  # one launch for both weight gradients
        dA, dB = _tl.tn2(dyB, x, xa, dy, scale, seed=seed, p_a=p if pre_drop else 0.0,
                         p_b=p if post_drop else 0.0, dtype_a=A.dtype, dtype_b=B.dtype)
        return dx, dA, dB
    if need_dA:
        dA = _tl.tn(dyB, x, scale, seed=seed if pre_drop else None, p=p if pre_drop else 0.0, out_dtype=A.dtype)
    if need_dB:
        dB = _tl.tn(xa, dy, scale, seed=seed if post_drop else None, p=p if post_drop else 0.0,
                    transpose_out=True, out_dtype=B.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; fake impls give shapes)
# ----------------------------------------------------------------------------------------
def _fwd_impl(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed):
    if x.shape[0] == 0:
        N = lora_B.shape[0]
        dt = base_out.dtype if base_out is not None else x.dtype
        return x.new_empty((0, N), dtype=dt), x.new_empty((0, lora_A.shape[0]))
    if use_kernels_for(x):
        return on_device_of(x, _tri_fwd, x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed)
    return _ref_fwd(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed)


def _bwd_impl(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB):
    M, K = x.shape
    if M == 0:
        return x.new_zeros((0, K)), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    if use_kernels_for(x):
        return on_device_of(x, _tri_bwd, dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA,
                             need_dB)
    return _ref_bwd(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB)


# Eager calls go straight to the implementations (the custom-op dispatcher costs host time per
# call); under torch.compile the same math is reached through the opaque custom ops below.
@torch.library.custom_op("automodel_lora::lora_fwd", mutates_args=())
def _lora_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    base_out: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: float, p: float, post: bool, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed)


@_lora_fwd_op.register_fake
def _(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed):
    M = x.shape[0]
    dt = base_out.dtype if base_out is not None else x.dtype
    return x.new_empty((M, lora_B.shape[0]), dtype=dt), x.new_empty((M, lora_A.shape[0]))


@torch.library.custom_op("automodel_lora::lora_bwd", mutates_args=())
def _lora_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, xa: torch.Tensor, scale: float, p: float, post: bool,
    seed: Optional[torch.Tensor], need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB = _bwd_impl(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB)
    return (dx if need_dx else x.new_empty((0,)), dA if need_dA else x.new_empty((0,)),
            dB if need_dB else x.new_empty((0,)))


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            torch.empty_like(lora_A) if need_dA else x.new_empty((0,)),
            torch.empty_like(lora_B) if need_dB else x.new_empty((0,)))


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------
def _check(x, lora_A, lora_B, dropout_p, dropout_position):
    if dropout_position not in ("pre", "post"):
        raise ValueError(f"dropout_position must be 'pre' or 'post', got {dropout_position!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    K = x.shape[-1]
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, {K}), got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_B must be (N, {lora_A.shape[0]}), got {tuple(lora_B.shape)}")


def _check_bias(bias, N: int, dtype: torch.dtype) -> None:
    if bias is None:
        return
    if bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise ValueError(f"the base bias must be in x's dtype ({dtype}), got {bias.dtype}; cast it (bias.to(x.dtype))")
    if bias.requires_grad:
        raise ValueError("the base bias is frozen (it gets no gradient), but it requires grad here. Call "
                         ".requires_grad_(False) on it, or compute the base yourself and use lora_add")


def _dequantized(dequantize, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize()``, checked to be the ``(N, K)`` weight in the compute dtype."""
    w = dequantize()
    if w.shape != (N, K) or w.dtype != dtype:
        raise ValueError(f"dequantize() must return the ({N}, {K}) base weight in {dtype} (x's dtype), got "
                         f"{tuple(w.shape)} {w.dtype}")
    return w


class _LoRAFunction(torch.autograd.Function):
    """x: (..., K); base given as (weight, bias), as (dequantize, bias) with ``dequantize()`` returning the
    dense (N, K) weight, or as base_out (..., N); returns y (M, N).

    x and base_out are flattened inside, where grad mode is off (no view nodes for them in the
    graph); the output stays 2-D, so the caller's reshape is an ordinary view of a Function output
    (in-place ops on it work), and 2-D inputs need no reshape at all.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, base_out, lora_A, lora_B, scale, p, post, dequantize):
        seed = None
        if p > 0.0:
            seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
        K = x.shape[-1]
        N = lora_B.shape[0]
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        b2 = base_out if base_out is None or base_out.dim() == 2 else base_out.reshape(-1, N)
        dense = weight if dequantize is None else _dequantized(dequantize, N, K, x.dtype)  # (N, K)
        fwd = _lora_fwd_op if torch.compiler.is_compiling() else _fwd_impl
        y, xa = fwd(x2, dense, bias, b2, lora_A, lora_B, scale, p, post, seed)
        # x2: x itself or a view of it (a copy only for inputs reshape cannot view, which then is not
        # made again in backward).  A dequantized weight is not saved: backward dequantizes again.
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, seed)
        ctx.dequantize = dequantize
        ctx.scale, ctx.p, ctx.post = scale, p, post
        ctx.x_shape = x.shape
        ctx.base_shape = None if base_out is None else base_out.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors  # x: (M, K); dy: (M, N)
        nig = ctx.needs_input_grad
        need_dx, need_dA, need_dB = nig[0], nig[4], nig[5]
        has_base_out = ctx.base_shape is not None
        dx = dA = dB = None
        if need_dx or need_dA or need_dB:
            # base_out may be wider than x (bitsandbytes returns fp32 for fp32 inputs under bf16 autocast)
            dy_c = dy if dy.dtype == x.dtype else dy.to(x.dtype)
            if ctx.dequantize is not None:  # the dense weight only feeds dx
                weight = _dequantized(ctx.dequantize, lora_B.shape[0], x.shape[1], x.dtype) if need_dx else None
            bwd = _lora_bwd_op if torch.compiler.is_compiling() else _bwd_impl
            dx, dA, dB = bwd(
                dy_c, x, None if has_base_out else weight, lora_A, lora_B, xa,
                ctx.scale, ctx.p, ctx.post, seed, need_dx, need_dA, need_dB,
            )
            if need_dx and len(ctx.x_shape) != 2:
                dx = dx.reshape(ctx.x_shape)
        d_base = None
        if has_base_out and nig[3]:
            d_base = dy if len(ctx.base_shape) == 2 else dy.reshape(ctx.base_shape)
        return (dx if need_dx else None), None, None, d_base, \
            (dA if need_dA else None), (dB if need_dB else None), None, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                dropout_position: str = "post") -> torch.Tensor:
    """Adapted linear layer with a frozen dense base.

    Args:
        x: ``(..., K)`` activations (fp32/fp16/bf16; any strides).
        weight: ``(N, K)`` frozen base weight, x's dtype; gets no gradient.
        bias: ``(N,)`` frozen bias or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; may be fp32 while x is bf16/fp16.
        scale: LoRA scale ``alpha / r``.
        dropout_p: inverted-dropout probability (pass 0.0 in eval mode).
        dropout_position: ``"pre"`` (on x before A) or ``"post"`` (on the low-rank term).

    Returns:
        ``(..., N)`` in x.dtype.

    Raises:
        ValueError: on bad shapes, a weight or bias whose dtype is not x's, a base that requires grad,
            dropout_p outside [0, 1) or an unknown dropout_position.
    """
    _check(x, lora_A, lora_B, dropout_p, dropout_position)
    N = lora_B.shape[0]
    if weight.shape != (N, x.shape[-1]):
        raise ValueError(f"weight must be (N, K) = ({N}, {x.shape[-1]}) to match lora_B and x, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_linear computes in x's dtype ({x.dtype}), but weight is {weight.dtype}; cast x (or the "
                         "base layer) so they match, or compute the base yourself and use lora_add")
    if weight.requires_grad:
        raise ValueError("lora_linear's base weight is frozen (it gets no gradient), but it requires grad here. Call "
                         ".requires_grad_(False) on it, or compute the base yourself and use lora_add")
    _check_bias(bias, N, x.dtype)
    y = _LoRAFunction.apply(x, weight, bias, None, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", None)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def lora_linear_dequant(x: torch.Tensor, dequantize: Callable[[], torch.Tensor], bias: Optional[torch.Tensor],
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                        dropout_position: str = "post") -> torch.Tensor:
    """:func:`lora_linear` for a base weight stored compressed (bitsandbytes 4-bit).

    ``dequantize()`` returns the dense ``(N, K)`` frozen weight in x's dtype.  It is called once in forward
    and once in backward (only when dx is needed), as bitsandbytes' own 4-bit matmul does, and the dense
    weight is never saved.  With it the base product runs through the same fused GEMM as a dense base:
    the low-rank term is added inside it (no pass over y or dx for the adapter).

    Raises:
        TypeError: ``dequantize`` is not callable.
        ValueError: as :func:`lora_linear`, and when ``dequantize()`` returns another shape or dtype.
    """
    if not callable(dequantize):
        raise TypeError(f"dequantize must be a callable returning the dense (N, K) weight, got "
                        f"{type(dequantize).__name__}; for a dense weight tensor use lora_linear")
    _check(x, lora_A, lora_B, dropout_p, dropout_position)
    _check_bias(bias, lora_B.shape[0], x.dtype)
    y = _LoRAFunction.apply(x, None, bias, None, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", dequantize)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], lora_B.shape[0])


def lora_add(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             scale: float, dropout_p: float = 0.0, dropout_position: str = "post") -> torch.Tensor:
    """``base_out + low-rank term`` for bases the kernels cannot fuse (4-bit, other subclasses).

    Args:
        base_out: ``(..., N)`` output of the caller's base layer (its autograd adds its own dx).
        x: ``(..., K)``; lora_A ``(r, K)``; lora_B ``(N, r)``; scale, dropout as in :func:`lora_linear`.

    Returns:
        ``(..., N)`` in base_out's dtype; d(base_out) = dy, dx only from the adapter path.
    """
    _check(x, lora_A, lora_B, dropout_p, dropout_position)
    N = lora_B.shape[0]
    lead = x.shape[:-1]
    if base_out.shape != (*lead, N):
        raise ValueError(f"base_out must be {(*lead, N)} (x's leading dims, lora_B's N), got {tuple(base_out.shape)}")
    y = _LoRAFunction.apply(x, None, None, base_out, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", None)
    return y if x.dim() == 2 else y.reshape(*lead, N)
