"""Train TMC (paper §4.2) on one dataset; every setting is a flag (see --help).

    python train.py --dataset demo                       # tiny model, synthetic data, a few CPU minutes
    python train.py --dataset qata --root /data/QaTa-COV19 --out runs/qata-s0 --seed 0
    python train.py --dataset mosmed --root /data/MosMed --mcm-stages none     # ablation: no MCM
    python train.py --out runs/qata-s0 --resume                                  # continue exactly
    torchrun --nproc_per_node 4 train.py --dataset qata --root ...               # DistributedDataParallel
    (build a large cache once first: python -m datasets.prepare --dataset NAME --root PATH)

The run folder (--out) receives config.json, metrics.jsonl (one line per epoch), best.pt (best
validation Dice), last.pt (end of the latest epoch; also written on Ctrl-C and SIGTERM),
test_metrics.json and, with --snapshot-steps, step<N>.pt. A fresh run needs an empty (or new) folder;
--resume continues the run in it.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from tmc.checkpoint import (MODEL_KEYS, CheckpointError, load_checkpoint, save_checkpoint,
                            training_checkpoint, upgrade_optimizer_state, weights_checkpoint)
from tmc.config import ModelConfig
from tmc.distributed import (Dist, barrier, broadcast_buffers, cleanup_distributed, gather_lists,
                             init_distributed)
from tmc.engine import (
    NonFiniteGuard, NonFiniteLossError, capture_rng, default_workers, make_generator, make_scaler,
    make_train_step, predict_records, resolve_amp, restore_rng, seed_everything, summarize,
    train_one_epoch,
)
from tmc.model import build_model
from tmc.optim import make_optimizer, make_scheduler, step_scheduler
from tmc.run_folder import (check_resume, default_out, drop_metrics_after, held_files, occupied_message,
                            write_config)
from tmc.train_config import (
    TrainConfig, build_parser, check_train_config, explicit_overrides, parse_reader_options,
    resolve_model_config, resolve_train_config,
)


class RunError(SystemExit):
    """Stops the run with a message for the user (exit status 1)."""

    def __init__(self, message: str):
        super().__init__(message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, preemption): handled like Ctrl-C, so last.pt is saved."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def log(dist: Dist, *args) -> None:
    if dist.is_main:
        print(*args, flush=True)


def _broadcast(obj, dist: Dist):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- configuration

def resolve_configs(train_over: dict, model_over: dict) -> tuple[TrainConfig, ModelConfig, dict | None]:
    """Configs of this run, and the checkpoint to resume from (or None)."""
    if not train_over.get("resume"):
        cfg = resolve_train_config(train_over)
        return cfg, resolve_model_config(cfg.preset, model_over, cfg.dataset), None
    if not train_over.get("out"):
        raise RunError("--resume needs the run folder: --out DIR (the folder holding last.pt)")
    path = Path(train_over["out"]) / "last.pt"
    if not path.is_file():
        raise RunError(f"{path}: nothing to resume; fix: check --out, or drop --resume to start anew")
    try:
        ckpt = load_checkpoint(path, require=(*MODEL_KEYS, "train_config", "optimizer", "rng"))
    except CheckpointError as e:
        raise RunError(f"--resume: {e}") from None
    try:
        check_resume(ckpt, train_over, path.parent)
    except ValueError as e:
        raise RunError(str(e)) from None
    model_cfg = ModelConfig.from_dict(ckpt["model_config"])
    changed = {k: v for k, v in model_over.items() if getattr(model_cfg, k) != v}
    if changed:
        raise RunError(f"--resume keeps the checkpoint's model; these flags would change it: "
                       f"{changed}; fix: drop them, or start a new run with another --out")
    cfg = resolve_train_config(train_over, base=ckpt["train_config"])
    return cfg, model_cfg, ckpt


# ---------------------------------------------------------------------------- data

def make_loaders(cfg: TrainConfig, model_cfg: ModelConfig, dist: Dist, device: torch.device):
    """Build or reuse the cache (rank 0 first), then one loader per split."""
    from datasets.cached import SegmentationSet
    from datasets.loaders import eval_loader, train_loader
    from datasets.records import DatasetError
    from datasets.registry import prepare

    def _prepare():
        return prepare(cfg.dataset, cfg.root or None, image_size=model_cfg.image_size,
                       cache_dir=cfg.cache_dir or None, split_mode=cfg.split_mode, seed=cfg.split_seed,
                       skip_bad=cfg.skip_bad, progress=cfg.progress,
                       **parse_reader_options(cfg.reader_options))

    cache = _prepare() if dist.is_main else None
    cache = Path(_broadcast(str(cache) if cache else None, dist))
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

    def evaluation(ds):
        return eval_loader(ds, cfg.eval_batch_size or cfg.batch_size, cfg.workers, device, dist.rank,
                           dist.world_size)

    return cache, train, evaluation(sets["val"]), evaluation(sets["test"]), loader_gen


# ---------------------------------------------------------------------------- the run

def run(cfg: TrainConfig, model_cfg: ModelConfig, ckpt: dict | None, dist: Dist,
        device: torch.device) -> dict:
    t_start = time.time()
    seed_everything(cfg.seed)
    out = Path(_broadcast(str(Path(cfg.out) if cfg.out else default_out(cfg)), dist))
    cfg.out = str(out)
    cfg.amp, amp_note = resolve_amp(cfg.amp, device)
    log(dist, amp_note)
    if cfg.workers < 0:
        cfg.workers = default_workers()
        log(dist, f"workers: {cfg.workers} (the CPU cores available, at most 4; --workers N to choose)")
    held = held_files(out) if dist.is_main else []  # also removes a killed save's temporaries
    held = _broadcast(held if ckpt is None else [], dist)  # every rank stops together
    if held:
        raise RunError(occupied_message(out, held))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            drop_metrics_after(out / "metrics.jsonl", ckpt["epoch"])
        resolved = write_config(out, cfg, model_cfg, dist.world_size, device, torch.__version__)
        print("resolved configuration:\n" + json.dumps(resolved, indent=2), flush=True)

    cache, train_loader, val_loader, test_loader, loader_gen = make_loaders(cfg, model_cfg, dist, device)
    log(dist, f"data: {cache} | train {len(train_loader.dataset)} | val {len(val_loader.dataset)} "
              f"| test {len(test_loader.dataset)} images")

    model = build_model(model_cfg, load_pretrained=ckpt is None,
                        text_config=ckpt.get("text_config") if ckpt else None).to(device)
    raw = model
    if dist.enabled:
        # find_unused_parameters: ablations leave heads unused (e.g. alignment off, λ = 0).
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    if cfg.compile:  # training steps only: evaluation and checkpoints use `raw`
        model = torch.compile(model)
    optimizer = make_optimizer(raw, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, start=t_start)
    scaler = make_scaler(device, cfg.amp)
    # Different augmentations per rank; the same stream on every run with this seed.
    aug_gen = make_generator(cfg.seed + 7919 * (dist.rank + 1), device)
    generators = {"augment": aug_gen, "loader": loader_gen}
    augment_fn = None
    if cfg.augment != "none":
        import functools

        from datasets.augment import augment_training_batch
        augment_fn = functools.partial(augment_training_batch, mode=cfg.augment)
    caption_fn = None
    if model_cfg.use_text and cfg.captions == "varied":
        from datasets.captions import CaptionVariation
        caption_fn = CaptionVariation(dropout=cfg.caption_dropout)

    early = {"best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    start_epoch = 1
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(upgrade_optimizer_state(ckpt["optimizer"], ckpt["model"], optimizer, raw))
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        early = dict(ckpt["early_stop"])
        states = ckpt["rng"]  # one per rank of the run that wrote it
        restore_rng(states[dist.rank % len(states)], generators)
        start_epoch = ckpt["epoch"] + 1
        log(dist, f"resumed from {out / 'last.pt'} at epoch {ckpt['epoch']} (best val Dice "
                  f"{early['best']:.4f} at epoch {early['best_epoch']})")

    step = make_train_step(model, optimizer, scaler, cfg, device=device,  # after resuming: bf16 copies
                           alignment_form=model_cfg.alignment_form, dist=dist)
    if cfg.cuda_graphs:
        why = ("it needs a CUDA device" if device.type != "cuda" else
               "it does not combine with torchrun" if dist.enabled else
               "it does not combine with --compile" if cfg.compile else "")
        if why:
            log(dist, f"--cuda-graphs ignored: {why}; training eagerly")
        else:
            from tmc.step import CudaGraphStep
            step = CudaGraphStep(step)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    deadline = t_start + 60 * cfg.time_limit if cfg.time_limit > 0 else None
    completed = start_epoch - 1  # last finished epoch
    metrics: dict = {}
    total_steps = ckpt["metrics"].get("total_steps", 0) if ckpt else 0
    state = dict(model_cfg=model_cfg, cfg=cfg, optimizer=optimizer, scheduler=scheduler,
                 scaler=scaler, early=early)
    saved = {"epoch": completed, "time": time.time()}  # last.pt as of when

    def save_last(epoch: int) -> None:  # every rank calls it: the RNG states are gathered
        rng = gather_lists([capture_rng(generators)], dist)  # one state per rank
        if dist.is_main:
            save_checkpoint(out / "last.pt",
                            training_checkpoint(raw, epoch=epoch, metrics=metrics, rng=rng, **state))
        saved.update(epoch=epoch, time=time.time())

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if early["bad_epochs"] >= cfg.patience:
                break
            train_loader.sampler.set_epoch(epoch)  # the shuffle is a function of (seed, epoch)
            t0 = time.time()
            stats = train_one_epoch(step, train_loader, device=device, tokenize=raw.tokenize, guard=guard,
                                    augment_fn=augment_fn, caption_fn=caption_fn, aug_generator=aug_gen,
                                    max_steps=cfg.max_steps_per_epoch, dist=dist,
                                    desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress,
                                    deadline=deadline)
            t1 = time.time()
            broadcast_buffers(raw, dist)
            val = summarize(predict_records(raw, val_loader, device=device, tokenize=raw.tokenize,
                                            amp=cfg.amp, max_batches=cfg.limit_eval_batches, dist=dist,
                                            desc="val", progress=cfg.progress))
            score = val["dice"] if math.isfinite(val["dice"]) else 0.0
            step_scheduler(scheduler, cfg, score)
            improved = update_early_stop(early, score, epoch)
            metrics = epoch_record(epoch, stats, val, float(optimizer.param_groups[0]["lr"]), improved,
                                   early, (t0, t1, time.time()))
            total_steps += metrics["steps"]
            metrics["total_steps"] = total_steps
            if dist.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if improved:
                    save_checkpoint(out / "best.pt", weights_checkpoint(
                        raw, model_cfg, cfg, epoch=epoch, early=early, metrics=metrics))
                for n in cfg.snapshot_steps:  # reached during this epoch
                    if total_steps - metrics["steps"] < n <= total_steps:
                        save_checkpoint(out / f"step{n}.pt", weights_checkpoint(
                            raw, model_cfg, cfg, epoch=epoch, early=early, metrics=metrics))
                print(summary_line(metrics, cfg.epochs), flush=True)
            completed = epoch
            if _broadcast(time.time() - saved["time"] >= 60 * cfg.checkpoint_minutes, dist):
                save_last(epoch)
            barrier(dist)  # best.pt / last.pt are complete before any rank reads them
            if deadline is not None and epoch < cfg.epochs:
                # Room for one more step and a validation? Rank 0 decides for every rank.
                need = metrics["val_time_s"] + metrics["train_time_s"] / max(1, metrics["steps"])
                if _broadcast(time.time() + need > deadline, dist):
                    log(dist, f"time limit of {cfg.time_limit:g} min reached after epoch {epoch} "
                              f"(--time-limit 0 for no limit)")
                    break
            if early["bad_epochs"] >= cfg.patience:
                log(dist, f"early stop: no validation-Dice gain for {cfg.patience} epochs "
                          f"(best {early['best']:.4f} at epoch {early['best_epoch']})")
                break
        if saved["epoch"] != completed:  # the run stops: last.pt holds its final epoch
            save_last(completed)
            barrier(dist)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if dist.is_main:
            # Mid-epoch weights: resuming restarts epoch `completed + 1` from them (not bit-exact).
            save_checkpoint(out / "last.pt", training_checkpoint(
                raw, epoch=completed, metrics=metrics, rng=[capture_rng(generators)], interrupted=True,
                **state))
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"\n{how}: saved {out / 'last.pt'}; continue with "
                  f"python train.py --out {out} --resume", file=sys.stderr, flush=True)
        raise
    except NonFiniteLossError as e:
        raise RunError(f"stopped: {e}") from None
    except torch.OutOfMemoryError:
        raise RunError(f"out of GPU memory at batch size {cfg.batch_size}; fix: a smaller "
                       f"--batch-size (e.g. {max(1, cfg.batch_size // 2)}) or --amp bf16 "
                       f"(last.pt in {out} holds epoch {saved['epoch']})") from None

    result = {"out": str(out), "best": str(out / "best.pt"), "last": str(out / "last.pt"),
              "best_val_dice": early["best"], "best_epoch": early["best_epoch"]}
    if cfg.test_at_end and len(test_loader.dataset) and (out / "best.pt").exists():
        result["test"] = test_best(raw, out, test_loader, cfg, dist, device)
    return result


def update_early_stop(early: dict, score: float, epoch: int) -> bool:
    """Record this epoch's validation score; True when it is the best so far (best.pt is written)."""
    if score > early["best"]:
        early.update(best=score, best_epoch=epoch, bad_epochs=0)
        return True
    early["bad_epochs"] += 1
    return False


