"""The portable base GEMM with the low-rank term as one more K step.

    C = f * (X @ Y + P @ (s * Q)) + bias            f (N,): an optional column scale (DoRA's), else 1
      forward: y  = x @ W^T + xa @ (s * B^T) + b     X (M, K), Y = W^T (K, N), P = xa  (M, r), Q = B^T (r, N)
      dx:      dx = dy @ W  + dyB @ (s * A)          X = dy (M, N), Y = W (N, K), P = dyB (M, r), Q = A (r, K)

The adapter term costs no pass over C: after the main loop over K, each tile runs one more step over
``[P | Q]`` (depth BR per rank block).  Any strides; grouped tile order (``tile_coords``) for L2
reuse.  This kernel runs where the Hopper TMA kernel (``tma_gemm.py``) does not apply: pre-Hopper
GPUs, fp32, ranks above 64, operands TMA cannot address, a Triton without TMA descriptors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, bench, cdiv, configs, dot_prec, launch, m_bucket, rank_block, run_cached


@triton.jit
def tile_coords(tile, num_in_group, num_m, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of an output tile in grouped order: GROUP_M row blocks share each column sweep (L2 reuse)."""
    first_m = (tile // num_in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + tile % size_m, (tile % num_in_group) // size_m


@triton.jit
def _gemm_lora_kernel(
    x_ptr, y_ptr, p_ptr, q_ptr, bias_ptr, c_ptr, f_ptr,
    M, N, K, R,
    sxm, sxk, syk, syn, spm, spr, sqr, sqn, scm, scn,
    scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = tile_coords(tl.program_id(0), GROUP_M * num_pid_n, tl.cdiv(M, BM), GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # wrap rows/cols for the loads (no masks in the main loop); the store is masked
    rm_l = (rm % M).to(tl.int64)
    rn_l = (rn % N).to(tl.int64)
    x_ptrs = x_ptr + rm_l[:, None] * sxm + rk[None, :] * sxk
    y_ptrs = y_ptr + rk[:, None] * syk + rn_l[None, :] * syn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            yt = tl.load(y_ptrs)
        else:
            k_ok = (k0 + rk) < K
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            yt = tl.load(y_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, yt, acc, input_precision=DOT_PREC)
        x_ptrs += BK * sxk
        y_ptrs += BK * syk
    if HAS_LORA:
        rr = tl.arange(0, BR)
        for r0 in range(0, R, BR):
            r_ok = (r0 + rr) < R
            pt = tl.load(p_ptr + rm_l[:, None] * spm + (r0 + rr)[None, :] * spr, mask=r_ok[None, :], other=0.0)
            qt = tl.load(q_ptr + (r0 + rr)[:, None] * sqr + rn_l[None, :] * sqn, mask=r_ok[:, None], other=0.0)
            qt = (qt.to(tl.float32) * scale).to(pt.dtype)
            acc = tl.dot(pt, qt, acc, input_precision=DOT_PREC)
    if HAS_SCALE:
        acc *= tl.load(f_ptr + rn_l).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_l).to(tl.float32)[None, :]
    rm64 = rm.to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm64[:, None] * scm + rn[None, :].to(tl.int64) * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)


_gemm_tuned = triton.autotune(
    configs=configs([
        (dict(BM=128, BN=256, BK=64, GROUP_M=8), 8, 3),
        (dict(BM=128, BN=256, BK=64, GROUP_M=8), 8, 4),
        (dict(BM=256, BN=128, BK=64, GROUP_M=8), 8, 3),
        (dict(BM=128, BN=128, BK=64, GROUP_M=8), 8, 4),
        (dict(BM=128, BN=128, BK=64, GROUP_M=8), 4, 4),
        (dict(BM=128, BN=256, BK=32, GROUP_M=8), 8, 4),
    ]),
    key=["M", "N", "K", "R", "HAS_LORA", "HAS_SCALE"], do_bench=bench,
)(_gemm_lora_kernel)


def gemm_lora_portable(x: torch.Tensor, y: torch.Tensor, pm, q, scale: float, bias, out: torch.Tensor, *,
                       col_scale=None, fast_launch: bool = True) -> torch.Tensor:
    """``out = col_scale * (x @ y + pm @ (scale * q)) + bias`` through the portable kernel (``pm`` None: no
    low-rank term; ``col_scale`` None: 1); x ``(M, K)``, y ``(K, N)``, pm ``(M, R)``, q ``(R, N)``, out ``(M, N)``,
    any strides; col_scale ``(N,)`` contiguous.  Returns ``out``."""
    M, K = x.shape
    N = y.shape[1]
    has_lora = pm is not None and pm.shape[1] > 0
    R = pm.shape[1] if has_lora else 0
    ptrs = (x, y, pm if has_lora else x, q if has_lora else y, bias if bias is not None else out, out,
            col_scale if col_scale is not None else out)
    sig = ("gemm", x.get_device(), M, N, K, R, x.stride(), y.stride(), x.dtype, y.dtype,
           (pm.stride(), q.stride(), pm.dtype, q.dtype) if has_lora else None, None if bias is None else bias.dtype,
           None if col_scale is None else col_scale.dtype, scale)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out
    fixed = dict(BM=16, BN=32, BK=32, GROUP_M=4)
    even_k = K % (fixed["BK"] if INTERPRET else 64) == 0
    launch(
        "gemm", _gemm_tuned, _gemm_lora_kernel,
        lambda meta: (cdiv(M, meta["BM"]) * cdiv(N, meta["BN"]),), fixed,
        (m_bucket(M), N, K, R, has_lora, col_scale is not None, x.dtype, y.stride(0) == 1),
        ptrs,
        (M, N, K, R,
         x.stride(0), x.stride(1), y.stride(0), y.stride(1),
         pm.stride(0) if has_lora else 0, pm.stride(1) if has_lora else 0,
         q.stride(0) if has_lora else 0, q.stride(1) if has_lora else 0,
         out.stride(0), out.stride(1),
         float(scale)),
        dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_SCALE=col_scale is not None, EVEN_K=even_k,
             DOT_PREC=dot_prec(x.dtype), BR=rank_block(max(R, 1))), sig, fast_launch,
    )
    return out
