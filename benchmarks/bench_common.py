"""What the benchmark scripts share: the run's environment for their JSON, and side-by-side GPU timing."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import tempfile

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def run_env() -> dict:
    """Date (UTC), commit ($GIT_COMMIT or git), whether automodel_lora/ or benchmarks/ had uncommitted changes
    (None where git cannot say), torch / triton versions and the GPU: where a committed result came from.

    The device machine's copy of the tree may carry a .git from an older commit: where $GIT_COMMIT names
    another commit than git's HEAD, git's answer is about the wrong commit and ``dirty`` is None."""
    commit = os.environ.get("GIT_COMMIT")
    dirty = None
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=_ROOT).strip()
        if not commit or head.startswith(commit):
            dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--", "automodel_lora", "benchmarks"],
                                                 text=True, stderr=subprocess.DEVNULL, cwd=_ROOT).strip())
        commit = commit or head
    except Exception:  # no git here: GIT_COMMIT says it
        commit = commit or "unknown"
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                dirty=dirty, torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def write_json(filename: str, payload: dict) -> str:
    """``payload`` as JSON under $OUT (default: the current directory); returns the path."""
    path = os.path.join(os.environ.get("OUT", "."), filename)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def rotated_cudagraph_us(fns: dict, rounds: int, rep: int) -> dict[str, list[float]]:
    """Each callable's median GPU time in us (``do_bench_cudagraph`` over ``rep`` ms), once per round; each round
    visits the callables in an order rotated by one, so a drift of the clocks lands on all of them alike."""
    import triton.testing as tt

    names = list(fns)
    times = {n: [] for n in names}
    for rnd in range(rounds):
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            times[n].append(tt.do_bench_cudagraph(fns[n], rep=rep, return_mode="median") * 1e3)
    return times


def patched_copy(path: str, name: str, *patches: tuple[str, str]):
    """A new module made from the source file at ``path`` with the first ``old`` of each ``(old, new)`` patch
    replaced by ``new``, in order: a timing variant of a kernel, imported next to the original in one process.
    Exits when an ``old`` is not in the file."""
    src = open(path).read()
    for old, new in patches:
        if old not in src:
            raise SystemExit(f"patch {name} does not apply to {path}: {old.strip().splitlines()[0]!r}")
        src = src.replace(old, new, 1)
    copy = os.path.join(tempfile.mkdtemp(), f"tl_{name}.py")
    with open(copy, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"tl_{name}", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
