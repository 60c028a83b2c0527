"""`modules_to_save`: whole modules (a classification head, the embedding) trained fully beside the adapters.

HF PEFT wraps each such module in a `ModulesToSaveWrapper` (a trainable copy beside the frozen original);
this library keeps the module in place (no wrapper, FQNs unchanged): `apply_lora_to_linear_modules` marks
it (`module._lora_module_to_save = True`) and makes its parameters trainable after freezing the model.
`lora_state_dict` / `save_adapter` then include its full state (parameters and persistent buffers) under
PEFT's on-disk keys, `base_model.model.<fqn>.<name>` (PEFT strips its `modules_to_save.default` part when
saving), and `load_adapter` copies such tensors of a PEFT adapter back into the module.

Matching: applying, an entry selects a module whose FQN equals it or ends with `"." + entry` (a plain name,
no glob). Loading a file, a non-LoRA key belongs to `modules_to_save` where a dotted prefix of it ends with
an entry (PEFT's `_set_trainable` rule: `key.endswith(entry)`).

Tied weights: a module to save whose parameter is shared with a module outside `modules_to_save` (e.g.
`lm_head` tied to `embed_tokens`) is refused: training it in place would change the other module too, and
a file holding only one side would load as half of what was trained. Name both modules (both are then
saved), or untie the weights first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

MARK = "_lora_module_to_save"


def entry_selects(entry: str, fqn: str) -> bool:
    """This library's rule: the FQN equals the entry or ends with `"." + entry`."""
    return fqn == entry or fqn.endswith("." + entry)


def marked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(fqn, module)` for every module `apply_lora_to_linear_modules` / `load_adapter` marked to save."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, MARK, False)]


def select_modules_to_save(model: nn.Module, entries: list[str], adapted: Iterable[str],
                           allow_unmatched: bool = False) -> list[tuple[str, nn.Module]]:
    """The modules `entries` select, checked (the model is not changed).

    Raises:
        ValueError: an entry selects no module (unless `allow_unmatched`), a selected module is, holds or
            lies inside a module that gets a LoRA adapter, or one of its parameters is tied to a module
            outside the selection.
    """
    if not entries:
        return []
    named = [(n, m) for n, m in model.named_modules() if n]
    selected = {}
    for entry in entries:
        hits = [(n, m) for n, m in named if entry_selects(entry, n)]
        if not hits and not allow_unmatched:
            raise ValueError(
                f"PeftConfig.modules_to_save entry {entry!r} matches no module of {type(model).__name__} "
                f"(a name matches a module's FQN or a dotted suffix, e.g. 'score', 'lm_head', 'embed_tokens'); "
                f"top-level modules are {[n for n, _ in model.named_children()]}. Fix or remove the entry, or "
                "set allow_unmatched_targets=True"
            )
        selected.update(hits)
    for name in adapted:
        for saved in selected:
            if name == saved or name.startswith(saved + ".") or saved.startswith(name + "."):
                raise ValueError(
                    f"module {saved!r} is in PeftConfig.modules_to_save and {name!r} gets a LoRA adapter; a module "
                    "is either trained fully or adapted, not both (HF PEFT refuses it too). Remove it from "
                    "target_modules (or add it to exclude_modules), or from modules_to_save"
                )
    _check_not_tied(model, selected)
    return sorted(selected.items())


def _check_not_tied(model: nn.Module, selected: dict[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    inside = lambda p: any(p.startswith(s + ".") for s in selected)  # noqa: E731
    for name, module in selected.items():
        for pname, param in module.named_parameters(prefix=name, remove_duplicate=False):
            outside = [o for o in owners.get(id(param), []) if not inside(o)]
            if outside:
                raise ValueError(
                    f"PeftConfig.modules_to_save selects {name!r}, whose {pname!r} is tied to {outside} (tied "
                    "weights); training it would change that module too, and saving only one side would load as "
                    "half of it. Add the other module to modules_to_save as well (both are saved), or untie the "
                    "weights first (e.g. model.config.tie_word_embeddings=False and clone the weight)"
                )


def mark_modules_to_save(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Mark the modules to save and make their parameters trainable."""
    for _, module in modules:
        setattr(module, MARK, True)
        module.requires_grad_(True)


def unmark_modules_to_save(model: nn.Module) -> int:
    """Drop every mark (their parameters keep their `requires_grad`). Returns the count."""
    marked = marked_modules(model)
    for _, module in marked:
        delattr(module, MARK)
    return len(marked)


def modules_to_save_state(model: nn.Module, full_tensor) -> dict[str, torch.Tensor]:
    """`{<fqn>.<name>: tensor}` of every marked module's state dict (parameters and persistent buffers)."""
    state = {}
    for fqn, module in marked_modules(model):
        for key, tensor in module.state_dict(prefix=f"{fqn}.", keep_vars=True).items():
            state[key] = full_tensor(tensor)
    return state


def module_to_save_of(key: str, entries: list[str] | None) -> str | None:
    """The module (outermost dotted prefix of `key`, a tensor key without PEFT's prefix) that a file's
    `modules_to_save` entries select by PEFT's rule (`prefix.endswith(entry)`), or None."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(entry) for entry in entries or ()):
            return prefix
    return None


def read_modules_to_save(path: str, value) -> list[str] | None:
    """An `adapter_config.json`'s `modules_to_save`, checked (duplicates dropped: PEFT's SEQ_CLS repeats names)."""
    from .adapter_format import AdapterFormatError

    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterFormatError(f"{path!r}: modules_to_save must be a list of module names or null, got {value!r}")
    return list(dict.fromkeys(value))


def check_saved_tensors(model: nn.Module, saved: dict[str, torch.Tensor], entries: list[str] | None,
                        source: str) -> list[tuple[str, nn.Module]]:
    """The modules that `saved` (`adapter_weights.read_adapter_file`'s tensors of `modules_to_save` modules) loads into, after
    checking that every key names a tensor of `model` of the same shape. Changes nothing.

    Raises:
        AdapterFormatError: a key names no parameter / buffer of the model, or a shape differs.
    """
    from .adapter_format import PEFT_KEY_PREFIX, AdapterFormatError

    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    targets = {}
    for key, tensor in saved.items():
        owner = module_to_save_of(key, entries)
        if key not in state or owner not in modules:
            raise AdapterFormatError(
                f"{source}: key {PEFT_KEY_PREFIX}{key} (of modules_to_save {entries!r}) names no parameter or buffer "
                f"of {type(model).__name__}; is this the adapter of another model?"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise AdapterFormatError(
                f"{source}: key {PEFT_KEY_PREFIX}{key} has shape {tuple(tensor.shape)}, the model's {key!r} has "
                f"{tuple(state[key].shape)}; is this the adapter of another model?"
            )
        targets[owner] = modules[owner]
    return sorted(targets.items())


@torch.no_grad()
def load_saved_tensors(model: nn.Module, saved: dict[str, torch.Tensor], modules, copy_into) -> None:
    """Copy `saved` into `model` (checked by `check_saved_tensors`, which gave `modules`) and mark those modules."""
    state = model.state_dict(keep_vars=True)
    for key, tensor in saved.items():
        copy_into(state[key], tensor)
    mark_modules_to_save(modules)
