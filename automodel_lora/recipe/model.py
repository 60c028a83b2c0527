"""Build the base model for a recipe: a local HF checkpoint, a config with random weights
(``model.random_init``) or a tiny Llama, optionally 4-bit.

Order matters and is the same for every strategy:
``load/build -> (save base) -> quantize -> apply LoRA -> (load resumed adapter) -> wrap``.
Patching before wrapping is what lets FSDP2/DDP see the adapters as ordinary parameters
under unchanged FQNs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from ..config import dtype_from_str
from ..matcher import output_head_names
from .config import ConfigError, ModelConfig, QuantizationConfig, RecipeConfig
from .files import fresh_dir, fsync_files, replace_dir, writing

__all__ = [
    "resolve_dtype",
    "load_model_config",
    "build_model",
    "build_random_model",
    "save_base_model",
    "quantize_linears_4bit",
    "prepare_model",
    "decoder_layers",
]


def resolve_dtype(name: str) -> torch.dtype | str:
    """``model.dtype`` as a ``torch.dtype``, or ``"auto"`` (the checkpoint's own dtype) unchanged."""
    return "auto" if name == "auto" else dtype_from_str(name, "model.dtype")


def tiny_config(tiny: dict):
    """The ``PretrainedConfig`` of ``model.tiny``: its ``model_type`` (default ``llama``) with the other keys.

    Raises:
        ConfigError: an unknown ``model_type`` or a key its config class does not have.
    """
    from transformers import AutoConfig

    kwargs = dict(tiny)
    model_type = kwargs.pop("model_type", "llama")
    try:
        config = AutoConfig.for_model(model_type)
    except ValueError:
        raise ConfigError(f"`model.tiny.model_type: {model_type}` is not a transformers model type; use e.g. llama, "
                          "qwen2, qwen3_moe, mixtral") from None
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    valid = fields | set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown key `model.tiny.{unknown[0]}`: `model.tiny` takes {type(config).__name__} arguments such as "
            "vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
            "num_key_value_heads, max_position_embeddings (and model_type)"
        )
    return AutoConfig.for_model(model_type, **kwargs)


def load_model_config(cfg: ModelConfig):
    """The model's ``PretrainedConfig`` without loading any weights (for early checks).

    Raises:
        ConfigError: no config can be read; with ``random_init``, ``name_or_path`` is not a
            directory holding ``config.json``.
    """
    if cfg.tiny is not None:
        return tiny_config(cfg.tiny)
    if cfg.random_init:
        _check_config_dir(cfg.name_or_path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"`model.name_or_path`: can't load a model config from {cfg.name_or_path!r}: {e}") from e


def _check_config_dir(path: str) -> None:
    """A random-init model needs a local directory with ``config.json`` (no hub download, no weights)."""
    p = Path(path)
    fix = "point `model.name_or_path` at a directory holding config.json (e.g. configs/models/llama3.1-8b)"
    if not p.is_dir():
        raise ConfigError(f"`model.name_or_path: {path}` is not a directory; `model.random_init: true` needs one: {fix}")
    if not (p / "config.json").is_file():
        raise ConfigError(f"`model.name_or_path: {path}` has no config.json, which `model.random_init: true` builds from: {fix}")


