"""Train TMC (paper §4.2) on one dataset; every setting is a flag (see --help).

    python train.py --dataset demo                       # tiny model, synthetic data, a few CPU minutes
    python train.py --dataset qata --root data/QaTa-COV19 --out runs/qata-s0 --seed 0
    python train.py --dataset mosmed --root data/MosMed --mcm-stages none     # ablation: no MCM
    python train.py --out runs/qata-s0 --resume                                  # continue exactly
    torchrun --nproc_per_node 4 train.py --dataset qata --root ...               # DistributedDataParallel
    (build a large cache once first: python -m datasets.prepare --dataset NAME --root PATH)

The run folder (--out) receives config.json, metrics.jsonl (one line per epoch), best.pt (best
validation Dice), last.pt (end of the latest epoch; also written on Ctrl-C and SIGTERM),
test_metrics.json and, with --snapshot-steps, step<N>.pt. A fresh run needs an empty (or new) folder;
--resume continues the run in it.
"""
from __future__ import annotations

import errno
import functools
import json
import signal
import sys
import time
from pathlib import Path

import torch

from datasets.cached import SegmentationSet
from datasets.captions import CaptionVariation
from datasets.loaders import eval_loader, make_generator, train_loader
from datasets.records import DatasetError
from datasets.registry import check_reader_options, check_root, parse_reader_options, prepare
from tmc.augment import augment_training_batch
from tmc.checkpoint import load_checkpoint, upgrade_optimizer_state
from tmc.config import ModelConfig
from tmc.distributed import Dist, broadcast_object, cleanup_distributed, init_distributed, log
from tmc.engine import (NonFiniteGuard, default_workers, make_train_step, predict_records, restore_rng,
                        seed_everything, summarize)
from tmc.epoch_loop import Run, RunError, Terminated, train_epochs
from tmc.model import build_model
from tmc.optim import make_optimizer, make_scheduler
from tmc.precision import make_scaler, resolve_amp
from tmc.run_folder import (START_FILES, EarlyStop, RunFolderBusy, RunLock, default_out, drop_metrics_after,
                            held_files, occupied_message, resolve_configs, write_config, write_text_atomic)
from tmc.step import CudaGraphStep
from tmc.train_config import TrainConfig, build_parser, check_train_config, explicit_overrides


def _raise_terminated(signum, frame):
    raise Terminated()


# ---------------------------------------------------------------------------- data

def make_loaders(cfg: TrainConfig, model_cfg: ModelConfig, dist: Dist, device: torch.device):
    """Build or reuse the cache (rank 0 first), then one loader per split."""
    cache = None
    if dist.is_main:
        try:
            cache = prepare(cfg.dataset, cfg.root or None, image_size=model_cfg.image_size,
                            cache_dir=cfg.cache_dir or None, split_mode=cfg.split_mode,
                            seed=cfg.split_seed, skip_bad=cfg.skip_bad, progress=cfg.progress,
                            **parse_reader_options(cfg.reader_options))
        except DatasetError:
            raise
        except ValueError as e:  # a reader setting the reader refuses (e.g. --reader-options layout=)
            raise RunError(f"--reader-options {cfg.reader_options!r}: {e}") from None
    cache = Path(broadcast_object(str(cache) if cache else None, dist))
    sets = {}
    for split in ("train", "val", "test"):
        try:
            sets[split] = SegmentationSet(cache, split)
        except DatasetError as e:  # an empty split
            if split != "test":
                raise RunError(str(e)) from None
            sets[split] = []  # some layouts ship no test split: train and validate only
    train, loader_gen = train_loader(sets["train"], cfg.batch_size, cfg.workers, device, cfg.seed,
                                     dist.rank, dist.world_size, drop_last=cfg.compile or cfg.cuda_graphs)
    val, test = (eval_loader(sets[split], cfg.eval_batch_size or cfg.batch_size, cfg.workers, device,
                             dist.rank, dist.world_size) for split in ("val", "test"))
    return cache, train, val, test, loader_gen


# ---------------------------------------------------------------------------- the run

def run(cfg: TrainConfig, model_cfg: ModelConfig, ckpt: dict | None, dist: Dist,
        device: torch.device) -> dict:
    """Prepare the run folder, build, resume, train epoch by epoch, test best.pt."""
    t_start = time.time()
    seed_everything(cfg.seed)
    out, lock = prepare_out(cfg, model_cfg, ckpt, dist, device)
    r = Run(cfg, model_cfg, dist, device, out, t_start)
    try:
        return train(r, ckpt)
    except BaseException:
        if ckpt is None and dist.is_main:
            forget_start(out)
        raise
    finally:
        lock.release()


def forget_start(out: Path) -> None:
    """A fresh run that stops before its first checkpoint leaves no config.json or metrics.jsonl:
    a plain rerun then starts in the same --out."""
    if not any(out.glob("*.pt")):
        for name in START_FILES:
            (out / name).unlink(missing_ok=True)


