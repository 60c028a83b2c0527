"""How the kernels of this package are launched: autotune once, then a recorded plan, then a cached
direct launch.

Every launcher (``proj``, ``expand``, ``tn``, ``tn2``, ``gemm_lora``, ``dequantize_nf4``) follows one
protocol:

1. build ``sig``: the kernel's name, the device and every shape, stride, dtype and scalar value that
   decides its launch (what Triton specializes on, the launch plan, the grid, the non-pointer
   arguments);
2. ``run_cached(sig, ptrs, fast=...)``: a repeat call whose pointers are all 16-byte aligned finds the
   compiled kernel with its grid and argument tail under ``sig`` and calls its launcher directly (no
   Triton argument binding, none of the launcher's own argument building);
3. otherwise ``launch(...)``: the first call for a plan key (shapes, M bucketed per power of two)
   autotunes; later calls launch the jit function with the recorded config (``launch_plan``) and
   record the compiled kernel under ``sig`` for step 2.

Under ``TRITON_INTERPRET=1`` a fixed small config runs through the jit function every time.

The direct launch (step 2) calls Triton internals that change between releases
(``CompiledKernel.run`` / ``packed_metadata`` / ``launch_metadata``, ``triton.knobs.runtime``,
``torch._C._cuda_getCurrentRawStream``), so it runs only with the Triton release it was run with on the
GPU (``FAST_LAUNCH_TESTED``: Triton 3.6, with torch 2.11) and with ``KernelOptions(fast_launch=True)``;
with any other Triton every launch takes step 3's plain ``kernel[grid](...)`` path, with one warning on
the GPU.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_BR = 64  # rank block; ranks > 64 add a grid dim over rank blocks (x re-read r/64 times)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 / triton.cdiv are constexpr functions with ~3 us of
    # wrapper cost per call on the host, and the launchers call them on every step
    return 1 << (n - 1).bit_length() if n > 1 else 1


def rank_block(r: int) -> int:
    """The rank tile of a kernel: ``r`` rounded up to a power of two in [16, 64]."""
    return min(MAX_BR, max(16, next_pow2(r)))


def dot_prec(dtype: torch.dtype) -> str:
    # fp32 operands: full-precision dot (tf32 would be ~3e-4 off the fp32 reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def m_bucket(M: int) -> int:
    """Token counts share a launch plan per power of two: a new M (variable-length batches) reuses the
    config autotuned for its bucket instead of re-running the autotuner."""
    return next_pow2(M)


# --------------------------------------------------------------------------------------
# Autotuning (GPU only).  Bandwidth-bound kernels are autotuned, keyed on the shapes; their config
# sets are small sets around what a streaming kernel on an H100 needs (>= 32 KB in flight per SM:
# 3-4 stages of a (64, 128..256) bf16 tile).  Under the interpreter a fixed small config runs
# (autotune would time numpy code).
# --------------------------------------------------------------------------------------
def configs(space) -> list:
    """``triton.Config`` list from ``(kwargs, num_warps, num_stages)`` triples."""
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in space]


def bench(fn, quantiles):
    """Short autotune timing: 5 ms warm-up, 25 ms of repeats per config."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# --------------------------------------------------------------------------------------
# Triton-version gate of the direct launch
# --------------------------------------------------------------------------------------
# The Triton releases (major, minor) whose internals the direct launch and the direct TMA descriptor
# construction have run against on the GPU: only 3.6 (H100 / H200, torch 2.11).  A release is added here
# only after the GPU suite (tests/test_kernels_gpu.py) has passed with it; any other release, older or
# newer, takes the plain launch and the descriptor constructor.
FAST_LAUNCH_TESTED = ((3, 6),)
_COMPILED_KERNEL_API = ("run", "function", "packed_metadata", "launch_metadata")


def untested_release(version: str) -> str | None:
    """None where Triton ``version``'s (major, minor) is one of the releases ``FAST_LAUNCH_TESTED`` names (any
    patch level or local suffix), else why not."""
    try:
        release = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return f"Triton version {version!r} is not one this package can read"
    if release not in FAST_LAUNCH_TESTED:
        tested = ", ".join(f"{major}.{minor}" for major, minor in FAST_LAUNCH_TESTED)
        return f"Triton {version} is outside the releases its direct launch was tested with ({tested})"
    return None


