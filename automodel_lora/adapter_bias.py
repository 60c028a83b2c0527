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

from .adapter_format import AdapterConfig
from .adapter_vectors import check_file_vectors, check_patched_vectors


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
    """A file's `lora_B.bias` tensors must be the ones its config describes (`adapter_vectors.check_file_vectors`)."""
    check_file_vectors(config, pairs, biases, weights_path, field="lora_bias", suffix="lora_B.bias",
                       trained_with="lora_bias")


def check_patched_biases(adapted: dict[str, nn.Module], biases: dict[str, torch.Tensor], path: str) -> None:
    """Loading into a patched model: each adapted module has a lora_B bias exactly where the file has one."""
    check_patched_vectors(adapted, biases, path, field="lora_bias", suffix="lora_B.bias",
                          has_vector=lambda holder: holder.lora_B.bias is not None,
                          kinds=("has no lora_B bias", "has a lora_B bias"))
