"""The finetune recipe: YAML config -> LoRA/QLoRA fine-tuning -> PEFT-format adapter.

What you run is ``scripts/finetune.py`` / ``automodel-lora finetune``; what you configure is
``configs/*.yaml``. Modules, in the order a run touches them:

- ``sections``: one validated dataclass per YAML section (the schema); ``config``: reading YAML,
  dotted ``key=value`` overrides, ``RecipeConfig``.
- ``tokenizer``: the built-in byte-level tokenizer and an HF ``AutoTokenizer`` wrapper.
- ``data``: JSONL -> tokens -> packed blocks -> deterministic, resumable, rank-sharded batches.
- ``model``: base model (local HF checkpoint or tiny Llama), 4-bit quantization.
- ``distributed``: torchrun process group, FSDP2 / DDP wrapping.
- ``rundir``: one writer per output directory (a lock), another run moved aside, never overwritten.
- ``checkpoint``: atomic, resumable checkpoints (adapter, optimizer, scheduler, RNG, step) that
  load without executing code; ``rng`` and ``files`` are its helpers.
- ``progress``: progress bar and metrics JSONL.
- ``setup_phase`` / ``train``: the ``Recipe`` in phases (setup, train, evaluate, save_checkpoint,
  finish, cleanup) and ``finetune(cfg)``; ``loop``: loss, lr schedule, evaluation, signals.
- ``fused_loss``: ``train.fused_loss: liger``, the loss from the hidden states and the head's weight (Liger-Kernel).
- ``fused_norm``: ``train.fused_norm: liger``, the model's RMSNorm modules on Liger-Kernel's kernel, swapped in place.
- ``errors``: how a run ends when it can't go on (exit code 2 for its files, 3 for non-finite values).
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
from .errors import CheckpointError, RunDirError, TrainingStopped
from .tokenizer import ByteTokenizer
from .train import Recipe, TrainingInterrupted, finetune

__all__ = [
    "ByteTokenizer",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "ModelConfig",
    "QuantizationConfig",
    "Recipe",
    "RecipeConfig",
    "RunDirError",
    "TrainConfig",
    "TrainingInterrupted",
    "TrainingStopped",
    "apply_overrides",
    "finetune",
    "load_recipe",
]
