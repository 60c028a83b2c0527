"""Several named adapters on one adapted module: the active one in place, the others beside it.

An adapted module holds one adapter in place: `lora_A`, `lora_B`, `lora_dropout`, `lora_settings`,
named by `lora_adapter_name` (`"default"`, HF PEFT's name, unless given another). Its other adapters
live in the `lora_inactive` `nn.ModuleDict`, one `InactiveAdapter` per name with the same four
attributes, so their tensors are in the model's state dict where a user looks for them:

    q_proj.lora_A.weight                       the adapter in place (the active one)
    q_proj.lora_inactive.french.lora_A.weight  adapter "french" of q_proj, not in use

A module with one adapter has no `lora_inactive` at all: its state dict is the one-adapter layout.
Switching adapters exchanges the submodules between the place and `lora_inactive` (no tensor is
copied), so an optimizer that holds the parameters keeps its state for each of them.

The place holds the model's active adapter wherever the module has it; a module without the
active adapter keeps the one it had in place with `lora_enabled = False` (base output only). The
per-module `lora_A` / `lora_B` / `lora_dropout` / `lora_settings` are stored as `K` separate
adapters so that a later step can stack them into `(K, r, in)` / `(K, out, r)` buffers.

A DoRA adapter also has its magnitude, the parameter `lora_magnitude_vector` (`q_proj.lora_magnitude_vector`,
`q_proj.lora_inactive.french.lora_magnitude_vector`); it moves with the rest of its adapter. A plain LoRA adapter
has no such parameter (registered as None on a holder that held a DoRA adapter before, which no state dict shows).
"""

from __future__ import annotations

from torch import nn

from .config import LoraSettings
from .dora import MAGNITUDE, magnitude_of
from .embedding_lora import is_embedding, patch_embedding_module
from .lora import LinearLoRA, is_lora_module, lora_modules, new_adapter_parts, patch_linear_module

DEFAULT_ADAPTER_NAME = "default"
INACTIVE = "lora_inactive"
# What an adapter is made of, on the adapted module and on an `InactiveAdapter` alike.
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_dropout")


class InactiveAdapter(nn.Module):
    """An adapter of a module that is not in place: `lora_A`, `lora_B`, `lora_dropout`, `lora_settings`, as on
    the adapted module itself, plus the module's `fan_in_fan_out` (read by the PEFT config writer)."""

    def __init__(self, parts: dict, fan_in_fan_out: bool):
        super().__init__()
        for attr in ADAPTER_PARTS:
            setattr(self, attr, parts[attr])
        self.register_parameter(MAGNITUDE, parts.get(MAGNITUDE))
        self.lora_settings: LoraSettings = parts["lora_settings"]
        self.fan_in_fan_out = fan_in_fan_out

    def extra_repr(self) -> str:
        s = self.lora_settings
        return f"dim={s.dim}, alpha={s.alpha}"


def check_adapter_name(name) -> str:
    """`name` if it can name an adapter (a key of `lora_inactive` and a directory name), else ValueError."""
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.startswith("_"):
        raise ValueError(
            f"adapter_name={name!r} cannot name an adapter: use a non-empty string without '.' or '/' that does "
            "not start with '_' (it becomes a state-dict key and a directory name), e.g. 'default' or 'french'"
        )
    return name


def holders(module: LinearLoRA) -> dict[str, nn.Module]:
    """`{name: holder}` for every adapter of `module`: the module itself for the one in place, an
    `InactiveAdapter` for each other; each holder has `lora_A`, `lora_B`, `lora_dropout`, `lora_settings` (and a
    DoRA adapter its magnitude, `dora.magnitude_of(holder)`)."""
    out = {module.lora_adapter_name: module}
    inactive = module._modules.get(INACTIVE)
    if inactive is not None:
        out.update(inactive.items())
    return out


