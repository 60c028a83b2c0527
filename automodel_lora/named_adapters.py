"""Several named adapters per model: switch, disable, delete and combine them (HF PEFT's multi-adapter API).

    al.apply_lora_to_linear_modules(model, cfg)                        # adapter "default", in use
    al.load_adapter(model, "out/french", adapter_name="french")        # a second one, not in use
    al.set_adapter(model, "french")                                    # now "french" runs (and trains)
    with al.disable_adapter(model): ...                                # the base model alone
    al.add_weighted_adapter(model, ["default", "french"], [0.5, 0.5], "mix")
    al.delete_adapter(model, "default")

Where each adapter's tensors live is described in `automodel_lora.adapter_slots`: the adapter in use
keeps the one-adapter names (`q_proj.lora_A.weight`), the others are under `q_proj.lora_inactive.<name>`.
Adding an adapter with `apply_lora_to_linear_modules(..., adapter_name=)` or `load_adapter(...,
adapter_name=)` does not put it in use (as in PEFT).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .adapter_slots import (
    DISABLED_BLOCK,
    adapter_holders,
    adapter_names,
    add_inactive,
    check_adapter_name,
    check_not_in_disabled_block,
    drop_inactive,
    holder_of,
    holders,
    put_in_place,
    set_in_use,
)
from .config import LoraSettings
from .embedding_lora import is_embedding_lora
from .injection import remove_lora, unpatch
from .lora import LinearLoRA, lora_modules


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in use (None inside `disable_adapter`, or when the model has no adapters)."""
    names = {m.lora_adapter_name for _, m in lora_modules(model) if m.lora_enabled}
    if len(names) > 1:
        raise ValueError(
            f"the model's modules use different adapters at once ({sorted(names)}); call set_adapter(model, name) "
            "to choose one"
        )
    return names.pop() if names else None


def _modules_or_raise(model: nn.Module, name: str, verb: str) -> list[tuple[str, LinearLoRA]]:
    modules = lora_modules(model)
    names = adapter_names(model)
    if name not in names:
        raise ValueError(
            f"cannot {verb} adapter {name!r}: {type(model).__name__} has "
            + (f"the adapters {names}" if names else "no adapters (apply_lora_to_linear_modules / load_adapter first)")
        )
    merged = [n for n, m in modules if m.lora_merged]
    if merged:
        raise ValueError(f"cannot {verb} adapter {name!r}: the model's adapter is merged (e.g. {merged[:3]}); "
                         "call unmerge_lora(model) first")
    check_not_in_disabled_block(modules, f"{verb} adapter {name!r}")
    return modules


