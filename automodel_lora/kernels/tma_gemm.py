"""The base GEMM with the low-rank term for Hopper (sm_90+), through TMA; optionally making the skinny
product itself (the fused projection).

    gemm_lora:      C = f * (X @ Y + P @ (s * Q)) + bias                 (M, N); f (N,) optional (DoRA), else 1
    gemm_lora_proj: P = X @ Rop, then C as above, in one launch          P (M, r), C (M, N)
      forward:  X = x (M, K),  Y = W^T (K, N), Rop = A^T (K, r), Q = B^T (r, N)    -> y,  xa
      dx:       X = dy (M, N), Y = W (N, K),   Rop = B (N, r),   Q = A (r, K)      -> dx, dyB

A persistent grid (one program per SM) walks the output tiles in grouped order; TMA loads zero-fill
past the edges and the store clips, so no masks.  ``B_NK``: Y and Q are stored (N, K) / (N, R) and
used transposed (the forward: W and lora_B), else stored (K, N) / (R, N) (the backward's dx: W and
lora_A).  The low-rank term is one more K step of depth BR after the main loop.  Its [BM, BR] tile
of P comes through registers (a plain load, issued before Q's TMA load so the two latencies overlap)
and is scaled there; Q's tile feeds the MMA from shared memory as loaded.  Q may be the fp32 master
adapter: then Q is scaled instead, in fp32, and rounded once to the compute dtype.

FUSE_PROJ: P = X @ Rop is not an input but made in this launch, by projection tiles (BM rows of P
each, a bandwidth-bound pass over those rows of X).  The GEMM tiles are handed out round-robin from
the last program down, so the programs left one GEMM tile short are the first ones; those run the
projection tiles before their GEMM tiles, in time they would otherwise spend idle at the end.  Each
projection tile stores its rows of P (an output: the caller keeps it for backward), raises its row
block's flag and counts itself done.  The GEMM tiles load their rows of P at the epilogue; until a
program has seen every projection done (after that it checks nothing), it waits there for its row
block's flag.  Waiting assumes, as stream-K GEMMs do, that the programs doing the projections are
resident (``options.all_programs_resident`` decides where the fused projection may run).  They are
the lowest-numbered ones, which the GPU places first, and row block m is done by program
m % (programs left short); nothing they do waits.  The last program to finish zeroes the flags and
counters for the next launch: flags[0:num_m], then the projection and program counters.  Rop is
(K, R) (R_T: a transposed view of a row-major (R, K) tensor, lora_A^T).

What TMA can address, and the descriptors, are in ``tma_desc.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import gemm_lora_portable, tile_coords
from .launch import (
    COMPILED,
    INTERPRET,
    MAX_COMPILED,
    PLANS,
    aligned,
    bench,
    cdiv,
    launch_plan,
    m_bucket,
    rank_block,
    record_plan,
    run_cached,
    shared_memory_per_block,
    sm_count,
    tile_locks,
)
from .proj import proj
from .tma_desc import is_transposed, tma_desc, tma_eligible, tma_eligible_proj


@triton.jit
def _projection_tiles(a_desc, r_desc, c_desc, pm_ptr, flag_ptr, M, R, spm, num_m, num_tiles, k_tiles,
                      R_T: tl.constexpr, R_BYTES: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      BR: tl.constexpr, STAGES: tl.constexpr):
    """FUSE_PROJ: the programs left a GEMM tile short make the rows of P = X @ Rop, one BM row block each,
    and raise that block's flag (then count it done in flag[num_m])."""
    rr = tl.arange(0, BR)
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


@triton.jit
def _await_row_block(flag_ptr, num_m, pid_m, all_ready):
    """FUSE_PROJ: wait for row block ``pid_m``'s flag unless every projection tile is known done; returns
    whether they all are (then later tiles of this program check nothing)."""
    if not all_ready:
        all_ready = tl.atomic_add(flag_ptr + num_m, 0, sem="acquire", scope="gpu") == num_m
        if not all_ready:
            while tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire", scope="gpu") == 0:
                pass
    return all_ready


