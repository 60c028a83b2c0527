"""LoRA layer / model benchmark (protocol: ../shared/BENCHMARK.md sections 1-3).

    python benchmarks/bench_lora.py                    # layer + ops + model, JSON to $OUT or benchmarks/results
    python benchmarks/bench_lora.py --sections layer   # just the layer table
    python benchmarks/bench_lora.py --smoke            # tiny shapes, any device (checks the script itself)

Variants, all on the same x, g and weights, interleaved step by step (A B C, B C A, ...), three
rounds, median of per-step CUDA-event times; ratios are to the frozen layer measured in the same run:
  frozen      plain frozen nn.Linear (the floor)
  peft        HF PEFT LoraConfig on the same linear, its defaults (fp32 adapters)
  torch_naive F.linear(x, W, b) + s * F.linear(F.linear(x, A), B), bf16 adapters
  torch       automodel_lora LinearLoRA (use_triton=False): the project's PyTorch path
  triton      automodel_lora kernels, the default base GEMM ("auto": on Hopper a Triton TMA GEMM that
              takes the low-rank term as an extra K step) + Triton skinny kernels
  triton_cublas  the same kernels with the cuBLAS base GEMM (low-rank term through beta=1;
              KernelOptions(base_gemm="cublas"))
  triton_tma  the same kernels with the Triton base GEMM forced (the TMA GEMM on Hopper;
              KernelOptions(base_gemm="triton"))
  triton_proj_pass  the default kernels with a proj pass over x / dy before the TMA GEMM instead of
              xa / dyB made inside it (KernelOptions(fuse_proj=False))
  triton_no_recompute  (model) the kernel path keeping down_proj's input from forward to backward
              (PeftConfig.recompute_mlp_input=False; every other LoRA variant recomputes it)
Prints the table last; writes the full JSON (GPU, date, commit, autotune choices).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import run_env  # noqa: E402

from automodel_lora import (  # noqa: E402
    KernelOptions,
    PeftConfig,
    apply_lora_to_linear_modules,
    patch_linear_module,
    set_kernel_options,
)
from automodel_lora import kernels as K  # noqa: E402

try:  # the NF4 dequantize kernel (needs triton)
    from automodel_lora.kernels import nf4 as NF4  # noqa: E402
except ImportError:  # pragma: no cover
    NF4 = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------
def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_block(step, n: int, prep=None) -> list[float]:
    """n steps, each timed alone (ms): CUDA events around the step, host prep outside."""
    if DEV != "cuda":
        out = []
        for i in range(n):
            if prep:
                prep(i)
            t = time.perf_counter()
            step(i)
            out.append((time.perf_counter() - t) * 1e3)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i in range(n):
        if prep:
            prep(i)
        ev[i][0].record()
        step(i)
        ev[i][1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def peak_delta_mib(step, prep=None) -> float:
    if DEV != "cuda":
        return float("nan")
    if prep:
        prep(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    step(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - m0) / 2**20


def interleaved(variants: dict, n: int, rounds: int, warmup: int, prep=None) -> dict:
    """Median ms per step of each variant: steps interleaved one by one (A B C, then B C A, ...), so a
    clock or power drift of the GPU lands on every variant alike; each step between its own CUDA events,
    one synchronize per round (the host runs ahead as in training); ``rounds`` rounds of ``n`` steps each,
    the median of the round medians."""
    for name, step in variants.items():
        for i in range(warmup):
            if prep:
                prep(i)
            step(i)
    _sync()
    names = list(variants)
    res = {name: [] for name in names}
    for _ in range(rounds):
        marks = {name: [] for name in names}  # (start, end) per step: CUDA events, or host seconds on the CPU
        for i in range(n):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                if prep:
                    prep(i)
                start = _mark()
                variants[name](i)
                marks[name].append((start, _mark()))
        _sync()
        for name in names:
            res[name].append(statistics.median(_elapsed_ms(a, b) for a, b in marks[name]))
    return {name: statistics.median(v) for name, v in res.items()}


def _mark():
    if DEV != "cuda":
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _elapsed_ms(a, b) -> float:
    return (b - a) * 1e3 if DEV != "cuda" else a.elapsed_time(b)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------
# section 1: one adapted linear
# ------------------------------------------------------------------------------------------
class _Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def lora_copy(base: nn.Linear, r: int, A0: torch.Tensor, B0: torch.Tensor, use_triton: bool, share_weight=False):
    """(a copy of `base` patched with our adapter set to A0, B0; its two trainable params)."""
    m = copy.deepcopy(base)
    if share_weight:
        m.weight = base.weight
    patch_linear_module(m, dim=r, alpha=2 * r, use_triton=use_triton)
    with torch.no_grad():
        m.lora_A.weight.copy_(A0)
        m.lora_B.weight.copy_(B0)
    return m, [m.lora_A.weight, m.lora_B.weight]


def build_layer_variants(lin: nn.Linear, r: int, A0: torch.Tensor, B0: torch.Tensor, want: list[str]):
    """Each variant: (callable x -> y, list of trainable params)."""
    s = 2.0 * r / r  # alpha = 2r
    out = {}
    out["frozen"] = (lin, [])
    if "peft" in want:
        try:
            import peft

            m = peft.get_peft_model(_Wrap(copy.deepcopy(lin)), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
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
    for name in ("triton_cublas", "triton_tma", PROJ_PASS):
        if name in want:
            out[name] = out["triton"]  # same layer, run under OPTION_CHANGES[name]
    return out


# The kernel path's settings per variant (forward and backward): the environment's defaults
# (KernelOptions()), with the base GEMM or the fused projection changed for the variants below.
DEFAULT_OPTIONS = KernelOptions()
OPTION_CHANGES = {"triton_cublas": dict(base_gemm="cublas"), "triton_tma": dict(base_gemm="triton")}


# The default kernels with the skinny products as a pass of their own (not made inside the TMA GEMM)
PROJ_PASS = "triton_proj_pass"
OPTION_CHANGES[PROJ_PASS] = dict(fuse_proj=False)


# QLoRA variant whose fused path dequantizes through bitsandbytes' dequantize_4bit instead of the NF4 kernel
BNB_DEQUANT = "triton_bnb_dequant"

# The options last set on each shared adapted layer / model (id -> KernelOptions): set again only on a change
_SET: dict = {}


@contextlib.contextmanager
def base_gemm_for(name: str, module):
    """``module``'s (an adapted layer or model of a "triton*" variant) KernelOptions set to the variant's for
    everything inside (forward and backward); for BNB_DEQUANT, the NF4 kernel declined as well, so that
    bitsandbytes dequantizes."""
    if name.startswith("triton"):
        options = DEFAULT_OPTIONS.replace(**OPTION_CHANGES.get(name, {}))
        if _SET.get(id(module)) != options:  # variants sharing a module alternate step by step
            set_kernel_options(module, options)
            _SET[id(module)] = options
    nf4_supported = NF4.nf4_supported if NF4 is not None else None
    if name == BNB_DEQUANT:
        NF4.nf4_supported = lambda *_: False
    try:
        yield
    finally:
        if nf4_supported is not None:
            NF4.nf4_supported = nf4_supported


def fwd_bwd(name: str, fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``y = fn(x); y.backward(g)`` under the variant's kernel options."""
    with base_gemm_for(name, fn):
        y = fn(x)
        y.backward(g)
        return y


