"""Running under torchrun: this process's rank, its device, and the few collectives the loops use.
Without torchrun every helper is a no-op on rank 0 of 1, so the same code runs on a CPU or one GPU."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(dist: Dist, *args) -> None:
    if dist.is_main:
        print(*args, flush=True)


def pick_device(name: str = "", dist: Dist | None = None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", "mps") or the best available; one GPU per rank under torchrun."""
    dist = dist or Dist()
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; fix: --device cpu")
        if dist.enabled:
            name = f"cuda:{dist.local_rank}"
        if torch.device(name).index is not None:
            torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def init_distributed(device_name: str = "") -> tuple[Dist, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name, dist)
    if dist.enabled and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The other ranks wait while rank 0 builds the dataset cache (minutes for CT volumes).
        torch_dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                      timeout=datetime.timedelta(minutes=60))
    return dist, device


def cleanup_distributed(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, dist: Dist):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, dist: Dist) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. Each rank's last training
    forward updated its own; rank 0's are those saved in the checkpoint, so a sharded evaluation
    scores the model the checkpoint holds."""
    if dist.enabled:
        for b in module.buffers():
            torch_dist.broadcast(b, src=0)


def gather_lists(items: list, dist: Dist) -> list:
    """Concatenate a picklable list from every rank (every rank gets the result)."""
    if not dist.enabled:
        return list(items)
    parts = [None] * dist.world_size
    torch_dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
