"""Section 2 of bench_lora.py: one training step (forward, loss on labels = inputs, backward) of a whole
decoder per arm, bf16, 2 x 2048 tokens, r = 16 on the 7 projections; throughput and peak memory against
the frozen model, at the shapes of bench_model_shapes.py (``--model-shapes``, default 8b,1b,0.5b) with the
arms of bench_model_arms.py (``--model-variants``, default frozen,triton,peft,peft_bf16,axolotl).

Per shape, in one process: the base and every arm built (same adapters everywhere), each arm's logits checked
against automodel_lora's PyTorch-path reference and one training step tried, then the arms' steps timed
interleaved (A B C, B C A, ...; median of CUDA-event times, bench_common.interleaved), then one step each for
its peak memory; the shape's models freed before the next. An arm whose logits disagree is timed and marked;
one that cannot be built or fails its trial step is listed with the reason, not timed."""

from __future__ import annotations

import time

import bench_axolotl
import bench_model_shapes
import torch
from bench_common import DEV, free_device_memory, interleaved, kernel_profile, peak_delta_mib
from bench_model_arms import COMPILED, DORA_REFERENCE, GRAPHED, PROJ, build_arms, eager_arm
from bench_variants import base_gemm_for, forget_options
from torch import nn

from automodel_lora import GraphedStep, causal_sdpa

R = 16
# Agreement of an arm's logits with the reference: max |difference| <= LOGITS_RTOL * max |reference logit|.
# Measured on the CPU, bf16: at hidden 512 (8 and 12 layers) the arms differ from the reference, and the
# reference from an fp32 model, by <= 1.5% of the largest logit; at the three shapes' widths (2-6 layers, 64
# tokens) PEFT's fp32 adapters by 1.4-1.5%, while the adapters themselves (the frozen arm) move the largest
# logit difference to 42-67% of it: 2**-4 sits ~4x above the one and ~7x below the other.
LOGITS_RTOL = 2**-4
MODEL_WARMUP, SMOKE_STEPS = 3, 3
GRAPH_WARMUP = MODEL_WARMUP - 1  # eager calls of a graphed arm: the last untimed warm-up call captures


def run(args) -> dict:
    """{"model": one row per (shape, arm), "model_skipped": arms not timed and why, "model_shapes": per
    shape its config, the check's scale and the wall time of its part of the run}."""
    out = {"model": [], "model_skipped": [], "model_shapes": [], "model_env": _env()}
    for shape in bench_model_shapes.select(args.model_shapes, args.smoke):
        t0 = time.perf_counter()
        rows, skipped, info = run_shape(shape, args)
        free_device_memory()  # this shape's models are gone: the next starts from an empty cache
        forget_options()
        info["wall_s"] = time.perf_counter() - t0
        print(f"[model] {shape.name}: {info['wall_s']:.0f} s", flush=True)
        out["model"] += rows
        out["model_skipped"] += skipped
        out["model_shapes"].append(info)
        if getattr(args, "checkpoint", None):  # a run cut short keeps the shapes already measured
            args.checkpoint(out)
    return out


def _env() -> dict:
    import transformers

    return {"transformers": transformers.__version__, "axolotl": bench_axolotl.version()}


