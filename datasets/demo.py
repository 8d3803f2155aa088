"""A synthetic chest-X-ray-like set in which only the text says which lesions to segment.

Shape key: H, W image rows and columns (H == W == size).

Each image (default 64 × 64, 8-bit) has a torso, two dark lung fields, a heart shadow toward the
image's right (the usual radiological display), curved ribs, and smooth and fine noise. Each image
also holds 2 to 5 lesion-like blobs: bright, mottled, irregular, one per zone. The zones are the 6 of
`datasets.text_from_mask` (image thirds × halves). A random non-empty proper subset of the blobs are
the targets. The mask holds only them, and the caption, made by `caption_from_mask` in the LViT
template, names their zones: "Bilateral pulmonary infection, two infected areas, upper left lung and
lower right lung." The other blobs (at least one per image) come from the same generator, so they look
the same, but sit in other zones and are not in the mask. An image-only model can only guess which
blobs count. A text-guided model that reads the zone words can get them right. The zones come last
in the caption, so truncating the text to T = 10 tokens (paper §4.2) removes most of them; comparing
T = 10 with T = 24 measures that.

Every image is its own case. The set is split 7:1:2 by `assign_splits` (same seed), written in the
SGSeg layout and read back by `QataReader`, like real data:

    <root>/images/{train,valid,test}/images/demo_NNNN.png
    <root>/images/{train,valid,test}/masks/mask_demo_NNNN.png
    <root>/prompts/annotation.json     {"train": [{image_path, caption, pseudo_label, ...}], ...}
    <root>/demo_manifest.json          generator settings and every file's size

Deterministic: image i uses its own PCG64 stream seeded by (seed, i), so a seed gives byte-identical
files. A folder that already holds the manifest for the same settings is reused as is. A folder with
another demo's manifest is replaced. A non-empty folder without a manifest is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.qata import QataReader
from datasets.records import DatasetError
from datasets.splits import assign_splits
from datasets.text_from_mask import caption_from_mask, count_regions, mask_zones

__all__ = ["DEFAULT_ROOT", "DEMO_VERSION", "LESION_RADIUS", "render_demo_image", "ensure_demo", "DemoReader"]

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "demo"
# 2: lesions of mean radius 0.1125 of the side (about 2 × 2 stage-2 tokens at 64², where MCM reads
# the text) instead of 0.075 (1.4 tokens), a setting kept in the manifest (`lesion`).
DEMO_VERSION = 2
LESION_RADIUS = 0.1125
_FOLDER = {"train": "train", "val": "valid", "test": "test"}


# ---------------------------------------------------------------------------- drawing

def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """(size, size) low-frequency noise in about [-1, 1]: a cells × cells grid, bilinear upsampled."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))


def _blob(rng, size: int, cy: float, cx: float, radius: float, inside: np.ndarray) -> np.ndarray:
    """(size, size) bool: one irregular connected lesion around (cy, cx) (pixels), within `inside`."""
    from scipy import ndimage  # slow to import; only drawing a new demo set needs it

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    field = 0.15 * _smooth_noise(rng, size, max(4, size // 5))
    for _ in range(4):  # a few overlapping lobes give an irregular outline
        oy, ox = rng.normal(0, radius * 0.4, 2)
        s = radius * rng.uniform(0.45, 0.75)
        field += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * s * s))
    region = (field > 0.6) & inside
    labels, n = ndimage.label(region, structure=np.ones((3, 3), bool))
    if n > 1:  # keep the largest piece, so that each blob is exactly one infected area
        region = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return region


