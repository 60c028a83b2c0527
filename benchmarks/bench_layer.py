"""Section 1 of bench_lora.py: one adapted linear, every variant on the same x, g and weights, fwd+bwd,
ratio to the frozen nn.Linear by two clocks (GPU time: ``ratio``; synchronized wall time: ``ratio_sync``);
with two side sections: op-level timings of the kernels (``ops``: where the time goes, the floors in
DESIGN.md) and the host overhead of a step at tiny shapes (``host``)."""

from __future__ import annotations

import copy
import statistics
import time

import bench_axolotl
import torch
import torch.nn.functional as F
from bench_common import DEV, kernel_profile, rel_err, sync, time_block
from bench_variants import SHARED_TRITON, Wrap, fwd_bwd, layer_steps, lora_copy, time_layer_variants
from torch import nn

from automodel_lora import kernels as K

# DoRA arms (benchmarks/DESIGN.md section 10): PEFT's, the reference PyTorch layer, the fused one
DORA_VARIANTS = ("peft_dora", "torch_dora", "triton_dora", "axolotl_dora")


def build_layer_variants(lin: nn.Linear, r: int, A0: torch.Tensor, B0: torch.Tensor, want: list[str]):
    """Each variant: (callable x -> y, list of trainable params: A, B, and for DoRA the magnitude)."""
    s = 2.0 * r / r  # alpha = 2r
    out = {}
    out["frozen"] = (lin, [])
    if "peft" in want:
        try:
            import peft

            m = peft.get_peft_model(Wrap(copy.deepcopy(lin)), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
            pl = m.base_model.model.lin
            with torch.no_grad():
                pl.lora_A["default"].weight.copy_(A0)
                pl.lora_B["default"].weight.copy_(B0)
            out["peft"] = (m, [pl.lora_A["default"].weight, pl.lora_B["default"].weight])
        except Exception as e:  # pragma: no cover
            print(f"peft unavailable: {e!r}")
    A = nn.Parameter(A0.clone())
    B = nn.Parameter(B0.clone())
    W, b = lin.weight, lin.bias
    out["torch_naive"] = (lambda x: F.linear(x, W, b) + s * F.linear(F.linear(x, A), B), [A, B])
    for name, use_triton in (("torch", False), ("triton", True)):
        out[name] = lora_copy(lin, r, A0, B0, use_triton, share_weight=True)
    for name in SHARED_TRITON:
        if name in want:
            out[name] = out["triton"]  # same layer, run under OPTION_CHANGES[name]
    for name, use_triton in (("torch_dora", False), ("triton_dora", True)):
        if name in want:
            out[name] = lora_copy(lin, r, A0, B0, use_triton, share_weight=True, use_dora=True)
    if "peft_dora" in want:
        out["peft_dora"] = peft_dora(lin, r, A0, B0)
    if "axolotl_dora" in want:
        out.update(axolotl_dora(lin, r, A0, B0))
    return out


def peft_dora(lin: nn.Module, r: int, A0: torch.Tensor, B0: torch.Tensor, fp32_adapters: bool = True):
    """HF PEFT's DoRA on a copy of ``lin`` set to A0, B0: (module, [A, B, magnitude])."""
    import peft

    m = peft.get_peft_model(Wrap(copy.deepcopy(lin)),
                            peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=True),
                            autocast_adapter_dtype=fp32_adapters)
    pl = m.base_model.model.lin
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(A0)
        pl.lora_B["default"].weight.copy_(B0)
    return m, [pl.lora_A["default"].weight, pl.lora_B["default"].weight,
               pl.lora_magnitude_vector["default"].weight]


def axolotl_dora(lin: nn.Module, r: int, A0: torch.Tensor, B0: torch.Tensor) -> dict:
    """{"axolotl_dora": (x -> y, [A, B, magnitude])}: PEFT's DoRA layer (bf16 adapters, as axolotl trains)
    run through axolotl's ``LoRA_O`` node (``apply_lora_linear``), its norm recomputed each step as in
    training; {} (with the reason printed) where axolotl cannot run here."""
    why = bench_axolotl.unavailable()
    if why:
        print(f"[layer] axolotl_dora skipped: {why}")
        return {}
    m, params = peft_dora(lin, r, A0, B0, fp32_adapters=False)
    bench_axolotl.invalidate_dora_cache_each_step(m)
    pl, kernels = m.base_model.model.lin, bench_axolotl.load_kernels()
    # LoRA_O's backward unpacks (batch, seq, hidden): the layer's (M, K) rows as one sequence; the pre-hook
    # still runs (nn.Module.__call__)
    m.forward = lambda x: kernels.apply_lora_linear(pl, x.unsqueeze(0)).squeeze(0)
    return {"axolotl_dora": (m, params)}


