"""The experiments behind results/README.md; each writes raw JSON under results/.

    python -m tmc.lab.experiments demo-default --threads 1 --parallel 2
                                                       # CPU: the quick start per seed, with and without text
    python -m tmc.lab.experiments demo-ablation            # CPU: 5 variants x 3 seeds on the demo
    python -m tmc.lab.experiments token-length             # CPU: T = 10 vs T = 24 on the demo
    python -m tmc.lab.experiments caption-swap             # does the text steer? true vs shuffled captions
    python -m tmc.lab.experiments demo96                   # CPU: full / no text / no alignment at 96², 3000 images
    python -m tmc.lab.experiments demo-long                # CPU, ~45 min: full / no text with 4x the steps
    python -m tmc.lab.experiments text-encoder             # CPU, ~55 min: pretrained MiniLM text encoder; gradient clipping
    python -m tmc.lab.experiments mcm-attention --seeds 0 1 2 3 4 --threads 1 --parallel 2
                                                       # CPU, ~35 min: softmax vs sigmoid image→text weights
    python -m tmc.lab.experiments mcm-attention-long --seeds 2 3 4 --threads 1 --parallel 2
                                                       # CPU, ~50 min: the sigmoid MiniLM runs with 4x the steps
    python -m tmc.lab.experiments zone-probe               # which zone words a demo checkpoint has learned
    python -m tmc.lab.experiments grounding-probe          # CPU, ~5 min: how fast MCM learns zones (tmc/lab/grounding_probe.py)
    python -m tmc.lab.experiments qata --root data/qata --minutes 2.5        # GPU, bf16 (both runs ~6 min on an H200)
    python -m tmc.lab.experiments qata --root data/qata --cpu-small --minutes 3   # reduced, CPU

The CPU protocol on QaTa (held-out test patients, variants x seeds at equal minutes) is its own
command: python -m tmc.lab.qata_protocol (tmc/lab/qata_protocol.py).

Put the QaTa subset under `data/qata` (git-ignored) first. The GPU run needs torch and transformers
only (a random BERT-base with the shipped vocabulary).

Every run is `train.py` in a subprocess with a fixed budget (steps on the demo, minutes on QaTa), so
the numbers depend only on the flags written beside them. `summary.json` in each folder holds the
per-run test metrics and the mean ± std per variant; `table.md` is the table results/README.md quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tmc.metrics import mean_std

REPO = Path(__file__).resolve().parents[2]

# The demo's ablations: name → extra train.py flags.
DEMO_VARIANTS = {
    "full": [],
    "no-text": ["--no-text"],
    "bottleneck-only": ["--mcm-stages", "4", "--alignment-stages", "4"],
    "no-alignment": ["--no-alignment"],
    "literal-alignment": ["--alignment-form", "literal"],
    # Diagnostic: the alignment gradient also crosses MCM blocks (the paper read literally).
    "alignment-through-mcm": ["--alignment-through-mcm"],
}
# The demo recipe these grids were run with (the tiny preset's random 2x64 BERT fine-tuned, softmax
# word weights, 40 epochs of 25 steps, early stop after 10), pinned so that they still reproduce now
# that the demo's defaults are the frozen MiniLM recipe; no wall-clock limit, so a busy machine
# changes only the time a run takes, never its result.
DEMO_BUDGET = ["--text-model", "random:2x64", "--no-freeze-text", "--mcm-attention", "softmax",
               "--epochs", "40", "--patience", "10", "--plateau-patience", "5",
               "--max-steps-per-epoch", "25", "--time-limit", "0"]
# Four times that budget (160 epochs of 25 steps), early stop and lr cuts scaled alike: the grounding
# probe reached 0.90 on one-token lesions only after ~4000 steps, and the 1000-step full runs were still
# improving when they stopped.
DEMO_LONG_BUDGET = [*DEMO_BUDGET, "--epochs", "160", "--patience", "40", "--plateau-patience", "20"]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_train(out: Path, flags: list[str], threads: int | None = None, score_split: str = "test") -> dict:
    """Run train.py once (unless `out` already holds its result) and return the metrics of best.pt
    on `score_split` (train.py scores "test" itself; another split is scored by eval.py)."""
    result = out / ("test_metrics.json" if score_split == "test" else f"{score_split}_metrics.json")
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


# A larger demo: at 96² a lesion covers about 3 stage-2 tokens instead of 1.4,
# and 3000 images instead of 600 leave less to memorise. Own folder, so it never replaces data/demo.
DEMO96 = {"root": REPO / "data" / "demo96", "image_size": 96, "options": {"n": 3000, "size": 96}}
DEMO96_VARIANTS = {"full": [], "no-text": ["--no-text"], "no-alignment": ["--no-alignment"]}
DEMO_LONG_VARIANTS = {"full": [], "no-text": ["--no-text"]}
# Full TMC with a pretrained text encoder instead of the tiny preset's random BERT: the packaged
# all-MiniLM-L6-v2 (a real BERT-family model, no download), fine-tuned at its own low lr; and each
# text encoder with the gradient norm clipped at 1.
DEMO_TEXT_ENCODER_VARIANTS = {
    "random-bert": [],  # the tiny preset's own text encoder: demo-ablation's "full"
    "minilm": ["--text-model", "minilm", "--text-lr", "3e-5"],
    "minilm-clip": ["--text-model", "minilm", "--text-lr", "3e-5", "--grad-clip", "1.0"],
    "random-bert-clip": ["--grad-clip", "1.0"],
}


def demo_grid(name: str, variants: dict[str, list[str]], seeds: list[int], threads: int,
              parallel: int, reuse: dict[str, str] | None = None, demo: dict | None = None,
              budget: list[str] = DEMO_BUDGET, seeds_of: dict[str, list[int]] | None = None) -> dict:
    """Every variant × seed on the demo (or on the `demo` settings, e.g. DEMO96). `reuse` maps a
    variant to another grid's variant with the very same flags (its runs are read, not repeated);
    `seeds_of` gives a variant its own seeds."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets.registry import prepare

    folder = REPO / "results" / name
    data_flags = []
    if demo is None:
        prepare("demo", "", image_size=64)  # generate and cache once, before parallel runs share it
    else:
        prepare("demo", str(demo["root"]), image_size=demo["image_size"], **demo["options"])
        data_flags = ["--root", str(demo["root"]), "--image-size", str(demo["image_size"]),
                      "--reader-options", ",".join(f"{k}={v}" for k, v in demo["options"].items())]
    reuse = reuse or {}
    seeds_of = {v: (seeds_of or {}).get(v, seeds) for v in variants}
    jobs = [(v, s) for v in variants for s in seeds_of[v]]
    run_dir = {(v, s): REPO / "results" / f"{reuse[v]}-s{s}" if v in reuse else folder / f"{v}-s{s}"
               for v, s in jobs}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {job: pool.submit(run_train, run_dir[job],
                                    ["--dataset", "demo", *data_flags, "--seed", str(job[1]),
                                     *budget, *variants[job[0]]], threads)
                   for job in jobs}
    runs = {v: [futures[(v, s)].result() for s in seeds_of[v]] for v in variants}
    cli = {"demo_ablation": "demo-ablation", "demo_token_length": "token-length", "demo96": "demo96",
           "demo_long": "demo-long", "demo_text_encoder": "text-encoder",
           "demo_mcm_attention": "mcm-attention", "demo_mcm_attention_long": "mcm-attention-long",
           "demo_default": "demo-default"}[name]
    command = (f"python -m tmc.lab.experiments {cli} --seeds {' '.join(map(str, seeds))} "
               f"--threads {threads} --parallel {parallel}")
    n_test = runs[next(iter(runs))][0]["n_images"]  # read from the runs, not assumed from the split
    data = (f"Demo test split ({n_test} synthetic images, 64²)" if demo is None else
            f"Demo at {demo['image_size']}² with {demo['options']['n']} images (test split: {n_test})")
    note = (f"{data}, tiny preset, demo defaults" + (f" with {' '.join(budget)}" if budget else "") + "; "
            "mean ± std over seeds of the test metrics of best.pt (selected on validation Dice).")
    return summarise(folder, runs, command, note)


