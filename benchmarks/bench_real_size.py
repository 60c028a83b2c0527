"""The real-model recipes at real size, against HF PEFT + ``transformers.Trainer``, both arms in one call.

For each run (``--runs``, default all three), on one GPU:

- ``ours``: the recipe YAML (``configs/<run>.yaml``) through its Python entry point (the ``Recipe``
  phases, in this process), with ``model.random_init: true`` on the shipped config-only directory
  (``configs/models/...``): the published architecture, random weights, no download.
  The three recipes set ``train.fused_loss: auto`` and ``train.fused_norm: auto``: with ``liger_kernel`` on
  the path that is Liger's fused linear + cross-entropy and its RMSNorm kernel.
- Not in the default arms, each switch alone: ``ours_plain`` (both off: the model's logits and norms),
  ``ours_liger`` (the fused loss only), ``ours_liger_norm`` (the RMSNorm kernel only), ``ours_pre`` (the
  adapter's dropout on its input, where PEFT puts it, instead of the recipes' ``post``), ``ours_compile`` (both
  off, the model under ``torch.compile``: Inductor fuses the frozen model's norms, rotary embedding and
  residual adds).
- ``peft_trainer``: what a user would otherwise run: the same model (built by the same function
  from the same ``config.json`` and seed, NF4-quantized by the same function for the QLoRA run),
  ``peft.get_peft_model`` with the recipe's rank, alpha, dropout and target modules (PEFT's
  defaults otherwise: fp32 adapters, as the recipe's ``lora_dtype``), ``transformers.Trainer``
  with the recipe's AdamW (lr, betas, eps, weight decay), clipping, warmup and cosine-to-min-lr
  schedule, bf16, non-reentrant gradient checkpointing.

Both arms see the same sequences in the same order: the recipe's data (``configs/data/quickstart.jsonl``
under the byte tokenizer, packed to ``--seq-len``), visited as the recipe's sampler visits them
(the Trainer's shuffling is turned off). Batch: the recipe's ``batch_size`` (2) with
``--grad-accum`` micro-batches per step (default 1, not the recipe's 8: a LoRA optimizer step is
negligible next to a micro-batch, so tokens/s hardly depends on it, and 8 would make each run 8x
longer).

Measured per arm: tokens/s over the steps after ``--warmup-steps`` (wall time between the ends of
steps, the device synchronized), peak memory (``max_memory_allocated`` from the start of
training: model building and the QLoRA quantization, which passes through the bf16 weights, are
not counted), MFU (``automodel_lora.recipe.flops``: ``4 N_frozen + 6 N_adapter + 12 L d T`` flops
per token over the GPU's dense bf16 peak), the loss of every step and the final loss. Rows are
written to ``real_size_<gpu>_<date>.json`` under ``--out`` ($OUT, else ``benchmarks/results/``);
an existing file of that name keeps its rows of the runs not run this time.

Time on one H100 (measured): an 8B micro-batch of 2 x 2048 tokens with checkpointing takes 0.45 s (ours) to
0.67 s (PEFT + Trainer), so 50 steps and ~20 s of model building are about 2 minutes per run with both arms;
the three runs fit one 10-minute device call::

    python benchmarks/bench_real_size.py --runs llama3_8b_lora --steps 50 --out $OUT
    python benchmarks/bench_real_size.py --smoke          # tiny configs on the CPU, < 1 minute

``--max-seq 4096,8192,16384,32768`` probes instead the longest sequence each arm trains at on this GPU (3 steps
per length, the recipe's batch and checkpointing), written to ``max_seq_<gpu>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import free_device_memory, run_env
from step_profile import StepProfile, print_profile

from automodel_lora.recipe import Recipe, load_recipe
from automodel_lora.recipe.data import StepSampler, build_datasets, collate
from automodel_lora.recipe.distributed import cleanup, setup_distributed
from automodel_lora.recipe.flops import mfu, peak_bf16_flops, train_flops_per_token
from automodel_lora.recipe.loop import use_bf16
from automodel_lora.recipe.model import build_random_model, load_model_config, quantize_linears_4bit, resolve_dtype
from automodel_lora.recipe.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configs" / "data" / "quickstart.jsonl"
RUNS = {  # run -> (recipe, config-only model directory)
    "llama3_8b_lora": ("llama3_8b_lora.yaml", "llama3.1-8b"),
    "llama3_8b_qlora": ("llama3_8b_qlora.yaml", "llama3.1-8b"),
    "qwen2_5_7b_lora": ("qwen2_5_7b_lora.yaml", "qwen2.5-7b"),
}
# Arms: ours (with the recipe overrides of each switch measured), or HF PEFT + transformers.Trainer.
OUR_ARMS = {"ours": [], "ours_plain": ["train.fused_loss=false", "train.fused_norm=false"],
            "ours_liger": ["train.fused_loss=liger", "train.fused_norm=false"],
            "ours_liger_norm": ["train.fused_loss=false", "train.fused_norm=liger"],
            "ours_pre": ["peft.dropout_position=pre"],
            "ours_compile": ["train.compile=true", "train.fused_loss=false", "train.fused_norm=false"]}
ARMS = (*OUR_ARMS, "peft_trainer")
# --smoke: each architecture shrunk to a few hundred thousand parameters (the same model classes).
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--arms", default="ours,peft_trainer", help=f"comma-separated, of: {', '.join(ARMS)} "
                   "(the recipe's Liger switches: ours_plain both off, ours_liger the fused loss only, "
                   "ours_liger_norm the norm only; ours_pre: dropout_position=pre; ours_compile: both off under "
                   "train.compile=true)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per arm")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of tokens/s")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--out", default=None, help="a directory or a .json file (default: $OUT, else benchmarks/results/)")
    p.add_argument("--smoke", action="store_true", help="tiny configs, CPU, fp32, 4 steps of 64 tokens")
    p.add_argument("--max-seq", metavar="LENS", default=None,
                   help="instead of the timed runs: the longest of these sequence lengths (comma-separated, "
                        "ascending) each arm trains at, 3 steps each, stopping at the first out-of-memory")
    p.add_argument("--profile", action="store_true",
                   help="instead of the timed runs: profile 2 steps of each arm after --warmup-steps (device time per "
                        "kind of kernel against the wall time), written to step_profile_<gpu>_<date>.json")
    p.add_argument("--table", metavar="JSON", help="print the README's markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.table:
        return args
    if args.smoke:
        args.steps, args.warmup_steps, args.seq_len = min(args.steps, 4), 1, 64
    if args.max_seq:
        try:
            args.max_seq = [int(x) for x in args.max_seq.split(",")]
        except ValueError:
            p.error(f"--max-seq: comma-separated integers, got {args.max_seq!r}")
        if args.max_seq != sorted(args.max_seq) or args.max_seq[0] < 1:
            p.error(f"--max-seq: positive lengths in ascending order, got {args.max_seq}")
        args.steps, args.warmup_steps = 3, 1
    if args.profile and args.max_seq:
        p.error("--profile and --max-seq are separate measurements: give one")
    if args.profile:
        args.steps = args.warmup_steps + 2
    runs, arms = args.runs.split(","), args.arms.split(",")
    for name, given, valid in (("--runs", runs, RUNS), ("--arms", arms, ARMS)):
        bad = [x for x in given if x not in valid]
        if bad:
            p.error(f"{name}: unknown {bad[0]!r}; choose from {', '.join(valid)}")
    if args.warmup_steps < 1:  # the first step's start is not stamped: it is always left out
        p.error(f"--warmup-steps must be at least 1, got {args.warmup_steps}")
    if args.steps <= args.warmup_steps:
        p.error(f"--steps {args.steps} must be larger than --warmup-steps {args.warmup_steps}")
    if any("qlora" in run for run in runs) and importlib.util.find_spec("bitsandbytes") is None:
        p.error("the QLoRA run needs bitsandbytes: install its wheel (see GPU.md) and put it on PYTHONPATH, "
                "or leave llama3_8b_qlora out of --runs")
    args.runs, args.arms = runs, arms
    return args


def smoke_model_dir(run: str, root: Path) -> Path:
    """A config-only directory of the run's architecture at the tiny ``SMOKE_SHAPE``."""
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(REPO / "configs" / "models" / RUNS[run][1])
    tiny = AutoConfig.for_model(real.model_type, **SMOKE_SHAPE)
    directory = root / f"smoke-{RUNS[run][1]}"
    tiny.save_pretrained(directory)
    return directory