def set_adapter(model: nn.Module, name: str) -> None:
    """Put adapter `name` in use on every module that has it; modules without it compute their base alone.

    The adapter in use is trainable (`requires_grad=True`) and every other adapter frozen, as HF PEFT's
    `set_adapter` does. Its tensors take the one-adapter names (`<fqn>.lora_A.weight`); the tensors are moved,
    not copied, so an optimizer built over all adapters keeps its state.

    Raises:
        ValueError: the model has no adapter `name` (the message lists those it has) or is merged.
    """
    for _, module in _modules_or_raise(model, name, "set"):
        has = holder_of(module, name) is not None
        if has and module.lora_adapter_name != name:
            put_in_place(module, name)
        set_in_use(module, has)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, `model` computes as the base model (every adapter skipped); on exit each
    module is back as it was, also after an exception. Trainable flags are not touched.

    Raises:
        ValueError: the model has no adapters, or is merged (unmerge first: a merged weight has no base alone).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to disable")
    merged = [n for n, m in modules if m.lora_merged]
    if merged:
        raise ValueError(f"disable_adapter: the model's adapter is merged into its weights (e.g. {merged[:3]}); "
                         "call unmerge_lora(model) first")
    check_not_in_disabled_block(modules, "nest disable_adapter")
    before = [(m, m.__dict__.get("lora_enabled")) for _, m in modules]
    try:
        for _, module in modules:
            module.lora_enabled = False
            module.__dict__[DISABLED_BLOCK] = True
        yield model
    finally:
        for module, value in before:
            module.__dict__.pop(DISABLED_BLOCK, None)
            if value is None:  # the class default: leave no instance attribute behind
                module.__dict__.pop("lora_enabled", None)
            else:
                module.lora_enabled = value


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` from every module. If it was in use, the first remaining adapter (in
    `adapter_names` order) is put in use, as HF PEFT does; a module left with no adapter gets its own class back.

    Raises:
        ValueError: the model has no adapter `name`, or is merged.
    """
    modules = _modules_or_raise(model, name, "delete")
    if adapter_names(model) == [name]:  # the last one: the model is the base model again
        remove_lora(model)
        return
    was_active = active_adapter(model) == name
    for _, module in modules:
        if module.lora_adapter_name != name:
            if holder_of(module, name) is not None:
                drop_inactive(module, name)
            continue
        others = list(holders(module))[1:]
        if not others:
            unpatch(module)
            continue
        put_in_place(module, others[0])
        drop_inactive(module, name)
        set_in_use(module, False)
    remaining = adapter_names(model)
    if was_active and remaining:
        set_adapter(model, remaining[0])


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "linear") -> None:
    """Add adapter `adapter_name`, a weighted combination of existing adapters (HF PEFT's `add_weighted_adapter`
    with the same arithmetic, so the two give equal outputs). It is added, not put in use.

    On every module that has any of `adapters` (missing ones contribute nothing), with `s_i` each adapter's scale:

    - `"cat"`: `A = cat_i(w_i s_i A_i)`, `B = cat_i(B_i)`, rank `sum r_i`: exactly `sum_i w_i s_i B_i A_i`.
    - `"linear"` (equal ranks): `A = sum_i sign_i sqrt(|w_i s_i|) A_i`, `B = sum_i sqrt(|w_i s_i|) B_i`, rank `r`.
      Not the weighted sum of the updates (the cross terms `B_i A_j` remain), as in PEFT; exact for one adapter.

    The new adapter has scale 1 (`alpha = rank`, no rsLoRA) and the first adapter's dropout settings. (PEFT keeps
    the first adapter's rsLoRA flag, which then scales its result by `sqrt(rank)`; without rsLoRA the two agree.)

    Raises:
        ValueError: an unknown adapter, `weights` of another length, an existing or unusable `adapter_name`,
            an unknown `combination_type`, ranks that differ under `"linear"`, a DoRA adapter, an adapter on an
            embedding, or a merged model.
    """
    check_adapter_name(adapter_name)
    names = adapter_names(model)
    if adapter_name in names:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter needs one weight per adapter: adapters={list(adapters)!r}, "
                         f"weights={list(weights)!r}")
    if combination_type not in ("linear", "cat"):
        raise ValueError(f"combination_type={combination_type!r} is not supported; use 'linear' or 'cat' (PEFT's "
                         "svd / ties / dare variants are not implemented)")
    for name in adapters:
        _modules_or_raise(model, name, "combine")
    dora = [name for name in adapters if any(h.lora_settings.use_dora for _, h in adapter_holders(model, name)[1])]
    if dora:  # each magnitude rescales its own direction: a weighted sum of DoRA adapters is no DoRA adapter
        raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters ({dora} use use_dora); combine plain "
                         "LoRA adapters, or merge each DoRA adapter on its own")
    embeddings = [fqn for fqn, m in lora_modules(model) if is_embedding_lora(m) and m.lora_adapter_name in adapters]
    if embeddings:  # named adapters are for linear modules: an embedding holds one adapter only
        raise ValueError(f"add_weighted_adapter cannot combine adapters of embeddings ({embeddings}); remove_lora and "
                         "apply the adapters to combine without the embedding in target_modules")
    ranks = {name: sorted({h.lora_settings.dim for _, h in adapter_holders(model, name)[1]}) for name in adapters}
    if combination_type == "linear" and len({r for rs in ranks.values() for r in rs}) > 1:
        raise ValueError(f"combination_type='linear' needs adapters of one rank, but their ranks are {ranks}; use "
                         "combination_type='cat'")
    # one lora_bias flag for the whole new adapter (PEFT's format has one): a zero bias where no source had one
    lora_bias = any(h.lora_B.bias is not None for n in adapters for _, h in adapter_holders(model, n)[1])
    for _, module in lora_modules(model):
        sources = [(holder_of(module, n), w) for n, w in zip(adapters, weights, strict=True)]
        sources = [(h, float(w)) for h, w in sources if h is not None]
        if sources:
            _add_combination(module, adapter_name, sources, combination_type, lora_bias)


def _add_combination(module: LinearLoRA, name: str, sources: list, combination_type: str, lora_bias: bool) -> None:
    """Build `module`'s adapter `name` from `(holder, weight)` pairs (see `add_weighted_adapter`)."""
    factors = [w * h.lora_settings.scale for h, w in sources]
    As = [h.lora_A.weight.float() for h, _ in sources]  # (r_i, in)
    Bs = [h.lora_B.weight.float() for h, _ in sources]  # (out, r_i)
    if combination_type == "cat":
        lora_A = torch.cat([f * a for f, a in zip(factors, As, strict=True)])  # (sum r_i, in)
        lora_B = torch.cat(Bs, dim=1)  # (out, sum r_i)
    else:
        lora_A = sum(math.copysign(math.sqrt(abs(f)), f) * a for f, a in zip(factors, As, strict=True))  # (r, in)
        lora_B = sum(math.sqrt(abs(f)) * b for f, b in zip(factors, Bs, strict=True))  # (out, r)
    rank = lora_A.shape[0]
    biased = [(f, h.lora_B.bias) for f, (h, _) in zip(factors, sources, strict=True) if h.lora_B.bias is not None]
    first: LoraSettings = sources[0][0].lora_settings
    settings = first.replace(dim=rank, alpha=rank, use_rslora=False, lora_bias=lora_bias)
    holder = add_inactive(module, name, settings)
    holder.lora_A.weight.copy_(lora_A)
    holder.lora_B.weight.copy_(lora_B)
    if biased:  # lora_bias adapters: the biases combine exactly, sum_i w_i s_i b_i (scale 1 here)
        holder.lora_B.bias.copy_(sum(f * b.float() for f, b in biased))

