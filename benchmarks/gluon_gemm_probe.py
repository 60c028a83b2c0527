"""Does a ping-pong warp-specialized persistent GEMM (Triton Gluon, sm_90) close the gap to cuBLAS?

    PYTHONPATH=$PWD:$PYTHONPATH python3 benchmarks/gluon_gemm_probe.py [--rounds 3]
    PYTHONPATH=/tmp/t36 python3 benchmarks/gluon_gemm_probe.py --compile-only    # no GPU: compile for sm_90 only

Measures C = A @ B + P @ (scale Q) in bf16 (fp32 accumulation), M = 8192, the layer's layouts: fwd y = x W^T
(B given as W [N, K] row-major, "B_NK"; Q as [N, R]) and bwd dx = dy W (B [K, N] row-major; Q [R, N]), at
(K, N) in (4096, 4096), (4096, 14336), (14336, 4096), plain (R = 0) and with R in (16, 64).  Variants:
  mm        torch's product (cuBLAS), the frozen GEMM alone
  tl_gemm   the library's Triton TMA GEMM (T.gemm_lora with pm given; R = 16 for the plain rows)
  g*        the Gluon kernel below in a few configurations (see VARIANTS)
Each Gluon variant is first checked in a child process (``--check NAME``, all at once, 240 s timeout, so that a
fault or a deadlock cannot take this run down): odd shapes M=1000, (K, N) in (520, 776), (136, 776), both
layouts, R in (0, 16, 64), with all SMs and with 3 programs (many tiles per program, so every barrier phase
wraps); a variant that fails to compile, faults, hangs or exceeds a relative Frobenius error of 1e-2 against
the fp32 reference is reported and left out.  Then per problem: the error of each variant (a wrong one is not
timed), and the median of per-variant do_bench_cudagraph times over --rounds rotated rounds.  Writes
$OUT/gluon_gemm_probe.json (after every problem); table last.  --variants / --kn pick subsets.

Kernel design (Triton 3.6 Gluon API, Hopper): a persistent grid of one program per SM walks the output tiles
pid, pid + grid, ... in grouped order (GROUP_M rows of tiles).  Three partitions:
  loader     (worker, 1 warp, 40 registers): per tile, the P [BM, R] and Q tiles (one shared buffer; its ready
             barrier is per consumer, its empty barrier shared), then the A / B K-tiles into a STAGES-deep ring
             (ready / empty mbarriers; expect-tx counts the full TMA boxes, which TMA zero-fills out of bounds).
  consumer 0 (default partition, 4 warps) and consumer 1 (worker, 4 warps) take this program's tiles in turn
             (local tile index t % 2): acc = scale * (P @ Q) (one synchronous wgmma, fp32) or zeros; then, once
             the other consumer has issued the K loop of tile t - 1 (order barrier pair, as CUTLASS ping-pong),
             the async wgmma K loop (one wgmma in flight; a stage is released when the wgmma reading it has
             retired), the order arrive for the other consumer, and the epilogue: bf16 into the consumer's own
             smem buffer and a TMA store, waited for only before its next epilogue.  While one consumer runs
             its rank step and epilogue, the other runs its K loop.
  The order barrier is not optional: both consumers wait on the same ring's ready barriers by parity, which
  is only sound when tile t - 1's waits have all passed before tile t's begin (else a wait two phases ahead
  passes at once).  Likewise the P/Q ready barrier is per consumer because the rank step runs before that
  order wait.  (A randomized model of this protocol, kept out of the repository, ran clean with the order
  barrier and failed without it.)
Registers: 4 + 4 + 1 warps (Triton pads the loader's warpgroup to 4 warps); the loader asks for 40 registers,
consumer 1 for 232, and Triton's setmaxnreg allocation gives the default partition what is left (232).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import rotated_cudagraph_us, run_env, write_json  # noqa: E402
from fuse_proj_probe import problem  # noqa: E402

SMEM_LIMIT = 232448  # bytes of dynamic shared memory per block on sm_90 (227 KB)
CONSUMER_REGS, LOADER_REGS = 232, 40

# name -> (BM, BN, BK, STAGES or None for as many as fit); BM x BN is one consumer's tile
VARIANTS = {
    "g128": (128, 128, 64, None),
    "g128_s3": (128, 128, 64, 3),
    "g256": (64, 256, 64, None),
}
GROUP_M = 8
SCALE = 2.0


# ----------------------------------------------------------------------------------------------------- kernel


@gluon.jit
def _schedule(M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """This program's share: (pid, programs, row blocks, column blocks, its number of tiles, K steps)."""
    pid = gl.program_id(0)
    num_progs = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    return pid, num_progs, num_pid_m, num_pid_n, gl.cdiv(num_pid_m * num_pid_n - pid, num_progs), gl.cdiv(K, BK)