def time_layer_variants(variants: dict, xs: list, gs: list, args) -> tuple[dict, dict]:
    """(median ms, peak MiB) of each variant's fwd+bwd step, alternating two (x, g) buffers, interleaved."""
    plist = [p_ for _, ps in variants.values() for p_ in ps]

    def prep(i):
        for xx in xs:
            xx.grad = None
        for p_ in plist:
            p_.grad = None

    def make_step(name, fn):
        def step(i):
            fwd_bwd(name, fn, xs[i % 2], gs[i % 2])
        return step

    steps = {name: make_step(name, fn) for name, (fn, _) in variants.items()}
    times = interleaved(steps, n=args.n, rounds=args.rounds, warmup=args.warmup, prep=prep)
    return times, {name: peak_delta_mib(step, prep) for name, step in steps.items()}


def bench_layer(args, results):
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

            # correctness vs an fp32 reference on the same bf16 values
            x, g = xs[0], gs[0]
            xf, Wf, Af, Bf, gf = x.float(), lin.weight.float(), A0.float(), B0.float(), g.float()
            s = 2.0
            ref_y = xf @ Wf.t() + s * (xf @ Af.t()) @ Bf.t()
            ref_dx = gf @ Wf + s * (gf @ Bf) @ Af
            ref_dA = s * (gf @ Bf).t() @ xf
            ref_dB = s * gf.t() @ (xf @ Af.t())
            errs = {}
            for name, (fn, params) in variants.items():
                x.grad = None
                for p_ in params:
                    p_.grad = None
                y = fwd_bwd(name, fn, x, g)
                e = {"y": rel_err(y, ref_y), "dx": rel_err(x.grad, ref_dx)}
                if params:
                    e["dA"] = rel_err(params[0].grad, ref_dA)
                    e["dB"] = rel_err(params[1].grad, ref_dB)
                errs[name] = e
                del y
            del ref_y, ref_dx, xf, gf

            times, mem = time_layer_variants(variants, xs, gs, args)
            f = times["frozen"]
            for name in variants:
                row = dict(K=Kd, N=N, r=r, variant=name, ms=times[name], ratio=times[name] / f,
                           peak_mib=mem[name], err=errs[name])
                rows.append(row)
            print(f"[layer] K={Kd} N={N} r={r}: " + ", ".join(f"{n}={times[n]:.3f}ms ({times[n]/f:.2f}x)" for n in times),
                  flush=True)
            variants = xs = gs = lin = None  # free the buffers before the next shape
            if DEV == "cuda":
                torch.cuda.empty_cache()
    results["layer"] = rows


