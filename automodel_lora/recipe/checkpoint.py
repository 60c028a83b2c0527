"""Resumable checkpoints: adapter (PEFT format), optimizer, scheduler, RNG, data position.

Layout of ``<output_dir>/checkpoints/step_0000050/``::

    adapter/adapter_config.json         # HF PEFT format, written by automodel_lora.save_adapter
    adapter/adapter_model.safetensors
    trainer_state.json                  # run id, step, epoch, tokens seen, scheduler, config
    optimizer.pt                        # full (unsharded) optimizer state keyed by FQN: tensors only
    rng_rank{r}.pt                      # python / torch / cuda RNG of rank r, as tensors

Guarantees (each proved by ``tests/test_faults.py``):

- Atomic: a checkpoint is written into ``.tmp-step_*``, its files flushed to disk, and the directory
  renamed when complete (then the rename flushed), so a directory named ``step_*`` is always whole.
  A failed write (disk full, not writable) removes ``.tmp-step_*`` and ends the run with exit code 2.
  The adapter file is checked to be as long as its header says before the rename. Rotation renames a
  checkpoint to ``.trash-*`` before deleting it. Leftover ``.tmp-*`` / ``.trash-*`` are removed at
  the next start.
- No code runs on load: ``.pt`` files are read with ``torch.load(weights_only=True)``, the rest is
  JSON and safetensors. A file that needs anything else is refused as unsafe.
- Validated on load: keys, types, the scheduler state and every optimizer tensor's shape against the
  model's trainable parameters, so a bad checkpoint is named at resume, not found at the first
  optimizer step; a checkpoint that still fails to load into the optimizer is skipped like one that
  fails to read.
- Rotation deletes only checkpoints of the current run (``run_id`` in ``trainer_state.json``).

The optimizer state is gathered to full tensors (``full_state_dict=True``), so a run can resume
under a different world size or strategy (the RNG then restarts per rank).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .distributed import DistEnv, all_reduce_max, barrier
from .errors import CheckpointError
from .files import fresh_dir, fsync_dir, remove_dir, replace_dir, save_tensors, write_bytes, writing
from .optim import check_optimizer_slots, check_scheduler_state
from .rng import capture_rng, restore_rng

__all__ = ["CheckpointManager", "LoadedCheckpoint", "capture_rng", "restore_rng", "agree"]

_STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT = 2
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_DIR = "adapter"
_STATE_KEYS = {"format": int, "run_id": str, "step": int, "tokens": int, "scheduler": dict}


def _optim_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def agree(ok: bool, env: DistEnv) -> bool:
    """True on every rank iff ``ok`` on every rank (collective: every rank must call it)."""
    bad = torch.tensor([0.0 if ok else 1.0], device=env.device)
    all_reduce_max(bad, env)
    return not bool(bad.item())


def _load_tensors(path: Path):
    """``torch.load`` that runs no code: only tensors, numbers, strings, lists, tuples and dicts."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # UnpicklingError, RuntimeError (a bad zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is unreadable or unsafe to load ({type(e).__name__}: {first[:200]})") from None


@dataclass
class LoadedCheckpoint:
    """A checkpoint read from disk and checked for structure (not yet applied to a model)."""

    path: Path
    state: dict  # trainer_state.json
    optimizer: dict  # the full optimizer state dict
    rng: dict | None  # this rank's RNG state; None: none saved for this rank (another world size)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _check_state(state, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    for key, tp in _STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{path} has no `{key}`")
        if not isinstance(state[key], tp) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: `{key}` must be {tp.__name__}, got {state[key]!r}")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']}, this version reads {FORMAT}")


def _check_optimizer(sd, path: Path) -> None:
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(sd.get("param_groups"), list):
        raise CheckpointError(f"{path} is not an optimizer state (needs `state` and `param_groups`)")
    for group in sd["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{path}: a param group without a `params` list")


