"""Process-group setup and model wrapping (FSDP2 / DDP / none) for ``torchrun``.

``torchrun --nproc-per-node N scripts/finetune.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them the recipe runs as a single process with no process group. Every rank builds the
same model from the same seed; rank 0 alone writes files (``save_adapter`` and the optimizer
state gather are collectives that every rank enters).
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError, DistributedConfig
from .model import decoder_layers

__all__ = ["DistEnv", "setup_distributed", "wrap_model", "all_reduce_sum", "barrier", "cleanup"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(cfg: DistributedConfig, device: str, load_in_4bit: bool = False) -> DistEnv:
    """Read torchrun's environment, pick the device and strategy, init the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("`train.device: cuda` but no CUDA device is available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "none" if world == 1 else ("ddp" if load_in_4bit else "fsdp2")
    if world > 1 and strategy == "none":
        raise ConfigError(f"`distributed.strategy: none` with {world} processes: use fsdp2 or ddp")
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ConfigError("`distributed.backend: nccl` needs CUDA; use gloo on CPU")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=strategy)


def wrap_model(model: nn.Module, env: DistEnv, cfg: DistributedConfig) -> nn.Module:
    """Move/shard/replicate the (already LoRA-patched) model. Returns the module to train.

    - fsdp2: ``fully_shard`` on every decoder layer, then on the root; FSDP2 moves each
      layer to the device as it shards it (the full model never sits on one GPU).
    - ddp: ``DistributedDataParallel`` (gradients all-reduced for the adapters only).
    - none: ``model.to(device)``.
    """
    if env.strategy == "fsdp2" and env.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        layers = decoder_layers(model)
        if not layers:
            raise ConfigError("`distributed.strategy: fsdp2`: could not find the model's decoder layers to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        return model
    model.to(env.device)
    if env.strategy == "ddp" and env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def no_sync(model: nn.Module, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on non-final accumulation micro-batches."""
    if sync or env.world_size == 1:
        return contextlib.nullcontext()
    if env.strategy == "ddp":
        return model.no_sync()
    if env.strategy == "fsdp2" and hasattr(model, "set_requires_gradient_sync"):

        @contextlib.contextmanager
        def _ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _ctx()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.initialized and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.initialized and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(env: DistEnv) -> None:
    if env.initialized and env.world_size > 1:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    """Destroy the process group once the run is over, with nothing left that still holds it.

    The trained model (FSDP2 states, DDP's reducer) outlives the training function in reference cycles.
    Left to the interpreter's shutdown, those hold the gloo group past ``destroy_process_group`` and are
    torn down after it, which now and then aborted a rank at exit ("terminate called without an active
    exception") after a run had finished and saved everything.  Collecting them first frees them while
    the group and the interpreter are both whole."""
    if env.initialized:
        gc.collect()
        dist.destroy_process_group()