def run_shape(shape, args) -> tuple[list, list, dict]:
    """(rows, skipped arms, shape info) of one shape: build, check, time (see the module docstring)."""
    cfg, cls, arch = shape.build()
    bsz, seq = (bench_model_shapes.SMOKE_BATCH, bench_model_shapes.SMOKE_SEQ) if args.smoke else (
        bench_model_shapes.BATCH, bench_model_shapes.SEQ)
    torch.manual_seed(0)
    with torch.device(DEV):  # random init on the device: seconds on the host for a 1B model otherwise
        base = cls(cfg)
    base = base.to(dtype=torch.bfloat16).requires_grad_(False)
    if args.model_base == "nf4":
        quantize_projections(base)
    arms, ref, skipped = build_arms(base, R, args.model_variants)
    ids = [torch.randint(0, cfg.vocab_size, (bsz, seq), device=DEV) for _ in range(2)]
    eager = {k: m for k, m in arms.items() if eager_arm(k) == k}  # a graphed arm is checked as its eager arm
    diffs, scale, failed = logits_diffs(eager, ref, ids[0])
    ref = base = None
    failed.update(trial_steps({k: m for k, m in eager.items() if k not in failed}, ids[0]))
    for k in arms:
        if eager_arm(k) in failed:
            failed[k] = failed[eager_arm(k)]
        elif eager_arm(k) in diffs:
            diffs[k] = diffs[eager_arm(k)]
    skipped.update(failed)
    arms = {k: m for k, m in arms.items() if k not in skipped}
    times, mem, weights, replay_diff, profiles = time_arms(arms, ids, args)
    rows = arm_rows(shape.name, times, mem, weights, diffs, scale, bsz * seq)
    for row in rows:
        if row["variant"] in replay_diff:
            row["replay_loss_rel_diff"] = replay_diff[row["variant"]]
    for row in rows:
        row["base"] = args.model_base
    info = dict(shape=shape.name, title=shape.title(), arch=arch, base=args.model_base, tokens=bsz * seq, r=R,
                attn_implementation=getattr(cfg, "_attn_implementation", None), max_abs_ref_logit=scale,
                logits_tol=LOGITS_RTOL * scale, **({"profiles": profiles} if profiles else {}))
    skipped = [dict(shape=shape.name, variant=k, reason=v) for k, v in skipped.items()]
    return rows, skipped, info


def quantize_projections(model: nn.Module) -> int:
    """The QLoRA protocol's base (``--model-base nf4``): every projection of PROJ replaced in place by a
    bitsandbytes NF4 ``Linear4bit`` computing in the model's bf16, bias kept; returns the count. Every arm is
    then built on this base, as a QLoRA user's model is."""
    import bitsandbytes as bnb
    from bench_qlora import nf4_copy

    count = 0
    for module in list(model.modules()):
        for name in PROJ:
            lin = getattr(module, name, None)
            if type(lin) is nn.Linear:
                setattr(module, name, nf4_copy(bnb, lin))
                count += 1
    return count


@torch.no_grad()
def logits_diffs(arms: dict, ref: nn.Module, ids: torch.Tensor) -> tuple[dict, float, dict]:
    """({arm: max |logits - reference logits|}, max |reference logit|, {arm: error} where the forward raised);
    printed per arm. The frozen arm's difference is the adapters' own effect: the scale the others' must be
    far below."""
    want = ref(input_ids=ids).logits
    scale = want.abs().max().item()
    tol = LOGITS_RTOL * scale
    diffs, failed = {}, {}
    dora_want = arms[DORA_REFERENCE](input_ids=ids).logits if DORA_REFERENCE in arms else None
    for name, m in arms.items():
        try:
            with base_gemm_for(name, m):
                got = m(input_ids=ids).logits
        except Exception as e:  # a peer's failure is reported, and the other arms are still measured
            failed[name] = f"forward failed: {type(e).__name__}: {e}"
            print(f"[model] {name}: {failed[name]}", flush=True)
            continue
        # one sequence at a time: fp32 copies of one [seq, vocab] slice, not of the batch's logits
        against = dora_want if name.endswith("_dora") else want  # DoRA arms: against our DoRA reference
        diffs[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, against, strict=True))
        got = None
        verdict = "agrees" if diffs[name] <= tol else "DISAGREES"
        if name == "frozen":  # no adapters: how far they move the logits, against which the check must see
            verdict = "the adapters' effect" + ("" if diffs[name] > 2 * tol else
                                                 ", under twice the tolerance: the check cannot tell adapters apart")
        print(f"[model] logits {name}: max |diff| {diffs[name]:.4g} vs reference (max |logit| {scale:.3g}, "
              f"tolerance {tol:.3g}): {verdict}", flush=True)
    return diffs, scale, failed


