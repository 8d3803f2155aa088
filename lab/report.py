"""Rebuild the result tables of README.md and results/README.md from the files in results/, and
check every figure their prose quotes.

    python -m lab.report            # rewrite every generated table and quoted figure in place
    python -m lab.report --check    # exit 1 if a table or a quoted figure differs from the files

A generated table sits between `<!-- table:NAME -->` and `<!-- end table -->`; NAME is a key of
TABLES. So every figure in those tables is read from a JSON file that a command wrote, never retyped.
A figure in the prose is a quote of lab/report_figures.py (lab/quotes.py), recomputed from its files;
a figure that is neither fails the check.
A run "binds all six zones" when the zone probe tells apart every pair of zone words at 0.95 or more.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from lab import quotes
from lab.caption_robustness import CONDITIONS
from lab.qata_protocol import ablation_table, tables
from lab.report_figures import QUOTES

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "results/README.md")
# The README's own tables, in order (caption robustness and the results summary); every other table
# sits in results/README.md, once.
README_TABLES = ("qata-captions", "summary")
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- end table -->)", re.S)
BINDS = 0.95
# train.py flags that set the data and the budget, the same for every row of a grid.
COMMON_FLAGS = {"--dataset", "--seed", "--time-limit", "--root", "--image-size", "--reader-options", "--epochs",
                "--patience", "--plateau-patience"}


def command_of(record: dict) -> str:
    """The command a results file records, as it is run today: the research tools were once the
    package tmc.lab and are now lab/ at the top of the repository."""
    return record["command"].replace("tmc.lab.", "lab.").replace("tmc/lab/", "lab/")


def qata_command(record: dict) -> str:
    """The command, with the folder the QaTa-COV19 data sat in as a placeholder."""
    return re.sub(r"--root \S+", "--root QATA_FOLDER", command_of(record))


def _load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _flags(flags: list[str]) -> str:
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in COMMON_FLAGS:
            skip = True
        else:
            out.append(f)
    return f"`{' '.join(out)}`" if out else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def zone_runs(results: Path) -> dict[str, dict]:
    """Every run the zone probe has measured, by "<grid>/<run>", from every zone-probe file."""
    runs = {}
    files = [results / "demo_zone_probe" / "summary.json", results / "demo96_zone_probe" / "summary.json",
             *sorted(results.glob("*/zone_probe.json"))]
    for f in files:
        if f.is_file():
            for name, run in json.loads(f.read_text())["runs"].items():
                runs.setdefault(name, run)
    return runs


def binds_all_zones(run: dict) -> bool:
    return min(run["separation"].values()) >= BINDS


def grid(results: Path, name: str, binding: bool = False, shuffled: bool = False, wall: bool = False) -> str:
    """One row per variant of results/<name>/summary.json: mean ± std over seeds, and the seeds;
    `wall`: each run's wall time (its wall_time_s.txt)."""
    summary = _load(results, f"{name}/summary.json")
    zones = zone_runs(results) if binding else {}
    swap = _load(results, f"{name}/caption_swap.json")["runs"] if shuffled else {}
    header = ["variant", "flags", "Dice (per image)", "per seed", "mIoU", "Dice (global)"]
    header += ["runs binding all six zones"] * binding + ["Dice, shuffled captions (gap per seed)"] * shuffled
    header += ["wall time per seed (s)"] * wall
    rows = []
    for variant, v in summary["variants"].items():
        row = [variant, _flags(v["runs"][0]["flags"]), _ms(v["dice"]["values"]), _seeds(v["dice"]["values"]),
               _ms(v["miou"]["values"]), _ms(v["dice_global"]["values"])]
        if binding:
            probed = [zones.get(r["run"].removeprefix("results/")) for r in v["runs"]]
            row.append(f"{sum(binds_all_zones(z) for z in probed)} of {len(probed)}" if all(probed) else "—")
        if shuffled:
            gaps = [swap[Path(r["run"]).name] for r in v["runs"] if Path(r["run"]).name in swap]
            row.append(f"{statistics.fmean(g['shuffled'] for g in gaps):.3f} ("
                       + ", ".join(f"{g['gap']:+.3f}" for g in gaps) + ")" if gaps else "—")
        if wall:
            row.append(", ".join(f"{float((results.parent / r['run'] / 'wall_time_s.txt').read_text()):.0f}"
                                 for r in v["runs"]))
        rows.append(row)
    note = f"\n`{command_of(summary)}`; {summary['machine']}. {summary['note']}\n"
    if shuffled:
        every = _load(results, f"{name}/caption_swap.json")["every_blob_dice"]
        note += f"Segmenting every blob, targets and distractors alike, scores Dice {every:.3f}.\n"
    return _table(header, rows) + note


