"""Segmented product: every row times the matrix of its group, optionally added to another tensor.

    out[s] = add[s] + scale * x[s] @ w[ids[s]]^T          x (S, K), w (G, N, K), ids (S,) ascending

Rows are usually sorted by group (``ids`` ascending; a group may have no rows), which keeps each program to
one or two groups; any order is computed correctly, and a row with a negative id, or one of G or more, gets no product (``add``
alone, or zero: a sequence without an adapter in a mixed batch, a routing sentinel). This is the low-rank half of LoRA
on MoE experts (rows = token-expert pairs sorted by expert) and of a batch mixing adapters (rows sorted by
adapter): the shrink ``x A_g^T`` (N = r small, K large) and the expand ``xa B_g^T`` added into the base
output (K = r small, N large) are the same op with other tile shapes.

One program per (BM rows, BN columns): its rows span the groups ``ids[first] .. ids[last]`` (one or two,
unless groups are smaller than BM); for each, the rows of that group are read (the others masked to zero)
and multiplied by that group's tile of ``w``, accumulated in fp32, and the sum is written once. No atomics:
deterministic. ``w`` is read through its strides, so a transposed view (``B^T``, ``A^T``) costs no copy.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, on_device_of

if HAS_TRITON:  # the callers check use_kernels_for() first: without triton nothing here runs
    import triton
    import triton.language as tl

    from .launch import INTERPRET, cdiv, dot_prec, launch_fixed

    @triton.jit
    def _segment_mm_kernel(x_ptr, w_ptr, ids_ptr, add_ptr, out_ptr, S, N, K, G, scale,
                           sxm, sxk, swg, swn, swk, sam, san, som, son,
                           HAS_ADD: tl.constexpr, PREC: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok, col_ok = rm < S, rn < N
        ids = tl.load(ids_ptr + rm, mask=row_ok, other=-1)
        first = tl.maximum(tl.min(tl.where(row_ok, ids, 2147483647)), 0)  # a negative id: no group, no product
        last = tl.minimum(tl.max(ids), G - 1)  # an id past the groups (a routing sentinel): no product either
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for g in range(first, last + 1):
            sel = row_ok & (ids == g)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk,
                             mask=sel[:, None] & (rk[None, :] < K), other=0.0)
                wt = tl.load(w_ptr + tl.cast(g, tl.int64) * swg + rn[None, :] * swn + rk[:, None] * swk,
                             mask=col_ok[None, :] & (rk[:, None] < K), other=0.0)  # (BK, BN) = w[g]^T tile
                acc += tl.dot(xt, wt.to(xt.dtype), input_precision=PREC)
        acc = acc * scale
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_ADD:
            acc += tl.load(add_ptr + rm[:, None].to(tl.int64) * sam + rn[None, :] * san, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(N: int, K: int) -> tuple[int, int, int]:
    """(BM, BN, BK): a skinny output (the shrink) takes all of N in one tile and long K steps; a skinny K (the
    expand) one K step and wide N tiles. tl.dot needs every tile dimension >= 16."""
    if INTERPRET:
        return 16, 16, 16
    bn = 16 if N <= 16 else 32 if N <= 32 else 64 if N <= 64 else 128
    bk = 16 if K <= 16 else 32 if K <= 32 else 64 if K <= 64 else 128
    return 64, bn, bk


def segment_mm(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale: float = 1.0,
               add: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               fast_launch: bool = True) -> torch.Tensor:
    """``out (S, N) = add + scale * x[s] @ w[ids[s]]^T`` (see the module docstring); fp32 accumulation.

    Args:
        x: (S, K) rows, best sorted by group. w: (G, N, K), any strides. ids: (S,) int in [0, G), or < 0 for none.
        add: (S, N) added to the product (the base output), or None.
        out_dtype: the result's dtype (default: ``add``'s, else ``x``'s).
        fast_launch: as ``KernelOptions.fast_launch`` (a repeat call launches the compiled kernel directly).

    Raises:
        ValueError: shapes that do not chain.
    """
    S, K = x.shape
    G, N, K2 = w.shape
    if K2 != K or ids.shape != (S,) or (add is not None and add.shape != (S, N)):
        raise ValueError(f"segment_mm: x {tuple(x.shape)}, w {tuple(w.shape)}, ids {tuple(ids.shape)}"
                         f"{'' if add is None else f', add {tuple(add.shape)}'} do not chain; expected x (S, K), "
                         "w (G, N, K), ids (S,), add (S, N)")
    out = torch.empty(S, N, device=x.device, dtype=out_dtype or (add.dtype if add is not None else x.dtype))
    if S == 0 or N == 0:
        return out
    BM, BN, BK = _tiles(N, K)
    a = add if add is not None else out  # a placeholder pointer when HAS_ADD is off
    ptrs = (x, w, ids, a, out)
    scalars = (S, N, K, G, float(scale), *x.stride(), *w.stride(), *a.stride(), *out.stride())
    on_device_of(x, launch_fixed, _segment_mm_kernel, (cdiv(S, BM), cdiv(N, BN)), dict(BM=BM, BN=BN, BK=BK), ptrs,
                 scalars, dict(HAS_ADD=add is not None, PREC=dot_prec(x.dtype)), fast_launch)
    return out