def train(r: Run, ckpt: dict | None) -> dict:
    """Build, resume, train epoch by epoch, test best.pt."""
    cfg = r.cfg
    build(r, ckpt)
    if ckpt is not None:
        resume(r, ckpt)
    r.step = build_step(r)  # after resuming: bf16 copies of the loaded weights
    r.guard = NonFiniteGuard(cfg.max_nonfinite)
    r.deadline = r.t_start + 60 * cfg.time_limit if cfg.time_limit > 0 else None
    r.completed = r.saved_epoch = r.start_epoch - 1
    r.saved_time = time.time()
    train_epochs(r)
    return finish(r)


def prepare_out(cfg: TrainConfig, model_cfg: ModelConfig, ckpt: dict | None, dist: Dist,
                device: torch.device) -> tuple[Path, RunLock | NoLock]:
    """The run folder, locked, checked free (or resumed), with config.json written; settles --amp
    and --workers."""
    out = Path(broadcast_object(str(Path(cfg.out) if cfg.out else default_out(cfg)), dist))
    cfg.out = str(out)
    cfg.amp, amp_note = resolve_amp(cfg.amp, device)
    log(dist, amp_note)
    if cfg.workers < 0:
        cfg.workers = default_workers()
        log(dist, f"workers: {cfg.workers} (the CPU cores available, at most 4; --workers N to choose)")
    lock, why = NoLock(), None
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out)
        except RunFolderBusy as e:
            why = str(e)
        except OSError as e:
            why = f"--out {out}: cannot write there ({e.strerror or e}); fix: --out a folder you can write"
    # held_files also removes a killed save's temporaries and a start's files that no checkpoint followed
    held = held_files(out, fresh=ckpt is None) if dist.is_main and why is None else []
    held = broadcast_object(held if ckpt is None else [], dist)  # every rank stops together
    why = broadcast_object(why or (occupied_message(out, held) if held else None), dist)
    if why:
        lock.release()
        raise RunError(why)
    if dist.is_main:
        try:
            if ckpt is not None:
                drop_metrics_after(out / "metrics.jsonl", ckpt["epoch"])
            resolved = write_config(out, cfg, model_cfg, dist.world_size, device, torch.__version__)
        except OSError as e:
            lock.release()
            fix = "free space there" if e.errno == errno.ENOSPC else "--out a folder you can write"
            raise RunError(f"--out {out}: cannot write config.json ({e.strerror or e}); fix: {fix}") from None
        print("resolved configuration:\n" + json.dumps(resolved, indent=2), flush=True)
    return out, lock


class NoLock:
    """What ranks other than 0 hold: the run folder is rank 0's to lock."""

    def release(self) -> None:
        pass


def build(r: Run, ckpt: dict | None) -> None:
    """Loaders, model (wrapped for DDP / compile), optimizer, schedule, scaler, augmentation."""
    cfg, dist = r.cfg, r.dist
    cache, r.train_loader, r.val_loader, r.test_loader, loader_gen = make_loaders(cfg, r.model_cfg, dist,
                                                                                  r.device)
    log(dist, f"data: {cache} | train {len(r.train_loader.dataset)} | val {len(r.val_loader.dataset)} "
              f"| test {len(r.test_loader.dataset)} images")
    r.raw = r.model = build_model(r.model_cfg, load_pretrained=ckpt is None,
                                  text_config=ckpt.get("text_config") if ckpt else None).to(r.device)
    if dist.enabled:
        # find_unused_parameters: ablations leave heads unused (e.g. alignment off, λ = 0).
        r.model = torch.nn.parallel.DistributedDataParallel(
            r.raw, device_ids=[r.device.index] if r.device.type == "cuda" else None,
            find_unused_parameters=True)
    if cfg.compile:  # training steps only: evaluation and checkpoints use `raw`
        r.model = torch.compile(r.model)
    r.optimizer = make_optimizer(r.raw, cfg, r.device)
    r.scheduler = make_scheduler(r.optimizer, cfg, start=r.t_start)
    r.scaler = make_scaler(r.device, cfg.amp)
    # Different augmentations per rank; the same stream on every run with this seed.
    r.generators = {"augment": make_generator(cfg.seed + 7919 * (dist.rank + 1), r.device),
                    "loader": loader_gen}
    if cfg.augment != "none":
        r.augment_fn = functools.partial(augment_training_batch, mode=cfg.augment)
    if r.model_cfg.use_text and cfg.captions == "varied":
        r.caption_fn = CaptionVariation(pool=cfg.caption_pool, dropout=cfg.caption_dropout,
                                        keep=cfg.caption_keep)