def recipe_for(run: str, args, work: Path, arm_overrides: list[str] = ()):
    """The run's recipe YAML with the overrides of this benchmark (random init, data, steps, no saving) and
    ``arm_overrides`` (the switches an arm of ours measures)."""
    model_dir = smoke_model_dir(run, work) if args.smoke else REPO / "configs" / "models" / RUNS[run][1]
    overrides = [
        "model.random_init=true", f"model.name_or_path={model_dir}",
        f"data.path={DATA}", "data.tokenizer=byte", f"data.seq_len={args.seq_len}", "data.validation_split=0",
        f"train.max_steps={args.steps}", f"train.grad_accum_steps={args.grad_accum}", "train.eval_every=0",
        "train.log_every=10", f"checkpoint.output_dir={work / run}", "checkpoint.save_every=0",
        "checkpoint.resume=null", "checkpoint.save_base_model=false",
        # PEFT's default init of lora_A (the recipe's default is xavier, a larger spread at these shapes): both
        # arms then train adapters drawn alike, so their loss curves compare; speed and memory do not depend on it
        "peft.lora_A_init=kaiming",
    ]
    if args.smoke:  # the CPU: fp32 throughout
        overrides += ["model.dtype=float32", "train.bf16=false", "train.device=cpu",
                      "quantization.bnb_4bit_compute_dtype=float32"]
    return load_recipe(REPO / "configs" / RUNS[run][0], [*overrides, *arm_overrides])


