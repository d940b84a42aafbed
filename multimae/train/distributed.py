"""DDP plumbing read from the `torchrun` environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """Read the torchrun environment, pick the device and join the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    # one process may pick its GPU (cuda:N); under torchrun each rank takes its LOCAL_RANK's
    chosen = device if device.startswith("cuda:") and world == 1 else f"cuda:{local_rank}"
    dev = torch.device(chosen if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one rank); the result is on the CPU."""
    if d.enabled:
        x = x.to(d.device)
        dist.all_reduce(x)
    return x.cpu()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over ranks, left on the device (a no-op on one rank): no host sync."""
    if not d.enabled:
        return x
    x = x.to(d.device)
    dist.all_reduce(x)
    return x / d.world


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_gather(value: Any, d: Dist) -> list[Any]:
    """Every rank's `value` (picklable primitives), in rank order."""
    if not d.enabled:
        return [value]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, value)
    return out
