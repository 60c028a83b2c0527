"""An HF causal LM's SDPA attention that keeps SDPA's causal path inside a CUDA graph capture.

transformers decides at every forward whether an unpadded batch needs a materialized attention mask.
Eagerly it reads the position ids on the host, finds one sequence per row, and calls SDPA with
``is_causal=True`` and no mask. During a capture it may not read a tensor, so it builds a
``(B, 1, T, T)`` boolean mask (it assumes packed sequences, and releases up to at least 5.17 refuse the
causal skip outright while a capture is underway), and SDPA runs its masked kernels: on an H100 cuDNN's
attention took 2.5-3x as long in a captured step as in the eager one.

``causal_sdpa(model)`` switches the model, for the duration of a ``with``, to an attention
implementation registered under :data:`CAUSAL_SDPA`: transformers' own SDPA function, with a mask
function that lets SDPA's ``is_causal`` stand for the mask where its arguments say it can (no padding
mask, queries and keys over the same positions, no sliding window or chunk as short as the
sequence). A padding mask is still honoured. It decides from those arguments alone, so it is for steps
that pass no ``position_ids`` (one sequence per row, as the recipe's packed batches are) and no inputs
that make a model overlay a mask of its own (image tokens, blocks)::

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


def _causal_sdpa_mask(**kwargs):
    """None (SDPA's ``is_causal`` stands for the mask) for a causal mask over the same positions as the queries: no
    padding mask, ``q_length == kv_length`` at offset 0, no sliding window or chunk as short as the keys; else
    transformers' ``sdpa_mask`` with its own skip allowed (the ``(B, 1, Tq, Tkv)`` boolean mask, or None where its
    rules allow). Decided from the arguments: transformers releases up to at least 5.17 refuse the skip whenever a
    capture is underway, whatever the arguments. A model overlaying a mask of its own (image tokens: transformers
    then asks for ``use_vmap``) gets transformers' mask unchanged."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("use_vmap"):
        return sdpa_mask(**kwargs)
    q_length, kv_length, local = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("local_size")
    at_start = all(isinstance(kwargs.get(k, 0), int) and kwargs.get(k, 0) == 0 for k in ("q_offset", "kv_offset"))
    window_reaches_all = local is None or kv_length < local  # transformers' own bound for a window or chunk
    if kwargs.get("attention_mask") is None and q_length == kv_length and at_start and window_reaches_all:
        return None
    kwargs["allow_is_causal_skip"] = True
    return sdpa_mask(**kwargs)


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
    own implementation is set back on exit. Yields whether it switched (False, nothing changed: not a transformers
    model, attention other than ``"sdpa"`` in it or a sub-model, or a model that can't switch implementations)."""
    config = getattr(model, "config", None)
    configs = [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))]
    if any(getattr(c, "_attn_implementation", None) != "sdpa" for c in configs) \
            or not hasattr(model, "set_attn_implementation"):
        yield False
        return
    _register()
    model.set_attn_implementation(CAUSAL_SDPA)
    if config._attn_implementation != CAUSAL_SDPA:  # transformers declined (it logs why)
        yield False
        return
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