def _summary(step_ends: list[float], tokens: list[int], losses: list[float], warmup: int, peak_mib, start_mib) -> dict:
    """tok/s over the steps after ``warmup`` from the wall-clock ends of all steps."""
    tok_s = sum(tokens[warmup:]) / (step_ends[-1] - step_ends[warmup - 1])
    return {"tok_s": tok_s, "peak_mib": peak_mib, "start_mib": start_mib, "steps": len(losses),
            "final_loss": losses[-1], "losses": losses}


def _reset_peak(device: torch.device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def _peak(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_ours(cfg, args) -> dict:
    """The recipe's phases in this process; step ends stamped as each step's record is made."""
    env = setup_distributed(cfg.distributed, cfg.train.device, cfg.quantization.load_in_4bit)
    recipe = Recipe(cfg, env, stream=sys.stderr)
    step_ends, losses, tokens = [], [], []
    after_step = recipe._after_step
    profiler = StepProfile(args.warmup_steps) if args.profile else None

    def stamped(step, result):  # train_step synchronized the device before returning `result`
        step_ends.append(time.perf_counter())
        losses.append(result.loss)
        tokens.append(int(result.n_tokens))
        if profiler:
            profiler.tick()
        after_step(step, result)

    recipe._after_step = stamped
    try:
        recipe.setup()
        start_mib = _reset_peak(env.device)
        recipe.train()
        row = _summary(step_ends, tokens, losses, args.warmup_steps, _peak(env.device), start_mib)
        row["flops_per_token"], row["peak_flops"] = recipe.flops_per_token, recipe.peak_flops
        if profiler:
            row["profile"] = profiler.result()
        return row
    finally:
        recipe.cleanup()
        cleanup(env)


def ordered_sequences(cfg) -> list:
    """The recipe's packed sequences in the order its sampler visits them on one process."""
    tc = cfg.train
    train_set, _, _ = build_datasets(cfg.data, ByteTokenizer(), tc.seed)
    sampler = StepSampler(len(train_set), tc.batch_size, tc.grad_accum_steps, 1, tc.seed, cfg.data.shuffle)
    return [train_set[i] for step in range(tc.max_steps) for mb in sampler.micro_batches(step, 0) for i in mb]


def build_peft_model(cfg, device: torch.device):
    """The same random base as the recipe's (same builder, seed, quantizer), wrapped by HF PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.train.seed)
    model = build_random_model(load_model_config(cfg.model), resolve_dtype(cfg.model.dtype), device,
                               cfg.model.attn_implementation)
    if cfg.quantization.load_in_4bit:
        quantize_linears_4bit(model, cfg.quantization, device)
    pc = cfg.peft
    lora = LoraConfig(r=pc.dim, lora_alpha=pc.alpha, lora_dropout=pc.dropout, target_modules=list(pc.target_modules),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def training_arguments(cfg, work: Path, device: torch.device):
    """``TrainingArguments`` matching the recipe's optimizer, schedule, precision and checkpointing."""
    from transformers import TrainingArguments

    tc = cfg.train
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int((tc.warmup_ratio or 0.0) * tc.max_steps)
    schedule = ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": tc.min_lr_ratio}}
                if tc.scheduler == "cosine" else {"lr_scheduler_type": "constant_with_warmup"})
    return TrainingArguments(
        output_dir=str(work / "peft_trainer"), per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum_steps, max_steps=tc.max_steps, learning_rate=tc.lr,
        weight_decay=tc.weight_decay, adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], adam_epsilon=tc.eps,
        optim="adamw_torch", warmup_steps=warmup, max_grad_norm=tc.max_grad_norm or 0.0,
        bf16=use_bf16(tc.bf16, device), gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to=[], seed=tc.seed, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device.type == "cpu", disable_tqdm=True, **schedule,
    )


