"""The finetune recipe: config -> data -> model -> LoRA -> (FSDP2 | DDP) -> train -> adapter.

``finetune(cfg)`` is what ``scripts/finetune.py`` and ``automodel-lora finetune`` run; it drives a
:class:`Recipe` through its phases ``setup -> train -> finish -> cleanup``. One optimizer step::

    micro-batches of this rank (grad_accum_steps x batch_size sequences)
    n_tgt = all_reduce(sum of target tokens)                 # global, before any forward
    for each micro-batch: loss = CE_sum / n_tgt * world_size; loss.backward()
                                                             # DDP / FSDP2 average over ranks
    clip_grad_norm_, AdamW.step, scheduler.step

so the gradient is that of the mean token loss over the whole global batch, whatever the
split over micro-batches and ranks: 2 ranks x batch 2 equals 1 rank x batch 4, to fp tolerance.
A step whose loss or gradient norm is not finite is skipped or stops the run (``train.nonfinite``).

Non-finite steps and checkpoints: a skipped step leaves the adapter and the optimizer as they
were, so the only good state to keep is that of the last finite step. Hence:

- the streak (non-finite steps in a row) is part of the train state and of ``trainer_state.json``;
- no checkpoint is written while the streak is > 0: a periodic save is put off (and said), an
  interrupt saves nothing (the resume redoes the steps after the last good checkpoint); so the
  newest checkpoint is always that of a finite step, and rotation never deletes it for a
  checkpoint of a streak;
- a streak reaching ``train.max_nonfinite_skips`` stops the run (exit 3); a run whose last step
  is skipped stops too (exit 3), as its last checkpoint can't be saved: a run ends with exit 0
  only on a finite step. A rerun resumes from the last good checkpoint; the same data and
  settings diverge the same way and stop again, so lowering ``train.lr`` (applied on resume) or
  fixing the data is what moves it on.

A checkpoint is also written only if every adapter and optimizer value is finite.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import loop
from .checkpoint import ADAPTER_DIR, agree, all_finite, optimizer_tensors, write_adapter
from .config import RecipeConfig
from .data import collate
from .distributed import all_reduce_max, all_reduce_sum, barrier, cleanup, no_sync, setup_distributed
from .errors import TrainingInterrupted, TrainingStopped
from .files import TMP_PREFIX, atomic_write_text, fresh_dir, fsync_dir, replace_dir, writing
from .flops import mfu
from .graphs import graph_inputs
from .loop import SignalFlag, evaluate, lr_lambda
from .multi_adapter import evaluate_adapters, multi_train_step
from .progress import MetricsWriter, say_done
from .setup_phase import RecipeSetup, TrainState

__all__ = ["finetune", "lr_lambda", "evaluate", "Recipe", "TrainState", "TrainingInterrupted", "TrainingStopped"]


@dataclass
class StepResult:
    """What one optimizer step measured (``loss`` / ``grad_norm`` are global over ranks)."""

    loss: float
    grad_norm: float
    lr: float
    n_tokens: float
    seconds: float
    per_adapter: dict | None = None  # with data.adapters: {name: its loss}

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # NaN / inf are not JSON


class Recipe(RecipeSetup):
    """One finetune run, in phases (torchtune style)::

        recipe = Recipe(cfg, env)
        summary = recipe.setup()        # inputs, output_dir lock, resume, model, optimizer
        if summary is None:             # None unless the run had already finished
            recipe.train()
            summary = recipe.finish()   # last checkpoint, adapter, final eval, summary.json
        recipe.cleanup()

    ``setup`` and its helpers live in :class:`~automodel_lora.recipe.setup_phase.RecipeSetup`.
    """

    def new_metrics_writer(self, path: Path, enabled: bool) -> MetricsWriter:
        return MetricsWriter(path, enabled=enabled, note=lambda: f"; the last complete checkpoint is {self._last_good()}")

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        """Optimizer steps from the resumed step to the last; saves every ``save_every`` steps.

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM, after saving a checkpoint of the step reached.
            TrainingStopped: non-finite values the ``train.nonfinite`` policy does not skip.
        """
        self.bar.total, self.bar.start = self.total_steps, self.start_step
        self.bar.t0 = time.perf_counter()
        step = self.start_step
        with SignalFlag() as sig:
            while step < self.total_steps:
                result = self.train_step(step)
                step += 1
                self._after_step(step, result)
                stop = torch.tensor([float(sig.signum or 0)], device=self.env.device)
                all_reduce_max(stop, self.env)
                if self.ck.save_every and step % self.ck.save_every == 0 and step < self.total_steps:
                    self._periodic_save(step)
                signum = int(stop.item())
                if signum:
                    self._interrupted(step, signum)
        self.bar.close()

    def train_step(self, step: int) -> StepResult:
        """Forward/backward over this rank's micro-batches of ``step``, clip, and (if finite) step."""
        if self.cfg.data.adapters:
            return multi_train_step(self, step)
        env, tc = self.env, self.cfg.train
        t0 = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        micro = [collate([self.train_set[i] for i in idx], pad) for idx in self.sampler.micro_batches(step, env.rank)]
        n_tgt, n_tok = loop.global_counts(
            [sum(loop.n_targets(b) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)], env)
        n_tgt = max(1.0, n_tgt)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        scale = torch.full((), env.world_size / n_tgt, dtype=torch.float32).to(env.device, non_blocking=True)
        for m, b in enumerate(micro):
            loss_sum += self._forward_backward(b, scale, sync=(m == len(micro) - 1)).double()
        all_reduce_sum(loss_sum, env)
        grad_norm = loop.clip_grad_norm(self.params, tc.max_grad_norm)
        result = StepResult(float(loss_sum) / n_tgt, float(grad_norm), self.optimizer.param_groups[0]["lr"], n_tok, 0.0)
        return self.end_step(result, t0)

    def end_step(self, result: StepResult, t0: float) -> StepResult:
        """The optimizer step if ``result`` is finite (the same decision on every rank: its loss and norm are
        global), the schedule's step regardless, gradients cleared; ``result.seconds`` since ``t0``."""
        if result.finite:
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first step: the schedule moves on regardless
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        result.seconds = time.perf_counter() - t0
        return result

    def _forward_backward(self, batch: dict, scale: torch.Tensor, sync: bool) -> torch.Tensor:
        """One micro-batch (a collated CPU batch): backward of ``CE_sum * scale``; returns ``CE_sum``
        (detached). Replayed as a CUDA graph under ``train.cuda_graphs``; from the hidden states under
        ``train.fused_loss``."""
        env = self.env
        if self.graphed is not None:
            ce = self.graphed(*graph_inputs(batch, scale, env.device))
            self._say_eager_reasons()
            return ce
        b = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        with no_sync(self.model, env, sync=sync):
            ce = loop.loss_sum(self.fwd_model, b, self.autocast, fused=self.fused_loss)
            (ce * scale).backward()
        return ce.detach()

    def _say_eager_reasons(self) -> None:
        """Say once per input shape why its micro-batches run eagerly (a capture failed under ``auto``)."""
        for key, reason in self.graphed.eager_reasons.items():
            if key not in self.said_eager:
                shapes = [list(shape) for shape, _, _ in key]
                self.say(f"[cuda graphs] inputs {shapes} run eagerly: {reason}")
                self.said_eager.add(key)

    def _after_step(self, step: int, r: StepResult) -> None:
        """Count, log, evaluate; apply the non-finite policy."""
        st = self.state
        st.tokens += int(r.n_tokens)
        if r.finite:
            st.nonfinite_in_a_row = 0
            st.first_loss = r.loss if st.first_loss is None else st.first_loss
            self.last_loss = r.loss
        else:
            st.nonfinite_in_a_row += 1
            st.nonfinite_steps += 1
        tokens_per_s = r.n_tokens / r.seconds
        step_mfu = mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.env.world_size)
        rec = {
            "step": step,
            "epoch": round(step / self.sampler.steps_per_epoch, 4),
            "loss": _finite_or_none(r.loss),
            "lr": r.lr,
            "grad_norm": _finite_or_none(r.grad_norm),
            "tokens_per_s": tokens_per_s,
            "tokens": st.tokens,
            "step_time_s": r.seconds,
            "nonfinite_steps": st.nonfinite_steps,
        }
        if step_mfu is not None:
            rec["mfu"] = step_mfu
        rec.update({f"loss/{k}": _finite_or_none(v) for k, v in (r.per_adapter or {}).items()})
        if not r.finite:
            rec["skipped"] = True
        if self.env.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.metrics.write(rec)
        self.bar.update(step, r.loss, r.lr, tokens_per_s, step_mfu)
        if not r.finite:
            self._nonfinite(step, r)
        tc = self.cfg.train
        if tc.eval_every and step % tc.eval_every == 0 and step < self.total_steps and self.val:
            vl = self.evaluate()
            self.say(f"[eval] step {step}: val_loss {vl:.4f}")
            self.metrics.write({"step": step, "val_loss": vl, **self.val_by_adapter})

    def _last_good(self) -> str:
        return f"{self.last_checkpoint}" if self.last_checkpoint is not None else "none (no checkpoint was saved)"

    def _stop(self, message: str) -> None:
        self.bar.close()
        self.say(message)
        self.metrics.close()
        raise TrainingStopped(message)

    def _nonfinite(self, step: int, r: StepResult) -> None:
        tc = self.cfg.train
        what = f"step {step}: loss {r.loss}, grad_norm {r.grad_norm}"
        streak = self.state.nonfinite_in_a_row
        if tc.nonfinite == "skip" and streak < tc.max_nonfinite_skips:
            self.say(f"[nonfinite] {what}: step skipped (the optimizer did not step; {self.state.nonfinite_steps} so far)")
            return
        why = (
            "train.nonfinite=stop"
            if tc.nonfinite == "stop"
            else f"{streak} non-finite steps in a row (train.max_nonfinite_skips={tc.max_nonfinite_skips})"
        )
        self._stop_nonfinite(f"{what} is not finite: {why}")

    def _stop_nonfinite(self, what: str) -> None:
        self._stop(
            f"[stop] {what}. Nothing was saved for this step; the last good checkpoint is {self._last_good()}. "
            f"Lower train.lr (now {self.cfg.train.lr:g}; a rerun applies a new value), set train.max_grad_norm "
            "or check the data, then rerun (checkpoint.resume=auto continues from the last good checkpoint)"
        )

    def _periodic_save(self, step: int) -> None:
        """A ``save_every`` checkpoint, put off while the streak is > 0 (its state is not a good one)."""
        streak = self.state.nonfinite_in_a_row
        if streak == 0:
            self.save_checkpoint(step)
        else:
            self.say(
                f"[checkpoint] step {step}: not saved, {streak} non-finite step(s) in a row; "
                f"the last good checkpoint is {self._last_good()}"
            )

    def _interrupted(self, step: int, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.state.nonfinite_in_a_row:  # nothing good to save: the resume redoes the steps after the last
            self.bar.close()
            self.say(
                f"[{name}] stopped at step {step}, {self.state.nonfinite_in_a_row} non-finite step(s) in a row: not "
                f"saved; the last good checkpoint is {self._last_good()}\n  resume with the same command "
                "(checkpoint.resume=auto)"
            )
        else:
            path = self.last_checkpoint if self.last_saved == step else self.save_checkpoint(step)
            self.bar.close()
            self.say(f"[{name}] checkpoint saved at step {step}: {path}\n  resume with the same command (checkpoint.resume=auto)")
        self.metrics.close()
        raise TrainingInterrupted(128 + signum)

    # ---------------------------------------------------------------- evaluate / save
    def evaluate(self) -> float | None:
        """Mean validation token loss (None without a validation set; with ``data.adapters`` the mean over the
        adapters, each on its own set, and ``val_by_adapter`` holds each)."""
        if self.cfg.data.adapters:
            mean, self.val_by_adapter = evaluate_adapters(self)
            return mean
        return evaluate(self.fwd_model, self.val, self.env, self.tokenizer.pad_token_id, self.autocast)

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def save_checkpoint(self, step: int) -> Path:
        """Write checkpoint ``step`` (collective) after checking that every value in it is finite.
        Never called while the non-finite streak is > 0 (see the module's docstring).

        Raises:
            TrainingStopped: an adapter or optimizer value is not finite (nothing is written).
            RunDirError: a write failed (disk full, not writable).
        """
        ok = all_finite(self.params) and all_finite(optimizer_tensors(self.optimizer))
        if not agree(ok, self.env):
            self._stop(
                f"[stop] step {step}: the adapter or optimizer state holds non-finite values; not saving them as "
                f"a checkpoint. The last good checkpoint is {self._last_good()}. Lower train.lr (now "
                f"{self.cfg.train.lr:g}) or check the data, then rerun"
            )
        self.state.step = step
        payload = {**asdict(self.state), "epoch": self.sampler.epoch_of(step), "config": self.cfg.to_dict()}
        path = self.ckpts.save(step, self.raw_model, self.model, self.optimizer, self.scheduler, payload, self.cfg.peft)
        self.last_checkpoint, self.last_saved = path, step
        return path

    # ---------------------------------------------------------------- finish
    def finish(self) -> dict:
        """Save the last checkpoint and the adapter, evaluate, write ``summary.json``."""
        total, out = self.total_steps, self.out_dir
        if self.state.nonfinite_in_a_row:
            self._stop_nonfinite(
                f"step {total}, the last, ends {self.state.nonfinite_in_a_row} non-finite step(s) in a row: the run "
                "can't finish on a skipped step"
            )
        if self.last_saved != total:
            self.save_checkpoint(total)
        self._save_final_adapter()
        val_after = self.evaluate() if self.val else None
        if val_after is not None:
            self.metrics.write({"step": total, "val_loss": val_after, **self.val_by_adapter})
        st = self.state
        summary = {
            "steps": total,
            "resumed_from_step": self.start_step if self.resumed else None,
            "first_loss": st.first_loss,
            "last_loss": self.last_loss,
            "val_loss_before": st.val_loss_before,
            "val_loss_after": val_after,
            "tokens": st.tokens,
            "nonfinite_steps": st.nonfinite_steps,
            "wall_time_s": time.perf_counter() - self.t_start,
            "world_size": self.env.world_size,
            "strategy": self.env.strategy,
            "adapter": str(out / "adapter"),
            "base_model": str(self.base_dir) if self.save_base else self.cfg.model.name_or_path,
        }
        if self.env.device.type == "cuda":
            summary["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.metrics.close()
        if self.env.is_main:
            with writing("summary.json", out):
                atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            say_done(self.say, summary, self.last_loss, out, list(self.cfg.data.adapters or []), self.save_base)
        barrier(self.env)
        return summary

    def _save_final_adapter(self) -> None:
        """``<output_dir>/adapter`` written as a checkpoint is: into ``.tmp-adapter``, checked,
        flushed, renamed (a full disk leaves the previous adapter, if any, and no partial one)."""
        out = self.out_dir
        final, tmp = out / ADAPTER_DIR, out / f"{TMP_PREFIX}{ADAPTER_DIR}"
        with writing("the adapter", out, cleanup=tmp, note=f"; the last complete checkpoint is {self._last_good()}"):
            if self.env.is_main:
                fresh_dir(tmp)
            barrier(self.env)
            write_adapter(self.raw_model, tmp, self.cfg.peft, self.env)
            if self.env.is_main:
                replace_dir(tmp, final)
                fsync_dir(out)
        barrier(self.env)


def finetune(cfg: RecipeConfig, stream=None) -> dict:
    """Run a recipe end to end. Returns a summary dict (also written to ``summary.json``).

    Raises:
        ConfigError: any input problem, before training starts; its subclasses ``RunDirError``
            (output_dir locked, holding another run, not writable, full) and ``CheckpointError``
            (no intact checkpoint to resume from).
        TrainingInterrupted: after SIGINT/SIGTERM, once a checkpoint has been saved.
        TrainingStopped: non-finite loss, gradients or parameters (exit code 3).
    """
    t_start = time.perf_counter()
    env = setup_distributed(cfg.distributed, cfg.train.device, cfg.quantization.load_in_4bit)
    recipe = Recipe(cfg, env, stream=stream, t_start=t_start)
    try:
        summary = recipe.setup()
        if summary is None:
            recipe.train()
            summary = recipe.finish()
        return summary
    finally:
        recipe.cleanup()
        cleanup(env)