def _references(lin, A0, B0, x, g, magnitude=None) -> dict:
    """fp32 y, dx, dA, dB (s = 2) of LoRA on the same bf16 values; with ``magnitude``, of DoRA (and dm):
    y = f (x W^T + s x A^T B^T), f = m / ||W + s B A||_row detached, dz = g f."""
    xf, Wf, Af, Bf, gf = x.float(), lin.weight.float(), A0.float(), B0.float(), g.float()
    s = 2.0
    z = xf @ Wf.t() + s * (xf @ Af.t()) @ Bf.t()
    ref = {}
    if magnitude is not None:
        norm = (Wf + s * Bf @ Af).norm(dim=1)
        f = magnitude.detach().float() / norm
        ref["dm"] = (gf * z).sum(0) / norm
        z, gf = z * f, gf * f
    ref.update(y=z, dx=gf @ Wf + s * (gf @ Bf) @ Af, dA=s * (gf @ Bf).t() @ xf, dB=s * gf.t() @ (xf @ Af.t()))
    return ref


def layer_errors(variants: dict, lin: nn.Linear, A0: torch.Tensor, B0: torch.Tensor, x, g) -> dict:
    """Each variant's relative error of y, dx (and dA, dB, DoRA's dm where it trains) against an fp32 reference
    on the same bf16 values."""
    lora_ref = _references(lin, A0, B0, x, g)
    errs = {}
    for name, (fn, params) in variants.items():
        ref = _references(lin, A0, B0, x, g, params[2]) if name in DORA_VARIANTS else lora_ref
        x.grad = None
        for p_ in params:
            p_.grad = None
        y = fwd_bwd(name, fn, x, g)
        e = {"y": rel_err(y, ref["y"]), "dx": rel_err(x.grad, ref["dx"])}
        for key, p_ in zip(("dA", "dB", "dm"), params, strict=False):
            e[key] = rel_err(p_.grad, ref[key])
        errs[name] = e
        del y
    return errs


def run(args) -> dict:
    """{"layer": one row per (shape, rank, variant)}: median ms, ratio to frozen, peak MiB, errors."""
    dt = torch.bfloat16
    M = args.M
    rows = []
    for (Kd, N) in args.shapes:
        for r in args.ranks:
            torch.manual_seed(0)
            lin = nn.Linear(Kd, N, bias=False, device=DEV, dtype=dt).requires_grad_(False)
            A0 = (torch.randn(r, Kd, device=DEV) / Kd**0.5).to(dt)
            B0 = (torch.randn(N, r, device=DEV) * 0.05).to(dt)
            xs = [torch.randn(M, Kd, device=DEV, dtype=dt).requires_grad_(True) for _ in range(2)]
            gs = [torch.randn(M, N, device=DEV, dtype=dt) for _ in range(2)]
            variants = build_layer_variants(lin, r, A0, B0, args.variants)
            variants = {k: v for k, v in variants.items() if k in args.variants}
            errs = layer_errors(variants, lin, A0, B0, xs[0], gs[0])

            # GPU time (CUDA events, host running ahead), then the same steps each synchronized (host wall
            # time): a variant whose host time to launch its step outlasts its GPU work looks fine by the first clock only
            times, mem = time_layer_variants(variants, xs, gs, args)
            times_sync, _ = time_layer_variants(variants, xs, gs, args, sync_each=True)
            f, fs = times["frozen"], times_sync["frozen"]
            steps, prep = layer_steps(variants, xs, gs) if args.profile else ({}, None)
            for name in variants:
                row = dict(K=Kd, N=N, r=r, variant=name, ms=times[name], ratio=times[name] / f,
                           ms_sync=times_sync[name], ratio_sync=times_sync[name] / fs, peak_mib=mem[name],
                           err=errs[name])
                if name in args.profile:
                    row["profile"] = kernel_profile(steps[name], prep=prep)
                    print(f"[layer] K={Kd} N={N} r={r} profile of {name}:\n{row['profile']}", flush=True)
                rows.append(row)
            print(f"[layer] K={Kd} N={N} r={r} (GPU time; synchronized wall time): "
                  + ", ".join(f"{n}={times[n]:.3f}ms ({times[n] / f:.2f}x; {times_sync[n] / fs:.2f}x)" for n in times),
                  flush=True)
            variants = xs = gs = lin = None  # free the buffers before the next shape
            if DEV == "cuda":
                torch.cuda.empty_cache()
    return {"layer": rows}