def _from_pretrained_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def _no_hf_progress_bars():
    """Hide transformers' own "Loading weights" / "Writing model shards" bars inside ours."""
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def build_model(cfg: ModelConfig, qcfg: QuantizationConfig, device: torch.device) -> nn.Module:
    """Instantiate the base model (weights real, on CPU unless 4-bit HF loading needs the device).

    A ``tiny`` model is built in float32 from the current torch seed and cast to ``cfg.dtype``.
    A ``random_init`` model is built from its ``config.json`` in ``cfg.dtype`` directly on
    ``device`` (see :func:`build_random_model`). A 4-bit HF model is loaded through transformers'
    ``BitsAndBytesConfig`` straight onto ``device``; a 4-bit tiny or random-init model is
    quantized later by :func:`quantize_linears_4bit`.
    """
    dtype = resolve_dtype(cfg.dtype)
    if cfg.random_init:
        model = build_random_model(load_model_config(cfg), dtype, device, cfg.attn_implementation)
    elif cfg.tiny is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(load_model_config(cfg))
        if dtype != "auto":
            model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {_from_pretrained_dtype_kwarg(): dtype, "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if qcfg.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=qcfg.bnb_4bit_quant_type,
                bnb_4bit_compute_dtype=dtype_from_str(qcfg.bnb_4bit_compute_dtype, "quantization.bnb_4bit_compute_dtype"),
                bnb_4bit_use_double_quant=qcfg.bnb_4bit_use_double_quant,
            )
            kwargs["device_map"] = {"": device}
        with _no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def build_random_model(config, dtype: torch.dtype | str, device: torch.device, attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_config(config)``: random weights from the current torch seed.

    The weights are allocated and initialised on ``device`` in ``dtype`` (``"auto"``: the config's
    own dtype, float32 if it names none), never on the CPU first: an 8B model initialises in
    seconds on a GPU instead of minutes on the host, and the host needs no 16 GB copy. Every
    rank seeded alike builds the same weights. The benchmarks build both arms with this function,
    so the same seed gives the same model.
    """
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {_from_pretrained_dtype_kwarg(): dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device), _no_hf_progress_bars():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.config.use_cache = False
    return model


def save_base_model(model: nn.Module, path: Path) -> None:
    """``save_pretrained`` into a temporary sibling directory, then rename it to ``path``.

    A crash mid-write leaves no half-written ``path``; an existing ``path`` is replaced. The files are
    flushed to disk before the rename, as a checkpoint's are.

    Raises:
        RunDirError: a write failed (disk full, not writable); the temporary directory is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with writing("the base model", path.parent, cleanup=tmp):
        fresh_dir(tmp)
        with _no_hf_progress_bars():
            model.save_pretrained(str(tmp))
        fsync_files(p for p in tmp.rglob("*") if p.is_file())
        replace_dir(tmp, path)


def prepare_model(cfg: RecipeConfig, device: torch.device, save_base_to: Path | None = None) -> tuple[nn.Module, str]:
    """Build the base, (save it,) quantize a tiny 4-bit base, patch LoRA, enable checkpointing.

    The model stays unwrapped (and, unless 4-bit or random-init, on the CPU): FSDP2 / DDP wrap it next.

    Args:
        cfg: The recipe.
        device: Where 4-bit weights are quantized.
        save_base_to: Write the unquantized, un-patched base here (``save_base_model``).

    Returns:
        (model, description): the patched model and a one-line summary for the log.

    Raises:
        ConfigError: the ``peft`` section selects no linear module of the model.
    """
    from automodel_lora import apply_lora_to_linear_modules
    from automodel_lora.adapter_slots import DEFAULT_ADAPTER_NAME

    model = build_model(cfg.model, cfg.quantization, device)
    if save_base_to is not None:
        save_base_model(model, save_base_to)
    qc = cfg.quantization
    if qc.load_in_4bit and (cfg.model.tiny is not None or cfg.model.random_init):
        quantize_linears_4bit(model, qc, device)
    names = list(cfg.data.adapters) if cfg.data.adapters else [None]
    states = _rng_states(model)
    try:
        for name in names:  # each adapter initialised as a run of its own would: the same RNG states
            _restore_rng_states(states)
            n_patched = apply_lora_to_linear_modules(model, cfg.peft, adapter_name=name or DEFAULT_ADAPTER_NAME)
    except ValueError as e:
        raise ConfigError(f"[peft] {e}") from e
    if name is not None:  # every adapter trains (named adapters beside the first are frozen by default)
        train_adapters(model, names)
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    desc = (
        f"{type(model).__name__}: LoRA on {n_patched} linear modules"
        + (f" x {len(names)} adapters ({', '.join(names)})" if names[0] else "")
        + f"; trainable {n_train:,} / {n_all:,} parameters ({100 * n_train / n_all:.3f}%)"
    )
    if qc.load_in_4bit:
        desc += f"; base 4-bit {qc.bnb_4bit_quant_type} (compute {qc.bnb_4bit_compute_dtype})"
    if cfg.model.gradient_checkpointing:
        desc += "; gradient checkpointing on"
    return model, desc


def _rng_states(model: nn.Module) -> dict:
    """The CPU generator's state and, where the model's weights are on a GPU (adapters are initialised there),
    that GPU's."""
    states = {"cpu": torch.get_rng_state()}
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    for device in devices:
        states[device] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng_states(states: dict) -> None:
    for device, state in states.items():
        if device == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, device)


def train_adapters(model: nn.Module, names: list[str]) -> None:
    """Make every adapter in ``names`` trainable on every module that has it."""
    from automodel_lora.adapter_slots import adapter_weights

    for weights in adapter_weights(model, names).values():
        for weight in weights:
            weight.requires_grad_(True)


def quantize_linears_4bit(model: nn.Module, qcfg: QuantizationConfig, device: torch.device) -> int:
    """Replace every ``nn.Linear`` except the output head with ``bnb.nn.Linear4bit`` on ``device``.

    Used for ``model.tiny`` and ``model.random_init`` (HF checkpoints are quantized by transformers
    at load time). The weights are quantized when moved to ``device``; returns how many layers were
    replaced.
    """
    import bitsandbytes as bnb

    heads = output_head_names(model)  # the same head that LoRA's match_all_linear leaves out
    compute_dtype = dtype_from_str(qcfg.bnb_4bit_compute_dtype, "quantization.bnb_4bit_compute_dtype")
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in heads]
    for name in targets:  # names, not modules: each full-precision weight is freed once replaced
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=qcfg.bnb_4bit_use_double_quant,
            quant_type=qcfg.bnb_4bit_quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data,
            requires_grad=False,
            compress_statistics=qcfg.bnb_4bit_use_double_quant,
            quant_type=qcfg.bnb_4bit_quant_type,
            module=q,
        )
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(device)  # quantizes
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    model.to(device)
    return len(targets)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (FSDP2 shards each one): classes named in the HF model's
    ``_no_split_modules``, falling back to the children of the largest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        return list(max(lists, key=len))
    return []
