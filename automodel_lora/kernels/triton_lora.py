"""Triton kernels for LoRA: skinny projections, fused low-rank expand, split-M
weight gradients and a base GEMM with the low-rank term as an extra K step.

Notation (all 2-D after flattening the leading dims): ``x: (M, K)``,
``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, ``s`` the LoRA scale.

    xa  = drop_pre(x) @ A^T                      (M, r)    _proj_kernel, or without dropout the
                                                           TMA GEMM's projection tiles (FUSE_PROJ)
    y   = x @ W^T + b + drop_post(s * xa @ B^T)  (M, N)    _expand_kernel + cuBLAS addmm_ (beta=1)
                                                           or _gemm_lora_kernel (one Triton GEMM; on
                                                           Hopper _tma_gemm_lora_kernel)
    dyB = drop_post(dy) @ B                      (M, r)    _proj_kernel, or as xa (FUSE_PROJ)
    dx  = dy @ W + drop_pre(s * dyB @ A)         (M, K)    _expand_kernel + addmm_ or _gemm_lora_kernel
    dA  = s * dyB^T @ drop_pre(x)                (r, K)    _tn_kernel (split-M, summed in-launch)
    dB  = s * drop_post(dy)^T @ xa               (N, r)    _tn_kernel

Every kernel reads its big operand (``x`` or ``dy``) once, accumulates in fp32
and takes arbitrary 2-D strides. Row offsets are int64 (``M * K`` may pass 2**31);
column offsets are int32, so a column stride times the width must stay below 2**31
(true for row-major tensors, which is what LoRA layers see).  Dropout is
inverted dropout with a Philox mask ``keep = rand(seed, m * D + d) >= p`` over
the logical ``(M, D)`` index space of the masked tensor, so backward regenerates
exactly the forward mask from ``seed`` (nothing stored).

This module imports triton at import time; ``automodel_lora.kernels.lora``
imports it inside a try block, so the pure-PyTorch path works without triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4: host-side TMA descriptors (the Hopper base GEMM); without them that GEMM is off
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

try:  # Triton >= 3.4: the launch hooks the direct launch path must honour
    from triton import knobs
except ImportError:  # pragma: no cover - older Triton: always launch through the jit function
    knobs = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --------------------------------------------------------------------------------------
# Block-size choices.  Bandwidth-bound kernels (_proj, _tn) are autotuned on the GPU,
# keyed on the shapes; the configs are small sets around what a streaming kernel on an
# H100 needs (>= 32 KB in flight per SM: 3-4 stages of a (64, 128..256) bf16 tile).
# Under the interpreter a fixed small config runs (autotune would time numpy code).
# --------------------------------------------------------------------------------------

_MAX_BR = 64  # rank block; ranks > 64 add a grid dim over rank blocks (x re-read r/64 times)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 / triton.cdiv are constexpr functions with ~3 us of
    # wrapper cost per call on the host, and the launchers call them on every step
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _rank_block(r: int) -> int:
    return min(_MAX_BR, max(16, _next_pow2(r)))


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 operands: full-precision dot (tf32 would be ~3e-4 off the fp32 reference).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _keep_mask(seed_ptr, rows64, cols, D, p):
    """Philox keep-mask for elements (rows64[:, None], cols[None, :]) of an (M, D) tensor."""
    seed = tl.load(seed_ptr)
    offs = rows64[:, None] * D + cols[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= p


# --------------------------------------------------------------------------------------
# C[M, R] = drop(X)[M, K] @ Y[K, R]          (xa = x A^T, dyB = dy B)
# --------------------------------------------------------------------------------------
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
            keep = _keep_mask(seed_ptr, rm64, k0 + rk, K, p)
            xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(xt, yt.to(xt.dtype), acc, input_precision=DOT_PREC)  # fp32 adapter -> compute dtype
        x_ptrs += BK * sxk
        y_ptrs += BK * syk
    if DROP:
        acc = acc * inv_keep
    c_ptrs = c_ptr + rm64[:, None] * scm + rr[None, :] * scr
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


# --------------------------------------------------------------------------------------
# C[M, N] = (ADD ? Cin : 0) + (bias) + drop(scale * P[M, R] @ Q[R, N])
# --------------------------------------------------------------------------------------
@triton.jit
def _expand_kernel(
    p_ptr, q_ptr, bias_ptr, cin_ptr, c_ptr, seed_ptr,
    M, N, R,
    spm, spr, sqr, sqn, scim, scin, scm, scn,
    scale, p, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, DROP: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r_ok = (r0 + rr) < R
        pt = tl.load(p_ptr + rm64[:, None] * spm + (r0 + rr)[None, :] * spr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        qt = tl.load(q_ptr + (r0 + rr)[:, None] * sqr + rn[None, :] * sqn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(pt, qt.to(pt.dtype), acc, input_precision=DOT_PREC)  # fp32 adapter -> compute dtype
    acc = acc * scale
    if DROP:
        keep = _keep_mask(seed_ptr, rm64, rn, N, p)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        acc += tl.load(cin_ptr + rm64[:, None] * scim + rn[None, :] * scin, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + rm64[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Out[R, D] = scale * P[M, R]^T @ drop(X)[M, D]
# M is split across grid axis 2 into S slices; each writes an fp32 partial, and the last slice
# of a tile to finish (counted on a self-resetting lock) sums the S partials in slice order and
# writes Out in its dtype: deterministic, one launch, no reduction pass on the host side.
# --------------------------------------------------------------------------------------
@triton.jit
def _tn_tile(
    pid_d, pid_r, pid_s, lock_ptr,
    p_ptr, x_ptr, part_ptr, o_ptr, seed_ptr,
    M, D, R, rows_per_split, S,
    spm, spr, sxm, sxd, sps, sor, sod,
    scale, p,
    DROP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):
    rd = pid_d * BD + tl.arange(0, BD)
    rr = pid_r * BR + tl.arange(0, BR)
    rb = tl.arange(0, BM)
    d_ok = rd < D
    r_ok = rr < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BR, BD), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + rb
        rm64 = rm.to(tl.int64)
        m_ok = rm < m_end
        pt = tl.load(p_ptr + rm64[:, None] * spm + rr[None, :] * spr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if EVEN_D:
            xt = tl.load(x_ptr + rm64[:, None] * sxm + rd[None, :] * sxd, mask=m_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + rm64[:, None] * sxm + rd[None, :] * sxd,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if DROP:
            keep = _keep_mask(seed_ptr, rm64, rd, D, p)
            xt = tl.where(keep, xt, 0.0)
        acc = tl.dot(tl.trans(pt), xt, acc, input_precision=DOT_PREC)
    if DROP:
        acc = acc * (scale / (1.0 - p))
    else:
        acc = acc * scale
    tile_mask = r_ok[:, None] & d_ok[None, :]
    offs = rr[:, None].to(tl.int64) * sor + rd[None, :].to(tl.int64) * sod  # (R, D) index -> Out / partial
    if S == 1:
        tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=tile_mask)
    else:
        tl.store(part_ptr + pid_s.to(tl.int64) * sps + offs, acc, mask=tile_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu")
        if done == S - 1:  # the last slice of this tile: sum the partials in slice order
            tl.debug_barrier()
            total = tl.zeros((BR, BD), dtype=tl.float32)
            part_ptrs = part_ptr + offs
            for _ in range(0, S):
                total += tl.load(part_ptrs, mask=tile_mask, other=0.0, cache_modifier=".cg")
                part_ptrs += sps
            tl.store(o_ptr + offs, total.to(o_ptr.dtype.element_ty), mask=tile_mask)
            tl.atomic_xchg(lock_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _tn_kernel(
    p_ptr, x_ptr, part_ptr, o_ptr, seed_ptr, lock_ptr,
    M, D, R, rows_per_split, S,
    spm, spr, sxm, sxd, sps, sor, sod,
    scale, p,
    DROP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _tn_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), lock_ptr + tile,
             p_ptr, x_ptr, part_ptr, o_ptr, seed_ptr, M, D, R, rows_per_split, S,
             spm, spr, sxm, sxd, sps, sor, sod, scale, p,
             DROP, EVEN_D, DOT_PREC, BM, BD, BR)


@triton.jit
def _tn2_kernel(
    pa_ptr, xa_ptr, oa_ptr, pb_ptr, xb_ptr, ob_ptr, part_ptr, seed_ptr, lock_ptr,
    M, DA, DB, R, rows_per_split, S,
    spam, spar, sxam, sxad,
    spbm, spbr, sxbm, sxbd,
    scale, p,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, EVEN_A: tl.constexpr, EVEN_B: tl.constexpr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):
    """Two tn problems in one launch (dA = s dyB^T x, (R, DA) row-major, and dB = s dy^T xa, written
    as (DB, R) row-major): axis 0 runs over the D-blocks of problem A then those of problem B.  The
    partials of slice s are one row of ``part``: R * DA values of A, then DB * R of B."""
    pid = tl.program_id(0)
    tile = pid * tl.num_programs(1) + tl.program_id(1)
    nda = tl.cdiv(DA, BD)
    sps = R * (DA + DB)
    if pid < nda:
        _tn_tile(pid, tl.program_id(1), tl.program_id(2), lock_ptr + tile,
                 pa_ptr, xa_ptr, part_ptr, oa_ptr, seed_ptr, M, DA, R, rows_per_split, S,
                 spam, spar, sxam, sxad, sps, DA, 1, scale, p,
                 DROP_A, EVEN_A, DOT_PREC, BM, BD, BR)
    else:
        _tn_tile(pid - nda, tl.program_id(1), tl.program_id(2), lock_ptr + tile,
                 pb_ptr, xb_ptr, part_ptr + R * DA, ob_ptr, seed_ptr, M, DB, R, rows_per_split, S,
                 spbm, spbr, sxbm, sxbd, sps, 1, R, scale, p,
                 DROP_B, EVEN_B, DOT_PREC, BM, BD, BR)


# --------------------------------------------------------------------------------------
# C[M, N] = X[M, K] @ Y[K, N] + P[M, R] @ (scale * Q[R, N]) + bias   (one Triton GEMM; the
# low-rank term is an extra K step over [P | Q], so it costs no pass over C)
# --------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile, num_in_group, num_m, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of an output tile in grouped order: GROUP_M row blocks share each column sweep (L2 reuse)."""
    first_m = (tile // num_in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + tile % size_m, (tile % num_in_group) // size_m


@triton.jit
def _gemm_lora_kernel(
    x_ptr, y_ptr, p_ptr, q_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    sxm, sxk, syk, syn, spm, spr, sqr, sqn, scm, scn,
    scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * num_pid_n, tl.cdiv(M, BM), GROUP_M)

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
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_l).to(tl.float32)[None, :]
    rm64 = rm.to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm64[:, None] * scm + rn[None, :].to(tl.int64) * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# The same GEMM for Hopper (sm_90+) through TMA: a persistent grid (one program per SM) walks