def zone_probe(results: Path) -> str:
    """Per group of seeds: test Dice, how well each pair of zone words is told apart, stage-2 focus."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, run in zone_runs(results).items():
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append((name, run))
    pairs = ("left/right", "upper/middle", "upper/lower", "middle/lower")
    header = ["runs", "seeds", "test Dice", *pairs, "stage-2 focus", "binds all six"]
    rows = []
    for group, runs in groups.items():
        focus = [r.get("stage2_attention", {}).get("focus") for _, r in runs]
        rows.append([group, ", ".join(n.rsplit("-s", 1)[1] for n, _ in runs),
                     _seeds([r["test_dice"] for _, r in runs]),
                     *(", ".join(f"{r['separation'][p]:.2f}" for _, r in runs) for p in pairs),
                     ", ".join("—" if f is None else f"{f:.2f}" for f in focus),
                     f"{sum(binds_all_zones(r) for _, r in runs)} of {len(runs)}"])
    return _table(header, rows)


def grounding_probe(results: Path) -> str:
    """Held-out Dice of the probe at 500/1000/1500/4000 steps: mean (per seed)."""
    summary = _load(results, "grounding_probe/summary.json")
    steps = (500, 1000, 1500, 4000)
    rows = []
    for setting, runs in summary["settings"].items():
        cells = []
        for s in steps:
            at = [next((c["dice"] for c in r["curve"] if c["step"] == s), None) for r in runs]
            cells.append("" if None in at else
                         f"{statistics.fmean(at):.2f} (" + ", ".join(f"{d:.2f}" for d in at) + ")")
        rows.append([setting, ", ".join(str(r["seed"]) for r in runs), *cells])
    return _table(["setting", "seeds", *(f"{s} steps" for s in steps)], rows) + f"\n`{command_of(summary)}`\n"


def qata(results: Path, name: str) -> str:
    """Validation scores of the QaTa runs, with the steps and training speed read from metrics.jsonl."""
    summary = _load(results, f"{name}/summary.json")
    rows = []
    for variant, v in summary["variants"].items():
        for r in v["runs"]:
            run = results / name / Path(r["run"]).name
            epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            batch = json.loads((run / "config.json").read_text())["train"]["batch_size"]
            steps = sum(e["steps"] for e in epochs)
            rate = steps * batch / sum(e["train_time_s"] for e in epochs)
            rows.append([variant, f"{r['dice_per_image']:.3f}", f"{r['iou_per_image']:.3f}",
                         f"{r['dice_global']:.3f}", f"{r['iou_global']:.3f}", f"{len(epochs)} / {steps}",
                         f"{rate:.0f}"])
    header = ["run (seed 0)", "Dice (per image)", "IoU (per image)", "Dice (global)", "IoU (global)",
              "epochs / steps", "training images/s"]
    return _table(header, rows) + f"\n`{qata_command(summary)}`; {summary['machine']}. {summary['note']}\n"


def loose_runs(results: Path, name: str) -> str:
    """Runs started by hand with train.py (no summary): test Dice per seed, grouped by variant."""
    groups: dict[str, list[float]] = {}
    for run in sorted((results / name).glob("*-s*")):
        if (run / "test_metrics.json").is_file():
            groups.setdefault(re.sub(r"-s\d+$", "", run.name), []).append(
                json.loads((run / "test_metrics.json").read_text())["dice"])
    return _table(["variant", "Dice (per image)", "per seed"], [[g, _ms(v), _seeds(v)] for g, v in groups.items()])


def bench_gpu(results: Path) -> str:
    """The GPU benchmark rows, one JSON per row written by `python -m lab.bench --suite`."""
    rows = []
    for f in sorted((results / "bench_gpu").glob("*.json")):
        r = json.loads(f.read_text())
        if "train_step_ms" in r:
            rows.append([f.stem, str(r["batch"]), "compile" if r["compile"] else "eager",
                         f"{r['train_images_per_s']:.1f}", f"{r['train_step_ms']:.0f} ms",
                         f"{100 * r['fraction_of_peak']:.2f}%", f"{r['peak_memory_gib']:.2f} GiB"])
        elif "infer_images_per_s" in r:
            rows.append([f.stem, f"{r['infer_batch']} (latency at 1: {r['infer_latency_ms_b1']:.1f} ms)",
                         "compile" if r["compile"] else "eager", f"{r['infer_images_per_s']:.0f} (inference)",
                         "", "", ""])
    header = ["row", "batch", "mode", "images/s", "training step", "fraction of bf16 peak", "peak memory"]
    return _table(header, rows)


def bench_cpu(results: Path, name: str) -> str:
    """Two checkouts' CPU speed side by side (`bash lab/bench_cpu.sh`): per preset, training
    images/s of each alternating run, and after / before per pair of runs that saw the same load."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for f in sorted((results / name).glob("*.json")):  # <label>-<preset>-<rep>.json
        label, preset, _ = f.stem.split("-")
        runs.setdefault((preset, label), []).append(json.loads(f.read_text()))
    rows = []
    for preset in ("tiny", "small"):
        before, after = runs[(preset, "before")], runs[(preset, "after")]
        train = [a["train_images_per_s"] / b["train_images_per_s"] for a, b in zip(after, before)]
        fastest = [b["train_step_ms_min"] / a["train_step_ms_min"] for a, b in zip(after, before)]
        rows.append([f"{preset} ({after[0]['image_size']}², `{after[0]['text_model']}`)",
                     ", ".join(f"{b['train_images_per_s']:.1f}" for b in before),
                     ", ".join(f"{a['train_images_per_s']:.1f}" for a in after),
                     f"{statistics.fmean(train):.2f}x ± {statistics.stdev(train):.2f}",
                     f"{statistics.fmean(fastest):.2f}x"])
    header = ["preset", "before: training images/s", "after", "after / before (mean ± std of pairs)",
              "fastest step, before / after (mean of pairs)"]
    first = runs[("tiny", "after")][0]
    return (_table(header, rows) + f"\n{first['device_name']}, a synthetic batch of {first['batch']} "
            f"(`lab.bench.make_batch`), {first['dtype']}, torch {first['torch_version']}; "
            f"{len(runs[('tiny', 'after')])} runs of each, alternating.\n")


