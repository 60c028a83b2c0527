"""Resumable checkpoints: adapter (PEFT format), optimizer, scheduler, RNG, data position.

Layout of ``<output_dir>/checkpoints/step_0000050/``::

    adapter/adapter_config.json         # HF PEFT format, written by automodel_lora.save_adapter
    adapter/adapter_model.safetensors
    trainer_state.pt                    # full (unsharded) optimizer state keyed by FQN,
                                        # scheduler, step, epoch, tokens seen, config
    rng_rank{r}.pt                      # python / torch / cuda RNG of rank r

A checkpoint is written into ``.tmp-step_*``, its files flushed to disk, and the directory
renamed when complete, so a directory named ``step_*`` is always whole; a crash mid-save leaves
only a temp directory that the next save removes. The optimizer state is gathered to full
tensors (``full_state_dict=True``), so a run can resume under a different world size or strategy
(the RNG then restarts per rank).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError
from .distributed import DistEnv, barrier
from .files import fresh_dir, fsync_files, replace_dir

__all__ = ["CheckpointManager", "capture_rng", "restore_rng"]

_STEP_RE = re.compile(r"^step_(\d+)$")


def capture_rng(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _optim_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class CheckpointManager:
    """Save / find / load checkpoints under ``<output_dir>/checkpoints``.

    Args:
        output_dir: The run directory.
        keep_last: Number of newest checkpoints to keep.
        env: Distributed environment (rank 0 writes shared files; every rank its RNG).
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, env: DistEnv):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.env = env

    # ---------------------------------------------------------------- discovery
    def list(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / "trainer_state.pt").is_file() and (p / "adapter").is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1][1] if ckpts else None

    def resolve(self, resume: str | None) -> Path | None:
        """``auto`` -> newest checkpoint or None; a path -> that checkpoint; None -> None."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if not (p / "trainer_state.pt").is_file():
            raise ConfigError(f"`checkpoint.resume`: {resume} is not a checkpoint directory (no trainer_state.pt)")
        return p

    # ---------------------------------------------------------------- save
    def save(self, step: int, raw_model: nn.Module, train_model: nn.Module, optimizer, scheduler, state: dict, peft_cfg) -> Path:
        """Collective: every rank must call it at the same step."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from automodel_lora import save_adapter

        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-step_{step:07d}"
        if self.env.is_main:
            fresh_dir(tmp)
        barrier(self.env)
        save_adapter(raw_model, str(tmp / "adapter"), peft_cfg)
        optim_sd = get_optimizer_state_dict(train_model, optimizer, options=_optim_options(cpu_offload=True))
        if self.env.is_main:
            payload = dict(state)
            payload["optimizer"] = optim_sd
            payload["scheduler"] = scheduler.state_dict()
            torch.save(payload, tmp / "trainer_state.pt")
        rng_file = tmp / f"rng_rank{self.env.rank}.pt"
        torch.save(capture_rng(self.env.device), rng_file)
        fsync_files([rng_file, tmp / "trainer_state.pt"] if self.env.is_main else [rng_file])
        barrier(self.env)
        if self.env.is_main:
            replace_dir(tmp, final)
            self._rotate()
        barrier(self.env)
        return final

    def _rotate(self) -> None:
        ckpts = self.list()
        for _, p in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- load
    @staticmethod
    def load_state(path: Path) -> dict:
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)

    @staticmethod
    def load_adapter_weights(raw_model: nn.Module, path: Path) -> None:
        """Into the patched, not yet wrapped model."""
        from automodel_lora import load_adapter

        load_adapter(raw_model, str(path / "adapter"))

    def load_optimizer(self, train_model: nn.Module, optimizer, scheduler, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(train_model, optimizer, state["optimizer"], options=_optim_options())
        scheduler.load_state_dict(state["scheduler"])

    def load_rng(self, path: Path) -> bool:
        f = path / f"rng_rank{self.env.rank}.pt"
        if not f.is_file():
            return False
        restore_rng(torch.load(f, map_location="cpu", weights_only=False), self.env.device)
        return True
