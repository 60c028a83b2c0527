"""DoRA (weight-decomposed low-rank adaptation, HF PEFT's `use_dora`) on linear layers (and embeddings, whose table
`(num_embeddings, dim)` reads as a weight `(out = dim, in = num_embeddings)`, as PEFT's `DoraEmbeddingLayer` reads it).

    V = W + s B A                                   (N, K): the adapted direction, never built in forward
    y = m / ||V||_row * (x W^T + s (x A^T) B^T) + b  m (N,) trained, ||V||_row (N,) detached
    W' = (m / ||V||_row)[:, None] * V               what merging writes (PEFT's `merge`)

The norm is a constant to autograd (DoRA paper section 4.3, PEFT's `weight_norm.detach()`), so `m`, `A` and `B` get
their gradients through the numerator only. `b` is not rescaled (PEFT subtracts the base bias before scaling).

The magnitude is the parameter `lora_magnitude_vector` `(out_features,)` of the adapted module (of each named
adapter's holder, see `automodel_lora.adapter_slots`), in the adapter dtype: its state-dict key
`<fqn>.lora_magnitude_vector` is PEFT's on-disk key (PEFT's in-memory one is `...lora_magnitude_vector.default.weight`).
It starts as ||W||_row, which is ||V||_row while B is zero, so a fresh DoRA adapter changes nothing.

Row norms without building B A `(N, K)`:

    ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j (A A^T) B_j^T

`||W_j||^2` depends on the frozen base only and is cached per weight (`weight_sq_norms`); `W A^T` `(N, r)` is one
skinny product per step (one read of W), `A A^T` `(r, r)` a tiny one. All in fp32 (fp64 for an fp64 base) except
`W A^T`, which runs in W's dtype (fp32 accumulation on GPUs) so that W is never copied.

Dropout, where it is active (training, p > 0):
  * `"pre"` (PEFT's only position), PEFT's rule exactly: with `x~ = drop(x)`,
    `y = x W^T + b + (m/||V|| - 1) * (x~ W^T) + m/||V|| * s (x~ A^T) B^T` (one more base product, on x~).
  * `"post"`: the low-rank term is dropped as in plain LoRA, inside the direction:
    `y = m/||V|| * (x W^T + drop(s (x A^T) B^T)) + b`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .kernels.backend import DORA_NORM_MAX_RANK, dora_norm, on_device_of, use_kernels_for
from .matcher import is_conv1d
from .quant import is_quantized_linear

MAGNITUDE = "lora_magnitude_vector"
# Where a merged DoRA module keeps the norm it divided by: unmerging needs the norm of the *unmerged* weight,
# which cannot be recomputed from the merged one (PEFT caches it for the same reason).
MERGE_NORM = "lora_dora_merge_norm"

# ||W_j||^2 per frozen base weight, keyed by the weight tensor object itself (weakly: a freed weight drops its entry;
# never by data_ptr, which a new tensor can reuse) and checked against (`_version`, device, dtype, shape) on each
# read: every in-place write (`copy_`, `load_state_dict`, merge, `param.data = ...`) bumps `_version`, and
# `module.to()` changes the device or dtype (or makes a new Parameter), so a stale value is never returned.
_WEIGHT_SQ_NORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _acc(weight: torch.Tensor) -> torch.dtype:
    """The dtype the norms are computed in: fp32, or fp64 for an fp64 weight (gradient checks)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def magnitude_of(holder: nn.Module) -> nn.Parameter | None:
    """The DoRA magnitude `(out_features,)` of an adapter holder (an adapted module or an `InactiveAdapter`), or None
    for a plain LoRA adapter (and modules pickled before DoRA existed)."""
    return holder._parameters.get(MAGNITUDE)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as `(out_features, in_features)` (a view; a bitsandbytes 4-bit weight dequantized).

    Raises:
        ValueError: a quantized base that is not bitsandbytes 4-bit (int8), naming the fix.
    """
    weight = module.weight
    if is_quantized_linear(module):
        if type(weight).__name__ != "Params4bit" or getattr(weight, "quant_state", None) is None:
            raise ValueError(
                f"DoRA needs the base weight of this {type(module).__name__} as floats, but it is stored as "
                f"{type(weight).__name__} {weight.dtype}, which only bitsandbytes 4-bit is dequantized from; use a "
                "4-bit or unquantized base, or use_dora=False"
            )
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # a Conv1D stores (in, out), an embedding (num_embeddings, dim) = (in, out); checked by type, not yet patched
    return weight.t() if is_conv1d(module) or isinstance(module, nn.Embedding) else weight


@torch.no_grad()
def weight_sq_norms(module: nn.Module) -> torch.Tensor:
    """`||W_j||^2` `(out_features,)` in fp32 (fp64 for an fp64 W), computed once per base weight and cached (see
    `_WEIGHT_SQ_NORMS`); computed each call (one read of W) under torch.compile and for an inference-mode W."""
    weight = module.weight
    # under torch.compile the cache is Python state; an inference-mode tensor has no version counter to check
    if torch.compiler.is_compiling() or weight.is_inference():
        return dense_weight(module).to(_acc(weight)).square().sum(1)
    # the version counter sees in-place writes; the storage pointer, a `.data =` replacement (never the key alone:
    # an in-place write keeps it). A `weight.data.copy_(...)` bypasses both: write base weights under
    # `torch.no_grad()` on the parameter itself, as `load_state_dict` does.
    key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape))
    cached = _WEIGHT_SQ_NORMS.get(weight)
    if cached is not None and cached[0] == key:
        return cached[1]
    # fp32 in blocks of the stored rows: never a full fp32 copy of a bf16 W (an embedding's table is stored
    # (in, out): its column sums, block by block)
    acc = _acc(weight)
    if isinstance(module, nn.Embedding):
        value = sum((rows.to(acc).square().sum(0) for rows in weight.split(4096)), weight.new_zeros(weight.shape[1], dtype=acc))
    else:
        dense = dense_weight(module)
        value = torch.cat([rows.to(acc).square().sum(1) for rows in dense.split(4096)]) if dense.shape[0] else \
            dense.new_zeros(0, dtype=acc)
    _WEIGHT_SQ_NORMS[weight] = (key, value)
    return value


@torch.no_grad()
def row_norms(module: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """`||W + s B A||_row` `(out_features,)` in fp32 (fp64 for an fp64 W) and detached, by the identity above (no
    `(N, K)` tensor).

    lora_A `(r, K)`, lora_B `(N, r)` (any float dtype; used in fp32 except in `W A^T`)."""
    weight = dense_weight(module)  # (N, K)
    acc = _acc(weight)
    A = lora_A.to(acc)
    wa = weight @ lora_A.to(weight.dtype).t()  # (N, r): the one pass over W per step
    aat = A @ A.t()  # (r, r)
    if use_kernels_for(wa) and lora_A.shape[0] <= DORA_NORM_MAX_RANK and not torch.compiler.is_compiling():
        settings = getattr(module, "lora_settings", None)
        fast = settings.kernels.fast_launch if hasattr(settings, "kernels") else True
        return on_device_of(wa, dora_norm, weight_sq_norms(module), wa, lora_B, aat, scale, fast)  # one launch
    B, wa = lora_B.to(acc), wa.to(acc)
    sq = weight_sq_norms(module) + (2.0 * scale) * (B * wa).sum(1) + (scale * scale) * ((B @ aat) * B).sum(1)
    # rounding can take a row whose norm is ~0 slightly below zero; PEFT's dense norm is 0 there as well
    return sq.clamp_min(0).sqrt()


def dora_scale(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`m / ||W + s B A||_row` `(out_features,)` in `dtype`: differentiable in `m` only (the norm is detached)."""
    norm = row_norms(module, module.lora_A.weight, module.lora_B.weight, module.lora_settings.scale)
    return (module._parameters[MAGNITUDE].to(norm.dtype) / norm).to(dtype)