class CheckpointManager:
    """Save / find / load checkpoints under ``<output_dir>/checkpoints``.

    Args:
        output_dir: The run directory.
        keep_last: Number of newest checkpoints of this run to keep.
        env: Distributed environment (rank 0 writes shared files; every rank its RNG).
        run_id: This run's id, stored in each checkpoint; rotation deletes only checkpoints with it.
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, env: DistEnv, run_id: str | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.env = env
        self.run_id = run_id

    # ---------------------------------------------------------------- discovery
    def step_dirs(self) -> list[tuple[int, Path]]:
        """Every ``step_*`` directory, oldest first, whole or not."""
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())

    def list(self) -> list[tuple[int, Path]]:
        """The ``step_*`` directories that hold a checkpoint of this format, oldest first."""
        return [(s, p) for s, p in self.step_dirs() if (p / STATE_FILE).is_file() and (p / ADAPTER_DIR).is_dir()]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1][1] if ckpts else None

    def run_id_of(self, path: Path) -> str | None:
        """The run id recorded in a checkpoint, or None if it has none or can't be read."""
        try:
            value = json.loads((path / STATE_FILE).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def candidates(self, resume: str | None) -> list[Path]:
        """Where to resume from, best first: ``auto`` -> every ``step_*`` directory, newest first;
        a path -> that one; None -> none."""
        if resume is None:
            return []
        if resume == "auto":
            return [p for _, p in reversed(self.step_dirs())]
        p = Path(resume)
        if not (p / STATE_FILE).is_file():
            raise CheckpointError(f"`checkpoint.resume`: {resume} is not a checkpoint directory (no {STATE_FILE})")
        return [p]

    # ---------------------------------------------------------------- save
    def save(self, step: int, raw_model: nn.Module, train_model: nn.Module, optimizer, scheduler, state: dict, peft_cfg) -> Path:
        """Write checkpoint ``step`` atomically. Collective: every rank must call it at the same step.

        Raises:
            RunDirError: a write failed (disk full, not writable); the partial ``.tmp-step_*`` is removed.
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-step_{step:07d}"
        last = self.latest()
        note = f"; the last complete checkpoint is {last}" if last else "; no complete checkpoint was written yet"
        with writing(f"checkpoint step {step}", self.root, cleanup=tmp, note=note):
            if self.env.is_main:
                fresh_dir(tmp)
            barrier(self.env)
            write_adapter(raw_model, tmp / ADAPTER_DIR, peft_cfg, self.env)
            optim_sd = get_optimizer_state_dict(train_model, optimizer, options=_optim_options(cpu_offload=True))
            save_tensors(capture_rng(self.env.device), tmp / f"rng_rank{self.env.rank}.pt")
            if self.env.is_main:
                save_tensors(optim_sd, tmp / OPTIMIZER_FILE)
                payload = {**state, "format": FORMAT, "run_id": self.run_id, "scheduler": scheduler.state_dict()}
                write_bytes(tmp / STATE_FILE, (json.dumps(payload, indent=1) + "\n").encode())
                fsync_dir(tmp)
            barrier(self.env)
            if self.env.is_main:
                replace_dir(tmp, final)
                fsync_dir(self.root)
                self._rotate(step)
        barrier(self.env)
        return final

    def _rotate(self, step: int) -> None:
        """Delete this run's checkpoints beyond the newest ``keep_last`` up to ``step`` (the one just
        saved). Never another run's; never one past ``step`` (left by a timeline this run abandoned, e.g.
        a damaged checkpoint it fell back from), so the one just saved always stays."""
        mine = [p for s, p in self.list() if s <= step and self.run_id is not None and self.run_id_of(p) == self.run_id]
        for p in mine[: max(0, len(mine) - self.keep_last)]:
            remove_dir(p)

    # ---------------------------------------------------------------- load
    def read(self, path: Path) -> LoadedCheckpoint:
        """Read and check a checkpoint's files; nothing in them is executed.

        Raises:
            CheckpointError: a file is missing, unreadable, unsafe to unpickle, or lacks a key; the
                message names the file.
        """
        path = Path(path)
        state_file = path / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if (path / "trainer_state.pt").is_file():
                raise CheckpointError(
                    f"{path} was written by an older version (trainer_state.pt, readable only by unpickling "
                    "arbitrary objects) and is not resumed from; start a new run (checkpoint.overwrite=true "
                    "or another checkpoint.output_dir)"
                ) from None
            raise CheckpointError(f"{state_file} is missing (not a complete checkpoint)") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{state_file} is not valid JSON ({e})") from None
        _check_state(state, state_file)
        if not (path / ADAPTER_DIR).is_dir():
            raise CheckpointError(f"{path / ADAPTER_DIR} is missing")
        optim = _load_tensors(path / OPTIMIZER_FILE)
        _check_optimizer(optim, path / OPTIMIZER_FILE)
        check_scheduler_state(state["scheduler"], len(optim["param_groups"]), state_file)
        rng_file = path / f"rng_rank{self.env.rank}.pt"
        rng = _load_tensors(rng_file) if rng_file.is_file() else None
        if rng is not None and not (
            isinstance(rng, dict) and all(isinstance(rng.get(k), torch.Tensor) for k in ("python", "torch"))
        ):
            raise CheckpointError(f"{rng_file} is not an RNG state (needs `python` and `torch` tensors)")
        return LoadedCheckpoint(path, state, optim, rng)

    @staticmethod
    def check_shapes(ckpt: LoadedCheckpoint, raw_model: nn.Module) -> None:
        """Every optimizer tensor of the checkpoint matches a trainable parameter of ``raw_model``
        (the patched, not yet wrapped model: full shapes, plain FQNs)."""
        params = {n: p for n, p in raw_model.named_parameters() if p.requires_grad}
        file = ckpt.path / OPTIMIZER_FILE
        listed = [n for g in ckpt.optimizer["param_groups"] for n in g["params"]]
        if sorted(listed) != sorted(params):
            extra, missing = sorted(set(listed) - set(params)), sorted(set(params) - set(listed))
            raise CheckpointError(
                f"{file} is for other parameters than this model's adapters "
                f"(e.g. unknown {extra[:2]}, missing {missing[:2]}): another peft or model config?"
            )
        for name, slots in ckpt.optimizer["state"].items():
            if name not in params or not isinstance(slots, dict):
                raise CheckpointError(f"{file}: state for unknown parameter {name!r}")
            check_optimizer_slots(name, slots, file)
            for slot, t in slots.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{file}: `{name}.{slot}` is not a tensor")
                if t.dim() > 0 and t.shape != params[name].shape:
                    raise CheckpointError(
                        f"{file}: `{name}.{slot}` has shape {tuple(t.shape)}, the parameter {tuple(params[name].shape)}"
                    )

    @staticmethod
    def load_adapter_weights(raw_model: nn.Module, path: Path) -> None:
        """Into the patched, not yet wrapped model.

        Raises:
            CheckpointError: the adapter files are missing, unreadable, or don't fit the model.
        """
        from automodel_lora import adapter_names, load_adapter

        names = adapter_names(raw_model)
        try:
            if not per_adapter_dirs(names):
                load_adapter(raw_model, str(Path(path) / ADAPTER_DIR))
            else:  # named adapters (data.adapters): each in ADAPTER_DIR/<name>
                for name in names:
                    load_adapter(raw_model, str(Path(path) / ADAPTER_DIR / name), adapter_name=name)
        except Exception as e:  # safetensors / JSON / shape errors of a damaged adapter directory
            raise CheckpointError(f"{Path(path) / ADAPTER_DIR}: can't load the adapter ({type(e).__name__}: {e})") from None

    @staticmethod
    def load_optimizer(train_model: nn.Module, optimizer, scheduler, ckpt: LoadedCheckpoint) -> None:
        """Into the wrapped model's optimizer and its scheduler.

        Raises:
            CheckpointError: the state does not load (the caller falls back to an older checkpoint).
        """
        from torch.distributed.checkpoint import state_dict as dcp_state_dict

        try:
            dcp_state_dict.set_optimizer_state_dict(train_model, optimizer, ckpt.optimizer, options=_optim_options())
            scheduler.load_state_dict(ckpt.state["scheduler"])
        except Exception as e:  # whatever torch raises for a state that passed the checks of read()
            raise CheckpointError(f"{ckpt.path}: can't load the optimizer or scheduler state ({type(e).__name__}: {e})") from None

    def load_rng(self, ckpt: LoadedCheckpoint) -> bool:
        """Restore this rank's RNG; False if the checkpoint has none for this rank.

        Raises:
            CheckpointError: the RNG file holds something else.
        """
        if ckpt.rng is None:
            return False
        try:
            restore_rng(ckpt.rng, self.env.device)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{ckpt.path / f'rng_rank{self.env.rank}.pt'} is not an RNG state ({e})") from None
        return True


def write_adapter(raw_model: nn.Module, adapter_dir: Path, peft_cfg, env: DistEnv) -> None:
    """``save_adapter`` into ``adapter_dir`` (collective; rank 0 writes), then on rank 0 the file
    checked whole and the directory's entries flushed (``save_adapter`` fsyncs each file itself)."""
    from automodel_lora import adapter_names, save_adapter

    names = adapter_names(raw_model)
    split = per_adapter_dirs(names)
    dirs = [Path(adapter_dir) / name for name in names] if split else [Path(adapter_dir)]
    for name, directory in zip(names if split else [None], dirs, strict=True):
        save_adapter(raw_model, str(directory), peft_cfg, adapter_name=name)  # named: each in <dir>/<name>
    if env.is_main:
        for directory in dirs:
            check_adapter_file(directory)
            fsync_dir(directory)
        fsync_dir(adapter_dir)


