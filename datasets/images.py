"""Reading one 2D image or mask file (PNG, JPEG, TIFF, BMP, DICOM) and resizing it for the cache.

Shape key: H, W image rows and columns; S the cache's square side.

Images become (H, W) float32 in [0, 1]:
* 8-bit files (PIL modes L, P, LA, RGB, RGBA, CMYK, ...) are converted to one luminance channel by
  PIL (`convert("L")`, ITU-R 601 weights; an alpha channel is dropped, not composited) and divided
  by 255.
* 16/32-bit integer and float files (PIL modes I;16*, I, F) are scaled by their own min and max:
  their stored range (10-, 12- or 16-bit) is not recorded reliably in PNG/TIFF.
* DICOM: stored values → modality LUT (RescaleSlope/Intercept) → own min-max → inverted when the
  PhotometricInterpretation is MONOCHROME1 (there, high values are dark). RGB DICOM → luminance.
  Window centre/width are not applied (training normalisation should not depend on a display
  window). Multi-frame files are refused: a 2D reader expects one image per file.

Masks become (H, W) bool. The rule (`binarise_mask`):
* one or two distinct values, the lower one 0: foreground = value > 0.5 × max, so 0/1, 0/255 and
  0/k masks all work (a palette PNG keeps its indices, 0 = background);
* more than two values is refused, since it means a label map, a soft mask or a grey image. The one
  exception is the known 0/255 format that lossy compression (JPEG) smears. There, at least 99% of the
  pixels must lie within 64 of 0 or of 255, and the mask is thresholded at 127.
Anything else raises DatasetError naming the file.

Resizing (tmc.predict, the model's input grid, shared with inference): images bilinear with antialiasing (PIL's convolution resampler widens the filter when
shrinking), masks nearest, never "bilinear then threshold" (that dilates thin lesions).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.records import DatasetError

__all__ = ["RASTER_SUFFIXES", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "is_dicom", "read_image", "high_bit_depth", "read_mask", "read_image_and_mask", "load_samples", "binarise_mask",
           "image_key"]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES
_LOSSY = (".jpg", ".jpeg")
_FIX_IMAGE = "fix: re-export it as an 8-bit PNG (--skip-bad passes over it while caching)"


def image_key(name: str) -> str:
    """Normalised pairing key of an image, mask or text-row name.

    "mask_covid_1.png", "covid_1.png", "mask_covid_1", "COVID_1" → "covid_1": folders dropped,
    lower case, a known image extension dropped, one leading "mask_" dropped.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[5:] if name.startswith("mask_") else name


# ---------------------------------------------------------------------------- raw pixels

def is_dicom(path: Path) -> bool:
    """A .dcm/.dicom suffix, or the 'DICM' marker at byte 128 (files exported without suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom(path: Path, for_mask: bool) -> np.ndarray:
    """(H, W) float64: modality-LUT values (image) or stored values (mask)."""
    # pydicom only for DICOM files: PNG/JPEG datasets never load it
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for truncated / unsupported files
        raise DatasetError(f"{path}: cannot read DICOM pixel data ({e}); {_FIX_IMAGE}") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DatasetError(f"{path}: DICOM with {frames} frames; expected one 2D image per file; "
                           f"fix: export the frame you mean as its own file")
    if arr.ndim == 3:  # (H, W, 3) colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space  # deferred with pydicom above
            arr = convert_color_space(arr, photometric, "RGB")
        arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif not for_mask:
        arr = apply_modality_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float64)
    if photometric == "MONOCHROME1" and not for_mask:
        arr = arr.max() + arr.min() - arr  # invert so that high = bright, as in MONOCHROME2
    return arr


def _read_pil(path: Path, for_mask: bool) -> np.ndarray:
    """(H, W) array in the file's own value range: uint8/uint16/int32/float32/bool."""
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise DatasetError(f"{path}: {im.n_frames} frames/pages; expected a single 2D image; "
                                   f"fix: save the page you mean as its own file")
            im.load()
            if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;16"):
                arr = np.asarray(im)
            elif im.mode == "P" and for_mask:
                arr = np.asarray(im)  # palette indices: 0 = background by convention
            else:
                arr = np.asarray(im.convert("L"))
    except DatasetError:
        raise
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise DatasetError(f"{path}: cannot read the image ({type(e).__name__}: {e}); "
                           f"{_FIX_IMAGE}") from e
    if arr.ndim != 2:
        raise DatasetError(f"{path}: pixel array of shape {arr.shape}; expected one 2D channel")
    return arr


