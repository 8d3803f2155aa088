"""DataLoaders over a prepared cache (datasets/cached.py), built the same way for training and
evaluation: the training split shuffled as a function of (seed, epoch), so a resumed run sees the
same order; evaluation splits in order, sharded across ranks without repeating an image."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy/python seeds from the worker's torch seed, which the
    loader draws from its seeded generator (so workers differ, and runs repeat)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... without padding, so evaluation sees every image exactly once
    (DistributedSampler would repeat images to even out the shards)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _common(workers: int, device: torch.device) -> dict:
    return dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                persistent_workers=workers > 0)


def train_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False
                 ) -> tuple[DataLoader, torch.Generator]:
    """Shuffled batches (call `loader.sampler.set_epoch(epoch)` each epoch), and the loader's
    generator (its state goes into last.pt). `drop_last` keeps shapes static (--compile,
    --cuda-graphs)."""
    generator = make_generator(seed)
    sampler = DistributedSampler(ds, world_size, rank, shuffle=True, seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, generator=generator,
                        drop_last=drop_last, **_common(workers, device))
    return loader, generator


def eval_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Batches in order; under several ranks each holds every world_size-th image."""
    sampler = ShardSampler(len(ds), rank, world_size) if world_size > 1 else None
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler,
                      **_common(workers, device))
