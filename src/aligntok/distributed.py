"""The process world: torchrun's environment -> a process group (gloo on CPU, nccl on CUDA), else one process.

Device and dtype come from here and nowhere else. Rank-aware helpers keep logging and progress bars on
rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def _pick_device(local_rank: int) -> torch.device:
    wanted = os.environ.get("ALIGNTOK_DEVICE")
    if wanted:
        return torch.device(wanted)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init() -> World:
    """Initialise (once) and return the world. Under torchrun this joins the process group."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = _pick_device(local_rank)
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _WORLD = World(rank, world_size, local_rank, device)
    else:
        _WORLD = World(0, 1, 0, _pick_device(0))
    return _WORLD


def world() -> World:
    return init()


def device() -> torch.device:
    return init().device


def shutdown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (a copy; `x` itself on one process). Every rank must call it."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def autocast(enabled: bool, device_type: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast when `enabled` (a flag in every training config), a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type or device().type, dtype=torch.bfloat16)


def print0(*args, **kwargs) -> None:
    if world().is_main:
        print(*args, **kwargs, flush=True)