# ------------------------------------------------------------------------------------------
# op-level timings (where the time goes; the floors in DESIGN.md)
# ------------------------------------------------------------------------------------------
def bench_ops(args, results):
    if DEV != "cuda" or not K.HAS_TRITON:
        return
    from automodel_lora.kernels.expand import expand
    from automodel_lora.kernels.grad_ab import tn
    from automodel_lora.kernels.proj import proj
    from automodel_lora.kernels.tma_gemm import gemm_lora

    dt = torch.bfloat16
    M = args.M
    rows = []
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
            import triton.testing as tt

            for name, fn in ops.items():
                fn(0)
                fn(0)
            _sync()
            for name, fn in ops.items():
                # CUDA-graph replay: GPU time alone (eager event timing of one launch was host-bound)
                t = tt.do_bench_cudagraph(lambda: fn(0), rep=20, return_mode="median")
                rows.append(dict(K=Kd, N=N, r=r, op=name, us=t * 1e3))
                torch.cuda.empty_cache()
            print(f"[ops] K={Kd} N={N} r={r}: " + ", ".join(f"{d['op']}={d['us']:.0f}" for d in rows[-len(ops):]),
                  flush=True)
            x = dy = W = A = B = xa = dyB = y = dx = None
            torch.cuda.empty_cache()
    results["ops_us"] = rows


# ------------------------------------------------------------------------------------------
# host overhead: tiny shapes, so a step's time is its Python/launch time
# ------------------------------------------------------------------------------------------
def bench_host(args, results):
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
        _sync()
        t = time.perf_counter()
        for _ in range(100):
            step()
        _sync()
        rows[name] = (time.perf_counter() - t) / 100 * 1e6
    results["host_us_per_step"] = rows
    print("[host] us per fwd+bwd step at tiny shapes: " + ", ".join(f"{k}={v:.0f}" for k, v in rows.items()), flush=True)
    if "triton" in variants:
        fn = variants["triton"][0]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            fn(x).backward(g)
        _sync()
        pr.disable()
        sio = io.StringIO()
        pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
        results["host_profile_triton"] = sio.getvalue()


