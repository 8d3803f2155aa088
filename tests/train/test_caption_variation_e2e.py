"""Captions as people write them, end to end on volume fixtures: a model trained by the plain
command (reworded captions and caption dropout by default) segments a lesion slice from its
template caption, from a report-style rewording and from no caption at all."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import train
from datasets.cached import SegmentationSet
from tmc.checkpoint import model_from_checkpoint
from lab.report_captions import report_caption
from tmc.predict import make_segmenter

X = Y = 32
Z = 6


def blob(z: int, cx: int, cy: int) -> np.ndarray:
    """(X, Y, Z) mask: a 10 x 10 lesion on slices 1..Z-2."""
    m = np.zeros((X, Y, z), np.uint8)
    m[cx - 5:cx + 5, cy - 5:cy + 5, 1:z - 1] = 1
    return m


def mosmed_root(root: Path) -> Path:
    """COVID19_1110: 10 masked CT-1 studies with a bright lesion, lung at -1000 HU."""
    for i in range(10):
        cx, cy = (9, 9) if i % 2 else (22, 20)
        mask = blob(Z, cx, cy)
        ct = np.where(mask > 0, -300, -1000).astype(np.int16)
        for path, arr in ((root / "studies" / "CT-1" / f"study_{255 + i:04d}.nii.gz", ct),
                          (root / "masks" / f"study_{255 + i:04d}_mask.nii.gz", mask)):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return root


def duke_root(root: Path) -> Path:
    """MAMA-MIA layout: 10 patients, pre and post_1 phases, an enhancing tumour in one breast."""
    for i in range(1, 11):
        cx, cy = (9, 16) if i % 2 else (22, 16)
        mask = blob(Z, cx, cy)
        seg = root / "MAMA-MIA" / "segmentations" / "expert" / f"DUKE_{i:03d}.nii.gz"
        seg.parent.mkdir(parents=True, exist_ok=True)
        affine = np.diag([-0.7, -0.7, 1.5, 1.0])
        nib.save(nib.Nifti1Image(mask, affine), str(seg))
        for k in range(2):
            img = np.full((X, Y, Z), 100.0, np.float32) + (900.0 * k) * mask
            path = root / "MAMA-MIA" / "images" / f"DUKE_{i:03d}" / f"DUKE_{i:03d}_000{k}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(img, affine), str(path))
    return root


@pytest.mark.parametrize("dataset,make", [("mosmed", mosmed_root), ("duke", duke_root)])
def test_reworded_and_missing_captions_still_segment(tmp_path, dataset, make):
    root = make(tmp_path / "data")
    out = tmp_path / "run"
    train.main(["--dataset", dataset, "--root", str(root), "--preset", "tiny", "--image-size", "32",
                "--text-model", "random:1x32", "--epochs", "12", "--lr", "3e-3", "--batch-size", "8",
                "--seg-loss", "bce+dice", "--lr-schedule", "cosine", "--patience", "12",
                "--workers", "0", "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                "--no-test-at-end"])
    assert json.loads((out / "config.json").read_text())["train"]["captions"] == "varied"
    model, cfg = model_from_checkpoint(out / "best.pt")
    data = SegmentationSet(tmp_path / "cache", "train")
    lesion = next(i for i in range(len(data)) if data[i]["mask"].sum() > 0)
    sample = data[lesion]
    image, truth, caption = sample["image"][None], sample["mask"][0] > 0.5, sample["text"]
    reworded = report_caption(caption, 0, 0)
    assert reworded != caption, caption  # the template family is known to the rewriter
    masks = {name: make_segmenter(model, text, torch.device("cpu"))(image)[0, 0]
             for name, text in (("template", caption), ("reworded", reworded), ("none", ""))}
    assert (masks["template"] & truth).sum() > 0.5 * truth.sum()  # the premise: it learned the lesion
    for name in ("reworded", "none"):
        assert (masks[name] & truth).sum() > 0.5 * truth.sum(), (name, reworded)
