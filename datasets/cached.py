"""`SegmentationSet`: one split of a built cache (datasets/cache.py) as a torch Dataset.

Shape key: S the cache's square side.

The arrays are opened with np.load(mmap_mode="r") on first access in each process, so DataLoader
workers share the page cache instead of copying the arrays, and pickling the dataset (spawned
workers) sends only the paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.records import DatasetError
from datasets.splits import SPLITS

__all__ = ["load_meta", "load_index", "SegmentationSet"]


def load_meta(cache_dir) -> dict:
    """The cache's meta.json (settings, counts, fingerprint)."""
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; expected a cache built by datasets.cache.build_cache; "
                           f"fix: python -m datasets.prepare --dataset NAME --root PATH")
    return json.loads(path.read_text())


def load_index(cache_dir) -> list[dict]:
    """The cache's index.json rows (key, case, slice, text, text_from_mask, split, stratum, source)."""
    return json.loads((Path(cache_dir) / "index.json").read_text())


class SegmentationSet(Dataset):
    """One split of a cache.

    Args:
        cache_dir: folder written by `build_cache`.
        split: "train" | "val" | "test", or None for every row.

    Item: dict(image (1, S, S) float32 in [0, 1], mask (1, S, S) float32 in {0, 1}, text str,
    case str, slice int, key str, index int (row in the cache)).
    """

    def __init__(self, cache_dir, split: str | None) -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = load_meta(self.cache_dir)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        self.split = split
        rows = load_index(self.cache_dir)
        if len(rows) != self.meta["n"]:
            raise DatasetError(f"{self.cache_dir}: index.json has {len(rows)} rows but meta.json "
                               f"says {self.meta['n']}; fix: delete the folder and rebuild it")
        self.indices = [i for i, r in enumerate(rows) if split is None or r["split"] == split]
        if not self.indices:
            raise DatasetError(f"{self.cache_dir}: the {split} split is empty (counts "
                               f"{self.meta['counts']}); fix: rebuild with --split-mode paper")
        self.rows = [rows[i] for i in self.indices]
        self._images = self._masks = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._images = np.load(self.cache_dir / "images.npy", mmap_mode="r")
            self._masks = np.load(self.cache_dir / "masks.npy", mmap_mode="r")
            if len(self._images) != self.meta["n"] or self._masks.shape != self._images.shape:
                raise DatasetError(f"{self.cache_dir}: arrays {self._images.shape} / "
                                   f"{self._masks.shape} do not match {self.meta['n']} rows; "
                                   f"fix: delete the folder and rebuild it")
        return self._images, self._masks

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = state["_masks"] = None  # reopen lazily in the worker
        return state

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.rows]

    def __getitem__(self, i: int) -> dict:
        images, masks = self._arrays()
        j, row = self.indices[i], self.rows[i]
        image = torch.from_numpy(np.array(images[j], dtype=np.float32) / 255.0)[None]  # (1, S, S)
        mask = torch.from_numpy(np.array(masks[j], dtype=np.float32))[None]  # (1, S, S)
        return {"image": image, "mask": mask, "text": row["text"], "case": row["case"],
                "slice": int(row["slice"]), "key": row["key"], "index": j}
