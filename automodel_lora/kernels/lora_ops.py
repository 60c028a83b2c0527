"""The LoRA linear's forward, backward and DoRA gradient as torch custom ops (opaque to torch.compile).

Eager calls go straight to the ``_*_impl`` functions (the custom-op dispatcher costs host time per call);
under torch.compile the same math is reached through the custom ops, whose schemas take the
``KernelOptions`` as its three plain fields (base_gemm, fuse_proj, fast_launch). Each implementation runs
the Triton route of ``dispatch.py`` where ``use_kernels_for`` holds, else ``reference.py``'s math.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import _op_options, dora_grad, on_device_of, triton_backward, triton_forward, use_kernels_for
from .reference import reference_backward, reference_dora_grad, reference_forward


def _fwd_impl(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed, options, col_scale=None):
    if x.shape[0] == 0:
        N = lora_B.shape[0]
        dt = base_out.dtype if base_out is not None else x.dtype
        return x.new_empty((0, N), dtype=dt), x.new_empty((0, lora_A.shape[0]))
    if use_kernels_for(x):
        return on_device_of(x, triton_forward, x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed,
                            options, col_scale)
    return reference_forward(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed, col_scale)


def _bwd_impl(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB, options):
    M, K = x.shape
    if M == 0:
        return x.new_zeros((0, K)), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    if use_kernels_for(x):
        return on_device_of(x, triton_backward, dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx,
                            need_dA, need_dB, options)
    return reference_backward(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB)


def _dora_grad_impl(dy, y, f, bias, norm, x, weight, xa, lora_B, scale, p, post, seed, options):
    """DoRA's ``(dz (M, N), dm (N,) fp32)`` (``dora_grad.py``); ``p`` is the post-dropout's (0 with "pre")."""
    post_p = p if post else 0.0
    if use_kernels_for(x):
        return on_device_of(x, dora_grad, dy, y, f, bias, norm, x, weight, xa, lora_B, scale,
                            seed if post_p else None, post_p, options.fast_launch)
    return reference_dora_grad(dy, y, f, bias, norm, x, weight, xa, lora_B, scale, post_p, True, seed)


# Eager calls go straight to the implementations (the custom-op dispatcher costs host time per
# call); under torch.compile the same math is reached through the opaque custom ops below.  Their
# schema takes the KernelOptions as its three plain fields (base_gemm, fuse_proj, fast_launch).
@torch.library.custom_op("automodel_lora::lora_fwd", mutates_args=())
def _lora_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    base_out: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: float, p: float, post: bool, seed: Optional[torch.Tensor],
    base_gemm: str, fuse_proj: bool, fast_launch: bool, col_scale: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed,
                     _op_options(base_gemm, fuse_proj, fast_launch), col_scale)


@_lora_fwd_op.register_fake
def _(x, weight, bias, base_out, lora_A, lora_B, scale, p, post, seed, base_gemm, fuse_proj, fast_launch, col_scale):
    M = x.shape[0]
    dt = base_out.dtype if base_out is not None else x.dtype
    return x.new_empty((M, lora_B.shape[0]), dtype=dt), x.new_empty((M, lora_A.shape[0]))


@torch.library.custom_op("automodel_lora::lora_bwd", mutates_args=())
def _lora_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, xa: torch.Tensor, scale: float, p: float, post: bool,
    seed: Optional[torch.Tensor], need_dx: bool, need_dA: bool, need_dB: bool,
    base_gemm: str, fuse_proj: bool, fast_launch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB = _bwd_impl(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB,
                           _op_options(base_gemm, fuse_proj, fast_launch))
    return (dx if need_dx else x.new_empty((0,)), dA if need_dA else x.new_empty((0,)),
            dB if need_dB else x.new_empty((0,)))


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scale, p, post, seed, need_dx, need_dA, need_dB, base_gemm, fuse_proj,
      fast_launch):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            torch.empty_like(lora_A) if need_dA else x.new_empty((0,)),
            torch.empty_like(lora_B) if need_dB else x.new_empty((0,)))


@torch.library.custom_op("automodel_lora::dora_grad", mutates_args=())
def _dora_grad_op(
    dy: torch.Tensor, y: torch.Tensor, f: torch.Tensor, bias: Optional[torch.Tensor], norm: torch.Tensor,
    x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scale: float, p: float,
    post: bool, seed: Optional[torch.Tensor], base_gemm: str, fuse_proj: bool, fast_launch: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dora_grad_impl(dy, y, f, bias, norm, x, weight, xa, lora_B, scale, p, post, seed,
                           _op_options(base_gemm, fuse_proj, fast_launch))


@_dora_grad_op.register_fake
def _(dy, y, f, bias, norm, x, weight, xa, lora_B, scale, p, post, seed, base_gemm, fuse_proj, fast_launch):
    return dy.new_empty(dy.shape), f.new_empty(f.shape)

