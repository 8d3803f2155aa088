"""Volume intensities to [0, 1]: a CT window in HU, MR percentiles, or min-max per volume.

Training (the MosMed and Duke readers) and prediction (eval.py --volume, the web page) scale a
volume with these same functions, so a volume given to a trained model looks as its training
slices did. Kept apart from reading the files (datasets/volumes.py, datasets/dicom_series.py):
how a voxel becomes a grey level is its own choice, per dataset.
"""
from __future__ import annotations

import numpy as np

from datasets.records import DatasetError

__all__ = ["LUNG_WINDOW", "as_range", "percentile_normalise", "window", "check_finite",
           "volume_intensity", "default_intensity"]

LUNG_WINDOW = (-1350.0, 150.0)  # HU (lo, hi): the lung window W1500/L-600, MosMed's default


def as_range(value, name: str) -> tuple[float, float]:
    """(lo, hi) from a pair or a command-line string "lo,hi" (e.g. "-1350,150")."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected two numbers lo,hi (e.g. -1350,150)") from None
    if hi <= lo:
        raise ValueError(f"{name}={value!r}: hi must exceed lo")
    return lo, hi


def percentile_normalise(volume: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """Clip to the [low, high] percentiles of this volume and scale to [0, 1] (MR). float32."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [low, high])
    if hi <= lo:  # constant volume: nothing to show
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def window(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear window [lo, hi] → [0, 1], clipped (CT in HU, e.g. LUNG_WINDOW)."""
    if hi <= lo:
        raise ValueError(f"window: hi ({hi}) must exceed lo ({lo})")
    v = np.asarray(volume, dtype=np.float32)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def check_finite(volume: np.ndarray, where) -> None:
    """Refuse a volume with NaN or infinite voxels: every intensity mode would map them silently
    (min-max to an all-zero volume, a CT window to an undefined cast)."""
    bad = ~np.isfinite(volume)
    if bad.any():
        raise DatasetError(f"{where}: {int(bad.sum())} of {bad.size} voxels are NaN or infinite; "
                           f"expected finite intensities; fix: replace them (e.g. numpy.nan_to_num "
                           f"with the background value) and save the volume again")


def volume_intensity(volume: np.ndarray, mode: str, ct_window=None) -> np.ndarray:
    """Map a volume to [0, 1] as the training cache did: CT window (None = the MosMed reader's
    LUNG_WINDOW) or MR percentiles (Duke reader); "minmax" for anything else."""
    if mode == "ct":
        return window(volume, *(LUNG_WINDOW if ct_window is None else ct_window))
    if mode == "mr":
        return percentile_normalise(volume)
    v = volume.astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def default_intensity(dataset: str | None) -> str:
    """The intensity mode of a dataset's volumes (volume_intensity): MosMed CT, Duke MR."""
    return {"mosmed": "ct", "mosmedplus": "ct", "duke": "mr"}.get(dataset or "", "minmax")