def trial_steps(arms: dict, ids: torch.Tensor) -> dict:
    """{arm: error} of the arms whose training step raises (one step each, before any timing)."""
    failed = {}
    for name, m in arms.items():
        try:
            with base_gemm_for(name, m):
                m(input_ids=ids, labels=ids).loss.backward()
        except Exception as e:  # a peer's failure is reported, and the other arms are still measured
            failed[name] = f"training step failed: {type(e).__name__}: {e}"
            print(f"[model] {name}: {failed[name]}", flush=True)
        for p_ in m.parameters():
            p_.grad = None
    return failed


def time_arms(arms: dict, ids: list, args) -> tuple[dict, dict, dict, dict, dict]:
    """(median ms per step, peak MiB of a step above what was allocated before it, MiB of weights) per arm, and
    per graphed arm the relative difference of a replay's loss from the eager model's (``replay_check``), and per
    arm in ``args.profile`` torch.profiler's table of its step."""
    def make_step(name, m):
        if name.endswith(GRAPHED):
            graphed = graphed_step(m)
            return lambda i: graphed(ids[i % 2])
        if name.endswith(COMPILED):  # the first (warm-up) calls compile forward and backward
            compiled = torch.compile(m)
            return lambda i: compiled(input_ids=ids[i % 2], labels=ids[i % 2]).loss.backward()

        def step(i):
            with base_gemm_for(name, m):
                m(input_ids=ids[i % 2], labels=ids[i % 2]).loss.backward()
        return step

    params = list({id(p_): p_ for m in arms.values() for p_ in m.parameters() if p_.requires_grad}.values())

    def prep(i):
        for p_ in params:
            p_.grad = None

    steps = {k: make_step(k, m) for k, m in arms.items()}
    n = SMOKE_STEPS if args.smoke else args.model_n
    times = interleaved(steps, n=n, rounds=args.rounds, warmup=1 if args.smoke else MODEL_WARMUP, prep=prep)
    profiles = {k: kernel_profile(steps[k], prep=prep, lines=30) for k in args.profile if k in steps}
    for k, table in profiles.items():
        print(f"[model] profile of {k}:\n{table}", flush=True)
    replay_diff = {k: replay_check(step, arms[k], ids[0]) for k, step in steps.items() if k.endswith(GRAPHED)}
    steps = None  # the graphs' memory pools go; each graphed arm's peak is taken from a capture of its own
    mem = {k: peak_delta_mib(memory_step(k, m, make_step), prep) for k, m in arms.items()}
    prep(0)
    # the arm's own weights (a tied head counted once; PEFT's fp32 adapters at 4 bytes)
    weights = {k: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2**20
               for k, m in arms.items()}
    return times, mem, weights, replay_diff, profiles


def replay_check(graphed_call, model: nn.Module, ids: torch.Tensor) -> float:
    """|loss of a replay - loss of the eager step| / |eager loss| on the same batch (printed, and in the arm's
    row): the graphed arm's replay checked against the eager model it replays (after timing)."""
    got = graphed_call(0).item()
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss.item()
    diff = abs(got - want) / abs(want)
    print(f"[model] graph replay loss {got:.6g} vs eager {want:.6g}: rel diff {diff:.2e}", flush=True)
    return diff


def graphed_step(m: nn.Module) -> GraphedStep:
    """The bench step of ``m`` (loss on labels = inputs, backward) as a GraphedStep: warm-up calls eager, then
    one capture, then replays. Its gradients stay in the step's buffers (``prep`` setting them to None is
    undone by the step, as an optimizer's ``zero_grad`` would be)."""
    def loss(x):
        with causal_sdpa(m):  # as the recipe's graphed step: SDPA's causal path inside the capture
            return m(input_ids=x, labels=x).loss

    return GraphedStep(loss, [p_ for p_ in m.parameters() if p_.requires_grad], warmup=GRAPH_WARMUP)


