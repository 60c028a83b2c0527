"""The finetune recipe: YAML config -> LoRA/QLoRA fine-tuning -> PEFT-format adapter.

What you run is ``scripts/finetune.py`` / ``automodel-lora finetune``; what you configure is
``configs/*.yaml``. Modules, in the order a run touches them:

- ``config``: one validated dataclass per YAML section, dotted ``key=value`` overrides.
- ``tokenizer``: the built-in byte-level tokenizer and an HF ``AutoTokenizer`` wrapper.
- ``data``: JSONL -> tokens -> packed blocks -> deterministic, resumable, rank-sharded batches.
- ``model``: base model (local HF checkpoint or tiny Llama), 4-bit quantization.
- ``distributed``: torchrun process group, FSDP2 / DDP wrapping.
- ``checkpoint``: atomic, resumable checkpoints (adapter, optimizer, scheduler, RNG, step).
- ``progress``: progress bar and metrics JSONL.
- ``train``: the loop, ``finetune(cfg)``.
"""

from .config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistributedConfig,
    ModelConfig,
    QuantizationConfig,
    RecipeConfig,
    TrainConfig,
    apply_overrides,
    load_recipe,
)
from .tokenizer import ByteTokenizer
from .train import TrainingInterrupted, finetune

__all__ = [
    "ByteTokenizer",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "ModelConfig",
    "QuantizationConfig",
    "RecipeConfig",
    "TrainConfig",
    "TrainingInterrupted",
    "apply_overrides",
    "finetune",
    "load_recipe",
]