def fast_launch_status(version: str, module=None) -> str | None:
    """None where the direct launch can run with Triton ``version`` (``module``: the imported ``triton``
    package, to check its launch hooks; None: skip that check) and this torch, else the reason it cannot."""
    reason = untested_release(version)
    if reason is not None:
        return reason
    if module is not None:
        runtime = getattr(getattr(module, "knobs", None), "runtime", None)
        if not (hasattr(runtime, "launch_enter_hook") and hasattr(runtime, "launch_exit_hook")):
            return f"Triton {version} has no triton.knobs.runtime launch hooks"
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        return f"torch {torch.__version__} has no torch._C._cuda_getCurrentRawStream"
    return None


# Why the direct launch is off for the whole process (None: it may run); fixed at import.
FAST_LAUNCH_UNAVAILABLE = fast_launch_status(triton.__version__, triton)
PLAIN_LAUNCH_WARNED: set = set()  # the reasons warn_plain_launch has warned about in this process


def warn_plain_launch(reason: str) -> bool:
    """Warn, once per ``reason`` for the process, that kernels launch through the plain path; True when it
    warned now."""
    if reason in PLAIN_LAUNCH_WARNED:
        return False
    PLAIN_LAUNCH_WARNED.add(reason)
    warnings.warn(f"automodel_lora: Triton kernels launch through the plain kernel[grid](...) path, with more "
                  f"host time per launch ({reason}). Results are the same; KernelOptions(fast_launch=False) "
                  "silences this.", RuntimeWarning, stacklevel=3)
    return True


if FAST_LAUNCH_UNAVAILABLE is None:
    from triton import knobs

    raw_stream = torch._C._cuda_getCurrentRawStream  # what Triton's own launcher asks for
else:
    knobs = None

    def raw_stream(device_index: int) -> int:
        """The current CUDA stream's handle on ``device_index``."""
        return torch.cuda.current_stream(device_index).cuda_stream


# --------------------------------------------------------------------------------------
# Launch plans and the compiled-kernel cache
# --------------------------------------------------------------------------------------
# Launch plans: after the first (autotuned) call of a kernel for a key, later calls launch the plain
# jit function with the chosen config directly: the autotuner's per-call Python work was a large part
# of the ~120 us host time per launch measured on an H100 (benchmarks/DESIGN.md).
PLANS: dict = {}

# Compiled kernels by call signature (see the module docstring).  Launches with an unaligned pointer
# (views at odd offsets; rare) always go through the jit function, which specializes on each
# pointer's alignment itself.  The table is cleared when it reaches MAX_COMPILED entries (a new M
# is one jit launch).
COMPILED: dict = {}
MAX_COMPILED = 4096


