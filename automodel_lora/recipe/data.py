"""JSONL -> token blocks -> deterministic, resumable, rank-sharded micro-batches.

Records are ``{"text": ...}`` (every token is a target) or ``{"prompt": ..., "completion": ...}``
(only completion tokens are targets; prompt positions get label -100). With ``packing`` the
tokenized examples are concatenated into one stream and cut into ``seq_len`` blocks (labels
travel with their tokens, so completion-only masking survives packing); without it every
example is one sequence, truncated to ``seq_len`` and right-padded per batch.

The sample order is a pure function of (seed, epoch): the optimizer step ``t`` reads global
samples ``perm_epoch[(t % steps_per_epoch) * G : ... + G]`` with G = global batch. Resuming at step
``t`` therefore needs only ``t``, and the same global batch is seen whatever the world size, so
1 process with ``batch_size=4`` and 2 processes with ``batch_size=2`` train on identical data.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, DataConfig, read_utf8_file

__all__ = ["Example", "load_jsonl", "tokenize_records", "build_datasets", "StepSampler", "collate", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def load_jsonl(path: str | Path, what: str = "data.path") -> list[dict]:
    """Read a JSONL file: one JSON object per non-blank line (UTF-8, an optional BOM).

    Lines end at ``\n``, ``\r\n`` or ``\r`` (as Python's text files split them); a line
    separator inside a JSON string (U+2028) does not end a record.

    Raises:
        ConfigError: a missing or unreadable file, or no records; bytes that are not UTF-8, a line
            that is not JSON, is nested too deep or is not an object (naming the file and 1-based line).
    """
    text = read_utf8_file(path, f"`{what}`: file not found: {path}", f"`{what}`: can't read {path}")
    text = text.removeprefix("\ufeff")
    records = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):
        line = line.strip()
        if line:
            records.append(_parse_record(line, path, lineno))
    if not records:
        raise ConfigError(f"`{what}`: dataset is empty: {path} has no records")
    return records


def _parse_record(line: str, path: str | Path, lineno: int) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    except RecursionError as e:  # json's decoder recurses once per nesting level
        raise ConfigError(
            f"{path}:{lineno}: JSON nested too deep to read (beyond Python's recursion limit); "
            "each record needs only `text` or `prompt` and `completion` strings"
        ) from e
    if not isinstance(rec, dict):
        raise ConfigError(f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}")
    return rec


def _detect_format(records: list[dict], cfg: DataConfig, path: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    first = records[0]
    if cfg.text_field in first:
        return "text"
    if cfg.prompt_field in first and cfg.completion_field in first:
        return "prompt_completion"
    raise ConfigError(
        f"{path}:1: can't tell the format: expected a `{cfg.text_field}` field, or "
        f"`{cfg.prompt_field}` and `{cfg.completion_field}`; the record has {sorted(first)}"
    )


def tokenize_records(records: list[dict], tokenizer, cfg: DataConfig, path: str = "<data>") -> list[Example]:
    """Tokenize records into examples (labels -100 where there is no loss)."""
    fmt = _detect_format(records, cfg, path)
    bos = [tokenizer.bos_token_id] if cfg.add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for i, rec in enumerate(records, 1):
        if fmt == "text":
            text = rec.get(cfg.text_field)
            if not isinstance(text, str):
                raise ConfigError(f"{path}: record {i} has no string `{cfg.text_field}` field (keys: {sorted(rec)})")
            ids = bos + _encode(tokenizer, text, path, i) + eos
            labels = list(ids)
        else:
            prompt, completion = rec.get(cfg.prompt_field), rec.get(cfg.completion_field)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ConfigError(
                    f"{path}: record {i} needs string `{cfg.prompt_field}` and `{cfg.completion_field}` fields "
                    f"(keys: {sorted(rec)})"
                )
            p_ids = bos + _encode(tokenizer, prompt, path, i)
            c_ids = _encode(tokenizer, completion, path, i) + eos
            ids = p_ids + c_ids
            labels = [IGNORE_INDEX] * len(p_ids) + list(c_ids)
        if len(ids) >= 2:
            out.append(Example(ids, labels))
    return out


def _encode(tokenizer, text: str, path: str, i: int) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UnicodeEncodeError as e:  # JSON can escape a lone surrogate ("\ud800"), which no encoding writes
        raise ConfigError(
            f"{path}: record {i} holds {text[e.start : e.end]!r}, an unpaired UTF-16 surrogate escape that is "
            "no character; fix or remove that escape"
        ) from e


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate and cut into full ``seq_len`` blocks; a final partial block is dropped
    unless it is the only one."""
    ids, labels = [], []
    for ex in examples:
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
    blocks = [Example(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not blocks and len(ids) >= 2:
        blocks = [Example(ids, labels)]
    return blocks


def truncate(examples: list[Example], seq_len: int) -> list[Example]:
    return [Example(ex.input_ids[:seq_len], ex.labels[:seq_len]) for ex in examples]


def _has_targets(ex: Example) -> bool:
    # A label at position 0 is never predicted (nothing precedes it).
    return any(lab != IGNORE_INDEX for lab in ex.labels[1:])


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[list[Example], list[Example], dict]:
    """Load, split, tokenize and pack/truncate.

    Returns:
        (train, validation, info): lists of Examples (validation may be empty) and counts.

    Raises:
        ConfigError: missing or malformed file, or nothing left to train on.
    """
    records = load_jsonl(cfg.path, "data.path")
    val_records: list[dict] = []
    if cfg.validation_path:
        val_records = load_jsonl(cfg.validation_path, "data.validation_path")
    elif cfg.validation_split > 0:
        n_val = max(1, int(round(len(records) * cfg.validation_split)))
        if n_val >= len(records):
            raise ConfigError(f"`data.validation_split: {cfg.validation_split}` leaves no training data ({len(records)} records)")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(records), generator=g).tolist()
        val_idx = set(perm[:n_val])
        val_records = [r for i, r in enumerate(records) if i in val_idx]
        records = [r for i, r in enumerate(records) if i not in val_idx]
    train_ex = tokenize_records(records, tokenizer, cfg, str(cfg.path))
    val_ex = tokenize_records(val_records, tokenizer, cfg, str(cfg.validation_path or cfg.path)) if val_records else []
    n_tokens = sum(len(e.input_ids) for e in train_ex)
    n_truncated = 0
    if cfg.packing:
        train, val = pack(train_ex, cfg.seq_len), pack(val_ex, cfg.seq_len)
    else:
        n_truncated = sum(len(e.input_ids) > cfg.seq_len for e in train_ex)
        train, val = truncate(train_ex, cfg.seq_len), truncate(val_ex, cfg.seq_len)
    train = [e for e in train if _has_targets(e)]
    val = [e for e in val if _has_targets(e)]
    if not train:
        raise ConfigError(f"`data.path`: dataset is empty after tokenization: {cfg.path} has no example with a target token")
    info = {
        "train_records": len(records),
        "val_records": len(val_records),
        "train_tokens": n_tokens,
        "train_sequences": len(train),
        "val_sequences": len(val),
        "truncated": n_truncated,
    }
    return train, val, info


class StepSampler:
    """Which examples each rank reads for each micro-batch of optimizer step ``step``.

    Args:
        num_examples: Size of the training set.
        batch_size: Sequences per micro-batch per rank.
        grad_accum_steps: Micro-batches per optimizer step.
        world_size: Number of data-parallel ranks.
        seed: Order seed; epoch ``e`` uses ``randperm(n, seed + e)``.
        shuffle: False keeps file order.

    Raises:
        ConfigError: fewer examples than one global batch.
    """

    def __init__(
        self, num_examples: int, batch_size: int, grad_accum_steps: int, world_size: int, seed: int, shuffle: bool = True
    ):
        self.n = num_examples
        self.bs, self.accum, self.world = batch_size, grad_accum_steps, world_size
        self.global_batch = batch_size * grad_accum_steps * world_size
        self.seed, self.shuffle = seed, shuffle
        if self.n < self.global_batch:
            raise ConfigError(
                f"the training set has {self.n} sequences, fewer than one global batch of {self.global_batch} "
                f"(train.batch_size={batch_size} x train.grad_accum_steps={grad_accum_steps} x world_size={world_size}); "
                "add data or lower the batch size"
            )
        self.steps_per_epoch = self.n // self.global_batch  # the remainder of each epoch is dropped
        self._perm_epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = epoch
        return self._perm

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Indices for rank ``rank``: ``grad_accum_steps`` lists of ``batch_size`` indices."""
        order = self._order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch + rank * self.bs * self.accum
        mine = order[start : start + self.bs * self.accum]
        return [mine[i * self.bs : (i + 1) * self.bs] for i in range(self.accum)]


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, all (B, T)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def eval_batches(examples: list[Example], batch_size: int, max_batches: int | None = None) -> list[list[Example]]:
    n = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    return [examples[i * batch_size : (i + 1) * batch_size] for i in range(n)]
