"""What app.py's page does with an upload, without Gradio: check and read the file, segment it through
the code of eval.py --image / --volume (datasets/predict_files.py, tmc/predict.py), draw the result.

A `Problem` is a bad input the page reports (its message names the file and the fix); the server
goes on. Shape key: H, W image rows and columns; S the model's side; X, Y, Z volume axes (RAS+).
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.images import IMAGE_SUFFIXES, is_dicom, read_image, read_mask
from datasets.predict_files import read_volume, segment_volume, volume_reading, write_mask_png
from datasets.records import DatasetError
from datasets.volumes import axial_slice_to_image, write_nifti_like
from tmc.checkpoint import MODEL_KEYS, CheckpointError, load_checkpoint, model_from_checkpoint
from tmc.metrics import confusion, dice_from_counts
from tmc.predict import explain_image, make_segmenter
from tmc.visualize import heatmap_overlay, overlay_contours

MAX_PIXELS = 8192 * 8192  # beyond this an upload is refused before decoding (the model sees S × S)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".zip")


class Problem(ValueError):
    """A bad input or checkpoint: shown on the page, the server keeps running."""


def newest_checkpoint(runs: Path = Path("runs")) -> Path | None:
    """The most recently written runs/*/best.pt (train.py's default --out), or None."""
    found = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class Model:
    """One checkpoint, loaded once; `error` holds why it did not load (the page shows it)."""

    def __init__(self, path: str | Path, device):
        self.path, self.device, self.error = Path(path), device, ""
        self.model = self.cfg = None
        self.train_config: dict = {}
        try:
            ckpt = load_checkpoint(self.path, map_location="cpu", require=MODEL_KEYS)
            self.model, self.cfg = model_from_checkpoint(ckpt)
            self.model.to(device)
            self.train_config = ckpt.get("train_config", {})
        except (CheckpointError, ValueError, RuntimeError, KeyError) as e:
            self.error = (str(e) if isinstance(e, CheckpointError) else
                          f"{self.path}: the checkpoint does not load into TMC ({type(e).__name__}: "
                          f"{e}); fix: pass a best.pt that train.py wrote, with --ckpt")

    def require(self):
        if self.error:
            raise Problem(self.error)
        return self.model


# ---------------------------------------------------------------------------- reading uploads

def _name(path: Path) -> str:
    return path.name  # uploads sit in a temporary folder: the file's own name is what the user knows


def check_image_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> Path:
    """Refuse what the image tab cannot read, before decoding: volumes, other files, huge images."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(VOLUME_SUFFIXES):
        raise Problem(f"{_name(path)}: a volume, not a 2D image; fix: open it in the Volume tab")
    if not (lower.endswith(IMAGE_SUFFIXES) or is_dicom(path)):
        raise Problem(f"{_name(path)}: not an image file (expected PNG, JPEG, TIFF, BMP or DICOM); "
                      f"fix: export the image as PNG")
    try:
        if is_dicom(path):
            import pydicom  # deferred: pydicom takes a second to load, only DICOM files need it

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            w, h = int(ds.Columns), int(ds.Rows)
        else:
            with Image.open(path) as im:
                w, h = im.size
    except Exception as e:  # PIL and pydicom raise many types for a file that is not what it says
        raise Problem(f"{_name(path)}: cannot read the image ({type(e).__name__}: {e}); fix: "
                      f"re-export it as an 8-bit PNG") from e
    if w * h > max_pixels:
        side = int(max_pixels ** 0.5)
        raise Problem(f"{_name(path)}: {w}x{h} pixels, more than this page takes ({max_pixels:,}); "
                      f"fix: downscale it to at most {side}x{side} (the model sees it at its own "
                      f"input size anyway)")
    return path


def read_upload(path, max_pixels: int = MAX_PIXELS, mask: bool = False) -> np.ndarray:
    """An uploaded image as (H, W) float32 in [0, 1], or a ground-truth mask as (H, W) bool."""
    path = check_image_file(path, max_pixels)
    try:
        return read_mask(path) if mask else read_image(path)
    except DatasetError as e:
        raise Problem(str(e).replace(str(path), _name(path))) from e


def volume_folder(path: str | Path, work: Path) -> Path:
    """A NIfTI file as is, or a zip of one DICOM series extracted into `work`."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return path
    if not lower.endswith(".zip"):
        raise Problem(f"{_name(path)}: a volume of another kind; expected a NIfTI file (.nii, "
                      f".nii.gz) or a .zip of one DICOM series folder; fix: convert it to NIfTI "
                      f"(e.g. SimpleITK.WriteImage(image, 'volume.nii.gz')) or zip the series folder")
    try:
        with zipfile.ZipFile(path) as z:
            z.extractall(work / "series")  # extractall drops absolute paths and '..'
    except (zipfile.BadZipFile, OSError) as e:
        raise Problem(f"{_name(path)}: not a readable zip ({e}); fix: zip the DICOM series folder "
                      f"again") from e
    return work / "series"


# ---------------------------------------------------------------------------- results

def _scale(side: int) -> int:
    """Nearest-neighbour magnification that shows a small (demo) image at about 256 pixels."""
    return max(1, 256 // max(1, side))


def foreground_text(mask: np.ndarray) -> str:
    return f"{int(mask.sum()):,} pixels, {100 * float(mask.mean()):.2f}% of the image"


def segment_image(model: Model, image_path, caption: str, gt_path=None, out_dir: Path | None = None,
                  max_pixels: int = MAX_PIXELS) -> dict:
    """One image and caption → {"overlay", "heatmaps" [(picture, label)], "mask_png", "info"}.

    The mask PNG is what `eval.py --image IMAGE --text CAPTION --out m.png` writes."""
    net = model.require()
    if not image_path:
        raise Problem("no image yet; fix: drop an image file above, or pick one of the demo examples")
    image = read_upload(image_path, max_pixels)  # (H, W)
    gt = read_upload(gt_path, max_pixels, mask=True) if gt_path else None
    if gt is not None and gt.shape != image.shape:
        raise Problem(f"{_name(Path(gt_path))}: mask size {gt.shape[1]}x{gt.shape[0]} differs from the "
                      f"image's {image.shape[1]}x{image.shape[0]}; fix: drop the mask drawn on this image")
    size = model.cfg.image_size
    mask, seen, heat = explain_image(net, caption, image, size, model.device)  # (H, W), (S, S), {i: (S, S)}
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="tmc-app-"))
    mask_png = write_mask_png(mask, out_dir / f"{Path(image_path).stem}_mask.png")
    info = [f"**caption:** {caption.strip()!r}" if caption.strip() else
            "**caption:** none (the mask comes from the image alone)",
            f"**foreground:** {foreground_text(mask)}"]
    if gt is not None:
        tp, fp, fn = confusion(mask[None], gt[None])
        info.append(f"**Dice against the given mask:** {float(dice_from_counts(tp, fp, fn, 1.0)[0]):.4f}")
    info.append(f"model: {model.path.name}, input {size}x{size}, threshold 0.5")
    return {"overlay": overlay_contours(image, gt, mask, width=2, scale=_scale(max(image.shape))),
            "heatmaps": [(heatmap_overlay(seen, h, scale=_scale(size)), f"MCM stage {s}")
                         for s, h in heat.items()],
            "mask_png": str(mask_png), "info": "\n\n".join(info)}


def segment_volume_file(model: Model, path, caption: str, intensity: str = "auto",
                        out_dir: Path | None = None) -> dict:
    """A NIfTI file or a zip of a DICOM series → {"unit" (X, Y, Z), "mask" (X, Y, Z), "nifti", "info"};
    the .nii.gz is what `eval.py --volume` writes (the input's grid)."""
    net = model.require()
    if not path:
        raise Problem("no volume yet; fix: drop a .nii/.nii.gz file or a .zip of one DICOM series")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="tmc-app-"))
    source = volume_folder(path, out_dir)
    mode, window = volume_reading(model.train_config, intensity)
    try:
        unit, affine, like = read_volume(source, mode, ct_window=window)
    except (DatasetError, ValueError) as e:
        raise Problem(str(e).replace(str(source), _name(Path(path)))) from e
    segment = make_segmenter(net, caption, model.device)
    mask = segment_volume(unit, segment, model.cfg.image_size)
    stem = Path(path).name.split(".")[0]
    nifti = write_nifti_like(mask, affine, out_dir / f"{stem}_mask.nii.gz", like=like)
    info = (f"**volume:** {'x'.join(map(str, unit.shape))} voxels ({mode} intensity), "
            f"{int(mask.any(axis=(0, 1)).sum())} of {unit.shape[2]} slices with foreground\n\n"
            f"**foreground:** {int(mask.sum()):,} voxels, {100 * float(mask.mean()):.3f}%")
    return {"unit": unit, "mask": mask, "nifti": str(nifti), "info": info}


def volume_slice(unit: np.ndarray, mask: np.ndarray, z: int) -> Image.Image:
    """Axial slice z with the mask's contour, in display orientation."""
    z = int(np.clip(z, 0, unit.shape[2] - 1))
    image, m = axial_slice_to_image(unit[:, :, z]), axial_slice_to_image(mask[:, :, z])  # (H, W)
    return overlay_contours(image, None, m, width=2, scale=_scale(max(image.shape)))