def per_adapter_dirs(names: list[str]) -> bool:
    """Whether a run's adapters are written one directory each (``adapter/<name>/``): the named adapters of
    ``data.adapters`` (one or several), not the single ``"default"`` adapter of a plain run."""
    from automodel_lora.adapter_slots import DEFAULT_ADAPTER_NAME

    return names != [DEFAULT_ADAPTER_NAME]


def check_adapter_file(adapter_dir: Path) -> None:
    """The safetensors file is as long as its header says: a writer that lost bytes on a full disk
    without raising (a buffer dropped on close) would otherwise commit a truncated checkpoint.

    Raises:
        OSError: the file is shorter or longer (``writing`` turns it into a ``RunDirError``).
    """
    from automodel_lora.adapter_io import ADAPTER_WEIGHTS_NAME

    path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if header else None
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        ends = None
    if ends is None or size != 8 + n + max(ends, default=0):
        raise OSError(f"{path.name} was written incomplete ({size} bytes on disk); is the disk full?")


def all_finite(tensors) -> bool:
    """True iff every element of every tensor is finite (DTensors checked on their local shard).
    One host sync per device, not one per tensor."""
    ok: dict[torch.device, torch.Tensor] = {}
    for t in tensors:
        if hasattr(t, "to_local"):
            t = t.to_local()
        if t.is_floating_point() and t.numel():
            f = torch.isfinite(t).all()
            ok[f.device] = f if f.device not in ok else ok[f.device] & f
    return all(bool(f) for f in ok.values())


def optimizer_tensors(optimizer) -> list:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