# the output tiles in grouped order; TMA loads zero-fill past the edges and the store clips, so
# no masks.  B_NK: the B operand and Q are stored (N, K) / (N, R) and used transposed (the
# forward, W and lora_B), else stored (K, N) / (R, N) (the backward's dx, W and lora_A).
# The low-rank term is one more K step of depth BR after the main loop.  Its [BM, BR] tile of P comes
# through registers (a plain load, issued before Q's TMA load so the two latencies overlap) and is
# scaled there; Q's tile feeds the MMA from shared memory as loaded.  Q may be the fp32 master adapter:
# then Q is scaled instead, in fp32, and rounded once to the compute dtype.
#
# FUSE_PROJ: P = X @ Rop is not an input but made in this launch, by projection tiles (BM rows of
# P each, a bandwidth-bound pass over those rows of X).  The GEMM tiles are handed out round-robin
# from the last program down, so the programs left one GEMM tile short are the first ones; those run
# the projection tiles before their GEMM tiles, in time they would otherwise spend idle at the end.
# Each projection tile stores its rows of P (an output: the caller keeps it for backward), raises its
# row block's flag and counts itself done.  The GEMM tiles load their rows of P at the epilogue; until
# a program has seen every projection done (after that it checks nothing), it waits there for its row
# block's flag.  Waiting assumes, as stream-K GEMMs do, that the programs doing the projections are
# resident.  They are the lowest-numbered ones, which the GPU places first, and row block m is done
# by program m % (programs left short); nothing they do waits.  The last program to finish zeroes the
# flags and counters for the next launch: flags[0:num_m], then the projection and program counters.
# Rop is (K, R) (R_T: a transposed view of a row-major (R, K) tensor, lora_A^T).
# --------------------------------------------------------------------------------------
@triton.jit
def _tma_gemm_lora_kernel(
    a_desc, b_desc, q_desc, c_desc, bias_ptr, r_desc, pm_ptr, flag_ptr,
    M, N, K, R, spm, scale,
    B_NK: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_PROJ: tl.constexpr, R_T: tl.constexpr, R_BYTES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr, STAGES: tl.constexpr, SPLIT_STORE: tl.constexpr, NUM_SMS: tl.constexpr,
):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_m * num_n
    # GEMM tiles are handed out from the last program down: programs below `n_short` get one fewer
    first_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    rr = tl.arange(0, BR)
    if FUSE_PROJ:
        n_short = tl.num_programs(0) - num_tiles % tl.num_programs(0)  # all of them when none is short
        if tl.program_id(0) < n_short:
            for pid_m in tl.range(tl.program_id(0), num_m, n_short):
                off_m = pid_m * BM
                pacc = tl.zeros((BM, BR), dtype=tl.float32)
                # a streaming loop: more stages in flight, 2x those of the GEMM for a 16-bit Rop, 1x for fp32
                for ki in tl.range(0, k_tiles, num_stages=STAGES * (3 - R_BYTES // 2)):
                    a = a_desc.load([off_m, ki * BK])
                    if R_T:
                        rt = r_desc.load([0, ki * BK]).T
                    else:
                        rt = r_desc.load([ki * BK, 0])
                    pacc = tl.dot(a, rt.to(a.dtype), pacc)
                rm = off_m + tl.arange(0, BM)
                tl.store(pm_ptr + rm.to(tl.int64)[:, None] * spm + rr[None, :], pacc.to(c_desc.dtype),
                         mask=(rm < M)[:, None] & (rr < R)[None, :])
                tl.debug_barrier()  # every thread's rows of P are written before the releases below
                tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release", scope="gpu")
                tl.atomic_add(flag_ptr + num_m, 1, sem="release", scope="gpu")
    all_ready = False  # FUSE_PROJ: this program has seen every projection tile done
    num_in_group = GROUP_M * num_n
    # the epilogue keeps its own tile counter (as Triton's persistent-matmul tutorial does) so the
    # flattened loop can overlap a tile's store with the next tile's loads
    tile_c = first_tile - NUM_SMS
    for tile in tl.range(first_tile, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_in_group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in tl.range(0, k_tiles, num_stages=STAGES):
            a = a_desc.load([off_m, ki * BK])
            if B_NK:
                b = b_desc.load([off_n, ki * BK]).T
            else:
                b = b_desc.load([ki * BK, off_n])
            acc = tl.dot(a, b, acc)
        rm = off_m + tl.arange(0, BM)
        p_ptrs = pm_ptr + rm.to(tl.int64)[:, None] * spm + rr[None, :]
        p_ok = (rm < M)[:, None] & (rr < R)[None, :]
        if FUSE_PROJ:  # this row block's P, once its projection tile has raised the flag
            if not all_ready:
                all_ready = tl.atomic_add(flag_ptr + num_m, 0, sem="acquire", scope="gpu") == num_m
                if not all_ready:
                    while tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire", scope="gpu") == 0:
                        pass
            pt = tl.load(p_ptrs, mask=p_ok, other=0.0, cache_modifier=".cg")  # written in this launch: from L2
        else:
            pt = tl.load(p_ptrs, mask=p_ok, other=0.0)
        if B_NK:
            qt = q_desc.load([off_n, 0]).T
        else:
            qt = q_desc.load([0, off_n])
        if qt.dtype == pt.dtype:
            acc = tl.dot((pt.to(tl.float32) * scale).to(pt.dtype), qt, acc)
        else:
            acc = tl.dot(pt, (qt.to(tl.float32) * scale).to(pt.dtype), acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_in_group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BN)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if SPLIT_STORE:  # two [BM, BN/2] stores: half the epilogue's shared memory (BN=256 at r=64)
            c0, c1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BN // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
    if FUSE_PROJ:  # the last program done zeroes the locks for the next launch
        if tl.atomic_add(flag_ptr + num_m + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            for m0 in range(0, num_m + 2, BM):
                rb = m0 + tl.arange(0, BM)
                tl.store(flag_ptr + rb, tl.zeros((BM,), dtype=tl.int32), mask=rb < num_m + 2)


# --------------------------------------------------------------------------------------
# keep-mask materialisation (tests and the reference only; the kernels never store it)
# --------------------------------------------------------------------------------------
@triton.jit
def _mask_kernel(seed_ptr, o_ptr, M, D, p, BM: tl.constexpr, BD: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rm64 = rm.to(tl.int64)
    keep = _keep_mask(seed_ptr, rm64, rd, D, p)
    mask = (rm < M)[:, None] & (rd < D)[None, :]
    tl.store(o_ptr + rm64[:, None] * D + rd[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------
# Autotuned wrappers (GPU only)
# --------------------------------------------------------------------------------------
def _cfgs(space):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in space]


def _bench(fn, quantiles):  # short autotune timing: 5 ms warm-up, 25 ms of repeats per config
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_proj_tuned = triton.autotune(
    configs=_cfgs([
        (dict(BM=64, BK=128), 4, 4),
        (dict(BM=64, BK=256), 4, 3),
        (dict(BM=64, BK=256), 8, 4),
        (dict(BM=32, BK=256), 4, 4),
        (dict(BM=128, BK=128), 8, 4),
        (dict(BM=128, BK=64), 4, 5),
        (dict(BM=32, BK=512), 8, 3),
    ]),
    key=["M", "K", "R", "DROP"], do_bench=_bench,
)(_proj_kernel)

_expand_tuned = triton.autotune(
    configs=_cfgs([
        (dict(BM=128, BN=128), 4, 2),
        (dict(BM=128, BN=128), 8, 2),
        (dict(BM=64, BN=256), 8, 2),
        (dict(BM=128, BN=256), 8, 2),
        (dict(BM=64, BN=128), 4, 2),
    ]),
    key=["M", "N", "R", "DROP", "HAS_ADD"], do_bench=_bench,
)(_expand_kernel)

_tn_tuned = triton.autotune(
    configs=_cfgs([
        (dict(BM=64, BD=128), 4, 4),
        (dict(BM=128, BD=128), 8, 3),
        (dict(BM=64, BD=256), 8, 4),
        (dict(BM=32, BD=256), 4, 4),
        (dict(BM=128, BD=64), 4, 4),
        (dict(BM=64, BD=64), 4, 5),
    ]),
    key=["M", "D", "R", "DROP"], do_bench=_bench,
)(_tn_kernel)

_gemm_tuned = triton.autotune(
    configs=_cfgs([
        (dict(BM=128, BN=256, BK=64, GROUP_M=8), 8, 3),
        (dict(BM=128, BN=256, BK=64, GROUP_M=8), 8, 4),
        (dict(BM=256, BN=128, BK=64, GROUP_M=8), 8, 3),
        (dict(BM=128, BN=128, BK=64, GROUP_M=8), 8, 4),
        (dict(BM=128, BN=128, BK=64, GROUP_M=8), 4, 4),
        (dict(BM=128, BN=256, BK=32, GROUP_M=8), 8, 4),
    ]),
    key=["M", "N", "K", "R", "HAS_LORA"], do_bench=_bench,
)(_gemm_lora_kernel)

def _tma_block_shapes(nargs) -> None:
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config being timed."""
    BM, BN, BK, BR, b_nk = nargs["BM"], nargs["BN"], nargs["BK"], nargs["BR"], nargs["B_NK"]
    nargs["a_desc"].block_shape = [BM, BK]
    nargs["b_desc"].block_shape = [BN, BK] if b_nk else [BK, BN]
    nargs["q_desc"].block_shape = [BN, BR] if b_nk else [BR, BN]
    nargs["c_desc"].block_shape = [BM, BN // 2 if nargs["SPLIT_STORE"] else BN]
    if nargs["FUSE_PROJ"]:  # else r_desc is a stand-in: the kernel does not read it
        nargs["r_desc"].block_shape = [BR, BK] if nargs["R_T"] else [BK, BR]


# Configs measured per problem by benchmarks/tma_configs.py on an H100 (BM=128, BK=64): BN=256 with 3
# stages is the fastest at the 8B shapes, grouped by 8 or 16 row blocks, whole or split store (the split
# store is what fits in shared memory at r=64); BN=128 with 4 stages is the smaller fallback.  2-stage,
# 8-warp BN=128 and BM=256 configs never won there and are not compiled.
_tma_gemm_tuned = triton.autotune(
    configs=[triton.Config(dict(BM=128, BN=bn, BK=64, GROUP_M=gm, STAGES=st, SPLIT_STORE=sp), num_warps=w,
                           num_stages=st, pre_hook=_tma_block_shapes)
             for bn, st, w, sp, gm in ((256, 3, 8, False, 8), (256, 3, 8, True, 8), (256, 3, 8, False, 16),
                                       (256, 3, 8, True, 16), (128, 4, 4, False, 8))],
    key=["M", "N", "K", "B_NK", "HAS_BIAS", "FUSE_PROJ", "R_T", "R_BYTES", "BR"], do_bench=_bench,
)(_tma_gemm_lora_kernel)

_TMA_MIN_BM = 16 if INTERPRET else min(cfg.kwargs["BM"] for cfg in _tma_gemm_tuned.configs)

_tn2_tuned = triton.autotune(
    configs=_tn_tuned.configs,
    key=["M", "DA", "DB", "R", "DROP_A", "DROP_B"], do_bench=_bench,
)(_tn2_kernel)

# rows per split of the tn kernel are a multiple of every BM above
_TN_ROW_QUANT = 128


# Launch plans: after the first (autotuned) call of a kernel for a key (shapes, with M bucketed), later calls launch the
# plain jit function with the chosen config directly: the autotuner's per-call Python work was
# a large part of the ~120 us host time per launch measured in the first H100 run (NOTES.md).
_PLANS: dict = {}

# Compiled kernels by call signature.  Each launcher first builds ``sig``: the kernel's name, the device
# and every shape, stride, dtype and scalar value that decides its launch (what Triton specializes
# on, the launch plan, the grid and the non-pointer arguments).  A repeat call whose pointers are all
# 16-byte aligned finds the compiled kernel with its grid and argument tail under ``sig`` and calls its
# launcher directly: no Triton argument binding and none of the launcher's own argument building (host
# time per launch: NOTES.md, "Version 3" and "Version 4").  Launches with an unaligned pointer (views
# at odd offsets; rare) always go through the jit function, which specializes on each pointer's
# alignment itself.  The table is cleared when it reaches _MAX_COMPILED entries (a new M is one jit
# launch).
_COMPILED: dict = {}
_MAX_COMPILED = 4096
_FAST_LAUNCH = knobs is not None and os.environ.get("AUTOMODEL_LORA_FAST_LAUNCH", "1") == "1"


def _aligned(tensors) -> bool:
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


def _run_cached(sig: tuple, ptrs: tuple, tensors=None) -> bool:
    """Launch the compiled kernel recorded under ``sig`` with pointer arguments ``ptrs`` (first in the
    kernel's signature).  False, launching nothing, when no kernel is recorded (first call, the
    interpreter, fast launch off) or one of ``tensors`` (default: ``ptrs``) is not 16-byte aligned."""
    entry = _COMPILED.get(sig) if _FAST_LAUNCH else None
    if entry is None or not _aligned(ptrs if tensors is None else tensors):
        return False
    kernel, tail, device_index, g = entry
    stream = torch._C._cuda_getCurrentRawStream(device_index)  # what Triton's own launcher asks for
    full = (*ptrs, *tail)
    enter = knobs.runtime.launch_enter_hook  # launch_metadata only feeds the hooks (None without them)
    meta = kernel.launch_metadata(g, stream, *full) if enter is not None else None
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, meta, enter,
               knobs.runtime.launch_exit_hook, *full)
    return True


def _m_bucket(M: int) -> int:
    """Token counts share a launch plan per power of two: a new M (variable-length batches) reuses the
    config autotuned for its bucket instead of re-running the autotuner."""
    return _next_pow2(M)


def _record_plan(name, key, tuned) -> None:
    """Keep the config the autotuner just chose for ``(name, key)``; later calls launch it directly."""
    cfg = tuned.best_config
    _PLANS[(name, key)] = (dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)


def _launch(name, tuned, raw, grid, fixed, key, tensors, scalars, consts, sig) -> None:
    """Launch ``raw(*tensors, *scalars, **consts)`` through the jit function: under the interpreter with
    the ``fixed`` config, else with the plan autotuned for ``(name, key)`` (autotuning on the first call),
    recording the compiled kernel under ``sig`` for :func:`_run_cached`."""
    args = (*tensors, *scalars)
    if INTERPRET:
        raw[grid(fixed)](*args, **consts, **fixed)
        return
    plan = _PLANS.get((name, key))
    if plan is None:
        tuned[grid](*args, **consts)
        _record_plan(name, key, tuned)
        return
    _launch_plan(raw, grid, plan, args, consts, len(tensors), sig if _aligned(tensors) else None,
                 tensors[0].get_device())


def _launch_plan(raw, grid, plan, args, consts, n_ptrs: int, sig, device_index: int) -> None:
    """Launch ``raw`` with ``plan`` = (config kwargs, warps, stages) through the jit function; with ``sig``
    (not None: every pointer argument 16-byte aligned), record the compiled kernel, its grid and the
    arguments after the ``n_ptrs`` pointers under ``sig``."""
    kw, w, st = plan
    g = grid(kw)
    kernel = raw[g](*args, **consts, **kw, num_warps=w, num_stages=st)
    if sig is None or not _FAST_LAUNCH or kernel is None:
        return
    rest = raw.params[len(args):]
    if all(p.is_constexpr for p in rest):
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        named = {**consts, **kw}
        _COMPILED[sig] = (kernel, (*args[n_ptrs:], *(named[p.name] for p in rest)),  # constexprs in signature order
                          device_index, g + (1,) * (3 - len(g)))


_DUMMY_SEED: dict = {}


def _seed_ptr(seed, device):
    """The dropout seed tensor (int64, one element) the kernels read, or a dummy when there is none."""
    if seed is not None:
        if seed.dtype != torch.int64:
            raise ValueError(f"the dropout seed must be an int64 tensor, got {seed.dtype}; "
                             "make it with torch.randint(..., dtype=torch.int64)")
        return seed
    t = _DUMMY_SEED.get(device)
    if t is None:
        t = _DUMMY_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def proj(x: torch.Tensor, y: torch.Tensor, *, seed=None, p: float = 0.0) -> torch.Tensor:
    """``drop(x) @ y`` with x ``(M, K)`` any strides, y ``(K, R)`` any strides -> ``(M, R)`` in x.dtype."""
    M, K = x.shape
    R = y.shape[1]
    out = x.new_empty((M, R))
    if M == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()
    ptrs = (x, y, out, _seed_ptr(seed, x.device))
    sig = ("proj", x.get_device(), M, K, R, x.stride(), y.stride(), x.dtype, y.dtype, p)
    if _run_cached(sig, ptrs):
        return out
    drop = p > 0.0
    BR = _rank_block(R)
    fixed = dict(BM=16, BK=32)
    even_k = K % (fixed["BK"] if INTERPRET else 512) == 0  # every BK in the configs divides 512
    nr = _cdiv(R, BR)
    _launch(
        "proj", _proj_tuned, _proj_kernel,
        lambda meta: (_cdiv(M, meta["BM"]), nr), fixed, (_m_bucket(M), K, R, drop, x.dtype),
        ptrs,
        (M, K, R,
         x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
         float(p), 1.0 / (1.0 - p) if drop else 1.0),
        dict(DROP=drop, EVEN_K=even_k, DOT_PREC=_dot_prec(x.dtype), BR=BR), sig,
    )
    return out


def expand(pm: torch.Tensor, q: torch.Tensor, scale: float, *, bias=None, add=None, seed=None,
           p: float = 0.0, out_dtype=None) -> torch.Tensor:
    """``add + bias + drop(scale * pm @ q)``: pm ``(M, R)``, q ``(R, N)`` any strides -> ``(M, N)``."""
    M, R = pm.shape
    N = q.shape[1]
    out = torch.empty((M, N), device=pm.device, dtype=out_dtype or pm.dtype)
    if M == 0 or N == 0:
        return out
    cin = add if add is not None else out
    ptrs = (pm, q, bias if bias is not None else out, cin, out, _seed_ptr(seed, pm.device))
    sig = ("expand", pm.get_device(), M, N, R, pm.stride(), q.stride(), pm.dtype, q.dtype, out.dtype,
           None if bias is None else bias.dtype, None if add is None else (add.stride(), add.dtype), scale, p)
    if _run_cached(sig, ptrs):
        return out
    drop = p > 0.0
    BR = _rank_block(R)
    _launch(
        "expand", _expand_tuned, _expand_kernel,
        lambda meta: (_cdiv(M, meta["BM"]), _cdiv(N, meta["BN"])), dict(BM=16, BN=32),
        (_m_bucket(M), N, R, drop, add is not None, pm.dtype, out.dtype),
        ptrs,
        (M, N, R,
         pm.stride(0), pm.stride(1), q.stride(0), q.stride(1), cin.stride(0), cin.stride(1),
         out.stride(0), out.stride(1),
         float(scale), float(p), 1.0 / (1.0 - p) if drop else 1.0),
        dict(HAS_BIAS=bias is not None, HAS_ADD=add is not None, DROP=drop, DOT_PREC=_dot_prec(pm.dtype), BR=BR),
        sig,
    )
    return out


def _num_splits(M: int, D: int, R: int, BR: int, n_sm: int) -> int:
    blocks = _cdiv(D, 128) * _cdiv(R, BR)
    s = max(1, (2 * n_sm) // max(blocks, 1))
    s = min(s, max(1, M // 512), 32)
    return s


def _split_rows(M: int, D: int, R: int, BR: int, device) -> tuple[int, int]:
    """(number of split-M partials, rows per split) for a tn problem; rows is a multiple of every BM."""
    S = 1 if INTERPRET and M < 64 else _num_splits(M, D, R, BR, _sm_count(device))
    rows = _cdiv(_cdiv(M, S), _TN_ROW_QUANT) * _TN_ROW_QUANT
    return _cdiv(M, rows), rows


_N_SM = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _N_SM:
        _N_SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _N_SM[idx]


_LOCKS: dict = {}
_TN_MIN_BD = 32  # the narrowest D block of any tn config (the interpreter's): the most tiles a launch can have


def _tile_locks(device, n: int) -> torch.Tensor:
    """``n`` int32 locks of the kernels whose programs count or wait on each other (split-M tn, the TMA GEMM's
    projection tiles), zero between launches (each launch's last program resets its own).  One buffer per
    device and stream, so launches on two streams never share one; under CUDA graph capture a fresh one that
    the graph owns and zeroes at every replay, so no two graphs share one either."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    stream = None if device.type != "cuda" else torch._C._cuda_getCurrentRawStream(device.index)
    key = (device, stream)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < n:
        locks = _LOCKS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return locks


def tn(pm: torch.Tensor, x: torch.Tensor, scale: float, *, seed=None, p: float = 0.0,
       transpose_out: bool = False, out_dtype=torch.float32) -> torch.Tensor:
    """``scale * pm^T @ drop(x)``: pm ``(M, R)``, x ``(M, D)`` -> ``(R, D)`` (or ``(D, R)`` if transpose_out).

    fp32 accumulation; split-M partials in fp32, summed in a fixed order inside the launch (deterministic).
    """
    M, R = pm.shape
    D = x.shape[1]
    shape = (D, R) if transpose_out else (R, D)
    if M == 0 or D == 0 or R == 0:
        return torch.zeros(shape, device=x.device, dtype=out_dtype)
    BR = _rank_block(R)
    device = x.device
    S, rows = _split_rows(M, D, R, BR, device)
    out = torch.empty(shape, device=device, dtype=out_dtype)
    part = torch.empty((S, R * D), device=device, dtype=torch.float32) if S > 1 else out
    nr = _cdiv(R, BR)
    ptrs = (pm, x, part, out, _seed_ptr(seed, device), _tile_locks(device, _cdiv(D, _TN_MIN_BD) * nr))
    sig = ("tn", x.get_device(), M, D, R, pm.stride(), x.stride(), pm.dtype, x.dtype, out_dtype, transpose_out,
           scale, p)
    if _run_cached(sig, ptrs):
        return out
    drop = p > 0.0
    sor, sod = (1, R) if transpose_out else (D, 1)
    fixed = dict(BM=16, BD=32)
    even_d = D % (fixed["BD"] if INTERPRET else 256) == 0
    _launch(
        "tn", _tn_tuned, _tn_kernel,
        lambda meta: (_cdiv(D, meta["BD"]), nr, S), fixed, (_m_bucket(M), D, R, drop, x.dtype, transpose_out),
        ptrs,
        (M, D, R, rows, S,
         pm.stride(0), pm.stride(1), x.stride(0), x.stride(1), R * D, sor, sod,
         float(scale), float(p)),
        dict(DROP=drop, EVEN_D=even_d, DOT_PREC=_dot_prec(x.dtype), BR=BR), sig,
    )
    return out


def tn2(pa: torch.Tensor, xa: torch.Tensor, pb: torch.Tensor, xb: torch.Tensor, scale: float, *, seed=None,
        p_a: float = 0.0, p_b: float = 0.0, dtype_a=torch.float32, dtype_b=torch.float32):
    """``(scale * pa^T @ drop(xa), (scale * pb^T @ drop(xb))^T)`` in one launch (dA, dB of LoRA).

    pa, pb ``(M, R)``; xa ``(M, DA)``; xb ``(M, DB)`` -> ``(R, DA)`` in dtype_a and ``(DB, R)`` in dtype_b.
    Both drops use ``seed``; at most one of p_a, p_b is non-zero in LoRA.
    """
    M, R = pa.shape
    DA, DB = xa.shape[1], xb.shape[1]
    if M == 0 or R == 0 or DA == 0 or DB == 0:
        return (tn(pa, xa, scale, seed=seed, p=p_a, out_dtype=dtype_a),
                tn(pb, xb, scale, seed=seed, p=p_b, transpose_out=True, out_dtype=dtype_b))
    device = xa.device
    BR = _rank_block(R)
    S, rows = _split_rows(M, DA + DB, R, BR, device)
    out_a = torch.empty((R, DA), device=device, dtype=dtype_a)
    out_b = torch.empty((DB, R), device=device, dtype=dtype_b)
    part = torch.empty((S, R * (DA + DB)), device=device, dtype=torch.float32) if S > 1 else out_a
    nr = _cdiv(R, BR)
    ptrs = (pa, xa, out_a, pb, xb, out_b, part, _seed_ptr(seed, device),
            _tile_locks(device, (_cdiv(DA, _TN_MIN_BD) + _cdiv(DB, _TN_MIN_BD)) * nr))
    sig = ("tn2", xa.get_device(), M, DA, DB, R, pa.stride(), xa.stride(), pb.stride(), xb.stride(),
           pa.dtype, xa.dtype, pb.dtype, xb.dtype, dtype_a, dtype_b, scale, p_a, p_b)
    if _run_cached(sig, ptrs):
        return out_a, out_b
    fixed = dict(BM=16, BD=32)
    q = fixed["BD"] if INTERPRET else 256
    drop_a, drop_b = p_a > 0.0, p_b > 0.0
    _launch(
        "tn2", _tn2_tuned, _tn2_kernel,
        lambda meta: (_cdiv(DA, meta["BD"]) + _cdiv(DB, meta["BD"]), nr, S), fixed,
        (_m_bucket(M), DA, DB, R, drop_a, drop_b, xa.dtype),
        ptrs,
        (M, DA, DB, R, rows, S,
         pa.stride(0), pa.stride(1), xa.stride(0), xa.stride(1),
         pb.stride(0), pb.stride(1), xb.stride(0), xb.stride(1),
         float(scale), float(p_a if drop_a else p_b)),
        dict(DROP_A=drop_a, DROP_B=drop_b, EVEN_A=DA % q == 0, EVEN_B=DB % q == 0,
             DOT_PREC=_dot_prec(xa.dtype), BR=BR), sig,
    )
    return out_a, out_b


def gemm_lora(x: torch.Tensor, y: torch.Tensor, pm=None, q=None, scale: float = 1.0, bias=None,
              tma=None) -> torch.Tensor:
    """``x @ y + pm @ (scale * q) + bias`` in one Triton GEMM; x ``(M, K)``, y ``(K, N)``, pm ``(M, R)``, q ``(R, N)``.

    ``tma``: whether the TMA kernel applies, if the caller already asked ``tma_eligible``; None: ask here.
    """
    M, K = x.shape
    N = y.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    has_lora = pm is not None and pm.shape[1] > 0
    if has_lora and (tma_eligible(x, y, pm, q) if tma is None else tma):
        _gemm_lora_tma(x, y, pm, q, scale, bias, out)
        return out
    R = pm.shape[1] if has_lora else 0
    ptrs = (x, y, pm if has_lora else x, q if has_lora else y, bias if bias is not None else out, out)
    sig = ("gemm", x.get_device(), M, N, K, R, x.stride(), y.stride(), x.dtype, y.dtype,
           (pm.stride(), q.stride(), pm.dtype, q.dtype) if has_lora else None, None if bias is None else bias.dtype,
           scale)
    if _run_cached(sig, ptrs):
        return out
    fixed = dict(BM=16, BN=32, BK=32, GROUP_M=4)
    even_k = K % (fixed["BK"] if INTERPRET else 64) == 0
    _launch(
        "gemm", _gemm_tuned, _gemm_lora_kernel,
        lambda meta: (_cdiv(M, meta["BM"]) * _cdiv(N, meta["BN"]),), fixed,
        (_m_bucket(M), N, K, R, has_lora, x.dtype, y.stride(0) == 1),
        ptrs,
        (M, N, K, R,
         x.stride(0), x.stride(1), y.stride(0), y.stride(1),
         pm.stride(0) if has_lora else 0, pm.stride(1) if has_lora else 0,
         q.stride(0) if has_lora else 0, q.stride(1) if has_lora else 0,
         out.stride(0), out.stride(1),
         float(scale)),
        dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, EVEN_K=even_k, DOT_PREC=_dot_prec(x.dtype),
             BR=_rank_block(max(R, 1))), sig,
    )
    return out


def proj_tiles_fit(M: int, N: int, device) -> bool:
    """Whether ``gemm_lora_proj``'s projection tiles fit in the time its round-robin tile schedule leaves
    idle, reckoned with the 128 x 256 tiles the TMA configs take at the sizes ``"auto"`` fuses: the last wave
    is short, and no program of it gets more than two projection tiles (one costs ~0.3 of a GEMM tile's
    time: BM rows read at one SM's share of the bandwidth, against 2 BM BN K flops at its share of the peak)."""
    n_sm = _sm_count(device)
    num_m = _cdiv(M, 128)
    tiles = num_m * _cdiv(N, 256)
    short = tiles % n_sm
    return tiles > n_sm and short != 0 and _cdiv(num_m, n_sm - short) <= 2


def gemm_lora_proj(x: torch.Tensor, y: torch.Tensor, rop: torch.Tensor, q: torch.Tensor, scale: float = 1.0,
                   bias=None, eligible=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ y + pm @ (scale * q) + bias, pm)`` with ``pm = x @ rop`` made in the same TMA GEMM launch, by
    projection tiles that run first on the programs its schedule leaves a tile short (no launch of its own;
    see ``proj_tiles_fit`` for when that is free).  x ``(M, K)``, y ``(K, N)``, rop ``(K, R)``, q ``(R, N)``;
    ``pm`` ``(M, R)`` comes back in x's dtype.  Needs ``tma_eligible_proj(x, y, rop, q)``; ``eligible``: its
    value if the caller already asked (the layer's path does), None: ask here.

    Raises:
        ValueError: when the TMA kernel cannot take these operands (use ``proj`` and ``gemm_lora`` then).
    """
    if not (tma_eligible_proj(x, y, rop, q) if eligible is None else eligible):
        raise ValueError("gemm_lora_proj needs the TMA GEMM (Hopper or newer, 16-bit x, rank <= 64, TMA-aligned "
                         f"operands); got x {tuple(x.shape)} {x.dtype}, rop {tuple(rop.shape)} {rop.dtype}: "
                         "call proj() and gemm_lora() instead")
    M, N = x.shape[0], y.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pm = torch.empty((M, rop.shape[1]), device=x.device, dtype=x.dtype)
    if M == 0:
        return out, pm
    if N == 0:
        return out, proj(x, rop)
    _gemm_lora_tma(x, y, pm, q, scale, bias, out, rop)
    return out, pm


_CAPABILITY: dict = {}


def _is_hopper_or_newer(device) -> bool:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)[0]
    return _CAPABILITY[idx] >= 9


def _tma_ready(t: torch.Tensor, transposed: bool = False) -> bool:
    """A 2-D tensor (or, ``transposed``, the row-major tensor behind a transposed view) that a TMA
    descriptor can address: unit inner stride, 16-byte aligned base and row stride."""
    inner, outer = (t.stride(0), t.stride(1)) if transposed else (t.stride(1), t.stride(0))
    return inner == 1 and t.data_ptr() % 16 == 0 and (outer * t.element_size()) % 16 == 0


def tma_eligible(x, y, pm, q) -> bool:
    """Whether ``gemm_lora(x, y, pm, q)`` runs the TMA kernel: Hopper or newer (or the interpreter),
    16-bit activations on the GPU, rank <= 64 (one rank tile), x, y, q laid out as TMA needs them (``y``, ``q``
    both transposed views of row-major (N, K) / (N, R) tensors, or both row-major), and ``pm`` with unit
    stride along the rank (the kernel reads its rows with plain loads)."""
    return (pm is not None and pm.dtype == x.dtype and pm.stride(1) == 1
            and _tma_operands_ready(x, y, q, pm.shape[1]))


def tma_eligible_proj(x, y, rop, q) -> bool:
    """Whether ``gemm_lora_proj(x, y, rop, q)`` can run: as :func:`tma_eligible`, with ``rop`` ``(K, R)`` in
    x's dtype or fp32, a transposed view of a row-major ``(R, K)`` tensor or row-major itself, TMA-addressable."""
    return (rop is not None and rop.dtype in (x.dtype, torch.float32) and rop.shape[0] == x.shape[1]
            and rop.shape[1] == q.shape[0]
            and _tma_operands_ready(x, y, q, rop.shape[1]) and _tma_ready(rop, _is_transposed(rop)))


def _tma_operands_ready(x, y, q, R: int) -> bool:
    """The conditions the TMA GEMM puts on x, y, q and the rank R (see :func:`tma_eligible`)."""
    if TensorDescriptor is None:
        return False
    if INTERPRET:
        if x.device.type != "cpu":
            return False
    elif not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _is_hopper_or_newer(x.device)):
        return False
    if y.dtype != x.dtype or not 0 < R <= _MAX_BR or q.dtype not in (x.dtype, torch.float32):
        return False
    b_nk = _is_transposed(y)
    if b_nk != _is_transposed(q):
        return False
    return (y.shape[1] * x.element_size()) % 16 == 0 and _tma_ready(x) and _tma_ready(y, b_nk) and _tma_ready(q, b_nk)


def _is_transposed(t: torch.Tensor) -> bool:
    """A 2-D transposed view of a row-major tensor (unit stride along dim 0)."""
    return t.stride(0) == 1 and t.stride(1) != 1


def _tma_desc(t: torch.Tensor, block, transposed: bool = False):
    """TMA descriptor of ``t`` (row-major), or with ``transposed`` of the row-major tensor behind the
    transposed view ``t``, built without materialising that tensor's view.

    The fields are set directly, skipping ``TensorDescriptor``'s own checks (half of its host time):
    every caller has checked the same conditions (alignment, unit inner stride) in ``tma_eligible``.
    """
    desc = _new_object(TensorDescriptor)  # padding / round_f32_to_tf32 keep their class defaults
    desc.base = t
    if transposed:
        desc.shape, desc.strides = [t.shape[1], t.shape[0]], [t.stride(1), 1]
    else:
        desc.shape, desc.strides = [t.shape[0], t.shape[1]], [t.stride(0), 1]
    desc.block_shape = block
    return desc


_new_object = object.__new__


def _tma_plan_key(x, y, pm, q, has_bias: bool, rop=None) -> tuple:
    """The ``_PLANS`` key of the TMA GEMM's launch plan for ``gemm_lora(x, y, pm, q)`` (``("tma_gemm", key)``):
    one autotuned config per M bucket, N, K, rank block, B layout, bias and dtypes; with ``rop``
    (``gemm_lora_proj``), also its layout and dtype."""
    return (_m_bucket(x.shape[0]), y.shape[1], x.shape[1], _rank_block(pm.shape[1]), _is_transposed(y), has_bias,
            x.dtype, q.dtype, None if rop is None else (_is_transposed(rop), rop.dtype))


# Block shapes ((BM, BK), B's, Q's, C's, Rop's) of the TMA descriptors of each recorded launch, by
# the launch's call signature: a repeat call builds its descriptors from them and launches (_run_cached).
_TMA_BLOCKS: dict = {}


def _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk: bool, rop, flags) -> tuple:
    """The TMA GEMM's pointer arguments: descriptors of x, y, q, out with ``blocks``, the bias, rop's
    descriptor, pm and the flags (without ``rop``, x's descriptor and the bias stand in for the last two)."""
    bx, by, bq, bc, br = blocks
    x_desc = _tma_desc(x, bx)
    r_desc = x_desc if rop is None else _tma_desc(rop, br, _is_transposed(rop))
    return (x_desc, _tma_desc(y, by, b_nk), _tma_desc(q, bq, b_nk), _tma_desc(out, bc), bias_ptr, r_desc, pm,
            bias_ptr if flags is None else flags)


def _gemm_lora_tma(x, y, pm, q, scale, bias, out, rop=None) -> None:
    """``out = x @ y + pm @ (scale * q) + bias`` through the TMA kernel (``tma_eligible`` holds); with ``rop``
    (``tma_eligible_proj`` holds), the kernel first writes ``pm = x @ rop`` itself (FUSE_PROJ)."""
    M, K = x.shape
    N, R = y.shape[1], pm.shape[1]
    b_nk = _is_transposed(y)  # y, q: transposed views of row-major (N, K) / (N, R) tensors
    bias_ptr = bias if bias is not None else out
    fuse = rop is not None
    r_t = fuse and _is_transposed(rop)
    flags = _tile_locks(x.device, _cdiv(M, _TMA_MIN_BM) + 2) if fuse else None  # a flag per row block, 2 counters
    sig = ("tma_gemm", out.get_device(), M, N, K, R, pm.stride(0), b_nk, x.dtype, pm.dtype, q.dtype, scale,
           None if bias is None else bias.dtype, (r_t, rop.dtype) if fuse else None)
    checked = (bias_ptr, pm, flags) if fuse else (bias_ptr, pm)
    blocks = _TMA_BLOCKS.get(sig)
    if blocks is not None and _run_cached(sig, _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk, rop, flags),
                                          checked):
        return
    BR = _rank_block(R)
    key = _tma_plan_key(x, y, pm, q, bias is not None, rop)
    plan = None if INTERPRET else _PLANS.get(("tma_gemm", key))
    if INTERPRET:  # odd M takes the split-store epilogue, so CI runs both epilogues
        kw, warps, stages = dict(BM=16, BN=32, BK=16, GROUP_M=2, STAGES=1, SPLIT_STORE=M % 2 == 1), 4, 1
    elif plan is not None:
        kw, warps, stages = plan
    else:  # first call for this key: autotune (the pre-hook sets the descriptors' block shapes)
        kw = dict(BM=128, BN=128, BK=64, SPLIT_STORE=False)
    BM, BN, BK = kw["BM"], kw["BN"], kw["BK"]
    blocks = ([BM, BK], [BN, BK] if b_nk else [BK, BN], [BN, BR] if b_nk else [BR, BN],
              [BM, BN // 2 if kw["SPLIT_STORE"] else BN], [BR, BK] if r_t else [BK, BR])
    ptrs = _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk, rop, flags)
    # the interpreter runs programs one after another: with FUSE_PROJ one program walks every tile, so
    # each projection tile runs before the GEMM tiles that wait for it
    n_sm = 1 if INTERPRET and fuse else _sm_count(x.device)
    args = (*ptrs, M, N, K, R, pm.stride(0), float(scale))
    consts = dict(B_NK=b_nk, HAS_BIAS=bias is not None, FUSE_PROJ=fuse, R_T=r_t,
                  R_BYTES=rop.element_size() if fuse else 0, BR=BR, NUM_SMS=n_sm)

    def grid(meta):
        return (min(n_sm, _cdiv(M, meta["BM"]) * _cdiv(N, meta["BN"])),)
    if INTERPRET:
        _tma_gemm_lora_kernel[grid(kw)](*args, **consts, **kw, num_warps=warps, num_stages=stages)
    elif plan is None:
        _tma_gemm_tuned[grid](*args, **consts)
        _record_plan("tma_gemm", key, _tma_gemm_tuned)
    else:  # the descriptors' dtypes and block shapes follow from the signature and the plan
        aligned = _aligned(checked)
        _launch_plan(_tma_gemm_lora_kernel, grid, plan, args, consts, len(ptrs), sig if aligned else None,
                     out.get_device())
        if aligned and sig in _COMPILED:
            if len(_TMA_BLOCKS) >= _MAX_COMPILED:
                _TMA_BLOCKS.clear()
            _TMA_BLOCKS[sig] = blocks


def keep_mask(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    """The ``(M, D)`` bool keep-mask the kernels use for ``seed`` (for tests / references)."""
    out = torch.empty((M, D), dtype=torch.int8, device=device)
    if M and D:
        _mask_kernel[(_cdiv(M, 32), _cdiv(D, 64))](seed, out, M, D, float(p), BM=32, BD=64)
    return out.bool()


def autotune_choices() -> dict:
    """The configs autotune picked so far, per kernel and key (recorded by the benchmark)."""
    return {f"{name} {key}": f"{kw} warps={w} stages={st}" for (name, key), (kw, w, st) in _PLANS.items()}
