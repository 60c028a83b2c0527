"""Probe: can a Hopper TMA persistent Triton GEMM that adds the LoRA low-rank term as ONE EXTRA
K STEP match cuBLAS at our shapes?

Problems (bf16 in/out, fp32 accumulate, M = 8192, r in {16, 64}, s = 2.0):
  fwd: y[M,N]  = x[M,K] @ W[N,K]^T + xa[M,r] @ (s B)[N,r]^T
  bwd: dx[M,K] = dy[M,N] @ W[N,K]  + dyB[M,r] @ (s A)[r,K]     (W is the row-major B operand)
for (K, N) in (4096, 4096), (4096, 14336), (14336, 4096).

Timed per problem: cuBLAS frozen (`x @ W.t()` / `dy @ W`), cuBLAS with the low-rank term as we do
it today (`t = xa @ sB.t(); t.addmm_(x, W.t())`), and one Triton kernel (persistent grid of #SM
programs, grouped tile order, host TensorDescriptors, K loop in `tl.range(num_stages=)`, one more
`tl.dot` of the [BM, r] x [r, BN] tiles after the K loop, TMA store epilogue), tuned over a few
configs per problem, with and without `warp_specialize`, plus the same kernel without the
low-rank term (the plain GEMM speed). Every Triton result is checked against an fp32 reference.
Final times: do_bench medians (warmup 25 ms, rep 100 ms), taken in 5 rounds that interleave all
variants in a rotating order (H100 clocks drift with power and heat under sustained GEMMs, so the
order of measurement matters); the median round is reported, `spread` says how far rounds disagree.

Run (H100, ~2-4 min with compiles): python benchmarks/tma_gemm_probe.py
Writes $OUT/tma_gemm_probe.json (OUT defaults to "."); prints the table last.
"""
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

if triton is None or not torch.cuda.is_available():
    if __name__ == "__main__":
        print("needs CUDA (a Hopper GPU and triton); nothing to do here")
        sys.exit(0)
    raise ImportError("tma_gemm_probe needs CUDA and triton")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from automodel_lora.kernels.triton_lora import _tile_coords  # noqa: E402  (the library's grouped tile order)

M, S, RANKS = 8192, 2.0, (16, 64)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N) of the layer
TUNE_BUDGET_S = 170.0  # past this, tune only the first config of each variant
ROUNDS = 5  # final timings: ROUNDS interleaved passes over all variants, median of the round medians


