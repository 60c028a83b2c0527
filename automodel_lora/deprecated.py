"""Deprecated attribute names of an adapted module: `lora_dim`, `lora_alpha`, ... from before one
`LoraSettings` object (`module.lora_settings`) held the adapter's settings.

Old pickles still carry them (`LinearLoRA.__setstate__` rebuilds the settings from `LEGACY_ATTRIBUTES`),
and old code may still read them: `LinearLoRA` keeps each as a read-only `DeprecatedAlias`.
"""

from __future__ import annotations

import warnings

# Old attribute name -> `LoraSettings` field.
LEGACY_ATTRIBUTES = {
    "lora_dim": "dim",
    "lora_alpha": "alpha",
    "lora_scale": "scale",
    "lora_use_rslora": "use_rslora",
    "lora_dropout_position": "dropout_position",
    "lora_A_init_method": "lora_A_init",
}

# The legacy names read so far in this process: each warns once (a training loop reading one per step
# would otherwise warn every step).
LEGACY_WARNED: set[str] = set()


class DeprecatedAlias:
    """A read-only class attribute standing for `lora_settings.<field>` under its old name; the first read of
    each name in the process warns `DeprecationWarning`. Code of this package reads `lora_settings` only."""

    def __init__(self, field: str):
        self.field = field
        self.__doc__ = f"Deprecated alias of `lora_settings.{field}`."

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        if self.name not in LEGACY_WARNED:
            LEGACY_WARNED.add(self.name)
            warnings.warn(f"{self.name} is deprecated; read module.lora_settings.{self.field} instead (the adapter's "
                          "settings are one LoraSettings object)", DeprecationWarning, stacklevel=2)
        return getattr(module.lora_settings, self.field)

    def __set__(self, module, value) -> None:
        raise AttributeError(f"{self.name} is read-only (and deprecated): the adapter's settings are the frozen "
                             f"module.lora_settings; build new ones with lora_settings.replace({self.field}=...)")
