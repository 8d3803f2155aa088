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

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from tmc.checkpoint import (MODEL_KEYS, CheckpointError, load_checkpoint, remove_orphan_temporaries,
                            save_checkpoint)
from tmc.config import ModelConfig
from tmc.engine import (
    Dist, NonFiniteGuard, NonFiniteLossError, ShardSampler, barrier, capture_rng,
    cleanup_distributed, default_workers, gather_lists, init_distributed, make_generator, make_scaler,
    make_train_step, predict_records, resolve_amp, restore_rng, seed_everything, seed_worker,
    summarize, train_one_epoch,
)
from tmc.model import build_model
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

# The settings that make a run what it is: --resume refuses to change them, and a last.pt whose
# values differ from its folder's config.json belongs to another run.
RUN_IDENTITY = ("dataset", "root", "preset", "split_mode", "split_seed", "reader_options", "seed")


def check_resume(ckpt: dict, train_over: dict, out: Path) -> None:
    """Refuse a resume that would train another run: flags that change the run's identity, or a
    last.pt that does not belong to the folder's config.json."""
    saved = ckpt["train_config"]
    changed = {k: (saved.get(k), v) for k, v in train_over.items()
               if k in RUN_IDENTITY and saved.get(k) != v}
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {new!r} (the run has {old!r})"
                          for k, (old, new) in changed.items())
        raise RunError(f"--resume continues the run in {out} as it was set up; these flags would "
                       f"change it: {shown}; fix: drop them, or start a new run with another --out")
    config = out / "config.json"
    if config.is_file():
        try:
            run = json.loads(config.read_text())
        except ValueError:
            return
        folder = {**run.get("train", {}), **{f"model.{k}": v for k, v in run.get("model", {}).items()}}
        mine = {**saved, **{f"model.{k}": v for k, v in ckpt["model_config"].items()}}
        keys = [k for k in RUN_IDENTITY] + [k for k in folder if k.startswith("model.")]
        diff = {k: (folder.get(k), mine.get(k)) for k in keys
                if k in folder and json.dumps(folder[k]) != json.dumps(mine.get(k))}
        if diff:
            shown = ", ".join(f"{k}: config.json {a!r}, last.pt {b!r}" for k, (a, b) in diff.items())
            raise RunError(f"{out / 'last.pt'} does not belong to the run in {out} ({shown}); fix: "
                           f"resume the folder that last.pt came from, or put that run's last.pt back")

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
    check_resume(ckpt, train_over, path.parent)
    model_cfg = ModelConfig.from_dict(ckpt["model_config"])
    changed = {k: v for k, v in model_over.items() if getattr(model_cfg, k) != v}
    if changed:
        raise RunError(f"--resume keeps the checkpoint's model; these flags would change it: "
                       f"{changed}; fix: drop them, or start a new run with another --out")
    cfg = resolve_train_config(train_over, base=ckpt["train_config"])
    return cfg, model_cfg, ckpt