def run_ops(args) -> dict:
    """{"copy_GBps", "ops_us"}: GPU us of each kernel and cuBLAS call of a layer step (CUDA only)."""
    if DEV != "cuda" or not K.HAS_TRITON:
        return {}
    from automodel_lora.kernels.expand import expand
    from automodel_lora.kernels.grad_ab import tn
    from automodel_lora.kernels.proj import proj
    from automodel_lora.kernels.tma_gemm import gemm_lora

    dt = torch.bfloat16
    M = args.M
    rows = []
    results = {}
    big = torch.empty(2**28, dtype=torch.uint8, device=DEV)  # 256 MiB copy: achievable bandwidth
    big2 = torch.empty_like(big)
    ms = statistics.median(time_block(lambda i: big2.copy_(big), 20))
    results["copy_GBps"] = 2 * big.numel() / ms / 1e6
    big = big2 = None
    for (Kd, N) in args.shapes:
        for r in args.ranks:
            x = torch.randn(M, Kd, device=DEV, dtype=dt)
            dy = torch.randn(M, N, device=DEV, dtype=dt)
            W = torch.randn(N, Kd, device=DEV, dtype=dt) / Kd**0.5
            A = torch.randn(r, Kd, device=DEV, dtype=dt) / Kd**0.5
            B = torch.randn(N, r, device=DEV, dtype=dt) * 0.05
            xa = proj(x, A.t())
            dyB = proj(dy, B)
            y = torch.empty(M, N, device=DEV, dtype=dt)
            dx = torch.empty(M, Kd, device=DEV, dtype=dt)
            ops = {
                "base_fwd_mm": lambda i: torch.mm(x, W.t(), out=y),
                "base_bwd_mm": lambda i: torch.mm(dy, W, out=dx),
                "fwd_addmm_beta1": lambda i: y.addmm_(x, W.t()),
                "bwd_addmm_beta1": lambda i: dx.addmm_(dy, W),
                "proj_xa": lambda i: proj(x, A.t()),
                "expand_y": lambda i: expand(xa, B.t(), 2.0),
                "proj_dyB": lambda i: proj(dy, B),
                "expand_dx": lambda i: expand(dyB, A, 2.0),
                "tn_dA": lambda i: tn(dyB, x, 2.0),
                "tn_dB": lambda i: tn(xa, dy, 2.0, transpose_out=True),
                "torch_xa": lambda i: torch.mm(x, A.t()),
                "torch_dB": lambda i: torch.mm(dy.t(), xa),
                "tgemm_fwd": lambda i: gemm_lora(x, W.t(), xa, B.t(), 2.0),
                "tgemm_bwd": lambda i: gemm_lora(dy, W, dyB, A, 2.0),
                "tgemm_fwd_nolora": lambda i: gemm_lora(x, W.t()),
            }
            rows.extend(_op_rows(ops, Kd, N, r))
            x = dy = W = A = B = xa = dyB = y = dx = None
            torch.cuda.empty_cache()
    results["ops_us"] = rows
    return results


def _op_rows(ops: dict, Kd: int, N: int, r: int) -> list:
    """One row per op: its median GPU us over CUDA-graph replays."""
    import triton.testing as tt

    rows = []
    for name, fn in ops.items():
        fn(0)
        fn(0)
    sync()
    for name, fn in ops.items():
        # CUDA-graph replay: GPU time alone (eager event timing of one launch was host-bound)
        t = tt.do_bench_cudagraph(lambda: fn(0), rep=20, return_mode="median")
        rows.append(dict(K=Kd, N=N, r=r, op=name, us=t * 1e3))
        torch.cuda.empty_cache()
    print(f"[ops] K={Kd} N={N} r={r}: " + ", ".join(f"{d['op']}={d['us']:.0f}" for d in rows), flush=True)
    return rows


