"""The QaTa-COV19 protocol: does the caption improve the mask on real chest X-rays?

    python -m lab.qata_protocol --root ../shared/data/qata --minutes 25 --seeds 0 1 2 \\
        --variants best no-text --threads 1 --parallel 2

Data: the QaTa subset in the SGSeg layout (2000 `train`, 500 `valid` images) under
`--split-mode layout-val`: validation (model selection, best.pt) is 1/8 of the training patients;
the 500 `valid` images are the test split, never used for selection.

Budget: every run trains for the same wall-clock `--minutes` (train.py --time-limit; the lr follows a
cosine over that time, --lr-schedule cosine-time, and early stopping is off so that every run uses its
whole budget). Runs go in waves of `--parallel`, each with `--threads` threads, seed by seed, so the
variants of one seed run side by side and a pair compares like with like. The weights at each of
`--equal-steps` (steps reached, not best-on-validation) are scored too, to compare runs of different
speed at equal steps; their checkpoints are deleted once scored.

Reported per run (<folder>/<variant>-s<seed>/protocol.json), on the test split, for best.pt:
per-image and global Dice/IoU (tmc.engine.summarize, empty-vs-empty = 1); for a text-guided model,
the same with the captions permuted among the test images (numpy default_rng(--shuffle-seed) over
the test split's order in the cache); Dice by lesion-size quartile (the test images in 4 groups of
near-equal size, ordered by true mask area at the model's input size, ties by key) with the
predicted/true area ratio of each (summed areas); steps, epochs and wall time. summary.json and
table.md in the folder hold the mean ± std over seeds per variant, with the command and machine.
Only the training runs are parallel: scoring starts when every run has finished.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from datasets.registry import parse_reader_options, prepare
from lab.runs import REPO, machine, result_file, run_train, spread
from tmc.metrics import global_scores, mean_scores
from tmc.train_config import build_parser, explicit_overrides, resolve_model_config, resolve_train_config

# Every run: these train.py flags, then the --minutes budget, the seed, --train-flags, the variant.
# The rest of the recipe (augmentation, loss, lr, 50-step epochs) is what `--dataset qata --preset
# small` sets by itself (tmc.train_config.PRESET_DEFAULTS); only the budget differs: wall-clock
# minutes with the cosine over that time, no early stop. The split is the protocol's own (the same
# as the preset's), so a run with another preset (--train-flags) keeps its test split.
RECIPE = ["--dataset", "qata", "--split-mode", "layout-val", "--preset", "small",
          "--lr-schedule", "cosine-time", "--epochs", "1000000", "--patience", "1000000"]
# name → train.py flags on top of the recipe; each line is one question about the recipe.
VARIANTS = {
    "best": [],
    "no-text": ["--no-text"],  # same encoder and decoder, no caption
    "no-alignment": ["--no-alignment"],
    "bottleneck-only": ["--mcm-stages", "4", "--alignment-stages", "4"],
    "paper-augment": ["--augment", "paper"],  # vs text-consistent
    "sigmoid": ["--mcm-attention", "sigmoid"],  # vs softmax word weights
    "T10": ["--text-length", "10"],  # vs T = 24
    "fine-tuned": ["--no-freeze-text", "--text-lr", "3e-5"],  # vs the frozen encoder
}
EQUAL_STEPS = (250, 500, 1000, 2000)
METRICS = ("dice", "miou", "dice_global", "iou_global")


# ---------------------------------------------------------------------------- scoring

def size_quartiles(records: list[dict]) -> list[dict]:
    """Dice by lesion size: the images in 4 groups of near-equal size (np.array_split) ordered by
    true mask area (tp + fn; ties by key), each with its per-image and global Dice and its
    predicted/true area ratio (summed over the group).

    Args:
        records: per-image dicts with key, tp, fp, fn (tmc.engine.predict_records).
    """
    if len(records) < 4:
        raise ValueError(f"size quartiles need at least 4 images, got {len(records)}")
    order = sorted(records, key=lambda r: (r["tp"] + r["fn"], r["key"]))
    out = []
    for q, idx in enumerate(np.array_split(np.arange(len(order)), 4), start=1):
        group = [order[i] for i in idx]
        counts = {k: np.array([r[k] for r in group], dtype=np.int64) for k in ("tp", "fp", "fn")}
        true = int((counts["tp"] + counts["fn"]).sum())
        pred = int((counts["tp"] + counts["fp"]).sum())
        out.append({"quartile": q, "n": len(group),
                    "area_min": int(counts["tp"][0] + counts["fn"][0]),
                    "area_max": int(counts["tp"][-1] + counts["fn"][-1]),
                    "dice": mean_scores(counts, empty_score=1.0)["dice"],
                    "dice_global": global_scores(counts["tp"], counts["fp"], counts["fn"],
                                                 empty=1.0)["dice_global"],
                    "area_ratio": pred / true if true else math.nan})
    return out


class ShuffledCaptions:
    """A split whose item i carries the caption of item order[i] (same image and mask)."""

    def __init__(self, base, order) -> None:
        self.base, self.order = base, [int(j) for j in order]
        self.texts = base.texts

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], "text": self.texts[self.order[i]]}


def caption_permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def run_cache(run: Path) -> Path:
    """The cache a run trained on, rebuilt from its config.json (reused when up to date)."""
    config = json.loads((run / "config.json").read_text())
    tc, image_size = config["train"], config["model"]["image_size"]
    return prepare(tc["dataset"], tc["root"] or None, image_size=image_size,
                   cache_dir=tc["cache_dir"] or None, split_mode=tc["split_mode"],
                   seed=tc["split_seed"], skip_bad=tc["skip_bad"], progress=False,
                   **parse_reader_options(tc["reader_options"]))


def predict(model, dataset, batch_size: int = 32) -> list[dict]:
    """Per-image tp/fp/fn of `model` on `dataset` (threshold 0.5, the model's input size)."""
    # deferred: these load torch (seconds); lab.report imports this module for its tables alone
    import torch
    from torch.utils.data import DataLoader
    from tmc.engine import predict_records

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return predict_records(model, loader, device=torch.device("cpu"), tokenize=model.tokenize,
                           progress=False)


def _scores(records: list[dict]) -> dict:
    from tmc.engine import summarize  # deferred: loads torch (seconds); lab.report needs only the tables

    s = summarize(records)
    return {k: s[k] for k in (*METRICS, "n_images")}


def score_run(run: Path, flags: list[str], shuffle_seed: int = 0) -> dict:
    """Everything the protocol reports about one finished run (module docstring), written to
    <run>/protocol.json; `flags` are the run's train.py flags. The step<N>.pt snapshots are deleted
    once scored."""
    # deferred: these load torch (seconds); lab.report imports this module for its tables alone
    from datasets.cached import SegmentationSet
    from tmc.checkpoint import load_checkpoint, model_from_checkpoint

    test = SegmentationSet(run_cache(run), "test")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    model, cfg = model_from_checkpoint(run / "best.pt")
    records = predict(model, test)
    wall = run / "wall_time_s.txt"
    out = {"run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run),
           "flags": flags,
           "steps": rows[-1]["total_steps"], "epochs": len(rows),
           "wall_time_s": float(wall.read_text()) if wall.is_file() else None,
           "best_epoch": max(rows, key=lambda r: r["val_dice"])["epoch"],
           "best_val_dice": max(r["val_dice"] for r in rows),
           "test": _scores(records), "quartiles": size_quartiles(records)}
    if cfg.use_text:
        order = caption_permutation(len(test), shuffle_seed)
        shuffled = _scores(predict(model, ShuffledCaptions(test, order)))
        out["shuffled"] = {**shuffled, "seed": shuffle_seed,
                           "gap": out["test"]["dice"] - shuffled["dice"],
                           "gap_global": out["test"]["dice_global"] - shuffled["dice_global"]}
    out["equal_steps"] = {}
    snapshots = sorted(run.glob("step*.pt"), key=lambda p: int(p.stem[4:]))
    for path in snapshots:
        ckpt = load_checkpoint(path)
        snap, _ = model_from_checkpoint(ckpt)
        m = ckpt["metrics"]
        out["equal_steps"][path.stem[4:]] = {
            "steps": m["total_steps"], "epoch": ckpt["epoch"], "val_dice": m["val_dice"],
            "val_dice_global": m["val_dice_global"], "test": _scores(predict(snap, test))}
    (run / "protocol.json").write_text(json.dumps(out, indent=2) + "\n")
    for path in snapshots:  # scored: the numbers are in protocol.json
        path.unlink()
    return out


# ---------------------------------------------------------------------------- summary

def _ms(values) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return spread(values) if values else {"mean": math.nan, "std": math.nan, "n": 0, "values": []}


def _fmt(d: dict, digits: int = 3) -> str:
    if not d["n"]:
        return "—"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def common_steps(runs: dict[str, list[dict]]) -> str | None:
    """The largest --equal-steps value that every run reached, or None."""
    sets = [set(r["equal_steps"]) for rs in runs.values() for r in rs]
    shared = set.intersection(*sets) if sets else set()
    return max(shared, key=int) if shared else None


def summarise_protocol(folder: Path, runs: dict[str, list[dict]], command: str, note: str) -> dict:
    """summary.json (mean ± std over seeds per variant, and every run) and table.md."""
    at = common_steps(runs)
    summary = {"command": command, "machine": machine(), "note": note, "equal_steps": at,
               "variants": {}}
    for name, rs in runs.items():
        row = {k: _ms([r["test"][k] for r in rs]) for k in METRICS}
        row["steps"] = _ms([r["steps"] for r in rs])
        row["wall_time_s"] = _ms([r["wall_time_s"] for r in rs])
        if all("shuffled" in r for r in rs):
            for k in ("dice", "dice_global", "gap", "gap_global"):
                row[f"shuffled_{k}"] = _ms([r["shuffled"][k] for r in rs])
        row["quartiles"] = [{k: _ms([r["quartiles"][q][k] for r in rs])
                             for k in ("dice", "dice_global", "area_ratio")} for q in range(4)]
        if at is not None:
            snaps = [r["equal_steps"][at] for r in rs]
            row["at_equal_steps"] = {"val_dice": _ms([s["val_dice"] for s in snaps]),
                                     "dice": _ms([s["test"]["dice"] for s in snaps]),
                                     "dice_global": _ms([s["test"]["dice_global"] for s in snaps])}
        row["runs"] = rs
        summary["variants"][name] = row
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = tables(summary) + f"\nMachine: {summary['machine']}. Command: `{command}`. {note}\n"
    (folder / "table.md").write_text(text)
    print(text)
    return summary


def tables(summary: dict) -> str:
    """The protocol's tables (Markdown) from its summary.json: test scores with shuffled captions,
    Dice by lesion-size quartile, and scores at equal steps."""
    at = summary["equal_steps"]
    main = ["| variant | seeds | steps | Dice (per image) | mIoU | Dice (global) | IoU (global) | "
            "shuffled captions: Dice (per image / global) |", "|---|---|---|---|---|---|---|---|"]
    size = ["| variant | Q1 Dice | Q2 Dice | Q3 Dice | Q4 Dice | Q1 pred/true area | "
            "Q4 pred/true area |", "|---|---|---|---|---|---|---|"]
    equal = [f"| variant | val Dice at {at} steps | test Dice at {at} steps (per image) | "
             f"test Dice at {at} steps (global) |", "|---|---|---|---|"]
    for name, row in summary["variants"].items():
        shuffled = (f"{_fmt(row['shuffled_dice'])} / {_fmt(row['shuffled_dice_global'])}"
                    if "shuffled_dice" in row else "—")
        main.append(f"| {name} | {len(row['runs'])} | {row['steps']['mean']:.0f} | {_fmt(row['dice'])} | "
                    f"{_fmt(row['miou'])} | {_fmt(row['dice_global'])} | {_fmt(row['iou_global'])} | "
                    f"{shuffled} |")
        q = row["quartiles"]
        size.append(f"| {name} | " + " | ".join(_fmt(q[i]["dice"]) for i in range(4))
                    + f" | {_fmt(q[0]['area_ratio'], 2)} | {_fmt(q[3]['area_ratio'], 2)} |")
        if at is not None:
            e = row["at_equal_steps"]
            equal.append(f"| {name} | {_fmt(e['val_dice'])} | {_fmt(e['dice'])} | "
                         f"{_fmt(e['dice_global'])} |")
    return "\n\n".join("\n".join(t) for t in [main, size] + ([equal] if at is not None else [])) + "\n"


def _seed(run: dict) -> int:
    return int(run["run"].rsplit("-s", 1)[1])


def ablation_table(*summaries: dict, reference: str = "best") -> str:
    """Every variant of `summaries` (summary.json dicts of the same protocol) against `reference`,
    seed by seed: mean ± std of the variant and of its difference from the reference run of the
    same seed (a negative difference: the variant loses)."""
    variants = {name: row for s in summaries for name, row in s["variants"].items()}
    ref = {_seed(r): r for r in variants[reference]["runs"]}
    lines = [f"| variant | seeds | steps | Dice (per image) | minus {reference} | Dice (global) | "
             f"minus {reference} | shuffled captions: Dice (per image) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in variants.items():
        runs = row["runs"]
        cells = []
        for key in ("dice", "dice_global"):
            delta = _ms([r["test"][key] - ref[_seed(r)]["test"][key] for r in runs if _seed(r) in ref])
            cells += [_fmt(row[key]), "—" if name == reference else _fmt(delta)]
        shuffled = _fmt(row["shuffled_dice"]) if "shuffled_dice" in row else "—"
        lines.append(f"| {name} | {len(runs)} | {row['steps']['mean']:.0f} | {' | '.join(cells)} | "
                     f"{shuffled} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the command

def _shown(items: list[str]) -> list[str]:
    """Absolute paths relative to the repository, so records name no machine's folders."""
    return [os.path.relpath(a, REPO) if Path(a).is_absolute() else a for a in items]


def run_flags(args, variant: str, seed: int) -> list[str]:
    steps = ",".join(str(n) for n in args.equal_steps)
    return [*RECIPE, "--root", args.root, "--time-limit", str(args.minutes), "--seed", str(seed),
            *(["--snapshot-steps", steps] if steps else []), *shlex.split(args.train_flags),
            *VARIANTS[variant]]


def prepare_cache(flags: list[str]) -> None:
    """Build the cache a run with these flags trains on, once, before runs share it."""
    train_over, model_over = explicit_overrides(build_parser().parse_args(flags))
    cfg = resolve_train_config(train_over)
    model_cfg = resolve_model_config(cfg.preset, model_over)
    prepare(cfg.dataset, cfg.root or None, image_size=model_cfg.image_size,
            cache_dir=cfg.cache_dir or None, split_mode=cfg.split_mode, seed=cfg.split_seed,
            skip_bad=cfg.skip_bad, **parse_reader_options(cfg.reader_options))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the QaTa-COV19 folder (SGSeg layout: train + valid)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["best", "no-text"],
                   help=f"any of {', '.join(VARIANTS)}, or all")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs side by side (one wave)")
    p.add_argument("--equal-steps", type=int, nargs="*", default=list(EQUAL_STEPS),
                   help="step counts whose weights are also scored (none: --equal-steps)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="permutation of the test captions")
    p.add_argument("--train-flags", default="", help="extra train.py flags for every run, after the "
                   "recipe and before the variant's (e.g. \"--image-size 128\")")
    p.add_argument("--out", default=str(REPO / "results" / "qata_cpu" / "protocol"),
                   help="the experiment folder: one sub-folder per run, summary.json, table.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.variants == ["all"]:
        args.variants = list(VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} or all")
    return args


def main(argv=None) -> dict:
    import torch  # deferred: torch takes seconds to load; lab.report imports this module for its tables

    args = parse_args(argv)
    folder = Path(args.out).resolve()
    jobs = [(v, s) for s in args.seeds for v in args.variants]  # seed by seed: variants side by side
    # Waves are formed from the runs still to train, so a rerun that adds seeds or variants to a
    # folder keeps its runs in pairs (a run alone would get a whole CPU and more steps).
    todo = [(v, s) for v, s in jobs if not result_file(folder / f"{v}-s{s}").is_file()]
    prepare_cache(run_flags(args, *jobs[0]))
    for i in range(0, len(todo), args.parallel):  # a wave ends before the next starts
        wave = todo[i:i + args.parallel]
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            futures = [pool.submit(run_train, folder / f"{v}-s{s}", run_flags(args, v, s), args.threads)
                       for v, s in wave]
            for f in futures:
                f.result()
    torch.set_num_threads(max(1, args.threads * args.parallel))  # nothing else runs now
    runs: dict[str, list[dict]] = {}
    for v, s in sorted(jobs, key=lambda j: args.variants.index(j[0])):
        run = folder / f"{v}-s{s}"
        done = run / "protocol.json"
        runs.setdefault(v, []).append(json.loads(done.read_text()) if done.is_file()
                                      else score_run(run, _shown(run_flags(args, v, s)), args.shuffle_seed))
    command = "python -m lab.qata_protocol " + " ".join(shlex.quote(a) for a in _shown(args.argv))
    n_test = runs[args.variants[0]][0]["test"]["n_images"]
    note = (f"Test split: the layout's held-out images ({n_test}); "
            f"validation: 1/8 of the training patients. {args.minutes:g} min of training per run, "
            f"{args.parallel} side by side with {args.threads} thread(s) each; best.pt selected on "
            f"validation Dice. Recipe: train.py {' '.join(RECIPE)}. Equal steps: weights at that "
            f"step count (the end of the epoch that reached it), not selected on validation.")
    return summarise_protocol(folder, runs, command, note)


if __name__ == "__main__":
    main()
