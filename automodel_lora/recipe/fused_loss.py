"""``train.fused_loss: liger``: the recipe's loss from the final hidden states and the head's weight, chunk by chunk.

The plain loss (``loop.causal_lm_loss_sum``) takes the model's ``(B, T, V)`` logits, copies them to fp32 and keeps
their fp32 log-probabilities for the backward. Here the model's decoder body runs alone (its ``last_hidden_state``,
after the final norm) and Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` computes ``hidden @ W^T (+ b)``,
the cross-entropy and its gradients over a few rows of tokens at a time, so no ``(B*T, V)`` tensor exists: the loss
node keeps the gradient of the hidden states ``(B*T, H)`` instead (and of the head's weight where that is trained).

What it takes, and what it refuses (a ``ConfigError`` naming the attribute or setting):

- an HF causal LM whose logits are ``lm_head(last_hidden_state)`` and nothing more: a config attribute that
  transforms them (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``, ``lm_head_multiplier``) is
  refused, and so is a head that is not a plain dense ``nn.Linear``;
- an ``lm_head`` with this library's LoRA adapter (``LinearLoRA``): plain LoRA, ``lora_bias`` too; DoRA, and
  dropout after the adapter (``dropout_position: post``) while training, are refused;
- one process (the decoder is called without the wrapper's forward, which DDP and FSDP2 need), a CUDA device or the
  Triton interpreter (``TRITON_INTERPRET=1``) on the CPU. ``train.compile``, ``train.cuda_graphs: true`` and
  ``data.adapters`` are refused by the recipe's config (``recipe.sections``, ``recipe.config``).

Evaluation keeps the plain loss: it runs without gradients, one batch's logits at a time.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dora import MAGNITUDE
from ..lora import LinearLoRA
from ..quant import is_quantized_linear
from .data import IGNORE_INDEX
from .errors import ConfigError

__all__ = ["LIGER_INSTALL", "liger_available", "check_fused_loss", "fused_head", "fused_causal_lm_loss_sum"]

LIGER_INSTALL = "pip install liger-kernel"  # or the package's `liger` extra

# Config attributes that make the logits more than `hidden @ W^T (+ b)`, with the value that leaves them alone.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2 / 3: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * multiplier
}


def liger_available() -> bool:
    """Whether ``liger_kernel`` can be imported (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("liger_kernel") is not None


def check_fused_loss(model: nn.Module, world_size: int, device: torch.device) -> None:
    """Refuse a run ``train.fused_loss: liger`` can't compute exactly: several processes, a device Liger's Triton
    kernels do not run on, or a model whose head :func:`fused_head` refuses.

    Raises:
        ConfigError: naming the setting or the model's attribute, and the fix.
    """
    if world_size > 1:
        raise ConfigError(
            f"`train.fused_loss: liger` with {world_size} processes: the loss calls the model's decoder without the "
            "DDP / FSDP2 wrapper's forward (which gathers the head's shards and prepares the gradient reduction); "
            "run one process or set train.fused_loss=false"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"`train.fused_loss: liger` runs Triton kernels: the device is {device.type}. Train on CUDA "
            "(train.device=cuda), set TRITON_INTERPRET=1 on the CPU (the Triton interpreter: slow, for tests), "
            "or set train.fused_loss=false"
        )
    fused_head(model, training=True)  # the model may still be in eval mode (from_pretrained): the run trains


def fused_head(model: nn.Module, training: bool | None = None) -> tuple[nn.Module, nn.Linear]:
    """``(decoder body, lm_head)`` of an HF causal LM whose logits are ``lm_head(decoder(...).last_hidden_state)``;
    ``training``: whether the head's dropout is on (None: the head's own mode).

    Raises:
        ConfigError: no decoder or output embeddings, a config attribute that transforms the logits, a head that
            is not a plain dense ``nn.Linear``, or an adapter on it the fused loss can't fold in (DoRA, "post"
            dropout while training).
    """
    config = getattr(model, "config", None)
    for attr, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral:
            raise ConfigError(
                f"`train.fused_loss: liger`: the model's config sets `{attr}: {value}`, which transforms the logits "
                "beyond hidden @ W^T + b (Liger's fused loss would drop it); set train.fused_loss=false"
            )
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder, head = (get_decoder(), get_head()) if get_decoder and get_head else (None, None)
    if decoder is None or decoder is model or head is None:
        raise ConfigError(
            f"`train.fused_loss: liger`: {type(model).__name__} has no decoder body and output head to call apart "
            "(get_decoder / get_output_embeddings); set train.fused_loss=false"
        )
    _check_head(head, head.training if training is None else training)
    return decoder, head


def _check_head(head: nn.Module, training: bool) -> None:
    """The output head is ``x W^T (+ b)``, with at most a plain LoRA adapter this module can fold in."""
    what = f"the output head ({type(head).__name__})"
    dense = (
        head._lora_dense_base and not head.fan_in_fan_out
        if isinstance(head, LinearLoRA)
        else isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
    )
    if not dense or is_quantized_linear(head):
        raise ConfigError(f"`train.fused_loss: liger`: {what} is not a plain dense nn.Linear; set train.fused_loss=false")
    if not isinstance(head, LinearLoRA):
        return
    if head._parameters.get(MAGNITUDE) is not None:
        raise ConfigError(
            f"`train.fused_loss: liger`: {what} has a DoRA adapter, whose row norms the fused loss "
            "can't fold in; leave lm_head out of the targets, set peft.use_dora=false, or set "
            "train.fused_loss=false"
        )
    if head.lora_settings.dropout_position == "post" and head.lora_dropout.p > 0 and training:
        raise ConfigError(
            f"`train.fused_loss: liger`: {what} drops its adapter's output (dropout_position: post, "
            f"dropout {head.lora_dropout.p}), a (tokens, vocab) mask; set peft.dropout_position=pre, "
            "peft.dropout=0, or train.fused_loss=false"
        )


def _head_operands(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, weight, bias)`` with ``x @ weight^T + bias`` equal to ``head(hidden)``. hidden: (N, H).

    An adapted head's logits are ``h W^T + s drop(h) A^T B^T (+ s b_B)``: one product of ``x = [h, u]`` (N, H+r),
    ``u = s drop(h) A^T``, with ``weight = [W, B]`` (V, H+r), so Liger's chunked product and loss cover the adapter
    too, and autograd takes A's gradient through ``u`` (Liger's gradient of x) and B's through the concatenated
    weight. The other ways cost more: adding the adapter's logits needs the (N, V) tensor this avoids, and Liger
    takes one weight. The price is a copy of W with B's columns (V, H+r) for the forward, and the gradient of that
    whole weight (V, H+r, fp32) held from the loss to its backward, of which only B's columns are used. That
    gradient weighs what the plain loss's fp32 log-probabilities (N, V) weigh where N = H+r (the 8B recipe: 4096
    tokens, H+r = 4112), and the plain loss holds more beside them at its peak (``benchmarks/DESIGN.md`` section 15).
    """
    weight, bias = head.weight, head.bias  # (V, H), (V,) or None
    if not isinstance(head, LinearLoRA) or head.lora_merged or not head.lora_enabled:
        return hidden, weight, bias
    settings = head.lora_settings
    lora_A = head.lora_A.weight.to(hidden.dtype)  # (r, H): cast as LinearLoRA.lora_delta casts it
    # drop(h) is the head's nn.Dropout, LinearLoRA's mask; FusedLinearLoRA's kernels draw theirs their own way
    # (the same distribution, other values)
    u = F.linear(head.lora_dropout(hidden), lora_A) * settings.scale  # (N, r)
    x = torch.cat([hidden, u.to(hidden.dtype)], dim=1)  # (N, H+r)
    weight = torch.cat([weight, head.lora_B.weight.to(weight.dtype)], dim=1)  # (V, H+r)
    b_B = head.lora_B.bias  # (V,) with lora_bias: lora_B(u) adds s * b_B, as PEFT does
    if b_B is not None:
        lora_bias = b_B.to(weight.dtype) * settings.scale
        bias = lora_bias if bias is None else bias + lora_bias
    return x, weight, bias


def fused_causal_lm_loss_sum(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """What ``causal_lm_loss_sum(model(input_ids, attention_mask).logits, labels)`` returns (the sum of next-token
    cross-entropy over target positions, fp32), without the logits: the decoder's hidden states and the head's
    weight go to Liger's fused linear + cross-entropy. input_ids, attention_mask, labels: (B, T).

    Raises:
        ConfigError: a model or head :func:`fused_head` refuses.
    """
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    decoder, head = fused_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    x, weight, bias = _head_operands(head, hidden.flatten(0, 1))  # (B*T, H'), (V, H'), (V,) or None
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,), as causal_lm_loss_sum shifts
    # A trained weight's gradient (an adapted or trained head) is summed over the chunks in fp32, not rounded to
    # the weight's dtype once per chunk; a frozen head has none, and then the argument costs nothing.
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        x, weight, targets, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", None, False, torch.float32
    )[0]
    return loss.float()  # () fp32