def _read_raw(path: Path, for_mask: bool) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; fix: check the path (and its case)")
    return _read_dicom(path, for_mask) if is_dicom(path) else _read_pil(path, for_mask)


# ---------------------------------------------------------------------------- public readers

def read_image(path: Path) -> np.ndarray:
    """One image file as (H, W) float32 in [0, 1] (conversion rules in the module docstring)."""
    arr = _read_raw(path, for_mask=False)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: image holds NaN or infinite values; expected finite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return out.astype(np.float32)


def high_bit_depth(path: Path) -> str | None:
    """The PIL mode of a 16/32-bit raster file (scaled by its own range in `read_image`), else None."""
    try:
        with Image.open(path) as im:
            return im.mode if im.mode in ("I", "F") or im.mode.startswith("I;16") else None
    except Exception:  # not a raster file: read_image says why
        return None


def binarise_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    """Raw mask values (H, W) → bool (H, W); the rule is in the module docstring."""
    if arr.dtype == np.uint8:  # bincount is ~10x faster than np.unique on 8-bit masks
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).astype(np.uint8)
    else:
        values = np.unique(arr)
    if values.size <= 2:
        if values.size == 2 and values[0] != 0:
            raise DatasetError(f"{path}: mask values {values.tolist()}; expected background 0 and "
                               f"one foreground value (0/1 or 0/255); fix: re-save the mask")
        top = float(values[-1])
        return arr > 0.5 * top if top > 0 else np.zeros(arr.shape, dtype=bool)
    if Path(path).suffix.lower() in _LOSSY and arr.dtype == np.uint8:
        near = (arr <= 64) | (arr >= 191)
        if near.mean() >= 0.99:
            return arr > 127
    shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if values.size > 6 else "")
    raise DatasetError(f"{path}: mask has {values.size} distinct values ({shown}); expected a binary "
                       f"mask (0/1 or 0/255); fix: save masks as 0/255 PNG (a label map needs one "
                       f"mask per target)")


def read_mask(path: Path) -> np.ndarray:
    """One mask file as (H, W) bool (binarisation rule in the module docstring)."""
    return binarise_mask(_read_raw(path, for_mask=True), path)


def read_image_and_mask(image_path: Path, mask_path: Path, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask, (H, W) each; DatasetError (naming both files, `where` and the fix) when
    their sizes differ."""
    image, mask = read_image(image_path), read_mask(mask_path)
    if image.shape != mask.shape:
        raise DatasetError(f"{mask_path}: mask size {mask.shape} differs from its image {Path(image_path).name} "
                           f"{image.shape}{where}; expected the same size; fix: re-export the mask at the "
                           f"image's size")
    return image, mask


# ---------------------------------------------------------------------------- reading many

def map_prefetch(fn, items, workers: int = 2, window: int = 32):
    """Yield fn(item) in order, computing up to `window` items ahead on `workers` threads.

    PNG/JPEG decoding in PIL releases the GIL, so threads overlap file reading. An exception
    raised by fn is re-raised at that item's turn.
    """
    items = list(items)
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # Ctrl-C or an error: the reads not yet started are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def load_samples(load, items):
    """Yield load(item) for each item in order, read ahead on up to 4 threads; a DatasetError takes
    its sample's place, so the cache builder can stop or skip it (skip_bad) with its message."""
    def attempt(item):
        try:
            return load(item)
        except DatasetError as e:
            return e

    yield from map_prefetch(attempt, items, workers=min(4, os.cpu_count() or 1))
