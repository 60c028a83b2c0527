"""The pieces of one training step that hold no run state: lr schedule, loss, evaluation, signals."""

from __future__ import annotations

import math
import signal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE_INDEX, collate
from .distributed import DistEnv, all_reduce_sum
from .fused_loss import fused_causal_lm_loss_sum

__all__ = ["lr_lambda", "causal_lm_loss_sum", "loss_sum", "n_targets", "global_counts", "clip_grad_norm", "SignalFlag",
           "use_bf16", "evaluate"]


def lr_lambda(step: int, total: int, warmup: int, scheduler: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup from
    1/(warmup+1), then cosine from 1 down to ``min_ratio`` at ``total`` (or flat)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions. logits: (B, T, V); labels: (B, T)."""
    # Shift the labels, not the logits: logits.flatten is a view, so the fp32 copy is the only one.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,), last position ignored
    return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_sum(model: nn.Module, batch: dict, autocast, fused: bool) -> torch.Tensor:
    """The CE sum of one batch on the device (``input_ids``, ``attention_mask``, ``labels``: (B, T)), () fp32: from
    the model's logits, or with ``fused`` (``train.fused_loss: liger``) from its hidden states and head weight
    (``recipe.fused_loss``), the same value without the (B, T, V) logits."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with autocast():
        if fused:
            return fused_causal_lm_loss_sum(model, ids, mask, labels)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return causal_lm_loss_sum(logits, labels)


def n_targets(batch: dict) -> int:
    """Target tokens of a collated batch (the positions whose next token carries loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def global_counts(local: list[int], env: DistEnv) -> list[float]:
    """This rank's counts (target tokens, tokens, ...) summed over the ranks in one collective."""
    return all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=env.device), env).tolist()


def clip_grad_norm(params, max_norm: float | None) -> torch.Tensor:
    """Clip the gradients of ``params`` to ``max_norm`` (None: no clipping); their norm, global over the ranks
    (DDP's gradients are all-reduced already; FSDP2's norm is a DTensor over every shard, gathered here)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class SignalFlag:
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


def use_bf16(setting, device: torch.device) -> bool:
    """``train.bf16`` resolved: ``auto`` is on for a bf16-capable CUDA device."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, env: DistEnv, pad_id: int, autocast) -> float | None:
    """Mean target-token loss over ``batches`` (shared by all ranks; each rank runs its share,
    padded with weight-0 repeats so FSDP2 collectives stay matched). Always the plain loss, also under
    ``train.fused_loss``: no gradients here, so one batch's logits are all it holds."""
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
            total[0] += causal_lm_loss_sum(logits, b["labels"]).double()
            total[1] += n_targets(cpu_b)  # counted on the CPU batch: no device sync per batch
    all_reduce_sum(total, env)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))