def epoch_record(epoch: int, stats: dict, val: dict, lr: float, improved: bool, early: dict,
                 times: tuple[float, float, float]) -> dict:
    """One line of metrics.jsonl; `times` = (start, end of training, end of validation)."""
    t0, t1, t2 = times
    return {
        "epoch": epoch, "train_loss": stats["loss"], "train_seg": stats["seg"],
        "train_align": stats["align"], "steps": stats["steps"], "skipped_nonfinite": stats["skipped"],
        "val_dice": val["dice"], "val_miou": val["miou"], "val_dice_global": val["dice_global"],
        "val_protocol": val["protocol"], "lr": lr, "improved": improved, "best_val_dice": early["best"],
        "time_s": round(t2 - t0, 2), "train_time_s": round(t1 - t0, 2), "val_time_s": round(t2 - t1, 2),
    }


def summary_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:3d}/{epochs} | loss {m['train_loss']:.4f} (seg {m['train_seg']:.4f} "
            f"align {m['train_align']:.4f}) | val Dice {m['val_dice']:.4f} mIoU {m['val_miou']:.4f} "
            f"global {m['val_dice_global']:.4f} | lr {m['lr']:.2e} | {m['steps']} steps "
            f"{m['time_s']:.1f}s"
            + (" | best" if m["improved"] else "")
            + (f" | skipped {m['skipped_nonfinite']} non-finite" if m["skipped_nonfinite"] else ""))


def test_best(raw, out: Path, test_loader, cfg: TrainConfig, dist: Dist, device) -> dict:
    """Evaluate best.pt on the test split; rank 0 prints and writes test_metrics.json."""
    raw.load_state_dict(load_checkpoint(out / "best.pt", map_location=device)["model"])
    records = predict_records(raw, test_loader, device=device, tokenize=raw.tokenize, amp=cfg.amp,
                              dist=dist, desc="test", progress=cfg.progress)
    s = summarize(records)
    s.pop("cases")
    if dist.is_main:
        (out / "test_metrics.json").write_text(json.dumps(s, indent=2) + "\n")
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
            from datasets.registry import check_reader_options
            check_reader_options(cfg.dataset, parse_reader_options(cfg.reader_options))
        except ValueError as e:
            raise RunError(str(e)) from None
        return run(cfg, model_cfg, ckpt, dist, device)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        cleanup_distributed(dist)


if __name__ == "__main__":
    from datasets.records import DatasetError

    try:
        main()
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(130)
    except DatasetError as e:  # a problem with the user's files: the message says which and the fix
        sys.exit(f"train.py: {e}")
