"""The skinny projection: ``C = drop(X) @ Y``, the rank-r products of LoRA.

    xa  = drop_pre(x) @ A^T      X = x (M, K),  Y = A^T (K, r)  -> (M, r)    forward
    dyB = drop_post(dy) @ B      X = dy (M, N), Y = B   (N, r)  -> (M, r)    backward

Bandwidth-bound: one pass over X (the big operand), fp32 accumulation, arbitrary 2-D strides; row
offsets are int64 (``M * K`` may pass 2**31).  Ranks above 64 add a grid axis over rank blocks.  Y may
be the fp32 master adapter: its tiles are cast to X's dtype after loading.  Without dropout the TMA
base GEMM can make the same product inside its own launch (``tma_gemm.gemm_lora_proj``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from .launch import INTERPRET, bench, cdiv, configs, dot_prec, launch, m_bucket, rank_block, run_cached, seed_tensor


@triton.jit
def _proj_kernel(
    x_ptr, y_ptr, c_ptr, seed_ptr,
    M, K, R,
    sxm, sxk, syk, syr, scm, scr,
    p, inv_keep,
    DROP: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    r_ok = rr < R
    x_ptrs = x_ptr + rm64[:, None] * sxm + rk[None, :] * sxk
    y_ptrs = y_ptr + rk[:, None] * syk + rr[None, :] * syr
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            yt = tl.load(y_ptrs, mask=r_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            yt = tl.load(y_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DROP:
            keep = philox_keep(seed_ptr, rm64, k0 + rk, K, p)
            xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(xt, yt.to(xt.dtype), acc, input_precision=DOT_PREC)  # fp32 adapter -> compute dtype
        x_ptrs += BK * sxk
        y_ptrs += BK * syk
    if DROP:
        acc = acc * inv_keep
    c_ptrs = c_ptr + rm64[:, None] * scm + rr[None, :] * scr
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


_proj_tuned = triton.autotune(
    configs=configs([
        (dict(BM=64, BK=128), 4, 4),
        (dict(BM=64, BK=256), 4, 3),
        (dict(BM=64, BK=256), 8, 4),
        (dict(BM=32, BK=256), 4, 4),
        (dict(BM=128, BK=128), 8, 4),
        (dict(BM=128, BK=64), 4, 5),
        (dict(BM=32, BK=512), 8, 3),
        (dict(BM=16, BK=256), 4, 4),  # short inputs (a small model's M = 4096 rows): twice the programs of BM=32
        (dict(BM=16, BK=512), 4, 3),
    ]),
    key=["M", "K", "R", "DROP"], do_bench=bench,
)(_proj_kernel)


def proj(x: torch.Tensor, y: torch.Tensor, *, seed=None, p: float = 0.0, fast_launch: bool = True) -> torch.Tensor:
    """``drop(x) @ y`` with x ``(M, K)`` any strides, y ``(K, R)`` any strides -> ``(M, R)`` in x.dtype.

    ``seed``: the dropout seed (int64, one element) when ``p > 0``; ``fast_launch``: as
    ``KernelOptions.fast_launch``.
    """
    M, K = x.shape
    R = y.shape[1]
    out = x.new_empty((M, R))
    if M == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()
    ptrs = (x, y, out, seed_tensor(seed, x.device))
    sig = ("proj", x.get_device(), M, K, R, x.stride(), y.stride(), x.dtype, y.dtype, p)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out
    drop = p > 0.0
    BR = rank_block(R)
    fixed = dict(BM=16, BK=32)
    even_k = K % (fixed["BK"] if INTERPRET else 512) == 0  # every BK in the configs divides 512
    nr = cdiv(R, BR)
    launch(
        "proj", _proj_tuned, _proj_kernel,
        lambda meta: (cdiv(M, meta["BM"]), nr), fixed, (m_bucket(M), K, R, drop, x.dtype, y.dtype),
        ptrs,
        (M, K, R,
         x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
         float(p), 1.0 / (1.0 - p) if drop else 1.0),
        dict(DROP=drop, EVEN_K=even_k, DOT_PREC=dot_prec(x.dtype), BR=BR), sig, fast_launch,
    )
    return out
