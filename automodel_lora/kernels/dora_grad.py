"""DoRA's backward epilogue: the scaled output gradient and the magnitude's gradient, from the layer's output.

    y  = f * z + b                     f = m / ||W + s B A||_row (N,), a constant to autograd
                                       z = x W^T + drop_post(s xa B^T) (M, N), never kept
    dz = dy * f                        (M, N): what the LoRA backward (dx, dA, dB) and a caller's base get
    dm = sum_i dy_ij z_ij / norm_j     (N,), with z recovered from y: z = (y - b) / f

One launch reads dy and y once and writes dz and, per block of ``ROWS`` rows, fp32 column partials of
``dy * z`` (``part`` (S, N)); ``dora_grad`` sums them over S with one ``sum(0)`` (a fixed order: deterministic,
no atomics) and divides by the norm.  Passes over (M, N): read dy, read y, write dz.

A column whose f is 0 (m_j = 0) has y_j = b_j: y holds nothing of z there.  For the tiles that hold such a
column the kernel recomputes z from x, W, xa, B (and the post-dropout mask), a (BM, K) x (K, BN) product per
row block, so dm_j is PEFT's ``sum_i dy_ij z_ij / norm_j`` (and dz_j = 0); tiles without one skip it after a
reduction over their BN values of f.  Precision: z = (y - b) / f inherits y's rounding relative to |y|, so
where |b_j| is much larger than |f_j z_ij| the recovered z (and dm_j) carries the rounding of b_j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from .launch import INTERPRET, bench, cdiv, configs, dot_prec, launch, m_bucket, rank_block, run_cached, seed_tensor

# Rows per program (one fp32 partial row of N values each): a multiple of every BM below.  256 rows keep
# the partials at 1/64 of dy's bytes in bf16 (16 rows under the interpreter, so small tests have several).
ROWS = 16 if INTERPRET else 256


@triton.jit
def _recompute_z(x_ptr, w_ptr, xa_ptr, q_ptr, seed_ptr, rm64, m_ok, rn, n_ok, N, K, R,
                 sxm, sxk, swn, swk, sam, sar, sqn, sqr, scale, p, inv_keep,
                 DROP: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, BR: tl.constexpr):
    """z = x W^T + drop(s xa B^T) on one (BM, BN) tile, fp32: x (M, K), W (N, K), xa (M, R), B (N, R)."""
    rk = tl.arange(0, BK)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        xt = tl.load(x_ptr + rm64[:, None] * sxm + (k0 + rk)[None, :] * sxk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        wt = tl.load(w_ptr + (k0 + rk)[:, None] * swk + rn64[None, :] * swn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BK, BN) of W^T
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=DOT_PREC)
    rr = tl.arange(0, BR)
    lr = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r_ok = (r0 + rr) < R
        at = tl.load(xa_ptr + rm64[:, None] * sam + (r0 + rr)[None, :] * sar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BM, BR)
        qt = tl.load(q_ptr + (r0 + rr)[:, None] * sqr + rn64[None, :] * sqn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BR, BN) of B^T
        lr = tl.dot(at, qt.to(at.dtype), lr, input_precision=DOT_PREC)
    lr = lr * scale
    if DROP:
        lr = tl.where(philox_keep(seed_ptr, rm64, rn, N, p), lr * inv_keep, 0.0)
    return acc + lr


@triton.jit
def _dora_grad_kernel(
    dy_ptr, y_ptr, f_ptr, bias_ptr, dz_ptr, part_ptr, x_ptr, w_ptr, xa_ptr, q_ptr, seed_ptr,
    M, N, K, R, rows,
    sdym, sdyn, sym, syn, sxm, sxk, swn, swk, sam, sar, sqn, sqr,
    scale, p, inv_keep,
    HAS_BIAS: tl.constexpr, DROP: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    f = tl.load(f_ptr + rn, mask=n_ok, other=1.0).to(tl.float32)  # (BN,)
    zero_f = (f == 0.0) & n_ok
    f_safe = tl.where(zero_f, 1.0, f)
    b = tl.zeros((BN,), dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    any_zero = tl.max(zero_f.to(tl.int32), axis=0) > 0
    part = tl.zeros((BN,), dtype=tl.float32)
    rb = tl.arange(0, BM)
    m_start = pid_m * rows
    m_end = tl.minimum(m_start + rows, M)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + rb
        rm64 = rm.to(tl.int64)
        m_ok = rm < m_end
        mask = m_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rm64[:, None] * sdym + rn[None, :] * sdyn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rm64[:, None] * sym + rn[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + rm64[:, None] * N + rn[None, :], (dy * f[None, :]).to(dz_ptr.dtype.element_ty), mask=mask)
        z = (y - b[None, :]) / f_safe[None, :]  # (BM, BN)
        if any_zero:  # y holds no z in these columns: recompute it
            zr = _recompute_z(x_ptr, w_ptr, xa_ptr, q_ptr, seed_ptr, rm64, m_ok, rn, n_ok, N, K, R,
                              sxm, sxk, swn, swk, sam, sar, sqn, sqr, scale, p, inv_keep,
                              DROP, DOT_PREC, BM, BN, BK, BR)
            z = tl.where(zero_f[None, :], zr, z)
        part += tl.sum(dy * z, axis=0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part, mask=n_ok)


_dora_grad_tuned = triton.autotune(
    configs=configs([
        (dict(BM=32, BN=256, BK=64), 4, 3),
        (dict(BM=64, BN=128, BK=64), 4, 3),
        (dict(BM=64, BN=256, BK=64), 8, 3),
        (dict(BM=128, BN=128, BK=64), 8, 3),
    ]),
    key=["M", "N", "K", "R", "HAS_BIAS", "DROP"], do_bench=bench,
)(_dora_grad_kernel)


def dora_grad(dy: torch.Tensor, y: torch.Tensor, f: torch.Tensor, bias, norm: torch.Tensor, x: torch.Tensor,
              weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scale: float, seed=None,
              p: float = 0.0, fast_launch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz, dm)`` of the module docstring: dz ``(M, N)`` contiguous in dy's dtype, dm ``(N,)`` fp32.

    dy, y ``(M, N)``; f, norm ``(N,)`` fp32 contiguous; bias ``(N,)`` or None (the b of y = f z + b); x ``(M, K)``,
    weight ``(N, K)``, xa ``(M, r)``, lora_B ``(N, r)`` (read only for columns whose f is 0); ``seed`` / ``p``:
    the post-dropout of the low-rank term (p = 0: none).  Any strides for the 2-D operands.
    """
    M, N = dy.shape
    K, R = x.shape[1], xa.shape[1]
    dz = torch.empty((M, N), device=dy.device, dtype=dy.dtype)
    if M == 0 or N == 0:
        return dz, torch.zeros(N, device=dy.device, dtype=torch.float32)
    S = cdiv(M, ROWS)
    part = torch.empty((S, N), device=dy.device, dtype=torch.float32)
    ptrs = (dy, y, f, bias if bias is not None else f, dz, part, x, weight, xa, lora_B, seed_tensor(seed, dy.device))
    sig = ("dora_grad", dy.get_device(), M, N, K, R, dy.stride(), y.stride(), x.stride(), weight.stride(),
           xa.stride(), lora_B.stride(), dy.dtype, y.dtype, x.dtype, weight.dtype, lora_B.dtype,
           None if bias is None else bias.dtype, scale, p)
    if not run_cached(sig, ptrs, fast=fast_launch):
        drop = p > 0.0
        launch(
            "dora_grad", _dora_grad_tuned, _dora_grad_kernel,
            lambda meta: (S, cdiv(N, meta["BN"])), dict(BM=16, BN=32, BK=32),
            (m_bucket(M), N, K, R, bias is not None, drop, dy.dtype),
            ptrs,
            (M, N, K, R, ROWS,
             dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), x.stride(0), x.stride(1),
             weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1),
             float(scale), float(p), 1.0 / (1.0 - p) if drop else 1.0),
            dict(HAS_BIAS=bias is not None, DROP=drop, DOT_PREC=dot_prec(x.dtype), BR=rank_block(R)),
            sig, fast_launch,
        )
    return dz, part.sum(0) / norm
