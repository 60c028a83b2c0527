"""LoRA on `nn.Embedding`: the embedding keeps its identity, its FQN and its weight.

`patch_embedding_module` reassigns an embedding's `__class__` to a subclass of (`EmbeddingLoRA`, its own
class), built once per pair, and registers two parameters beside the frozen table (HF PEFT's names and
shapes, so the state-dict keys are PEFT's on-disk keys less the `base_model.model.` prefix):

    lora_embedding_A: (r, num_embeddings), zero at init      lora_embedding_B: (embedding_dim, r), normal at init
    y = E[x] + s * A^T[x] B^T        s = alpha / r (alpha / sqrt(r) with rsLoRA)

The lookup `A^T[x]` is `F.embedding` with the base's `padding_idx`, `max_norm`, `norm_type`,
`scale_grad_by_freq` and `sparse`, as PEFT's `Embedding._embed` does: the adapter's padding column gets no
gradient (the base's padding row semantics), and with `max_norm` the looked-up columns of `A` are renormed in
place, as the base's rows are (on a copy when `lora_dtype` differs from the table's: the lookup runs in the
table's dtype). PEFT applies no dropout on embeddings and neither does this layer
(`lora_dropout` exists, with the configured `p`, only so the PEFT config writer reads the same attribute).
An embedding with an `embed_scale` (Gemma-style scaled embeddings) scales the adapter term too (PEFT's rule).

For the whole-model operations (merge, unmerge, the finite checks, the state dict) the adapter also reads as
a linear adapter on a weight stored `(in, out)`: `lora_A.weight` is `lora_embedding_A` `(r, in = num_embeddings)`,
`lora_B.weight` is `lora_embedding_B` `(out = embedding_dim, r)`, and `fan_in_fan_out` is True, so the merge
`W += (s B A)^T` is PEFT's `transpose(B @ A, True) * scaling`. Those views are read-only.

DoRA (`use_dora`, HF PEFT's `DoraEmbeddingLayer`): a magnitude `lora_magnitude_vector` `(embedding_dim,)` and
`y = m / ||E^T + s B A||_row * (E[x] + s A^T[x] B^T)`, the norm over the vocabulary per embedding dimension, detached
(`automodel_lora.dora.row_norms`: low-rank, no `(embedding_dim, num_embeddings)` tensor), on the fused kernel where
plain LoRA runs on it (the scale in its forward epilogue, `dm` recovered from the saved output), else the PyTorch
path. Not supported on embeddings: `lora_bias`, and a second named adapter on the same module.

`use_triton` (`lora_use_triton`, default True) runs the fused kernel of `kernels/embedding_lora.py` where
`use_kernels_for` holds (CUDA, or the CPU under `TRITON_INTERPRET=1`; fp32 / fp16 / bf16 tables and adapters):
one forward launch gathers E's row and A's column per token and writes `y` once, and the backward reduces `dA`
per id over sorted tokens (deterministic). A plain `nn.Embedding` forward is gathered in the kernel; a
subclass's own forward (Gemma's scaled embeddings) runs first and the kernel adds the adapter term to its output.
With DoRA the kernel applies `m / ||.||` per column as it writes `y`, the backward scales `dy` by it as it loads
`dy` and sums `dm` from the saved `y` (a subclass's forward is called again in backward only where some magnitude
is 0, after one host sync; do not modify a DoRA embedding's output in place before backward).
The PyTorch path runs with `max_norm` (its in-place renorm of A's columns) or `sparse`, with a table that
requires grad, under `torch.compile`, and where the kernels do not run.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraSettings
from .dora import MAGNITUDE, dora_scale, new_magnitude, row_norms
from .kernels.embedding_lora import embedding_lora
from .matcher import is_adaptable, is_conv1d
from .patching import is_swapped_class, swapped_class, swapped_reduce

EMBEDDING_A = "lora_embedding_A"
EMBEDDING_B = "lora_embedding_B"
# HF PEFT's `save_pretrained` also writes the full table of a targeted embedding (`save_embedding_layers="auto"`).
_TABLE_KEY = re.compile(r"^(?P<fqn>.+)\.base_layer\.weight$")


class _LinearView:
    """A read-only linear-adapter view of one embedding adapter matrix: `.weight` and `.bias` (always None)."""

    __slots__ = ("weight",)
    bias = None

    def __init__(self, weight: nn.Parameter):
        self.weight = weight

    def requires_grad_(self, flag: bool = True) -> _LinearView:
        self.weight.requires_grad_(flag)
        return self


class EmbeddingLoRA(nn.Embedding):
    """An `nn.Embedding` (or subclass) with a LoRA adapter: the fused kernel or the PyTorch path (module docstring).

    Modules get this class through `patch_embedding_module` (or `apply_lora_to_linear_modules` with the
    embedding named in `target_modules`).

    Attributes set by the patch:
        lora_embedding_A (nn.Parameter): `(r, num_embeddings)`, zero at init.
        lora_embedding_B (nn.Parameter): `(embedding_dim, r)`, standard normal at init.
        lora_dropout (nn.Dropout): unused in forward (PEFT applies no dropout on embeddings).
        lora_settings (LoraSettings): the adapter's settings.
        lora_merged (bool): whether the adapter is folded into the base weight (`merge_lora`).
        lora_use_triton (bool): the fused kernel where it runs (`patch_embedding_module`'s `use_triton`).
    """

    # The original class (set on each patched subclass); its forward computes the base lookup.
    _lora_base_cls: type[nn.Embedding] = nn.Embedding
    # The table is stored (num_embeddings, embedding_dim) = (in, out): merges fold (s B A)^T.
    fan_in_fan_out: bool = True
    lora_adapter_name: str = "default"
    lora_enabled: bool = True
    lora_use_triton: bool = True

    def __reduce_ex__(self, protocol):
        """Pickle by the (adapter class, original class) pair, as the linear layers do."""
        if not is_swapped_class(type(self)):
            return super().__reduce_ex__(protocol)
        return swapped_reduce(self, "_lora_base_cls")

    @property
    def lora_A(self) -> _LinearView:
        """`lora_embedding_A` read as a linear adapter's `lora_A` (`.weight` `(r, num_embeddings)`)."""
        return _LinearView(self._parameters[EMBEDDING_A])

    @property
    def lora_B(self) -> _LinearView:
        """`lora_embedding_B` read as a linear adapter's `lora_B` (`.weight` `(embedding_dim, r)`, no bias)."""
        return _LinearView(self._parameters[EMBEDDING_B])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen lookup alone, through the original class's forward."""
        return self._lora_base_cls.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(...) int64 -> (..., embedding_dim)`: base lookup plus the scaled adapter term."""
        if self.lora_merged or not self.lora_enabled:
            return self.base_forward(x)
        magnitude = self._parameters.get(MAGNITUDE)
        if self.lora_use_triton and self.max_norm is None and not self.sparse:
            # a plain embedding's lookup is gathered in the kernel; a subclass's forward runs first
            plain = self._lora_base_cls.forward is nn.Embedding.forward
            dora = {}
            if magnitude is not None:  # DoRA: f = m / ||E^T + s B A||_row applied in the kernel's epilogue
                dora = dict(magnitude=magnitude, weight_norm=row_norms(self, self.lora_A.weight, self.lora_B.weight,
                                                                       self.lora_settings.scale))
                if not plain:  # backward looks the base up again only where some f is 0
                    dora["recompute_base"] = lambda: self.base_forward(x)
            return embedding_lora(x, self.weight, self.lora_embedding_A, self.lora_embedding_B, self.lora_settings.scale,
                                  padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
                                  embed_scale=getattr(self, "embed_scale", None),
                                  base_out=None if plain else self.base_forward(x),
                                  fast_launch=self.lora_settings.kernels.fast_launch, **dora)
        out = self.base_forward(x)
        if magnitude is not None:  # DoRA: the direction's lookup, rescaled per dimension
            return dora_scale(self, out.dtype) * (out + self.lora_delta(x, out.dtype))
        return out + self.lora_delta(x, out.dtype)

    def lora_delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The adapter term alone, `s * A^T[x] B^T` `(..., embedding_dim)`, in `dtype` (the base output's)."""
        lora_A = self.lora_embedding_A.to(dtype)  # (r, V); the parameter itself when the dtypes agree
        lora_B = self.lora_embedding_B.to(dtype)  # (D, r)
        # PEFT's `_embed`: the base's lookup options, so padding and max_norm act on A's columns as on E's rows
        after_A = F.embedding(x, lora_A.t(), self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)  # (..., r)
        delta = (after_A @ lora_B.t()) * self.lora_settings.scale  # (..., D)
        embed_scale = getattr(self, "embed_scale", None)
        if embed_scale is not None:  # the base forward scaled its rows; PEFT scales the adapter the same
            delta = delta * (embed_scale.to(dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return delta

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """(Re-)initialise the adapter as PEFT does for embeddings: `A` zero, `B` standard normal."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def extra_repr(self) -> str:
        s = self.lora_settings
        return f"{super().extra_repr()}, dim={s.dim}, alpha={s.alpha}, merged={self.lora_merged}"


def is_embedding(module: nn.Module) -> bool:
    """True for an `nn.Embedding` (or subclass), adapted or not."""
    return isinstance(module, nn.Embedding)


def is_lora_target(module: nn.Module) -> bool:
    """True for a module that can carry an adapter: a linear or transformers `Conv1D` (`is_adaptable`), or an
    embedding (adapted only when named in `target_modules`)."""
    return is_adaptable(module) or is_embedding(module)


def adapter_features(module: nn.Module) -> tuple[int, int]:
    """`(in, out)` of the adapter `module` takes: `lora_A` is `(r, in)`, `lora_B` `(out, r)`. An embedding's
    `in` is `num_embeddings`, its `out` `embedding_dim`; a `Conv1D` stores its weight `(in, out)`."""
    if is_embedding(module):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def is_embedding_lora(module: nn.Module) -> bool:
    """True for an embedding that carries a LoRA adapter of this library."""
    return isinstance(module, EmbeddingLoRA)


def adapter_keys(module: nn.Module) -> tuple[str, str]:
    """The state-dict keys (less the module's FQN) of `module`'s `A` and `B`: PEFT's `lora_embedding_A` /
    `lora_embedding_B` (no `.weight`) for an embedding, `lora_A.weight` / `lora_B.weight` otherwise."""
    if is_embedding_lora(module):
        return EMBEDDING_A, EMBEDDING_B
    return "lora_A.weight", "lora_B.weight"


def patch_embedding_module(embedding: nn.Embedding, settings: LoraSettings | None = None, *, use_triton: bool = True,
                           **overrides: Any) -> nn.Embedding:
    """Give `embedding` a LoRA adapter in place and return the same object.

    Its class becomes a cached subclass of (`EmbeddingLoRA`, its own class), so `isinstance(m, nn.Embedding)`
    still holds and `weight` stays the same object (frozen); `lora_embedding_A` / `lora_embedding_B` are added
    on the weight's device in `lora_settings.lora_dtype` (default: the weight's dtype).

    Args:
        embedding: an `nn.Embedding` or subclass.
        settings: the adapter's `LoraSettings` (default: `LoraSettings()`).
        use_triton: the fused kernel where it runs (module docstring); False: the PyTorch path everywhere.
        **overrides: `LoraSettings` fields applied over `settings` (`dim=16, alpha=32, ...`).

    Raises:
        TypeError: `embedding` is not an `nn.Embedding`.
        ValueError: it already has an adapter, or the settings ask for `lora_bias`.
    """
    if not is_embedding(embedding):
        raise TypeError(f"patch_embedding_module needs an nn.Embedding (or subclass), got {type(embedding).__name__}")
    if is_embedding_lora(embedding):
        raise ValueError(
            f"this {embedding._lora_base_cls.__name__} already has a LoRA adapter (rank {embedding.lora_settings.dim}); "
            "call remove_lora(model) first to replace it"
        )
    settings = LoraSettings.resolve(settings, overrides, "patch_embedding_module")
    check_embedding_settings(settings, type(embedding).__name__, embedding)
    if settings.lora_dtype is None:
        settings = settings.replace(lora_dtype=embedding.weight.dtype)
    base_cls = type(embedding)
    for param in embedding.parameters(recurse=False):
        param.requires_grad_(False)
    device, dtype, dim = embedding.weight.device, settings.lora_dtype, settings.dim
    shapes = {EMBEDDING_A: (dim, embedding.num_embeddings), EMBEDDING_B: (embedding.embedding_dim, dim)}
    for name, shape in shapes.items():
        embedding.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    embedding.lora_dropout = nn.Dropout(p=settings.dropout)
    embedding.lora_settings = settings
    embedding.lora_merged = False
    embedding.lora_use_triton = bool(use_triton)
    embedding.__class__ = swapped_class(EmbeddingLoRA, base_cls, "_lora_base_cls")
    if device.type != "meta":  # a meta-built model is initialised by init_lora_weights after to_empty
        embedding.reset_lora_parameters()
    if settings.use_dora:  # ||E^T||_row: A starts at zero, so the adapter changes nothing
        embedding.register_parameter(MAGNITUDE, new_magnitude(embedding, dtype))
    return embedding


def check_embedding_settings(settings: LoraSettings, what: str, embedding: nn.Module | None = None) -> None:
    """Refuse the adapter kinds embeddings do not have (for `embedding`, if given, DoRA with `max_norm`).

    Raises:
        ValueError: `lora_bias` is set, or `use_dora` on an embedding with `max_norm` (the lookup renorms rows of
            the table in place, so the norm DoRA's magnitude was taken from keeps moving).
    """
    if settings.use_dora and embedding is not None and getattr(embedding, "max_norm", None) is not None:
        raise ValueError(
            f"use_dora=True on the embedding {what} with max_norm={embedding.max_norm}: its lookup renorms rows of the "
            "table in place, so DoRA's magnitude (the table's norms at patch time) would not match the table it "
            "scales; use plain LoRA there (use_dora=False) or an embedding without max_norm"
        )
    if settings.lora_bias:
        raise ValueError(
            f"lora_bias=True cannot be applied to the embedding {what}: embeddings take no lora_B bias (HF PEFT's "
            "embedding adapters have none either). Set lora_bias=False for it, e.g. leave the embedding out of "
            "target_modules, or use a separate PeftConfig without it"
        )


def check_embedding_selection(selected: list[tuple[str, nn.Module]], settings: LoraSettings, adapter_name: str,
                              first: bool) -> None:
    """Before a model is touched: the embeddings among `selected` can take adapter `adapter_name` with
    `settings` (no `lora_bias`, and the model's first adapter: named adapters are for linear modules only).

    Raises:
        ValueError: an embedding is selected with `lora_bias`, or as a second adapter.
    """
    embeddings = [name for name, module in selected if is_embedding(module)]
    modules = dict(selected)
    for name in embeddings:
        check_embedding_settings(settings, repr(name), modules[name])
    if embeddings and not first:
        raise ValueError(
            f"adapter {adapter_name!r} would be a second adapter on the embedding(s) {embeddings}; named adapters "
            "are supported on linear modules only. Leave the embeddings out of this adapter's target_modules, or "
            "remove_lora(model) and apply a single adapter"
        )


def init_holder(module: nn.Module, holder: nn.Module, linear_reset) -> None:
    """(Re-)initialise one adapter `holder` of `module`: an embedding's own rule, else `linear_reset(holder)`."""
    if is_embedding_lora(module):
        module.reset_lora_parameters()
    else:
        linear_reset(holder)


def unpatch_parameters(module: nn.Module) -> None:
    """Take the embedding adapter's parameters off `module` (nothing for a linear)."""
    for name in (EMBEDDING_A, EMBEDDING_B):
        module._parameters.pop(name, None)


def embedding_table_of(key: str) -> str | None:
    """The FQN whose full embedding table `key` (PEFT's prefix stripped) is, as PEFT writes it beside the adapter
    of a targeted embedding (`<fqn>.base_layer.weight`), or None for any other key."""
    match = _TABLE_KEY.match(key)
    return None if match is None else match["fqn"]


def check_embedding_tables(model: nn.Module, tables: dict[str, torch.Tensor], pairs: dict, path: str) -> None:
    """PEFT's saved embedding tables must be the model's own: the adapter is loaded onto this model's table, which
    is not replaced (it may be tied to the output head). Changes nothing.

    Raises:
        ValueError: a table of a module the file has no embedding adapter for, or one that differs from the model's
            (a resized or retrained vocabulary).
    """
    modules = dict(model.named_modules())
    for fqn, table in tables.items():
        module = modules.get(fqn)
        if fqn not in pairs or not is_embedding(module):
            raise ValueError(
                f"{path}: key {fqn}.base_layer.weight is not the table of an embedding the file adapts; only LoRA "
                "adapters (and PEFT's copy of an adapted embedding's table) can be loaded"
            )
        weight = module.weight.detach()
        if tuple(weight.shape) != tuple(table.shape) or not torch.equal(weight.cpu(), table.to(weight.dtype)):
            raise ValueError(
                f"{path}: PEFT saved the table of {fqn!r} ({tuple(table.shape)}), and it differs from the model's "
                f"({tuple(weight.shape)}): the adapter was trained on another vocabulary or table. Load it onto the "
                "base model it was trained with (resize / load that table first), then load the adapter"
            )