def op_count(results: Path) -> str:
    """Kernel-launching ops per training step, per part (`python -m lab.op_count --json`)."""
    r = _load(results, "op_count/paper.json")
    rows = [[part, f"{n:,}"] for part, n in r["per_part"].items()]
    rows.append(["**total**", f"**{r['total']:,}**"])
    syncs = "none" if not r["syncs"] else ", ".join(r["syncs"])
    return _table(["part", "ops"], rows) + f"\n`{command_of(r)}`; host-device syncs: {syncs}.\n"


def model_size(results: Path) -> str:
    """Parameters and forward GFLOPs per part of the paper preset, as the GPU benchmark recorded them."""
    r = _load(results, "bench_gpu/train_b8_eager.json")
    parts = ("text_encoder", "swin", "mcm", "alignment", "decoder")
    rows = [[p, f"{r['params'][p] / 1e6:.2f} M", f"{r['forward_gflops_per_part'][p]:.2f}"] for p in parts]
    rows.append(["**total**", f"**{r['params_total'] / 1e6:.2f} M**", f"**{r['forward_gflops']:.1f}**"])
    return (_table(["part", "parameters", "forward GFLOPs (2 per multiply-add)"], rows)
            + f"\n{r['preset']} preset, {r['image_size']}², `{r['text_model']}`, T = {r['text_length']}.\n")


def run_steps(run: Path) -> int:
    """Training steps a run took, summed over its metrics.jsonl (an early stop shows here)."""
    return sum(json.loads(line)["steps"] for line in (run / "metrics.jsonl").read_text().splitlines() if line)


