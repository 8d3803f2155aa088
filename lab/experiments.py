"""The experiments behind results/README.md; each writes raw JSON under results/.

    python -m lab.experiments demo-default --threads 1 --parallel 2
                                                       # CPU: the quick start per seed, with and without text
    python -m lab.experiments demo-recipe --threads 1 --parallel 2
                                                       # CPU, ~30 min: the default against batches of 8, the first demo
    python -m lab.experiments demo-ablation            # CPU: 5 variants x 3 seeds on the first demo
    python -m lab.experiments token-length             # CPU: T = 10 vs T = 24 on the demo
    python -m lab.experiments caption-swap             # does the text steer? true vs shuffled captions
    python -m lab.experiments demo96                   # CPU: full / no text / no alignment at 96², 3000 images
    python -m lab.experiments demo-long                # CPU, ~45 min: full / no text with 4x the steps
    python -m lab.experiments text-encoder             # CPU, ~55 min: pretrained MiniLM text encoder; gradient clipping
    python -m lab.experiments mcm-attention --seeds 0 1 2 3 4 --threads 1 --parallel 2
                                                       # CPU, ~35 min: softmax vs sigmoid image→text weights
    python -m lab.experiments mcm-attention-long --seeds 2 3 4 --threads 1 --parallel 2
                                                       # CPU, ~50 min: the sigmoid MiniLM runs with 4x the steps
    python -m lab.experiments zone-probe               # which zone words a demo checkpoint has learned
    python -m lab.experiments grounding-probe          # CPU, ~5 min: how fast MCM learns zones (lab/grounding_probe.py)
    python -m lab.experiments qata --root data/qata --minutes 2.5        # GPU, bf16 (both runs ~6 min on an H200)
    python -m lab.experiments qata --root data/qata --cpu-small --minutes 3   # reduced, CPU

The CPU protocol on QaTa (held-out test patients, variants x seeds at equal minutes) is its own
command: python -m lab.qata_protocol (lab/qata_protocol.py).

Put the QaTa subset under `data/qata` (git-ignored) first. The GPU run needs torch and transformers
only (a random BERT-base with the shipped vocabulary).

Every run is `train.py` in a subprocess with a fixed budget (steps on the demo, minutes on QaTa), so
the numbers depend only on the flags written beside them. `summary.json` in each folder holds the
per-run test metrics and the mean ± std per variant; `table.md` is the table results/README.md quotes.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from datasets.registry import prepare
from lab.demo_probes import caption_swap, zone_probe
from lab.runs import REPO, machine, run_train, summarise


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
# word weights, batches of 8, 40 epochs of 25 steps, the plateau schedule, early stop after 10),
# pinned so that they still reproduce now that the demo's defaults are the frozen MiniLM recipe in
# batches of 16; they run on the first demo (DEMO_V1). No wall-clock limit, so a busy machine
# changes only the time a run takes, never its result.
DEMO_BUDGET = ["--text-model", "random:2x64", "--no-freeze-text", "--mcm-attention", "softmax",
               "--batch-size", "8", "--lr-schedule", "plateau",
               "--epochs", "40", "--patience", "10", "--plateau-patience", "5",
               "--max-steps-per-epoch", "25", "--time-limit", "0"]
# Four times that budget (160 epochs of 25 steps), early stop and lr cuts scaled alike: the grounding
# probe reached 0.90 on one-token lesions only after ~4000 steps, and the 1000-step full runs were still
# improving when they stopped.
DEMO_LONG_BUDGET = [*DEMO_BUDGET, "--epochs", "160", "--patience", "40", "--plateau-patience", "20"]


# A larger demo: at 96² a lesion covers about 3 stage-2 tokens instead of 1.4,
# and 3000 images instead of 600 leave less to memorise. Own folder, so it never replaces data/demo.
DEMO96 = {"root": REPO / "data" / "demo96", "image_size": 96, "options": {"n": 3000, "size": 96, "lesion": 0.075},
          "cli": " --demo96"}
# The first demo (lesion radius 0.075 of the side, 1.4 stage-2 tokens), on which every grid here
# but demo-default and demo-recipe was run; its own folder, so it never replaces data/demo.
DEMO_V1 = {"root": REPO / "data" / "demo-v1", "image_size": 64, "options": {"lesion": 0.075}, "cli": ""}
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
           "demo_default": "demo-default", "demo_recipe": "demo-recipe"}[name]
    command = (f"python -m lab.experiments {cli} --seeds {' '.join(map(str, seeds))} "
               f"--threads {threads} --parallel {parallel}")
    n_test = runs[next(iter(runs))][0]["n_images"]  # read from the runs, not assumed from the split
    data = (f"Demo test split ({n_test} synthetic images, 64²)" if demo is None else
            f"Demo at {demo['image_size']}² with {demo['options'].get('n', 600)} images, lesion radius "
            f"{demo['options'].get('lesion')} of the side (test split: {n_test})")
    note = (f"{data}, tiny preset, demo defaults" + (f" with {' '.join(budget)}" if budget else "") + "; "
            "mean ± std over seeds of the test metrics of best.pt (selected on validation Dice).")
    return summarise(folder, runs, command, note)


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
    command = (f"python -m lab.experiments qata --root {root} --minutes {minutes}"
               + (" --cpu-small" if cpu_small else ""))
    note = ("Real QaTa-COV19 subset, scored on its 500 'valid' images (also used for selection). "
            "Text encoder: randomly initialised BERT (no pretrained weights can be downloaded here); "
            "Swin from random weights. " + ("CPU: tiny preset at 96², 2 cores." if cpu_small else
                                            "GPU: paper preset at 224², random BERT-base, bf16, batch 32."))
    return summarise(folder, runs, command, note)


# (name, lesion k or None for dense, steps): the first demo's lesions are k = 1, today's about k = 2.
PROBE_SETTINGS = (("dense", None, 1500), ("lesions-1x1", 1, 1500), ("lesions-2x2", 2, 1500),
                  ("lesions-1x1-long", 1, 4000))


def grounding_probe(seeds: list[int], parallel: int) -> dict:
    """Dice curves of `lab.grounding_probe.run_probe` per setting and seed, one thread per run."""
    # deferred: loads torch (seconds to import); the other experiments only launch train.py
    from lab.grounding_probe import run_probe

    folder = REPO / "results" / "grounding_probe"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(name, lesion, steps, seed) for name, lesion, steps in PROBE_SETTINGS for seed in seeds]
    with ProcessPoolExecutor(max_workers=parallel, initializer=_one_thread) as pool:
        futures = [pool.submit(run_probe, lesion, steps, seed) for _, lesion, steps, seed in jobs]
        results = [f.result() for f in futures]
    out = {"command": f"python -m lab.experiments grounding-probe --seeds {' '.join(map(str, seeds))}",
           "machine": machine(), "note": "held-out Dice of the probe at each evaluation step", "settings": {}}
    for (name, *_), result in zip(jobs, results):
        out["settings"].setdefault(name, []).append(result)
    (folder / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, runs in out["settings"].items():
        for r in runs:
            curve = "  ".join(f"{c['step']}:{c['dice']:.2f}" for c in r["curve"])
            print(f"{name:<18} seed {r['seed']}  {curve}", flush=True)
    return out


# The demo's recipe, one change at a time against its default runs (demo-default's, read): batches
# of 8 for the same 40 passes (twice the steps), and the first demo's lesions.
DEMO_RECIPE_VARIANTS = {
    "default": [],
    "batch-8": ["--batch-size", "8"],
    f"lesion-{DEMO_V1['options']['lesion']}": ["--root", str(DEMO_V1["root"]),
                                               "--reader-options", f"lesion={DEMO_V1['options']['lesion']}"],
}


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
    import torch  # deferred: torch takes seconds to load; only the probe's worker processes need it

    torch.set_num_threads(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("demo-default", "demo-recipe", "demo-ablation", "token-length",
                                           "caption-swap", "qata",
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
        caption_swap(REPO / "results" / "demo_default", command="python -m lab.experiments demo-default")
    elif args.experiment == "demo-recipe":
        prepare("demo", str(DEMO_V1["root"]), image_size=64, **DEMO_V1["options"])  # before parallel runs
        demo_grid("demo_recipe", DEMO_RECIPE_VARIANTS, args.seeds, args.threads, args.parallel, budget=[])
    elif args.experiment == "demo-ablation":
        demo_grid("demo_ablation", DEMO_VARIANTS, args.seeds, args.threads, args.parallel, demo=DEMO_V1)
    elif args.experiment == "token-length":
        # The tiny preset's T is 24, so the T24 runs are exactly the ablation's "full" and
        # "no-alignment" runs: read, not repeated. Without alignment the text steers the masks far
        # more on the demo (caption-swap), so that pair shows what truncation costs.
        demo_grid("demo_token_length",
                  {"T10": ["--text-length", "10"], "T24": [],
                   "T10-no-alignment": ["--text-length", "10", "--no-alignment"],
                   "T24-no-alignment": ["--no-alignment"]},
                  args.seeds, args.threads, args.parallel,
                  reuse={"T24": "demo_ablation/full", "T24-no-alignment": "demo_ablation/no-alignment"},
                  demo=DEMO_V1)
    elif args.experiment == "caption-swap":
        caption_swap(REPO / "results" / "demo_ablation", demo=DEMO_V1)
    elif args.experiment == "zone-probe":
        default = ("demo96",) if args.demo96 else ("demo_ablation", "demo_long", "demo_heads4", "demo_text_encoder",
                                                   "demo_mcm_attention")
        # Other folders (--runs) get their own file beside them, so the default summary stays whole.
        summary = Path(args.runs[0]) / "zone_probe.json" if args.runs else None
        # The default grids ran on the first demo; --runs reads runs of today's default demo.
        zone_probe(args.runs or [str(REPO / "results" / d) for d in default],
                   DEMO96 if args.demo96 else None if args.runs else DEMO_V1, summary)
    elif args.experiment == "demo-long":
        demo_grid("demo_long", DEMO_LONG_VARIANTS, args.seeds, args.threads, args.parallel, budget=DEMO_LONG_BUDGET,
                  demo=DEMO_V1)
    elif args.experiment == "text-encoder":
        demo_grid("demo_text_encoder", DEMO_TEXT_ENCODER_VARIANTS, args.seeds, args.threads, args.parallel,
                  demo=DEMO_V1)
    elif args.experiment == "mcm-attention":
        demo_grid("demo_mcm_attention", DEMO_MCM_ATTENTION_VARIANTS, args.seeds, args.threads, args.parallel,
                  reuse=DEMO_MCM_ATTENTION_REUSE, demo=DEMO_V1)
    elif args.experiment == "mcm-attention-long":
        demo_grid("demo_mcm_attention_long", DEMO_MCM_ATTENTION_LONG_VARIANTS, args.seeds, args.threads,
                  args.parallel, budget=DEMO_LONG_BUDGET, demo=DEMO_V1)
    elif args.experiment == "demo96":
        demo_grid("demo96", DEMO96_VARIANTS, args.seeds, args.threads, args.parallel, demo=DEMO96)
    elif args.experiment == "grounding-probe":
        grounding_probe(args.seeds, args.parallel)
    else:
        qata(args.root, args.minutes, args.cpu_small, args.seeds if len(args.seeds) < 3 else [0])


if __name__ == "__main__":
    main()
