"""The preprocessing cache: every sample of a reader resized once and stored as uint8 arrays.

The folder's files, the fingerprint and when a cache counts as fresh: datasets/cache_format.py.
Non-square images are stretched to S × S (the cache's side), as LViT and GuideDecoder do. Samples
stay in the reader's order, and each row carries its split. A cache whose fingerprint differs is
rebuilt, and the builder says why. The new cache is written to a temporary sibling folder and
renamed into place, so an interrupted build never leaves a half-written cache behind.

Splits: split_mode="paper" assigns cases 7:1:2 (`assign_splits`, stratified by Sample.stratum);
"layout" keeps each Sample.split; "layout-val" is for a layout with one held-out split (e.g. the
shared QaTa subset's train/valid): everything the layout holds out (its val and test) becomes the
test split, and val is carved out of the layout's train split by case, at ratios' train:val
proportion (7:1 by default, so 1/8 of the training cases). In every mode `check_no_leak` must pass.
Train and val must not be empty. An empty test split is an error in paper and layout-val mode. In
layout mode it is only a warning, because some layouts ship no test split. `partial=True` (for
evaluation, e.g. a folder that holds only a test split) allows empty splits and keeps samples the
layout gives no split (split null in the index).

Bad files. A reader reports a bad file (unreadable file, size mismatch, non-binary mask, missing
text) by *yielding* the DatasetError instead of a Sample, so that iteration can go on. build_cache
raises that error, or, with skip_bad=True, skips the file, prints the list and records it in
meta.json. A DatasetError *raised* by a reader (e.g. an unknown layout) always stops the build.
Duplicate keys and samples with inconsistent arrays are caught here, for every reader.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tmc.grid import resize_image, resize_mask, to_uint8
from datasets.cache_format import (ArrayWriter, cache_settings, fingerprint_of, fingerprint_parts,
                                   is_fresh, write_json)
from datasets.records import DatasetError, Reader, Sample
from datasets.splits import SPLITS, assign_splits, check_no_leak, normalise_split
from datasets.text_from_mask import caption_from_mask

__all__ = ["SPLIT_MODES", "validate_sample", "build_cache"]

SPLIT_MODES = ("paper", "layout", "layout-val")


# ---------------------------------------------------------------------------- writing

def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_error(e: OSError, cache_dir: Path, need_mb: float) -> DatasetError:
    """The message for a cache that could not be written (full disk, read-only folder, ...)."""
    if _disk_full(e):
        return DatasetError(f"{cache_dir}: the disk is full while writing the cache; nothing was "
                            f"kept; fix: free about {need_mb:.0f} MB there, or --cache-dir on a "
                            f"disk with room")
    return DatasetError(f"{cache_dir}: cannot write the cache ({e.strerror or e}); nothing was kept; "
                        f"fix: --cache-dir in a folder you can write (or TMC_CACHE=FOLDER)")


def _remove_orphan_builds(cache_dir: Path) -> None:
    """Delete `.<name>.tmp-PID` / `.<name>.old-PID` siblings whose process has died (a build
    killed with kill -9 leaves them behind); a live process's folder is left alone."""
    for p in cache_dir.parent.glob(f".{cache_dir.name}.*-*"):
        kind, _, pid = p.name[len(cache_dir.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (another build of the same cache)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        print(f"removed {p}, left by an interrupted cache build")


def _swap_into_place(tmp: Path, cache_dir: Path, fingerprint: str) -> None:
    """Rename tmp → cache_dir, replacing an old cache; tolerate a concurrent identical build."""
    old = cache_dir.with_name(f".{cache_dir.name}.old-{os.getpid()}")
    if cache_dir.exists():
        os.rename(cache_dir, old)
    try:
        os.rename(tmp, cache_dir)
    except OSError:
        if is_fresh(cache_dir, fingerprint)[0]:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- checks

def validate_sample(s: Sample) -> None:
    """Raise DatasetError (naming s.source) if a sample's arrays or text are unusable."""
    where = s.source or s.key
    img, mask = np.asarray(s.image), np.asarray(s.mask)
    if img.ndim != 2 or mask.ndim != 2:
        raise DatasetError(f"{where}: image {img.shape} / mask {mask.shape}; expected 2D (H, W)")
    if img.shape != mask.shape:
        raise DatasetError(f"{where}: image size {img.shape} and mask size {mask.shape} differ; "
                           f"expected the mask to match its image pixel for pixel; fix: re-export "
                           f"the mask at the image's size or skip it with --skip-bad")
    if mask.dtype != bool:
        raise DatasetError(f"{where}: mask dtype {mask.dtype}; expected bool from the reader")
    if not np.isfinite(img).all() or img.min() < -1e-4 or img.max() > 1 + 1e-4:
        raise DatasetError(f"{where}: image values outside [0, 1]; expected a normalised image")


def _carve_validation(rows: list[dict], ratios, seed: int) -> None:
    """layout-val: the layout's held-out rows become test; its train rows are divided by case into
    train and val at ratios[0]:ratios[1] (assign_splits with no test share)."""
    train = [r for r in rows if r["split"] == "train"]
    for r in rows:
        if r["split"] != "train":
            r["split"] = "test"
    table = assign_splits([r["case"] for r in train], [r["stratum"] for r in train],
                          ratios=(ratios[0], ratios[1], 0.0), seed=seed)
    for r in train:
        r["split"] = table[r["case"]]


def _assign(rows: list[dict], split_mode: str, ratios, seed: int, where: str,
            partial: bool = False, locate=None) -> None:
    """Fill row["split"] in place, check leaks and (unless `partial`) empty splits; `locate(source)`
    names a sample's place in the user's files (a CSV line) in messages."""
    if split_mode == "paper":
        table = assign_splits([r["case"] for r in rows], [r["stratum"] for r in rows],
                              ratios=ratios, seed=seed)
        for r in rows:
            r["split"] = table[r["case"]]
    elif split_mode in ("layout", "layout-val"):
        for r in rows:
            if r["split"] is None and partial:
                continue
            if r["split"] is None and locate is not None:
                raise DatasetError(f"{locate(r['source'])}: empty split cell while other rows give "
                                   f"one; fix: write train, val or test in it, or --split-mode "
                                   f"paper to split by case")
            if r["split"] is None:
                raise DatasetError(f"{r['source']}: the layout gives this sample no split; "
                                   f"expected train/val/test from the folders; fix: "
                                   f"--split-mode paper")
            r["split"] = normalise_split(r["split"], r["source"])
        if split_mode == "layout-val":
            _carve_validation(rows, ratios, seed)
    else:
        raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
    check_no_leak([r for r in rows if r["split"] is not None], where)
    if partial:
        return
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    n_cases = len({r["case"] for r in rows})
    for s in SPLITS:
        if counts[s]:
            continue
        if split_mode == "layout" and s == "test":
            warnings.warn(f"{where}: the layout has no test split; train/val only (use "
                          f"--split-mode paper for a 7:1:2 patient split)", stacklevel=3)
            continue
        fix = {"paper": "add more cases or change ratios",
               "layout": f"use --split-mode paper or give the layout a '{s}' split",
               "layout-val": "use --split-mode paper, or a layout with a held-out (val or test) "
                             "split besides train"}[split_mode]
        raise DatasetError(f"{where}: the {s} split is empty ({n_cases} cases, split_mode="
                           f"{split_mode!r}, counts {counts}); expected samples in train, val and "
                           f"test; fix: {fix}")


# ---------------------------------------------------------------------------- the build's steps

def _open_writers(tmp: Path, image_size: int, cache_dir: Path,
                  need_mb: float) -> tuple[ArrayWriter, ArrayWriter]:
    """A fresh temporary folder `tmp` holding the image and mask writers."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        return ArrayWriter(tmp / "images.npy", image_size), ArrayWriter(tmp / "masks.npy", image_size)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, cache_dir, need_mb) from e


def _check_item(item, seen: dict) -> None:
    """Raise the DatasetError a reader yielded, or the one for an unusable or repeated sample."""
    if isinstance(item, DatasetError):
        raise item
    validate_sample(item)
    if item.key in seen:
        raise DatasetError(f"{item.source}: duplicate key {item.key!r} (also "
                           f"{seen[item.key]}); expected unique image names; fix: "
                           f"rename or remove one of them")


def _store(item: Sample, images: ArrayWriter, masks: ArrayWriter, image_size: int) -> dict:
    """Append one sample's (S, S) frames to the writers; return its index.json row (with the
    reader's split, which `_assign` settles)."""
    generated = item.text is None or item.text_from_mask
    text = caption_from_mask(item.mask) if item.text is None else str(item.text).strip()
    images.append(to_uint8(resize_image(item.image, image_size)))
    masks.append(resize_mask(item.mask, image_size).astype(np.uint8))
    return {"key": item.key, "case": str(item.case), "slice": int(item.slice_index),
            "text": text, "text_from_mask": generated, "split": item.split,
            "stratum": str(item.stratum), "source": item.source}


def _write_samples(reader: Reader, images: ArrayWriter, masks: ArrayWriter, image_size: int,
                   skip_bad: bool, progress: bool) -> tuple[list[dict], list[str]]:
    """Every usable sample of `reader`, in its order, into the writers (closed at the end).

    Returns the index rows and the messages of the files skipped (skip_bad).
    """
    rows, skipped, seen = [], [], {}
    bar = tqdm(total=len(reader), desc=f"caching {reader.name}", unit="file",
               disable=not progress, file=sys.stderr)
    last_source = None
    for item in reader:
        try:
            _check_item(item, seen)
        except DatasetError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            bar.update(1)
            continue
        seen[item.key] = item.source
        rows.append(_store(item, images, masks, image_size))
        # One tick per 2D file, or per volume for readers that yield slices of one source.
        if item.slice_index < 0 or item.source.split("#")[0] != last_source:
            bar.update(1)
        last_source = item.source.split("#")[0]
    bar.close()
    images.close()
    masks.close()
    return rows, skipped


def _write_arrays(reader: Reader, writers: tuple[ArrayWriter, ArrayWriter], tmp: Path,
                  cache_dir: Path, need_mb: float, image_size: int, skip_bad: bool,
                  progress: bool) -> tuple[list[dict], list[str]]:
    """`_write_samples`; on any failure the temporary folder goes, and a failed write says so."""
    try:
        return _write_samples(reader, *writers, image_size, skip_bad, progress)
    except BaseException as e:
        for w in writers:
            try:
                w.f.close()
            except OSError:  # flushing the buffer onto a full disk fails again: drop it
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DatasetError) and skip_bad:
            e.add_note("(skip_bad could not skip it: the reader raised the error instead of "
                       "yielding it, or the whole dataset is unusable)")
        if (isinstance(e, OSError) and e.filename is None) or _disk_full(e):  # a write, not a read
            raise _write_error(e, cache_dir, need_mb) from e
        raise


def _meta(fingerprint: str, reader: Reader, parts: dict, rows: list[dict], skipped: list[str],
          t0: float) -> dict:
    """meta.json: the fingerprint and its parts, the counts per split, what was skipped."""
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    cases = {s: len({r["case"] for r in rows if r["split"] == s}) for s in SPLITS}
    return {"fingerprint": fingerprint, "dataset": reader.name, **parts, "n": len(rows),
            "counts": counts,
            "unsplit": sum(r["split"] is None for r in rows),
            "cases": cases,
            "text_from_mask": sum(r["text_from_mask"] for r in rows),
            "no_caption": sum(not r["text"] for r in rows), "skipped": skipped,
            "n_sources": len(reader.sources()), "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "build_seconds": round(time.time() - t0, 2)}


def _commit(tmp: Path, cache_dir: Path, rows: list[dict], meta: dict, need_mb: float) -> None:
    """Write index.json and meta.json, then rename the temporary folder into place."""
    try:
        write_json(tmp / "index.json", rows)
        write_json(tmp / "meta.json", meta)
        _swap_into_place(tmp, cache_dir, meta["fingerprint"])
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, cache_dir, need_mb) from e


def _report(meta: dict, cache_dir: Path) -> None:
    """Print the skipped files, the samples without a caption and the counts of the new cache."""
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped'])} bad file(s):")
        for msg in meta["skipped"]:
            print(f"  {msg}")
    if meta["no_caption"]:
        print(f"{meta['no_caption']} of {meta['n']} samples have no caption (an empty text cell) and "
              f"are read as no caption: the model segments them from the image alone; fix, if they "
              f"should have one: fill the text cells, or derive captions with text_from_mask=True")
    print(f"cached {meta['n']} samples ({meta['counts']}, cases {meta['cases']}) in "
          f"{meta['build_seconds']} s → {cache_dir}")


# ---------------------------------------------------------------------------- the builder

def build_cache(reader: Reader, cache_dir, image_size: int = 224, split_mode: str = "paper",
                ratios=(0.7, 0.1, 0.2), seed: int = 0, skip_bad: bool = False,
                progress: bool = True, partial: bool = False, keep: str | None = None) -> Path:
    """Build (or reuse, if its fingerprint matches) the cache of `reader` in `cache_dir`.

    Args:
        reader: a datasets.records.Reader.
        cache_dir: the cache folder (created; replaced when stale).
        image_size: S, the square side of the stored arrays.
        split_mode: "paper" (case-level 7:1:2 by `assign_splits`), "layout" (Sample.split) or
            "layout-val" (the layout's held-out split as test, val carved from its train split).
        ratios: (train, val, test) shares for the paper mode; layout-val uses train:val.
        seed: split seed.
        skip_bad: skip files the reader reports as bad (and print them) instead of stopping.
        progress: show a tqdm bar.
        partial: allow empty splits and samples without a split (evaluation of any folder).
        keep: refuse to replace a cache of other settings in `cache_dir`, with this text as the fix
            (a folder the user named for reading).

    Returns:
        cache_dir as a Path.
    """
    cache_dir = Path(cache_dir).resolve()
    if split_mode not in SPLIT_MODES:
        raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {split_mode!r}")
    parts = fingerprint_parts(reader, cache_settings(image_size, split_mode, ratios, seed, partial))
    fp = fingerprint_of(parts)
    fresh, why = is_fresh(cache_dir, fp, parts)
    if fresh:
        print(f"cache up to date: {cache_dir}")
        return cache_dir
    if why != "no cache yet":
        print(f"rebuilding cache {cache_dir}: {why}")

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    if keep is not None and (cache_dir / "meta.json").exists():
        raise DatasetError(f"{cache_dir}: holds a cache of other settings ({why}); {keep}")
    _remove_orphan_builds(cache_dir)
    need_mb = 2 * len(reader) * image_size * image_size / 1e6  # images + masks, one frame each
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    writers = _open_writers(tmp, image_size, cache_dir, need_mb)
    t0 = time.time()
    rows, skipped = _write_arrays(reader, writers, tmp, cache_dir, need_mb, image_size, skip_bad,
                                  progress)

    where = f"{reader.name} ({cache_dir})"
    try:
        if not rows:
            raise DatasetError(f"{where}: no usable samples ({len(skipped)} skipped); expected at "
                               f"least one image with a mask")
        _assign(rows, split_mode, ratios, seed, where, partial, getattr(reader, "locate", None))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = _meta(fp, reader, parts, rows, skipped, t0)
    _commit(tmp, cache_dir, rows, meta, need_mb)
    _report(meta, cache_dir)
    return cache_dir
