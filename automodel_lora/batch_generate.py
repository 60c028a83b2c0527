"""Batch generation with mixed adapters: ``automodel-lora generate --config GEN.yaml [key=value ...]``.

Reads a JSONL of ``{"prompt": ..., "adapter": name or null}``, loads the base model and every named adapter
once, and generates in batches that mix adapters (``automodel_lora.adapter_batch``: each sequence runs its
own adapter; null runs the base model), writing ``{"prompt", "adapter", "completion"}`` per line, in the
input's order, to the output JSONL (replaced atomically at the end). The config (YAML, every key also a
``key=value`` override)::

    base_model: outputs/quickstart/base_model     # a local HF model directory
    adapters: {story: outputs/quickstart/adapter}  # name -> adapter directory (HF PEFT format)
    input: prompts.jsonl
    output: completions.jsonl
    tokenizer: byte                 # byte | a tokenizer directory | null (the base model's)
    dtype: float32                  # of the base weights: float32 | bfloat16 | float16
    device: auto                    # auto (CUDA if present) | cpu | cuda
    batch_size: 8
    max_new_tokens: 64
    do_sample: false                # greedy; true samples with temperature / top_p
    temperature: 1.0
    top_p: 1.0
    seed: 0
    add_bos: true                   # prefix the tokenizer's <bos>, as the recipe's data does

Prompts are sorted by length for batching (less padding; left padding, as generation wants) and written
back in input order. Serving at scale belongs to vLLM, which loads the adapters this library writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GenerateConfig", "generate_main", "read_prompts", "run_generation"]


@dataclass
class GenerateConfig:
    """The ``generate`` command's settings (see the module docstring). Checked on construction.

    Raises:
        ConfigError: a missing or invalid value, naming the key and the fix.
    """

    base_model: str | None = None
    input: str | None = None
    output: str | None = None
    adapters: dict = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    add_bos: bool = True

    def __post_init__(self):
        for key in ("base_model", "input", "output"):
            if not getattr(self, key):
                raise _error(f"generate: `{key}` is required (see `automodel-lora generate --help`)")
        if not isinstance(self.adapters, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.adapters.items()):
            raise _error(f"generate: `adapters` must map names to adapter directories, got {self.adapters!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise _error(f"generate: `dtype` must be float32, bfloat16 or float16; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise _error(f"generate: `device` must be auto, cpu or cuda; got {self.device!r}")
        for key in ("batch_size", "max_new_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise _error(f"generate: `{key}` must be a positive integer, got {getattr(self, key)!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise _error(f"generate: `temperature` must be > 0 and `top_p` in (0, 1]; got {self.temperature}, "
                              f"{self.top_p}")

    @classmethod
    def load(cls, path: str | None, overrides: list[str]) -> GenerateConfig:
        """From a YAML file (relative paths resolved against its directory) and ``key=value`` overrides."""
        import yaml

        raw, base = {}, Path.cwd()
        if path is not None:
            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise _error(f"generate: can't read the config {path!r}: {e}") from None
            base = Path(path).resolve().parent
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise _error(f"generate: override {item!r} is not key=value")
            raw[key] = yaml.safe_load(value)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise _error(f"generate: unknown key(s) {unknown}; the keys are {sorted(known)}")
        for key in ("base_model", "input", "output"):
            if isinstance(raw.get(key), str) and path is not None and key not in _overridden(overrides):
                raw[key] = str(base / raw[key])
        if isinstance(raw.get("adapters"), dict) and path is not None:
            raw["adapters"] = {k: str(base / v) if isinstance(v, str) else v for k, v in raw["adapters"].items()}
        return cls(**raw)


def _error(message: str) -> Exception:
    """A ``ConfigError`` (imported here: ``generate --help`` answers without loading torch)."""
    from .recipe.errors import ConfigError

    return ConfigError(message)


def _overridden(overrides: list[str]) -> set[str]:
    return {item.partition("=")[0] for item in overrides}


def read_prompts(path: str, known: set[str]) -> list[dict]:
    """The JSONL's records: each a ``prompt`` string and an ``adapter`` in ``known`` (or null / absent).

    Raises:
        ConfigError: an unreadable file, or a line that is not such a record (naming the line).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise _error(f"generate: can't read `input` {path!r}: {e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(f"generate: {path}:{n} is not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise _error(f"generate: {path}:{n} needs a \"prompt\" string")
        adapter = rec.get("adapter")
        if adapter is not None and adapter not in known:
            raise _error(f"generate: {path}:{n} names adapter {adapter!r}; the config's `adapters` are "
                              f"{sorted(known)} (null for the base model)")
        records.append({"prompt": rec["prompt"], "adapter": adapter})
    return records


def _load(cfg: GenerateConfig):
    """(model in eval mode with every adapter loaded, tokenizer, device)."""
    import torch
    from transformers import AutoModelForCausalLM

    import automodel_lora as al

    from .recipe.tokenizer import build_tokenizer

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=getattr(torch, cfg.dtype))
    except OSError as e:
        raise _error(f"generate: can't load `base_model` {cfg.base_model!r}: {e}") from None
    for name, path in cfg.adapters.items():
        al.load_adapter(model, path, adapter_name=name)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.base_model)
    return model.to(device).eval(), tokenizer, device


def run_generation(cfg: GenerateConfig, stream=sys.stderr) -> list[dict]:
    """Generate for every prompt of ``cfg.input``; writes ``cfg.output`` and returns its records."""
    import torch

    import automodel_lora as al

    records = read_prompts(cfg.input, set(cfg.adapters))
    model, tok, device = _load(cfg)
    torch.manual_seed(cfg.seed)
    bos = [tok.bos_token_id] if cfg.add_bos and tok.bos_token_id is not None else []
    encoded = [bos + tok.encode(r["prompt"]) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]))
    completions: dict[int, str] = {}
    t0 = time.perf_counter()
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start : start + cfg.batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]):] = 1
        with al.adapter_batch(model, [records[i]["adapter"] for i in chunk]), torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                 temperature=cfg.temperature if cfg.do_sample else None,
                                 top_p=cfg.top_p if cfg.do_sample else None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row, i in enumerate(chunk):
            new = [t for t in out[row, width:].tolist() if t != tok.pad_token_id]
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            completions[i] = tok.decode(new)
        done = min(start + cfg.batch_size, len(order))
        print(f"[generate] {done}/{len(order)} prompts, {time.perf_counter() - t0:.1f} s", file=stream, flush=True)
    results = [dict(records[i], completion=completions[i]) for i in range(len(records))]
    _write_jsonl(cfg.output, results)
    return results


def _write_jsonl(path: str, records: list[dict]) -> None:
    from .atomic_files import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(os.fspath(path), write)


def generate_main(argv: list[str] | None = None, prog: str = "automodel-lora generate") -> int:
    """Parse ``--config GEN.yaml [key=value ...]`` and run. Returns the exit code (2 for a bad config)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML with the keys below (each also a key=value override)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    from .recipe.errors import ConfigError

    try:
        cfg = GenerateConfig.load(args.config, args.overrides)
        results = run_generation(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"[generate] wrote {len(results)} completions to {cfg.output}", file=sys.stderr)
    return 0
