"""DoRA's magnitudes in HF PEFT's files: checking a file's `lora_magnitude_vector` tensors against its config and
against the model before anything is loaded.

PEFT's format (0.21, `DoraLinearLayer`): `adapter_config.json` says `"use_dora": true`, and the weights file holds
`base_model.model.<fqn>.lora_magnitude_vector` `(out_features,)` (no `.weight`; in memory PEFT names it
`...lora_magnitude_vector.default.weight`, which is read too) beside each module's `lora_A` / `lora_B`.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_format import AdapterConfig
from .adapter_vectors import check_file_vectors, check_patched_vectors
from .dora import magnitude_of


def check_file_magnitudes(config: AdapterConfig, pairs: dict, magnitudes: dict[str, torch.Tensor],
                          weights_path: str) -> None:
    """A file's magnitudes must be the ones its config describes (`adapter_vectors.check_file_vectors`)."""
    check_file_vectors(config, pairs, magnitudes, weights_path, field="use_dora", suffix="lora_magnitude_vector",
                       trained_with="DoRA")


def check_patched_magnitudes(adapted: dict[str, nn.Module], magnitudes: dict[str, torch.Tensor], path: str) -> None:
    """Loading into a patched model: each adapted module has a DoRA magnitude exactly where the file has one."""
    check_patched_vectors(adapted, magnitudes, path, field="use_dora", suffix="lora_magnitude_vector",
                          has_vector=lambda holder: magnitude_of(holder) is not None,
                          kinds=("is a plain LoRA adapter", "is a DoRA adapter"))
