"""Whether an adapter file fits the model it is loaded into: every check ``load_adapter`` makes against the
model (names, shapes, scale, coverage of the file's ``target_modules``), before anything is changed.

Each raises ``AdapterFormatError`` naming the file, the key and the fix.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .adapter_format import PEFT_KEY_PREFIX, AdapterConfig, AdapterFormatError
from .adapter_slots import adapter_part_ids
from .embedding_lora import adapter_features, is_lora_target

__all__ = ["check_patched_model", "check_unpatched_model", "check_targets_covered", "check_scaling", "check_shape"]


def check_patched_model(adapted: dict[str, nn.Module], pairs, peft_cfg: AdapterConfig, path: str) -> None:
    """The file must give every adapted module (`{fqn: holder}` of the adapter loaded into) its weights, of its
    shapes, at its scale."""
    missing = sorted(set(adapted) - set(pairs))
    if missing:
        raise AdapterFormatError(
            f"{path!r} holds no adapter for {len(missing)} adapted module(s) of the model, e.g. {missing[:5]}; "
            "load a complete adapter, or patch only the modules the file has"
        )
    for fqn, (lora_A, lora_B) in pairs.items():
        module = adapted.get(fqn)
        if module is None:
            raise AdapterFormatError(
                f"adapter key {PEFT_KEY_PREFIX}{fqn}.lora_A.weight names {fqn!r}, which has no LoRA adapter in the model"
            )
        check_shape(module.lora_A.weight, lora_A, f"{fqn}.lora_A.weight")
        check_shape(module.lora_B.weight, lora_B, f"{fqn}.lora_B.weight")
        check_scaling(module, fqn, peft_cfg, path)


def check_unpatched_model(model: nn.Module, modules: dict[str, nn.Module], pairs, source: str) -> None:
    """Every key must name a linear module whose (in, out) features the tensors fit."""
    for fqn, (lora_A, lora_B) in pairs.items():
        module = modules.get(fqn)
        if not is_lora_target(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear or embedding"
            raise AdapterFormatError(
                f"adapter key {PEFT_KEY_PREFIX}{fqn}.lora_A.weight names {fqn!r}: {what} in {type(model).__name__}"
            )
        # a Conv1D stores its weight (in, out), an embedding (num_embeddings, dim); adapters are (r, in) / (out, r)
        in_features, out_features = adapter_features(module)
        if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
            raise AdapterFormatError(
                f"{source}: {fqn!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, but the model's "
                f"layer is ({out_features}, {in_features}) (out, in); is this the adapter of another model?"
            )


def check_targets_covered(model: nn.Module, pairs, peft_cfg: AdapterConfig, strict: bool) -> None:
    """Linear modules the file's `target_modules` select (HF PEFT's rules) must all have weights in it."""
    targets = peft_cfg.target_modules
    if targets is None or targets == "all-linear":
        return
    parts = adapter_part_ids(model)
    missing = sorted(
        name
        for name, m in model.named_modules()
        if is_lora_target(m)
        and id(m) not in parts
        and name not in pairs
        and peft_cfg.selects(name)
    )
    if not missing:
        return
    msg = (
        f"{peft_cfg.path!r}: target_modules={targets!r} selects {len(missing)} linear module(s) of "
        f"{type(model).__name__} that the adapter has no weights for, e.g. {missing[:5]}; the file is incomplete "
        "or belongs to another model"
    )
    if strict:
        raise AdapterFormatError(msg + " (pass strict=False to load the rest with a warning)")
    warnings.warn(msg + "; those modules stay unadapted", stacklevel=3)


def check_scaling(module, fqn: str, peft_cfg: AdapterConfig, path: str) -> None:
    """The file's alpha and rsLoRA flag for `fqn` must be the ones the patched module scales with."""
    alpha, rslora = peft_cfg.alpha_for(fqn), peft_cfg.use_rslora
    settings = module.lora_settings
    if float(alpha) != float(settings.alpha) or rslora != settings.use_rslora:
        raise AdapterFormatError(
            f"{path!r} was trained with lora_alpha={alpha}, use_rslora={rslora} for {fqn!r}, but the "
            f"model's adapter there has lora_alpha={settings.alpha}, use_rslora={settings.use_rslora}; the "
            "outputs would be scaled differently. Load into an unpatched model (load_adapter patches it from the "
            "file) or patch with the file's values"
        )


def check_shape(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise AdapterFormatError(
            f"adapter key {key!r}: the file has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
        )
