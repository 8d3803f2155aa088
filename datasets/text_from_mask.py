"""A caption in the QaTa/LViT template, derived from a binary mask (for data that has no text).

Shape key: H, W mask rows and columns.

Template (LViT's QaTa-COV19 annotations, Li et al. 2023):

    "Bilateral pulmonary infection, two infected areas, upper middle left lung and lower right lung."
    "Unilateral pulmonary infection, one infected area, all right lung."
    "No pulmonary infection."                       (empty mask; QaTa has no such image)

Zones: the mask is cut into 6 zones, upper/middle/lower (equal thirds of the image height) ×
left/right (halves of the width). A zone counts when it holds any foreground pixel
(`min_fraction` raises that bar). Per side the zones are listed top to bottom ("upper middle left
lung"); all three on one side read "all left lung" in the "lvit" style. Sides are joined by "and",
left first. "Unilateral"/"Bilateral" is whether one or both sides have a zone. The count is the
number of connected lesions (8-connectivity) on each side, summed, as in LViT's "Unilateral
pulmonary infection, two infected areas, upper left lung": a lesion across the midline counts once
per side, so a "Bilateral" caption never says "one infected area". The "sgseg" style reproduces the normalised captions of the QaTa
copy in SGSeg (ShuchangYe-bib/SGSeg), the copy the shared QaTa subset holds: lower case, zones always
enumerated ("upper middle lower left lung"), and the count is the number of zones.

Left and right. `side="image"` (default): "left lung" is the left half of the image as displayed.
That is what the QaTa annotations do. In the 2,500 images of the shared QaTa subset, 95% of the mask
pixels of "unilateral ... left lung" captions lie in the image's left half, which in a PA chest film
is the patient's right lung (the "R" markers and the heart shadow confirm the usual display).
Generated text must use the same words as the text the model is trained on, so this default
matches QaTa. `side="radiological"` names the patient's anatomy instead: the patient's left lung is
on the image's right. This convention holds when images are stored in the usual radiological
display (patient facing the viewer).

Such captions are derived from the label itself: a model given them at test time is told where to
look by the ground truth. Report results on generated text separately.

A mask-only rule cannot know where the lungs are. Against the human zone labels of the shared QaTa
subset it agrees on ~75% of the zone bits (the annotators' thirds follow the lung fields, not the
image).
"""
from __future__ import annotations

import numpy as np

__all__ = ["LEVELS", "SIDES", "mask_zones", "count_regions", "number_word", "caption_from_zones",
           "caption_from_mask"]

LEVELS = ("upper", "middle", "lower")
SIDES = ("left", "right")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()


def number_word(n: int) -> str:
    """0..20 as an English word (LViT's captions spell counts), larger numbers as digits."""
    return _WORDS[n] if 0 <= n < len(_WORDS) else str(n)


def mask_zones(mask: np.ndarray, side: str = "image", min_fraction: float = 0.0) -> np.ndarray:
    """Which of the 6 lung zones a mask touches.

    Args:
        mask: (H, W) bool (or 0/1).
        side: "image" (left = image's left half, QaTa's words) or "radiological" (left = patient's
            left = image's right half).
        min_fraction: a zone counts when its foreground exceeds this fraction of the zone's area.

    Returns:
        (2, 3) bool, [side (left, right), level (upper, middle, lower)].
    """
    if side not in ("image", "radiological"):
        raise ValueError(f"side must be 'image' or 'radiological', got {side!r}")
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    H, W = mask.shape
    rows = [0, round(H / 3), round(2 * H / 3), H]
    cols = [0, W // 2, W]
    zones = np.zeros((2, 3), dtype=bool)
    for s in range(2):
        for lv in range(3):
            cell = mask[rows[lv]:rows[lv + 1], cols[s]:cols[s + 1]]
            zones[s, lv] = cell.size > 0 and cell.sum() > min_fraction * cell.size
    # Image columns [0, W/2) are the image's left; radiologically that is the patient's right.
    return zones[::-1].copy() if side == "radiological" else zones


def count_regions(mask: np.ndarray) -> int:
    """Number of 8-connected foreground regions of an (H, W) mask."""
    from scipy import ndimage  # slow to import; the zone and word tables are used without it

    _, n = ndimage.label(np.asarray(mask).astype(bool), structure=np.ones((3, 3), dtype=bool))
    return int(n)


def caption_from_zones(zones: np.ndarray, count: int, style: str = "lvit") -> str:
    """The caption for a (2, 3) zone table (see `mask_zones`) and a lesion count.

    Args:
        zones: (2, 3) bool [left/right, upper/middle/lower].
        count: the number written as "<n> infected area(s)"; the "sgseg" style ignores it and
            counts zones.
        style: "lvit" (capitalised, "all left lung") or "sgseg" (lower case, zones enumerated).
    """
    if style not in ("lvit", "sgseg"):
        raise ValueError(f"style must be 'lvit' or 'sgseg', got {style!r}")
    zones = np.asarray(zones, dtype=bool).reshape(2, 3)
    if not zones.any():
        text = "No pulmonary infection."
        return text.lower() if style == "sgseg" else text
    parts = []
    for s, side in enumerate(SIDES):
        if zones[s].all() and style == "lvit":
            parts.append(f"all {side} lung")
        elif zones[s].any():
            parts.append(" ".join(lv for lv, on in zip(LEVELS, zones[s]) if on) + f" {side} lung")
    lateral = "Bilateral" if zones.any(axis=1).all() else "Unilateral"
    n = int(zones.sum()) if style == "sgseg" else int(count)
    areas = f"{number_word(n)} infected area{'' if n == 1 else 's'}"
    text = f"{lateral} pulmonary infection, {areas}, {' and '.join(parts)}."
    return text.lower() if style == "sgseg" else text


def caption_from_mask(mask: np.ndarray, style: str = "lvit", side: str = "image",
                      min_fraction: float = 0.0) -> str:
    """QaTa/LViT-style caption of an (H, W) binary mask (rules in the module docstring).

    Args:
        mask: (H, W) bool or 0/1.
        style: "lvit" (default) or "sgseg".
        side: "image" (default, QaTa's words) or "radiological".
        min_fraction: minimum foreground fraction of a zone for it to count.

    Returns:
        e.g. "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    """
    zones = mask_zones(mask, side=side, min_fraction=min_fraction)
    mask = np.asarray(mask).astype(bool)
    half = mask.shape[1] // 2  # the sides of `mask_zones`
    count = count_regions(mask[:, :half]) + count_regions(mask[:, half:]) if zones.any() else 0
    return caption_from_zones(zones, count, style=style)
