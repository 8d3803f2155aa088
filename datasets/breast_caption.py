"""Duke's slice captions written from the tumour mask: breast side, quadrant, number of lesions
and size, e.g. "Left breast lesion, one lesion, upper outer quadrant of the left breast, 14 mm."

Duke has no text per slice; without a text CSV or the clinical sheet each slice is described by
its own mask (marked text_from_mask in the cache), in breast words rather than the chest template
of datasets/text_from_mask.py. datasets/captions.py reads these captions back (`breast_facts`).
"""
from __future__ import annotations

import numpy as np

from datasets.text_from_mask import count_regions, number_word

__all__ = ["breast_caption"]


def breast_caption(mask: np.ndarray, z_fraction: float, pixel_mm=(1.0, 1.0)) -> str:
    """The caption of one axial slice's tumour mask, e.g. "Left breast lesion, one lesion, upper
    outer quadrant of the left breast, 14 mm."

    Args:
        mask: (H, W) bool in the radiological display of `axial_slice_to_image` (rows anterior →
            posterior, columns patient right → left: the patient's right breast is the image's left).
        z_fraction: the slice's height in its volume, 0 = lowest (inferior) slice, 1 = highest; upper
            or lower is which half of the volume it lies in (no breast outline is available).
        pixel_mm: (row, column) pixel size in mm, for the size of the largest lesion.

    Inner or outer is the lesion pixels' mean column in the breast's half of the image: toward the
    midline (inner) or the side (outer). Lesions are 8-connected regions counted per breast.
    """
    mask = np.asarray(mask).astype(bool)
    H, W = mask.shape
    if not mask.any():
        return "No breast lesion."
    level = "upper" if z_fraction >= 0.5 else "lower"
    parts, sides, n = [], [], 0
    for side, half in (("right", mask[:, :W // 2]), ("left", mask[:, W // 2:])):
        if not half.any():
            continue
        n += count_regions(half)
        centre = np.nonzero(half)[1].mean() / half.shape[1]  # 0..1 across the half
        outer = centre < 0.5 if side == "right" else centre >= 0.5  # midline: the image's centre
        parts.append(f"{level} {'outer' if outer else 'inner'} quadrant of the {side} breast")
        sides.append(side)
    from scipy import ndimage  # slow to import; only slices captioned from their mask need it

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    size = 0.0
    for region in ndimage.find_objects(labels):
        size = max(size, (region[0].stop - region[0].start) * pixel_mm[0],
                   (region[1].stop - region[1].start) * pixel_mm[1])
    if len(sides) == 2:
        lead = "Bilateral breast lesions"
    else:
        lead = f"{sides[0].capitalize()} breast lesion{'' if n == 1 else 's'}"
    lesions = f"{number_word(n)} lesion{'' if n == 1 else 's'}"
    return f"{lead}, {lesions}, {' and '.join(parts)}, {'largest ' if n > 1 else ''}{size:.0f} mm."
