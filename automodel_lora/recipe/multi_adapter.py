"""Several adapters trained in one run (``data.adapters``): each on its own data, every batch mixing them.

One optimizer step, with adapters a_1 .. a_K, each with its own dataset and sampler (seeded alike)::

    for each micro-batch m: the K adapters' micro-batches m, concatenated (grouped by adapter), one forward
        under adapter_batch (each sequence through its own adapter), loss = sum_k CE_k / n_tgt_k
    per adapter: clip_grad_norm_ of its own parameters; AdamW.step (per parameter), scheduler.step

so adapter k's gradient is that of its own mean token loss, clipped by its own norm, and the run trains each
adapter as a run of its own with the same seed, data order and settings would (``tests/test_recipe_multi.py``).
A step with a non-finite loss or norm in any adapter is skipped for all of them. Evaluation runs each
adapter on its own validation set (``set_adapter``); the metrics carry ``loss/<name>`` and ``val_loss/<name>``
beside their mean.
"""

from __future__ import annotations

import math
import time

import torch

from ..mixed_adapters import adapter_batch
from ..named_adapters import set_adapter
from .data import collate
from .loop import causal_lm_loss_sum, evaluate, n_targets
from .model import train_adapters

__all__ = ["mixed_micro_batches", "multi_train_step", "evaluate_adapters"]


def mixed_micro_batches(recipe, step: int) -> list[tuple[dict, list[str], dict[str, slice]]]:
    """Per micro-batch of ``step``: (every adapter's sequences collated into one batch, grouped by adapter; the
    adapter of each sequence; each adapter's rows)."""
    pad = recipe.tokenizer.pad_token_id
    per_adapter = {name: [[train[i] for i in idx] for idx in sampler.micro_batches(step, recipe.env.rank)]
                   for name, (train, _, sampler) in recipe.adapter_data.items()}
    out = []
    for m in range(recipe.cfg.train.grad_accum_steps):
        examples, names, rows = [], [], {}
        for name, micro in per_adapter.items():
            rows[name] = slice(len(examples), len(examples) + len(micro[m]))
            examples += micro[m]
            names += [name] * len(micro[m])
        out.append((collate(examples, pad), names, rows))
    return out


def multi_train_step(recipe, step: int):
    """One optimizer step over every adapter (module docstring); returns the recipe's ``StepResult`` with the
    mean of the adapters' losses, the norm over all of them, and ``per_adapter`` losses."""
    from .train import StepResult

    env, tc = recipe.env, recipe.cfg.train
    t0 = time.perf_counter()
    micro = mixed_micro_batches(recipe, step)
    names = list(recipe.adapter_data)
    n_tgt = {k: max(1, sum(n_targets({"labels": b["labels"][rows[k]]}) for b, _, rows in micro)) for k in names}
    n_tok = sum(int(b["attention_mask"].sum()) for b, _, _ in micro)
    loss_sum = {k: torch.zeros((), dtype=torch.float64, device=env.device) for k in names}
    for batch, seq_names, rows in micro:
        b = {key: v.to(env.device, non_blocking=True) for key, v in batch.items()}
        with adapter_batch(recipe.raw_model, seq_names):
            with recipe.autocast():
                logits = recipe.fwd_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            objective = 0.0
            for k, r in rows.items():
                ce = causal_lm_loss_sum(logits[r], b["labels"][r])
                objective = objective + ce / n_tgt[k]
                loss_sum[k] += ce.detach().double()
            objective.backward()
    clip = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
    norms = [torch.nn.utils.clip_grad_norm_(recipe.adapter_params[k], clip).double() for k in names]
    values = torch.stack([*norms, *(loss_sum[k] for k in names)]).tolist()  # one host sync for all of them
    losses = {k: v / n_tgt[k] for k, v in zip(names, values[len(names):], strict=True)}
    # the mean and the norm are finite only where every adapter's are: end_step skips the step otherwise
    result = StepResult(sum(losses.values()) / len(losses), math.sqrt(sum(v * v for v in values[:len(names)])),
                        recipe.optimizer.param_groups[0]["lr"], n_tok, 0.0, per_adapter=losses)
    return recipe.end_step(result, t0)


def evaluate_adapters(recipe) -> tuple[float | None, dict[str, float]]:
    """(mean validation loss over the adapters, {"val_loss/<name>": loss}); each adapter on its own validation
    set, alone. The first adapter is put back in place after (checkpoints name the parameters by place)."""
    names = list(recipe.adapter_data)
    each = {}
    try:
        for name in names:
            batches = recipe.val_batches[name]
            if not batches:
                continue
            set_adapter(recipe.raw_model, name)
            each[f"val_loss/{name}"] = evaluate(recipe.fwd_model, batches, recipe.env, recipe.tokenizer.pad_token_id,
                                                recipe.autocast)
    finally:  # whatever evaluation raised: the first adapter in place, every adapter trainable
        set_adapter(recipe.raw_model, names[0])
        train_adapters(recipe.raw_model, names)  # set_adapter froze the others
    return (sum(each.values()) / len(each) if each else None), each
