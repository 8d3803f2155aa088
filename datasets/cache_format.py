"""The cache's on-disk format: the files of a cache folder, its fingerprint, and when it is fresh.

Kept apart from the builder (datasets/cache.py) because the format is a contract: the builder
writes it, and a folder of any age is judged by it, so a change here renames every cache.

Shape key: N samples, S the cache's square side (image_size).

    <cache_dir>/images.npy   (N, S, S) uint8, image × 255 (bilinear, antialiased)
    <cache_dir>/masks.npy    (N, S, S) uint8 in {0, 1} (nearest)
    <cache_dir>/index.json   N rows: key, case, slice, text, text_from_mask, split, stratum, source
    <cache_dir>/meta.json    settings, counts, skipped files and the fingerprint

Fingerprint: a SHA-256 over the reader's name and options(), every source file's path, size and
modification time (ns), and the preprocessing settings (size, split mode, ratios, seed, resize
rules, caption rule, format version). A cache whose fingerprint differs is rebuilt, and the builder
says why. A cache is never reused silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from datasets.records import DatasetError, Reader

__all__ = ["FORMAT_VERSION", "HEADER_BYTES", "source_listing", "cache_settings", "fingerprint_parts",
           "fingerprint_of", "cache_fingerprint", "is_fresh", "ArrayWriter", "write_json"]

FORMAT_VERSION = 1
HEADER_BYTES = 128  # reserved .npy header; the shape is written when N is known


# ---------------------------------------------------------------------------- fingerprint

def source_listing(paths) -> list[list]:
    """[[absolute path, size, mtime_ns], ...] sorted by path; a missing file is an error."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        try:
            st = p.stat()
        except OSError as e:
            raise DatasetError(f"{p}: listed by the reader but cannot be read ({e})") from e
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return sorted(out)


def cache_settings(image_size: int, split_mode: str, ratios, seed: int, partial: bool = False) -> dict:
    """The preprocessing settings a cache is keyed by (meta.json's "settings")."""
    # `partial` is keyed only when set, so the caches training builds keep their fingerprints.
    return {**({"partial_splits": True} if partial else {}),
            "format": FORMAT_VERSION, "image_size": int(image_size), "split_mode": split_mode,
            "ratios": [float(r) for r in ratios], "seed": int(seed),
            "image_resize": "bilinear-antialias", "mask_resize": "nearest",
            "caption": "caption_from_mask(style=lvit, side=image, count per side)"}


def fingerprint_parts(reader: Reader, settings: dict) -> dict:
    """The fingerprint's ingredients, also stored in meta.json to say what changed."""
    listing = json.dumps(source_listing(reader.sources()))
    return {"reader": reader.name, "reader_options": reader.options(), "settings": settings,
            "sources_digest": hashlib.sha256(listing.encode()).hexdigest()}


def fingerprint_of(parts: dict) -> str:
    """SHA-256 hex of `fingerprint_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_fingerprint(reader: Reader, settings: dict) -> str:
    """SHA-256 hex of the reader's name, options, source listing and the settings."""
    return fingerprint_of(fingerprint_parts(reader, settings))


def is_fresh(cache_dir: Path, fingerprint: str, parts: dict | None = None) -> tuple[bool, str]:
    """(True, "") if cache_dir holds a complete cache with this fingerprint, else (False, why).

    `parts` (the fingerprint's ingredients) only makes the reason more precise.
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        return False, "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False, "meta.json unreadable"
    if meta.get("fingerprint") != fingerprint:
        changed = [k for k, v in (parts or {}).items()
                   if json.dumps(meta.get(k), sort_keys=True, default=str)
                   != json.dumps(v, sort_keys=True, default=str)]
        names = {"sources_digest": "source files (names, sizes or times)"}
        return False, "changed: " + (", ".join(names.get(k, k) for k in changed) or "fingerprint")
    for name in ("images.npy", "masks.npy", "index.json"):
        if not (cache_dir / name).is_file():
            return False, f"{name} missing"
    size = (meta.get("settings") or {}).get("image_size")
    if isinstance(meta.get("n"), int) and isinstance(size, int):
        for name in ("images.npy", "masks.npy"):  # an interrupted copy leaves a short file
            if (cache_dir / name).stat().st_size != HEADER_BYTES + meta["n"] * size * size:
                return False, f"{name} has the wrong size (truncated or damaged)"
    return True, ""


# ---------------------------------------------------------------------------- writing

class ArrayWriter:
    """Streams (S, S) uint8 frames into a .npy file; the header is completed on close."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size, self.n = path, size, 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * HEADER_BYTES)

    def append(self, frame: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        self.n += 1

    def close(self) -> None:
        header = repr({"descr": "|u1", "fortran_order": False,
                       "shape": (self.n, self.size, self.size)})
        body = header.encode("latin1").ljust(HEADER_BYTES - 10 - 1) + b"\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def write_json(path: Path, obj) -> None:
    """index.json / meta.json, flushed to disk before the folder is renamed into place."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