def render_demo_image(seed: int, index: int, size: int = 64, lesion: float = LESION_RADIUS):
    """One synthetic image, its mask and its caption.

    Args:
        seed: dataset seed.
        index: image number (its own random stream: (seed, index)).
        size: H = W.
        lesion: mean blob radius as a fraction of the side (drawn within ±2/15 of it); 0.075 gives
            the first version's blobs.

    Returns:
        (image (H, W) uint8, mask (H, W) bool, caption str, info dict: "targets" and "blobs",
        (2, 3) bool zone tables [left/right, upper/middle/lower], and "union", the (H, W) bool
        mask of every blob, targets and distractors).
    """
    from scipy import ndimage  # slow to import; a demo set already written is read without it

    rng = np.random.Generator(np.random.PCG64([seed, index]))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (H, W) in [0, 1)
    img = np.full((size, size), 0.06, np.float32)
    img[_ellipse(yy, xx, 0.55, 0.5, 0.58, 0.47) < 1] = 0.55  # torso
    lung = np.zeros((size, size), bool)
    for cx in (0.29, 0.71):
        cx += rng.uniform(-0.02, 0.02)
        cy, ry, rx = 0.5 + rng.uniform(-0.02, 0.02), rng.uniform(0.38, 0.42), rng.uniform(0.14, 0.17)
        lung |= _ellipse(yy, xx, cy, cx, ry, rx) < 1
    img[lung] = 0.22
    # Ribs: bands that curve down toward the sides, brighter than the air around them.
    phase = yy * rng.uniform(6.5, 8.0) + 2.2 * (xx - 0.5) ** 2 + rng.uniform(0, 1)
    img += 0.12 * lung * (np.sin(2 * np.pi * phase) > 0.45)
    heart = _ellipse(yy, xx, 0.66, 0.56 + rng.uniform(-0.02, 0.02), 0.16, 0.12) < 1
    img[heart] = np.maximum(img[heart], 0.62)

    # Lesions: 2-5 zones get a blob; 1 .. k-1 of them are targets.
    k = int(rng.integers(2, 6))
    zones = rng.permutation(6)[:k]  # zone z = side * 3 + level
    n_target = int(rng.integers(1, k))
    third = size / 3
    mask = np.zeros((size, size), bool)
    blobs = np.zeros((2, 3), bool)
    targets = np.zeros((2, 3), bool)
    brightness = np.zeros((size, size), np.float32)  # of the blobs
    union = np.zeros((size, size), bool)
    inner_lung = ndimage.binary_erosion(lung) & ~heart  # blobs over the heart would look brighter
    for j, z in enumerate(zones):
        side, level = divmod(int(z), 3)
        # The blob stays inside its zone (one pixel off the borders, so it names one zone only)
        # and inside the lung.
        cell = np.zeros((size, size), bool)
        r0, r1 = round(level * third), round((level + 1) * third)
        c0, c1 = (0, size // 2) if side == 0 else (size // 2, size)
        cell[r0 + 1:r1 - 1, c0 + 1:c1 - 1] = True
        allowed = cell & inner_lung
        rows, cols = np.nonzero(allowed)
        region = np.zeros((size, size), bool)
        for _ in range(20):  # redraw the rare blob that the lung outline cuts to a sliver
            cy = rows.mean() + rng.uniform(-0.25, 0.25) * (rows.max() - rows.min())
            cx = cols.mean() + rng.uniform(-0.25, 0.25) * (cols.max() - cols.min())
            region = _blob(rng, size, cy, cx, rng.uniform(13 / 15, 17 / 15) * lesion * size, allowed)
            if region.sum() >= 0.006 * size * size:
                break
        blobs[side, level] = True
        union |= region
        brightness = np.maximum(brightness, region * rng.uniform(0.28, 0.36))
        if j < n_target:
            mask |= region
            targets[side, level] = True
    texture = 1 + 0.25 * _smooth_noise(rng, size, max(4, size // 6))
    img += ndimage.uniform_filter(brightness, 2) * texture
    img += 0.05 * _smooth_noise(rng, size, 6) + rng.normal(0, 0.025, (size, size))
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)

    caption = caption_from_mask(mask)
    if not (mask_zones(mask) == targets).all() or count_regions(mask) != n_target:
        raise AssertionError(f"demo image {index}: mask zones disagree with the targets")  # a bug
    return image, mask, caption, {"targets": targets, "blobs": blobs, "union": union}


# ---------------------------------------------------------------------------- the folder

def _manifest_settings(n: int, size: int, seed: int, lesion: float) -> dict:
    return {"generator": "tmc-demo", "version": DEMO_VERSION, "n": n, "size": size, "seed": seed,
            "lesion": lesion}


def _holds_demo(root: Path, settings: dict) -> tuple[bool, dict | None]:
    """(folder complete for these settings, its manifest or None)."""
    path = root / "demo_manifest.json"
    if not path.is_file():
        return False, None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, {}
    if manifest.get("settings") != settings:
        return False, manifest
    ok = all((root / rel).is_file() and (root / rel).stat().st_size == size
             for rel, size in manifest.get("files", {}).items())
    return ok, manifest


def _write(root: Path, n: int, size: int, seed: int, lesion: float) -> dict:
    """Render every image into root (a fresh folder); returns {relative path: size in bytes}."""
    names = [f"demo_{i:04d}" for i in range(n)]
    split_of = assign_splits(names, seed=seed)
    annotation = {folder: [] for folder in _FOLDER.values()}
    for i, name in enumerate(names):
        image, mask, caption, info = render_demo_image(seed, i, size, lesion)
        folder = root / "images" / _FOLDER[split_of[name]]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "images" / f"{name}.png", format="PNG")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"mask_{name}.png",
                                                           format="PNG")
        zones = info["targets"]
        annotation[_FOLDER[split_of[name]]].append({
            "image_path": f"mask_{name}.png", "caption": caption,
            "pulmonary_infection": int(zones.any(axis=1).sum()),
            "infected_area": int(zones.sum()),
            "pseudo_label": [int(v) for v in zones.reshape(-1)],
            "distractor_zones": [int(v) for v in (info["blobs"] & ~zones).reshape(-1)]})
    (root / "prompts").mkdir()
    (root / "prompts" / "annotation.json").write_text(json.dumps(annotation, indent=1))
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def ensure_demo(root=None, n: int = 600, size: int = 64, seed: int = 0,
                lesion: float = LESION_RADIUS) -> Path:
    """Generate the demo set into `root` unless it already holds it; returns the folder.

    Args:
        root: target folder (default <repo>/data/demo).
        n: number of images.
        size: image side in pixels.
        seed: generator and split seed.
        lesion: mean blob radius / side (see `render_demo_image`).
    """
    root = Path(root).resolve() if root else DEFAULT_ROOT
    if n < 10 or size < 24 or not 0.02 <= lesion <= 0.15:
        raise ValueError(f"the demo needs n >= 10 images of size >= 24 and a lesion radius in "
                         f"[0.02, 0.15] of the side, got n={n}, size={size}, lesion={lesion}")
    settings = _manifest_settings(n, size, seed, lesion)
    ok, manifest = _holds_demo(root, settings)
    if ok:
        return root
    if root.exists() and any(root.iterdir()) and manifest is None:
        raise DatasetError(f"{root}: folder is not empty and holds no demo_manifest.json; expected "
                           f"an empty folder or an earlier demo; fix: choose another --root")
    print(f"generating the demo set ({n} images {size}x{size}, seed {seed}) in {root}")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = _write(tmp, n, size, seed, lesion)
        (tmp / "demo_manifest.json").write_text(
            json.dumps({"settings": settings, "files": files}, indent=1, sort_keys=True))
        if root.exists():
            if _holds_demo(root, settings)[0]:  # another process wrote the same set meanwhile
                shutil.rmtree(tmp)
                return root
            shutil.rmtree(root)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class DemoReader(QataReader):
    """The demo set (generated on first use) read through QataReader's "sgseg" layout.

    Args:
        root: folder (default <repo>/data/demo).
        n, size, seed, lesion: generator settings (see `ensure_demo`).
    """

    name = "demo"

    def __init__(self, root=None, n: int = 600, size: int = 64, seed: int = 0,
                 lesion: float = LESION_RADIUS) -> None:
        self.demo_settings = _manifest_settings(int(n), int(size), int(seed), float(lesion))
        super().__init__(ensure_demo(root, int(n), int(size), int(seed), float(lesion)), layout="sgseg")

    def options(self) -> dict:
        return {**super().options(), **self.demo_settings}
