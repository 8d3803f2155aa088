"""The figures the documents quote, read from the files in results/ as the commands wrote them:
a grid's summary.json, a run's metrics.jsonl, wall_time_s.txt, config.json and train.log, the QaTa
protocol's summaries, the benchmark and op-count records."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

PLAIN_QATA_RUN = "qata_cpu/plain-s0"  # `python train.py --dataset qata --preset small`, seed 0


def read_json(r: Path, name: str) -> dict:
    return json.loads((r / name).read_text())


def grid(r: Path, name: str, v: str, key: str = "dice") -> list[float]:
    """Per-seed values of one variant of a grid's summary.json."""
    return read_json(r, f"{name}/summary.json")["variants"][v][key]["values"]


def grid_runs(r: Path, name: str, v: str) -> list[str]:
    return [f"{name}/{Path(run['run']).name}" for run in read_json(r, f"{name}/summary.json")["variants"][v]["runs"]]


def wall(r: Path, run: str) -> float:
    return float((r / run / "wall_time_s.txt").read_text())


def walls(r: Path, name: str, v: str) -> list[float]:
    return [wall(r, run) for run in grid_runs(r, name, v)]


def steps(r: Path, run: str) -> int:
    return sum(json.loads(line)["steps"] for line in (r / run / "metrics.jsonl").read_text().splitlines() if line)


def protocol(r: Path, v: str) -> dict:
    """A variant of the held-out QaTa protocol: the recipe's runs (best, no-text) or a later variant's."""
    base = read_json(r, "qata_cpu/protocol/summary.json")["variants"]
    return base[v] if v in base else read_json(r, "qata_cpu/protocol_variants/summary.json")["variants"][v]


def qata_mean(r: Path, v: str, key: str = "dice") -> float:
    return protocol(r, v)[key]["mean"]


def paired(r: Path, v: str, against: str, key: str = "dice") -> list[float]:
    """Each run of variant v minus the run of `against` with the same seed, on the test split."""
    def by_seed(name: str) -> dict[str, float]:
        return {run["run"].rsplit("-s", 1)[1]: run["test"][key] for run in protocol(r, name)["runs"]}
    a, b = by_seed(v), by_seed(against)
    return [a[s] - b[s] for s in sorted(a)]


def equal_steps(r: Path) -> int:
    return int(read_json(r, "qata_cpu/protocol/summary.json")["equal_steps"])


def cap(r: Path, variant: str, condition: str, key: str = "dice") -> float:
    """A cell of the caption robustness table, rounded as the table shows it."""
    return round(read_json(r, "qata_captions/captions_summary.json")["variants"][variant][condition][key]["mean"], 3)


def split_sizes(r: Path) -> tuple[int, int]:
    """Training and validation images of the held-out QaTa split, as train.py reported them."""
    found = re.search(r"train (\d+) \| val (\d+)", (r / PLAIN_QATA_RUN / "train.log").read_text())
    return int(found.group(1)), int(found.group(2))


def time_limit(r: Path, run: str) -> str:
    return f"{read_json(r, f'{run}/config.json')['train']['time_limit']:g}"


def op_total(r: Path, name: str) -> int:
    return int(re.search(r"(\d+) kernel-launching", (r / name).read_text()).group(1))


def probe(r: Path, setting: str, step: int) -> float:
    runs = read_json(r, "grounding_probe/summary.json")["settings"][setting]
    return statistics.fmean(next(c["dice"] for c in run["curve"] if c["step"] == step) for run in runs)


def cpu_ratios(r: Path, name: str, preset: str) -> list[float]:
    """Training images/s after / before, pair by pair, of a `bash lab/bench_cpu.sh` folder."""
    def runs(label: str) -> list[dict]:
        return [json.loads(f.read_text()) for f in sorted((r / name).glob(f"{label}-{preset}-*.json"))]
    return [a["train_images_per_s"] / b["train_images_per_s"] for a, b in zip(runs("after"), runs("before"))]


def bench(r: Path, row: str) -> dict:
    return read_json(r, f"bench_gpu/{row}.json")


def cuda_ms(r: Path) -> float:
    text = (r / "bench_gpu/profile_train_b32_eager.txt").read_text()
    return float(re.search(r"Self CUDA time total: ([\d.]+)ms", text).group(1))


def binds() -> float:
    from lab.report import BINDS  # lab.report imports this module through lab.report_figures
    return BINDS
