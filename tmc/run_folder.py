"""A run's folder (train.py --out): config.json, metrics.jsonl (one line per epoch), best.pt, last.pt,
test_metrics.json; what a fresh run and --resume accept of it."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tmc.checkpoint import remove_orphan_temporaries
from tmc.train_config import TrainConfig

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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.preset}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def held_files(out: Path) -> list[str]:
    """What a fresh run would overwrite in `out` (after removing the temporaries of a killed save)."""
    if not out.is_dir():
        return []
    removed = remove_orphan_temporaries(out)  # of a save killed mid-write (kill -9)
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint file(s) left by a killed run: "
              f"{', '.join(p.name for p in removed)}", flush=True)
    return sorted(p.name for p in out.iterdir())


def occupied_message(out: Path, held: list[str]) -> str:
    shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
    return (f"{out} already holds files ({shown}); a fresh run would overwrite its best.pt and append "
            f"to its metrics.jsonl; fix: --resume to continue that run, or another --out (an empty or "
            f"new folder)")


def write_config(out: Path, cfg, model_cfg, world_size: int, device, torch_version: str) -> dict:
    """config.json: the resolved settings of the run (every default filled in)."""
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                "world_size": world_size, "device": str(device), "torch": torch_version}
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    return resolved
