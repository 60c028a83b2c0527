"""The recipe's schema: one validated dataclass per YAML section, and ``SECTIONS``, their order.

A recipe YAML has these top-level sections (all optional except ``data`` and ``model``)::

    model:          # what to fine-tune (a local HF checkpoint, or a tiny Llama built from a config)
    peft:           # automodel_lora.PeftConfig fields (which linears get adapters, rank, alpha, kernels, ...)
    quantization:   # bitsandbytes 4-bit base weights (QLoRA)
    data:           # local JSONL file, tokenizer, sequence length, packing, validation split
    train:          # optimizer, schedule, batch sizes, steps, precision, evaluation
    checkpoint:     # output directory, save / keep / resume
    distributed:    # torchrun strategy: fsdp2 | ddp | none

Each section checks its own values in ``__post_init__`` and raises a ``ConfigError`` naming the key.
The values arrive typed (``recipe.config`` reads the YAML and converts what YAML can't); reading
files, overrides and the whole ``RecipeConfig`` live there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import PeftConfig, dtype_from_str, dtype_to_str
from .errors import ConfigError

__all__ = [
    "ModelConfig",
    "QuantizationConfig",
    "DataConfig",
    "TrainConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "SECTIONS",
]

# The dtypes a recipe names; `dtype_from_str` also reads their short spellings (bf16, fp16, fp32, ...).
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------
# Checks the sections' __post_init__ share
# --------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"`{key}` must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _dtype_name(key: str, value: Any, extra: tuple[str, ...] = ()) -> str:
    """The canonical name (``bfloat16``) of a dtype written any way ``dtype_from_str`` reads, or one of ``extra``."""
    if value in extra:
        return value
    try:
        dtype = dtype_from_str(value, key) if isinstance(value, str) else None
    except ValueError:
        dtype = None
    if dtype is None:
        raise ConfigError(f"`{key}` must be one of {', '.join(_DTYPE_NAMES + extra)}; got {value!r}")
    return dtype_to_str(dtype)


def _positive(key: str, value: float | None, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"`{key}` is required")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"`{key}` must be {kind} number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """``model:`` what to fine-tune.

    Attributes:
        name_or_path: A local Hugging Face checkpoint directory (or hub id, if you have network)
            for ``AutoModelForCausalLM.from_pretrained``. Exclusive with ``tiny``. With
            ``random_init`` a directory holding only ``config.json`` is enough.
        tiny: config keyword arguments for a small randomly initialised model built in process (no
            download), e.g. ``{hidden_size: 128, num_hidden_layers: 4, ...}``; ``model_type`` picks the
            architecture (default ``llama``; ``qwen3_moe`` or ``mixtral`` for a MoE).
        dtype: Base weight dtype: float32 | bfloat16 | float16 | auto (the checkpoint's); bf16, fp16,
            fp32 are read too and stored by their full names.
        trust_remote_code: Passed to ``from_pretrained``; off by default.
        gradient_checkpointing: Recompute activations in the backward (non-reentrant).
        attn_implementation: Optional ``attn_implementation`` for transformers (sdpa, eager, ...).
        random_init: Build the model of ``name_or_path``'s ``config.json`` with random weights
            (seeded by ``train.seed``, directly on the training device) instead of loading them:
            a run at real size, for speed and memory, where no weights are at hand. With
            ``data.tokenizer: null`` and no tokenizer in the directory, the byte tokenizer is used.
    """

    name_or_path: str | None = None
    tiny: dict | None = None
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    random_init: bool = False

    def __post_init__(self):
        if self.random_init and self.tiny is not None:
            raise ConfigError(
                "`model.random_init: true` builds `model.name_or_path`'s config with random weights; "
                "`model.tiny` is random already: drop `model.random_init` or use `model.name_or_path`"
            )
        if self.random_init and self.name_or_path is None:
            raise ConfigError(
                "`model.random_init: true` needs `model.name_or_path`: a directory holding config.json "
                "(e.g. model.name_or_path=configs/models/llama3.1-8b)"
            )
        if (self.name_or_path is None) == (self.tiny is None):
            raise ConfigError(
                "set exactly one of `model.name_or_path` (a local Hugging Face checkpoint) "
                "and `model.tiny` (LlamaConfig kwargs for a small model built from scratch)"
            )
        self.dtype = _dtype_name("model.dtype", self.dtype, extra=("auto",))
        if self.tiny is not None:
            _check_tiny_keys(self.tiny)


def _check_tiny_keys(tiny: dict) -> None:
    try:
        from .model import tiny_config
    except ImportError:  # validated again when the model is built
        return
    tiny_config(tiny)


@dataclass
class QuantizationConfig:
    """``quantization:`` bitsandbytes 4-bit base weights (QLoRA).

    Attributes:
        load_in_4bit: Quantize every base linear except the output head to 4 bits.
        bnb_4bit_quant_type: nf4 | fp4.
        bnb_4bit_compute_dtype: dtype the 4-bit matmul computes in: bfloat16 | float16 | float32 (or
            bf16, fp16, fp32).
        bnb_4bit_use_double_quant: Also quantize the per-block scales (saves ~0.4 bit/param).
    """

    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_use_double_quant: bool = True

    def __post_init__(self):
        _choice("quantization.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        self.bnb_4bit_compute_dtype = _dtype_name("quantization.bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype)


@dataclass
class DataConfig:
    """``data:`` a local JSONL dataset.

    Each line is a JSON object with either ``text`` (loss on every token) or ``prompt`` and
    ``completion`` (loss on the completion tokens only; the prompt is context).

    Attributes:
        path: JSONL training file (required).
        format: auto | text | prompt_completion (auto: detected from the first record).
        text_field / prompt_field / completion_field: Field names in the records.
        tokenizer: ``byte`` (the built-in byte-level tokenizer, no download) or a local
            tokenizer directory; null means ``model.name_or_path``.
        seq_len: Tokens per training sequence; must not exceed the model's
            ``max_position_embeddings``.
        packing: Concatenate examples into full ``seq_len`` blocks (no padding) instead of one
            padded/truncated example per sequence.
        add_bos / add_eos: Wrap every example in the tokenizer's BOS / EOS.
        validation_split: Fraction of examples held out for validation (0 disables).
        validation_path: A separate JSONL validation file (exclusive with validation_split).
        shuffle: Shuffle the training order every epoch (seeded by ``train.seed``).
        adapters: Several adapters trained at once, each on its own data: ``{name: JSONL path}`` in place
            of ``path`` (every other ``data`` setting applies to each). Each step's batch holds every
            adapter's micro-batch, each sequence run with its own adapter (``automodel_lora.adapter_batch``);
            each adapter gets the gradient of its own mean token loss, is clipped by its own norm, and is
            saved to ``adapter/<name>/`` (any name but ``default``; a single adapter too): the run trains what
            one run per adapter with the same seed would (except that a step non-finite in any adapter is
            skipped for all).
            One process or several (``distributed.strategy: ddp`` or ``fsdp2``: each rank takes its slice of
            every adapter's batch; each adapter's loss is normalised by its global target count, so the run
            trains what one process with the same global batch would). Needs ``train.max_steps`` set and
            adapters on linears (LoRA, DoRA, ``lora_bias``; no dropout, embeddings or experts).
    """

    path: str | None = None
    format: str = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tokenizer: str | None = None
    seq_len: int = 512
    packing: bool = True
    add_bos: bool = True
    add_eos: bool = True
    validation_split: float = 0.0
    validation_path: str | None = None
    shuffle: bool = True
    adapters: dict | None = None

    def __post_init__(self):
        if self.adapters is not None:
            _check_adapter_data(self)
        elif not self.path:
            raise ConfigError("`data.path` is required: a JSONL file with `text` or `prompt`+`completion` per line")
        _choice("data.format", self.format, ("auto", "text", "prompt_completion"))
        if self.seq_len < 2:
            raise ConfigError(f"`data.seq_len` must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"`data.validation_split` must be in [0, 1), got {self.validation_split}")
        if self.validation_split > 0 and self.validation_path:
            raise ConfigError("Can't provide both `data.validation_split` and `data.validation_path`. Choose one.")


def _check_adapter_data(dc) -> None:
    """``data.adapters``: a non-empty mapping of adapter names to files, instead of ``data.path``."""
    from ..adapter_slots import check_adapter_name

    if not isinstance(dc.adapters, dict) or not dc.adapters:
        raise ConfigError(f"`data.adapters` must map adapter names to JSONL files, got {dc.adapters!r}")
    if dc.path:
        raise ConfigError("`data.path` and `data.adapters` both set: with several adapters each has its own file in "
                          "`data.adapters`; drop `data.path`")
    if dc.validation_path:
        raise ConfigError("`data.validation_path` with `data.adapters`: use `data.validation_split` (each adapter's "
                          "validation set is split from its own file)")
    for name, path in dc.adapters.items():
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise ConfigError(f"`data.adapters`: {e}") from None
        if name == "default":
            raise ConfigError("`data.adapters`: 'default' is the name of a plain run's adapter (written to adapter/ "
                              "itself); give each adapter of a multi-adapter run its own name")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"`data.adapters.{name}` must be a JSONL file path, got {path!r}")


@dataclass
class TrainConfig:
    """``train:`` optimisation.

    Attributes:
        lr: Peak AdamW learning rate.
        weight_decay, betas, eps: AdamW hyper-parameters.
        scheduler: cosine (linear warmup then cosine decay to ``min_lr_ratio * lr``) | constant
            (linear warmup then flat).
        warmup_steps: Linear warmup steps (exclusive with warmup_ratio).
        warmup_ratio: Warmup as a fraction of the total steps.
        min_lr_ratio: Final learning rate of the cosine, as a fraction of ``lr``.
        batch_size: Sequences per micro-batch per process.
        grad_accum_steps: Micro-batches per optimizer step. Global batch =
            batch_size * grad_accum_steps * world_size sequences.
        max_steps: Optimizer steps to run (exclusive with epochs).
        epochs: Passes over the training set (default 1 when max_steps is not set).
        seed: Seeds model init, adapter init, data order and dropout.
        bf16: bf16 autocast: true | false | auto (on when a bf16-capable GPU is used).
        max_grad_norm: Clip the global gradient norm (null disables clipping).
        eval_every: Evaluate the validation loss every N steps (0: only before and after).
        eval_batch_size: Micro-batch size for evaluation (default: batch_size).
        eval_max_batches: Cap evaluation at N batches (null: the whole validation set).
        log_every: Progress-bar / console refresh interval in steps (metrics are logged every step).
        compile: Wrap the model in ``torch.compile``.
        cuda_graphs: Replay each micro-batch's forward and backward as a CUDA graph
            (:class:`automodel_lora.GraphedStep`): the host work of every kernel launch is paid once,
            at the capture, which is what a small model's step is short of. auto (the default: on for one
            CUDA process with ``data.packing``, no ``fused_loss`` and a model of hidden size up to 2048, mixed
            batches of ``data.adapters`` included, off otherwise; a step that cannot be captured runs eagerly and
            the run says why) | false | true (one CUDA process and packed data required, any width; a failed
            capture stops the run).
        fused_loss: false (the default: the model's logits, then the cross-entropy) | liger (Liger-Kernel's
            fused linear + cross-entropy from the decoder's hidden states and the head's weight, chunk by chunk:
            no (tokens, vocab) logits in memory; ``recipe.fused_loss``). ``liger`` needs ``liger_kernel``
            installed, one process on CUDA, a head that is a plain ``nn.Linear`` (a LoRA adapter on it is fine;
            DoRA is not) and no logit softcapping or scaling in the model; not with ``compile``,
            ``cuda_graphs: true`` (Liger reads the target count on the host) or ``data.adapters``. auto: liger
            where all of that holds, the plain loss otherwise (the run prints which, and why).
        fused_norm: false (the default: the model's own RMSNorm) | liger (each RMSNorm of the Llama, Mistral,
            Mixtral, Phi-3, Qwen2 and Qwen3 families runs Liger-Kernel's one-pass kernel, swapped in place:
            ``recipe.fused_norm``). Needs ``liger_kernel`` and CUDA; not with ``compile``. auto: liger where
            that holds and the model has such norms, the model's own norm otherwise (the run prints which).
        device: auto | cpu | cuda.
        nonfinite: What a step with a non-finite loss or gradient norm does: skip (the optimizer
            does not step; the data and the lr schedule move on; counted in ``metrics.jsonl`` as
            ``nonfinite_steps``) | stop (end the run at once, exit code 3).
        max_nonfinite_skips: With ``nonfinite: skip``, end the run (exit code 3) after this many
            non-finite steps in a row: a diverged run stops instead of skipping to the end.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr_ratio: float = 0.1
    batch_size: int = 1
    grad_accum_steps: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    seed: int = 42
    bf16: bool | str = "auto"
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    eval_batch_size: int | None = None
    eval_max_batches: int | None = None
    log_every: int = 10
    compile: bool = False
    cuda_graphs: bool | str = "auto"
    fused_loss: bool | str = False
    fused_norm: bool | str = False
    device: str = "auto"
    nonfinite: str = "skip"
    max_nonfinite_skips: int = 5

    def __post_init__(self):
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"`train.betas` must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]
        _positive("train.eps", self.eps)
        _choice("train.scheduler", self.scheduler, ("cosine", "constant"))
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("Can't provide both `train.warmup_steps` and `train.warmup_ratio`. Choose one.")
        _positive("train.warmup_steps", self.warmup_steps, allow_none=True, allow_zero=True)
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"`train.warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"`train.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum_steps", self.grad_accum_steps)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("Can't provide both `train.max_steps` and `train.epochs`. Choose one.")
        _positive("train.max_steps", self.max_steps, allow_none=True)
        _positive("train.epochs", self.epochs, allow_none=True)
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise ConfigError(f"`train.bf16` must be true, false or auto; got {self.bf16!r}")
        if isinstance(self.cuda_graphs, str) and self.cuda_graphs != "auto":
            raise ConfigError(f"`train.cuda_graphs` must be true, false or auto; got {self.cuda_graphs!r}")
        _check_fused_loss(self)
        _check_fused_norm(self)
        _positive("train.max_grad_norm", self.max_grad_norm, allow_none=True)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.eval_batch_size", self.eval_batch_size, allow_none=True)
        _positive("train.eval_max_batches", self.eval_max_batches, allow_none=True)
        _positive("train.log_every", self.log_every)
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.nonfinite", self.nonfinite, ("skip", "stop"))
        _positive("train.max_nonfinite_skips", self.max_nonfinite_skips)


def _check_liger_switch(tc: TrainConfig, setting: str, liger_does: str, plain_does: str, compile_why: str) -> bool:
    """``train.<setting>``: false, liger or auto (resolved at setup, where the run is known); liger importable and
    not under ``train.compile``. True when it is liger (the caller checks what else it needs)."""
    from .fused_loss import LIGER_INSTALL, liger_available

    value = getattr(tc, setting)
    if value is False or value == "auto":
        return False
    if value != "liger":
        raise ConfigError(f"`train.{setting}` must be false, liger or auto; got {value!r}. Set train.{setting}=liger "
                          f"({liger_does}), auto (liger where it can run) or false ({plain_does})")
    if not liger_available():
        raise ConfigError(f"`train.{setting}: liger` needs the liger_kernel package, which is not installed: run "
                          f"`{LIGER_INSTALL}`, or set train.{setting}=false")
    if tc.compile:
        raise ConfigError(f"`train.{setting}: liger` with `train.compile: true`: {compile_why}; set "
                          f"train.compile=false or train.{setting}=false")
    return True


def _check_fused_loss(tc: TrainConfig) -> None:
    """``train.fused_loss``: as ``_check_liger_switch``, and not with ``cuda_graphs: true``."""
    if not _check_liger_switch(tc, "fused_loss", "Liger-Kernel's fused linear + cross-entropy, no logits in memory",
                               "the plain loss", "the fused loss calls the decoder outside the compiled model"):
        return
    if tc.cuda_graphs is True:
        raise ConfigError("`train.fused_loss: liger` with `train.cuda_graphs: true`: Liger counts the target tokens on "
                          "the host, which a CUDA graph capture cannot hold; set train.cuda_graphs=auto (off with "
                          "the fused loss) or false, or train.fused_loss=false")


def _check_fused_norm(tc: TrainConfig) -> None:
    """``train.fused_norm``: as ``_check_liger_switch``."""
    _check_liger_switch(tc, "fused_norm", "Liger-Kernel's RMSNorm kernel", "the model's own norm",
                        "Inductor fuses the model's own norm already")


@dataclass
class CheckpointConfig:
    """``checkpoint:`` where and when to save.

    Attributes:
        output_dir: Run directory (relative to the current directory). Holds ``adapter/`` (the
            final PEFT-format adapter), ``checkpoints/step_*``, ``metrics.jsonl``,
            ``config.yaml`` and, for ``model.tiny``, ``base_model/``.
        save_every: Save a resumable checkpoint every N steps (0: only at the end / on a signal).
        keep_last: Keep the newest K checkpoints (older ones are deleted).
        resume: auto (continue from the newest intact checkpoint in output_dir, if any; ``true``
            means the same) | null (start fresh; ``false`` and ``none`` mean the same; refused if
            output_dir holds checkpoints, unless ``overwrite``) | a checkpoint directory path.
        overwrite: Start a new run in an output_dir that holds another run's checkpoints by first
            renaming that directory to a timestamped sibling (``<output_dir>.old-YYYYmmdd-HHMMSS``);
            nothing is deleted.
        save_base_model: Save the (random-init) base model with ``save_pretrained`` into
            ``output_dir/base_model`` so the adapter can be loaded with PEFT:
            auto (only for ``model.tiny``) | true | false.
    """

    output_dir: str = "outputs/run"
    save_every: int = 0
    keep_last: int = 2
    resume: str | bool | None = "auto"
    save_base_model: bool | str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        _positive("checkpoint.save_every", self.save_every, allow_zero=True)
        _positive("checkpoint.keep_last", self.keep_last)
        if isinstance(self.save_base_model, str) and self.save_base_model != "auto":
            raise ConfigError(f"`checkpoint.save_base_model` must be true, false or auto; got {self.save_base_model!r}")
        if self.resume is True:
            self.resume = "auto"
        elif self.resume is False or self.resume in ("none", "None", "null", "false", "no", ""):
            self.resume = None


@dataclass
class DistributedConfig:
    """``distributed:`` multi-process training under ``torchrun``.

    Attributes:
        strategy: auto | fsdp2 | ddp | none. ``fsdp2`` applies
            ``torch.distributed.fsdp.fully_shard`` to every decoder layer, then to the root;
            ``ddp`` replicates the model. ``auto``: none for one process, fsdp2 otherwise (ddp
            for a 4-bit model).
        backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo.
        reshard_after_forward: FSDP2: free gathered layer weights after the forward (saves
            memory, costs an all-gather in the backward).
    """

    strategy: str = "auto"
    backend: str = "auto"
    reshard_after_forward: bool = True

    def __post_init__(self):
        _choice("distributed.strategy", self.strategy, ("auto", "fsdp2", "ddp", "none"))
        _choice("distributed.backend", self.backend, ("auto", "nccl", "gloo"))


SECTIONS = {
    "model": ModelConfig,
    "peft": PeftConfig,  # the core library's config, validated there
    "quantization": QuantizationConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
}