def drop_metrics_after(path: Path, epoch: int) -> None:
    """Keep metrics.jsonl's lines up to `epoch` (the resumed last.pt's): the epochs after it are
    trained again, and would otherwise appear twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill: dropped as well
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.preset}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------- data

def make_loaders(cfg: TrainConfig, model_cfg: ModelConfig, dist: Dist, device: torch.device):
    """Build or reuse the cache (rank 0 first), then one loader per split."""
    from datasets.cached import SegmentationSet
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
    loader_gen = make_generator(cfg.seed)
    common = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                  worker_init_fn=seed_worker, persistent_workers=cfg.workers > 0)
    # The shuffle is a function of (seed, epoch) via set_epoch, also in a single process, so a
    # resumed run sees the same order without replaying the loader's RNG.
    sampler = DistributedSampler(sets["train"], dist.world_size, dist.rank, shuffle=True, seed=cfg.seed)
    train = DataLoader(sets["train"], batch_size=cfg.batch_size, sampler=sampler,
                       generator=loader_gen, drop_last=cfg.compile or cfg.cuda_graphs, **common)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def eval_loader(ds):
        sampler = ShardSampler(len(ds), dist.rank, dist.world_size) if dist.enabled else None
        return DataLoader(ds, batch_size=eval_bs, shuffle=False, sampler=sampler, **common)

    return cache, train, eval_loader(sets["val"]), eval_loader(sets["test"]), loader_gen


def parameter_groups(model, cfg: TrainConfig) -> list[dict]:
    """Adam's parameter groups: everything at cfg.lr, the text encoder at cfg.text_lr when set.

    The main group comes first, so `param_groups[0]["lr"]` is the lr that the log reports.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not cfg.text_lr or model.text is None:
        return [{"params": trainable}]
    text_ids = {id(p) for p in model.text.parameters()}
    text = [p for p in trainable if id(p) in text_ids]  # empty when the encoder is frozen
    groups = [{"params": [p for p in trainable if id(p) not in text_ids]}]
    return groups + [{"params": text, "lr": cfg.text_lr}] if text else groups


def make_scheduler(optimizer, cfg: TrainConfig, start: float | None = None):
    """The paper's ReduceLROnPlateau on validation Dice, or a cosine decay from lr to min_lr over
    cfg.epochs, stepped once per epoch (a known budget: the lr reaches its floor as the run ends).
    "cosine-time" decays over the share of cfg.time_limit used since `start` (time.time()), for a
    wall-clock budget, where the number of epochs that fit is not known in advance."""
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            min_lr=cfg.min_lr)
    if cfg.lr_schedule == "cosine-time":
        start = time.time() if start is None else start

        def factor(base_lr: float):  # LambdaLR multiplies each group's own lr by it
            floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
            return lambda _: floor + (1 - floor) * 0.5 * (1 + math.cos(
                math.pi * min(1.0, (time.time() - start) / (60 * cfg.time_limit))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 [factor(g["lr"]) for g in optimizer.param_groups])
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)


# ---------------------------------------------------------------------------- checkpoints

def text_config_of(model) -> dict | None:
    """The text encoder's architecture as plain JSON values (so a checkpoint rebuilds offline)."""
    if model.text is None:
        return None
    return json.loads(model.text.encoder.config.to_json_string())


def weights_checkpoint(model, model_cfg, cfg, epoch, early, metrics) -> dict:
    """best.pt: what eval.py and inference need (weights and configs), without the optimizer state,
    which is twice the weights under Adam and only resuming needs (from last.pt)."""
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "text_config": text_config_of(model),
        "train_config": dataclasses.asdict(cfg),
        "epoch": epoch,
        "best_metric": early["best"],
        "metrics": metrics,
    }