def run_host(args) -> dict:
    """{"host_us_per_step", "host_pieces_us", "kernels_per_step" (CUDA), "host_profile_triton"}: tiny shapes, so a
    step's time is its Python / dispatch / launch time; the pieces and kernel counts say where it goes."""
    import cProfile
    import io
    import pstats

    dt = torch.bfloat16
    lin = nn.Linear(256, 256, bias=False, device=DEV, dtype=dt).requires_grad_(False)
    A0 = torch.randn(16, 256, device=DEV, dtype=dt) / 16
    B0 = torch.randn(256, 16, device=DEV, dtype=dt) * 0.05
    variants = build_layer_variants(lin, 16, A0, B0, ["frozen", "torch_naive", "torch", "triton"])
    x = torch.randn(64, 256, device=DEV, dtype=dt, requires_grad=True)
    g = torch.randn(64, 256, device=DEV, dtype=dt)
    rows = {}
    for name, (fn, params) in variants.items():
        def step(fn=fn):
            y = fn(x)
            y.backward(g)
        for _ in range(5):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(100):
            step()
        sync()
        rows[name] = (time.perf_counter() - t) / 100 * 1e6
    results = {"host_us_per_step": rows, "host_pieces_us": host_pieces(x, g)}
    if DEV == "cuda":
        results["kernels_per_step"] = {k: kernels_per_step(fn, x, g) for k, (fn, _) in variants.items()}
    print("[host] us per fwd+bwd step at tiny shapes: " + ", ".join(f"{k}={v:.0f}" for k, v in rows.items()), flush=True)
    print("[host] pieces (us): " + ", ".join(f"{k}={v:.1f}" for k, v in results["host_pieces_us"].items())
          + (f"; kernels per step: {results['kernels_per_step']}" if "kernels_per_step" in results else ""), flush=True)
    if "triton" in variants:
        fn = variants["triton"][0]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            fn(x).backward(g)
        sync()
        pr.disable()
        sio = io.StringIO()
        pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
        results["host_profile_triton"] = sio.getvalue()
    return results


class _Identity(torch.autograd.Function):
    """An autograd.Function that does nothing: its cost is the Function machinery's host time."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


@torch.library.custom_op("automodel_lora_bench::noop", mutates_args=())
def _noop_op(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)  # a custom op may not return a view of its input


def _us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def host_pieces(x: torch.Tensor, g: torch.Tensor) -> dict:
    """Host microseconds of the pieces an adapted linear's step is made of, each alone: a tensor op dispatch
    (``x.view_as``), an autograd.Function forward + backward that does nothing, a torch custom op call (the
    path torch.compile takes; eager calls skip it), an empty kernel launch (``torch.empty`` + ``zero_``)."""
    def function_step():
        _Identity.apply(x).backward(g)

    return {"tensor_op": _us(lambda: x.view_as(x)), "autograd_function_step": _us(function_step),
            "custom_op_call": _us(lambda: _noop_op(x)), "empty_plus_zero_launch": _us(lambda: torch.empty_like(x).zero_())}


def kernels_per_step(fn, x: torch.Tensor, g: torch.Tensor) -> int:
    """CUDA kernels launched by one forward + backward of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn(x).backward(g)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x).backward(g)
        sync()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def table(results: dict) -> list[str]:
    """The layer table's lines (markdown): one row per (shape, rank), a column per variant with its ratios to
    frozen by GPU time and by synchronized wall time (rows from before ``ratio_sync`` show the first alone)."""
    lines = [f"\n## Layer: bf16, M={results['args']['M']}, fwd+bwd, ratio to frozen nn.Linear: GPU time / "
             f"synchronized wall time ({results['env']['gpu']}, commit {results['env']['commit'][:10]})"]
    names = []
    for row in results["layer"]:
        if row["variant"] not in names:
            names.append(row["variant"])
    head = " | ".join(n for n in names if n != "frozen")
    lines.append(f"| K, N | r | frozen ms (sync) | {head} | triton peak MiB (frozen) | max rel err triton |")
    lines.append("|---" * (len(names) + 4) + "|")
    keyed = {}
    for row in results["layer"]:
        keyed.setdefault((row["K"], row["N"], row["r"]), {})[row["variant"]] = row
    for (Kd, N, r), d in keyed.items():
        cells = [_ratios(d[n]) if n in d else "-" for n in names if n != "frozen"]
        tri = next((d[n] for n in ("triton", "triton_tma", "triton_cublas") if n in d), None)
        err = max(tri["err"].values()) if tri and tri["err"] else float("nan")
        tri = tri or d["frozen"]
        fz = d["frozen"]
        frozen_ms = f"{fz['ms']:.3f}" + (f" ({fz['ms_sync']:.3f})" if "ms_sync" in fz else "")
        lines.append(f"| {Kd}, {N} | {r} | {frozen_ms} | " + " | ".join(cells)
                     + f" | {tri['peak_mib']:.0f} ({fz['peak_mib']:.0f}) | {err:.1e} |")
    return lines


def _ratios(row: dict) -> str:
    """"1.102x / 1.180x": the ratio to frozen by GPU time, then by synchronized wall time."""
    return f"{row['ratio']:.3f}x" + (f" / {row['ratio_sync']:.3f}x" if "ratio_sync" in row else "")
