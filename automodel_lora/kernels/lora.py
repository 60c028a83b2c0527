"""LoRA linear as two torch custom ops (forward, backward) inside one autograd.Function.

    lora_linear: y = x W^T + b + s * (drop(x) A^T) B^T          (dropout_position="pre")
                 y = x W^T + b + drop(s * (x A^T) B^T)           (dropout_position="post")
    lora_linear_dequant: lora_linear with W = dequantize(), called in forward and again in backward
                 (a 4-bit base; the dense W is never saved)
    lora_add:    y = base_out + <the same low-rank term>          (base computed by the caller)
    lora_bias=b_B (HF PEFT's bias on lora_B): the low-rank term is s * (.. B^T + b_B) in each; without
                 post-dropout ``s * b_B`` joins the bias the GEMM epilogue adds (``lora_bias.py``)
    magnitude=m, weight_norm=n (DoRA, ``automodel_lora.dora``): y = f * (x W^T + <term>) + b with f = m / n
                 (N,), n detached; the expand pass that writes y applies f and b, the backward gets
                 dz = dy * f and dm from y itself (``dora_grad.py``); y is saved for that, nothing else

Shapes: x ``(..., K)``, weight ``(N, K)``, bias ``(N,)``, lora_A ``(r, K)``, lora_B ``(N, r)``, lora_bias ``(N,)``,
magnitude ``(N,)``, weight_norm ``(N,)``.
Compute runs in x.dtype with fp32 accumulation; adapter gradients come back in the
adapters' dtype (fp32 master weights work).  Saved for backward: x and ``xa = drop(x) A^T``
``(M, r)`` only (DoRA: y too); the dropout mask is regenerated from a Philox seed.

Backends (chosen per call inside the custom op, so torch.compile sees one opaque op):
  * CUDA + triton, or CPU with ``TRITON_INTERPRET=1`` at import: the Triton kernels, routed by
    ``dispatch.py`` under the call's ``KernelOptions`` (``options=``).  The base GEMM is by default, on
    Hopper for large GEMMs at rank <= 64, a Triton TMA GEMM that takes the low-rank term as an extra
    K step (no pass over y or dx for it); elsewhere, and with dropout on the fused side, it is cuBLAS
    with the low-rank term written first and accumulated through the GEMM's beta=1 epilogue
    (``t.addmm_(x, W^T)``).
  * otherwise: the pure-PyTorch reference math of ``reference.py`` (same autograd.Function).

Nothing here reads process-global policy: every call carries its ``KernelOptions`` (None: the
environment's defaults, ``KernelOptions()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .backend import _options
from .lora_bias import add_dropped_bias_, check_lora_bias, folded_bias, lora_bias_grad, post_keep
from .lora_ops import _bwd_impl, _dora_grad_impl, _dora_grad_op, _fwd_impl, _lora_bwd_op, _lora_fwd_op
from .options import KernelOptions


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


def _check_dora(magnitude, weight_norm, N: int, dropout_p: float, dropout_position: str, lora_bias) -> None:
    """Raise unless ``magnitude`` / ``weight_norm`` are both None or DoRA's ``(N,)`` pair under rules it supports."""
    if magnitude is None and weight_norm is None:
        return
    for name, t in (("magnitude", magnitude), ("weight_norm", weight_norm)):
        if not isinstance(t, torch.Tensor) or t.shape != (N,) or not t.is_floating_point():
            what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"DoRA needs magnitude and weight_norm as floating ({N},) tensors (N = lora_B's out "
                             f"features), got {name} = {what}; pass both, or neither for plain LoRA")
    if weight_norm.requires_grad:
        raise ValueError("weight_norm requires grad, but DoRA's norm is a constant to autograd (PEFT detaches it); "
                         "pass automodel_lora.dora.row_norms(...) or weight_norm.detach()")
    if dropout_p > 0.0 and dropout_position == "pre":
        raise ValueError(f"DoRA with dropout_position='pre' and dropout_p={dropout_p} follows PEFT's rule, a second "
                         "base product on the dropped input, which these functions do not compute; use "
                         "automodel_lora.dora.dora_forward (the DoRA layers do), 'post' dropout or dropout_p=0")
    if lora_bias is not None:
        raise ValueError("DoRA does not take a lora_bias (HF PEFT refuses the pair); pass lora_bias=None")


