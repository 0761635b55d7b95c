"""DDP set-up under torchrun (NCCL on CUDA, gloo on CPU); a single process needs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    info = current()
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()



# ---------------------------------------------------------------------------------------------
# Sharding a stage over ranks (cache, eval, class vectors): each rank takes whole units (shards,
# batches, class chunks) in a fixed round-robin, so a unit is computed exactly as one process
# computes it, and results are combined with sums (adding zeros is exact).


def my_units(n: int, info: DistInfo | None = None) -> range:
    """The units (0..n-1) this rank computes: rank, rank + world, ..."""
    info = info or current()
    return range(info.rank, n, info.world_size)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all ranks (`t` itself in one process); on t's device."""
    if not current().enabled:
        return t
    x = t.to(_collective_device())
    dist.all_reduce(x)
    return x.to(t.device)


def from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `t` on every rank (what rank 0 read decides, e.g. which shards are done)."""
    if not current().enabled:
        return t
    x = t.to(_collective_device())
    dist.broadcast(x, src=0)
    return x.to(t.device)


def join_ranks(device: torch.device) -> tuple[torch.device, DistInfo]:
    """Under torchrun: join the process group and take this rank's device."""
    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device, info
