"""A run's folder (train.py --out): config.json, metrics.jsonl (one line per epoch), best.pt, last.pt,
test_metrics.json; what a fresh run and --resume accept of it; the early-stop record last.pt keeps."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # no flock (Windows): the held-files check alone guards the folder
    fcntl = None

from tmc.checkpoint import MODEL_KEYS, CheckpointError, load_checkpoint, remove_orphan_temporaries
from tmc.config import ModelConfig
from tmc.train_config import TrainConfig, resolve_model_config, resolve_train_config

# The settings that make a run what it is: --resume refuses to change them, and a last.pt whose
# values differ from its folder's config.json belongs to another run.
RUN_IDENTITY = ("dataset", "root", "preset", "split_mode", "split_seed", "reader_options", "seed")


def resolve_configs(train_over: dict, model_over: dict) -> tuple[TrainConfig, ModelConfig, dict | None]:
    """Configs of this run, and the checkpoint to resume from (or None); ValueError names the fix."""
    if not train_over.get("resume"):
        cfg = resolve_train_config(train_over)
        return cfg, resolve_model_config(cfg.preset, model_over), None
    if not train_over.get("out"):
        raise ValueError("--resume needs the run folder: --out DIR (the folder holding last.pt)")
    path = Path(train_over["out"]) / "last.pt"
    if not path.is_file():
        raise ValueError(f"{path}: nothing to resume; fix: check --out, or drop --resume to start anew")
    try:
        ckpt = load_checkpoint(path, require=(*MODEL_KEYS, "train_config", "optimizer", "rng"))
    except CheckpointError as e:
        raise ValueError(f"--resume: {e}") from None
    check_resume(ckpt, train_over, path.parent)
    model_cfg = ModelConfig.from_dict(ckpt["model_config"])
    changed = {k: v for k, v in model_over.items() if getattr(model_cfg, k) != v}
    if changed:
        raise ValueError(f"--resume keeps the checkpoint's model; these flags would change it: "
                         f"{changed}; fix: drop them, or start a new run with another --out")
    cfg = resolve_train_config(train_over, base=ckpt["train_config"])
    return cfg, model_cfg, ckpt


def check_resume(ckpt: dict, train_over: dict, out: Path) -> None:
    """Refuse a resume that would train another run: flags that change the run's identity, or a
    last.pt that does not belong to the folder's config.json."""
    saved = ckpt["train_config"]
    changed = {k: (saved.get(k), v) for k, v in train_over.items()
               if k in RUN_IDENTITY and saved.get(k) != v}
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {new!r} (the run has {old!r})"
                          for k, (old, new) in changed.items())
        raise ValueError(f"--resume continues the run in {out} as it was set up; these flags would "
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
            raise ValueError(f"{out / 'last.pt'} does not belong to the run in {out} ({shown}); fix: "
                             f"resume the folder that last.pt came from, or put that run's last.pt back")


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
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def default_out(cfg: TrainConfig) -> Path:
    """runs/<dataset>-<preset>-s<seed>-<date>-<time> (the preset left out where it is the dataset's name)."""
    name = cfg.dataset if cfg.preset == cfg.dataset else f"{cfg.dataset}-{cfg.preset}"
    return Path("runs") / f"{name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


# What a run writes before its first checkpoint: without a checkpoint beside them, they record a
# start that failed or was killed, and a fresh run replaces them.
START_FILES = ("config.json", "metrics.jsonl")


def held_files(out: Path, fresh: bool = True) -> list[str]:
    """What a fresh run would overwrite in `out` (after removing the temporaries of a killed save).

    A start's files with no checkpoint (START_FILES) lose nothing: a fresh run removes them."""
    if not out.is_dir():
        return []
    removed = remove_orphan_temporaries(out)  # of a save killed mid-write (kill -9)
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint file(s) left by a killed run: "
              f"{', '.join(p.name for p in removed)}", flush=True)
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if fresh and held and set(held) <= set(START_FILES):
        for name in held:
            (out / name).unlink()
        print(f"removed {', '.join(held)} of a start in {out} that saved no checkpoint", flush=True)
        return []
    return held


LOCK_NAME = ".train.lock"


class RunLock:
    """An exclusive lock on a run folder (flock on `.train.lock`), so two train.py never write one
    --out. The OS drops it when the process ends, however it ends, so a stale file locks nothing."""

    def __init__(self, out: Path):
        self.path, self.fd = Path(out) / LOCK_NAME, None
        if fcntl is None:  # no flock (Windows)
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunFolderBusy(f"{out}: another train.py (pid {owner}) is writing to this run "
                                    f"folder; fix: wait for it to end, or another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # released and removed by its holder meanwhile
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then finds a new file
            os.close(self.fd)
            self.fd = None


class RunFolderBusy(RuntimeError):
    """--out is locked by another live train.py."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary in the same folder and a rename: a full disk or a
    kill leaves the previous file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def occupied_message(out: Path, held: list[str]) -> str:
    shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
    return (f"{out} already holds files ({shown}); a fresh run would overwrite its best.pt and append "
            f"to its metrics.jsonl; fix: --resume to continue that run, or another --out (an empty or "
            f"new folder)")


def write_config(out: Path, cfg, model_cfg, world_size: int, device, torch_version: str) -> dict:
    """config.json: the resolved settings of the run (every default filled in)."""
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                "world_size": world_size, "device": str(device), "torch": torch_version}
    write_text_atomic(out / "config.json", json.dumps(resolved, indent=2) + "\n")
    return resolved


@dataclass
class EarlyStop:
    """The best validation Dice so far, its epoch, and the epochs since it (kept in last.pt)."""
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record this epoch's validation score; True when it is the best so far (best.pt is written)."""
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False


def epoch_record(epoch: int, stats: dict, val: dict, lr: float, improved: bool, early: EarlyStop,
                 times: tuple[float, float, float]) -> dict:
    """One line of metrics.jsonl; `times` = (start, end of training, end of validation)."""
    t0, t1, t2 = times
    return {
        "epoch": epoch, "train_loss": stats["loss"], "train_seg": stats["seg"],
        "train_align": stats["align"], "steps": stats["steps"], "skipped_nonfinite": stats["skipped"],
        "val_dice": val["dice"], "val_miou": val["miou"], "val_dice_global": val["dice_global"],
        "val_protocol": val["protocol"], "lr": lr, "improved": improved, "best_val_dice": early.best,
        "time_s": round(t2 - t0, 2), "train_time_s": round(t1 - t0, 2), "val_time_s": round(t2 - t1, 2),
    }


def summary_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:3d}/{epochs} | loss {m['train_loss']:.4f} (seg {m['train_seg']:.4f} "
            f"align {m['train_align']:.4f}) | val Dice {m['val_dice']:.4f} mIoU {m['val_miou']:.4f} "
            f"global {m['val_dice_global']:.4f} | lr {m['lr']:.2e} | {m['steps']} steps "
            f"{m['time_s']:.1f}s"
            + (" | best" if m["improved"] else "")
            + (f" | skipped {m['skipped_nonfinite']} non-finite" if m["skipped_nonfinite"] else ""))
