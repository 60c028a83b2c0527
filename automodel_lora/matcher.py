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
- `exclude_modules` (same syntax) always wins over a target. Given alone (no
  targets, no `match_all_linear`) it means, as in NeMo AutoModel, every linear
  layer except the excluded ones and the output heads.
- `match_all_linear` takes every linear layer except the output heads (see
  `output_head_names`: `lm_head`, `get_output_embeddings()`, and the task heads
  `score`, `classifier`, `qa_outputs` with everything inside them). A head named
  in `target_modules` is adapted.
- `layers_to_transform` / `layers_pattern` (HF PEFT's) keep only modules inside
  the listed layers: the layer index is the first number that follows a
  `<layers_pattern>.` component (`model.layers.3.mlp.up_proj` -> 3 with
  `layers_pattern="layers"`); with no `layers_pattern`, the first number that
  follows any component after the first. A module with no such index is not
  selected.
- `target_modules` given as one string is one pattern; None means no entries.
- Only linear layers (`nn.Linear` and its subclasses, bitsandbytes' included,
  and transformers' `Conv1D` of GPT-2-style models, weight stored `(in, out)`)
  are adapted, and `nn.Embedding`s that a `target_modules` entry selects (plain
  name, glob or regex; `match_all_linear` and exclude-only configs never take
  them). A plain name that lands on another kind of module is an error;
  a wildcard pattern simply skips the other modules.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
import sys
from collections.abc import Iterable

from torch import nn

_GLOB_CHARS = set("*?[")
_REGEX_PREFIXES = (".*", ".+", "^")
_REGEX_ONLY_CHARS = set("\\$|(+{")

# Task heads that `match_all_linear` (and exclude-only configs) leave out, with everything inside them:
# causal LM, sequence classification (Llama-style `score`, BERT-style `classifier`), token
# classification and question answering.
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


class ModuleMatcher:
    """Selects modules by FQN; see the module docstring for the rules.

    Args:
        target_modules: names or patterns to adapt.
        exclude_modules: names or patterns never adapted (wins over targets).
        match_all_linear: select every linear layer except `head_names`. Implied when only
            `exclude_modules` is given.
        head_names: FQNs of the model's output head(s) and the modules inside them, skipped by
            `match_all_linear` (`output_head_names(model)` gives them).
        layers_to_transform: layer indices (an int or a list); None or empty: every layer.
        layers_pattern: name(s) of the module list holding the layers (`"layers"`, `"h"`).

    A single string for `target_modules` / `exclude_modules` is one pattern; None is no pattern.
    """

    def __init__(
        self,
        target_modules: Iterable[str] | str | None = (),
        exclude_modules: Iterable[str] | str | None = (),
        match_all_linear: bool = False,
        head_names: Iterable[str] = (),
        layers_to_transform: int | Iterable[int] | None = None,
        layers_pattern: str | Iterable[str] | None = None,
    ):
        self.target_modules = _as_list(target_modules, "target_modules")
        self.exclude_modules = _as_list(exclude_modules, "exclude_modules")
        for pattern in (*self.target_modules, *self.exclude_modules):
            validate_pattern(pattern)
        self.match_all_linear = match_all_linear or (bool(self.exclude_modules) and not self.target_modules)
        self.head_names = set(head_names)
        self.layers_to_transform = layers_to_transform
        self.layers_pattern = layers_pattern

    def match(self, module: nn.Module, name: str | None) -> bool:
        """True if `module` (at FQN `name`; None is taken as the root's name `""`) should get an adapter.

        Raises:
            ValueError: a plain target name selects a module that is not linear.
        """
        name = "" if name is None else name
        if any(name_matches(pattern, name) for pattern in self.exclude_modules):
            return False
        if not in_layers(name, self.layers_to_transform, self.layers_pattern):
            return False
        if self.match_all_linear:
            return is_adaptable(module) and name not in self.head_names
        for pattern in self.target_modules:
            if not name_matches(pattern, name):
                continue
            if is_adaptable(module) or isinstance(module, nn.Embedding):  # embeddings only when named
                return True
            if is_plain_name(pattern):
                raise ValueError(
                    f"target_modules entry {pattern!r} selects {name!r}, a {type(module).__name__}, "
                    "which is not a linear layer; only nn.Linear (bitsandbytes Linear4bit too), transformers "
                    "Conv1D and nn.Embedding can be adapted. "
                    "Name its linear children instead (e.g. 'q_proj') or add it to exclude_modules"
                )
        return False


def _as_list(value, what: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} entries must be non-empty strings (module names or patterns), got {item!r}")
    return items


def layer_index(name: str, layers_pattern: str | Iterable[str] | None = None) -> int | None:
    """HF PEFT's layer index of the module `name` (`check_target_module_exists`): the first number that
    follows a `<layers_pattern>.` component, or with no `layers_pattern` the first number that follows a
    component after the first (`model.layers.3.mlp` -> 3); None where there is none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def in_layers(name: str, layers_to_transform: int | Iterable[int] | None,
              layers_pattern: str | Iterable[str] | None = None) -> bool:
    """Whether `name` lies in one of `layers_to_transform` (always True when that is None or empty)."""
    if layers_to_transform is None or (not isinstance(layers_to_transform, int) and len(layers_to_transform) == 0):
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def pattern_key(patterns: Iterable[str], fqn: str) -> str | None:
    """HF PEFT's `rank_pattern` / `alpha_pattern` lookup (`get_pattern_key`): the first key that, as a regex,
    matches the FQN or a dotted suffix of it (`re.match(rf"(.*\\.)?({key})$", fqn)`), or None."""
    for key in patterns:
        if pattern_key_regex(key).match(fqn):
            return key
    return None


@functools.cache
def pattern_key_regex(key: str) -> re.Pattern:
    """The regex a `rank_pattern` / `alpha_pattern` key stands for (`(.*\\.)?(key)$`).

    Raises:
        re.error: the key is not a valid regular expression.
    """
    return re.compile(rf"(.*\.)?({key})$")


def near_misses(entry: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Module names (last components, and dotted suffixes as long as `entry`) closest to `entry` by edit
    distance, best first; for the "did you mean" of a target that matched nothing."""
    depth = entry.count(".") + 1
    candidates = set()
    for name in names:
        parts = name.split(".")
        candidates.add(parts[-1])
        if len(parts) >= depth:
            candidates.add(".".join(parts[-depth:]))
    stripped = entry.strip("*.^$")
    return difflib.get_close_matches(stripped, sorted(candidates), n=n, cutoff=0.6)


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
    """FQNs of the model's output heads and of every module inside them.

    A head is the module `get_output_embeddings()` returns, or any module whose last name component
    is one of `HEAD_NAMES` (`lm_head`; `score` and `classifier` of `*ForSequenceClassification`,
    `classifier` of `*ForTokenClassification`; `qa_outputs` of `*ForQuestionAnswering`), so a head
    built of several layers (RoBERTa's `classifier.dense` / `classifier.out_proj`) is left out whole.
    """
    named = list(model.named_modules())
    heads = {name for name, _ in named if name.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        heads |= {name for name, m in named if m is head}
    return {name for name, _ in named if any(name == h or name.startswith(h + ".") for h in heads)}


def conv1d_class() -> type | None:
    """transformers' `Conv1D`, or None where transformers is not imported (then no module can be one);
    transformers is never imported here."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers `Conv1D` (or subclass): a linear layer whose weight is stored `(in, out)`."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_adaptable(module: nn.Module) -> bool:
    """True for a module `patch_linear_module` accepts: an `nn.Linear` (or subclass) or a transformers `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
