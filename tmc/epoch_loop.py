"""The epoch loop of a training run (train.py): train an epoch, validate, write its line of
metrics.jsonl and its checkpoints, until --epochs, early stop or the time limit; and how the loop
stops with a message (Ctrl-C, SIGTERM, a full disk, a non-finite loss, out of GPU memory).

`Run` holds what train.py's phases (build, resume, the loop, finish) share.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tmc.checkpoint import CheckpointWriteError, save_checkpoint, training_checkpoint, weights_checkpoint
from tmc.config import ModelConfig
from tmc.distributed import Dist, barrier, broadcast_buffers, broadcast_object, gather_lists, log
from tmc.engine import (NonFiniteGuard, NonFiniteLossError, capture_rng, predict_records, summarize,
                        train_one_epoch)
from tmc.optim import step_scheduler
from tmc.run_folder import EarlyStop, epoch_record, summary_line
from tmc.train_config import TrainConfig


class RunError(SystemExit):
    """Stops the run with a message for the user (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, preemption): handled like Ctrl-C, so last.pt is saved."""

    signum = signal.SIGTERM


@dataclass
class Run:
    """What the phases of one training run share."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    dist: Dist
    device: torch.device
    out: Path
    t_start: float
    train_loader: Any = None
    val_loader: Any = None
    test_loader: Any = None
    raw: Any = None  # the model itself: evaluation and checkpoints
    model: Any = None  # what trains: `raw`, or it wrapped in DDP / torch.compile
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    generators: dict = field(default_factory=dict)  # "augment", "loader": saved in last.pt
    augment_fn: Any = None
    caption_fn: Any = None
    step: Any = None
    guard: NonFiniteGuard | None = None
    deadline: float | None = None
    early: EarlyStop = field(default_factory=EarlyStop)
    start_epoch: int = 1
    completed: int = 0  # the last finished epoch
    metrics: dict = field(default_factory=dict)  # the latest line of metrics.jsonl
    total_steps: int = 0
    saved_epoch: int = 0  # the epoch last.pt holds
    saved_time: float = 0.0  # when last.pt was written


def train_epochs(r: Run) -> None:
    """The epoch loop, until --epochs, early stop or the time limit; last.pt holds where it ended,
    also after Ctrl-C or SIGTERM."""
    cfg = r.cfg
    try:
        for epoch in range(r.start_epoch, cfg.epochs + 1):
            if r.early.bad_epochs >= cfg.patience:
                break
            train_epoch(r, epoch)
            if stop_after(r, epoch):
                break
        if r.saved_epoch != r.completed:  # the run stops: last.pt holds its final epoch
            save_last(r, r.completed)
            barrier(r.dist)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if r.dist.is_main:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            try:  # mid-epoch weights: resuming restarts epoch `completed + 1` from them (not bit-exact)
                save_checkpoint(r.out / "last.pt", last_checkpoint(
                    r, r.completed, [capture_rng(r.generators)], interrupted=True))
                print(f"\n{how}: saved {r.out / 'last.pt'}; continue with "
                      f"python train.py --out {r.out} --resume", file=sys.stderr, flush=True)
            except CheckpointWriteError as w:
                print(f"\n{how}: {w}", file=sys.stderr, flush=True)
        raise
    except OSError as e:  # a full disk or a folder gone read-only: the files written so far stay whole
        what = str(e) if isinstance(e, CheckpointWriteError) else (
            f"{r.out}: cannot write ({e.strerror or e}); fix: free space there")
        then = (f"last.pt holds epoch {r.saved_epoch}: continue with python train.py --out {r.out} "
                f"--resume" if (r.out / "last.pt").exists() else
                "no checkpoint was saved yet: run the same command again once there is room")
        raise RunError(f"stopped: {what}; {then}") from None
    except NonFiniteLossError as e:
        raise RunError(f"stopped: {e}") from None
    except torch.OutOfMemoryError:
        raise RunError(f"out of GPU memory at batch size {cfg.batch_size}; fix: a smaller "
                       f"--batch-size (e.g. {max(1, cfg.batch_size // 2)}) or --amp bf16 "
                       f"(last.pt in {r.out} holds epoch {r.saved_epoch})") from None