def dora_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference DoRA layer `(..., in_features) -> (..., out_features)` in plain PyTorch (rules: module doc).

    Written as PEFT writes it, `base(x) + (m/||V|| - 1) * z + m/||V|| * lora`, with `z` the bias-free base product
    (of `drop(x)` under active "pre" dropout) and `lora` the scaled low-rank term."""
    settings = module.lora_settings
    base = module.base_forward(x)  # (..., N), with the base bias
    factor = dora_scale(module, base.dtype)  # (N,)
    if settings.dropout_position == "pre" and module.training and module.lora_dropout.p > 0:
        x = module.lora_dropout(x)
        z = F.linear(x, dense_weight(module).to(x.dtype))  # PEFT's second base product, on the dropped input
    else:
        z = base if module.bias is None else base - module.bias.to(base.dtype)
    xa = F.linear(x, module.lora_A.weight.to(x.dtype)) * settings.scale  # (..., r)
    lora = F.linear(xa, module.lora_B.weight.to(x.dtype))  # (..., N)
    if settings.dropout_position == "post":
        lora = module.lora_dropout(lora)
    return base + (factor - 1) * z + factor * lora


def new_magnitude(linear: nn.Module, dtype: torch.dtype) -> nn.Parameter:
    """A magnitude for `linear`'s adapter: `||W||_row` `(out_features,)` in `dtype` (the adapter's), on W's device."""
    weight = linear.weight
    if weight.device.type == "meta":
        out_features = dense_weight(linear).shape[0]
        return nn.Parameter(torch.empty(out_features, device="meta", dtype=dtype))
    return nn.Parameter(weight_sq_norms(linear).sqrt().to(dtype))


