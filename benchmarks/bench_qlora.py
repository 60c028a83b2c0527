"""Section 3 of bench_lora.py: a QLoRA layer (bitsandbytes NF4 base, bf16 compute), fwd+bwd, ratio to the
bf16 frozen layer, with QDoRA variants beside (``*_dora``); and the NF4 dequantize alone, bitsandbytes' against
the project's kernel."""

from __future__ import annotations

import copy

import torch
from bench_common import DEV, rel_err
from bench_layer import axolotl_dora, peft_dora
from bench_variants import BNB_DEQUANT, NF4, Wrap, fwd_bwd, lora_copy, time_layer_variants
from torch import nn


def nf4_copy(bnb, lin: nn.Linear) -> nn.Module:
    """``lin`` quantized to a bitsandbytes NF4 Linear4bit (compute in ``lin``'s dtype, its bias kept), on the
    device (bitsandbytes quantizes on the move there)."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=lin.weight.dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.cpu().clone(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.cpu().clone(), requires_grad=False)
    return q.to(DEV)


def qlora_variants(lin: nn.Linear, q: nn.Module, r: int, A0: torch.Tensor, B0: torch.Tensor, dora: bool = True) -> dict:
    """Each variant: (callable x -> y, list of trainable params); with ``dora`` also QDoRA's (``torch_dora``,
    ``triton_dora``, ``peft_dora``, ``axolotl_dora``: the QDoRA layer rows)."""
    variants = {"frozen_bf16": (lin, []), "frozen_nf4": (q, [])}
    try:
        import peft

        m = peft.get_peft_model(Wrap(copy.deepcopy(q)), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
        variants["peft"] = (m, [p_ for p_ in m.parameters() if p_.requires_grad])
    except Exception as e:  # pragma: no cover
        print(f"[qlora] peft unavailable: {e!r}")
    for name, use_triton in (("torch", False), ("triton", True)):
        variants[name] = lora_copy(q, r, A0, B0, use_triton)
    variants[BNB_DEQUANT] = variants["triton"]  # same layer, dequantized by bitsandbytes (base_gemm_for)
    if dora:  # QDoRA: the magnitude's norms from the dequantized weight
        for name, use_triton in (("torch_dora", False), ("triton_dora", True)):
            variants[name] = lora_copy(q, r, A0, B0, use_triton, use_dora=True)
        try:
            variants["peft_dora"] = peft_dora(q, r, A0, B0)
        except Exception as e:  # pragma: no cover - a peer's failure is reported, the others still measured
            print(f"[qlora] peft DoRA unavailable: {e!r}")
        variants.update(axolotl_dora(q, r, A0, B0))
    return variants


def qlora_errors(bnb, variants: dict, q, A0: torch.Tensor, B0: torch.Tensor, x, g) -> dict:
    """The adapted layers' relative error of y and dx against dequantized-base math in fp32."""
    Wd = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    xf, gf, Af, Bf = x.float(), g.float(), A0.float(), B0.float()
    ref_y = xf @ Wd.t() + 2.0 * (xf @ Af.t()) @ Bf.t()
    ref_dx = gf @ Wd + 2.0 * (gf @ Bf) @ Af
    errs = {}
    for name in ("torch", "triton", BNB_DEQUANT):
        x.grad = None
        y = fwd_bwd(name, variants[name][0], x, g)
        errs[name] = {"y": rel_err(y, ref_y), "dx": rel_err(x.grad, ref_dx)}
    if "torch_dora" in variants:  # QDoRA: against our PyTorch path (DoRA's own reference, PEFT's math)
        x.grad = None
        want_y = fwd_bwd("torch_dora", variants["torch_dora"][0], x, g).detach()
        want_dx = x.grad.clone()
        for name in ("triton_dora", "peft_dora", "axolotl_dora"):
            if name in variants:
                x.grad = None
                y = fwd_bwd(name, variants[name][0], x, g)
                errs[name] = {"y": rel_err(y, want_y), "dx": rel_err(x.grad, want_dx)}
    return errs


def run(args) -> dict:
    """{"qlora": one row per (shape, variant), "qlora_dequant": one row per (shape, dequantizer)}; nothing
    without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # pragma: no cover
        print(f"[qlora] skipped: bitsandbytes unavailable ({e!r})")
        return {}
    dt = torch.bfloat16
    M = args.M
    rows, dequant = [], []
    for (Kd, N) in args.qlora_shapes:
        r = 16
        torch.manual_seed(0)
        lin = nn.Linear(Kd, N, bias=False, device=DEV, dtype=dt).requires_grad_(False)
        q = nf4_copy(bnb, lin)
        A0 = (torch.randn(r, Kd, device=DEV) / Kd**0.5).to(dt)
        B0 = (torch.randn(N, r, device=DEV) * 0.05).to(dt)
        xs = [torch.randn(M, Kd, device=DEV, dtype=dt).requires_grad_(True) for _ in range(2)]
        gs = [torch.randn(M, N, device=DEV, dtype=dt) for _ in range(2)]
        variants = qlora_variants(lin, q, r, A0, B0)
        errs = qlora_errors(bnb, variants, q, A0, B0, xs[0], gs[0])

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
    return {"qlora": rows, "qlora_dequant": dequant}


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


def table(results: dict) -> list[str]:
    """The QLoRA table's lines (markdown), then the dequantize table's where it ran."""
    lines = []
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
    return lines
