"""Running `guidance-eval run` under torchrun / accelerate launch: the process group and its helpers.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 the
runner joins the process group (NCCL on GPUs, gloo on the CPU), shards image indices i by
i % world_size == rank, and lets torchmetrics reduce the metric states at compute time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, num_items: int) -> list[int]:
        return list(range(self.rank, num_items, self.world_size))

    def sum(self, value: float) -> float:
        """Sum a number over all processes (float64, so counts and seconds stay exact enough)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t.item())

    def sum_many(self, values: list[float]) -> list[float]:
        """Several sums in one collective (one per batch keeps the processes in step cheaply)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def min(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MIN)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=op)
        return float(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the launcher's process group if there is one; returns it and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return Dist(dist.get_rank(), dist.get_world_size()), device
