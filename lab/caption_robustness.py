"""Does the model read what a caption says, however it is worded? One checkpoint, four captions.

    python -m lab.caption_robustness results/qata_captions/varied-s{0,1,2} \\
        results/qata_captions/no-text-s{0,1,2} --out results/qata_captions

Each run folder's best.pt is scored on its run's test split (the cache rebuilt from config.json)
with every test image's caption replaced by:
  template   the dataset's own caption;
  reworded   the same facts from the held-out report rewriter (lab/report_captions.py, never
             used for training or selection; seed --reword-seed, redrawn where it would be cut
             at the model's T tokens);
  empty      no caption ("");
  shuffled   another test image's caption (numpy default_rng(--shuffle-seed) permutation, as the
             QaTa protocol).
An image-only run reads no caption: it is scored once, and that score stands in every column.
Per image and global Dice (tmc.engine.summarize, empty-vs-empty = 1). Writes <run>/captions.json,
and in --out captions_summary.json and captions_table.md: mean ± std over the seeds of each
variant (the run folder's name without -s<seed>), with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from lab.qata_protocol import _fmt, _ms, _scores, caption_permutation, predict, run_cache
from lab.report_captions import report_caption
from lab.runs import REPO, machine

CONDITIONS = ("template", "reworded", "empty", "shuffled")


class Captioned:
    """A split whose item i carries `texts[i]` as its caption (same image and mask)."""

    def __init__(self, base, texts: list[str]) -> None:
        if len(texts) != len(base):
            raise ValueError(f"{len(texts)} captions for {len(base)} images")
        self.base, self.texts = base, list(texts)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], "text": self.texts[i]}


def fits_in(encoder):
    """text -> whether all its tokens fit in the encoder's T (nothing cut)."""
    return lambda text: len(encoder.tokenizer(text)["input_ids"]) <= encoder.length


def test_captions(texts: list[str], condition: str, fits, reword_seed: int = 0,
                  shuffle_seed: int = 0) -> list[str]:
    """The test split's captions under one of CONDITIONS."""
    if condition == "template":
        return list(texts)
    if condition == "reworded":
        return [report_caption(t, reword_seed, i, fits) for i, t in enumerate(texts)]
    if condition == "empty":
        return [""] * len(texts)
    if condition == "shuffled":
        return [texts[j] for j in caption_permutation(len(texts), shuffle_seed)]
    raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")


def score_run(run: Path, reword_seed: int = 0, shuffle_seed: int = 0, split: str = "test") -> dict:
    """Every condition's scores for one finished run on `split`, also written to <run>/captions.json
    (captions_val.json for the validation split, the one a choice between variants may read)."""
    # deferred: these load torch (seconds); lab.report imports this module for its CONDITIONS alone
    from datasets.cached import SegmentationSet
    from tmc.checkpoint import model_from_checkpoint

    written = run / ("captions.json" if split == "test" else f"captions_{split}.json")
    old = _scored(written, split, reword_seed, shuffle_seed)
    if old:  # scored before with the same seeds: read, not repeated
        return old
    test = SegmentationSet(run_cache(run), split)
    model, cfg = model_from_checkpoint(run / "best.pt")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {"run": str(run.resolve().relative_to(REPO) if run.resolve().is_relative_to(REPO) else run.name),
           "use_text": cfg.use_text, "steps": rows[-1]["total_steps"], "epochs": len(rows),
           "split": split, "reword_seed": reword_seed, "shuffle_seed": shuffle_seed}
    if not cfg.use_text:
        scores = _scores(predict(model, test))
        out.update({c: scores for c in CONDITIONS})
    else:
        fits = fits_in(model.text)
        reworded = test_captions(test.texts, "reworded", fits, reword_seed)
        out["reworded_unchanged"] = sum(a == b for a, b in zip(reworded, test.texts))
        out["reworded_cut"] = sum(not fits(t) for t in reworded)
        out["reworded_examples"] = reworded[:5]
        for c in CONDITIONS:
            texts = reworded if c == "reworded" else test_captions(test.texts, c, fits, reword_seed, shuffle_seed)
            out[c] = _scores(predict(model, Captioned(test, texts)))
    written.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _scored(written: Path, split: str, reword_seed: int, shuffle_seed: int) -> dict | None:
    """The scores in `written` when they were made on `split` with these seeds, else None."""
    if not written.is_file():
        return None
    old = json.loads(written.read_text())
    same = (old.get("split"), old.get("reword_seed"), old.get("shuffle_seed")) == (split, reword_seed, shuffle_seed)
    return old if same else None


def variant_of(run: Path) -> str:
    return re.sub(r"-s\d+$", "", run.name)


def summarize_runs(results: dict[str, list[dict]], command: str, split: str = "test") -> tuple[dict, str]:
    """{variant: {condition: {metric: mean ± std}}} and the markdown table."""
    summary = {}
    lines = ["| variant | seeds | steps | " + " | ".join(f"{c}: Dice (per image / global)" for c in CONDITIONS) + " |",
             "|---|---|---|" + "---|" * len(CONDITIONS)]
    for variant, runs in results.items():
        s = {"seeds": len(runs), "steps": _ms([r["steps"] for r in runs])}
        for c in CONDITIONS:
            s[c] = {m: _ms([r[c][m] for r in runs]) for m in ("dice", "dice_global")}
        summary[variant] = s
        cells = [f"{_fmt(s[c]['dice'])} / {_fmt(s[c]['dice_global'])}" for c in CONDITIONS]
        lines.append(f"| {variant} | {len(runs)} | {s['steps']['mean']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {machine()}. Command: `{command}`. Split: each run's own {split} split (the "
                  "runs' config.json); captions replaced at test time only."]
    return summary, "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding best.pt and config.json (or, once scored, their captions*.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for the summary and the table")
    p.add_argument("--reword-seed", type=int, default=0)
    p.add_argument("--shuffle-seed", type=int, default=0)
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="val: the runs' validation split, for choosing between variants")
    args = p.parse_args(argv)
    stem = "captions" if args.split == "test" else f"captions_{args.split}"
    for run in args.runs:  # a run scored before with these seeds needs only its captions*.json
        if not (run / "best.pt").is_file() and not _scored(run / f"{stem}.json", args.split, args.reword_seed,
                                                             args.shuffle_seed):
            sys.exit(f"{run}: no best.pt; fix: pass the folder of a finished run")
    results: dict[str, list[dict]] = {}
    for run in args.runs:
        r = score_run(run, args.reword_seed, args.shuffle_seed, args.split)
        results.setdefault(variant_of(run), []).append(r)
        print(f"{run.name}: " + "  ".join(f"{c} {r[c]['dice']:.4f}/{r[c]['dice_global']:.4f}"
                                          for c in CONDITIONS), flush=True)
    command = "python -m lab.caption_robustness " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    summary, table = summarize_runs(results, command, args.split)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}_summary.json").write_text(json.dumps({"command": command, "machine": machine(),
                                                                "variants": summary}, indent=2) + "\n")
    (args.out / f"{stem}_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