def aligned(tensors) -> bool:
    """Every tensor's data pointer is 16-byte aligned."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


def run_cached(sig: tuple, ptrs: tuple, tensors=None, fast: bool = True) -> bool:
    """Launch the compiled kernel recorded under ``sig`` with pointer arguments ``ptrs`` (first in the
    kernel's signature).  False, launching nothing, when ``fast`` is off, no kernel is recorded (first
    call, the interpreter, a Triton without the direct launch) or one of ``tensors`` (default: ``ptrs``)
    is not 16-byte aligned."""
    entry = COMPILED.get(sig) if fast else None
    if entry is None or not aligned(ptrs if tensors is None else tensors):
        return False
    kernel, tail, device_index, g = entry
    stream = raw_stream(device_index)
    full = (*ptrs, *tail)
    enter = knobs.runtime.launch_enter_hook  # launch_metadata only feeds the hooks (None without them)
    meta = kernel.launch_metadata(g, stream, *full) if enter is not None else None
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, meta, enter,
               knobs.runtime.launch_exit_hook, *full)
    return True


def record_plan(name, key, tuned) -> None:
    """Keep the config the autotuner just chose for ``(name, key)``; later calls launch it directly."""
    cfg = tuned.best_config
    PLANS[(name, key)] = (dict(cfg.kwargs), cfg.num_warps, cfg.num_stages)


def launch(name, tuned, raw, grid, fixed, key, tensors, scalars, consts, sig, fast: bool = True) -> None:
    """Launch ``raw(*tensors, *scalars, **consts)`` through the jit function: under the interpreter with
    the ``fixed`` config, else with the plan autotuned for ``(name, key)`` (autotuning on the first call),
    recording the compiled kernel under ``sig`` for :func:`run_cached` when ``fast``."""
    args = (*tensors, *scalars)
    if INTERPRET:
        raw[grid(fixed)](*args, **consts, **fixed)
        return
    plan = PLANS.get((name, key))
    if plan is None:
        tuned[grid](*args, **consts)
        record_plan(name, key, tuned)
        return
    launch_plan(raw, grid, plan, args, consts, len(tensors), sig if aligned(tensors) else None,
                tensors[0].get_device(), fast)


def launch_fixed(raw, grid: tuple, tiles: dict, ptrs: tuple, scalars: tuple, consts: dict, fast: bool = True) -> None:
    """Launch ``raw[grid](*ptrs, *scalars, **consts, **tiles)``, a kernel with fixed tiles (not autotuned): a repeat
    call (same kernel, grid, scalars, pointer dtypes, tiles and constants) through :func:`run_cached`, else through
    the jit function with Triton's default warps and stages, recorded for the next call (when ``fast`` and every
    pointer is 16-byte aligned). Each position of ``scalars`` has one type at every call site (floats passed
    through ``float()``), so the values alone key the cache (``1 == 1.0`` could otherwise share an entry)."""
    sig = (id(raw), ptrs[0].get_device(), grid, scalars, tuple(t.dtype for t in ptrs), tuple(tiles.items()),
           tuple(consts.items()))
    if run_cached(sig, ptrs, fast=fast):
        return
    if INTERPRET:
        raw[grid](*ptrs, *scalars, **consts, **tiles)
        return
    launch_plan(raw, lambda _: grid, (tiles, 4, 3), (*ptrs, *scalars), consts, len(ptrs),
                sig if aligned(ptrs) else None, ptrs[0].get_device(), fast)


def launch_plan(raw, grid, plan, args, consts, n_ptrs: int, sig, device_index: int, fast: bool = True):
    """Launch ``raw`` with ``plan`` = (config kwargs, warps, stages) through the jit function; with ``sig``
    (not None: every pointer argument 16-byte aligned) and ``fast``, record the compiled kernel, its grid
    and the arguments after the ``n_ptrs`` pointers under ``sig``.  Returns the compiled kernel."""
    kw, w, st = plan
    g = grid(kw)
    kernel = raw[g](*args, **consts, **kw, num_warps=w, num_stages=st)
    if sig is None or not fast or kernel is None:
        return kernel
    reason = FAST_LAUNCH_UNAVAILABLE
    if reason is None and not all(hasattr(kernel, a) for a in _COMPILED_KERNEL_API):
        reason = f"Triton {triton.__version__}'s compiled kernels lack one of {_COMPILED_KERNEL_API}"
    if reason is not None:
        warn_plain_launch(reason)
        return kernel
    rest = raw.params[len(args):]
    if all(p.is_constexpr for p in rest):
        if len(COMPILED) >= MAX_COMPILED:
            COMPILED.clear()
        named = {**consts, **kw}
        COMPILED[sig] = (kernel, (*args[n_ptrs:], *(named[p.name] for p in rest)),  # constexprs in signature order
                         device_index, g + (1,) * (3 - len(g)))
    return kernel


def autotune_choices() -> dict:
    """The configs autotune picked so far, per kernel and key (recorded by the benchmark)."""
    return {f"{name} {key}": f"{kw} warps={w} stages={st}" for (name, key), (kw, w, st) in PLANS.items()}


# --------------------------------------------------------------------------------------
# Per-device buffers and facts
# --------------------------------------------------------------------------------------
_DUMMY_SEED: dict = {}


def seed_tensor(seed, device):
    """The dropout seed tensor (int64, one element) the kernels read, or a dummy when there is none."""
    if seed is not None:
        if seed.dtype != torch.int64:
            raise ValueError(f"the dropout seed must be an int64 tensor, got {seed.dtype}; "
                             "make it with torch.randint(..., dtype=torch.int64)")
        return seed
    t = _DUMMY_SEED.get(device)
    if t is None:
        t = _DUMMY_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


_N_SM: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` as torch reports them (4 for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _N_SM:
        _N_SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _N_SM[idx]


_SMEM: dict = {}


def shared_memory_per_block(device_index: int) -> int:
    """The most shared memory one program may use on the device (bytes; 232448 on an H100 / H200)."""
    if device_index not in _SMEM:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        _SMEM[device_index] = props["max_shared_mem"]
    return _SMEM[device_index]


_LOCKS: dict = {}


def tile_locks(device, n: int) -> torch.Tensor:
    """``n`` int32 locks of the kernels whose programs count or wait on each other (split-M tn, the TMA GEMM's
    projection tiles), zero between launches (each launch's last program resets its own).  One buffer per
    device and stream, so launches on two streams never share one; under CUDA graph capture a fresh one that
    the graph owns and zeroes at every replay, so no two graphs share one either."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    stream = None if device.type != "cuda" else raw_stream(device.index)
    key = (device, stream)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < n:
        locks = _LOCKS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return locks
