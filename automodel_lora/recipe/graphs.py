"""``train.cuda_graphs``: when the recipe replays its micro-batches as CUDA graphs, and the step it replays.

One micro-batch of the recipe is ``loss = CE_sum(model(ids), labels) * scale; loss.backward()``, with
``scale = world_size / global target tokens`` a device tensor (a Python float would be frozen into the
graph). A graph needs static shapes and no collectives, so ``auto`` turns it on only where both hold:
one CUDA process, packed data (every micro-batch ``batch_size x seq_len``), no ``torch.compile``, and the plain
loss (``train.fused_loss: liger`` reads the target count on the host, which no capture holds); and only where it
pays: a model of hidden size up to ``AUTO_MAX_HIDDEN``, whose eager step waits on the host (H100, model protocol:
+24-65% throughput at a 0.5B shape, +3% at 1B). A wider model's step keeps the GPU busy (+1% at 8B widths),
while the graph's memory pool would keep a step's activations reserved beside what evaluation allocates.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from ..graphed_step import GraphedStep
from ..mixed_adapters import Block
from ..sdpa_capture import causal_sdpa
from .distributed import DistEnv
from .errors import ConfigError
from .loop import causal_lm_loss_sum
from .sections import DataConfig, TrainConfig

__all__ = ["AUTO_MAX_HIDDEN", "graphs_blockers", "use_cuda_graphs", "recipe_step", "MixedStep", "graph_inputs"]

AUTO_MAX_HIDDEN = 2048  # the widest model ``train.cuda_graphs: auto`` replays (module docstring)


def graphs_blockers(env: DistEnv, tc: TrainConfig, fused_loss: bool) -> list[str]:
    """Why CUDA graphs can't run here at all (empty where they can); ``fused_loss``: whether the run takes the fused
    loss (``train.fused_loss`` as the setup resolved it)."""
    why = []
    if env.device.type != "cuda":
        why.append(f"the device is {env.device.type}, not CUDA")
    if env.world_size > 1:
        why.append(f"{env.world_size} processes: DDP / FSDP2 collectives are not captured")
    if tc.compile:
        why.append("train.compile is on (torch.compile's own CUDA graphs: mode='reduce-overhead')")
    if fused_loss:
        why.append("train.fused_loss is on (Liger counts the target tokens on the host, which a capture can't hold)")
    return why


def use_cuda_graphs(env: DistEnv, tc: TrainConfig, data: DataConfig, fused_loss: bool,
                    hidden: int | None) -> tuple[bool, str]:
    """(on, a line saying why) for ``train.cuda_graphs``; ``fused_loss`` as for ``graphs_blockers``; ``hidden``: the
    model's hidden size (None where its config has none: ``auto`` leaves graphs off).

    Raises:
        ConfigError: ``train.cuda_graphs: true`` where graphs can't run (names why and the fix).
    """
    if tc.cuda_graphs is False:
        return False, "off (train.cuda_graphs=false)"
    blockers = graphs_blockers(env, tc, fused_loss)
    if not data.packing:  # a padded batch's mask is read on the host by transformers: no capture holds that
        blockers.append("data.packing is off (a padded batch's attention mask is read on the host, which a "
                        "capture cannot hold)")
    if tc.cuda_graphs is True and blockers:
        raise ConfigError(f"`train.cuda_graphs: true` can't run here: {'; '.join(blockers)}. "
                          "Set train.cuda_graphs=auto or false")
    if blockers:
        return False, "off: " + "; ".join(blockers)
    if tc.cuda_graphs == "auto" and (hidden is None or hidden > AUTO_MAX_HIDDEN):
        size = "unknown" if hidden is None else f"{hidden} > {AUTO_MAX_HIDDEN}"
        return False, (f"off: hidden size {size}: the eager step keeps the GPU busy, and the graph's memory pool "
                       "would hold a step's activations beside evaluation; train.cuda_graphs=true replays anyway")
    return True, "on: each micro-batch's forward and backward replays as one CUDA graph"


def _captured_logits(model: nn.Module, bf16: bool, ids: torch.Tensor, mask: tuple) -> torch.Tensor:
    """``model``'s logits on ``ids`` (and the padding mask, where ``mask`` holds one) as a graphed step computes
    them. Autocast's weight cache is off (a capture may not keep tensors made under it across replays). The model
    runs :func:`causal_sdpa`: a packed micro-batch passes no position ids, so the capture keeps SDPA's causal
    path as the eager step does, instead of the masked kernels transformers picks when it can't read them."""
    cast = torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 \
        else nullcontext()
    with cast, causal_sdpa(model):
        return model(input_ids=ids, attention_mask=mask[0] if mask else None).logits


