"""The optimizer and lr schedule of a run, and their state as a checkpoint holds it.

On resume the checkpoint gives the *position* (AdamW moments, step counts, the schedule's step);
the recipe gives the *settings*: ``train.lr`` (the schedule's peak), ``betas``, ``eps`` and
``weight_decay`` are taken from the config, and each one that differs from the checkpoint's is
said in the log. So lowering ``train.lr`` after a stop and rerunning does what it says.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import CheckpointError
from .loop import lr_lambda

__all__ = ["build_optimizer", "check_scheduler_state", "check_optimizer_slots", "apply_settings"]

# LambdaLR.load_state_dict copies every key into the scheduler's __dict__: only plain values may pass.
_SCHEDULER_KEYS = {"base_lrs": list, "last_epoch": int, "_step_count": int, "lr_lambdas": list}
_ADAMW_SLOTS = {"step", "exp_avg", "exp_avg_sq"}


def build_optimizer(params, tc, total: int, warmup: int):
    """AdamW over ``params`` and its LambdaLR schedule (``lr_lambda``) from the ``train`` section."""
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total, warmup, tc.scheduler, tc.min_lr_ratio))
    return optimizer, scheduler


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_scheduler_state(sd, n_groups: int, path: Path) -> None:
    """A LambdaLR state of ``n_groups`` parameter groups, holding only plain values.

    Raises:
        CheckpointError: a key is missing, has the wrong type or length, or is not a plain value.
    """
    where = f"{path}: `scheduler`"
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} must be an object, got {sd!r}")
    for key, tp in _SCHEDULER_KEYS.items():
        if not isinstance(sd.get(key), tp) or isinstance(sd.get(key), bool):
            raise CheckpointError(f"{where} needs `{key}` ({tp.__name__}), got {sd.get(key)!r}")
    if len(sd["base_lrs"]) != n_groups or not all(_number(x) and x > 0 for x in sd["base_lrs"]):
        raise CheckpointError(f"{where}: `base_lrs` must be {n_groups} positive numbers, got {sd['base_lrs']!r}")
    if len(sd["lr_lambdas"]) != n_groups or not all(x is None or isinstance(x, dict) for x in sd["lr_lambdas"]):
        raise CheckpointError(f"{where}: `lr_lambdas` must be {n_groups} entries of null or an object")
    if sd["last_epoch"] < -1 or sd["_step_count"] < 0:
        raise CheckpointError(f"{where}: negative step (`last_epoch` {sd['last_epoch']}, `_step_count` {sd['_step_count']})")
    for key, value in sd.items():
        if key in _SCHEDULER_KEYS:
            continue
        plain = value is None or isinstance(value, (bool, int, float, str))
        if key == "optimizer" or not (plain or (isinstance(value, list) and all(_number(x) for x in value))):
            raise CheckpointError(f"{where}: unexpected `{key}`: {value!r}")


def check_optimizer_slots(name: str, slots: dict, file: Path) -> None:
    """An AdamW state of one parameter holds exactly its step and two moments."""
    if set(slots) != _ADAMW_SLOTS:
        raise CheckpointError(f"{file}: state of {name!r} has {sorted(slots)}, AdamW's is {sorted(_ADAMW_SLOTS)}")


def apply_settings(optimizer, scheduler, tc) -> list[str]:
    """Make the loaded optimizer and schedule follow the config, keeping their position.

    The peak lr becomes ``train.lr`` (``base_lrs`` and each group's ``initial_lr``), each group's
    current lr is the schedule's at its restored step from that peak; betas, eps and weight decay
    are the config's.

    Returns:
        One line per setting that differs from the checkpoint's (``train.lr changed from X to Y``).
    """
    new = {"lr": float(tc.lr), "betas": tuple(float(b) for b in tc.betas), "eps": float(tc.eps)}
    new["weight_decay"] = float(tc.weight_decay)
    changes = []
    old_lr = scheduler.base_lrs[0]
    if not math.isclose(old_lr, new["lr"], rel_tol=1e-12):
        changes.append(f"train.lr changed from {old_lr:g} to {new['lr']:g}: the schedule goes on from the new peak")
    group0 = optimizer.param_groups[0]
    for key in ("betas", "eps", "weight_decay"):
        old = tuple(group0[key]) if key == "betas" else group0[key]
        if old != new[key]:
            show = (lambda v: f"[{v[0]:g}, {v[1]:g}]") if key == "betas" else (lambda v: f"{v:g}")
            changes.append(f"train.{key} changed from {show(old)} to {show(new[key])}")
    scheduler.base_lrs = [new["lr"]] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=new["lr"], betas=new["betas"], eps=new["eps"], weight_decay=new["weight_decay"])
        group["lr"] = new["lr"] * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changes
