"""Several adapters trained in one run (``data.adapters``): each on its own data, every batch mixing them.

One optimizer step, with adapters a_1 .. a_K, each with its own dataset and sampler (seeded alike, split over
the ranks as a single adapter's is)::

    n_tgt_k = all_reduce(adapter k's target tokens on this rank), for every k in one collective
    for each micro-batch m: this rank's K micro-batches m, concatenated (grouped by adapter), one forward
        under adapter_batch (each sequence through its own adapter), loss = sum_k CE_k * world_size / n_tgt_k
                                                        # DDP / FSDP2 average the gradients over the ranks
    per adapter: clip_grad_norm_ of its own parameters (a global norm); AdamW.step (per parameter), scheduler.step

so adapter k's gradient is that of its own mean token loss over the global batch, clipped by its own norm, and
the run trains each adapter as a run of its own with the same seed, data order and settings would
(``tests/test_recipe_multi.py``), on one process or several (DDP / FSDP2: ``tests/test_recipe_multi_distributed.py``).
A step with a non-finite loss or norm in any adapter is skipped for all of them. Evaluation runs each
adapter on its own validation set (``set_adapter``: under FSDP2 the adapters' modules swap places within a
layer, and FSDP2 gathers each shard into the module that holds it, wherever that sits); the metrics carry
``loss/<name>`` and ``val_loss/<name>`` beside their mean.
"""

from __future__ import annotations

import math
import time

import torch

from ..mixed_adapters import adapter_batch
from ..named_adapters import set_adapter
from .data import collate
from .distributed import all_reduce_sum, no_sync
from .graphs import graph_inputs
from .loop import causal_lm_loss_sum, clip_grad_norm, evaluate, global_counts, n_targets
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
    mean of the adapters' losses, the norm over all of them, and ``per_adapter`` losses, all global over ranks."""
    from .train import StepResult

    env = recipe.env
    t0 = time.perf_counter()
    micro = mixed_micro_batches(recipe, step)
    names = list(recipe.adapter_data)
    # every adapter's target count and the tokens, summed over the ranks in one collective, before any forward
    *n_tgt, n_tok = global_counts([*(sum(n_targets({"labels": b["labels"][rows[k]]}) for b, _, rows in micro)
                                      for k in names), sum(int(b["attention_mask"].sum()) for b, _, _ in micro)], env)
    n_tgt = {k: max(1.0, v) for k, v in zip(names, n_tgt, strict=True)}
    # DDP / FSDP2 average the gradients over the ranks: world_size / n_tgt makes the average that of the CE sums
    scale = torch.tensor([env.world_size / n_tgt[k] for k in names], dtype=torch.float32).to(env.device, non_blocking=True)
    loss_sum = torch.zeros(len(names), dtype=torch.float64, device=env.device)
    try:
        for m, (batch, seq_names, rows) in enumerate(micro):
            loss_sum += _forward_backward(recipe, batch, seq_names, rows, scale, sync=m == len(micro) - 1)
    finally:
        if recipe.graphed is not None:
            recipe.graphed.end_step()
    all_reduce_sum(loss_sum, env)
    max_norm = recipe.cfg.train.max_grad_norm
    norms = torch.stack([clip_grad_norm(recipe.adapter_params[k], max_norm).double() for k in names])
    values = torch.cat([norms, loss_sum]).tolist()  # one host sync for all of them
    losses = {k: v / n_tgt[k] for k, v in zip(names, values[len(names):], strict=True)}
    # the mean and the norm are finite only where every adapter's are: end_step skips the step otherwise
    result = StepResult(sum(losses.values()) / len(losses), math.sqrt(sum(v * v for v in values[:len(names)])),
                        recipe.optimizer.param_groups[0]["lr"], n_tok, 0.0, per_adapter=losses)
    return recipe.end_step(result, t0)


def _forward_backward(recipe, batch: dict, seq_names: list[str], rows: dict[str, slice], scale: torch.Tensor,
                      sync: bool) -> torch.Tensor:
    """One mixed micro-batch (a collated CPU batch): backward of ``sum_k CE_k * scale[k]`` (``scale``: (K,) on the
    device, in the order of ``rows``), the gradient all-reduced (DDP) or reduce-scattered (FSDP2) only where
    ``sync``; returns the (K,) CE sums, detached. Replayed as a CUDA graph under ``train.cuda_graphs``
    (``graphs.MixedStep``)."""
    env = recipe.env
    if recipe.graphed is not None:  # train.cuda_graphs: one process, so no gradient sync to hold back
        ce = recipe.graphed(seq_names, rows, *graph_inputs(batch, scale, env.device))
        recipe._say_eager_reasons()
        return ce.double()
    b = {key: v.to(env.device, non_blocking=True) for key, v in batch.items()}
    with no_sync(recipe.model, env, sync=sync), adapter_batch(recipe.raw_model, seq_names):
        with recipe.autocast():
            logits = recipe.fwd_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = torch.stack([causal_lm_loss_sum(logits[r], b["labels"][r]) for r in rows.values()])
        (ce * scale).sum().backward()
    return ce.detach().double()


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
