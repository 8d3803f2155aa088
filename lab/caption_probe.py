"""Does the text encoder know what report words mean? A linear read-out of the zones a caption names.

    python -m lab.caption_probe results/qata_captions/sentence-s0 --out results/caption_probe

The model reads a caption only through its text encoder, so it can follow a report's words only if
the encoder's features already place them near the generator's. The probe asks the encoder alone:
a logistic read-out of the six lung zones (left/right × upper/middle/lower) from the feature the
model reads at token 0 ([CLS], or the token mean with --text-sentence), fitted on the training
generator's rewordings of the run's training captions (datasets/captions.py, as training sees
them) and scored on the test split's template captions and on the held-out report rewriter's
(lab/report_captions.py: other words for the finding and the zones). Two encoders:
  frozen      the run's encoder as the model reads it (its weights are the packaged ones);
  fine-tuned  the same encoder trained with the read-out on the generator's captions (--steps
              batches of --batch at --lr), as --no-freeze-text would train it.
A zone is right when the read-out's sign matches the caption's facts; "exact" needs all six.
"majority" answers each zone's commonest training answer. Writes probe.json and probe_table.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.cached import SegmentationSet
from datasets.captions import CaptionVariation, chest_facts
from lab.caption_robustness import fits_in, test_captions
from lab.qata_protocol import run_cache
from lab.runs import machine
from tmc.text import TextEncoder

ZONES = tuple((side, level) for side in ("left", "right") for level in ("upper", "middle", "lower"))


def zone_labels(captions: list[str]) -> torch.Tensor:
    """(N, 6) float, 1 where the caption names the zone (ZONES order); ValueError on a caption the
    QaTa template reader cannot read."""
    rows = []
    for c in captions:
        facts = chest_facts(c)
        if facts is None:
            raise ValueError(f"not a QaTa-style caption: {c!r}")
        rows.append([float(z in facts.zones) for z in ZONES])
    return torch.tensor(rows)


@torch.no_grad()
def sentence_features(encoder: TextEncoder, captions: list[str], batch: int = 64) -> torch.Tensor:
    """(N, d_l): the token-0 feature the model reads for each caption."""
    encoder.eval()
    out = []
    for i in range(0, len(captions), batch):
        tok = encoder.tokenize(captions[i:i + batch])
        out.append(encoder(tok["input_ids"], tok["attention_mask"])[:, 0])  # (b, d_l)
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Logistic regression per zone on standardised features (L-BFGS, full batch); the
    standardisation is folded into the returned Linear."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    z = (x - mean) / std

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(z), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # head((x - mean) / std) as one Linear of x
        head.bias -= (head.weight * (mean / std)).sum(1)
        head.weight /= std
    return head


def zone_scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-zone accuracy and exact match (all six zones right) of read-out logits against labels."""
    right = (logits > 0).float() == y  # (N, 6)
    return {"zone_accuracy": right.float().mean().item(), "exact": right.all(1).float().mean().item()}