def run_peft_trainer(cfg, args, work: Path) -> dict:
    """PEFT + ``transformers.Trainer`` on the same model, data order, batch and optimizer settings."""
    from transformers import Trainer, TrainerCallback

    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    sequences = ordered_sequences(cfg)
    per_step = cfg.train.batch_size * cfg.train.grad_accum_steps
    tokens = [sum(len(e.input_ids) for e in sequences[i:i + per_step]) for i in range(0, len(sequences), per_step)]
    model = build_peft_model(cfg, device)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = ByteTokenizer.pad_token_id

    profiler = StepProfile(args.warmup_steps) if args.profile else None

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_ends, self.losses = [], []

        def on_step_end(self, args_, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.step_ends.append(time.perf_counter())
            if profiler:
                profiler.tick()

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class InOrderTrainer(Trainer):  # the recipe's order: no shuffling
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    clock = Clock()
    trainer = InOrderTrainer(model=model, args=training_arguments(cfg, work, device), train_dataset=sequences,
                             data_collator=lambda examples: collate(examples, pad), callbacks=[clock])
    start_mib = _reset_peak(device)
    trainer.train()
    row = _summary(clock.step_ends, tokens, clock.losses, args.warmup_steps, _peak(device), start_mib)
    row["flops_per_token"] = train_flops_per_token(load_model_config(cfg.model), cfg.data.seq_len, n_adapter)
    row["peak_flops"] = peak_bf16_flops(device)
    if profiler:
        row["profile"] = profiler.result()
    del trainer, model
    return row


def run_arm(run: str, arm: str, args, work: Path) -> dict:
    """One (run, arm) at ``args.seq_len``: its row (tok/s, memory, MFU, losses); device memory freed after."""
    cfg = recipe_for(run, args, work, OUR_ARMS.get(arm, []))
    try:
        row = run_ours(cfg, args) if arm in OUR_ARMS else run_peft_trainer(cfg, args, work / run)
    finally:
        free_device_memory()
    row["mfu"] = mfu(row["flops_per_token"], row["tok_s"], row["peak_flops"])
    return row


def probe_lengths(run: str, arm: str, args, work: Path):
    """Rows ``{"seq_len", "fits", ...}`` for ``args.max_seq`` in turn (3 steps each) up to the first length that
    runs out of device memory (its row has ``fits: false`` and the error's first line)."""
    for seq_len in args.max_seq:
        args.seq_len = seq_len
        try:
            yield {"seq_len": seq_len, "fits": True, **run_arm(run, arm, args, work)}
        except torch.OutOfMemoryError as e:
            free_device_memory()
            yield {"seq_len": seq_len, "fits": False, "error": str(e).splitlines()[0]}
            return


def longest_fits(rows: list[dict]) -> tuple[dict, dict]:
    """({(run, arm): the row of the longest length that trained}, {(run, arm): the first length out of memory})."""
    longest: dict = {}
    oom: dict = {}
    for r in rows:
        key = (r["run"], r["arm"])
        if r.get("fits") and r["seq_len"] > longest.get(key, {}).get("seq_len", 0):
            longest[key] = r
        elif not r.get("fits"):
            oom[key] = min(r["seq_len"], oom.get(key, r["seq_len"]))
    return longest, oom


def print_max_seq(rows: list[dict]) -> None:
    """The longest length that fitted per (run, arm), with its peak memory and tok/s."""
    print(f"{'run':<18} {'arm':<13} {'max seq':>8} {'peak MiB':>9} {'tok/s':>9}")
    for (run, arm), r in longest_fits(rows)[0].items():
        print(f"{run:<18} {arm:<13} {r['seq_len']:>8} {r['peak_mib'] or 0:>9.0f} {r['tok_s']:>9.0f}")


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; the CPU -> ``cpu``."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def output_path(out: str | None, gpu: str, kind: str = "real_size") -> Path:
    name = f"{kind}_{gpu_slug(gpu)}_{datetime.date.today().isoformat()}.json"
    base = Path(out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    return base if base.suffix == ".json" else base / name


def main(argv=None) -> dict:
    """Run the selected runs and arms; write and return the results (also printed as a table).

    The file is rewritten after every (run, arm), so a call cut off by a time limit keeps the rows
    it finished."""
    args = parse_args(argv)
    if args.table:
        results = json.loads(Path(args.table).read_text())
        is_max_seq = any("seq_len" in r for r in results.get("rows", []))
        print((markdown_max_seq if is_max_seq else markdown_table)(results))
        return results
    env = run_env()
    settings = {k: getattr(args, k) for k in ("steps", "warmup_steps", "seq_len", "grad_accum", "smoke")}
    path = output_path(args.out, env["gpu"], "max_seq" if args.max_seq else "step_profile" if args.profile else "real_size")
    # Rows of the runs not run this time are kept from an earlier file of the same name.
    kept = [r for r in json.loads(path.read_text()).get("rows", []) if r["run"] not in args.runs] if path.is_file() else []
    results = {**env, "settings": settings, "rows": kept}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="real_size_") as tmp:
        for run in args.runs:
            for arm in args.arms:
                for row in (probe_lengths(run, arm, args, Path(tmp)) if args.max_seq else
                            [run_arm(run, arm, args, Path(tmp))]):
                    results["rows"].append({"run": run, "arm": arm, **row})
                    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    for row in results["rows"] if args.profile else ():
        print_profile(f"{row['run']} {row['arm']}", row.get("profile"))
    (print_max_seq if args.max_seq else print_table)(results["rows"])
    print(f"wrote {path}")
    return results


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<18} {'arm':<13} {'tok/s':>9} {'peak MiB':>9} {'MFU':>6} {'final loss':>10}")
    def fmt(value, spec: str) -> str:  # a row of an older file may lack a field
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for r in rows:
        print(f"{r['run']:<18} {r['arm']:<13} {fmt(r.get('tok_s'), '>9.0f'):>9} {fmt(r.get('peak_mib'), '.0f'):>9} "
              f"{fmt(r.get('mfu'), '.1%'):>6} {fmt(r.get('final_loss'), '.4f'):>10}")


