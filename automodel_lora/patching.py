"""The classes modules are switched to in place: a subclass of (mixin, the module's own class).

`lora` switches adapted linears to (`LinearLoRA` or `TritonLinearLoRA`, their class) and `recompute`
switches gated MLPs to (`GatedMLPRecompute`, their class). Each pair's class is built once; it
pickles through its mixin's ``__reduce_ex__`` by the pair, so a fresh process builds it again.
"""

from __future__ import annotations

_SWAPPED: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, base: type, base_attr: str) -> type:
    """The subclass of (`mixin`, `base`), built once per pair and cached; `base_attr` holds `base` on it
    (what the mixin calls for the original behaviour, and what undoing the switch restores)."""
    key = (mixin, base)
    if key not in _SWAPPED:
        name = f"{mixin.__name__}_{base.__module__.replace('.', '_')}_{base.__name__}"
        cls = type(name, (mixin, base), {base_attr: base, "__module__": mixin.__module__})
        cls.__qualname__ = name
        _SWAPPED[key] = cls
    return _SWAPPED[key]


def is_swapped_class(cls: type) -> bool:
    """True for a class that `swapped_class` built."""
    return _SWAPPED.get(cls.__bases__) is cls
