"""Segment image and volume files with one caption: read them as the training cache did, write
the masks (eval.py --image / --volume and app.py share these, so both give the same bytes).

Shape key: H, W image rows and columns; X, Y, Z volume axes in RAS+ voxel order; S the model's side.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.dicom_series import read_dicom_series
from datasets.images import high_bit_depth, read_image
from datasets.intensity import check_finite, default_intensity, volume_intensity
from datasets.records import DatasetError
from datasets.registry import parse_reader_options
from datasets.volumes import axial_slice_to_image, image_to_axial_slice, read_nifti, write_nifti_like
from tmc.predict import segment_images


def write_output(out: str | Path, write) -> Path:
    """Call write(tmp) for a temporary beside `out` (same extension), then rename it to `out`: a full
    disk or a kill never leaves half a mask, nor replaces an earlier one with it."""
    out = Path(out)
    tmp = out.with_name(f".{os.getpid()}.{out.name}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):  # on a read-only folder the temporary never existed
            tmp.unlink()
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "the disk is full" if full else f"cannot write there ({e.strerror or e})"
        raise DatasetError(f"--out {out}: {why}; nothing was written; fix: "
                           + ("free space there" if full else "--out in a folder you can write")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_mask_png(mask: np.ndarray, out: str | Path) -> Path:
    """(H, W) bool → a 0/255 8-bit PNG at `out` (what --image writes)."""
    return write_output(out, lambda tmp: Image.fromarray(mask.astype(np.uint8) * 255).save(tmp))


def predict_image(path: str | Path, segment, size: int, out: str | Path) -> Path:
    """Segment one 2D image file; writes a 0/255 PNG at the input's own size."""
    mode = high_bit_depth(Path(path))
    if mode:
        print(f"note: {path} has {mode} pixels, scaled by their own min and max as the training cache "
              f"does for such files; an 8-bit export of the same picture maps 0-255 and can segment "
              f"differently; fix: give the image in the bit depth the model was trained on")
    mask = segment_images(segment, [read_image(Path(path))], size)[0]  # (H, W)
    return write_mask_png(mask, out)


def read_volume(path: str | Path, intensity: str = "ct", series_uid: str | None = None,
                ct_window=None) -> tuple[np.ndarray, np.ndarray, Path | None]:
    """A NIfTI file or DICOM series folder as (X, Y, Z) floats in [0, 1], as the training cache
    scaled it; its affine; and the NIfTI file whose grid a mask keeps (None for DICOM: RAS+)."""
    path = Path(path)
    is_nifti = path.is_file()
    volume, affine = read_nifti(path) if is_nifti else read_dicom_series(path, series_uid)  # (X, Y, Z)
    check_finite(np.asarray(volume), path)
    return volume_intensity(np.asarray(volume), intensity, ct_window), affine, path if is_nifti else None


def volume_reading(train_config: dict, intensity: str = "auto") -> tuple[str, tuple | None]:
    """How a run scales volumes: (intensity mode, CT window or None = the lung window); `intensity`
    other than "auto" overrides the run's dataset (MosMed ct, Duke mr)."""
    mode = default_intensity(train_config.get("dataset")) if intensity == "auto" else intensity
    return mode, parse_reader_options(train_config.get("reader_options", "")).get("window")


def segment_volume(unit: np.ndarray, segment, size: int, batch_size: int = 8) -> np.ndarray:
    """(X, Y, Z) in [0, 1] → (X, Y, Z) bool, every axial slice segmented as a 2D image."""
    views = [axial_slice_to_image(unit[:, :, z]) for z in range(unit.shape[2])]  # (H, W) each
    masks = segment_images(segment, views, size, batch_size)
    return np.stack([image_to_axial_slice(m) for m in masks], axis=2)  # (X, Y, Z)


def predict_volume(path: str | Path, segment, size: int, out: str | Path, intensity: str = "ct",
                   batch_size: int = 8, series_uid: str | None = None,
                   ct_window=None) -> Path:
    """Segment every axial slice of a NIfTI file or DICOM series folder; write a NIfTI mask.

    For NIfTI input the mask has the input's shape, voxel order and affine; for DICOM, the RAS+
    grid of `read_dicom_series` (the same voxels as the series).
    """
    unit, affine, like = read_volume(path, intensity, series_uid, ct_window)
    mask = segment_volume(unit, segment, size, batch_size)  # (X, Y, Z)
    return write_output(out, lambda tmp: write_nifti_like(mask, affine, tmp, like=like))
