"""What a demo checkpoint reads of its caption, scored on the demo's test split.

    python -m lab.experiments caption-swap     # test Dice with true vs shuffled captions
    python -m lab.experiments zone-probe       # which of the six zone words (level x side) it binds

The demo's captions name the zone of each target blob among distractors, so a model that reads them
segments the targets only; one that reads one factor (the side, or the level) segments the blobs of
that factor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datasets.demo import render_demo_image
from datasets.registry import prepare
from datasets.text_from_mask import LEVELS, SIDES, caption_from_zones, mask_zones
from lab.runs import REPO, machine
from tmc.metrics import confusion, dice_from_counts


def demo_test_split(demo: dict | None = None):
    """The test split of the 64² demo (or of `demo`, e.g. DEMO96): its items, images (N, 1, S, S) and
    masks of every blob, targets and distractors alike (N, S, S) bool, re-rendered by
    datasets.demo.render_demo_image."""
    # deferred: these load torch (seconds); lab.experiments imports this module to launch runs
    import torch
    from datasets.cached import SegmentationSet

    size = demo["image_size"] if demo else 64
    root = str(demo["root"]) if demo else ""
    options = (demo or {}).get("options", {})
    test = SegmentationSet(prepare("demo", root, image_size=size, progress=False, **options), "test")
    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])  # (N, 1, S, S)
    lesion = {"lesion": options["lesion"]} if "lesion" in options else {}
    unions = np.stack([render_demo_image(0, int(it["key"].split("_")[-1]), size, **lesion)[3]["union"]
                       for it in items])
    return items, images, unions


def caption_swap(folder: Path, seed: int = 0, command: str = "python -m lab.experiments caption-swap",
                 demo: dict | None = None) -> dict:
    """Test Dice of every text-guided demo run with its true captions and with the captions shuffled
    among the test images (a fixed permutation), on the default demo or on `demo`'s settings. The gap
    is how much the text steers the masks."""
    # deferred: these load torch (seconds); lab.experiments imports this module to launch runs
    import torch
    from tmc.checkpoint import model_from_checkpoint

    items, images, union = demo_test_split(demo)  # union: (N, S, S) every blob
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
    # deferred: torch takes seconds to load; lab.experiments imports this module to launch runs
    import torch

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
    # deferred: torch takes seconds to load; lab.experiments imports this module to launch runs
    import torch

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
    from scipy import ndimage  # deferred: scipy takes seconds to load, only the zone probe needs it

    # deferred: loads torch (seconds); lab.experiments imports this module to launch runs
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
    out = {"command": "python -m lab.experiments zone-probe" + runs_flag + (demo or {}).get("cli", ""),
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
