"""LoRA on rows grouped by an index (MoE experts, or adapters per sequence), forward and backward:

    y[s] = base[s] + scale * (x[s] A_g^T) B_g^T                 g = ids[s]; rows sorted by g
    x (S, K), A (G, r, K), B (G, N, r), base (S, N): the grouped base product, computed by the caller

    forward:   xa = segment_mm(x, A)                      (S, r), kept for dB
               y  = segment_mm(xa, B, scale, add=base)    one pass over y, adding into the base output
    backward:  dyB = segment_mm(dy, B^T)                  (S, r)
               dx  = segment_mm(dyB, A^T, scale)          (S, K), the adapter's share (autograd adds the base's)
               dA  = segment_tn(dyB, x, scale)            (G, r, K), per group, deterministic
               dB  = segment_tn(dy, xa, scale)            (G, N, r)
               dbase = dy

Saved for backward: x (which the grouped base product keeps anyway), A, B, the (S, r) projection and the
ids / offsets. ``xa`` and ``dyB`` are rounded to the activations' dtype, as on the linear path; adapter
weights of another dtype (fp32 masters) are cast per tile, their gradients written in their dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .segment_mm import segment_mm
from .segment_tn import segment_tn

__all__ = ["SegmentedLoRA", "segmented_lora"]


class SegmentedLoRA(torch.autograd.Function):
    """``base + scale * (x A_g^T) B_g^T`` per row group (module docstring); not twice differentiable."""

    @staticmethod
    def forward(ctx, x, A, B, base, ids, offsets, scale: float, fast: bool):
        xa = segment_mm(x, A, ids, fast_launch=fast)  # (S, r)
        y = segment_mm(xa, B, ids, scale, add=base, fast_launch=fast)  # (S, N)
        ctx.save_for_backward(x, A, B, xa, ids, offsets)
        ctx.scale, ctx.fast = scale, fast
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, A, B, xa, ids, offsets = ctx.saved_tensors
        s, fast = ctx.scale, ctx.fast
        need_x, need_A, need_B, need_base = ctx.needs_input_grad[:4]
        dyB = segment_mm(dy, B.transpose(1, 2), ids, out_dtype=dy.dtype, fast_launch=fast) \
            if need_x or need_A else None  # (S, r)
        dx = segment_mm(dyB, A.transpose(1, 2), ids, s, out_dtype=x.dtype, fast_launch=fast) if need_x else None
        dA = segment_tn(dyB, x, offsets, s, out_dtype=A.dtype, fast_launch=fast) if need_A else None  # (G, r, K)
        dB = segment_tn(dy, xa, offsets, s, out_dtype=B.dtype, fast_launch=fast) if need_B else None  # (G, N, r)
        return dx, dA, dB, dy if need_base else None, None, None, None, None


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor, ids: torch.Tensor,
                   offsets: torch.Tensor, scale: float, fast_launch: bool = True) -> torch.Tensor:
    """``base + scale * (x A_g^T) B_g^T`` with ``g = ids[s]`` per row (see the module docstring).

    Args:
        x: (S, K) rows sorted by group. A: (G, r, K). B: (G, N, r). base: (S, N).
        ids: (S,) ascending group ids. offsets: (G,) int cumulative row counts (``group_offsets``).
        scale: the adapter's scale.
        fast_launch: as ``KernelOptions.fast_launch``.
    """
    return SegmentedLoRA.apply(x, A, B, base, ids, offsets, float(scale), bool(fast_launch))  # the kernels read any strides
