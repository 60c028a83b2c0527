"""Reading `adapter_model.safetensors`: its tensors grouped per module and checked, before a model is touched.

`read_adapter_file` groups the file into `(lora_A, lora_B)` pairs per module FQN, PEFT's `lora_bias` tensors
(`lora_B.bias`), DoRA's `lora_magnitude_vector`, the full tensors of `modules_to_save` modules and PEFT's copies
of adapted embeddings' tables, and refuses what is wrong (an `AdapterFormatError` naming the file and the key).
"""

from __future__ import annotations

import os
import re

import torch

from .adapter_format import PEFT_KEY_PREFIX, AdapterFormatError
from .embedding_lora import embedding_table_of
from .modules_to_save import module_to_save_of

__all__ = ["read_adapter_file"]

# `<prefix><fqn>.lora_A.weight`, also with PEFT's in-memory adapter name (`.lora_A.default.weight`), and
# `<prefix><fqn>.lora_B.bias` (PEFT's `lora_bias`).
_ADAPTER_KEY = re.compile(r"^(?P<fqn>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.(?P<param>weight|bias)$")
# An embedding's `<prefix><fqn>.lora_embedding_A` / `_B` (no `.weight`; `.lora_embedding_A.<name>` in memory): read
# as the (r, num_embeddings) / (embedding_dim, r) pair of `lora_A` / `lora_B` shapes.
_EMBEDDING_KEY = re.compile(r"^(?P<fqn>.+)\.lora_embedding_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?(?P<param>)$")
# DoRA's magnitude: `<prefix><fqn>.lora_magnitude_vector` on disk (no `.weight`), `...vector.<name>.weight` in memory.
_MAGNITUDE_KEY = re.compile(r"^(?P<fqn>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+\.weight)?$")


def read_adapter_file(path: str, modules_to_save: list[str] | None = None):
    """`(pairs, saved, biases, magnitudes, tables)`: `adapter_model.safetensors` as `{fqn: (lora_A (r, in), lora_B (out,
    r))}`, the full tensors of `modules_to_save` modules as `{<fqn>.<name>: tensor}` (PEFT's prefix stripped),
    PEFT's `lora_bias` tensors as `{fqn: lora_B.bias}` (shapes checked by `adapter_bias.check_file_biases`) and
    DoRA's as `{fqn: lora_magnitude_vector}` (checked by `adapter_dora.check_file_magnitudes`), and PEFT's copies of
    adapted embeddings' tables as `{fqn: table}` (`embedding_lora.check_embedding_tables`), every tensor checked.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: not a safetensors file, a key that is neither a lora_A/lora_B weight (or lora_B
            bias) nor a tensor of a module that `modules_to_save` selects, a lora_A bias, a half
            missing, shapes that do not pair, a tensor that is not floating point, or one holding NaN/Inf.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist; an adapter directory needs adapter_model.safetensors")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{path!r} is not a readable safetensors file ({e}); save the adapter again") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    saved, magnitudes, tables = {}, {}, {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key.removeprefix(PEFT_KEY_PREFIX)) or _EMBEDDING_KEY.match(key.removeprefix(PEFT_KEY_PREFIX))
        if match is None and (dora := _MAGNITUDE_KEY.match(key.removeprefix(PEFT_KEY_PREFIX))) is not None:
            _check_values(path, key, tensor)
            magnitudes[dora["fqn"]] = tensor
            continue
        if match is None and (table := embedding_table_of(key.removeprefix(PEFT_KEY_PREFIX))) is not None:
            tables[table] = tensor  # PEFT's copy of an adapted embedding's table: `check_embedding_tables`
            continue
        if match is None and module_to_save_of(key.removeprefix(PEFT_KEY_PREFIX), modules_to_save):
            if tensor.is_floating_point():
                _check_values(path, key, tensor)
            saved[key.removeprefix(PEFT_KEY_PREFIX)] = tensor
            continue
        if match is None:
            raise AdapterFormatError(
                f"{path}: key {key!r} is not a LoRA lora_A/lora_B weight, nor a tensor of a module that the config's "
                f"modules_to_save={modules_to_save!r} selects; only LoRA adapters (with modules_to_save) are supported"
            )
        _check_values(path, key, tensor)
        halves.setdefault(match["fqn"], {})[match["which"] + ("" if match["param"] in ("weight", "") else ".bias")] = tensor
    pairs, biases = {}, {}
    for fqn, half in halves.items():
        if not {"A", "B"} <= set(half):
            lacking = "lora_B" if "A" in half else "lora_A"
            raise AdapterFormatError(f"{path}: {fqn!r} has no {lacking}.weight (key {PEFT_KEY_PREFIX}{fqn}.{lacking}.weight)")
        if "A.bias" in half:
            raise AdapterFormatError(f"{path}: key {PEFT_KEY_PREFIX}{fqn}.lora_A.bias: lora_A has no bias (PEFT's "
                                     "lora_bias is a bias on lora_B only); remove the key or save the adapter again")
        if "B.bias" in half:
            biases[fqn] = half["B.bias"]
        lora_A, lora_B = half["A"], half["B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise AdapterFormatError(
                f"{path}: {fqn!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; "
                "expected (r, in_features) and (out_features, r)"
            )
        pairs[fqn] = (lora_A, lora_B)
    if not pairs:
        raise AdapterFormatError(f"{path} holds no adapter tensors")
    return pairs, saved, biases, magnitudes, tables


def _check_values(path: str, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterFormatError(
            f"{path}: {key!r} is {tensor.dtype}; adapter weights are floating point (float32, float16, bfloat16)"
        )
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise AdapterFormatError(
            f"{path}: {key!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the adapter was saved from a diverged "
            "run. Load an earlier checkpoint's adapter"
        )
