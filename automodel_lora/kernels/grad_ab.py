"""The adapter gradients: split-M ``tn`` products, ``Out = s * P^T @ drop(X)``.

    dA = s * dyB^T @ drop_pre(x)       P = dyB (M, r), X = x  (M, K)  -> (r, K)    tn
    dB = s * drop_post(dy)^T @ xa      P = xa  (M, r), X = dy (M, N)  -> (N, r)    tn, transpose_out
    both in one launch                                                            tn2

Reads X once, accumulates in fp32.  M is split across grid axis 2 into S slices (enough programs to
fill the GPU when r * D is small); each slice writes an fp32 partial, and the last slice of a tile to
finish (counted on a self-resetting lock, ``launch.tile_locks``) sums the S partials in slice order
and writes Out in its dtype (the adapter's: fp32 masters get fp32 gradients): deterministic, one
launch, no reduction pass on the host side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from .launch import (
    INTERPRET,
    bench,
    cdiv,
    configs,
    dot_prec,
    launch,
    m_bucket,
    rank_block,
    run_cached,
    seed_tensor,
    sm_count,
    tile_locks,
)


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
            keep = philox_keep(seed_ptr, rm64, rd, D, p)
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


_tn_tuned = triton.autotune(
    configs=configs([
        (dict(BM=64, BD=128), 4, 4),
        (dict(BM=128, BD=128), 8, 3),
        (dict(BM=64, BD=256), 8, 4),
        (dict(BM=32, BD=256), 4, 4),
        (dict(BM=128, BD=64), 4, 4),
        (dict(BM=64, BD=64), 4, 5),
    ]),
    key=["M", "D", "R", "DROP"], do_bench=bench,
)(_tn_kernel)

_tn2_tuned = triton.autotune(
    configs=_tn_tuned.configs,
    key=["M", "DA", "DB", "R", "DROP_A", "DROP_B"], do_bench=bench,
)(_tn2_kernel)

# rows per split of the tn kernel are a multiple of every BM above
_TN_ROW_QUANT = 128


def num_splits(M: int, D: int, R: int, BR: int, n_sm: int) -> int:
    """Split-M slices of a tn problem on ``n_sm`` SMs: about two programs per SM, at least 256 rows a slice (a
    slice's fp32 partial, R x D, written and read back once, is then at most 1/4 of its rows' bf16 bytes at
    r = 16, and stays in L2), at most 32 slices. A small model's products (M = 4096 rows, D ~ 1000-2000) need
    the slices to fill the GPU."""
    blocks = cdiv(D, 128) * cdiv(R, BR)
    s = max(1, (2 * n_sm) // max(blocks, 1))
    s = min(s, max(1, M // 256), 32)
    return s


def split_rows(M: int, D: int, R: int, BR: int, device) -> tuple[int, int]:
    """(number of split-M partials, rows per split) for a tn problem; rows is a multiple of every BM."""
    S = 1 if INTERPRET and M < 64 else num_splits(M, D, R, BR, sm_count(device))
    rows = cdiv(cdiv(M, S), _TN_ROW_QUANT) * _TN_ROW_QUANT
    return cdiv(M, rows), rows


_TN_MIN_BD = 32  # the narrowest D block of any tn config (the interpreter's): the most tiles a launch can have


def tn(pm: torch.Tensor, x: torch.Tensor, scale: float, *, seed=None, p: float = 0.0,
       transpose_out: bool = False, out_dtype=torch.float32, fast_launch: bool = True) -> torch.Tensor:
    """``scale * pm^T @ drop(x)``: pm ``(M, R)``, x ``(M, D)`` -> ``(R, D)`` (or ``(D, R)`` if transpose_out).

    fp32 accumulation; split-M partials in fp32, summed in a fixed order inside the launch (deterministic).
    """
    M, R = pm.shape
    D = x.shape[1]
    shape = (D, R) if transpose_out else (R, D)
    if M == 0 or D == 0 or R == 0:
        return torch.zeros(shape, device=x.device, dtype=out_dtype)
    BR = rank_block(R)
    device = x.device
    S, rows = split_rows(M, D, R, BR, device)
    out = torch.empty(shape, device=device, dtype=out_dtype)
    part = torch.empty((S, R * D), device=device, dtype=torch.float32) if S > 1 else out
    nr = cdiv(R, BR)
    ptrs = (pm, x, part, out, seed_tensor(seed, device), tile_locks(device, cdiv(D, _TN_MIN_BD) * nr))
    sig = ("tn", x.get_device(), M, D, R, pm.stride(), x.stride(), pm.dtype, x.dtype, out_dtype, transpose_out,
           scale, p)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out
    drop = p > 0.0
    sor, sod = (1, R) if transpose_out else (D, 1)
    fixed = dict(BM=16, BD=32)
    even_d = D % (fixed["BD"] if INTERPRET else 256) == 0
    launch(
        "tn", _tn_tuned, _tn_kernel,
        lambda meta: (cdiv(D, meta["BD"]), nr, S), fixed, (m_bucket(M), D, R, drop, x.dtype, transpose_out),
        ptrs,
        (M, D, R, rows, S,
         pm.stride(0), pm.stride(1), x.stride(0), x.stride(1), R * D, sor, sod,
         float(scale), float(p)),
        dict(DROP=drop, EVEN_D=even_d, DOT_PREC=dot_prec(x.dtype), BR=BR), sig, fast_launch,
    )
    return out


def tn2(pa: torch.Tensor, xa: torch.Tensor, pb: torch.Tensor, xb: torch.Tensor, scale: float, *, seed=None,
        p_a: float = 0.0, p_b: float = 0.0, dtype_a=torch.float32, dtype_b=torch.float32, fast_launch: bool = True):
    """``(scale * pa^T @ drop(xa), (scale * pb^T @ drop(xb))^T)`` in one launch (dA, dB of LoRA).

    pa, pb ``(M, R)``; xa ``(M, DA)``; xb ``(M, DB)`` -> ``(R, DA)`` in dtype_a and ``(DB, R)`` in dtype_b.
    Both drops use ``seed``; at most one of p_a, p_b is non-zero in LoRA.
    """
    M, R = pa.shape
    DA, DB = xa.shape[1], xb.shape[1]
    if M == 0 or R == 0 or DA == 0 or DB == 0:
        return (tn(pa, xa, scale, seed=seed, p=p_a, out_dtype=dtype_a, fast_launch=fast_launch),
                tn(pb, xb, scale, seed=seed, p=p_b, transpose_out=True, out_dtype=dtype_b, fast_launch=fast_launch))
    device = xa.device
    BR = rank_block(R)
    S, rows = split_rows(M, DA + DB, R, BR, device)
    out_a = torch.empty((R, DA), device=device, dtype=dtype_a)
    out_b = torch.empty((DB, R), device=device, dtype=dtype_b)
    part = torch.empty((S, R * (DA + DB)), device=device, dtype=torch.float32) if S > 1 else out_a
    nr = cdiv(R, BR)
    ptrs = (pa, xa, out_a, pb, xb, out_b, part, seed_tensor(seed, device),
            tile_locks(device, (cdiv(DA, _TN_MIN_BD) + cdiv(DB, _TN_MIN_BD)) * nr))
    sig = ("tn2", xa.get_device(), M, DA, DB, R, pa.stride(), xa.stride(), pb.stride(), xb.stride(),
           pa.dtype, xa.dtype, pb.dtype, xb.dtype, dtype_a, dtype_b, scale, p_a, p_b)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out_a, out_b
    fixed = dict(BM=16, BD=32)
    q = fixed["BD"] if INTERPRET else 256
    drop_a, drop_b = p_a > 0.0, p_b > 0.0
    launch(
        "tn2", _tn2_tuned, _tn2_kernel,
        lambda meta: (cdiv(DA, meta["BD"]) + cdiv(DB, meta["BD"]), nr, S), fixed,
        (m_bucket(M), DA, DB, R, drop_a, drop_b, xa.dtype),
        ptrs,
        (M, DA, DB, R, rows, S,
         pa.stride(0), pa.stride(1), xa.stride(0), xa.stride(1),
         pb.stride(0), pb.stride(1), xb.stride(0), xb.stride(1),
         float(scale), float(p_a if drop_a else p_b)),
        dict(DROP_A=drop_a, DROP_B=drop_b, EVEN_A=DA % q == 0, EVEN_B=DB % q == 0,
             DOT_PREC=dot_prec(xa.dtype), BR=BR), sig, fast_launch,
    )
    return out_a, out_b

