"""Dataset names → readers, and `prepare`, which builds (or reuses) a dataset's cache.

    reader = make_reader("qata", "data/QaTa-COV19", layout="kaggle")
    cache = prepare("qata", "data/QaTa-COV19", image_size=224)   # → Path of the cache folder

Reader modules are imported only when their dataset is asked for, so a missing optional dependency
(nibabel, pydicom) only matters for the datasets that need it.

Default cache folder: `$TMC_CACHE/<name>-<hash>` if TMC_CACHE is set, else `<repo>/cache/<name>-<hash>`.
The hash covers the dataset root and every setting, so different settings get their own folder.
Inside a folder, build_cache's fingerprint still catches changed source files.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import warnings
from pathlib import Path

from datasets.records import Reader

__all__ = ["DATASETS", "REPO", "reader_option_names", "check_reader_options", "check_root", "make_reader", "resolve_split_mode", "default_cache_dir", "prepare"]

REPO = Path(__file__).resolve().parents[1]

# name → (module, class, name of the constructor argument that receives `root`)
DATASETS: dict[str, tuple[str, str, str]] = {
    "demo": ("datasets.demo", "DemoReader", "root"),
    "qata": ("datasets.qata", "QataReader", "root"),
    "mosmed": ("datasets.mosmed", "MosmedReader", "root"),
    "mosmedplus": ("datasets.mosmed", "MosmedPlusReader", "root"),
    "duke": ("datasets.duke", "DukeReader", "root"),
    "csv": ("datasets.csvset", "CsvReader", "csv_path"),
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(value):
    """Command-line strings "true"/"false" → bool; everything else unchanged."""
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return value


def reader_option_names(name: str) -> list[str]:
    """The settings the reader of dataset `name` takes (its constructor's arguments but root)."""
    module, cls, root_arg = DATASETS[name]
    params = inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters
    return [p for p in params if p not in ("self", root_arg)]


def parse_reader_options(text: str) -> dict:
    """"phase=post_1,window=-1000:200" → {"phase": "post_1", "window": (-1000, 200)}: numbers and
    true/false are converted, a:b becomes a tuple."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--reader-options item {item!r} is not key=value; "
                             f"fix: e.g. --reader-options phase=post_1")
        key, value = (s.strip() for s in item.split("=", 1))
        parts = [_scalar(v) for v in value.split(":")]
        out[key] = tuple(parts) if len(parts) > 1 else parts[0]
    return out


def _scalar(text: str):
    """"3" → 3, "0.5" → 0.5, "true"/"false" → bool, anything else stays a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def check_reader_options(name: str, options: dict) -> None:
    """ValueError naming the unknown --reader-options keys and the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    valid = reader_option_names(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"--reader-options: {name} has no setting {', '.join(unknown)}; valid: "
                         f"{', '.join(valid) or 'none'}")


def check_root(name: str, root) -> None:
    """ValueError when dataset `name` needs --root and none is given."""
    module, cls, root_arg = DATASETS[name]
    if not root and name != "demo":
        raise ValueError(f"--dataset {name} needs its data: --root PATH ({root_arg})")


def make_reader(name: str, root=None, **options) -> Reader:
    """The reader of dataset `name` for the folder (or CSV file) `root`.

    Args:
        name: one of DATASETS.
        root: dataset folder; the CSV file for "csv"; for "demo" None/"" = <repo>/data/demo.
        **options: reader settings (e.g. layout="kaggle", text_from_mask=True, phase="post_1").
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    check_reader_options(name, options)
    check_root(name, root)
    module, cls, root_arg = DATASETS[name]
    reader_cls = getattr(importlib.import_module(module), cls)
    return reader_cls(**{root_arg: root or None}, **{k: _coerce(v) for k, v in options.items()})


def resolve_split_mode(reader: Reader, split_mode: str) -> str:
    """"auto" → "layout" when the user wrote the split into the data (a reader whose
    `declares_splits` is true: a CSV's split column), else "paper"; "paper" over such data warns
    that the user's split is ignored."""
    declared = bool(getattr(reader, "declares_splits", False))
    if split_mode == "auto":
        return "layout" if declared else "paper"
    if split_mode == "paper" and declared:
        warnings.warn(f"{reader.name}: the data's own split column is ignored under split mode "
                      f"'paper' (a 7:1:2 patient split); drop --split-mode paper to use it",
                      stacklevel=3)
    return split_mode


def default_cache_dir(name: str, root, image_size: int, split_mode: str, seed: int, ratios,
                      options: dict, partial: bool = False) -> Path:
    """`<$TMC_CACHE or <repo>/cache>/<name>-<12 hex>`, the hash over root and all settings."""
    key = {"name": name, "root": str(Path(root).resolve()) if root else "", "image_size": image_size,
           "split_mode": split_mode, "seed": seed, "ratios": list(ratios), "options": options}
    if partial:  # keyed only when set: training's cache folders keep their names
        key["partial_splits"] = True
    key = json.dumps(key, sort_keys=True, default=str)
    base = Path(os.environ["TMC_CACHE"]) if os.environ.get("TMC_CACHE") else REPO / "cache"
    return base / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare(name: str, root=None, image_size: int = 224, cache_dir=None, split_mode: str = "auto",
            seed: int = 0, skip_bad: bool = False, ratios=(0.7, 0.1, 0.2), progress: bool = True,
            partial: bool = False, keep: str | None = None, **options) -> Path:
    """Build or reuse the cache of a dataset and return its folder.

    Args:
        name: one of DATASETS.
        root: dataset folder (CSV file for "csv"; optional for "demo").
        image_size: S of the cached (S, S) arrays (paper: 224).
        cache_dir: cache folder (default: `default_cache_dir`).
        split_mode: "paper" (case-level 7:1:2), "layout" (the layout's own split), "layout-val"
            (the layout's held-out split as test, val carved from its train split by case) or
            "auto" (`resolve_split_mode`).
        seed: split seed.
        skip_bad: skip bad files (listed) instead of stopping at the first.
        ratios: (train, val, test).
        progress: tqdm bar.
        partial: allow empty splits and unsplit samples (evaluating a folder; see build_cache).
        keep: refuse to replace a cache of other settings in `cache_dir` (see build_cache).
        **options: reader settings.
    """
    # deferred: the builder loads torch (tmc.grid), and importing `datasets` stays without it
    from datasets.cache import build_cache

    options = {k: _coerce(v) for k, v in options.items()}
    reader = make_reader(name, root, **options)
    split_mode = resolve_split_mode(reader, split_mode)
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = default_cache_dir(name, root, image_size, split_mode, seed, ratios, options,
                                      partial)
    return build_cache(reader, cache_dir, image_size=image_size, split_mode=split_mode,
                       ratios=ratios, seed=seed, skip_bad=skip_bad, progress=progress,
                       partial=partial, keep=keep)