@triton.jit
def lora_gemm_kernel(a_desc, b_desc, p_desc, q_desc, c_desc, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr,
                     GROUP_M: tl.constexpr, STAGES: tl.constexpr, B_NK: tl.constexpr,
                     HAS_LORA: tl.constexpr, SUBTILE: tl.constexpr, WS: tl.constexpr,
                     FLATTEN: tl.constexpr, NUM_SMS: tl.constexpr):
    """C[M,N] = A[M,K] @ op(B) + P[M,R] @ op(Q); B_NK: B is [N,K] and Q is [N,R] (used
    transposed), else B is [K,N] and Q is [R,N]."""
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_m * num_n
    num_in_group = GROUP_M * num_n
    tile_c = start - NUM_SMS  # the epilogue's own tile counter (as in tutorial 09)
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, num_in_group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in tl.range(0, k_tiles, num_stages=STAGES):
            off_k = ki * BK
            a = a_desc.load([off_m, off_k])
            if B_NK:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc)
        if HAS_LORA:  # the low-rank term: one more K step of depth R
            p = p_desc.load([off_m, 0])
            if B_NK:
                q = q_desc.load([off_n, 0]).T
            else:
                q = q_desc.load([0, off_n])
            acc = tl.dot(p, q, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_in_group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        if SUBTILE:  # store two [BM, BN/2] halves (less shared memory for the epilogue)
            halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BN // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def _cfg(bn, stages, warps, subtile=False, flatten=True, ws=False):
    return dict(BM=128, BN=bn, BK=64, GROUP_M=8, STAGES=stages, warps=warps,
                SUBTILE=subtile, FLATTEN=flatten, WS=ws)


VARIANTS = {  # variant -> configs tried (Hopper warp specialization needs flatten=False)
    "triton": [_cfg(128, 3, 4), _cfg(128, 4, 4), _cfg(128, 4, 8), _cfg(256, 3, 8),
               _cfg(256, 3, 8, subtile=True), _cfg(128, 4, 4, flatten=False)],
    "triton_ws": [_cfg(128, 4, 4, flatten=False, ws=True), _cfg(128, 4, 8, flatten=False, ws=True),
                  _cfg(256, 3, 8, flatten=False, ws=True),
                  _cfg(256, 3, 8, subtile=True, flatten=False, ws=True)],
}


def cfg_str(c):
    return (f"BM{c['BM']} BN{c['BN']} BK{c['BK']} st{c['STAGES']} w{c['warps']} G{c['GROUP_M']}"
            + " sub" * c["SUBTILE"] + " flat" * c["FLATTEN"] + " ws" * c["WS"])


def make_triton(cfg, a, b, p, q, c, b_nk, has_lora, num_sms):
    """Builds the descriptors once; returns a closure that launches the kernel into c."""
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    (Mr, K), N, R = a.shape, c.shape[1], p.shape[1]
    ad = TensorDescriptor.from_tensor(a, [BM, BK])
    bd = TensorDescriptor.from_tensor(b, [BN, BK] if b_nk else [BK, BN])
    pd = TensorDescriptor.from_tensor(p, [BM, R])
    qd = TensorDescriptor.from_tensor(q, [BN, R] if b_nk else [R, BN])
    cd = TensorDescriptor.from_tensor(c, [BM, BN // 2 if cfg["SUBTILE"] else BN])
    grid = (min(num_sms, triton.cdiv(Mr, BM) * triton.cdiv(N, BN)),)

    def run():
        lora_gemm_kernel[grid](ad, bd, pd, qd, cd, Mr, N, K, BM=BM, BN=BN, BK=BK, R=R,
                               GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], B_NK=b_nk,
                               HAS_LORA=has_lora, SUBTILE=cfg["SUBTILE"], WS=cfg["WS"],
                               FLATTEN=cfg["FLATTEN"], NUM_SMS=num_sms,
                               num_warps=cfg["warps"], num_stages=cfg["STAGES"])
        return c
    return run


def bench_us(fn, warmup=25, rep=100):
    return 1e3 * triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def short(e, log=""):
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"
    errs = [ln.split(" error: ", 1)[1] for ln in log.splitlines() if " error: " in ln]
    return msg + (f" [{'; '.join(dict.fromkeys(errs))[:300]}]" if errs else "")


@contextlib.contextmanager
def captured_stderr(box):
    """Keeps the compiler's MLIR dumps (written to fd 2 by C++) out of the log; box[0] gets the text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read())


def tune(variant, cfgs, args, ref, num_sms, t0, failed):
    """Times each config (short do_bench); returns (best cfg, best fn, log). Configs that failed to
    compile for this (direction, r) are remembered in `failed` and skipped from then on."""
    log, best = [], (float("inf"), None, None)
    if time.time() - t0 > TUNE_BUDGET_S:
        cfgs = cfgs[:1]
    for cfg in cfgs:
        key = (cfg_str(cfg), args[5], args[2].shape[1])  # (config, B_NK, r)
        if key in failed:
            log.append(dict(cfg=cfg_str(cfg), error="skipped: " + failed[key]))
            continue
        box = []
        try:
            fn = make_triton(cfg, *args, num_sms=num_sms)
            with captured_stderr(box):
                out = fn()
                torch.cuda.synchronize()
            err = rel_err(out, ref)
            if not err < 1e-2:
                log.append(dict(cfg=cfg_str(cfg), error=f"wrong result, rel err {err:.3g}"))
                continue
            us = bench_us(fn, warmup=10, rep=40)
            log.append(dict(cfg=cfg_str(cfg), us=us, rel_err=err))
            if us < best[0]:
                best = (us, cfg, fn)
        except Exception as e:  # compile failures, out of shared memory, ...
            failed[key] = short(e, "".join(box))
            print(f"  [{variant}] {cfg_str(cfg)} failed: {failed[key]}")
            log.append(dict(cfg=cfg_str(cfg), error=failed[key]))
    return best[1], best[2], log


def run_problem(direction, K, N, r, num_sms, t0, failed):
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    W = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(bf)
    if direction == "fwd":  # y = x W^T + xa (sB)^T
        a = torch.randn(M, K, device=dev, generator=g).to(bf)
        p = torch.randn(M, r, device=dev, generator=g).to(bf)
        q = (S * torch.randn(N, r, device=dev, generator=g) / r ** 0.5).to(bf)
        out_n, red, b_nk = N, K, True
        frozen = lambda: a @ W.t()

        def addmm():
            t = p @ q.t()
            return t.addmm_(a, W.t())
        ref = a.float() @ W.float().t() + p.float() @ q.float().t()
    else:  # dx = dy W + dyB (sA)
        a = torch.randn(M, N, device=dev, generator=g).to(bf)
        p = torch.randn(M, r, device=dev, generator=g).to(bf)
        q = (S * torch.randn(r, K, device=dev, generator=g) / r ** 0.5).to(bf)
        out_n, red, b_nk = K, N, False
        frozen = lambda: a @ W

        def addmm():
            t = p @ q
            return t.addmm_(a, W)
        ref = a.float() @ W.float() + p.float() @ q.float()
    c = torch.empty(M, out_n, device=dev, dtype=bf)
    rec = dict(dir=direction, M=M, K=K, N=N, r=r, us={}, tflops={}, rel_err={}, config={}, tuning={})
    flops = {"frozen": 2.0 * M * out_n * red}
    fns = {"cublas_frozen": frozen, "cublas_addmm": addmm}
    rec["rel_err"]["cublas_addmm"] = rel_err(addmm(), ref)
    args = (a, W, p, q, c, b_nk, True)
    best_plain = None
    for variant, cfgs in VARIANTS.items():
        cfg, fn, log = tune(variant, cfgs, args, ref, num_sms, t0, failed)
        rec["tuning"][variant] = log
        if fn is None:
            continue
        best_plain = best_plain or cfg
        rec["config"][variant], fns[variant] = cfg_str(cfg), fn
        rec["rel_err"][variant] = rel_err(fn(), ref)
    if best_plain is not None:  # same kernel and config, no low-rank step: the plain GEMM speed
        try:
            fn = make_triton(best_plain, a, W, p, q, c, b_nk, False, num_sms=num_sms)
            base_ref = ref - (p.float() @ (q.float().t() if b_nk else q.float()))
            rec["rel_err"]["triton_nolora"] = rel_err(fn(), base_ref)
            rec["config"]["triton_nolora"], fns["triton_nolora"] = cfg_str(best_plain), fn
        except Exception as e:
            print(f"  [triton_nolora] failed: {short(e)}")
    rounds, names = {name: [] for name in fns}, list(fns)  # interleaved and rotated: clock drift
    for i in range(ROUNDS):                                   # hits every variant alike
        for name in names[i % len(names):] + names[:i % len(names)]:
            rounds[name].append(bench_us(fns[name]))
    rec["rounds_us"] = rounds
    for name, ts in rounds.items():
        rec["us"][name] = statistics.median(ts)
    rec["spread"] = max((max(ts) - min(ts)) / statistics.median(ts) for ts in rounds.values())
    for name, us in rec["us"].items():
        f = flops["frozen"] if name in ("cublas_frozen", "triton_nolora") else 2.0 * M * out_n * (red + r)
        rec["tflops"][name] = f / (us * 1e-6) / 1e12
    lora = [rec["us"][v] for v in ("triton", "triton_ws") if v in rec["us"]]
    if lora:
        rec["best_triton_us"] = min(lora)
        rec["ratio_vs_frozen"] = min(lora) / rec["us"]["cublas_frozen"]
        rec["ratio_vs_addmm"] = min(lora) / rec["us"]["cublas_addmm"]
    return rec


def fmt(rec, name):
    us = rec["us"].get(name)
    return f"{us:8.1f} {rec['tflops'][name]:4.0f}" if us is not None else f"{'-':>8} {'-':>4}"


def main():
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in true fp32
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    env = dict(device=props.name, sms=num_sms, torch=torch.__version__, triton=triton.__version__,
               capability=list(torch.cuda.get_device_capability()))
    print("env:", env)
    if env["capability"][0] < 9:
        print("needs a Hopper (sm_90) or newer GPU for TMA; exiting")
        return
    failed, records = {}, []
    for direction in ("fwd", "bwd"):
        for K, N in SHAPES:
            for r in RANKS:
                print(f"{direction} K={K} N={N} r={r}  (t={time.time() - t0:.0f}s)", flush=True)
                try:
                    rec = run_problem(direction, K, N, r, num_sms, t0, failed)
                except Exception as e:
                    print(f"  problem failed: {short(e)}")
                    rec = dict(dir=direction, M=M, K=K, N=N, r=r, error=short(e))
                torch.cuda.empty_cache()
                records.append(rec)
                for v, cs in rec.get("config", {}).items():
                    print(f"  chosen {v:14s} {cs}   rel_err {rec['rel_err'][v]:.2e}")
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tma_gemm_probe.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, M=M, s=S, total_s=time.time() - t0, problems=records), f, indent=1)
    print(f"wrote {path}  (total {time.time() - t0:.0f}s)\n")
    print(f"us and TFLOP/s (median of {ROUNDS} interleaved rounds; LoRA variants count 2MN(K+r) flops);"
          " /frozen, /addmm = best Triton LoRA variant / cuBLAS; spread = widest (max-min)/median over rounds")
    hdr = (f"{'dir':3} {'K':>5} {'N':>5} {'r':>2} | {'frozen':>13} | {'addmm':>13} | {'triton':>13} | "
           f"{'triton_ws':>13} | {'nolora':>13} | {'/frozen':>7} {'/addmm':>6} | {'max err':>7} {'spread':>6}")
    print(hdr + "\n" + "-" * len(hdr))
    for rec in records:
        head = f"{rec['dir']:3} {rec['K']:5d} {rec['N']:5d} {rec['r']:2d}"
        if "error" in rec:
            print(f"{head} | failed: {rec['error']}")
            continue
        errs = [e for k, e in rec["rel_err"].items() if k.startswith("triton") and e is not None]
        ratios = (f"{rec['ratio_vs_frozen']:7.3f} {rec['ratio_vs_addmm']:6.3f}"
                  if "ratio_vs_frozen" in rec else f"{'-':>7} {'-':>6}")
        print(f"{head} | {fmt(rec, 'cublas_frozen')} | {fmt(rec, 'cublas_addmm')} | {fmt(rec, 'triton')} | "
              f"{fmt(rec, 'triton_ws')} | {fmt(rec, 'triton_nolora')} | {ratios} | "
              f"{max(errs) if errs else float('nan'):7.1e} {rec['spread']:6.1%}")


if __name__ == "__main__":
    main()
