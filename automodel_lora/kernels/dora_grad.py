"""DoRA's backward epilogue: the scaled output gradient and the magnitude's gradient, from the layer's output.

    y  = f * z + b                     f = m / ||W + s B A||_row (N,), a constant to autograd
                                       z = x W^T + drop_post(s xa B^T) (M, N), never kept
    dz = dy * f                        (M, N): what the LoRA backward (dx, dA, dB) and a caller's base get
    dm = sum_i dy_ij z_ij / norm_j     (N,), with z recovered from y: z = (y - b) / f

One streaming launch reads dy and y once and writes dz and, per block of ``ROWS`` rows, fp32 column partials of
``dy * z`` (``part`` (S, N)); ``dora_grad`` sums them over S with one ``sum(0)`` (a fixed order: deterministic,
no atomics) and divides by the norm.  Passes over (M, N): read dy, read y, write dz.

A column whose f is 0 (m_j = 0) has y_j = b_j: y holds nothing of z there.  A second launch over the same
(row block, column block) grid writes those columns' partials: a program whose BN values of f hold no zero
returns at once; one that holds some recomputes z from x, W, xa, B (and the post-dropout mask), a
(BM, K) x (K, BN) product per row block, so dm_j is PEFT's ``sum_i dy_ij z_ij / norm_j`` (and dz_j = 0).  The
recompute lives in its own kernel because its GEMM tiles (shared memory, registers) would otherwise be
reserved by every program of the streaming one, whatever the branch, and cap how many run per SM.
Precision: z = (y - b) / f inherits y's rounding relative to |y|, so
where |b_j| is much larger than |f_j z_ij| the recovered z (and dm_j) carries the rounding of b_j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from .launch import INTERPRET, bench, cdiv, configs, dot_prec, launch, launch_fixed, m_bucket, rank_block, run_cached, seed_tensor

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
    dy_ptr, y_ptr, f_ptr, bias_ptr, dz_ptr, part_ptr, M, N, rows, sdym, sdyn, sym, syn,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """dz = dy * f and the column partials of dy * (y - b) / f over ``rows`` rows; 0 for columns whose f is 0."""
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    f = tl.load(f_ptr + rn, mask=n_ok, other=1.0).to(tl.float32)  # (BN,)
    zero_f = f == 0.0
    inv_f = tl.where(zero_f, 0.0, 1.0 / tl.where(zero_f, 1.0, f))  # 0 where y holds no z (the second launch)
    b = tl.zeros((BN,), dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    part = tl.zeros((BN,), dtype=tl.float32)
    rb = tl.arange(0, BM)
    m_start = pid_m * rows
    m_end = tl.minimum(m_start + rows, M)
    for m0 in range(m_start, m_end, BM):
        rm64 = (m0 + rb).to(tl.int64)
        mask = ((m0 + rb) < m_end)[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rm64[:, None] * sdym + rn[None, :] * sdyn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rm64[:, None] * sym + rn[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + rm64[:, None] * N + rn[None, :], (dy * f[None, :]).to(dz_ptr.dtype.element_ty), mask=mask)
        part += tl.sum(dy * (y - b[None, :]), axis=0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part * inv_f, mask=n_ok)


@triton.jit
def _dora_zero_f_kernel(
    dy_ptr, f_ptr, part_ptr, x_ptr, w_ptr, xa_ptr, q_ptr, seed_ptr, M, N, K, R, rows,
    sdym, sdyn, sxm, sxk, swn, swk, sam, sar, sqn, sqr, scale, p, inv_keep,
    DROP: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    BR: tl.constexpr,
):
    """The partials of the columns whose f is 0, with z recomputed; a program without such a column returns."""
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    zero_f = (tl.load(f_ptr + rn, mask=n_ok, other=1.0) == 0.0) & n_ok
    if tl.max(zero_f.to(tl.int32), axis=0) == 0:
        return
    part = tl.zeros((BN,), dtype=tl.float32)
    rb = tl.arange(0, BM)
    m_start = pid_m * rows
    m_end = tl.minimum(m_start + rows, M)
    for m0 in range(m_start, m_end, BM):
        rm64 = (m0 + rb).to(tl.int64)
        m_ok = (m0 + rb) < m_end
        dy = tl.load(dy_ptr + rm64[:, None] * sdym + rn[None, :] * sdyn, mask=m_ok[:, None] & zero_f[None, :],
                     other=0.0).to(tl.float32)
        z = _recompute_z(x_ptr, w_ptr, xa_ptr, q_ptr, seed_ptr, rm64, m_ok, rn, n_ok, N, K, R,
                         sxm, sxk, swn, swk, sam, sar, sqn, sqr, scale, p, inv_keep,
                         DROP, DOT_PREC, BM, BN, BK, BR)
        part += tl.sum(dy * z, axis=0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part, mask=zero_f)


_dora_grad_tuned = triton.autotune(
    configs=configs([
        (dict(BM=32, BN=256), 4, 3),
        (dict(BM=64, BN=128), 4, 3),
        (dict(BM=16, BN=512), 8, 3),
        (dict(BM=64, BN=256), 8, 3),
    ]),
    key=["M", "N", "HAS_BIAS"], do_bench=bench,
)(_dora_grad_kernel)

# The recompute's tiles: it runs only where some m_j is 0 (a rare, usually transient state).
ZERO_F_TILES = dict(BM=16, BN=32, BK=32) if INTERPRET else dict(BM=64, BN=64, BK=64)


def dora_grad(dy: torch.Tensor, y: torch.Tensor, f: torch.Tensor, bias, norm: torch.Tensor, x: torch.Tensor,
              weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scale: float, seed=None,
              p: float = 0.0, fast_launch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz, dm)`` of the module docstring: dz ``(M, N)`` contiguous in dy's dtype, dm ``(N,)`` fp32.

    dy, y ``(M, N)``; f, norm ``(N,)`` fp32 contiguous; bias ``(N,)`` or None (the b of y = f z + b); x ``(M, K)``,
    weight ``(N, K)``, xa ``(M, r)``, lora_B ``(N, r)`` (read only for columns whose f is 0); ``seed`` / ``p``:
    the post-dropout of the low-rank term (p = 0: none).  Any strides for the 2-D operands.
    """
    M, N = dy.shape
    dz = torch.empty((M, N), device=dy.device, dtype=dy.dtype)
    if M == 0 or N == 0:
        return dz, torch.zeros(N, device=dy.device, dtype=torch.float32)
    S = cdiv(M, ROWS)
    part = torch.empty((S, N), device=dy.device, dtype=torch.float32)
    bias_ptr = bias if bias is not None else f
    ptrs = (dy, y, f, bias_ptr, dz, part)
    sig = ("dora_grad", dy.get_device(), M, N, dy.stride(), y.stride(), dy.dtype, y.dtype,
           None if bias is None else bias.dtype)
    if not run_cached(sig, ptrs, fast=fast_launch):
        launch("dora_grad", _dora_grad_tuned, _dora_grad_kernel, lambda meta: (S, cdiv(N, meta["BN"])),
               dict(BM=16, BN=32), (m_bucket(M), N, bias is not None, dy.dtype), ptrs,
               (M, N, ROWS, *dy.stride(), *y.stride()), dict(HAS_BIAS=bias is not None), sig, fast_launch)
    _zero_f_partials(dy, f, part, x, weight, xa, lora_B, scale, seed, p, fast_launch)
    return dz, part.sum(0) / norm


def _zero_f_partials(dy, f, part, x, weight, xa, lora_B, scale: float, seed, p: float, fast_launch: bool) -> None:
    """Write ``part``'s entries of the columns whose f is 0 (``_dora_zero_f_kernel``); the others are left."""
    (M, N), K, R = dy.shape, x.shape[1], xa.shape[1]
    drop = p > 0.0
    ptrs = (dy, f, part, x, weight, xa, lora_B, seed_tensor(seed, dy.device))
    scalars = (M, N, K, R, ROWS, *dy.stride(), *x.stride(), *weight.stride(), *xa.stride(), *lora_B.stride(),
               float(scale), float(p), 1.0 / (1.0 - p) if drop else 1.0)
    grid = (part.shape[0], cdiv(N, ZERO_F_TILES["BN"]))
    launch_fixed(_dora_zero_f_kernel, grid, {**ZERO_F_TILES, "BR": rank_block(R)}, ptrs, scalars,
                 dict(DROP=drop, DOT_PREC=dot_prec(x.dtype)), fast_launch)
