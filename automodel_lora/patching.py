"""The classes modules are switched to in place: a subclass of (mixin, the module's own class).

`lora` switches adapted linears to (`FusedLinearLoRA` or `LinearLoRA`, their class) and `recompute`
switches gated MLPs to (`GatedMLPRecompute`, their class). Each pair's class is built once; an
instance pickles by the pair (`swapped_reduce`), so a fresh process builds the class again.
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


def swapped_reduce(obj, base_attr: str) -> tuple:
    """``obj.__reduce_ex__`` for an instance of a `swapped_class` class: rebuilt from its (mixin, base) pair,
    not looked up by the generated class's name, which a fresh process does not have."""
    mixin, base = type(obj).__bases__
    return new_swapped, (mixin, base, base_attr), obj.__dict__


def new_swapped(mixin: type, base: type, base_attr: str):
    """An empty instance of the (`mixin`, `base`) class; pickle then sets its state."""
    cls = swapped_class(mixin, base, base_attr)
    return cls.__new__(cls)
