"""Shared pieces of the recipe tests: a tiny recipe, small data files, running a recipe quietly,
and faults injected where bytes reach the OS (a full disk, a directory that denies writes)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
QUICKSTART_DATA = REPO / "configs" / "data" / "quickstart.jsonl"

# A 2-layer Llama with hidden size 32 over the byte tokenizer's 259 ids: ~1 s per 10 steps on a CPU.
TINY_MODEL = {
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def write_text_data(path: Path, n_records: int = 200) -> Path:
    """The first ``n_records`` lines of the shipped quickstart data (``{"text": ...}`` records)."""
    lines = QUICKSTART_DATA.read_text().splitlines()[:n_records]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prompt_completion_data(path: Path, n_records: int = 64) -> Path:
    """Arithmetic questions and answers: ``{"prompt": "12+7=", "completion": "19"}``."""
    with path.open("w") as f:
        for i in range(n_records):
            a, b = (i * 7) % 50, (i * 13) % 50
            f.write(json.dumps({"prompt": f"What is {a}+{b}? ", "completion": f"{a + b}."}) + "\n")
    return path


def tiny_raw_recipe(tmp_path: Path, data_file: Path | None = None, **sections) -> dict:
    """A valid recipe mapping (as read from YAML) for the tiny model; ``sections`` update it.

    ``tiny_raw_recipe(tmp, train={"max_steps": 3})`` merges ``max_steps`` into ``train``.
    """
    if data_file is None:
        data_file = write_text_data(tmp_path / "data.jsonl")
    raw = {
        "model": {"tiny": dict(TINY_MODEL), "dtype": "float32"},
        "peft": {"match_all_linear": True, "dim": 4, "alpha": 8},
        "data": {"path": str(data_file), "tokenizer": "byte", "seq_len": 64, "validation_split": 0.05},
        "train": {
            "lr": 1e-2,
            "warmup_steps": 2,
            "batch_size": 4,
            "max_steps": 6,
            "eval_batch_size": 4,
            "eval_max_batches": 2,
            "log_every": 1,
            "seed": 7,
        },
        "checkpoint": {"output_dir": str(tmp_path / "out"), "save_every": 0, "resume": None},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def run_recipe(raw: dict) -> tuple[dict, str]:
    """Validate and run ``raw`` in this process; returns (summary, the console log)."""
    from automodel_lora.recipe import RecipeConfig, finetune

    log = io.StringIO()
    summary = finetune(RecipeConfig.from_dict(raw), stream=log)
    return summary, log.getvalue()


def torchrun_recipe(tmp_path: Path, raw: dict, strategy: str) -> tuple[dict, str, str]:
    """Run ``raw`` under ``torchrun --nproc-per-node 2`` with ``distributed.strategy: strategy`` over gloo (CPU),
    its YAML and logs in ``tmp_path``; returns (the run's summary, rank 0's log, rank 1's log)."""
    raw = {**raw, "distributed": {"strategy": strategy, "backend": "gloo"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--redirects", "3"]
    cmd += [str(REPO / "scripts" / "finetune.py"), "--config", str(tmp_path / "r.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    logs = {}
    for rank in (0, 1):
        rank_dir = max((tmp_path / "logs").glob(f"*/attempt_0/{rank}"), key=lambda d: d.stat().st_mtime)  # this run's
        logs[rank] = (rank_dir / "stdout.log").read_text() + (rank_dir / "stderr.log").read_text()
    assert proc.returncode == 0, f"{proc.stderr}\n--- rank 0:\n{logs[0]}\n--- rank 1:\n{logs[1]}"
    summary = json.loads((Path(raw["checkpoint"]["output_dir"]) / "summary.json").read_text())
    return summary, logs[0], logs[1]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> dict[int, float]:
    """{step: training loss} from ``metrics.jsonl``."""
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def adapter_tensors(adapter_dir: Path) -> dict:
    """{key: tensor} of a saved PEFT-format adapter directory."""
    from safetensors.torch import load_file

    from automodel_lora.adapter_io import ADAPTER_WEIGHTS_NAME

    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME))


SAFETENSORS_ENOSPC = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


class DiskFull:
    """A disk that fills up: writes to the files ``hit(path)`` selects keep ``budget`` more bytes, then
    the rest of the write fails with ENOSPC, as the kernel's ``write`` does (some bytes reached the file).

    It is patched in where bytes reach the OS: ``open`` / ``io.open`` (so ``pathlib``, ``json`` and
    any Python writer go through it) and safetensors' writer, which writes from Rust; that one writes
    a truncated file and raises the error safetensors raises for an ``io::Error``.
    """

    def __init__(self, monkeypatch, hit, budget: int = 0, code: int = errno.ENOSPC):
        import builtins
        import io

        import safetensors.torch

        self.hit, self.budget = hit, budget
        real_open, real_save_file = builtins.open, safetensors.torch.save_file
        disk = self

        class FullFile:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                n = disk.take(len(data))
                self._f.write(data[:n])
                if n < len(data):
                    raise OSError(code, os.strerror(code))
                return n

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

            def __iter__(self):
                return iter(self._f)

        def full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writes = any(c in mode for c in "wax+")
            return FullFile(f) if writes and isinstance(file, (str, os.PathLike)) and disk.hit(str(file)) else f

        def full_save_file(tensors, filename, metadata=None):
            if not disk.hit(str(filename)):
                return real_save_file(tensors, filename, metadata=metadata)
            data = safetensors.torch.save(tensors, metadata=metadata)
            n = disk.take(len(data))
            with real_open(filename, "wb") as f:
                f.write(data[:n])
            if n < len(data):
                raise safetensors.SafetensorError(SAFETENSORS_ENOSPC)

        monkeypatch.setattr(builtins, "open", full_open)
        monkeypatch.setattr(io, "open", full_open)
        monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)

    def take(self, n: int) -> int:
        n = min(n, self.budget)
        self.budget -= n
        return n


def deny_writes_under(monkeypatch, directory: Path) -> None:
    """Writes under ``directory`` fail with EACCES, as in a read-only directory, even for root:
    ``os.open`` for writing, ``os.mkdir`` and ``open`` / ``io.open`` in a writing mode."""
    import builtins
    import io

    inside = str(directory) + os.sep

    def denied(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(inside)

    def eacces(path):
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    real_os_open, real_mkdir, real_open = os.open, os.mkdir, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if denied(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise eacces(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if denied(path):
            raise eacces(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and denied(file) and any(c in mode for c in "wax+"):
            raise eacces(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