def train_epoch(r: Run, epoch: int) -> None:
    """Train one epoch, validate, write its line of metrics.jsonl and its checkpoints."""
    cfg, dist, raw = r.cfg, r.dist, r.raw
    r.train_loader.sampler.set_epoch(epoch)  # the shuffle is a function of (seed, epoch)
    t0 = time.time()
    stats = train_one_epoch(r.step, r.train_loader, device=r.device, tokenize=raw.tokenize, guard=r.guard,
                            augment_fn=r.augment_fn, caption_fn=r.caption_fn,
                            aug_generator=r.generators["augment"], max_steps=cfg.max_steps_per_epoch,
                            dist=dist, desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress,
                            deadline=r.deadline)
    t1 = time.time()
    broadcast_buffers(raw, dist)
    val = summarize(predict_records(raw, r.val_loader, device=r.device, tokenize=raw.tokenize,
                                    amp=cfg.amp, max_batches=cfg.limit_eval_batches, dist=dist,
                                    desc="val", progress=cfg.progress))
    score = val["dice"] if math.isfinite(val["dice"]) else 0.0
    step_scheduler(r.scheduler, cfg, score)
    improved = r.early.update(score, epoch)
    r.metrics = epoch_record(epoch, stats, val, float(r.optimizer.param_groups[0]["lr"]), improved,
                             r.early, (t0, t1, time.time()))
    r.total_steps += r.metrics["steps"]
    r.metrics["total_steps"] = r.total_steps
    if dist.is_main:
        with open(r.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(r.metrics) + "\n")
        if improved:
            save_checkpoint(r.out / "best.pt", best_checkpoint(r, epoch))
        for n in cfg.snapshot_steps:  # reached during this epoch
            if r.total_steps - r.metrics["steps"] < n <= r.total_steps:
                save_checkpoint(r.out / f"step{n}.pt", best_checkpoint(r, epoch))
        print(summary_line(r.metrics, cfg.epochs), flush=True)
    r.completed = epoch
    if broadcast_object(time.time() - r.saved_time >= 60 * cfg.checkpoint_minutes, dist):
        save_last(r, epoch)
    barrier(dist)  # best.pt / last.pt are complete before any rank reads them


def stop_after(r: Run, epoch: int) -> bool:
    """True when the time limit leaves no room for another epoch, or validation stopped improving."""
    cfg, dist = r.cfg, r.dist
    if r.deadline is not None and epoch < cfg.epochs:
        # Room for one more step and a validation? Rank 0 decides for every rank.
        need = r.metrics["val_time_s"] + r.metrics["train_time_s"] / max(1, r.metrics["steps"])
        if broadcast_object(time.time() + need > r.deadline, dist):
            log(dist, f"time limit of {cfg.time_limit:g} min reached after epoch {epoch} "
                      f"(--time-limit 0 for no limit)")
            return True
    if r.early.bad_epochs >= cfg.patience:
        log(dist, f"early stop: no validation-Dice gain for {cfg.patience} epochs "
                  f"(best {r.early.best:.4f} at epoch {r.early.best_epoch})")
        return True
    return False


def best_checkpoint(r: Run, epoch: int) -> dict:
    """best.pt (and step<N>.pt): weights and configs."""
    return weights_checkpoint(r.raw, r.model_cfg, r.cfg, epoch=epoch, early=asdict(r.early),
                              metrics=r.metrics)


def last_checkpoint(r: Run, epoch: int, rng: list, interrupted: bool = False) -> dict:
    """last.pt: best.pt's keys and what --resume needs."""
    return training_checkpoint(r.raw, r.model_cfg, r.cfg, epoch=epoch, optimizer=r.optimizer,
                               scheduler=r.scheduler, scaler=r.scaler, early=asdict(r.early), rng=rng,
                               metrics=r.metrics, interrupted=interrupted)


def save_last(r: Run, epoch: int) -> None:
    """Write last.pt; every rank calls it, since the RNG states are gathered (one per rank)."""
    rng = gather_lists([capture_rng(r.generators)], r.dist)
    if r.dist.is_main:
        save_checkpoint(r.out / "last.pt", last_checkpoint(r, epoch, rng))
    r.saved_epoch, r.saved_time = epoch, time.time()
