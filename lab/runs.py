"""Running train.py as an experiment: one subprocess per run, its result read back, mean ± std over
seeds, and the machine written beside every figure."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tmc.metrics import mean_std

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch  # deferred: torch takes seconds to load; launching train.py runs needs none of it

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def result_file(out: Path, score_split: str = "test") -> Path:
    """Where a finished run_train(out, ...) keeps its metrics: its presence means the run is done."""
    return out / ("test_metrics.json" if score_split == "test" else f"{score_split}_metrics.json")


def run_train(out: Path, flags: list[str], threads: int | None = None, score_split: str = "test") -> dict:
    """Run train.py once (unless `out` already holds its result) and return the metrics of best.pt
    on `score_split` (train.py scores "test" itself; another split is scored by eval.py)."""
    result = result_file(out, score_split)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if not result.is_file():
        cmd = [sys.executable, str(REPO / "train.py"), "--out", str(out), "--no-progress", *flags]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        (out / "wall_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        if score_split != "test":
            cmd = [sys.executable, str(REPO / "eval.py"), "--ckpt", str(out / "best.pt"), "--split",
                   score_split, "--json", str(result), "--no-progress"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
    metrics = json.loads(result.read_text())
    metrics["run"] = str(out.relative_to(REPO) if out.is_relative_to(REPO) else out)
    metrics["flags"] = flags
    return metrics


def spread(values: list[float]) -> dict:
    """Mean ± std over seeds (tmc.metrics.mean_std) with the count and the values themselves."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def summarise(folder: Path, runs: dict[str, list[dict]], command: str, note: str) -> dict:
    summary = {"command": command, "machine": machine(), "note": note, "variants": {}}
    lines = ["| variant | Dice (per image) | mIoU | Dice (global) | seeds |", "|---|---|---|---|---|"]
    for name, metrics in runs.items():
        row = {k: spread([m[k] for m in metrics]) for k in ("dice", "miou", "dice_global")}
        row["runs"] = metrics
        summary["variants"][name] = row
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in ("dice", "miou", "dice_global")]
        lines.append(f"| {name} | {' | '.join(cells)} | {len(metrics)} |")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "\n".join(lines) + f"\n\nMachine: {summary['machine']}. Command: `{command}`. {note}\n"
    (folder / "table.md").write_text(table)
    print(table)
    return summary