def _steps(runs: list[Path]) -> str:
    steps = [run_steps(r) for r in runs]
    return f"{steps[0]:,}" if len(set(steps)) == 1 else " / ".join(f"{s:,}" for s in steps)


def _minutes(run: Path) -> str:
    return f"{json.loads((run / 'config.json').read_text())['train']['time_limit']:g} min"


def summary(results: Path) -> str:
    """The README's headline: the demo as the quick start runs it, the held-out QaTa runs, the GPU runs;
    a run's time budget is read from its config.json, its steps from its metrics.jsonl."""
    def row(label: str, dice: dict, runs: list[Path], name: str, plain_mean: bool = False) -> list[str]:
        figure = f"{dice['mean']:.3f}" if plain_mean else f"{dice['mean']:.3f} ± {dice['std']:.3f}"
        return [label.replace("BUDGET", _minutes(runs[0])), figure, str(len(dice["values"])), _steps(runs),
                f"`results/{name}`"]

    def grid_row(label: str, name: str, v: str, plain_mean: bool = False) -> list[str]:
        d = _load(results, f"{name}/summary.json")["variants"][v]
        return row(label, d["dice"], [results / name / Path(r["run"]).name for r in d["runs"]], name, plain_mean)

    def captions_row(label: str, v: str) -> list[str]:
        dice = _load(results, "qata_captions/captions_summary.json")["variants"][v]["template"]["dice"]
        return row(label, dice, sorted((results / "qata_captions").glob(f"{v}-s*")), "qata_captions")

    held_out = "QaTa-COV19, held-out test patients, at most BUDGET on one CPU thread, "
    rows = [grid_row("demo, `python train.py --dataset demo` (frozen MiniLM, sigmoid word weights, batches of 16)",
                     "demo_default", "default"),
            grid_row("demo, the same with `--no-text`", "demo_default", "no-text"),
            captions_row(held_out + "`--preset small` (the default: varied training captions)", "sentence"),
            grid_row(held_out + "the paper's literal captions, [CLS] at token 0 "
                     "(`python -m lab.qata_protocol --variants softmax`)", "qata_cpu/protocol_variants", "softmax"),
            captions_row(held_out + "`--preset small --no-text`", "no-text")]
    for v in ("full", "no-text"):
        rows.append(grid_row(f"QaTa subset, {v}, paper preset, BUDGET on one GPU, scored on validation images",
                             "qata_gpu", v, plain_mean=True))
    return _table(["run", "test Dice (per image)", "seeds", "training steps per seed", "files"], rows)


def qata_protocol(results: Path, name: str) -> str:
    """The QaTa protocol's tables (lab.qata_protocol.tables) from its summary.json."""
    summary = _load(results, f"{name}/summary.json")
    return tables(summary) + f"\nMachine: {summary['machine']}. Command: `{qata_command(summary)}`.\n"


def qata_ablations(results: Path) -> str:
    """Each variant of the QaTa protocol against the recipe, seed by seed."""
    base = _load(results, "qata_cpu/protocol/summary.json")
    variants = _load(results, "qata_cpu/protocol_variants/summary.json")
    return (ablation_table(base, variants) + f"\nMachine: {variants['machine']}. Commands: "
            f"`{qata_command(base)}` and `{qata_command(variants)}`.\n")


CAPTION_LABELS = {"sentence": "varied (the default), `--text-sentence`", "tokens": "varied, [CLS] at token 0",
                  "literal": "`--captions literal` (the paper)", "no-text": "image-only (`--no-text`)",
                  "finetune": "varied, encoder fine-tuned (`--no-freeze-text --text-lr 3e-5 --lr-schedule cosine-time`)",
                  "keep50-drop30": "varied, `--caption-keep 0.5 --caption-dropout 0.3`"}


