"""torchrun / DDP plumbing: one process per device, rank 0 writes; also works without torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment; if world > 1 start a process group (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    elif world > 1:
        # Processes on one CPU host would otherwise each start a thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        torch_dist.barrier()


def all_reduce_sums(env: DistEnv, values: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks; every rank must pass the same keys."""
    if not env.distributed:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if env.device.type == "cuda":
        t = t.to(env.device)
    torch_dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_tensor(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; every rank must pass the same shape)."""
    if not env.distributed:
        return t.clone()
    out = t.to(env.device) if env.device.type == "cuda" else t.clone()
    torch_dist.all_reduce(out)
    return out.cpu()


def shutdown(env: DistEnv) -> None:
    if env.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
