"""lab.qata_protocol: the recipe and variants resolve, the size quartiles, and the whole command on
a fake QaTa folder, its numbers recomputed image by image."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lab import qata_protocol as protocol
from tmc.train_config import build_parser, explicit_overrides, resolve_model_config, resolve_train_config

SIDE = 32
ZONES = ("upper left", "lower right", "middle left", "upper right")


def _resolve(flags):
    train_over, model_over = explicit_overrides(build_parser().parse_args(flags))
    cfg = resolve_train_config(train_over)
    return cfg, resolve_model_config(cfg.preset, model_over)


def test_recipe_and_every_variant_are_valid_train_flags():
    args = protocol.parse_args(["--root", "data/qata", "--minutes", "25", "--variants", "all"])
    assert args.variants == list(protocol.VARIANTS)
    for v in args.variants:
        _resolve(protocol.run_flags(args, v, 0))  # argparse exits on a typo
    cfg, model = _resolve(protocol.run_flags(args, "best", 1))
    assert (cfg.split_mode, cfg.lr_schedule, cfg.time_limit, cfg.seed) == ("layout-val", "cosine-time", 25.0, 1)
    assert (cfg.augment, cfg.seg_loss, cfg.lr, cfg.workers, cfg.max_steps_per_epoch) == (
        "text-consistent", "bce+dice", 1e-3, 0, 50)
    assert cfg.snapshot_steps == protocol.EQUAL_STEPS
    assert (model.image_size, model.text_model, model.freeze_text, model.mcm_attention) == (
        96, "minilm", True, "softmax")
    _, no_text = _resolve(protocol.run_flags(args, "no-text", 0))
    assert not no_text.use_text and no_text.embed_dim == model.embed_dim  # same encoder and decoder
    cfg, tuned = _resolve(protocol.run_flags(args, "fine-tuned", 0))
    assert not tuned.freeze_text and cfg.text_lr == 3e-5
    assert _resolve(protocol.run_flags(args, "bottleneck-only", 0))[1].mcm_stages == (4,)
    with pytest.raises(SystemExit):
        protocol.parse_args(["--root", "x", "--variants", "no-such-variant"])


def _summary(variants: dict[str, dict[int, tuple[float, float]]]) -> dict:
    """A summary.json of {variant: {seed: (dice, dice_global)}}, as summarise_protocol writes it."""
    out = {}
    for name, seeds in variants.items():
        runs = [{"run": f"results/x/{name}-s{s}", "steps": 100, "test": {"dice": d, "dice_global": g}}
                for s, (d, g) in seeds.items()]
        out[name] = {k: protocol._ms([r["test"][k] for r in runs]) for k in ("dice", "dice_global")}
        out[name].update(steps=protocol._ms([100] * len(runs)), runs=runs)
    return {"variants": out}


def test_ablation_table_subtracts_the_reference_run_of_the_same_seed():
    base = _summary({"best": {0: (0.70, 0.80), 1: (0.60, 0.90)}})
    other = _summary({"no-alignment": {1: (0.50, 0.85), 0: (0.72, 0.70)}})  # seeds in another order
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in protocol.ablation_table(base, other).splitlines()[2:]}
    # seed 0: +0.02 / -0.10, seed 1: -0.10 / -0.05 → means -0.04 and -0.075, sample std over 2 seeds
    assert rows["no-alignment"][4] == f"-0.040 ± {math.sqrt(2 * 0.06 ** 2):.3f}"
    assert rows["no-alignment"][6] == f"-0.075 ± {math.sqrt(2 * 0.025 ** 2):.3f}"
    assert rows["best"][4] == "—" and rows["best"][1] == "2"


def test_shuffled_captions_move_only_the_captions():
    class Split:
        texts = ["a", "b", "c"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": i, "mask": -i, "text": self.texts[i]}

    shuffled = protocol.ShuffledCaptions(Split(), [2, 0, 1])
    assert [shuffled[i] for i in range(3)] == [{"image": 0, "mask": 0, "text": "c"},
                                               {"image": 1, "mask": -1, "text": "a"},
                                               {"image": 2, "mask": -2, "text": "b"}]


def test_size_quartiles_by_hand():
    # true areas (tp + fn): a 0, b 3, c 3, d 10, e 40 → groups {a, b}, {c}, {d}, {e}
    records = [{"key": "e", "tp": 20, "fp": 0, "fn": 20}, {"key": "c", "tp": 3, "fp": 3, "fn": 0},
               {"key": "a", "tp": 0, "fp": 0, "fn": 0}, {"key": "d", "tp": 0, "fp": 5, "fn": 10},
               {"key": "b", "tp": 1, "fp": 0, "fn": 2}]
    q = protocol.size_quartiles(records)
    assert [g["n"] for g in q] == [2, 1, 1, 1]
    assert [(g["area_min"], g["area_max"]) for g in q] == [(0, 3), (3, 3), (10, 10), (40, 40)]
    assert q[0]["dice"] == pytest.approx((1.0 + 2 / 4) / 2)  # empty vs empty scores 1
    assert q[0]["dice_global"] == pytest.approx(2 / 4) and q[0]["area_ratio"] == pytest.approx(1 / 3)
    assert q[1]["dice"] == pytest.approx(6 / 9) and q[1]["area_ratio"] == pytest.approx(2.0)
    assert q[2]["dice"] == 0.0 and q[3]["dice"] == pytest.approx(40 / 60)
    assert q[3]["area_ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 4"):
        protocol.size_quartiles(records[:3])


def _fake_qata(root, n_train=16, n_valid=8):
    """SGSeg layout: images/<split>/{images,masks}/ + prompts/annotation.json, lesions of many sizes."""
    rng = np.random.default_rng(0)
    ann = {"train": [], "valid": []}
    for i in range(n_train + n_valid):
        split = "train" if i < n_train else "valid"
        name = f"covid_{i}"
        image = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
        mask = np.zeros((SIDE, SIDE), np.uint8)
        h, w = 2 + i % 7, 3 + (i * 5) % 11
        r, c = rng.integers(0, SIDE - h), rng.integers(0, SIDE - w)
        mask[r:r + h, c:c + w] = 255
        image[mask > 0] = 255  # something to learn
        for sub, arr, fname in (("images", image, f"{name}.png"), ("masks", mask, f"mask_{name}.png")):
            (root / "images" / split / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / "images" / split / sub / fname)
        ann[split].append({"image_path": f"mask_{name}.png",
                           "caption": f"unilateral pulmonary infection, one infected area, "
                                      f"{ZONES[i % 4]} lung."})
    (root / "prompts").mkdir()
    (root / "prompts" / "annotation.json").write_text(json.dumps(ann))
    return root


def _slow_scores(model, items, captions):
    """Per image: the model on that image and caption alone, then tp/fp/fn counted by hand."""
    rows = []
    with torch.no_grad():
        for item, caption in zip(items, captions):
            logits = model(item["image"][None], **model.tokenize([caption]))["logits"][0, 0]
            pred = (torch.sigmoid(logits) > 0.5).numpy()
            true = item["mask"][0].numpy() > 0.5
            tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
            dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
            rows.append({"key": item["key"], "tp": tp, "fp": fp, "fn": fn, "dice": dice,
                         "area": tp + fn, "pred_area": tp + fp})
    return rows


def _global(rows):
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn)


def test_protocol_command_end_to_end_on_a_fake_qata(tmp_path):
    from datasets.cached import SegmentationSet
    from tmc.checkpoint import model_from_checkpoint

    root = _fake_qata(tmp_path / "qata")
    out = tmp_path / "exp"
    # lr 1e-2: after 4 steps the model paints some pixels, so the sums below are not all zeros
    small = (f"--preset tiny --image-size {SIDE} --epochs 2 --max-steps-per-epoch 2 --batch-size 4 "
             f"--lr 1e-2 --cache-dir {tmp_path / 'cache'}")
    summary = protocol.main(["--root", str(root), "--minutes", "1", "--seeds", "0", "--variants",
                             "best", "no-text", "--equal-steps", "2", "--train-flags", small,
                             "--out", str(out)])
    best = json.loads((out / "best-s0" / "protocol.json").read_text())
    no_text = json.loads((out / "no-text-s0" / "protocol.json").read_text())
    for r in (best, no_text):
        assert (r["steps"], r["epochs"]) == (4, 2) and r["wall_time_s"] > 0
        assert set(r["test"]) >= {"dice", "miou", "dice_global", "iou_global"} and r["test"]["n_images"] == 8
        assert [q["n"] for q in r["quartiles"]] == [2, 2, 2, 2]
        assert r["equal_steps"]["2"]["steps"] == 2 and "dice" in r["equal_steps"]["2"]["test"]
    assert "shuffled" in best and "shuffled" not in no_text
    assert "--no-text" in no_text["flags"] and "--no-text" not in best["flags"]
    assert not list(out.glob("*/step*.pt"))  # scored, then deleted

    # Recomputed image by image: true captions, captions permuted among the test images, quartiles.
    test = SegmentationSet(tmp_path / "cache", "test")
    items = [test[i] for i in range(len(test))]
    model, _ = model_from_checkpoint(out / "best-s0" / "best.pt")
    true = [it["text"] for it in items]
    rows = _slow_scores(model, items, true)
    assert best["test"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]), abs=1e-9)
    assert best["test"]["dice_global"] == pytest.approx(_global(rows), abs=1e-9)
    perm = np.random.default_rng(0).permutation(len(items))
    shuffled = _slow_scores(model, items, [true[j] for j in perm])
    assert [true[j] for j in perm] != true  # the captions did move
    assert sum(r["pred_area"] for r in rows) > 0 and best["test"]["dice"] > 0.05
    assert best["shuffled"]["dice"] == pytest.approx(np.mean([r["dice"] for r in shuffled]), abs=1e-9)
    assert best["shuffled"]["gap"] == pytest.approx(best["test"]["dice"] - best["shuffled"]["dice"])
    by_size = sorted(rows, key=lambda r: (r["area"], r["key"]))
    for q, got in enumerate(best["quartiles"]):
        group = by_size[2 * q: 2 * q + 2]
        assert got["dice"] == pytest.approx(np.mean([r["dice"] for r in group]), abs=1e-9)
        assert (got["area_min"], got["area_max"]) == (group[0]["area"], group[1]["area"])
        ratio = sum(r["pred_area"] for r in group) / sum(r["area"] for r in group)
        assert got["area_ratio"] == pytest.approx(ratio, abs=1e-9)

    # The summary: mean ± std per variant, the equal-steps point, the command and the machine.
    assert summary["equal_steps"] == "2" and set(summary["variants"]) == {"best", "no-text"}
    row = summary["variants"]["best"]
    assert row["dice"]["mean"] == best["test"]["dice"] and row["dice"]["n"] == 1
    assert row["shuffled_gap"]["mean"] == best["shuffled"]["gap"]
    assert "shuffled_dice" not in summary["variants"]["no-text"]
    assert math.isfinite(row["at_equal_steps"]["dice"]["mean"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["command"].startswith("python -m lab.qata_protocol --root ") and saved["machine"]
    table = (out / "table.md").read_text()
    assert "| best | 1 | 4 |" in table and "| no-text | 1 | 4 |" in table and "at 2 steps" in table