@gluon.jit
def _tile_offsets(t, pid, num_progs, num_pid_m, num_pid_n, BM: gl.constexpr, BN: gl.constexpr,
                  GROUP_M: gl.constexpr):
    """(off_m, off_n) of this program's t-th tile (tile id pid + t * num_progs), grouped ordering."""
    tile = pid + t * num_progs
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_size = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_size
    pid_n = (tile % in_group) // group_size
    return pid_m * BM, pid_n * BN


@gluon.jit
def _loader(a_desc, b_desc, p_desc, q_desc, a_bufs, b_bufs, ready, empty, p_buf, q_buf, rank_ready, rank_empty,
            M, N, K, HAS_RANK: gl.constexpr, B_NK: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
            BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """TMA producer (1 warp): per tile, P / Q (when HAS_RANK), then the k_tiles A / B stages of the ring."""
    pid, num_progs, num_pid_m, num_pid_n, n_local, k_tiles = _schedule(M, N, K, BM, BN, BK)
    it = 0
    for t in range(n_local):
        off_m, off_n = _tile_offsets(t, pid, num_progs, num_pid_m, num_pid_n, BM, BN, GROUP_M)
        if HAS_RANK:
            # one P/Q buffer: its t-th fill waits for tile t - 1's consumer to have used it
            mbarrier.wait(rank_empty, (t & 1) ^ 1)
            bar = rank_ready.index(t % 2)
            mbarrier.expect(bar, p_desc.block_type.nbytes + q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(p_desc, [off_m, 0], bar, p_buf)
            if B_NK:
                tma.async_copy_global_to_shared(q_desc, [off_n, 0], bar, q_buf)
            else:
                tma.async_copy_global_to_shared(q_desc, [0, off_n], bar, q_buf)
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, kk * BK], ready.index(s), a_bufs.index(s))
            if B_NK:
                tma.async_copy_global_to_shared(b_desc, [off_n, kk * BK], ready.index(s), b_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(b_desc, [kk * BK, off_n], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(c_desc, a_bufs, b_bufs, ready, empty, p_buf, q_buf, rank_ready, rank_empty, order, c_bufs, scale,
              M, N, K, CONSUMER: gl.constexpr, HAS_RANK: gl.constexpr, B_NK: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """One math warpgroup: this program's tiles t with t % 2 == CONSUMER; rank step, K loop, TMA-store epilogue."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    pid, num_progs, num_pid_m, num_pid_n, n_local, k_tiles = _schedule(M, N, K, BM, BN, BK)
    c_smem = c_bufs.index(CONSUMER)  # [BM, BN]
    for t in range(CONSUMER, n_local, 2):
        off_m, off_n = _tile_offsets(t, pid, num_progs, num_pid_m, num_pid_n, BM, BN, GROUP_M)
        acc = gl.zeros([BM, BN], gl.float32, layout=mma_layout)
        if HAS_RANK:
            mbarrier.wait(rank_ready.index(CONSUMER), (t // 2) & 1)
            if B_NK:
                acc = warpgroup_mma(p_buf, q_buf.permute((1, 0)), acc, use_acc=False)
            else:
                acc = warpgroup_mma(p_buf, q_buf, acc, use_acc=False)
            mbarrier.arrive(rank_empty)
            acc = acc * scale
        # wait until the other consumer has issued the K loop of tile t - 1 (tile 0: passes at once)
        mbarrier.wait(order.index(CONSUMER), ((t // 2) + 1 - CONSUMER) & 1)
        it = t * k_tiles
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            if B_NK:
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            else:
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            # the wgmma of step kk - 1 has retired: its stage is free
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)
            it += 1
        mbarrier.arrive(order.index(1 - CONSUMER))
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        tma.store_wait(0)  # this consumer's previous TMA store has read c_smem
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(0)


@gluon.jit
def gemm_pingpong_kernel(a_desc, b_desc, p_desc, q_desc, c_desc, scale, M, N, K, HAS_RANK: gl.constexpr,
                         B_NK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """C [M, N] = A [M, K] @ B + P [M, R] @ (scale Q) (the P/Q term when HAS_RANK), persistent, num_warps = 4.

    Blocks (from the descriptors): a [BM, BK]; b [BN, BK] (B_NK: B given as [N, K]) or [BK, BN];
    p [BM, R]; q [BN, R] (B_NK) or [R, BN]; c [BM, BN].  p_desc / q_desc are None when not HAS_RANK.  K >= 1.
    """
    BM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = c_desc.block_type.shape[1]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    if HAS_RANK:
        p_buf = gl.allocate_shared_memory(dtype, p_desc.block_type.shape, p_desc.layout)
        q_buf = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        rank_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # one per consumer
        rank_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(rank_ready.index(i), count=1)
        mbarrier.init(rank_empty, count=1)
    else:  # placeholders, never touched
        p_buf = a_bufs.index(0)
        q_buf = b_bufs.index(0)
        rank_ready = order
        rank_empty = order.index(0)

    gl.warp_specialize([
        (_consumer, (c_desc, a_bufs, b_bufs, ready, empty, p_buf, q_buf, rank_ready, rank_empty, order, c_bufs,
                     scale, M, N, K, 0, HAS_RANK, B_NK, BM, BN, BK, STAGES, GROUP_M)),
        (_consumer, (c_desc, a_bufs, b_bufs, ready, empty, p_buf, q_buf, rank_ready, rank_empty, order, c_bufs,
                     scale, M, N, K, 1, HAS_RANK, B_NK, BM, BN, BK, STAGES, GROUP_M)),
        (_loader, (a_desc, b_desc, p_desc, q_desc, a_bufs, b_bufs, ready, empty, p_buf, q_buf, rank_ready,
                   rank_empty, M, N, K, HAS_RANK, B_NK, BM, BN, BK, STAGES, GROUP_M)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# ------------------------------------------------------------------------------------------------------- host


def blocks(BM, BN, BK, R, b_nk):
    """Block shapes of the five descriptors (a, b, p, q, c); p / q None when R == 0."""
    return ([BM, BK], [BN, BK] if b_nk else [BK, BN], [BM, R] if R else None,
            ([BN, R] if b_nk else [R, BN]) if R else None, [BM, BN])


def fit_stages(BM, BN, BK, R, stages=None):
    """``stages`` or as many ring stages as fit beside the two epilogue buffers and the P / Q tiles (max 6)."""
    if stages is not None:
        return stages
    fixed = 2 * (2 * BM * BN + (BM + BN) * R) + 1024  # epilogue buffers, P / Q, barriers and slack
    return min(6, (SMEM_LIMIT - fixed) // (2 * (BM + BN) * BK))


def _layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def gluon_gemm(a, b, pm, q, scale, cfg, num_sms):
    """``a @ b + pm @ (scale q)`` with the Gluon kernel; a (M, K), b (K, N), pm (M, R) or None, q (R, N).

    b and q are either both row-major (bwd) or both transposed views of row-major (N, K) / (N, R) (fwd).
    """
    BM, BN, BK, stages = cfg
    M, K = a.shape
    N = b.shape[1]
    b_nk = b.stride(0) == 1
    R = pm.shape[1] if pm is not None else 0
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    ba, bb, bp, bq, bc = blocks(BM, BN, BK, R, b_nk)

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, _layout(block))

    p_desc = q_desc = None
    if R:
        assert (q.stride(0) == 1) == b_nk, "b and q must share a layout"
        p_desc, q_desc = desc(pm, bp), desc(q.t() if b_nk else q, bq)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    gemm_pingpong_kernel[(min(num_sms, tiles), )](
        desc(a, ba), desc(b.t() if b_nk else b, bb), p_desc, q_desc, desc(out, bc), float(scale), M, N, K,
        HAS_RANK=R > 0, B_NK=b_nk, STAGES=fit_stages(BM, BN, BK, R, stages), GROUP_M=GROUP_M,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4)
    return out


def compile_only():
    """Compile every variant (plain, R 16, R 64; B_NK and not) for sm_90 without a GPU and print what came out."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", 90, 32)
    for name, cfg in VARIANTS.items():
        BM, BN, BK, stages = cfg
        for R in (0, 16, 64):
            for b_nk in (True, False):
                blks = blocks(BM, BN, BK, R, b_nk)
                sig, consts = {}, {}
                for arg, blk in zip(("a_desc", "b_desc", "p_desc", "q_desc", "c_desc"), blks, strict=True):
                    if blk is None:
                        sig[arg], consts[arg] = "constexpr", None
                    else:
                        sig[arg] = f"tensordesc<bf16[{blk[0]}, {blk[1]}],{_layout(blk)!r}>"
                sig.update(scale="fp32", M="i32", N="i32", K="i32")
                consts.update(HAS_RANK=R > 0, B_NK=b_nk, STAGES=fit_stages(BM, BN, BK, R, stages),
                              GROUP_M=GROUP_M, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS)
                for k in ("HAS_RANK", "B_NK", "STAGES", "GROUP_M", "CONSUMER_REGS", "LOADER_REGS"):
                    sig[k] = "constexpr"
                tag = f"{name:13s} R={R:2d} B_NK={b_nk!s:5s} stages={consts['STAGES']}"
                try:
                    kern = triton.compile(GluonASTSource(gemm_pingpong_kernel, sig, consts), target=target,
                                          options=dict(num_warps=4))
                except Exception as e:  # report, go on with the next one
                    print(f"{tag}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    traceback.print_exc(limit=2)
                    continue
                ttgir, ptx = kern.asm["ttgir"], kern.asm["ptx"]
                setmaxnreg = sorted({" ".join(line.split()).rstrip(";").replace(".sync.aligned.u32", "")
                                     for line in ptx.splitlines() if "setmaxnreg" in line})
                print(f"{tag}: ok shared={kern.metadata.shared} num_warps={kern.metadata.num_warps} "
                      f"warp_specialize={'ttg.warp_specialize' in ttgir} wgmma={ptx.count('wgmma.mma_async')} "
                      f"{setmaxnreg} | {_ptxas_usage(ptx)}", flush=True)


def _ptxas_usage(ptx):
    """ptxas -v's register / spill lines for ``ptx`` (sm_90a), with Triton's bundled ptxas."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        open(src, "w").write(ptx)
        res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    lines = [ln.split(":", 1)[-1].strip() for ln in res.stderr.splitlines() if "spill" in ln or "registers" in ln]
    return "; ".join(lines) or res.stderr.strip()[-200:]


# ---------------------------------------------------------------------------------------------------- problems


def rel_err(out, a, b, pm, q, scale):
    """Relative Frobenius error of ``out`` against the fp32 product."""
    ref = a.float() @ b.float()
    if pm is not None:
        ref += (pm.float() @ q.float()) * scale
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_variant(name):
    """Child process (``--check NAME``): odd shapes, both layouts, R in (0, 16, 64), with all SMs and with 3
    programs (many tiles per program: ring / rank / order barrier phases wrap); prints ``RESULT max_err``."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    worst = 0.0
    for K, N in ((520, 776), (136, 776)):
        for direction in ("fwd", "bwd"):
            for r in (0, 16, 64):
                a, b, rop, q = problem(direction, K, N, max(r, 16), M=1000)
                pm, q = (a @ rop, q) if r else (None, None)
                for progs in (num_sms, 3):
                    err = rel_err(gluon_gemm(a, b, pm, q, SCALE, VARIANTS[name], progs), a, b, pm, q, SCALE)
                    print(f"{name} M=1000 K={K} N={N} {direction} r={r} programs={progs}: rel err {err:.2e}",
                          flush=True)
                    worst = max(worst, err) if err == err else float("inf")
    print(f"RESULT {worst}", flush=True)


def checked_variants(names, timeout_s=240):
    """The variants whose ``--check`` child (all run at once) passes within ``timeout_s`` in all: a Gluon variant
    that fails to compile, faults, deadlocks or is wrong is reported and left out, without touching this process."""
    deadline = time.monotonic() + timeout_s
    procs = {n: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--check", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for n in names}
    ok = []
    for n, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\nTIMEOUT after {timeout_s} s (deadlock?)"
        lines = out.strip().splitlines()
        print("\n".join(lines[-40:]), flush=True)
        worst = float(lines[-1].split()[1]) if lines and lines[-1].startswith("RESULT") else float("inf")
        print(f"==> {n}: {'ok' if worst < 1e-2 else 'FAILED, skipped'} (max rel err {worst:.2e})", flush=True)
        if worst < 1e-2:
            ok.append(n)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated Gluon variants")
    ap.add_argument("--kn", default="4096x4096,4096x14336,14336x4096", help="comma-separated KxN problems")
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 without a GPU, print, exit")
    ap.add_argument("--check", metavar="VARIANT", help=argparse.SUPPRESS)  # the child of checked_variants
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    torch.manual_seed(0)
    if args.check:
        check_variant(args.check)
        return
    from automodel_lora.kernels import triton_lora as T

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    names = checked_variants(args.variants.split(","))
    rows = []
    for K, N in (tuple(map(int, kn.split("x"))) for kn in args.kn.split(",")):
        for direction in ("fwd", "bwd"):
            for r in (0, 16, 64):
                a, b, rop, q = problem(direction, K, N, max(r, 16))
                pm = a @ rop
                gp, gq = (pm, q) if r else (None, None)
                fns = {"mm": lambda: a @ b, "tl_gemm": lambda: T.gemm_lora(a, b, pm, q, SCALE, tma=True)}
                row = dict(K=K, N=N, r=r, dir=direction, tl_gemm_rel_err=rel_err(fns["tl_gemm"](), a, b, pm, q, SCALE))
                for name in names:
                    fn = (lambda c: lambda: gluon_gemm(a, b, gp, gq, SCALE, c, num_sms))(VARIANTS[name])
                    try:
                        row[f"{name}_rel_err"] = err = rel_err(fn(), a, b, gp, gq, SCALE)
                    except Exception as e:
                        row[f"{name}_rel_err"] = err = float("nan")
                        print(f"{name} K={K} N={N} r={r} {direction}: FAILED {type(e).__name__}: {e}", flush=True)
                    if err < 1e-2:
                        fns[name] = fn
                times = rotated_cudagraph_us(fns, args.rounds, rep=100)
                row.update({n: statistics.median(v) for n, v in times.items()})
                rows.append(row)
                print(row, flush=True)
                write_json("gluon_gemm_probe.json", dict(env=run_env(), variants=VARIANTS, checked=names, rows=rows))
    print("wrote", write_json("gluon_gemm_probe.json", dict(env=run_env(), variants=VARIANTS, checked=names,
                                                          rows=rows)))
    cols = ["mm", "tl_gemm", *names]
    print("\n| K, N | r | dir | " + " | ".join(f"{c} us (x mm)" for c in cols) + " |")
    print("|---" * (len(cols) + 3) + "|")
    for row in rows:
        cells = [f"{row[c]:.1f} ({row[c] / row['mm']:.3f})" if c in row else "failed" for c in cols]
        print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
