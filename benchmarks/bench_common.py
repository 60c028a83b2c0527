"""What the benchmark sections share: the device, the run's environment for their JSON, timing of variants
interleaved step by step (CUDA events, or synchronized wall time), a step's peak memory, freeing the device's
memory between shapes, relative error, and writing the results JSON.

Importing it puts the repository root first on sys.path, so that ``automodel_lora`` is the checkout's when a
script runs as ``python benchmarks/<script>.py``: the section modules import it before ``automodel_lora``."""

from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, _ROOT)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


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


def write_results(results: dict, out: str | None, filename: str = "bench_lora.json") -> str:
    """``results`` as JSON at ``out`` (a file, or a directory to put ``filename`` in; default: ``filename`` under
    $OUT, else benchmarks/results/); returns the path."""
    if out is None:
        out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out, exist_ok=True)
    if os.path.isdir(out):
        out = os.path.join(out, filename)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return out


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_block(step, n: int, prep=None) -> list[float]:
    """n steps, each timed alone (ms): CUDA events around the step, host prep outside."""
    if DEV != "cuda":
        out = []
        for i in range(n):
            if prep:
                prep(i)
            t = time.perf_counter()
            step(i)
            out.append((time.perf_counter() - t) * 1e3)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i in range(n):
        if prep:
            prep(i)
        ev[i][0].record()
        step(i)
        ev[i][1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def _profiled(step, n: int, prep, cpu: bool, cuda: bool):
    """torch.profiler over ``n`` calls of ``step`` (after one warm call), recording the activities asked for. The
    device-time sum takes CUDA alone: with CPU ops recorded too, an op's kernels would count under both."""
    from torch.profiler import ProfilerActivity, profile

    if prep:
        prep(0)
    step(0)
    sync()
    activities = ([ProfilerActivity.CPU] if cpu else []) + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n):
            if prep:
                prep(i)
            step(i)
        sync()
    return prof


def kernel_profile(step, n: int = 5, prep=None, lines: int = 16) -> str:
    """Where ``n`` calls of ``step`` spend their time, after one warm call: torch.profiler's table by total
    device time (CPU time off CUDA), its first ``lines`` rows (kernel names against DESIGN.md's floors)."""
    cuda = DEV == "cuda"
    prof = _profiled(step, n, prep, True, cuda)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=lines)


def device_us_per_step(step, n: int = 5, prep=None) -> float:
    """GPU time of one call of ``step`` in microseconds: the kernels' summed device time over ``n`` profiled calls
    (after one warm call), divided by ``n``; what the step costs where the host runs ahead (a model step, a CUDA
    graph). nan off CUDA."""
    if DEV != "cuda":
        return float("nan")
    return sum(e.self_device_time_total for e in _profiled(step, n, prep, False, True).key_averages()) / n


def peak_delta_mib(step, prep=None) -> float:
    """MiB allocated at the peak of one step above what was allocated before it (nan off CUDA)."""
    if DEV != "cuda":
        return float("nan")
    if prep:
        prep(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    step(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - m0) / 2**20


def interleaved(variants: dict, n: int, rounds: int, warmup: int, prep=None, sync_each: bool = False) -> dict:
    """Median ms per step of each variant: steps interleaved one by one (A B C, then B C A, ...), so a
    clock or power drift of the GPU lands on every variant alike; ``rounds`` rounds of ``n`` steps each,
    the median of the round medians.

    Two clocks: by default each step between its own CUDA events, one synchronize per round (the host runs
    ahead as in training: GPU time, host time hidden while the GPU is busy); with ``sync_each`` the host's
    wall time of each step with the GPU synchronized before and after it (host time that the GPU waits for
    counts: what a step costs where the host cannot run ahead)."""
    for name, step in variants.items():
        for i in range(warmup):
            if prep:
                prep(i)
            step(i)
    sync()
    names = list(variants)
    res = {name: [] for name in names}
    for _ in range(rounds):
        marks = {name: [] for name in names}  # (start, end) per step: CUDA events, or host seconds
        for i in range(n):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                if prep:
                    prep(i)
                start = _mark(sync_each)
                variants[name](i)
                marks[name].append((start, _mark(sync_each)))
        sync()
        for name in names:
            res[name].append(statistics.median(_elapsed_ms(a, b) for a, b in marks[name]))
    return {name: statistics.median(v) for name, v in res.items()}


def _mark(wall: bool = False):
    """A CUDA event recorded now on the stream; with ``wall`` (or off CUDA) the host clock once the GPU is idle."""
    if wall or DEV != "cuda":
        sync()
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _elapsed_ms(a, b) -> float:
    return (b - a) * 1e3 if isinstance(a, float) else a.elapsed_time(b)


def free_device_memory() -> None:
    """Collect what is unreachable (PEFT and patched modules hold reference cycles) and give the cached
    blocks back, so the next shape starts from the memory it needs itself."""
    gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fmt(value, spec: str, none: str = "-") -> str:
    """``value`` formatted by ``spec``, or ``none`` where it is None."""
    return none if value is None else format(value, spec)


def md_table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A section of the printed results: ``## title``, then a markdown table of ``rows`` (cells as strings)."""
    return [f"\n## {title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]