@torch.no_grad()
def reset_magnitude_(module: nn.Module, holder: nn.Module) -> None:
    """Set `holder`'s magnitude (if it has one) to `||W + s B A||_row` of `module`'s base: `||W||_row` after
    `reset_lora_parameters` (B zero). `holder` is `module` itself or one of its `InactiveAdapter`s."""
    magnitude = magnitude_of(holder)
    if magnitude is not None:
        magnitude.copy_(row_norms(module, holder.lora_A.weight, holder.lora_B.weight, holder.lora_settings.scale))


@torch.no_grad()
def dora_folded(module: nn.Module, sign: float) -> torch.Tensor:
    """The merged (`sign` +1: `(m / ||V||)[:, None] * (W + s B A)`) or unmerged (-1: `W' / (m / ||V||)[:, None] -
    s B A`) base weight, fp32 math rounded once to W's dtype, in W's stored layout (not written).

    Raises:
        ValueError: unmerging a module whose merge norm was lost (merged by an older version).
    """
    settings = module.lora_settings
    if sign > 0:
        norm = row_norms(module, module.lora_A.weight, module.lora_B.weight, settings.scale)
    else:
        norm = module.__dict__.get(MERGE_NORM)
        if norm is None:
            raise ValueError("cannot unmerge this DoRA adapter: the norm it was merged with is not recorded on the "
                             "module; reload the unmerged base weights instead")
    acc = norm.dtype
    factor = (magnitude_of(module).to(acc) / norm)[:, None]  # (N, 1)
    weight = dense_weight(module).to(acc)  # (N, K)
    delta = (module.lora_B.weight.to(acc) @ module.lora_A.weight.to(acc)) * settings.scale  # (N, K)
    new = factor * (weight + delta) if sign > 0 else weight / factor - delta
    if is_conv1d(module) or isinstance(module, nn.Embedding):  # stored (in, out)
        new = new.t()
    return new.to(module.weight.dtype)


@torch.no_grad()
def record_merge_norm(module: nn.Module, sign: float) -> None:
    """Before the base weight of a DoRA module is merged (`sign` +1), keep the norm merging divides by, for
    `dora_folded(module, -1)`; after unmerging, drop it. Nothing for a plain LoRA module."""
    if magnitude_of(module) is None:
        return
    if sign > 0:
        module.__dict__[MERGE_NORM] = row_norms(module, module.lora_A.weight, module.lora_B.weight,
                                                module.lora_settings.scale)
    else:
        module.__dict__.pop(MERGE_NORM, None)
