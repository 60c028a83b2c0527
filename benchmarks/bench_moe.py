"""Section ``moe`` of bench_lora.py: one MoE experts layer, forward + backward, bf16, 8192 tokens, r = 16 on
both expert weights, routing from a fixed seed (softmax of a random router, top-k), interleaved in one run.

Shapes (``--moe-shapes``):
  qwen3_30b  E = 128, top-8, hidden 2048, expert intermediate 768 (Qwen3-30B-A3B)
  mixtral    E = 8, top-2, hidden 4096, intermediate 14336 (Mixtral-8x7B)
Variants (``--moe-variants``):
  frozen     the experts module as transformers runs it (``grouped_mm`` implementation), x requiring grad
  peft       HF PEFT ``target_parameters`` on both weights (its default fp32 adapters): it folds
             ``s B_e A_e`` into each weight through a parametrization every step
  torch      automodel_lora's experts on the PyTorch path (``use_triton=False``: grouped products)
  triton     automodel_lora's defaults: the segmented Triton kernels beside the grouped base product
Each adapted variant gets the same adapters (B nonzero); its output is checked against the torch variant
(max |diff| against max |output|) before timing. Peak memory: MiB above what was allocated before a step.
"""

from __future__ import annotations

import copy

import torch
from bench_common import DEV, fmt, interleaved, md_table, peak_delta_mib
from torch import nn

import automodel_lora as al

SHAPES = {"qwen3_30b": dict(experts=128, top_k=8, hidden=2048, inter=768),
          "mixtral": dict(experts=8, top_k=2, hidden=4096, inter=14336)}
VARIANTS = ["frozen", "peft", "torch", "triton"]
TOKENS, R = 8192, 16
OUT_RTOL = 2**-5  # bf16 outputs of two paths of the same math: a few roundings of the largest output


class Holder(nn.Module):
    """The experts module as a child (PEFT cannot target a parameter of the top-level module)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


def build_experts(shape: dict, smoke: bool) -> nn.Module:
    """A Qwen3-MoE experts module of ``shape`` with random bf16 weights on the device (grouped_mm forward)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                         num_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(DEV):
        experts = Qwen3MoeExperts(cfg)
        for p in experts.parameters():
            nn.init.normal_(p, std=shape["hidden"] ** -0.5)
    return experts.to(torch.bfloat16 if DEV == "cuda" else torch.float32).requires_grad_(False)


def variants(experts: nn.Module, want: list) -> tuple[dict, dict]:
    """({name: module taking (x, idx, w)}, {name: why it was skipped})."""
    out, skipped = {}, {}
    ours = {}
    for name, use_triton in (("torch", False), ("triton", True)):
        if name == "torch" or name in want:  # the torch path is the reference the adapters are drawn on
            m = Holder(copy.deepcopy(experts))
            al.apply_lora_to_linear_modules(m, al.PeftConfig(match_all_experts=True, dim=R, alpha=2 * R,
                                                             use_triton=use_triton))
            ours[name] = m
    torch.manual_seed(1)
    ref = ours.get("torch")
    with torch.no_grad():
        for p in ref.experts.lora_B.values():
            p.normal_(0, 0.01)
        for m in ours.values():
            for n in m.experts.lora_A:
                m.experts.lora_A[n].copy_(ref.experts.lora_A[n])
                m.experts.lora_B[n].copy_(ref.experts.lora_B[n])
    if "frozen" in want:
        out["frozen"] = Holder(experts)
    if "peft" in want:
        try:
            out["peft"] = peft_variant(experts, ref)
        except Exception as e:  # a peer's failure is reported, the others are still measured
            skipped["peft"] = f"{type(e).__name__}: {e}"
    out.update({k: v for k, v in ours.items() if k in want})
    return out, skipped


