"""HF PEFT's `lora_bias` outside the layer: folding `s * lora_B.bias` into the base bias (merge, unmerge,
`merge_and_save`), and checking a file's `lora_B.bias` tensors against its config and the model (load).

PEFT's rules (`peft.tuners.lora.layer.Linear.merge` / `unmerge`, `LoraConfig.lora_bias`), followed here:
merging adds `s * lora_B.bias` to the base layer's bias and unmerging subtracts it; a base layer without
a bias cannot take it, and PEFT refuses to merge ("Impossible to merge LoRA with `lora_bias=True` because
the base layer has no bias"), so this library refuses too, before anything is written. On disk the
tensor is `base_model.model.<fqn>.lora_B.bias` `(out_features,)`, and `adapter_config.json` says
`"lora_bias": true` (then every adapted module has one).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_format import PEFT_KEY_PREFIX, AdapterConfig, AdapterFormatError


def check_bias_mergeable(name: str, module: nn.Module) -> None:
    """Refuse to merge an adapter with a lora_B bias into a base layer that has no bias (as PEFT does).

    Raises:
        ValueError: naming the module and the ways out.
    """
    if module.lora_B.bias is not None and module.bias is None:
        raise ValueError(
            f"cannot merge the adapter of {name!r}: its lora_B has a bias (lora_bias=True), but the base "
            f"{module._lora_base_cls.__name__} has no bias to fold s * lora_B.bias into (HF PEFT refuses this too: "
            "\"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias\"). Keep the "
            "adapter unmerged, or train it with lora_bias=False"
        )


def folded_bias(module: nn.Module, sign: float) -> torch.Tensor | None:
    """The base bias with `sign * s * lora_B.bias` added, in fp32 rounded once to the bias's dtype (not
    written); None for an adapter without a lora_B bias. `check_bias_mergeable` has passed."""
    lora_bias = module.lora_B.bias
    if lora_bias is None:
        return None
    bias = module.bias
    return (bias.float() + lora_bias.float() * (sign * module.lora_settings.scale)).to(bias.dtype)


def check_bias_finite(name: str, module: nn.Module, folded: torch.Tensor | None, verb: str, unchanged: str) -> None:
    """Raise if a folded base bias holds NaN/Inf (nothing is written yet)."""
    if folded is None:
        return
    bad = int((~torch.isfinite(folded)).sum())
    if bad:
        raise ValueError(
            f"cannot {verb} the adapter of {name!r}: its base bias would have {bad} non-finite values (lora_B.bias "
            f"holds NaN/Inf, or the sum overflows {folded.dtype}). {unchanged}. Load finite adapter weights, or keep "
            "the adapter unmerged"
        )


@torch.no_grad()
def fold_bias_(module: nn.Module, sign: float) -> None:
    """Write `folded_bias(module, sign)` into the base bias (nothing for an adapter without a lora_B bias)."""
    folded = folded_bias(module, sign)
    if folded is not None:
        module.bias.copy_(folded)


def check_file_biases(config: AdapterConfig, pairs: dict, biases: dict[str, torch.Tensor], weights_path: str) -> None:
    """A file's `lora_B.bias` tensors must be the ones its config describes: one `(out_features,)` bias per
    module with `"lora_bias": true`, none without.

    Raises:
        AdapterFormatError: naming the file, the tensor key and the fix.
    """
    for fqn, bias in biases.items():
        key = f"{PEFT_KEY_PREFIX}{fqn}.lora_B.bias"
        if not config.lora_bias:
            raise AdapterFormatError(
                f"{weights_path} holds {key}, but {config.path!r} has lora_bias=false, so PEFT would build lora_B "
                "without a bias and not load it. Set \"lora_bias\": true in adapter_config.json if the adapter was "
                "trained with lora_bias, else remove the lora_B.bias tensors"
            )
        out_features = pairs[fqn][1].shape[0]
        if bias.shape != (out_features,):
            raise AdapterFormatError(
                f"{weights_path}: {key} has shape {tuple(bias.shape)}, but lora_B there has {out_features} out "
                f"features, so the bias must be ({out_features},); save the adapter again"
            )
    if config.lora_bias:
        missing = sorted(set(pairs) - set(biases))
        if missing:
            raise AdapterFormatError(
                f"{config.path!r} has lora_bias=true, but {weights_path} has no {PEFT_KEY_PREFIX}{missing[0]}.lora_B.bias "
                f"({len(missing)} module(s) lack one); save the adapter again, or set \"lora_bias\": false if it was "
                "trained without"
            )


def check_patched_biases(adapted: dict[str, nn.Module], biases: dict[str, torch.Tensor], path: str) -> None:
    """Loading into a patched model: each adapted module has a lora_B bias exactly where the file has one.

    Raises:
        AdapterFormatError: naming the module, the key and the fix.
    """
    for fqn, module in adapted.items():
        has = module.lora_B.bias is not None
        if has != (fqn in biases):
            raise AdapterFormatError(
                f"the model's adapter of {fqn!r} has {'a' if has else 'no'} lora_B bias (patched with "
                f"lora_bias={has}), but {path!r} has {'none' if has else 'one'} (key {PEFT_KEY_PREFIX}{fqn}.lora_B.bias; "
                f"lora_bias={not has} there). Load into an unpatched model (load_adapter patches it from the file), "
                f"or patch with lora_bias={not has}"
            )