def markdown_table(results: dict) -> str:
    """The README's real-model table from a results file: one line per run, both arms side by side;
    ``not measured yet`` for a run or arm the file does not hold."""
    rows = {(r["run"], r["arm"]): r for r in results.get("rows", [])}
    gpu = f"{results.get('gpu', '?')}, {str(results.get('date', '?'))[:10]}"
    lines = [
        "| run | GPU | tok/s ours | tok/s PEFT + Trainer | speed-up | peak GiB ours | peak GiB PEFT + Trainer "
        "| memory ratio | MFU ours | MFU PEFT + Trainer | final loss ours / PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in RUNS:
        ours, peft = rows.get((run, "ours")), rows.get((run, "peft_trainer"))
        if ours is None and peft is None:
            lines.append(f"| {run} | " + " | ".join(["not measured yet"] * 10) + " |")
            continue

        def get(r, key, spec, scale=1.0):
            v = r.get(key) if r else None
            return format(v * scale, spec) if isinstance(v, (int, float)) else "not measured yet"

        def ratio(key, spec):
            a, b = (r.get(key) if r else None for r in (ours, peft))
            return format(a / b, spec) + "x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

        lines.append(
            f"| {run} | {gpu} | {get(ours, 'tok_s', ',.0f')} | {get(peft, 'tok_s', ',.0f')} | {ratio('tok_s', '.2f')} "
            f"| {get(ours, 'peak_mib', '.1f', 1 / 1024)} | {get(peft, 'peak_mib', '.1f', 1 / 1024)} | "
            f"{ratio('peak_mib', '.2f')} | {get(ours, 'mfu', '.1%')} | {get(peft, 'mfu', '.1%')} "
            f"| {get(ours, 'final_loss', '.3f')} / {get(peft, 'final_loss', '.3f')} |"
        )
    return "\n".join(lines)


def markdown_max_seq(results: dict) -> str:
    """The README's longest-sequence table from a ``--max-seq`` file: per run and arm, the longest length that
    trained, its peak memory and tok/s, and the first length that ran out of memory (``none tried`` where every
    length tried fitted)."""
    longest, oom = longest_fits(results.get("rows", []))
    gpu = f"{results.get('gpu', '?')}, {str(results.get('date', '?'))[:10]}"
    lines = ["| run | arm | GPU | longest sequence trained | peak GiB there | tok/s there | out of memory at |",
             "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        for arm in ("ours", "peft_trainer"):
            r = longest.get((run, arm))
            if r is None:
                lines.append(f"| {run} | {arm} | " + " | ".join(["not measured yet"] * 5) + " |")
                continue
            first_oom = oom.get((run, arm))
            lines.append(f"| {run} | {arm} | {gpu} | {r['seq_len']:,} | {r['peak_mib'] / 1024:.1f} | "
                         f"{r['tok_s']:,.0f} | {f'{first_oom:,}' if first_oom else 'none tried'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
