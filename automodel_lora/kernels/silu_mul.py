"""The gated product of an MLP, ``h = act(g) * u``, keeping only ``g`` and ``u`` for backward.

    activation="silu":       act(g) = g * s,   s = sigmoid(g)
    activation="gelu_tanh":  act(g) = g * t,   t = sigmoid(2k (g + c g^3)),  k = sqrt(2 / pi), c = 0.044715
                             (= 0.5 g (1 + tanh(k (g + c g^3))): ``F.gelu(approximate="tanh")``, Gemma's
                             ``gelu_pytorch_tanh``)
    backward, from dh:       du = dh * act(g)
                             dg = dh * u * act'(g),  silu'(g) = s + g s (1 - s)
                                                     gelu_tanh'(g) = t + g t (1 - t) 2k (1 + 3c g^2)

Shapes: g, u, h, dh, dg, du ``(..., I)``, all of one shape and dtype (fp32, fp16 or bf16).

Why: autograd on ``act(g) * u`` keeps three ``(tokens, I)`` tensors from forward to backward: g (for the
activation's backward), act(g) and u (for the product's). This op keeps g and u and makes act(g) again
in backward: one sigmoid per element, no extra bytes (the backward pass reads dh, g and u once and writes
dg and du: five passes over ``(tokens, I)`` tensors where autograd's two backward ops make nine). In bf16
that is ``tokens * I * 2`` bytes fewer per MLP: 64 MiB per layer of Llama-3.2-1B at 4096 tokens.

Backends, inside one autograd.Function:
  * ``use_triton=True`` on CUDA with Triton (or on the CPU under ``TRITON_INTERPRET=1``): one elementwise
    pass forward (read g, u; write h) and one backward (read dh, g, u; write dg, du), the math in fp32 and
    every result rounded once to the inputs' dtype. ``F.silu(g) * u`` rounds act(g) to that dtype before
    the product, so the two differ by up to one unit of the format's rounding (eps: bf16 7.8e-3, fp16
    9.8e-4) relative per element; in fp32 by the ulps of two ``exp`` implementations (~1e-6 relative).
    dg carries the same relative bound plus an absolute part of the same size against ``max |dg|``: act'
    crosses zero (SiLU near g = -1.28) where no relative bound holds. Tests: ``tests/test_silu_mul.py``.
  * elsewhere: ``reference.py``'s math, equal to autograd's ``act(g) * u`` bit for bit (it runs the
    same ops), still saving only g and u.

Non-contiguous g, u or dh are copied to contiguous tensors first (the kernels read flat buffers); the
copies are what is saved. Under ``torch.compile`` or a ``torch.func`` transform the plain ``act(g) * u``
runs (the compiler fuses it and makes its own recompute choices; the transforms would need this
Function's ``setup_context``). Not twice differentiable (``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backend import HAS_TRITON, on_device_of, use_kernels_for
from .reference import GATED_ACTIVATIONS, reference_act_mul, reference_act_mul_backward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUNCTORCH_LEVEL = getattr(torch._C._functorch, "peek_interpreter_stack", None)

if HAS_TRITON:  # triton is optional: without it the reference math runs everywhere
    import triton
    import triton.language as tl

    from .launch import bench, cdiv, configs, launch, m_bucket, run_cached

    @triton.jit
    def _gate(g, GELU: tl.constexpr):
        """``(act(g), t)`` for fp32 ``g``: ``act(g) = g * t``, ``t = sigmoid(g)`` or, for the tanh GELU,
        ``sigmoid(2k (g + c g^3))`` (2k = 1.5957691216057308)."""
        if GELU:
            t = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        else:
            t = tl.sigmoid(g)
        return g * t, t

    @triton.jit
    def _act_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2**31
        ok = offs < n
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a, _ = _gate(g, GELU)
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _act_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, GELU: tl.constexpr, DG: tl.constexpr,
                            DU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a, t = _gate(g, GELU)
        if DG:  # u is read only for dg (it is not saved where dg is not needed)
            u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if GELU:
                da = t + g * t * (1.0 - t) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)  # 3c = 0.134145
            else:
                da = t + a * (1.0 - t)
            tl.store(dg_ptr + offs, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=ok)
        if DU:
            tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=ok)

    # Elementwise and bandwidth-bound: blocks of 1-4K elements (2-8 KB of bf16 per operand per program).
    _SPACE = [(dict(BLOCK=1024), 4, 1), (dict(BLOCK=2048), 8, 1), (dict(BLOCK=4096), 8, 1), (dict(BLOCK=1024), 8, 1)]
    _fwd_tuned = triton.autotune(configs=configs(_SPACE), key=["n", "GELU"], do_bench=bench)(_act_mul_fwd_kernel)
    _bwd_tuned = triton.autotune(configs=configs(_SPACE), key=["n", "GELU", "DG", "DU"],
                                 do_bench=bench)(_act_mul_bwd_kernel)
    _FIXED = dict(BLOCK=64)  # the interpreter's block: the small test shapes span several programs

    def act_mul_forward(g: torch.Tensor, u: torch.Tensor, gelu: bool, fast_launch: bool) -> torch.Tensor:
        """``h = act(g) * u`` for contiguous g, u of one shape and dtype -> h like g; ``fast_launch`` as
        ``KernelOptions.fast_launch``."""
        h = torch.empty_like(g)
        n = g.numel()
        if n == 0:
            return h
        ptrs = (g, u, h)
        sig = ("act_mul_fwd", g.get_device(), n, g.dtype, gelu)
        if run_cached(sig, ptrs, fast=fast_launch):
            return h
        launch("act_mul_fwd", _fwd_tuned, _act_mul_fwd_kernel, lambda meta: (cdiv(n, meta["BLOCK"]),), _FIXED,
               (m_bucket(n), g.dtype, gelu), ptrs, (n,), dict(GELU=gelu), sig, fast_launch)
        return h

    def act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor | None, gelu: bool, need_dg: bool,
                         need_du: bool, fast_launch: bool):
        """``(dg, du)`` for contiguous dh, g (and u, needed for dg only) of one shape and dtype; a gradient not
        asked for is None."""
        dg = torch.empty_like(g) if need_dg else None
        du = torch.empty_like(g) if need_du else None
        n = g.numel()
        if n == 0 or not (need_dg or need_du):
            return dg, du
        ptrs = (dh, g, dh if u is None else u, dh if dg is None else dg, dh if du is None else du)  # dh: unused slots
        sig = ("act_mul_bwd", g.get_device(), n, g.dtype, gelu, need_dg, need_du)
        if run_cached(sig, ptrs, fast=fast_launch):
            return dg, du
        launch("act_mul_bwd", _bwd_tuned, _act_mul_bwd_kernel, lambda meta: (cdiv(n, meta["BLOCK"]),), _FIXED,
               (m_bucket(n), g.dtype, gelu, need_dg, need_du), ptrs, (n,), dict(GELU=gelu, DG=need_dg, DU=need_du),
               sig, fast_launch)
        return dg, du


class _ActMulFunction(torch.autograd.Function):
    """g, u: ``(..., I)`` contiguous, one dtype -> h ``(..., I)``. Saves g, and u only where dg is needed."""

    @staticmethod
    def forward(ctx, g, u, activation: str, kernels: bool, fast_launch: bool):
        if kernels:
            h = on_device_of(g, act_mul_forward, g, u, activation == "gelu_tanh", fast_launch)
        else:
            h = reference_act_mul(g, u, activation)
        ctx.save_for_backward(g, u if ctx.needs_input_grad[0] else None)
        ctx.activation, ctx.kernels, ctx.fast_launch = activation, kernels, fast_launch
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        need_dg, need_du = ctx.needs_input_grad[:2]
        if ctx.kernels:
            dg, du = on_device_of(g, act_mul_backward, dh.contiguous(), g, u, ctx.activation == "gelu_tanh", need_dg,
                                  need_du, ctx.fast_launch)
        else:
            dg, du = reference_act_mul_backward(dh, g, u, ctx.activation, need_dg, need_du)
        return dg, du, None, None, None


def silu_mul(g: torch.Tensor, u: torch.Tensor, *, activation: str = "silu", use_triton: bool = True,
             fast_launch: bool = True) -> torch.Tensor:
    """``act(g) * u`` that keeps only ``g`` and ``u`` for backward (``act(g)`` is made again there).

    Args:
        g: ``(..., I)`` the gate projection's output (fp32, fp16 or bf16; any strides: a non-contiguous
            tensor is copied first).
        u: ``(..., I)`` the up projection's output, g's shape, dtype and device.
        activation: ``"silu"`` (Llama, Mistral, Qwen) or ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``:
            Gemma's ``gelu_pytorch_tanh``).
        use_triton: run the Triton kernels where they run (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
            False: the PyTorch math everywhere.
        fast_launch: as ``KernelOptions.fast_launch``.

    Returns:
        ``(..., I)`` in g's dtype. The Triton path differs from ``act(g) * u`` by up to one unit of the
        format's rounding (module docstring); the PyTorch path equals it bit for bit.

    Raises:
        ValueError: an unknown ``activation``, or g and u of different shapes, dtypes or devices, or a dtype
            other than fp32 / fp16 / bf16.
    """
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(GATED_ACTIVATIONS)}, got {activation!r}; compute "
                         "other activations as act(g) * u")
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"g and u must have one shape, dtype and device, got g {tuple(g.shape)} {g.dtype} {g.device} "
                         f"and u {tuple(u.shape)} {u.dtype} {u.device}; cast or reshape them to match")
    if g.dtype not in DTYPES:
        raise ValueError(f"silu_mul computes in fp32, fp16 or bf16, got {g.dtype}; cast g and u (e.g. .float())")
    if torch.compiler.is_compiling() or (_FUNCTORCH_LEVEL is not None and _FUNCTORCH_LEVEL() is not None):
        return reference_act_mul(g, u, activation)
    kernels = use_triton and use_kernels_for(g)
    return _ActMulFunction.apply(g.contiguous(), u.contiguous(), activation, kernels, fast_launch)