def holder_of(module: LinearLoRA, name: str) -> nn.Module | None:
    """The holder of adapter `name` of `module` (see `holders`), or None if the module has no such adapter."""
    return holders(module).get(name)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of every adapter of `model`, in the order first seen (the adapter in place first)."""
    names: dict[str, None] = {}
    for _, module in lora_modules(model):
        names.update(dict.fromkeys(holders(module)))
    return list(names)


def adapter_weights(model: nn.Module, names: list[str]) -> dict[str, list]:
    """{name: the trainable tensors of adapter `name` on every module of `model` that has it: `lora_A` / `lora_B`
    weights, and where the adapter has them `lora_B`'s bias (`lora_bias`) and the DoRA magnitude}."""
    out = {name: [] for name in names}
    for _, module in lora_modules(model):
        for name in names:
            holder = holder_of(module, name)
            if holder is not None:
                extra = [t for t in (holder.lora_B.bias, magnitude_of(holder)) if t is not None]
                out[name] += [holder.lora_A.weight, holder.lora_B.weight, *extra]
    return out


def adapter_part_ids(model: nn.Module) -> set[int]:
    """`id`s of the adapters' own linears (`lora_A`, `lora_B` of every adapter, in place or not), which
    target matching must never select."""
    return {id(getattr(h, part)) for _, m in lora_modules(model) for h in holders(m).values()
            for part in ("lora_A", "lora_B")}


def add_inactive(module: LinearLoRA, name: str, settings: LoraSettings) -> InactiveAdapter:
    """Give `module` another adapter `name`, initialised, frozen, not in use. The module must not have it."""
    inactive = module._modules.get(INACTIVE)
    if inactive is None:
        inactive = module.lora_inactive = nn.ModuleDict()
    entry = InactiveAdapter(new_adapter_parts(module, settings), module.fan_in_fan_out)
    entry.requires_grad_(False)
    inactive[name] = entry
    return entry


def put_in_place(module: LinearLoRA, name: str) -> None:
    """Exchange adapter `name` (in `lora_inactive`) with the one in place; the tensors move by reference."""
    inactive = module._modules[INACTIVE]
    entry = inactive[name]
    for attr in ADAPTER_PARTS:
        mine, theirs = getattr(module, attr), getattr(entry, attr)
        setattr(module, attr, theirs)
        setattr(entry, attr, mine)
    mine, theirs = magnitude_of(module), magnitude_of(entry)  # DoRA's magnitude (None for plain LoRA)
    module.register_parameter(MAGNITUDE, theirs)
    entry.register_parameter(MAGNITUDE, mine)
    module.lora_settings, entry.lora_settings = entry.lora_settings, module.lora_settings
    old_name = module.lora_adapter_name
    del inactive[name]
    inactive[old_name] = entry
    entry.requires_grad_(False)  # an adapter out of place never trains (DDP would wait for its gradients)
    module.lora_adapter_name = name


def drop_inactive(module: LinearLoRA, name: str) -> None:
    """Delete `module`'s adapter `name` from `lora_inactive` (and `lora_inactive` itself once empty)."""
    inactive = module._modules[INACTIVE]
    del inactive[name]
    if not len(inactive):
        del module.lora_inactive


# Set on every adapted module for the duration of `disable_adapter`: switching or adding adapters inside it
# would be undone by the block's exit, so those calls refuse while it is there.
DISABLED_BLOCK = "_lora_disabled_block"


def check_not_in_disabled_block(modules, verb: str) -> None:
    """Raise if `disable_adapter` is active on any of `modules` (`(fqn, module)` pairs)."""
    if any(DISABLED_BLOCK in m.__dict__ for _, m in modules):
        raise ValueError(f"cannot {verb} inside `with disable_adapter(model):`; leave the block first (on exit it "
                         "puts back what each module computed before it)")


def set_in_use(module: LinearLoRA, enabled: bool) -> None:
    """Whether the adapter in place takes part in forward; its parameters train exactly when it does (HF PEFT's
    `set_adapter` does the same)."""
    module.lora_enabled = enabled
    for attr in ("lora_A", "lora_B"):
        getattr(module, attr).requires_grad_(enabled)
    magnitude = magnitude_of(module)
    if magnitude is not None:
        magnitude.requires_grad_(enabled)


def adapter_holders(model: nn.Module, name: str | None = None) -> tuple[str, list[tuple[str, nn.Module]]]:
    """`(name, [(fqn, holder), ...])` for adapter `name` of `model`: every module that has it, with the holder of
    its tensors (see `holders`). `name=None` means the model's only adapter, or else the one in use.

    Raises:
        ValueError: the model has no adapter `name`, or `name` is None and several adapters are there with
            none in use (inside `disable_adapter`).
    """
    names = adapter_names(model)
    if name is None and len(names) <= 1:
        return (names[0] if names else DEFAULT_ADAPTER_NAME), lora_modules(model)
    if name is None:
        in_use = {m.lora_adapter_name for _, m in lora_modules(model) if m.lora_enabled}
        if len(in_use) != 1:
            raise ValueError(f"the model has the adapters {names} and {'none' if not in_use else 'several'} in use; "
                             "name one with adapter_name=")
        name = in_use.pop()
    elif name not in names:
        raise ValueError(f"the model has no adapter named {name!r}; it has {names or 'none'}")
    return name, [(fqn, h) for fqn, m in lora_modules(model) if (h := holder_of(m, name)) is not None]


def attach_adapter(module: nn.Module, name: str, settings: LoraSettings, use_triton: bool, in_use: bool) -> None:
    """Give `module` adapter `name`, which it must not have: patch it (a plain linear), or add it beside the
    module's adapters. With `in_use` (`name` is the model's adapter in use) the module computes with it; else it
    keeps what it computed (a freshly patched module: its base alone)."""
    if is_lora_module(module):
        add_inactive(module, name, settings)
        if in_use:
            put_in_place(module, name)
            set_in_use(module, True)
        return
    patch = patch_embedding_module if is_embedding(module) else patch_linear_module
    patch(module, settings, use_triton=use_triton)
    if name != DEFAULT_ADAPTER_NAME:
        module.lora_adapter_name = name
    if not in_use:
        set_in_use(module, False)
