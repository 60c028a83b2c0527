"""Per-module vectors an adapter may carry in HF PEFT's files, beside `lora_A` / `lora_B`: `lora_B.bias`
(`"lora_bias": true`) and DoRA's `lora_magnitude_vector` (`"use_dora": true`), each `(out_features,)`.
One set of checks serves both: against the file's own config, and against a patched model, before anything
is loaded."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapter_format import PEFT_KEY_PREFIX, AdapterConfig, AdapterFormatError


def check_file_vectors(config: AdapterConfig, pairs: dict, vectors: dict[str, torch.Tensor], weights_path: str, *,
                       field: str, suffix: str, trained_with: str) -> None:
    """A file's `<fqn>.<suffix>` tensors must be the ones its config's `field` describes: one `(out_features,)`
    vector per adapted module when it is true, none when false, none for a module without `lora_A` / `lora_B`.

    Raises:
        AdapterFormatError: naming the file, the tensor key and the fix.
    """
    enabled = getattr(config, field)
    for fqn, vector in vectors.items():
        key = f"{PEFT_KEY_PREFIX}{fqn}.{suffix}"
        if not enabled:
            raise AdapterFormatError(
                f"{weights_path} holds {key}, but {config.path!r} has {field}=false, so PEFT would build the adapter "
                f"without it and not load it. Set \"{field}\": true in adapter_config.json if the adapter was trained "
                f"with {trained_with}, else remove the {suffix} tensors"
            )
        if fqn not in pairs:
            raise AdapterFormatError(
                f"{weights_path} holds {key}, but no {PEFT_KEY_PREFIX}{fqn}.lora_A.weight / lora_B.weight: it belongs "
                "to a LoRA adapter of the same module. Remove the key or save the adapter again"
            )
        out_features = pairs[fqn][1].shape[0]
        if vector.shape != (out_features,):
            raise AdapterFormatError(
                f"{weights_path}: {key} has shape {tuple(vector.shape)}, but lora_B there has {out_features} out "
                f"features, so it must be ({out_features},); save the adapter again"
            )
    missing = sorted(set(pairs) - set(vectors)) if enabled else []
    if missing:
        raise AdapterFormatError(
            f"{config.path!r} has {field}=true, but {weights_path} has no {PEFT_KEY_PREFIX}{missing[0]}.{suffix} "
            f"({len(missing)} module(s) lack one); save the adapter again, or set \"{field}\": false if it was "
            f"trained without {trained_with}"
        )


def check_patched_vectors(adapted: dict[str, nn.Module], vectors: dict[str, torch.Tensor], path: str, *, field: str,
                          suffix: str, has_vector: Callable[[nn.Module], bool], kinds: tuple[str, str]) -> None:
    """Loading into a patched model: each adapter holder in `adapted` has the vector exactly where the file has one.
    `kinds`: how the message describes a holder without / with it.

    Raises:
        AdapterFormatError: naming the module, the key and the fix.
    """
    for fqn, holder in adapted.items():
        has = has_vector(holder)
        if has != (fqn in vectors):
            raise AdapterFormatError(
                f"the model's adapter of {fqn!r} {kinds[has]} (patched with {field}={has}), but {path!r} has "
                f"{'none' if has else 'one'} (key {PEFT_KEY_PREFIX}{fqn}.{suffix}; {field}={not has} there). Load into "
                f"an unpatched model (load_adapter patches it from the file), or patch with {field}={not has}"
            )
