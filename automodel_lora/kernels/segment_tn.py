"""Segmented reduction: per group, the sum over its rows of an outer product.

    out[g] = scale * sum_{s in group g} a[s]^T b[s]        a (S, N), b (S, K), out (G, N, K)

with the groups' rows contiguous (``offsets[g]`` the cumulative row count up to and including group g).
The weight gradients of LoRA on MoE experts: ``dA_g = s * sum dyB[s]^T x[s]`` (N = r) and
``dB_g = s * sum dy[s]^T xa[s]`` (K = r).

One program per (group, BN x BK tile of out): it walks its group's rows in BM steps and writes its tile
once; an empty group writes zeros. Deterministic (no atomics, a fixed order per tile). A long group
keeps one program busy for its whole length: with heavily imbalanced routing the longest group bounds
the time.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, on_device_of

if HAS_TRITON:  # the callers check use_kernels_for() first: without triton nothing here runs
    import triton
    import triton.language as tl

    from .launch import INTERPRET, cdiv, dot_prec, launch_fixed

    @triton.jit
    def _segment_tn_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, N, K, scale,
                           sam, san, sbm, sbk, sog, son, sok, PREC: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        g = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.program_id(2) * BK + tl.arange(0, BK)
        start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(offsets_ptr + g)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for m0 in range(start, end, BM):
            rm = m0 + tl.arange(0, BM)
            ok = rm < end
            at = tl.load(a_ptr + rm[None, :].to(tl.int64) * sam + rn[:, None] * san,
                         mask=ok[None, :] & (rn[:, None] < N), other=0.0)  # (BN, BM) = a^T tile
            bt = tl.load(b_ptr + rm[:, None].to(tl.int64) * sbm + rk[None, :] * sbk,
                         mask=ok[:, None] & (rk[None, :] < K), other=0.0)  # (BM, BK)
            acc += tl.dot(at, bt.to(at.dtype), input_precision=PREC)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        tl.store(out_ptr + g.to(tl.int64) * sog + rn[:, None] * son + rk[None, :] * sok,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def segment_tn(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, scale: float = 1.0,
               out_dtype: torch.dtype | None = None, fast_launch: bool = True) -> torch.Tensor:
    """``out (G, N, K)``: per group g, ``scale * a[rows of g]^T b[rows of g]`` (see the module docstring).

    Args:
        a: (S, N). b: (S, K), rows in the same order. offsets: (G,) int cumulative row counts.
        out_dtype: default ``a``'s dtype.
        fast_launch: as ``KernelOptions.fast_launch`` (a repeat call launches the compiled kernel directly).

    Raises:
        ValueError: shapes that do not chain.
    """
    S, N = a.shape
    if b.dim() != 2 or b.shape[0] != S or offsets.dim() != 1:
        raise ValueError(f"segment_tn: a {tuple(a.shape)}, b {tuple(b.shape)}, offsets {tuple(offsets.shape)} do "
                         "not chain; expected a (S, N), b (S, K), offsets (G,)")
    K, G = b.shape[1], offsets.shape[0]
    out = torch.empty(G, N, K, device=a.device, dtype=out_dtype or a.dtype)
    if G == 0 or N == 0 or K == 0:
        return out
    BM, BN, BK = (16, 16, 16) if INTERPRET else (64, 16 if N <= 16 else 64, 16 if K <= 16 else 64)
    ptrs = (a, b, offsets, out)
    scalars = (N, K, float(scale), *a.stride(), *b.stride(), *out.stride())
    on_device_of(a, launch_fixed, _segment_tn_kernel, (G, cdiv(N, BN), cdiv(K, BK)), dict(BM=BM, BN=BN, BK=BK), ptrs,
                 scalars, dict(PREC=dot_prec(a.dtype)), fast_launch)
    return out