def captions(results: Path, name: str) -> str:
    """Dice with the template, held-out reworded, no and another image's caption, per training
    variant (`python -m lab.caption_robustness`)."""
    summary = _load(results, name)
    rows = []
    for variant, s in summary["variants"].items():
        cells = [f"{s[c]['dice']['mean']:.3f} ± {s[c]['dice']['std']:.3f} / "
                 f"{s[c]['dice_global']['mean']:.3f} ± {s[c]['dice_global']['std']:.3f}" for c in CONDITIONS]
        rows.append([CAPTION_LABELS.get(variant, variant), str(s["seeds"])] + cells)
    return (_table(["training captions", "seeds"] + [f"{c} caption" for c in CONDITIONS], rows)
            + f"\nDice per image / global, mean ± std over seeds. Machine: {summary['machine']}. "
              f"Command: `{command_of(summary)}`.\n")


def caption_probe(results: Path) -> str:
    """Zone read-out of the text encoder's feature, template against report words (`python -m
    lab.caption_probe`)."""
    from lab.caption_probe import table  # loads torch and the encoder; the other tables need neither

    probe = _load(results, "caption_probe/probe.json")
    return table(probe, command_of(probe))


TABLES = {
    "summary": summary,
    "caption-probe": caption_probe,
    "qata-captions": lambda r: captions(r, "qata_captions/captions_summary.json"),
    "qata-captions-val": lambda r: captions(r, "qata_captions/captions_val_summary.json"),
    "model-size": model_size,
    "demo-default": lambda r: grid(r, "demo_default", shuffled=True, wall=True),
    "demo-recipe": lambda r: grid(r, "demo_recipe", wall=True),
    "demo-default-batch8": lambda r: grid(r, "demo_default_batch8", shuffled=True, wall=True),
    "demo-default-plateau10": lambda r: grid(r, "demo_default_plateau10", shuffled=True, wall=True),
    "demo-ablation": lambda r: grid(r, "demo_ablation", binding=True, shuffled=True),
    "demo96": lambda r: grid(r, "demo96", binding=True),
    "demo-long": lambda r: grid(r, "demo_long", binding=True),
    "text-encoder": lambda r: grid(r, "demo_text_encoder", binding=True),
    "mcm-attention": lambda r: grid(r, "demo_mcm_attention", binding=True),
    "mcm-attention-long": lambda r: grid(r, "demo_mcm_attention_long", binding=True),
    "token-length": lambda r: grid(r, "demo_token_length"),
    "zone-probe": zone_probe,
    "grounding-probe": grounding_probe,
    "heads4": lambda r: loose_runs(r, "demo_heads4"),
    "alignment-weight": lambda r: loose_runs(r, "demo_alignment_weight"),
    "text-encoder-long": lambda r: loose_runs(r, "demo_text_encoder_long"),
    "qata-gpu": lambda r: qata(r, "qata_gpu"),
    "qata-cpu-small": lambda r: qata(r, "qata_cpu_small"),
    "bench-gpu": bench_gpu,
    "bench-cpu-ops": lambda r: bench_cpu(r, "bench_cpu_ops"),
    "bench-cpu-ops-prev": lambda r: bench_cpu(r, "bench_cpu_ops_vs_08c194a"),
    "bench-cpu-windows": lambda r: bench_cpu(r, "bench_cpu_windows_vs_9284fc6"),
    "op-count": op_count,
    "qata-protocol": lambda r: qata_protocol(r, "qata_cpu/protocol"),
    "qata-ablations": qata_ablations,
}


def render(text: str, results: Path) -> str:
    """`text` with every generated block rebuilt from `results`; an unknown NAME raises KeyError."""
    return BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)](results) + m.group(4), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="report stale tables and figures instead of mending them")
    args = p.parse_args(argv)
    stale, problems, results = [], [], REPO / "results"
    for doc in DOCUMENTS:
        path = REPO / doc
        text = path.read_text()
        found, new = quotes.check(doc, render(text, results), QUOTES[doc], results)
        if new != text:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
        # a rewrite mends stale tables and figures: what is left needs a hand (a quote, an unquoted figure)
        problems += found if args.check else quotes.check(doc, new, QUOTES[doc], results)[0]
    for line in problems:
        print(line)
    if stale:
        print(("stale tables or figures in " if args.check else "rewrote ") + ", ".join(stale)
              + (": run `python -m lab.report`" if args.check else ""))
    return 1 if problems or stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
