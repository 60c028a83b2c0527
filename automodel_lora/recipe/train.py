"""The finetune recipe: config -> data -> model -> LoRA -> (FSDP2 | DDP) -> train -> adapter.

``finetune(cfg)`` is what ``scripts/finetune.py`` and ``automodel-lora finetune`` run. One
optimizer step::

    micro-batches of this rank (grad_accum_steps x batch_size sequences)
    n_tgt = all_reduce(sum of target tokens)                 # global, before any forward
    for each micro-batch: loss = CE_sum / n_tgt * world_size; loss.backward()
                                                             # DDP / FSDP2 average over ranks
    clip_grad_norm_, AdamW.step, scheduler.step

so the gradient is that of the mean token loss over the whole global batch, whatever the
split over micro-batches and ranks: 2 ranks x batch 2 equals 1 rank x batch 4, to fp tolerance.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointManager
from .config import ConfigError, RecipeConfig
from .data import IGNORE_INDEX, StepSampler, build_datasets, collate, eval_batches
from .distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    cleanup,
    no_sync,
    setup_distributed,
    wrap_model,
)
from .model import load_model_config, prepare_model
from .progress import MetricsWriter, ProgressBar, format_duration
from .tokenizer import build_tokenizer

__all__ = ["finetune", "lr_lambda", "TrainingInterrupted"]


class TrainingInterrupted(SystemExit):
    """Raised after SIGINT/SIGTERM once the checkpoint is saved (exit code 128 + signal)."""


def lr_lambda(step: int, total: int, warmup: int, scheduler: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup from
    1/(warmup+1), then cosine from 1 down to ``min_ratio`` at ``total`` (or flat)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions. logits: (B, T, V); labels: (B, T)."""
    # Shift the labels, not the logits: logits.flatten is a view, so the fp32 copy is the only one.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,), last position ignored
    return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _n_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary and exits.
    A second Ctrl-C aborts immediately."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _use_bf16(setting, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, env: DistEnv, pad_id: int, autocast) -> float | None:
    """Mean target-token loss over ``batches`` (shared by all ranks; each rank runs its share,
    padded with weight-0 repeats so FSDP2 collectives stay matched)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    per_rank = math.ceil(len(batches) / env.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for i in range(per_rank):
        j = i * env.world_size + env.rank
        real = j < len(batches)
        cpu_b = collate(batches[j if real else 0], pad_id)
        b = {k: v.to(env.device) for k, v in cpu_b.items()}
        with autocast():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        if real:
            total[0] += _causal_lm_loss_sum(logits, b["labels"]).double()
            total[1] += _n_targets(cpu_b)  # counted on the CPU batch: no device sync per batch
    all_reduce_sum(total, env)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records from after the checkpoint (they will be re-logged)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def finetune(cfg: RecipeConfig, stream=None) -> dict:
    """Run a recipe end to end. Returns a summary dict (also written to ``summary.json``).

    Raises:
        ConfigError: any input problem, before training starts.
        TrainingInterrupted: after SIGINT/SIGTERM, once a checkpoint has been saved.
    """
    t_start = time.perf_counter()
    env = setup_distributed(cfg.distributed, cfg.train.device, cfg.quantization.load_in_4bit)
    try:
        return _finetune(cfg, env, stream, t_start)
    finally:
        cleanup(env)


def _finetune(cfg: RecipeConfig, env: DistEnv, stream, t_start: float) -> dict:
    from automodel_lora import save_adapter

    tc, dc, ck = cfg.train, cfg.data, cfg.checkpoint
    out_dir = Path(ck.output_dir)
    bar = ProgressBar(total=1, enabled=env.is_main, stream=stream, every=tc.log_every)
    say = bar.write

    # ---------------------------------------------------------------- 1. inputs, checked early
    model_config = load_model_config(cfg.model)
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and dc.seq_len > max_pos:
        raise ConfigError(
            f"`data.seq_len: {dc.seq_len}` is larger than the model's max_position_embeddings ({max_pos}); "
            f"set data.seq_len <= {max_pos}"
        )
    tokenizer = build_tokenizer(dc.tokenizer, cfg.model.name_or_path, cfg.model.trust_remote_code)
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}"
        )
    train_set, val_set, data_info = build_datasets(dc, tokenizer, tc.seed)
    sampler = StepSampler(len(train_set), tc.batch_size, tc.grad_accum_steps, env.world_size, tc.seed, dc.shuffle)
    if tc.max_steps is not None:
        total_steps = tc.max_steps
    else:
        total_steps = max(1, int(math.ceil((tc.epochs or 1) * sampler.steps_per_epoch)))
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int((tc.warmup_ratio or 0.0) * total_steps)
    ckpts = CheckpointManager(out_dir, ck.keep_last, env)
    resume_from = ckpts.resolve(ck.resume)
    use_bf16 = _use_bf16(tc.bf16, env.device)

    say(
        f"[data] {data_info['train_records']} train records -> {len(train_set)} sequences of <= {dc.seq_len} tokens "
        f"({'packed' if dc.packing else 'padded'}); {len(val_set)} validation sequences"
        + (f"; {data_info['truncated']} truncated" if data_info["truncated"] else "")
    )
    say(
        f"[train] {total_steps} steps x global batch {sampler.global_batch} "
        f"({tc.batch_size} x {tc.grad_accum_steps} accum x {env.world_size} proc) = "
        f"{total_steps / sampler.steps_per_epoch:.2f} epochs; device {env.device}, strategy {env.strategy}, "
        f"bf16 autocast {'on' if use_bf16 else 'off'}"
    )

    # ---------------------------------------------------------------- 2. model
    if resume_from is not None:
        state = CheckpointManager.load_state(resume_from)
        if int(state["step"]) >= total_steps and (out_dir / "summary.json").is_file():
            say(f"[resume] {resume_from} is the end of a finished run ({total_steps} steps); nothing to train")
            return json.loads((out_dir / "summary.json").read_text())
    else:
        state = {"step": 0, "tokens": 0, "val_loss_before": None, "first_loss": None}
    torch.manual_seed(tc.seed)
    save_base = ck.save_base_model if ck.save_base_model != "auto" else cfg.model.tiny is not None
    base_dir = out_dir / "base_model"
    # A resumed run keeps the base it started from (rebuilding it from the seed gives the same one).
    write_base = save_base and env.is_main and (resume_from is None or not (base_dir / "config.json").is_file())
    model, description = prepare_model(cfg, env.device, save_base_to=base_dir if write_base else None)
    say(f"[model] {description}")
    if resume_from is not None:
        CheckpointManager.load_adapter_weights(model, resume_from)
    raw_model = model
    model = wrap_model(model, env, cfg.distributed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, tc.scheduler, tc.min_lr_ratio)
    )
    start_step = 0
    if resume_from is not None:
        ckpts.load_optimizer(model, optimizer, scheduler, state)
        for key in ("optimizer", "scheduler"):  # re-captured at every save
            state.pop(key, None)
        start_step = int(state["step"])
        if not ckpts.load_rng(resume_from):
            torch.manual_seed(tc.seed + env.rank + start_step)
        say(f"[resume] from {resume_from} at step {start_step}/{total_steps}")
    else:
        torch.manual_seed(tc.seed + env.rank)  # dropout differs per rank
    fwd_model = torch.compile(model) if tc.compile else model

    def autocast():
        return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        if resume_from is not None:
            _trim_metrics(out_dir / "metrics.jsonl", start_step)
    metrics = MetricsWriter(out_dir / "metrics.jsonl", enabled=env.is_main)
    val = eval_batches(val_set, tc.eval_batch_size or tc.batch_size, tc.eval_max_batches)
    if state.get("val_loss_before") is None and val:
        state["val_loss_before"] = evaluate(fwd_model, val, env, tokenizer.pad_token_id, autocast)
        say(f"[eval] step {start_step}: val_loss {state['val_loss_before']:.4f} (before training)")
        metrics.write({"step": start_step, "val_loss": state["val_loss_before"]})

    def save_checkpoint(step: int) -> Path:
        state.update(step=step, epoch=sampler.epoch_of(step), config=cfg.to_dict())
        return ckpts.save(step, raw_model, model, optimizer, scheduler, state, cfg.peft)

    # ---------------------------------------------------------------- 3. train
    bar.total, bar.start = total_steps, start_step
    bar.t0 = time.perf_counter()
    last_loss = None
    last_saved = start_step if resume_from is not None else -1
    step = start_step
    with _SignalFlag() as sig:
        while step < total_steps:
            t0 = time.perf_counter()
            micro = [
                collate([train_set[i] for i in idx], tokenizer.pad_token_id) for idx in sampler.micro_batches(step, env.rank)
            ]
            counts = torch.tensor(
                [sum(_n_targets(b) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)],
                dtype=torch.float64,
                device=env.device,
            )
            all_reduce_sum(counts, env)
            n_tgt, n_tok = counts.tolist()
            n_tgt = max(1.0, n_tgt)
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            for m, b in enumerate(micro):
                b = {k: v.to(env.device, non_blocking=True) for k, v in b.items()}
                with no_sync(model, env, sync=(m == len(micro) - 1)):
                    with autocast():
                        logits = fwd_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    ce = _causal_lm_loss_sum(logits, b["labels"])
                    (ce * (env.world_size / n_tgt)).backward()
                loss_sum += ce.detach().double()
            all_reduce_sum(loss_sum, env)
            loss = float(loss_sum) / n_tgt
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower train.lr or check the data")
            clip = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            dt = time.perf_counter() - t0
            tok_s = n_tok / dt
            state["tokens"] = int(state.get("tokens", 0)) + int(n_tok)
            if state.get("first_loss") is None:
                state["first_loss"] = loss
            last_loss = loss
            rec = {
                "step": step,
                "epoch": round(step / sampler.steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tok_s,
                "tokens": state["tokens"],
                "step_time_s": dt,
            }
            if env.device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            metrics.write(rec)
            bar.update(step, loss, lr, tok_s)
            if tc.eval_every and step % tc.eval_every == 0 and step < total_steps and val:
                vl = evaluate(fwd_model, val, env, tokenizer.pad_token_id, autocast)
                say(f"[eval] step {step}: val_loss {vl:.4f}")
                metrics.write({"step": step, "val_loss": vl})
            stop = torch.tensor([float(sig.signum or 0)], device=env.device)
            all_reduce_max(stop, env)
            if ck.save_every and step % ck.save_every == 0 and step < total_steps:
                save_checkpoint(step)
                last_saved = step
            signum = int(stop.item())
            if signum:
                if last_saved != step:
                    path = save_checkpoint(step)
                else:
                    path = ckpts.latest()
                bar.close()
                name = signal.Signals(signum).name
                say(f"[{name}] checkpoint saved at step {step}: {path}\n  resume with the same command (checkpoint.resume=auto)")
                metrics.close()
                raise TrainingInterrupted(128 + signum)
    bar.close()

    # ---------------------------------------------------------------- 4. finish
    if last_saved != total_steps:
        save_checkpoint(total_steps)
    save_adapter(raw_model, str(out_dir / "adapter"), cfg.peft)
    val_after = evaluate(fwd_model, val, env, tokenizer.pad_token_id, autocast) if val else None
    if val_after is not None:
        metrics.write({"step": total_steps, "val_loss": val_after})
    wall = time.perf_counter() - t_start
    summary = {
        "steps": total_steps,
        "resumed_from_step": start_step if resume_from is not None else None,
        "first_loss": state.get("first_loss"),
        "last_loss": last_loss,
        "val_loss_before": state.get("val_loss_before"),
        "val_loss_after": val_after,
        "tokens": state.get("tokens"),
        "wall_time_s": wall,
        "world_size": env.world_size,
        "strategy": env.strategy,
        "adapter": str(out_dir / "adapter"),
        "base_model": str(base_dir) if save_base else cfg.model.name_or_path,
    }
    if env.device.type == "cuda":
        summary["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    metrics.close()
    if env.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if last_loss is not None:
            say(f"[done] train loss {summary['first_loss']:.4f} -> {last_loss:.4f} in {format_duration(wall)}")
        if val_after is not None and summary["val_loss_before"] is not None:
            say(f"[done] val loss {summary['val_loss_before']:.4f} (untrained) -> {val_after:.4f} (trained)")
        say(f"[done] adapter: {out_dir / 'adapter'}")
        if save_base:
            say(
                "[done] load it with PEFT:\n"
                "  from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
                f"  base = AutoModelForCausalLM.from_pretrained('{out_dir / 'base_model'}')\n"
                f"  model = PeftModel.from_pretrained(base, '{out_dir / 'adapter'}')"
            )
    barrier(env)
    return summary