def make_checkpoint(model, model_cfg, cfg, epoch, optimizer, scheduler, scaler, early, rng, metrics,
                    interrupted=False) -> dict:
    """last.pt, the contract's plain dict (weights_only-loadable); `rng` has one state per rank."""
    return {
        **weights_checkpoint(model, model_cfg, cfg, epoch, early, metrics),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "early_stop": dict(early),
        "rng": rng,
        "interrupted": interrupted,
    }


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
    held = []
    if dist.is_main and out.is_dir():
        removed = remove_orphan_temporaries(out)  # of a save killed mid-write (kill -9)
        if removed:
            print(f"removed {len(removed)} unfinished checkpoint file(s) left by a killed run: "
                  f"{', '.join(p.name for p in removed)}", flush=True)
        held = sorted(p.name for p in out.iterdir()) if ckpt is None else []
    held = _broadcast(held, dist)  # rank 0 looks before it writes; every rank stops together
    if held:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        raise RunError(f"{out} already holds files ({shown}); a fresh run would overwrite its "
                       f"best.pt and append to its metrics.jsonl; fix: --resume to continue that "
                       f"run, or another --out (an empty or new folder)")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            drop_metrics_after(out / "metrics.jsonl", ckpt["epoch"])
        resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                    "world_size": dist.world_size, "device": str(device), "torch": torch.__version__}
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
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
    optimizer = torch.optim.Adam(parameter_groups(raw, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))  # one kernel, not one per tensor
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

    early = {"best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    start_epoch = 1
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        early = dict(ckpt["early_stop"])
        states = ckpt["rng"]  # one per rank of the run that wrote it
        restore_rng(states[dist.rank % len(states)], generators)
        start_epoch = ckpt["epoch"] + 1
        log(dist, f"resumed from {out / 'last.pt'} at epoch {ckpt['epoch']} (best val Dice "
                  f"{early['best']:.4f} at epoch {early['best_epoch']})")

    step = make_train_step(model, optimizer, scaler, device=device, amp=cfg.amp, seg_loss_kind=cfg.seg_loss,
                           alignment_weight=cfg.alignment_weight, alignment_form=model_cfg.alignment_form,
                           grad_clip=cfg.grad_clip, dist=dist, compiled=cfg.compile)  # after resuming: bf16 copies
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
            save_checkpoint(out / "last.pt", make_checkpoint(raw, epoch=epoch, metrics=metrics, rng=rng,
                                                             **state))
        saved.update(epoch=epoch, time=time.time())

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if early["bad_epochs"] >= cfg.patience:
                break
            metrics = train_and_validate(epoch, model, raw, train_loader, val_loader, cfg, model_cfg,
                                         optimizer, scheduler, scaler, early, guard, augment_fn,
                                         aug_gen, dist, device, deadline, step)
            total_steps += metrics["steps"]
            metrics["total_steps"] = total_steps
            if dist.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if metrics["improved"]:
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
            save_checkpoint(out / "last.pt", make_checkpoint(
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


def train_and_validate(epoch, model, raw, train_loader, val_loader, cfg, model_cfg, optimizer,
                       scheduler, scaler, early, guard, augment_fn, aug_gen, dist, device,
                       deadline=None, step=None) -> dict:
    """One epoch of training, then validation; updates the scheduler and early-stop state."""
    train_loader.sampler.set_epoch(epoch)
    t0 = time.time()
    stats = train_one_epoch(
        model, train_loader, optimizer, device=device, tokenize=raw.tokenize, scaler=scaler,
        guard=guard, amp=cfg.amp, seg_loss_kind=cfg.seg_loss, alignment_weight=cfg.alignment_weight,
        alignment_form=model_cfg.alignment_form, augment_fn=augment_fn, aug_generator=aug_gen,
        max_steps=cfg.max_steps_per_epoch, grad_clip=cfg.grad_clip, dist=dist,
        desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress, deadline=deadline, step=step)
    t1 = time.time()
    records = predict_records(raw, val_loader, device=device, tokenize=raw.tokenize, amp=cfg.amp,
                              max_batches=cfg.limit_eval_batches, dist=dist, desc="val",
                              progress=cfg.progress)
    val = summarize(records)
    score = val["dice"] if math.isfinite(val["dice"]) else 0.0
    if cfg.lr_schedule == "plateau":
        scheduler.step(score)  # ReduceLROnPlateau reads validation Dice
    else:
        scheduler.step()
    improved = score > early["best"]
    if improved:
        early.update(best=score, best_epoch=epoch, bad_epochs=0)
    else:
        early["bad_epochs"] += 1
    return {
        "epoch": epoch, "train_loss": stats["loss"], "train_seg": stats["seg"],
        "train_align": stats["align"], "steps": stats["steps"], "skipped_nonfinite": stats["skipped"],
        "val_dice": val["dice"], "val_miou": val["miou"], "val_dice_global": val["dice_global"],
        "val_protocol": val["protocol"], "lr": float(optimizer.param_groups[0]["lr"]),
        "improved": improved, "best_val_dice": early["best"], "time_s": round(time.time() - t0, 2),
        "train_time_s": round(t1 - t0, 2), "val_time_s": round(time.time() - t1, 2),
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
