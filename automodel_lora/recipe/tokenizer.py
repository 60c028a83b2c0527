"""Tokenizers for the recipe: a built-in byte-level tokenizer and a thin wrapper over HF ones.

Both expose the same small interface the data pipeline needs::

    encode(text) -> list[int]      # no special tokens
    decode(ids) -> str
    bos_token_id, eos_token_id, pad_token_id: int | None
    vocab_size: int                # 1 + the largest id the tokenizer can produce
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "build_tokenizer", "tokenizer_spec"]

# Any of these in a model directory means it ships a tokenizer of its own.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = <bos>, 257 = <eos>, 258 = <pad>.

    Needs no files and no download, so the quickstart runs anywhere. A model trained with it
    needs ``vocab_size >= 259``. To use it after training::

        from automodel_lora.recipe.tokenizer import ByteTokenizer
        tok = ByteTokenizer()
        ids = [tok.bos_token_id] + tok.encode("Once upon a time")
        text = tok.decode(generated_ids)
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps ``transformers.AutoTokenizer`` (a local directory works offline)."""

    def __init__(self, name_or_path: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.name = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.bos_token_id: int | None = self.tok.bos_token_id
        self.eos_token_id: int | None = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)


def tokenizer_spec(spec: str | None, model_cfg) -> str | None:
    """``data.tokenizer`` as the run uses it: ``byte`` for a ``model.random_init`` directory that
    ships no tokenizer (a model with random weights has learnt no vocabulary, so any tokenizer whose
    ids fit its ``vocab_size`` does); otherwise ``spec`` unchanged."""
    if spec is not None or not getattr(model_cfg, "random_init", False):
        return spec
    directory = Path(model_cfg.name_or_path)
    return None if any((directory / f).is_file() for f in _TOKENIZER_FILES) else "byte"


def build_tokenizer(spec: str | None, model_name_or_path: str | None, trust_remote_code: bool = False):
    """The recipe's tokenizer.

    Args:
        spec: ``byte``, a tokenizer directory, or None (use the model's directory).
        model_name_or_path: The model's directory, used when ``spec`` is None.
        trust_remote_code: Passed to ``AutoTokenizer.from_pretrained``.

    Raises:
        ConfigError: no tokenizer named, or none can be loaded from the directory.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = spec or model_name_or_path
    if path is None:
        raise ConfigError("no tokenizer: set `data.tokenizer` (`byte` or a tokenizer directory)")
    try:
        return HFTokenizer(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # transformers: no tokenizer files there, or an unknown kind
        key = "data.tokenizer" if spec else "model.name_or_path"
        raise ConfigError(
            f"`{key}`: can't load a tokenizer from {path!r} ({e}); set `data.tokenizer` to `byte` or a tokenizer directory"
        ) from e