def recipe_step(model: nn.Module, params: list, bf16: bool, fallback: bool) -> GraphedStep:
    """The recipe's micro-batch as a :class:`GraphedStep`: inputs ``(ids, labels, scale[, mask])``, all on
    the device; reports the unscaled CE sum (the logits as :func:`_captured_logits` makes them)."""

    def micro_batch(ids, labels, scale, *mask):
        ce = causal_lm_loss_sum(_captured_logits(model, bf16, ids, mask), labels)
        return ce * scale, ce

    return GraphedStep(micro_batch, params, fallback=fallback)


class MixedStep:
    """The mixed micro-batch of ``data.adapters`` as a :class:`GraphedStep`: inputs ``(ids, labels, scale[,
    mask])`` with ``scale`` (K,), one weight per adapter; reports the (K,) CE sums.

    Packed data gives every micro-batch of a run the same composition (each adapter's ``batch_size`` sequences,
    in the adapters' order), so one ``adapter_batch`` block (``mixed_adapters.Block``) serves the run: built at
    the first call, installed at each step's first micro-batch, removed by :meth:`end_step`, so evaluation and
    saving see the model as it is. A graph reads the block's row ids and offsets by address; one block for the
    run keeps those tensors, made at the eager warm-up calls, the ones every replay reads.
    """

    def __init__(self, model: nn.Module, fwd_model: nn.Module, params: list, bf16: bool, fallback: bool):
        self.model, self.fwd_model, self.bf16 = model, fwd_model, bf16
        self.block: Block | None = None
        self.names: list[str] = []
        self.rows: dict[str, slice] = {}
        self.installed = False
        self.step = GraphedStep(self._micro_batch, params, fallback=fallback)

    @property
    def eager_reasons(self) -> dict:
        """The step's signatures that run eagerly for good, and why (``GraphedStep.eager_reasons``)."""
        return self.step.eager_reasons

    def __call__(self, seq_names: list[str], rows: dict[str, slice], *inputs: torch.Tensor) -> torch.Tensor:
        """One micro-batch whose sequences take ``seq_names`` (grouped: adapter k's are ``rows[k]``).

        Raises:
            RuntimeError: a composition other than the first micro-batch's (unpacked data would do that).
        """
        if self.block is None:
            self.block, self.names, self.rows = Block(self.model, seq_names), list(seq_names), dict(rows)
        elif list(seq_names) != self.names or dict(rows) != self.rows:
            raise RuntimeError(f"train.cuda_graphs with data.adapters: a micro-batch of {len(seq_names)} sequences "
                               f"over {list(rows)} where the first had {len(self.names)} over {list(self.rows)}; the "
                               "replay needs one composition (data.packing: true)")
        if not self.installed:
            self.block.install()
            self.installed = True
        return self.step(*inputs)

    def end_step(self) -> None:
        """The model's own forwards back (evaluation, saving and the next step's set-up run on them)."""
        if self.installed:
            self.block.remove()
            self.installed = False

    def _micro_batch(self, ids, labels, scale, *mask):
        logits = _captured_logits(self.fwd_model, self.bf16, ids, mask)
        ce = torch.stack([causal_lm_loss_sum(logits[r], labels[r]) for r in self.rows.values()])  # (K,)
        return (ce * scale).sum(), ce


def graph_inputs(batch: dict, scale: torch.Tensor, device: torch.device) -> tuple:
    """A collated CPU batch as the graphed step's inputs. An all-ones attention mask is left out: the
    model's causal path is the same without it, and a mask would make HF read it on the host (a sync
    a capture can't hold) or pick a masked attention kernel."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    mask = batch["attention_mask"]
    if bool(mask.all()):  # a CPU tensor: no device sync
        return ids, labels, scale
    return ids, labels, scale, mask.to(device, non_blocking=True)