def majority_scores(y_train: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Scores of answering each zone's commonest training answer for every caption."""
    guess = (y_train.mean(0) > 0.5).float().expand_as(y_test)
    return zone_scores(guess * 2 - 1, y_test)


def fine_tune(encoder: TextEncoder, texts: list[str], y: torch.Tensor, steps: int, batch: int,
              lr: float, seed: int) -> torch.nn.Linear:
    """Train the encoder and a zone read-out together with BCE (the read-out at 10× lr, as a new
    head); returns the read-out, the encoder is trained in place."""
    gen = torch.Generator().manual_seed(seed)
    encoder.requires_grad_(True)
    head = torch.nn.Linear(encoder.hidden_size, y.shape[1])
    opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": lr},
                             {"params": head.parameters(), "lr": 10 * lr}], weight_decay=0.0)
    encoder.train()
    for step in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=gen).tolist()
        tok = encoder.tokenize([texts[i] for i in idx])
        loss = F.binary_cross_entropy_with_logits(head(encoder(tok["input_ids"], tok["attention_mask"])[:, 0]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"fine-tune step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    encoder.requires_grad_(False)
    return head


def probe_sets(train_captions: list[str], tests: list[str], fits, rewordings: int,
               reword_seed: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The read-out's training texts, each mapped to the caption whose facts it states (every
    training caption and `rewordings` of the generator's variants of it), and the test captions
    per condition (template; reworded, in the same order)."""
    variation = CaptionVariation()
    train = {c: c for c in train_captions}
    for c in train_captions:
        for k in range(rewordings):
            train.setdefault(variation.variant(c, k), c)
    return train, {c: test_captions(tests, c, fits, reword_seed) for c in ("template", "reworded")}


def score_encoder(encoder: TextEncoder, head: torch.nn.Linear | None, train: list[str], y_train: torch.Tensor,
                  tests: dict[str, list[str]], y_test: torch.Tensor) -> dict:
    """Fit a read-out on the frozen features (head None) or use the fine-tuned one; scores per
    condition (every condition states the facts of `y_test`, row by row)."""
    if head is None:
        head = fit_probe(sentence_features(encoder, train), y_train)
    with torch.no_grad():
        return {c: zone_scores(head(sentence_features(encoder, t)), y_test) for c, t in tests.items()}


def run_probe(run: Path, rewordings: int, steps: int, batch: int, lr: float, seed: int) -> dict:
    """Both encoders' scores for one run's captions."""
    torch.manual_seed(seed)
    model_cfg = json.loads((run / "config.json").read_text())["model"]
    cache = run_cache(run)
    train_captions = [c for c in SegmentationSet(cache, "train").texts if chest_facts(c)]
    test_texts = [c for c in SegmentationSet(cache, "test").texts if chest_facts(c)]

    def encoder() -> TextEncoder:
        return TextEncoder(model_cfg["text_model"], model_cfg["text_length"], freeze=True,
                           sentence=model_cfg["text_sentence"])

    frozen = encoder()
    sources, tests = probe_sets(train_captions, test_texts, fits_in(frozen), rewordings)
    train, y_train, y_test = list(sources), zone_labels(list(sources.values())), zone_labels(test_texts)
    print(f"{len(train)} training texts, {len(test_texts)} test captions", flush=True)
    results = {"frozen": score_encoder(frozen, None, train, y_train, tests, y_test)}
    tuned = encoder()
    head = fine_tune(tuned, train, y_train, steps, batch, lr, seed)
    results["fine-tuned"] = score_encoder(tuned, head, train, y_train, tests, y_test)
    majority = majority_scores(y_train, y_test)
    return {"run": run.as_posix(), "text_model": model_cfg["text_model"], "text_sentence": model_cfg["text_sentence"],
            "training_texts": len(train), "test_captions": len(test_texts), "majority": majority,
            "reworded_examples": tests["reworded"][:5], "encoders": results}


def table(result: dict, command: str) -> str:
    lines = ["| encoder | template: zone accuracy / exact | reworded: zone accuracy / exact |",
             "|---|---|---|"]
    for name, scores in result["encoders"].items():
        cells = [f"{scores[c]['zone_accuracy']:.3f} / {scores[c]['exact']:.3f}" for c in ("template", "reworded")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    m = result["majority"]
    lines.append(f"| majority answer | {m['zone_accuracy']:.3f} / {m['exact']:.3f} | "
                 f"{m['zone_accuracy']:.3f} / {m['exact']:.3f} |")
    lines += ["", f"{result['training_texts']} training texts (the training split's captions and the "
                  f"generator's rewordings), {result['test_captions']} test captions. Machine: {machine()}. "
                  f"Command: `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a QaTa run folder (its config.json names the data and encoder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rewordings", type=int, default=24,
                   help="generator variants per training caption (training draws from 24)")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning batches")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5, help="the encoder's fine-tuning lr")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.run / "config.json").is_file():
        sys.exit(f"{args.run}: no config.json; fix: pass a run folder written by train.py")
    result = run_probe(args.run, args.rewordings, args.steps, args.batch, args.lr, args.seed)
    command = "python -m lab.caption_probe " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {"command": command, "machine": machine(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "probe_table.md").write_text(text := table(result, command))
    print(text)


if __name__ == "__main__":
    main()