# ------------------------------------------------------------------------------------------
# section 3: QLoRA layer (bitsandbytes NF4 base, bf16 compute)
# ------------------------------------------------------------------------------------------
def bench_qlora(args, results):
    try:
        import bitsandbytes as bnb
    except Exception as e:  # pragma: no cover
        print(f"[qlora] skipped: bitsandbytes unavailable ({e!r})")
        return
    dt = torch.bfloat16
    M = args.M
    rows, dequant = [], []
    for (Kd, N) in args.qlora_shapes:
        r = 16
        torch.manual_seed(0)
        lin = nn.Linear(Kd, N, bias=False, device=DEV, dtype=dt).requires_grad_(False)
        q = bnb.nn.Linear4bit(Kd, N, bias=False, compute_dtype=dt, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu().clone(), requires_grad=False, quant_type="nf4")
        q = q.to(DEV)
        A0 = (torch.randn(r, Kd, device=DEV) / Kd**0.5).to(dt)
        B0 = (torch.randn(N, r, device=DEV) * 0.05).to(dt)
        xs = [torch.randn(M, Kd, device=DEV, dtype=dt).requires_grad_(True) for _ in range(2)]
        gs = [torch.randn(M, N, device=DEV, dtype=dt) for _ in range(2)]
        variants = {"frozen_bf16": (lin, []), "frozen_nf4": (q, [])}
        try:
            import peft

            m = peft.get_peft_model(_Wrap(copy.deepcopy(q)), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
            variants["peft"] = (m, [p_ for p_ in m.parameters() if p_.requires_grad])
        except Exception as e:  # pragma: no cover
            print(f"[qlora] peft unavailable: {e!r}")
        for name, use_triton in (("torch", False), ("triton", True)):
            variants[name] = lora_copy(q, r, A0, B0, use_triton)
        variants[BNB_DEQUANT] = variants["triton"]  # same layer, dequantized by bitsandbytes (base_gemm_for)

        # correctness: the adapted layers against dequantized-base math in fp32
        Wd = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        x, g = xs[0], gs[0]
        xf, gf, Af, Bf = x.float(), g.float(), A0.float(), B0.float()
        ref_y = xf @ Wd.t() + 2.0 * (xf @ Af.t()) @ Bf.t()
        ref_dx = gf @ Wd + 2.0 * (gf @ Bf) @ Af
        errs = {}
        for name in ("torch", "triton", BNB_DEQUANT):
            x.grad = None
            y = fwd_bwd(name, variants[name][0], x, g)
            errs[name] = {"y": rel_err(y, ref_y), "dx": rel_err(x.grad, ref_dx)}
        del ref_y, ref_dx, xf, gf, Wd

        times, mem = time_layer_variants(variants, xs, gs, args)
        f = times["frozen_bf16"]
        for name in variants:
            rows.append(dict(K=Kd, N=N, r=r, variant=name, ms=times[name], ratio_bf16=times[name] / f,
                             peak_mib=mem[name], err=errs.get(name, {})))
        dequant.extend(dequant_rows(q, Kd, N))
        print(f"[qlora] K={Kd} N={N} r={r}: " + ", ".join(f"{n}={times[n]:.3f}ms ({times[n]/f:.2f}x)" for n in times),
              flush=True)
        variants = xs = gs = lin = q = None
        if DEV == "cuda":
            torch.cuda.empty_cache()
    results["qlora"] = rows
    results["qlora_dequant"] = dequant


def dequant_rows(q, Kd: int, N: int) -> list:
    """GPU us per dequantize of ``q``'s NF4 weight (CUDA-graph replay, median), bitsandbytes' against ours."""
    if DEV != "cuda" or NF4 is None:
        return []
    import bitsandbytes as bnb
    import triton.testing as tt

    packed, state = q.weight.data, q.weight.quant_state
    calls = {"dequant_bitsandbytes": lambda: bnb.functional.dequantize_4bit(packed, state),
             "dequant_nf4_kernel": lambda: NF4.dequantize_nf4(packed, state, torch.bfloat16)}
    rows = []
    for name, fn in calls.items():
        fn()
        fn()
        us = tt.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
        rows.append(dict(K=Kd, N=N, variant=name, us=us, GBps=(packed.numel() * packed.element_size()
                                                                  + Kd * N * 2) / us / 1e3))
    print(f"[qlora] dequantize K={Kd} N={N}: " + ", ".join(f"{d['variant']}={d['us']:.1f}us ({d['GBps']:.0f} GB/s)"
                                                          for d in rows), flush=True)
    return rows


# ------------------------------------------------------------------------------------------
# section 2: 4-layer Llama
# ------------------------------------------------------------------------------------------
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_model(args, results):
    from transformers import LlamaConfig, LlamaForCausalLM

    dt = torch.bfloat16
    if args.smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=256)
        bsz, seq = 2, 32
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          num_hidden_layers=4, vocab_size=32000)
        bsz, seq = 2, 2048
    r = 16
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device=DEV, dtype=dt)
    base.requires_grad_(False)

    def frozen_model():
        m = base
        m.model.embed_tokens.weight.requires_grad_(True)
        return m

    def lora_model(use_triton, recompute=True):
        m = copy.deepcopy(base)
        apply_lora_to_linear_modules(m, PeftConfig(target_modules=PROJ, dim=r, alpha=2 * r, use_triton=use_triton,
                                                   recompute_mlp_input=recompute))
        with torch.no_grad():
            for name, p_ in m.named_parameters():
                if "lora_B" in name:
                    p_.normal_(0, 0.01)
        return m

    def peft_model():
        import peft

        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ))
        return m

    models = {"frozen": frozen_model()}
    if "peft" in args.variants:
        try:
            models["peft"] = peft_model()
        except Exception as e:  # pragma: no cover
            print(f"peft unavailable: {e!r}")
    models["torch"] = lora_model(False)
    models["triton"] = lora_model(True)
    if "triton_no_recompute" in args.variants:
        models["triton_no_recompute"] = lora_model(True, recompute=False)
    for name in ("triton_cublas", "triton_tma", PROJ_PASS):
        if name in args.variants:
            models[name] = models["triton"]  # same model, run under OPTION_CHANGES[name]
    ids = [torch.randint(0, cfg.vocab_size, (bsz, seq), device=DEV) for _ in range(2)]

    def make_step(name, m):
        def step(i):
            with base_gemm_for(name, m):
                m(input_ids=ids[i % 2], labels=ids[i % 2]).loss.backward()
        return step

    params = list({id(p_): p_ for m in models.values() for p_ in m.parameters() if p_.requires_grad}.values())

    def prep(i):
        for p_ in params:
            p_.grad = None

    steps = {k: make_step(k, m) for k, m in models.items()}
    n = 3 if args.smoke else 10
    times = interleaved(steps, n=n, rounds=args.rounds, warmup=2 if args.smoke else 3, prep=prep)
    mem = {k: peak_delta_mib(s, prep) for k, s in steps.items()}
    # total peak: the model's own weights + the step's delta
    wbytes = {k: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2**20
              for k, m in models.items()}
    tok = bsz * seq
    rows = []
    for k in steps:
        rows.append(dict(variant=k, ms=times[k], tok_s=tok / times[k] * 1e3, thr_ratio=times["frozen"] / times[k],
                         step_peak_mib=mem[k], weights_mib=wbytes[k],
                         peak_total_mib=mem[k] + wbytes[k],
                         mem_ratio=(mem[k] + wbytes[k]) / (mem["frozen"] + wbytes["frozen"])))
        print(f"[model] {k}: {times[k]:.2f} ms/step, {tok / times[k] * 1e3:.0f} tok/s", flush=True)
    results["model"] = rows