@triton.jit
def _reset_flags(flag_ptr, num_m, BM: tl.constexpr):
    """FUSE_PROJ: the last program done zeroes the row-block flags and both counters for the next launch."""
    if tl.atomic_add(flag_ptr + num_m + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        for m0 in range(0, num_m + 2, BM):
            rb = m0 + tl.arange(0, BM)
            tl.store(flag_ptr + rb, tl.zeros((BM,), dtype=tl.int32), mask=rb < num_m + 2)


@triton.jit
def _tma_gemm_lora_kernel(
    a_desc, b_desc, q_desc, c_desc, bias_ptr, r_desc, pm_ptr, flag_ptr, f_ptr,
    M, N, K, R, spm, scale,
    B_NK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, FUSE_PROJ: tl.constexpr,
    R_T: tl.constexpr, R_BYTES: tl.constexpr,
    Q_BYTES: tl.constexpr,  # Q's element size: only an autotune key (descriptors give the autotuner no dtype)
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
        _projection_tiles(a_desc, r_desc, c_desc, pm_ptr, flag_ptr, M, R, spm, num_m, num_tiles, k_tiles,
                          R_T, R_BYTES, BM, BK, BR, STAGES)
    all_ready = False  # FUSE_PROJ: this program has seen every projection tile done
    num_in_group = GROUP_M * num_n
    # the epilogue keeps its own tile counter (as Triton's persistent-matmul tutorial does) so the
    # flattened loop can overlap a tile's store with the next tile's loads
    tile_c = first_tile - NUM_SMS
    for tile in tl.range(first_tile, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = tile_coords(tile, num_in_group, num_m, GROUP_M)
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
            all_ready = _await_row_block(flag_ptr, num_m, pid_m, all_ready)
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
        pid_m, pid_n = tile_coords(tile_c, num_in_group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rn = off_n + tl.arange(0, BN)
        if HAS_SCALE:  # the column scale applies to the product and the term, before the bias
            acc *= tl.load(f_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if SPLIT_STORE:  # two [BM, BN/2] stores: half the epilogue's shared memory (BN=256 at r=64)
            c0, c1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BN // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
    if FUSE_PROJ:
        _reset_flags(flag_ptr, num_m, BM)


def _tma_block_shapes(nargs) -> None:
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config being timed."""
    BM, BN, BK, BR, b_nk = nargs["BM"], nargs["BN"], nargs["BK"], nargs["BR"], nargs["B_NK"]
    nargs["a_desc"].block_shape = [BM, BK]
    nargs["b_desc"].block_shape = [BN, BK] if b_nk else [BK, BN]
    nargs["q_desc"].block_shape = [BN, BR] if b_nk else [BR, BN]
    nargs["c_desc"].block_shape = [BM, BN // 2 if nargs["SPLIT_STORE"] else BN]
    if nargs["FUSE_PROJ"]:  # else r_desc is a stand-in: the kernel does not read it
        nargs["r_desc"].block_shape = [BR, BK] if nargs["R_T"] else [BK, BR]


def tma_smem_floor(cfg_kwargs: dict, q_bytes: int, br: int) -> int:
    """Shared memory (bytes) a config needs at least: the pipelined x / y tiles, the Q tile as loaded, and its
    16-bit copy for the rank step's dot when Q is fp32 (the output tile reuses the pipeline's buffers).  An
    fp32 Q at rank block 64 puts the BN=256, 3-stage configs at 245760 bytes, over the 232448 of an H100."""
    BM, BN, BK, stages = cfg_kwargs["BM"], cfg_kwargs["BN"], cfg_kwargs["BK"], cfg_kwargs["STAGES"]
    q_tile = br * BN * q_bytes + (br * BN * 2 if q_bytes != 2 else 0)
    return stages * (BM + BN) * BK * 2 + q_tile


def _prune_to_fit(configs, named_args, **kwargs):
    """Autotune early prune: drop configs whose shared-memory floor exceeds the device's before any is compiled
    (such a config reached a launch and raised OutOfResources on an H100); the smallest config is kept
    whatever happens."""
    device = torch.cuda.current_device()
    limit = shared_memory_per_block(device)
    fit = [c for c in configs if tma_smem_floor(c.kwargs, kwargs["Q_BYTES"], kwargs["BR"]) <= limit]
    return fit or [min(configs, key=lambda c: tma_smem_floor(c.kwargs, kwargs["Q_BYTES"], kwargs["BR"]))]


# Configs measured per problem on an H100 (BM=128, BK=64; benchmarks/DESIGN.md): BN=256 with 3 stages is
# the fastest at the 8B shapes, grouped by 8 or 16 row blocks, whole or split store (the split store is
# what fits in shared memory at r=64); BN=128 with 4 stages is the smaller fallback.  2-stage, 8-warp
# BN=128 and BM=256 configs never won there and are not compiled.
_tma_gemm_tuned = triton.autotune(
    configs=[triton.Config(dict(BM=128, BN=bn, BK=64, GROUP_M=gm, STAGES=st, SPLIT_STORE=sp), num_warps=w,
                           num_stages=st, pre_hook=_tma_block_shapes)
             for bn, st, w, sp, gm in ((256, 3, 8, False, 8), (256, 3, 8, True, 8), (256, 3, 8, False, 16),
                                       (256, 3, 8, True, 16), (128, 4, 4, False, 8))],
    # Q_BYTES: an fp32 Q tile takes twice the shared memory, so a config chosen for a 16-bit Q may not fit
    key=["M", "N", "K", "B_NK", "HAS_BIAS", "HAS_SCALE", "FUSE_PROJ", "R_T", "R_BYTES", "Q_BYTES", "BR"],
    do_bench=bench,
    prune_configs_by={"early_config_prune": _prune_to_fit},
)(_tma_gemm_lora_kernel)

# The smallest BM of any config: the most row blocks (hence flags) a launch can have.
TMA_MIN_BM = 16 if INTERPRET else min(cfg.kwargs["BM"] for cfg in _tma_gemm_tuned.configs)


def tma_plan_key(x, y, pm, q, has_bias: bool, rop=None, has_scale: bool = False) -> tuple:
    """The ``launch.PLANS`` key of the TMA GEMM's launch plan for ``gemm_lora(x, y, pm, q)``
    (``("tma_gemm", key)``): one autotuned config per M bucket, N, K, rank block, B layout, bias, column scale
    and dtypes; with ``rop`` (``gemm_lora_proj``), also its layout and dtype."""
    return (m_bucket(x.shape[0]), y.shape[1], x.shape[1], rank_block(pm.shape[1]), is_transposed(y), has_bias,
            x.dtype, q.dtype, None if rop is None else (is_transposed(rop), rop.dtype), has_scale)


# Block shapes ((BM, BK), B's, Q's, C's, Rop's) of the TMA descriptors of each recorded launch, by
# the launch's call signature: a repeat call builds its descriptors from them and launches (run_cached).
_TMA_BLOCKS: dict = {}


def _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk: bool, rop, flags, f_ptr) -> tuple:
    """The TMA GEMM's pointer arguments: descriptors of x, y, q, out with ``blocks``, the bias, rop's
    descriptor, pm, the flags and the column scale (without ``rop``, x's descriptor and the bias stand in for
    rop's descriptor and the flags; ``f_ptr``: the scale, or the bias standing in)."""
    bx, by, bq, bc, br = blocks
    x_desc = tma_desc(x, bx)
    r_desc = x_desc if rop is None else tma_desc(rop, br, is_transposed(rop))
    return (x_desc, tma_desc(y, by, b_nk), tma_desc(q, bq, b_nk), tma_desc(out, bc), bias_ptr, r_desc, pm,
            bias_ptr if flags is None else flags, f_ptr)


def _tma_config(M: int, plan):
    """(config kwargs, warps, stages) of a launch: the interpreter's fixed one (odd M takes the split-store
    epilogue, so CI runs both epilogues), the recorded ``plan``, or the autotuner's starting point."""
    if INTERPRET:
        return dict(BM=16, BN=32, BK=16, GROUP_M=2, STAGES=1, SPLIT_STORE=M % 2 == 1), 4, 1
    if plan is not None:
        return plan
    return dict(BM=128, BN=128, BK=64, SPLIT_STORE=False), None, None  # the pre-hook sets the block shapes


def gemm_lora_tma(x, y, pm, q, scale, bias, out, rop=None, *, col_scale=None, fast_launch: bool = True) -> None:
    """``out = col_scale * (x @ y + pm @ (scale * q)) + bias`` through the TMA kernel (``tma_eligible`` holds;
    ``col_scale`` ``(N,)`` contiguous or None: 1); with ``rop`` (``tma_eligible_proj`` holds), the kernel first
    writes ``pm = x @ rop`` itself (FUSE_PROJ)."""
    M, K = x.shape
    N, R = y.shape[1], pm.shape[1]
    b_nk = is_transposed(y)  # y, q: transposed views of row-major (N, K) / (N, R) tensors
    bias_ptr = bias if bias is not None else out
    f_ptr = col_scale if col_scale is not None else bias_ptr
    fuse = rop is not None
    r_t = fuse and is_transposed(rop)
    flags = tile_locks(x.device, cdiv(M, TMA_MIN_BM) + 2) if fuse else None  # a flag per row block, 2 counters
    sig = ("tma_gemm", out.get_device(), M, N, K, R, pm.stride(0), b_nk, x.dtype, pm.dtype, q.dtype, scale,
           None if bias is None else bias.dtype, (r_t, rop.dtype) if fuse else None,
           None if col_scale is None else col_scale.dtype)
    checked = (bias_ptr, pm, flags, f_ptr) if fuse else (bias_ptr, pm, f_ptr)
    blocks = _TMA_BLOCKS.get(sig) if fast_launch else None
    if blocks is not None and run_cached(
            sig, _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk, rop, flags, f_ptr), checked):
        return
    BR = rank_block(R)
    key = tma_plan_key(x, y, pm, q, bias is not None, rop, col_scale is not None)
    plan = None if INTERPRET else PLANS.get(("tma_gemm", key))
    kw, warps, stages = _tma_config(M, plan)
    BM, BN, BK = kw["BM"], kw["BN"], kw["BK"]
    blocks = ([BM, BK], [BN, BK] if b_nk else [BK, BN], [BN, BR] if b_nk else [BR, BN],
              [BM, BN // 2 if kw["SPLIT_STORE"] else BN], [BR, BK] if r_t else [BK, BR])
    ptrs = _tma_ptrs(x, y, pm, q, out, bias_ptr, blocks, b_nk, rop, flags, f_ptr)
    # the interpreter runs programs one after another: with FUSE_PROJ one program walks every tile, so
    # each projection tile runs before the GEMM tiles that wait for it
    n_sm = 1 if INTERPRET and fuse else sm_count(x.device)
    args = (*ptrs, M, N, K, R, pm.stride(0), float(scale))
    consts = dict(B_NK=b_nk, HAS_BIAS=bias is not None, HAS_SCALE=col_scale is not None, FUSE_PROJ=fuse, R_T=r_t,
                  R_BYTES=rop.element_size() if fuse else 0, Q_BYTES=q.element_size(), BR=BR, NUM_SMS=n_sm)

    def grid(meta):
        return (min(n_sm, cdiv(M, meta["BM"]) * cdiv(N, meta["BN"])),)
    if INTERPRET:
        _tma_gemm_lora_kernel[grid(kw)](*args, **consts, **kw, num_warps=warps, num_stages=stages)
    elif plan is None:
        _tma_gemm_tuned[grid](*args, **consts)
        record_plan("tma_gemm", key, _tma_gemm_tuned)
    else:  # the descriptors' dtypes and block shapes follow from the signature and the plan
        ok = aligned(checked)
        launch_plan(_tma_gemm_lora_kernel, grid, plan, args, consts, len(ptrs), sig if ok else None,
                    out.get_device(), fast_launch)
        if ok and sig in COMPILED:
            if len(_TMA_BLOCKS) >= MAX_COMPILED:
                _TMA_BLOCKS.clear()
            _TMA_BLOCKS[sig] = blocks


def gemm_lora(x: torch.Tensor, y: torch.Tensor, pm=None, q=None, scale: float = 1.0, bias=None,
              tma=None, *, col_scale=None, fast_launch: bool = True) -> torch.Tensor:
    """``col_scale * (x @ y + pm @ (scale * q)) + bias`` in one Triton GEMM; x ``(M, K)``, y ``(K, N)``,
    pm ``(M, R)``, q ``(R, N)``, col_scale ``(N,)`` contiguous or None (1).

    The TMA kernel where it applies, else the portable one (``gemm.py``).  ``tma``: whether the TMA kernel
    applies, if the caller already asked ``tma_eligible``; None: ask here.  ``fast_launch``: as
    ``KernelOptions.fast_launch``.
    """
    M = x.shape[0]
    N = y.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    has_lora = pm is not None and pm.shape[1] > 0
    if has_lora and (tma_eligible(x, y, pm, q) if tma is None else tma):
        gemm_lora_tma(x, y, pm, q, scale, bias, out, col_scale=col_scale, fast_launch=fast_launch)
        return out
    return gemm_lora_portable(x, y, pm, q, scale, bias, out, col_scale=col_scale, fast_launch=fast_launch)


def proj_tiles_fit(M: int, N: int, n_sm: int) -> bool:
    """Whether ``gemm_lora_proj``'s projection tiles fit in the time its round-robin tile schedule leaves
    idle on ``n_sm`` SMs, reckoned with the 128 x 256 tiles the TMA configs take at the sizes ``"auto"`` fuses:
    the last wave is short, and no program of it gets more than two projection tiles (one costs ~0.3 of a GEMM
    tile's time: BM rows read at one SM's share of the bandwidth, against 2 BM BN K flops at its share of the
    peak)."""
    num_m = cdiv(M, 128)
    tiles = num_m * cdiv(N, 256)
    short = tiles % n_sm
    return tiles > n_sm and short != 0 and cdiv(num_m, n_sm - short) <= 2


def gemm_lora_proj(x: torch.Tensor, y: torch.Tensor, rop: torch.Tensor, q: torch.Tensor, scale: float = 1.0,
                   bias=None, eligible=None, *, col_scale=None,
                   fast_launch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(col_scale * (x @ y + pm @ (scale * q)) + bias, pm)`` (col_scale ``(N,)`` or None: 1) with ``pm = x @ rop``
    made in the same TMA GEMM launch, by projection tiles that run first on the programs its schedule leaves a
    tile short (no launch of its own; see ``proj_tiles_fit`` for when that is free).  x ``(M, K)``, y ``(K, N)``,
    rop ``(K, R)``, q ``(R, N)``; ``pm`` ``(M, R)`` comes back in x's dtype.  Needs
    ``tma_eligible_proj(x, y, rop, q)``; ``eligible``: its value if the caller already asked (the layer's path
    does), None: ask here.  Its programs wait on one another: call it only where all of them can be resident
    (``options.all_programs_resident``).

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
        return out, proj(x, rop, fast_launch=fast_launch)
    gemm_lora_tma(x, y, pm, q, scale, bias, out, rop, col_scale=col_scale, fast_launch=fast_launch)
    return out, pm