def memory_step(name: str, m: nn.Module, make_step):
    """The step whose one call ``peak_delta_mib`` measures. A replay allocates nothing (its tensors live in the
    graph's pool since the capture), so a graphed arm's call is a fresh step's warm-up and capture: the
    capture allocates, in the pool, what the eager step allocates, in the same order."""
    if not name.endswith(GRAPHED):
        return make_step(name, m)
    fresh = make_step(name, m)
    return lambda i: [fresh(i) for _ in range(GRAPH_WARMUP + 1)]


def arm_rows(shape: str, times: dict, mem: dict, weights: dict, diffs: dict, scale: float, tokens: int) -> list:
    """One JSON row per timed arm; ratios to the frozen arm (None without it)."""
    rows = []
    f = "frozen" if "frozen" in times else None
    for k in times:
        total = mem[k] + weights[k]
        rows.append(dict(
            shape=shape, variant=k, ms=times[k], tok_s=tokens / times[k] * 1e3,
            thr_ratio=times[f] / times[k] if f else None, step_peak_mib=mem[k], weights_mib=weights[k],
            peak_total_mib=total, mem_ratio=total / (mem[f] + weights[f]) if f else None,
            logits_max_diff=diffs[k], logits_ok=None if eager_arm(k) == "frozen" else diffs[k] <= LOGITS_RTOL * scale))
        print(f"[model] {shape} {k}: {times[k]:.2f} ms/step, {tokens / times[k] * 1e3:.0f} tok/s, "
              f"peak {total:.0f} MiB", flush=True)
    return rows


def table(results: dict) -> list[str]:
    """The model table's lines (markdown): one block per shape, a row per arm; "ours / axolotl" on the
    triton row."""
    lines = ["\n## Model: one training step, bf16, r=16 on 7 projections, ratios to the frozen model"]
    shapes = results.get("model_shapes") or [{"shape": None, "title": "8b: 4-layer Llama (4096/14336)",
                                              "tokens": 4096}]
    for info in shapes:
        rows = {r["variant"]: r for r in results["model"] if r.get("shape") == info["shape"]}
        ax = rows.get("axolotl")
        lines += [f"\n### {info['title']}" + (", NF4 projections" if info.get("base") == "nf4" else "")
                  + f", {info['tokens']} tokens"
                  + (f" ({info['wall_s']:.0f} s)" if "wall_s" in info else ""),
                  "| arm | ms/step | tok/s | throughput vs frozen | peak MiB (weights + step) | memory vs frozen | "
                  "logits max diff | throughput: ours / axolotl | memory: ours / axolotl |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            ours_ax = ["-", "-"]
            if k == "triton" and ax:
                ours_ax = [f"{ax['ms'] / r['ms']:.3f}x", f"{r['peak_total_mib'] / ax['peak_total_mib']:.3f}x"]
            lines.append(f"| {k} | {r['ms']:.2f} | {r['tok_s']:.0f} | {_x(r['thr_ratio'])} | "
                         f"{r['peak_total_mib']:.0f} | {_x(r['mem_ratio'])} | {_diff(r)} | " + " | ".join(ours_ax) + " |")
        for s in results.get("model_skipped", []):
            if s["shape"] == info["shape"]:
                lines.append(f"| {s['variant']} | not timed: {s['reason'][:160]} |" + " |" * 7)
    return lines


def _x(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}x"  # None: no frozen arm; nan: no CUDA memory stats


def _diff(row: dict) -> str:
    """The logits check's cell: the difference, flagged where the arm disagrees (frozen: the adapters' effect)."""
    if "logits_max_diff" not in row:
        return "-"
    tag = {None: " (no adapters)", True: "", False: " DISAGREES"}[row.get("logits_ok")]
    return f"{row['logits_max_diff']:.3g}{tag}"
