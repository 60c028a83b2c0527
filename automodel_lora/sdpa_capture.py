"""An HF causal LM's SDPA attention that keeps SDPA's causal path inside a CUDA graph capture.

transformers decides at every forward whether an unpadded batch needs a materialized attention mask.
Eagerly it reads the position ids on the host, finds one sequence per row, and calls SDPA with
``is_causal=True`` and no mask. During a capture it may not read a tensor, so it assumes packed
sequences and builds a ``(B, 1, T, T)`` boolean mask, and SDPA runs its masked kernels. On an H100
that made cuDNN's attention 2.5-3x slower in a captured step than in the eager step, which was the
whole of the gap between a replayed and an eager frozen model.

``causal_sdpa(model)`` switches the model, for the duration of a ``with``, to an attention
implementation registered under :data:`CAUSAL_SDPA`: transformers' own SDPA function, with a mask
function that lets SDPA's ``is_causal`` stand for the mask wherever transformers' own rules allow
(no padding, query length equal to key length or one, no sliding window in reach). A padding mask
is still honoured. What it changes is only the packed-sequence guess, so it is for steps that
pass no ``position_ids`` (one sequence per row, as the recipe's packed batches are) and no
inputs that make a model mask across modalities::

    step = GraphedStep(lambda ids: run(ids), params)
    def run(ids):
        with causal_sdpa(model):
            return model(input_ids=ids, labels=ids).loss

A model whose attention is not ``"sdpa"`` (or that is not a transformers model) is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

__all__ = ["CAUSAL_SDPA", "causal_sdpa"]

CAUSAL_SDPA = "automodel_lora_causal_sdpa"


def _causal_sdpa_mask(*args, **kwargs):
    """transformers' ``sdpa_mask`` with its causal skip allowed: None (SDPA's ``is_causal`` stands for the mask) where
    transformers' own test says so, else the ``(B, 1, Tq, Tkv)`` boolean mask."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = True
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    """Register :data:`CAUSAL_SDPA` with transformers (a new name: no existing implementation changes)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, _causal_sdpa_mask)


@contextmanager
def causal_sdpa(model: nn.Module) -> Iterator[bool]:
    """Inside the ``with``, ``model`` (a transformers model with ``"sdpa"`` attention) runs :data:`CAUSAL_SDPA`; its
    own implementation is set back on exit. Yields whether it switched (False: not a transformers model, or its
    attention is not ``"sdpa"``; nothing changes then)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield False
        return
    _register()
    model.set_attn_implementation(CAUSAL_SDPA)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