def _check_dora_base(magnitude, base_bias, base_weight, N: int, K: int) -> None:
    """``lora_add``'s DoRA base: base_weight ``(N, K)`` (required), base_bias ``(N,)`` or None, both floating, and
    neither without a magnitude."""
    if magnitude is None:
        raise ValueError("base_bias and base_weight are DoRA's (the output is rescaled around the base's bias), but "
                         "no magnitude was given; pass magnitude and weight_norm, or neither base_bias nor base_weight")
    if not isinstance(base_weight, torch.Tensor) or base_weight.shape != (N, K) or not base_weight.is_floating_point():
        what = f"{tuple(base_weight.shape)} {base_weight.dtype}" if isinstance(base_weight, torch.Tensor) else repr(base_weight)
        raise ValueError(f"DoRA through lora_add needs base_weight, the base's floating ({N}, {K}) weight (read for "
                         f"columns whose magnitude is 0), got {what}; pass the dense (out, in) weight")
    if base_bias is not None and (base_bias.shape != (N,) or not base_bias.is_floating_point()):
        raise ValueError(f"base_bias must be the floating ({N},) bias base_out includes, got "
                         f"{tuple(base_bias.shape)} {base_bias.dtype}; pass the base layer's bias, or None")


def _dequantized(dequantize, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize()``, checked to be the ``(N, K)`` weight in the compute dtype."""
    w = dequantize()
    if w.shape != (N, K) or w.dtype != dtype:
        raise ValueError(f"dequantize() must return the ({N}, {K}) base weight in {dtype} (x's dtype), got "
                         f"{tuple(w.shape)} {w.dtype}")
    return w


def _dora_scale(magnitude, weight_norm, bias, has_base_out: bool):
    """DoRA's ``(f, epilogue bias)``: f = m / norm ``(N,)`` in fp32 (fp64 for an fp64 norm; detached), and the bias
    the kernel writing y adds after scaling: b, or ``(1 - f) b`` where a caller's base output already holds b
    (f (base - b + t) + b)."""
    acc = torch.promote_types(weight_norm.dtype, torch.float32)
    f = magnitude.detach().to(acc) / weight_norm.to(acc)  # (N,)
    if bias is None or not has_base_out:
        return f, bias
    return f, (1.0 - f) * bias.detach().to(acc)


def _dora_backward(ctx, dy, x, weight, xa, lora_B, seed, y, f, norm, bias, base_weight):
    """``(dz, dm, d bias)`` of a DoRA call: dz = dy * f ``(M, N)``, dm ``(N,)`` in the magnitude's dtype (None unless
    needed), and for a caller's base output with a trainable bias the part of its gradient that bypasses that
    base, ``(1 - f) * sum_i dy_i`` (its own graph gives the ``f * sum_i dy_i`` rest through dz)."""
    nig = ctx.needs_input_grad
    if base_weight is not None:
        weight = base_weight
    args = (dy, y, f, bias, norm, x, weight, xa, lora_B, ctx.scale, ctx.p, ctx.post, seed)
    opts = ctx.options
    if torch.compiler.is_compiling():
        dz, dm = _dora_grad_op(*args, opts.base_gemm, opts.fuse_proj, opts.fast_launch)
    else:
        dz, dm = _dora_grad_impl(*args, opts)
    d_bias = None
    if nig[2] and ctx.base_shape is not None:
        d_bias = (dy.sum(0, dtype=torch.float32) * (1.0 - f)).to(ctx.bias_dtype)
    return dz, (dm.to(ctx.magnitude_dtype) if nig[12] else None), d_bias


class _LoRAFunction(torch.autograd.Function):
    """x: (..., K); base given as (weight, bias), as (dequantize, bias) with ``dequantize()`` returning the
    dense (N, K) weight, or as base_out (..., N); returns y (M, N).  DoRA with ``magnitude`` and ``weight_norm``
    (N,) (``base_weight`` (N, K): the caller's base weight, with base_out only; bias: b of its base).

    x and base_out are flattened inside, where grad mode is off (no view nodes for them in the
    graph); the output stays 2-D, so the caller's reshape is an ordinary view of a Function output
    (in-place ops on it work; not under DoRA, whose backward reads y), and 2-D inputs need no reshape at all.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, base_out, lora_A, lora_B, scale, p, post, dequantize, options, lora_bias,
                magnitude=None, weight_norm=None, base_weight=None):
        seed = None
        if p > 0.0:
            seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
        K = x.shape[-1]
        N = lora_B.shape[0]
        drop_bias = lora_bias is not None and post and p > 0.0  # the mask covers s * b_B: not foldable
        if lora_bias is not None and not drop_bias:  # s * b_B joins the bias the GEMM epilogue (or expand) adds
            bias = folded_bias(bias, lora_bias, scale, x.dtype if base_out is None else base_out.dtype)
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        b2 = base_out if base_out is None or base_out.dim() == 2 else base_out.reshape(-1, N)
        dense = weight if dequantize is None else _dequantized(dequantize, N, K, x.dtype)  # (N, K)
        f = None
        epilogue_bias = bias
        if magnitude is not None:
            f, epilogue_bias = _dora_scale(magnitude, weight_norm, bias, base_out is not None)
        if torch.compiler.is_compiling():
            y, xa = _lora_fwd_op(x2, dense, epilogue_bias, b2, lora_A, lora_B, scale, p, post, seed,
                                 options.base_gemm, options.fuse_proj, options.fast_launch, f)
        else:
            y, xa = _fwd_impl(x2, dense, epilogue_bias, b2, lora_A, lora_B, scale, p, post, seed, options, f)
        if drop_bias:
            y = add_dropped_bias_(y, post_keep(seed, y.shape[0], N, p), lora_bias, scale, p)
        # x2: x itself or a view of it (a copy only for inputs reshape cannot view, which then is not
        # made again in backward).  A dequantized weight is not saved: backward dequantizes again.
        # DoRA saves its own output y (no copy: the tensor returned) to recover z = (y - b) / f.
        dora = (y, f, weight_norm, bias, base_weight) if f is not None else (None,) * 5
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, seed, *dora)
        ctx.dora = f is not None
        ctx.magnitude_dtype = None if magnitude is None else magnitude.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.dequantize = dequantize
        ctx.scale, ctx.p, ctx.post, ctx.options = scale, p, post, options
        ctx.x_shape = x.shape
        ctx.base_shape = None if base_out is None else base_out.shape
        ctx.lora_bias_dtype = None if lora_bias is None else lora_bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed, *dora = ctx.saved_tensors  # x: (M, K); dy: (M, N)
        nig = ctx.needs_input_grad
        need_dx, need_dA, need_dB = nig[0], nig[4], nig[5]
        has_base_out = ctx.base_shape is not None
        dx = dA = dB = dm = d_bias = None
        if ctx.dequantize is not None and (need_dx or ctx.dora):  # the dense weight feeds dx (and DoRA's f = 0)
            weight = _dequantized(ctx.dequantize, lora_B.shape[0], x.shape[1], x.dtype)
        if ctx.dora:  # from here on the LoRA backward of z, with dz = dy * f
            dy, dm, d_bias = _dora_backward(ctx, dy, x, weight, xa, lora_B, seed, *dora)
        if need_dx or need_dA or need_dB:
            # base_out may be wider than x (bitsandbytes returns fp32 for fp32 inputs under bf16 autocast)
            dy_c = dy if dy.dtype == x.dtype else dy.to(x.dtype)
            args = (dy_c, x, None if has_base_out else weight, lora_A, lora_B, xa, ctx.scale, ctx.p, ctx.post, seed,
                    need_dx, need_dA, need_dB)
            opts = ctx.options
            if torch.compiler.is_compiling():
                dx, dA, dB = _lora_bwd_op(*args, opts.base_gemm, opts.fuse_proj, opts.fast_launch)
            else:
                dx, dA, dB = _bwd_impl(*args, opts)
            if need_dx and len(ctx.x_shape) != 2:
                dx = dx.reshape(ctx.x_shape)
        d_base = None
        if has_base_out and nig[3]:
            d_base = dy if len(ctx.base_shape) == 2 else dy.reshape(ctx.base_shape)
        d_lora_bias = None
        if nig[11]:  # the bias's whole backward cost: one reduction over dy (and the mask with post-dropout)
            keep = post_keep(seed, dy.shape[0], dy.shape[1], ctx.p) if ctx.post and ctx.p > 0.0 else None
            d_lora_bias = lora_bias_grad(dy, ctx.scale, ctx.lora_bias_dtype, keep, ctx.p)
        return (dx if need_dx else None), None, d_bias, d_base, \
            (dA if need_dA else None), (dB if need_dB else None), None, None, None, None, None, d_lora_bias, \
            dm, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                dropout_position: str = "post", *, options: Optional[KernelOptions] = None,
                lora_bias: Optional[torch.Tensor] = None, magnitude: Optional[torch.Tensor] = None,
                weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adapted linear layer with a frozen dense base.

    Args:
        x: ``(..., K)`` activations (fp32/fp16/bf16; any strides).
        weight: ``(N, K)`` frozen base weight, x's dtype; gets no gradient.
        bias: ``(N,)`` frozen bias or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; may be fp32 while x is bf16/fp16.
        scale: LoRA scale ``alpha / r``.
        dropout_p: inverted-dropout probability (pass 0.0 in eval mode).
        dropout_position: ``"pre"`` (on x before A) or ``"post"`` (on the low-rank term).
        options: how the Triton path runs this call (:class:`KernelOptions`); None: ``KernelOptions()``,
            the environment's defaults.  The PyTorch reference path ignores it.
        lora_bias: ``(N,)`` bias of lora_B (HF PEFT's ``lora_bias``), trainable, any float dtype, or None:
            the term becomes ``s * (.. B^T + lora_bias)``, dropped with the rest under "post" dropout.
        magnitude: DoRA's ``(N,)`` magnitude m (trainable, any float dtype), with ``weight_norm``, the detached
            ``(N,)`` ``||W + s B A||_row`` (``automodel_lora.dora.row_norms``): the output becomes
            ``m / weight_norm * (x W^T + term) + bias``.  Not with "pre" dropout at p > 0 nor with lora_bias.
            The output is saved for backward (dm is recovered from it): do not modify it in place.

    Returns:
        ``(..., N)`` in x.dtype.

    Raises:
        ValueError: on bad shapes, a weight or bias whose dtype is not x's, a base that requires grad,
            dropout_p outside [0, 1), an unknown dropout_position, or DoRA inputs ``_check_dora`` refuses.
        TypeError: ``options`` is not a KernelOptions.
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
    if lora_bias is not None:  # no function call on the hot path without a bias
        check_lora_bias(lora_bias, N)
    if magnitude is not None or weight_norm is not None:
        _check_dora(magnitude, weight_norm, N, dropout_p, dropout_position, lora_bias)
    y = _LoRAFunction.apply(x, weight, bias, None, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", None, _options(options), lora_bias, magnitude, weight_norm)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


def lora_linear_dequant(x: torch.Tensor, dequantize: Callable[[], torch.Tensor], bias: Optional[torch.Tensor],
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                        dropout_position: str = "post", *, options: Optional[KernelOptions] = None,
                        lora_bias: Optional[torch.Tensor] = None, magnitude: Optional[torch.Tensor] = None,
                        weight_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`lora_linear` for a base weight stored compressed (bitsandbytes 4-bit).

    ``dequantize()`` returns the dense ``(N, K)`` frozen weight in x's dtype.  It is called once in forward
    and once in backward (only when dx is needed, and always with DoRA), as bitsandbytes' own 4-bit matmul does,
    and the dense weight is never saved.  With it the base product runs through the same fused GEMM as a dense
    base: the low-rank term is added inside it (no pass over y or dx for the adapter).  ``options``,
    ``lora_bias``, ``magnitude`` and ``weight_norm`` as in :func:`lora_linear`.

    Raises:
        TypeError: ``dequantize`` is not callable, or ``options`` is not a KernelOptions.
        ValueError: as :func:`lora_linear`, and when ``dequantize()`` returns another shape or dtype.
    """
    if not callable(dequantize):
        raise TypeError(f"dequantize must be a callable returning the dense (N, K) weight, got "
                        f"{type(dequantize).__name__}; for a dense weight tensor use lora_linear")
    _check(x, lora_A, lora_B, dropout_p, dropout_position)
    _check_bias(bias, lora_B.shape[0], x.dtype)
    if lora_bias is not None:
        check_lora_bias(lora_bias, lora_B.shape[0])
    if magnitude is not None or weight_norm is not None:
        _check_dora(magnitude, weight_norm, lora_B.shape[0], dropout_p, dropout_position, lora_bias)
    y = _LoRAFunction.apply(x, None, bias, None, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", dequantize, _options(options), lora_bias, magnitude,
                            weight_norm)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], lora_B.shape[0])


def lora_add(base_out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             scale: float, dropout_p: float = 0.0, dropout_position: str = "post", *,
             options: Optional[KernelOptions] = None, lora_bias: Optional[torch.Tensor] = None,
             magnitude: Optional[torch.Tensor] = None, weight_norm: Optional[torch.Tensor] = None,
             base_bias: Optional[torch.Tensor] = None, base_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base_out + low-rank term`` for bases the kernels cannot fuse (4-bit, other subclasses).

    Args:
        base_out: ``(..., N)`` output of the caller's base layer (its autograd adds its own dx).
        x: ``(..., K)``; lora_A ``(r, K)``; lora_B ``(N, r)``; scale, dropout, options, lora_bias, magnitude,
            weight_norm as in :func:`lora_linear` (without post-dropout ``s * lora_bias`` is added in the same
            pass as the term).
        base_bias: with DoRA, the ``(N,)`` bias b that ``base_out`` includes (None: none): the output is
            ``f * (base_out - b + term) + b``; it may be trainable.
        base_weight: with DoRA, the base's ``(N, K)`` weight (any float dtype, read only in backward for
            columns whose magnitude is 0; required).

    Returns:
        ``(..., N)`` in base_out's dtype; d(base_out) = dy (DoRA: dy * f), dx only from the adapter path.
    """
    _check(x, lora_A, lora_B, dropout_p, dropout_position)
    N = lora_B.shape[0]
    lead = x.shape[:-1]
    if base_out.shape != (*lead, N):
        raise ValueError(f"base_out must be {(*lead, N)} (x's leading dims, lora_B's N), got {tuple(base_out.shape)}")
    if lora_bias is not None:
        check_lora_bias(lora_bias, N)
    if magnitude is not None or weight_norm is not None or base_bias is not None or base_weight is not None:
        _check_dora(magnitude, weight_norm, N, dropout_p, dropout_position, lora_bias)
        _check_dora_base(magnitude, base_bias, base_weight, N, x.shape[-1])
    y = _LoRAFunction.apply(x, None, base_bias, base_out, lora_A, lora_B, float(scale), float(dropout_p),
                            dropout_position == "post", None, _options(options), lora_bias, magnitude, weight_norm,
                            base_weight)
    return y if x.dim() == 2 else y.reshape(*lead, N)