def demo_test_split(demo: dict | None = None):
    """The test split of the 64² demo (or of `demo`, e.g. DEMO96): its items, images (N, 1, S, S) and
    masks of every blob, targets and distractors alike (N, S, S) bool, re-rendered by
    datasets.demo.render_demo_image."""
    import torch

    from datasets.cached import SegmentationSet
    from datasets.demo import render_demo_image
    from datasets.registry import prepare

    size = demo["image_size"] if demo else 64
    root = str(demo["root"]) if demo else ""
    test = SegmentationSet(prepare("demo", root, image_size=size, progress=False, **(demo or {}).get("options", {})),
                           "test")
    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])  # (N, 1, S, S)
    unions = np.stack([render_demo_image(0, int(it["key"].split("_")[-1]), size)[3]["union"] for it in items])
    return items, images, unions


def caption_swap(folder: Path, seed: int = 0, command: str = "python -m tmc.lab.experiments caption-swap") -> dict:
    """Test Dice of every text-guided demo run with its true captions and with the captions shuffled
    among the test images (a fixed permutation). The gap is how much the text steers the masks."""
    import torch

    from tmc.checkpoint import model_from_checkpoint
    from tmc.metrics import confusion, dice_from_counts

    items, images, union = demo_test_split()  # union: (N, S, S) every blob
    masks = torch.stack([it["mask"] for it in items]) > 0.5  # (N, 1, S, S)
    true = [it["text"] for it in items]
    perm = np.random.default_rng(seed).permutation(len(true))
    shuffled = [true[i] for i in perm]

    @torch.no_grad()
    def dice(model, captions) -> float:
        pred = torch.cat([model(images[i:i + 40], **model.tokenize(captions[i:i + 40]))["logits"] > 0
                          for i in range(0, len(captions), 40)])
        tp, fp, fn = confusion(pred[:, 0].numpy(), masks[:, 0].numpy())
        return float(np.nanmean(dice_from_counts(tp, fp, fn, empty=1.0)))

    # Reference: an image-only oracle that segments every blob, targets and distractors alike.
    tp, fp, fn = confusion(union, masks[:, 0].numpy())
    every_blob = float(np.nanmean(dice_from_counts(tp, fp, fn, empty=1.0)))
    print(f"{'every blob (reference)':<24} {every_blob:.4f}", flush=True)

    rows = {}
    for run in sorted(p for p in folder.iterdir() if (p / "best.pt").is_file()):
        model, cfg = model_from_checkpoint(run / "best.pt")
        if not cfg.use_text:
            continue
        rows[run.name] = {"true": dice(model, true), "shuffled": dice(model, shuffled)}
        rows[run.name]["gap"] = rows[run.name]["true"] - rows[run.name]["shuffled"]
        print(f"{run.name:<24} true {rows[run.name]['true']:.4f}  shuffled {rows[run.name]['shuffled']:.4f}"
              f"  gap {rows[run.name]['gap']:+.4f}", flush=True)
    (folder / "caption_swap.json").write_text(json.dumps(
        {"command": command, "machine": machine(),
         "note": "per-image test Dice (threshold 0.5, empty-vs-empty = 1) of best.pt with true vs "
                 f"shuffled captions (permutation seed {seed})", "every_blob_dice": every_blob,
         "runs": rows}, indent=2) + "\n")
    return rows