def peft_variant(experts: nn.Module, ref: nn.Module) -> nn.Module:
    """PEFT's target_parameters on a copy, its adapters set to ``ref``'s (PEFT's on-disk layout is its own)."""
    import peft

    from automodel_lora.experts_io import experts_state

    m = peft.get_peft_model(Holder(copy.deepcopy(experts)), peft.LoraConfig(
        r=R, lora_alpha=2 * R, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    state = {f"base_model.model.{k}".replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in experts_state(ref, lambda t: t).items()}
    missing = set(state) - set(dict(m.named_parameters()))
    if missing:
        raise RuntimeError(f"PEFT's parameter names differ from the file layout: {sorted(missing)[:2]}")
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k in state:
                p.copy_(state[k])
    return m


def run(args) -> dict:
    """{"moe": one row per (shape, variant), "moe_skipped": [...]}."""
    rows, skipped_rows = [], []
    for shape_name in args.moe_shapes:
        shape = dict(SHAPES[shape_name])
        tokens = 64 if args.smoke else TOKENS
        if args.smoke:
            shape.update(experts=min(shape["experts"], 6), top_k=min(shape["top_k"], 2), hidden=64, inter=48)
        experts = build_experts(shape, args.smoke)
        arms, skipped = variants(experts, args.moe_variants)
        g = torch.Generator(device=DEV).manual_seed(2)
        x = [torch.randn(tokens, shape["hidden"], device=DEV, dtype=experts.down_proj.dtype, generator=g,
                         requires_grad=True) for _ in range(2)]
        logits = torch.randn(tokens, shape["experts"], device=DEV, generator=g)
        w, idx = torch.softmax(logits, -1).topk(shape["top_k"], dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x[0].dtype)
        diffs = check(arms, x[0], idx, w)
        times, mem = time_variants(arms, x, idx, w, args)
        for k in times:
            rows.append(dict(shape=shape_name, variant=k, ms=times[k], peak_mib=mem[k],
                             ratio=times[k] / times["frozen"] if "frozen" in times else None,
                             out_max_diff=diffs.get(k), tokens=tokens, **shape))
            print(f"[moe] {shape_name} {k}: {times[k]:.3f} ms, peak {mem[k]:.0f} MiB", flush=True)
        skipped_rows += [dict(shape=shape_name, variant=k, reason=v) for k, v in skipped.items()]
    return {"moe": rows, "moe_skipped": skipped_rows}


@torch.no_grad()
def check(arms: dict, x, idx, w) -> dict:
    """{variant: max |out - torch variant's out|}; printed with the verdict."""
    if "torch" not in arms:
        return {}
    want = arms["torch"](x, idx, w).float()
    scale = want.abs().max().item()
    diffs = {}
    for k, m in arms.items():
        diffs[k] = (m(x, idx, w).float() - want).abs().max().item()
        ok = "agrees" if diffs[k] <= OUT_RTOL * scale else "DISAGREES"
        if k == "frozen":  # no adapters: how far they move the output, which the check must see
            ok = "the adapters' effect" + ("" if diffs[k] > 2 * OUT_RTOL * scale else ", too small to check against")
        print(f"[moe] {k}: max |diff| {diffs[k]:.3g} vs the torch path (max |out| {scale:.3g}): {ok}", flush=True)
    return diffs


def time_variants(arms: dict, xs: list, idx, w, args) -> tuple[dict, dict]:
    params = [p for m in arms.values() for p in m.parameters() if p.requires_grad]

    def prep(i):
        for t in xs + params:
            t.grad = None

    def make(m):
        return lambda i: m(xs[i % 2], idx, w).float().square().mean().backward()

    steps = {k: make(m) for k, m in arms.items()}
    times = interleaved(steps, n=args.n, rounds=args.rounds, warmup=args.warmup, prep=prep)
    return times, {k: peak_delta_mib(s, prep) for k, s in steps.items()}


def table(results: dict) -> list[str]:
    if not results.get("moe"):
        return []
    rows = [[r["shape"], r["variant"], f"{r['ms']:.3f}", fmt(r["ratio"], ".3f") + ("x" if r["ratio"] else ""),
             f"{r['peak_mib']:.0f}", fmt(r["out_max_diff"], ".3g")] for r in results["moe"]]
    rows += [[s["shape"], s["variant"], f"not timed: {s['reason'][:120]}", "", "", ""]
             for s in results.get("moe_skipped", [])]
    return md_table("MoE experts layer: fwd+bwd, bf16, r=16 on both expert weights, ratio to the frozen experts",
                    ["shape", "variant", "ms", "ratio", "peak MiB", "max diff vs torch"], rows)
