"""Kernel policy as an explicit, per-module setting.

A ``KernelOptions`` value travels from ``PeftConfig.kernels`` (or the recipe's ``peft.kernels``, or
``patch_linear_module(..., kernels=)``) to every adapted module and from there into each
``lora_linear`` / ``lora_linear_dequant`` / ``lora_add`` call.  Nothing in the kernel path reads
process-global policy: two models in one process can run different settings side by side.

The environment variables below are defaults only, read when a ``KernelOptions`` is built without
that field (so a value written in code or YAML always wins):

    AUTOMODEL_LORA_BASE_GEMM     "auto" | "cublas" | "triton"
    AUTOMODEL_LORA_FUSE_PROJ     "1" | "0"
    AUTOMODEL_LORA_FAST_LAUNCH   "1" | "0"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BASE_GEMMS = ("auto", "cublas", "triton")


def _env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default)
    if value not in allowed:
        raise ValueError(f"environment variable {name}={value!r} is not allowed; use one of {allowed} (or unset it)")
    return value


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"environment variable {name}={value!r} must be '0' or '1' (or unset)")
    return value == "1"


@dataclass(frozen=True)
class KernelOptions:
    """How the Triton kernel path runs one adapted module (ignored by the PyTorch reference path).

    Args:
        base_gemm: how the low-rank term reaches the frozen base GEMM. ``"triton"``: one Triton GEMM
            takes it as an extra K step (the TMA kernel on Hopper); ``"cublas"``: it is written first
            and added by cuBLAS's beta=1 epilogue; ``"auto"``: the TMA GEMM where it measured faster
            (Hopper, 16-bit, rank <= 64, large GEMMs), cuBLAS elsewhere.
            Default: ``AUTOMODEL_LORA_BASE_GEMM`` or ``"auto"``.
        fuse_proj: let the TMA base GEMM make the skinny product (``x A^T`` / ``dy B``) itself in
            time its schedule leaves idle. Its programs wait on one another's flags, so every program
            of the grid (one per SM torch reports) must be resident at once. The product checks one
            case itself: under MPS with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` below 100 the fused
            projection is not used, whatever this says. A partition torch cannot see (a CUDA green
            context, or any other cap on the SMs a process gets that leaves torch reporting the whole
            device) is not detected: there set ``fuse_proj=False`` (or ``AUTOMODEL_LORA_FUSE_PROJ=0``),
            else the launch can wait forever.
            Default: ``AUTOMODEL_LORA_FUSE_PROJ`` or on.
        fast_launch: launch compiled kernels through the cached direct path (less host time per
            call) where the installed Triton is the release it was run with on the GPU
            (``launch.FAST_LAUNCH_TESTED``: Triton 3.6 only, with torch 2.11) and torch has the stream API
            it uses; with any other Triton (one warning on the GPU), and with ``False``, through the plain
            ``kernel[grid](...)`` launch.  Results are the same either way.
            Default: ``AUTOMODEL_LORA_FAST_LAUNCH`` or on.

    Raises:
        ValueError: a field outside the values above.
    """

    base_gemm: str = field(default_factory=lambda: _env_choice("AUTOMODEL_LORA_BASE_GEMM", "auto", BASE_GEMMS))
    fuse_proj: bool = field(default_factory=lambda: _env_flag("AUTOMODEL_LORA_FUSE_PROJ", True))
    fast_launch: bool = field(default_factory=lambda: _env_flag("AUTOMODEL_LORA_FAST_LAUNCH", True))

    def __post_init__(self):
        if self.base_gemm not in BASE_GEMMS:
            raise ValueError(f"KernelOptions.base_gemm={self.base_gemm!r} is not allowed; use one of {BASE_GEMMS}")
        for flag in ("fuse_proj", "fast_launch"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"KernelOptions.{flag} must be true or false, got {getattr(self, flag)!r}")

    def replace(self, **changes: Any) -> KernelOptions:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that ``from_dict`` turns back into an equal value."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | KernelOptions | None) -> KernelOptions:
        """Build from a mapping (a YAML ``kernels:`` section); missing keys take their defaults.

        Raises:
            ValueError: a key that is not a field (the message lists the valid ones), or a bad value.
        """
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"KernelOptions expects a mapping such as {{base_gemm: auto}}, got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown KernelOptions key(s) {unknown}; valid keys are {valid}")
        return cls(**d)


def all_programs_resident(sm_count: int, *, env: Mapping[str, str] | None = None,
                          free_sms: int | None = None) -> bool:
    """Whether a persistent grid of one program per SM (``sm_count`` of them, the count torch reports) can
    have every program resident at once: the condition for the fused projection, whose programs spin-wait
    on flags that other programs of the same launch raise.

    A pure rule (no device query), so that it can be tested anywhere:

    * under MPS, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (in ``env``, default ``os.environ``) below 100 caps
      the SMs this process's kernels may occupy at once: not resident (an unreadable value counts as a cap);
    * ``free_sms``, where the caller knows it, below ``sm_count``: not resident.

    The product (``dispatch.fused_proj_safe``) applies the MPS half only: it never passes ``free_sms``,
    because torch reports the whole device's SM count inside a CUDA green context (or any other partition
    it cannot see), and nothing else tells this package how many SMs it got.  On such a partition set
    ``KernelOptions(fuse_proj=False)``.  Neither a MIG slice (torch reports the slice's own SM count) nor
    time-slicing between processes (a launch runs whole) breaks residency.

    Args:
        sm_count: programs of the grid, one per SM as ``torch.cuda.get_device_properties`` reports them.
        env: the environment to read (default ``os.environ``).
        free_sms: SMs this process's kernels can occupy at once, for a caller that knows it (the product
            does not: see above).
    """
    env = os.environ if env is None else env
    pct = env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if pct is not None and pct.strip():
        try:
            if float(pct) < 100.0:
                return False
        except ValueError:
            return False
    return free_sms is None or free_sms >= sm_count