ZONE_NAMES = [f"{level} {side}" for level in ("upper", "middle", "lower") for side in ("left", "right")]


def zone_table(model, images, blob_masks: list[list[np.ndarray]]) -> np.ndarray:
    """(6, 6) table: row = a blob's zone, column = the zone a one-zone caption names ("Unilateral
    pulmonary infection, one infected area, upper left lung."), value = the fraction of such blobs
    the model segments (more than half their pixels) when asked with that caption. Zones in
    ZONE_NAMES order (the demo's: thirds of the height × halves of the width, datasets.text_from_mask).

    images: (N, 1, S, S); blob_masks[i]: one (S, S) bool mask per blob of image i (targets and
    distractors alike). A model that binds words to places gives the identity.
    """
    import torch

    from datasets.text_from_mask import caption_from_zones, mask_zones

    captions = []
    for z in range(6):
        zones = np.zeros((2, 3), bool)  # [side, level]
        zones[z % 2, z // 2] = True
        captions.append(caption_from_zones(zones, 1))
    taken, count = np.zeros((6, 6)), np.zeros(6)
    for image, blobs in zip(images, blob_masks):
        with torch.no_grad():
            pred = model(image[None].expand(6, -1, -1, -1), **model.tokenize(captions))["logits"][:, 0] > 0
        pred = pred.numpy()  # (6 asked zones, S, S)
        for blob in blobs:
            side, level = (int(v[0]) for v in np.nonzero(mask_zones(blob)))  # the blob's single zone
            row = 2 * level + side
            count[row] += 1
            taken[row] += pred[:, blob].mean(axis=1) > 0.5
    return taken / np.maximum(count, 1)[:, None]


def zone_attention(model, images, stage: int = 2) -> dict[str, float]:
    """Where a model's image tokens look for the zone words, at one MCM stage: the mean attention
    weight that image tokens give the two words naming the zone ("upper", "left") of a one-zone
    caption, for tokens inside that zone and for tokens outside it, over the six captions and
    `images` (N, 1, S, S). "focus" is inside / outside: about 1 when every token reads the word
    alike (the caption broadcast to the whole image), well above 1 when the words are read where
    they point. A token belongs to the zone its centre lies in (thirds of the height × halves)."""
    import torch

    from datasets.text_from_mask import LEVELS, SIDES, caption_from_zones

    captions, word_ids = [], []
    tokenizer = model.text.tokenizer
    for z in range(6):
        side, level = z % 2, z // 2
        zones = np.zeros((2, 3), bool)
        zones[side, level] = True
        captions.append(caption_from_zones(zones, 1))
        word_ids.append(tokenizer.convert_tokens_to_ids([LEVELS[level], SIDES[side]]))
    tokens = model.tokenize(captions)
    # Where each caption's two zone words sit among its tokens: (6, 2).
    cols = torch.tensor([[int((ids == w).nonzero()[0]) for w in words]
                         for ids, words in zip(tokens["input_ids"], word_ids)])
    inside = outside = 0.0
    in_zone = None  # (6, G·G) bool, from the first image's grid
    for image in images:
        with torch.no_grad():
            attn = model(image[None].expand(6, -1, -1, -1), **tokens, return_attention=True)["attention"][stage]
        if in_zone is None:
            G = int(round(attn.shape[1] ** 0.5))  # (6, G·G, T): the stage's grid is square
            centre = (torch.arange(G) + 0.5) / G
            level_of = (centre * 3).long()  # (G,) zone level of each token row
            side_of = (centre >= 0.5).long()  # (G,) zone side of each token column
            in_zone = torch.stack([((level_of[:, None] == z // 2) & (side_of[None, :] == z % 2)).reshape(-1)
                                   for z in range(6)])
        for z in range(6):
            on_words = attn[z][:, cols[z]].sum(dim=1)  # (G·G,) weight on the two zone words
            inside += float(on_words[in_zone[z]].mean()) / (6 * len(images))
            outside += float(on_words[~in_zone[z]].mean()) / (6 * len(images))
    return {"inside": round(inside, 3), "outside": round(outside, 3), "focus": round(inside / outside, 2)}


def zone_separation(table: np.ndarray) -> dict[str, float]:
    """How well a zone_table tells apart the two words of each pair: 1 − the mean rate at which a blob
    is taken when the caption names the other word of the pair instead of its own (same level for the
    sides, same side for the levels). 1: always told apart; 0: never (when own-zone blobs are taken)."""
    t = np.asarray(table).reshape(3, 2, 3, 2)  # [blob level, blob side, asked level, asked side]
    pairs = {"left/right": [t[lv, s, lv, 1 - s] for lv in range(3) for s in range(2)]}
    names = ("upper", "middle", "lower")
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs[f"{names[a]}/{names[b]}"] = [t[x, s, y, s] for x, y in ((a, b), (b, a)) for s in range(2)]
    return {k: round(1 - float(np.mean(v)), 3) for k, v in pairs.items()}


def zone_probe(folders: list[str], demo: dict | None = None, summary: Path | None = None) -> dict:
    """zone_table of every text-guided demo checkpoint (best.pt) under `folders` on the test split of
    the 64² demo (or of `demo`, e.g. DEMO96); the blobs come from re-rendering each test image
    (datasets.demo.render_demo_image). Written to `summary` (default:
    results/demo_zone_probe/summary.json, or demo96_zone_probe's)."""
    from scipy import ndimage

    from tmc.checkpoint import model_from_checkpoint

    _, images, unions = demo_test_split(demo)
    blob_masks = []
    for union in unions:  # (S, S) every blob of one image → one mask per blob
        labels, n = ndimage.label(union, structure=np.ones((3, 3), bool))
        blob_masks.append([labels == b for b in range(1, n + 1)])
    size = images.shape[-1]
    shown = [str(Path(f).resolve().relative_to(REPO)) if Path(f).resolve().is_relative_to(REPO) else f
             for f in folders]
    # The command that rewrites this very file: the default grids have no --runs.
    runs_flag = " --runs " + " ".join(shown) if summary else ""
    out = {"command": "python -m tmc.lab.experiments zone-probe" + runs_flag + " --demo96" * bool(demo),
           "machine": machine(),
           "zones": ZONE_NAMES, "note": "rows: the blob's zone; columns: the zone the one-zone caption names; "
           f"values: fraction of those blobs segmented (> half their pixels); demo test split, {size}²",
           "runs": {}}
    for folder in folders:
        for run in sorted(p for p in Path(folder).iterdir() if (p / "best.pt").is_file()):
            model, cfg = model_from_checkpoint(run / "best.pt")
            if not cfg.use_text:
                continue
            table = zone_table(model.eval(), images, blob_masks)
            name = f"{Path(folder).name}/{run.name}"
            dice = json.loads((run / "test_metrics.json").read_text())["dice"]
            out["runs"][name] = {"table": table.round(3).tolist(), "separation": zone_separation(table),
                                 "test_dice": dice}
            if 2 in cfg.active_mcm_stages:
                out["runs"][name]["stage2_attention"] = zone_attention(model, images, stage=2)
            print(name, f"test Dice {dice:.3f}", "told apart:", out["runs"][name]["separation"],
                  "stage-2 attention:", out["runs"][name].get("stage2_attention"))
            print("  blob \\ asked  " + " ".join(f"{z:>12}" for z in ZONE_NAMES))
            for z, row in zip(ZONE_NAMES, table):
                print(f"  {z:<13} " + " ".join(f"{v:12.2f}" for v in row), flush=True)
    summary = summary or REPO / "results" / ("demo96_zone_probe" if demo else "demo_zone_probe") / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(out, indent=2) + "\n")
    print("written:", summary)
    return out


def qata(root: str, minutes: float, cpu_small: bool, seeds: list[int]) -> dict:
    """Paper config on real QaTa: full TMC vs no text, a fixed time budget each, scored on 'valid'.

    The subset's own split is kept (2000 train / 500 valid; it has no test split), so the best
    checkpoint is selected on the same 500 images it is scored on: the numbers measure what the
    model reaches in the budget, not held-out generalisation.
    """
    name = "qata_cpu_small" if cpu_small else "qata_gpu"
    folder = REPO / "results" / name
    common = ["--dataset", "qata", "--root", root, "--split-mode", "layout", "--time-limit", str(minutes),
              "--patience", "1000"]
    if cpu_small:
        # The same protocol shrunk for 2 CPU cores: the tiny preset (its random 2x64 BERT, T = 24)
        # at 96², epochs of 50 steps so validation and best.pt act often within the budget.
        common += ["--preset", "tiny", "--image-size", "96", "--workers", "0",
                   "--max-steps-per-epoch", "50", "--lr", "1e-3"]
    else:
        common += ["--text-model", "random:12x768", "--amp", "bf16", "--workers", "8", "--batch-size", "32"]
    runs = {v: [run_train(folder / f"{v}-s{s}", [*common, "--seed", str(s), *flags], score_split="val")
                for s in seeds]
            for v, flags in (("full", []), ("no-text", ["--no-text"]))}
    command = (f"python -m tmc.lab.experiments qata --root {root} --minutes {minutes}"
               + (" --cpu-small" if cpu_small else ""))
    note = ("Real QaTa-COV19 subset, scored on its 500 'valid' images (also used for selection). "
            "Text encoder: randomly initialised BERT (no pretrained weights can be downloaded here); "
            "Swin from random weights. " + ("CPU: tiny preset at 96², 2 cores." if cpu_small else
                                            "GPU: paper preset at 224², random BERT-base, bf16, batch 32."))
    return summarise(folder, runs, command, note)


# (name, lesion k or None for dense, steps): the demo's case is lesions of one stage-2 token.
PROBE_SETTINGS = (("dense", None, 1500), ("lesions-1x1", 1, 1500), ("lesions-2x2", 2, 1500),
                  ("lesions-1x1-long", 1, 4000))


def grounding_probe(seeds: list[int], parallel: int) -> dict:
    """Dice curves of `tmc.lab.grounding_probe.run_probe` per setting and seed, one thread per run."""
    from concurrent.futures import ProcessPoolExecutor

    from tmc.lab.grounding_probe import run_probe

    folder = REPO / "results" / "grounding_probe"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(name, lesion, steps, seed) for name, lesion, steps in PROBE_SETTINGS for seed in seeds]
    with ProcessPoolExecutor(max_workers=parallel, initializer=_one_thread) as pool:
        futures = [pool.submit(run_probe, lesion, steps, seed) for _, lesion, steps, seed in jobs]
        results = [f.result() for f in futures]
    out = {"command": f"python -m tmc.lab.experiments grounding-probe --seeds {' '.join(map(str, seeds))}",
           "machine": machine(), "note": "held-out Dice of the probe at each evaluation step", "settings": {}}
    for (name, *_), result in zip(jobs, results):
        out["settings"].setdefault(name, []).append(result)
    (folder / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, runs in out["settings"].items():
        for r in runs:
            curve = "  ".join(f"{c['step']}:{c['dice']:.2f}" for c in r["curve"])
            print(f"{name:<18} seed {r['seed']}  {curve}", flush=True)
    return out


# The softmax of MCM's image→text attention against sigmoid weights (each word on its own), with
# each text encoder. The softmax rows are the text-encoder grid's runs (same flags), read, not rerun.
DEMO_MCM_ATTENTION_VARIANTS = {
    "random-bert": [],
    "random-bert-sigmoid": ["--mcm-attention", "sigmoid"],
    "minilm": DEMO_TEXT_ENCODER_VARIANTS["minilm"],
    "minilm-sigmoid": ["--mcm-attention", "sigmoid", *DEMO_TEXT_ENCODER_VARIANTS["minilm"]],
}
DEMO_MCM_ATTENTION_REUSE = {"random-bert": "demo_text_encoder/random-bert", "minilm": "demo_text_encoder/minilm"}
# The sigmoid MiniLM runs again with four times the steps (demo-long's budget).
DEMO_MCM_ATTENTION_LONG_VARIANTS = {"minilm-sigmoid": DEMO_MCM_ATTENTION_VARIANTS["minilm-sigmoid"]}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("demo-default", "demo-ablation", "token-length", "caption-swap", "qata",
                                           "grounding-probe", "demo96", "demo-long", "zone-probe",
                                           "text-encoder", "mcm-attention", "mcm-attention-long"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads per CPU run")
    p.add_argument("--parallel", type=int, default=1, help="demo: runs at a time")
    p.add_argument("--root", default=str(REPO / "data" / "qata"), help="qata: the QaTa-COV19 folder")
    p.add_argument("--minutes", type=float, default=4.0, help="qata: training budget per run")
    p.add_argument("--cpu-small", action="store_true", help="qata: reduced size for a CPU")
    p.add_argument("--demo96", action="store_true", help="zone-probe: on the 96² demo (runs of demo96)")
    p.add_argument("--runs", nargs="*", default=None, help="zone-probe: folders of run folders, "
                   "written to <first folder>/zone_probe.json (default: the grids results/README.md quotes, written to "
                   "results/demo_zone_probe/summary.json)")
    args = p.parse_args(argv)
    if args.experiment == "demo-default":
        # The quick start as a user types it (python train.py --dataset demo --seed S), and without text.
        # The image-only model cannot read the caption, so one seed shows where it stops.
        demo_grid("demo_default", {"default": [], "no-text": ["--no-text"]}, args.seeds, args.threads,
                  args.parallel, budget=[], seeds_of={"no-text": args.seeds[:1]})
        caption_swap(REPO / "results" / "demo_default", command="python -m tmc.lab.experiments demo-default")
    elif args.experiment == "demo-ablation":
        demo_grid("demo_ablation", DEMO_VARIANTS, args.seeds, args.threads, args.parallel)
    elif args.experiment == "token-length":
        # The tiny preset's T is 24, so the T24 runs are exactly the ablation's "full" and
        # "no-alignment" runs: read, not repeated. Without alignment the text steers the masks far
        # more on the demo (caption-swap), so that pair shows what truncation costs.
        demo_grid("demo_token_length",
                  {"T10": ["--text-length", "10"], "T24": [],
                   "T10-no-alignment": ["--text-length", "10", "--no-alignment"],
                   "T24-no-alignment": ["--no-alignment"]},
                  args.seeds, args.threads, args.parallel,
                  reuse={"T24": "demo_ablation/full", "T24-no-alignment": "demo_ablation/no-alignment"})
    elif args.experiment == "caption-swap":
        caption_swap(REPO / "results" / "demo_ablation")
    elif args.experiment == "zone-probe":
        default = ("demo96",) if args.demo96 else ("demo_ablation", "demo_long", "demo_heads4", "demo_text_encoder",
                                                   "demo_mcm_attention")
        # Other folders (--runs) get their own file beside them, so the default summary stays whole.
        summary = Path(args.runs[0]) / "zone_probe.json" if args.runs else None
        zone_probe(args.runs or [str(REPO / "results" / d) for d in default], DEMO96 if args.demo96 else None,
                   summary)
    elif args.experiment == "demo-long":
        demo_grid("demo_long", DEMO_LONG_VARIANTS, args.seeds, args.threads, args.parallel, budget=DEMO_LONG_BUDGET)
    elif args.experiment == "text-encoder":
        demo_grid("demo_text_encoder", DEMO_TEXT_ENCODER_VARIANTS, args.seeds, args.threads, args.parallel)
    elif args.experiment == "mcm-attention":
        demo_grid("demo_mcm_attention", DEMO_MCM_ATTENTION_VARIANTS, args.seeds, args.threads, args.parallel,
                  reuse=DEMO_MCM_ATTENTION_REUSE)
    elif args.experiment == "mcm-attention-long":
        demo_grid("demo_mcm_attention_long", DEMO_MCM_ATTENTION_LONG_VARIANTS, args.seeds, args.threads,
                  args.parallel, budget=DEMO_LONG_BUDGET)
    elif args.experiment == "demo96":
        demo_grid("demo96", DEMO96_VARIANTS, args.seeds, args.threads, args.parallel, demo=DEMO96)
    elif args.experiment == "grounding-probe":
        grounding_probe(args.seeds, args.parallel)
    else:
        qata(args.root, args.minutes, args.cpu_small, args.seeds if len(args.seeds) < 3 else [0])


if __name__ == "__main__":
    main()
