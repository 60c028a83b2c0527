"""`ModuleMatcher`: decides which modules of a model get an adapter.

Rules (FQN = the name `model.named_modules()` gives, e.g.
`model.layers.0.self_attn.q_proj`):

- A plain name matches the full FQN or any dotted suffix of it: `q_proj` and
  `self_attn.q_proj` both match `model.layers.0.self_attn.q_proj`, `proj` does not.
- A pattern with glob wildcards (`*`, `?`, `[...]`) matches the whole FQN:
  `*_proj`, `*.layers.[0-3].*`, `model.layers.1.*` (layer 1 only, not 10-19).
- A pattern that reads as a regular expression is a full-match regex instead
  (each pattern has exactly one meaning): one that starts with `.*`, `.+` or `^`,
  or contains `\\`, `$`, `|`, `(`, `+` or `{`. So the regex-style patterns of NeMo
  recipes (`.*fc.*`, `.*\\.layers\\.1\\..*`) keep working.
- `exclude_modules` (same syntax) always wins over a target.
- `match_all_linear` takes every linear layer except the output head(s).
- Only linear layers (`nn.Linear` and its subclasses, bitsandbytes' included)
  are adapted. A plain name that lands on another kind of module is an error;
  a wildcard pattern simply skips non-linear modules.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable

from torch import nn

_GLOB_CHARS = set("*?[")
_REGEX_PREFIXES = (".*", ".+", "^")
_REGEX_ONLY_CHARS = set("\\$|(+{")


class ModuleMatcher:
    """Selects modules by FQN; see the module docstring for the rules.

    Args:
        target_modules: names or patterns to adapt.
        exclude_modules: names or patterns never adapted (wins over targets).
        match_all_linear: select every linear layer except `head_names`.
        head_names: FQNs of the model's output head(s), skipped by `match_all_linear`.
    """

    def __init__(
        self,
        target_modules: Iterable[str] = (),
        exclude_modules: Iterable[str] = (),
        match_all_linear: bool = False,
        head_names: Iterable[str] = (),
    ):
        self.target_modules = list(target_modules)
        self.exclude_modules = list(exclude_modules)
        for pattern in (*self.target_modules, *self.exclude_modules):
            validate_pattern(pattern)
        self.match_all_linear = match_all_linear
        self.head_names = set(head_names)

    def match(self, module: nn.Module, name: str) -> bool:
        """True if `module` (at FQN `name`) should get an adapter.

        Raises:
            ValueError: a plain target name selects a module that is not linear.
        """
        if any(name_matches(pattern, name) for pattern in self.exclude_modules):
            return False
        if self.match_all_linear:
            return isinstance(module, nn.Linear) and name not in self.head_names
        for pattern in self.target_modules:
            if not name_matches(pattern, name):
                continue
            if isinstance(module, nn.Linear):
                return True
            if is_plain_name(pattern):
                raise ValueError(
                    f"target_modules entry {pattern!r} selects {name!r}, a {type(module).__name__}, "
                    "which is not a linear layer; only nn.Linear (and bitsandbytes Linear4bit) can be adapted. "
                    "Name its linear children instead (e.g. 'q_proj') or add it to exclude_modules"
                )
        return False


def is_regex(pattern: str) -> bool:
    """A pattern written as a regular expression (see the module docstring)."""
    return pattern.startswith(_REGEX_PREFIXES) or bool(_REGEX_ONLY_CHARS & set(pattern))


def is_plain_name(pattern: str) -> bool:
    """A pattern with no glob or regex syntax: matched as a FQN or dotted FQN suffix."""
    return not (_GLOB_CHARS & set(pattern)) and not is_regex(pattern)


def validate_pattern(pattern: str) -> None:
    """Check a target/exclude entry before any model is touched.

    Raises:
        ValueError: a regex-style pattern that is not a valid regular expression.
    """
    if is_regex(pattern):
        _compiled_regex(pattern)


@functools.cache
def _compiled_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"pattern {pattern!r} reads as a regular expression but does not compile ({e}); "
            "fix it, or write a glob such as '*.q_proj'"
        ) from e


def name_matches(pattern: str, fqn: str) -> bool:
    """Whether one target/exclude entry selects the module named `fqn`.

    Raises:
        ValueError: a regex-style pattern that is not a valid regular expression.
    """
    if is_regex(pattern):
        return _compiled_regex(pattern).fullmatch(fqn) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(fqn, pattern)
    return fqn == pattern or fqn.endswith("." + pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """FQNs of the model's output head: `lm_head` or whatever `get_output_embeddings()` returns."""
    names = {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {name for name, m in model.named_modules() if m is head}
    return names
