"""DoRA's magnitudes in HF PEFT's files: checking a file's `lora_magnitude_vector` tensors against its config and
against the model before anything is loaded.

PEFT's format (0.21, `DoraLinearLayer`): `adapter_config.json` says `"use_dora": true`, and the weights file holds
`base_model.model.<fqn>.lora_magnitude_vector` `(out_features,)` (no `.weight`; in memory PEFT names it
`...lora_magnitude_vector.default.weight`, which is read too) beside each module's `lora_A` / `lora_B`.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_format import PEFT_KEY_PREFIX, AdapterConfig, AdapterFormatError
from .dora import magnitude_of


def check_file_magnitudes(config: AdapterConfig, pairs: dict, magnitudes: dict[str, torch.Tensor],
                          weights_path: str) -> None:
    """A file's magnitudes must be the ones its config describes: one `(out_features,)` tensor per adapted module
    with `"use_dora": true`, none without, and none for a module without `lora_A` / `lora_B`.

    Raises:
        AdapterFormatError: naming the file, the tensor key and the fix.
    """
    for fqn, magnitude in magnitudes.items():
        key = f"{PEFT_KEY_PREFIX}{fqn}.lora_magnitude_vector"
        if not config.use_dora:
            raise AdapterFormatError(
                f"{weights_path} holds {key}, but {config.path!r} has use_dora=false, so PEFT would build a plain LoRA "
                "adapter and not load it. Set \"use_dora\": true in adapter_config.json if the adapter was trained "
                "with DoRA, else remove the lora_magnitude_vector tensors"
            )
        if fqn not in pairs:
            raise AdapterFormatError(
                f"{weights_path} holds {key}, but no {PEFT_KEY_PREFIX}{fqn}.lora_A.weight / lora_B.weight: a DoRA "
                "magnitude belongs to a LoRA adapter of the same module. Remove the key or save the adapter again"
            )
        out_features = pairs[fqn][1].shape[0]
        if magnitude.shape != (out_features,):
            raise AdapterFormatError(
                f"{weights_path}: {key} has shape {tuple(magnitude.shape)}, but lora_B there has {out_features} out "
                f"features, so the magnitude must be ({out_features},); save the adapter again"
            )
    if config.use_dora:
        missing = sorted(set(pairs) - set(magnitudes))
        if missing:
            raise AdapterFormatError(
                f"{config.path!r} has use_dora=true, but {weights_path} has no {PEFT_KEY_PREFIX}{missing[0]}."
                f"lora_magnitude_vector ({len(missing)} module(s) lack one); save the adapter again, or set "
                "\"use_dora\": false if it was trained without DoRA"
            )


def check_patched_magnitudes(adapted: dict[str, nn.Module], magnitudes: dict[str, torch.Tensor], path: str) -> None:
    """Loading into a patched model: each adapted module has a DoRA magnitude exactly where the file has one.

    Raises:
        AdapterFormatError: naming the module, the key and the fix.
    """
    for fqn, holder in adapted.items():
        has = magnitude_of(holder) is not None
        if has != (fqn in magnitudes):
            raise AdapterFormatError(
                f"the model's adapter of {fqn!r} is {'a DoRA' if has else 'a plain LoRA'} adapter (patched with "
                f"use_dora={has}), but {path!r} has {'no' if has else 'a'} magnitude for it (key {PEFT_KEY_PREFIX}"
                f"{fqn}.lora_magnitude_vector; use_dora={not has} there). Load into an unpatched model (load_adapter "
                f"patches it from the file), or patch with use_dora={not has}"
            )
