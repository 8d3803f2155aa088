"""`torchrun --nproc_per_node 2 train.py` on CPU (gloo): sharded training and evaluation, one writer."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tmc.checkpoint import load_checkpoint, model_from_checkpoint
from tmc.engine import predict_records, summarize

REPO = Path(__file__).resolve().parents[2]


def test_two_cpu_processes_train_and_evaluate_like_one(tmp_path):
    from datasets.cached import SegmentationSet
    from datasets.registry import prepare

    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    data, out = tmp_path / "data", tmp_path / "run"
    # 24 images → 16 train, 2 val, 6 test; the test split has an odd number per rank pair.
    cache = prepare("demo", str(data / "demo"), image_size=64, cache_dir=str(data / "cache"),
                    progress=False, n=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The demo's own recipe (frozen MiniLM): after 2 steps its masks already overlap the lesions, so
    # the comparison below is between Dice values above 0 (a model that predicts nothing scores 0
    # on every rank whatever the sharding).
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", str(REPO / "train.py"),
           "--dataset", "demo", "--root", str(data / "demo"), "--cache-dir", str(data / "cache"),
           "--reader-options", "n=24", "--out", str(out), "--epochs", "1", "--batch-size", "4",
           "--max-steps-per-epoch", "2", "--workers", "0", "--device", "cpu", "--no-progress",
           "--time-limit", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # only rank 0 prints and writes
    assert proc.stdout.count("epoch   1/1") == 1 and proc.stdout.count("test Dice") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["steps"] == 2  # optimizer updates, each on 2 × 4 images
    ck = load_checkpoint(out / "last.pt")
    assert len(ck["rng"]) == 2  # one RNG state per rank, for --resume
    assert not any(k.startswith("module.") for k in ck["model"])  # unwrapped weights

    # evaluation was sharded over the ranks and gathered: same numbers as one process on last.pt
    # (validation with rank 0's BatchNorm statistics, those the checkpoint holds)
    model, _ = model_from_checkpoint(ck)
    for split, reported in (("val", rows[0]["val_dice"]),
                            ("test", json.loads((out / "test_metrics.json").read_text())["dice"])):
        weights = load_checkpoint(out / ("last.pt" if split == "val" else "best.pt"))["model"]
        model.load_state_dict(weights)
        ds = SegmentationSet(cache, split)
        records = predict_records(model, DataLoader(ds, batch_size=3), device=torch.device("cpu"),
                                  tokenize=model.tokenize, progress=False)
        assert len(records) == len(ds)
        assert reported > 0.05 and summarize(records)["dice"] == pytest.approx(reported, abs=1e-6)