def resume(r: Run, ckpt: dict) -> None:
    """Weights, optimizer, schedule, scaler, early-stop state and RNG streams from last.pt."""
    r.raw.load_state_dict(ckpt["model"])
    r.optimizer.load_state_dict(upgrade_optimizer_state(ckpt["optimizer"], ckpt["model"], r.optimizer, r.raw))
    r.scheduler.load_state_dict(ckpt["scheduler"])
    r.scaler.load_state_dict(ckpt["scaler"])
    r.early = EarlyStop(**ckpt["early_stop"])
    states = ckpt["rng"]  # one per rank of the run that wrote it
    restore_rng(states[r.dist.rank % len(states)], r.generators)
    r.start_epoch = ckpt["epoch"] + 1
    r.total_steps = ckpt["metrics"].get("total_steps", 0)
    if not (r.out / "best.pt").exists() and r.early.best_epoch:  # deleted since: write a new one
        note, stale = "", r.out / "test_metrics.json"
        if r.dist.is_main and stale.exists():  # it scored the missing best.pt
            stale.replace(r.out / "test_metrics.old.json")
            note = "; test_metrics.json (of that best.pt) is kept as test_metrics.old.json"
        log(r.dist, f"{r.out / 'best.pt'} is missing: its best val Dice ({r.early.best:.4f}, epoch "
                    f"{r.early.best_epoch}) is forgotten, so the next validation writes a new best.pt "
                    f"and the test step scores it{note}")
        r.early = EarlyStop(bad_epochs=r.early.bad_epochs)
    log(r.dist, f"resumed from {r.out / 'last.pt'} at epoch {ckpt['epoch']} (best val Dice "
                f"{r.early.best:.4f} at epoch {r.early.best_epoch})")


def build_step(r: Run):
    """The training step; replayed as a CUDA graph with --cuda-graphs where that can run."""
    step = make_train_step(r.model, r.optimizer, r.scaler, r.cfg, device=r.device,
                           alignment_form=r.model_cfg.alignment_form, dist=r.dist)
    if not r.cfg.cuda_graphs:
        return step
    why = ("it needs a CUDA device" if r.device.type != "cuda" else
           "it does not combine with torchrun" if r.dist.enabled else
           "it does not combine with --compile" if r.cfg.compile else "")
    if why:
        log(r.dist, f"--cuda-graphs ignored: {why}; training eagerly")
        return step
    return CudaGraphStep(step)


def finish(r: Run) -> dict:
    """Paths and best score of the run; best.pt scored on the test split (--test-at-end)."""
    out = r.out
    result = {"out": str(out), "best": str(out / "best.pt"), "last": str(out / "last.pt"),
              "best_val_dice": r.early.best, "best_epoch": r.early.best_epoch}
    if r.cfg.test_at_end and len(r.test_loader.dataset) and (out / "best.pt").exists():
        result["test"] = test_best(r.raw, out, r.test_loader, r.cfg, r.dist, r.device)
    elif r.cfg.test_at_end and len(r.test_loader.dataset):
        log(r.dist, f"no test step: {out / 'best.pt'} does not exist (no epoch was validated)")
    return result


def test_best(raw, out: Path, test_loader, cfg: TrainConfig, dist: Dist, device) -> dict:
    """Evaluate best.pt on the test split; rank 0 prints and writes test_metrics.json."""
    raw.load_state_dict(load_checkpoint(out / "best.pt", map_location=device)["model"])
    records = predict_records(raw, test_loader, device=device, tokenize=raw.tokenize, amp=cfg.amp,
                              dist=dist, desc="test", progress=cfg.progress)
    s = summarize(records)
    s.pop("cases")
    if dist.is_main:
        write_text_atomic(out / "test_metrics.json", json.dumps(s, indent=2) + "\n")
        print(f"test Dice {s['dice']:.4f} mIoU {s['miou']:.4f} ({s['protocol']} mean over "
              f"{s['n_cases'] if s['protocol'] == 'per-case' else s['n_images']}; global Dice "
              f"{s['dice_global']:.4f}; {s['empty_rule']})", flush=True)
        print(f"checkpoint: {out / 'best.pt'}", flush=True)
    return s


def main(argv: list[str] | None = None) -> dict:
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    train_over, model_over = explicit_overrides(args)
    try:
        dist, device = init_distributed(train_over.get("device", ""))
    except ValueError as e:  # --device cuda without CUDA
        raise RunError(str(e)) from None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        try:  # every flag checked before any work
            cfg, model_cfg, ckpt = resolve_configs(train_over, model_over)
            check_train_config(cfg)
            check_reader_options(cfg.dataset, parse_reader_options(cfg.reader_options))
            check_root(cfg.dataset, cfg.root)
        except ValueError as e:
            raise RunError(str(e)) from None
        return run(cfg, model_cfg, ckpt, dist, device)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        cleanup_distributed(dist)


if __name__ == "__main__":
    try:
        main()
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(130)
    except DatasetError as e:  # a problem with the user's files: the message says which and the fix
        sys.exit(f"train.py: {e}")