# ------------------------------------------------------------------------------------------
def _env():
    info = dict(run_env(), device=DEV, kernel_options_default=DEFAULT_OPTIONS.to_dict())
    try:
        import peft

        info["peft"] = peft.__version__
    except Exception:
        pass
    return info


def print_tables(results):
    lines = []
    if "layer" in results:
        lines.append(f"\n## Layer: bf16, M={results['args']['M']}, fwd+bwd, ratio to frozen nn.Linear "
                     f"({results['env']['gpu']}, commit {results['env']['commit'][:10]})")
        names = []
        for row in results["layer"]:
            if row["variant"] not in names:
                names.append(row["variant"])
        head = " | ".join(n for n in names if n != "frozen")
        lines.append(f"| K, N | r | frozen ms | {head} | triton peak MiB (frozen) | max rel err triton |")
        lines.append("|---" * (len(names) + 4) + "|")
        keyed = {}
        for row in results["layer"]:
            keyed.setdefault((row["K"], row["N"], row["r"]), {})[row["variant"]] = row
        for (Kd, N, r), d in keyed.items():
            cells = [f"{d[n]['ratio']:.3f}x" if n in d else "-" for n in names if n != "frozen"]
            tri = next((d[n] for n in ("triton", "triton_tma", "triton_cublas") if n in d), None)
            err = max(tri["err"].values()) if tri and tri["err"] else float("nan")
            tri = tri or d["frozen"]
            lines.append(f"| {Kd}, {N} | {r} | {d['frozen']['ms']:.3f} | " + " | ".join(cells)
                         + f" | {tri['peak_mib']:.0f} ({d['frozen']['peak_mib']:.0f}) | {err:.1e} |")
    if "model" in results:
        lines.append("\n## Model: 4-layer Llama (4096/14336), bf16, 2x2048 tokens, r=16 on 7 projections")
        lines.append("| variant | ms/step | tok/s | throughput vs frozen | peak MiB (weights + step) | memory vs frozen |")
        lines.append("|---|---|---|---|---|---|")
        for row in results["model"]:
            lines.append(f"| {row['variant']} | {row['ms']:.2f} | {row['tok_s']:.0f} | {row['thr_ratio']:.3f}x | "
                         f"{row['peak_total_mib']:.0f} | {row['mem_ratio']:.3f}x |")
    if "qlora" in results:
        lines.append("\n## QLoRA layer: NF4 base (bf16 compute), r=16, fwd+bwd, ratio to the bf16 frozen layer")
        lines.append("| K, N | variant | ms | vs bf16 frozen | peak MiB | rel err (y, dx) |")
        lines.append("|---|---|---|---|---|---|")
        for row in results["qlora"]:
            e = row["err"]
            err = f"{e['y']:.1e}, {e['dx']:.1e}" if e else "-"
            lines.append(f"| {row['K']}, {row['N']} | {row['variant']} | {row['ms']:.3f} | {row['ratio_bf16']:.3f}x | "
                         f"{row['peak_mib']:.0f} | {err} |")
    if results.get("qlora_dequant"):
        lines += ["", "## NF4 dequantize alone (bf16 out, GPU us per call, CUDA-graph replay)",
                  "| K, N | dequantizer | us | GB/s |", "|---|---|---|---|"]
        for row in results["qlora_dequant"]:
            lines.append(f"| {row['K']}, {row['N']} | {row['variant']} | {row['us']:.1f} | {row['GBps']:.0f} |")
    print("\n".join(lines), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="layer,ops,host,qlora,model")
    ap.add_argument("--variants", default="frozen,peft,torch_naive,torch,triton,triton_cublas")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--qlora-shapes", default="4096x14336")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (script check, any device)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_lora.json or benchmarks/results/)")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.qlora_shapes = [tuple(int(v) for v in s.split("x")) for s in args.qlora_shapes.split(",")]
    if args.smoke:
        args.M, args.shapes, args.ranks, args.n, args.rounds, args.warmup = 64, [(48, 40)], [4], 3, 1, 1
        args.qlora_shapes = [(64, 48)]
    results = {"env": _env(), "args": {k: v for k, v in vars(args).items()}}
    secs = args.sections.split(",")
    if "layer" in secs:
        bench_layer(args, results)
    if "ops" in secs:
        bench_ops(args, results)
    if "host" in secs:
        bench_host(args, results)
    if "qlora" in secs:
        bench_qlora(args, results)
    if "model" in secs:
        bench_model(args, results)
    if K.HAS_TRITON and DEV == "cuda":
        from automodel_lora.kernels.launch import autotune_choices

        results["autotune"] = autotune_choices()
    out = args.out
    if out is None:
        d = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(d, exist_ok=True)
        out = os.path.join(d, "bench_lora.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")
    print_tables(results)


if __name__ == "__main__":
    main()
