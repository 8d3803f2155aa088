"""Training-only geometric augmentation on a batch, on whatever device the batch is (paper §4.2).

Shape key: B batch, C channels, H, W spatial (H == W for the k·90° rotations).

Per sample, drawn independently from `generator`:
* a rotation by an angle uniform in [-max_angle, max_angle] degrees (with probability p_rotate)
  about the image centre, by affine_grid/grid_sample: bilinear for the image, nearest for the mask,
  zeros outside;
* a k·90° rotation, k uniform in {0, 1, 2, 3} (torch.rot90, exact);
* a horizontal and a vertical flip, each with probability p_flip (exact).
Order: small rotation, then k·90°, then flips. The image and the mask get the same parameters, and
the mask stays binary. The random numbers are drawn on the generator's device (CPU by default) and
then moved to the batch's device, so a seeded CPU generator gives the same augmentation on any device.
"""
from __future__ import annotations

import math
import re
import typing

import torch
import torch.nn.functional as F

from tmc.choices import AugmentMode

__all__ = ["rotate_batch", "augment_batch", "swap_caption_sides", "augment_training_batch", "AUGMENT_MODES"]

# train.py --augment: the paper's set, the subset that keeps position captions true, or nothing.
AUGMENT_MODES = typing.get_args(AugmentMode)
_SIDES = {"left": "right", "right": "left", "upper": "lower", "lower": "upper"}


def rotate_batch(x: torch.Tensor, angles_deg: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate each sample about its centre, zeros outside.

    Positive angles turn the content counter-clockwise as displayed (row 0 at the top), as
    scipy.ndimage.rotate does.

    Args:
        x: (B, C, H, W) float.
        angles_deg: (B,) angles in degrees.
        mode: "bilinear" (images) or "nearest" (masks).

    Returns:
        (B, C, H, W).
    """
    B, C, H, W = x.shape
    a = angles_deg.to(device=x.device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # The grid maps each output pixel to its input location in normalised (x right, y down)
    # coordinates; scaling by the aspect keeps the rotation rigid on non-square images.
    r = H / W
    theta = torch.stack([torch.stack([cos, -sin * r, torch.zeros_like(a)], -1),
                         torch.stack([sin / r, cos, torch.zeros_like(a)], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros",
                         align_corners=False).to(x.dtype)


def _where(flag: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(flag[:, None, None, None], a, b)


def augment_batch(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                  max_angle: float = 20.0, p_rotate: float = 0.5, rot90: bool = True,
                  p_flip: float = 0.5, return_params: bool = False):
    """Apply the same random geometric transform to each image and its mask.

    Args:
        image: (B, C, H, W) float.
        mask: (B, 1, H, W) float in {0, 1} (or bool).
        generator: torch.Generator for the random draws (its device is where they are drawn).
        max_angle: rotation range in degrees (paper: ±20°).
        p_rotate: probability of the small rotation.
        rot90: draw k·90° rotations (needs H == W).
        p_flip: probability of each of the horizontal and vertical flips.
        return_params: also return {"angle" (B,) degrees (0 = none), "k" (B,), "hflip" (B,),
            "vflip" (B,)}, e.g. to swap "left"/"right" in position captions after a flip.

    Returns:
        (image (B, C, H, W), mask (B, 1, H, W)) [, params], same dtypes and device as the inputs.

    Flips and k·90° turns move a lesion named "upper left" to another zone, so with captions that name
    positions (QaTa, the demo) the text no longer matches the mask for those samples. The paper
    augments anyway. Use rot90=False, p_flip=0 to keep positions, or rewrite the captions from the
    returned params.
    """
    B, C, H, W = image.shape
    if mask.shape[0] != B or mask.shape[-2:] != (H, W):
        raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in batch "
                         f"or spatial size")
    if rot90 and H != W:
        raise ValueError(f"k·90° rotation needs square images, got {H}x{W}; pass rot90=False")
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(B, 4, generator=generator, device=gdev)
    angle = (u[:, 0] * 2 - 1) * max_angle
    rotate = torch.rand(B, generator=generator, device=gdev) < p_rotate
    k = torch.randint(0, 4 if rot90 else 1, (B,), generator=generator, device=gdev)
    hflip, vflip = u[:, 1] < p_flip, u[:, 2] < p_flip
    dev = image.device
    rotate, k, hflip, vflip, angle = (t.to(dev) for t in (rotate, k, hflip, vflip, angle))

    mask_dtype = mask.dtype
    image, mask = image.clone(), mask.float().clone()  # never modify the caller's tensors
    idx = rotate.nonzero().flatten()
    if idx.numel():  # only rotated samples go through grid_sample, the rest stay bit-exact
        image[idx] = rotate_batch(image[idx], angle[idx], "bilinear")
        mask[idx] = rotate_batch(mask[idx], angle[idx], "nearest")
    for kk in range(1, 4):
        idx = (k == kk).nonzero().flatten()
        if idx.numel():
            image[idx] = torch.rot90(image[idx], kk, dims=(2, 3))
            mask[idx] = torch.rot90(mask[idx], kk, dims=(2, 3))
    image = _where(hflip, image.flip(-1), image)
    mask = _where(hflip, mask.flip(-1), mask)
    image = _where(vflip, image.flip(-2), image)
    mask = _where(vflip, mask.flip(-2), mask)
    if return_params:
        params = {"angle": torch.where(rotate, angle, torch.zeros_like(angle)), "k": k,
                  "hflip": hflip, "vflip": vflip}
        return image, mask.to(mask_dtype), params
    return image, mask.to(mask_dtype)


def swap_caption_sides(caption: str, hflip: bool, vflip: bool) -> str:
    """Rewrite a position caption after a flip: left↔right for a horizontal flip, upper↔lower for
    a vertical one ("upper left lung" → "lower right lung" after both). Case is kept."""
    swap = {k: v for k, v in _SIDES.items() if (hflip and k in ("left", "right")) or
            (vflip and k in ("upper", "lower"))}
    if not swap:
        return caption

    def repl(m: re.Match) -> str:
        word = m[0]
        new = swap[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"\b(" + "|".join(swap) + r")\b", repl, caption, flags=re.IGNORECASE)


def augment_training_batch(image: torch.Tensor, mask: torch.Tensor, captions: list[str], mode: str,
                           generator: torch.Generator | None = None):
    """The training augmentation chosen by `mode` (AUGMENT_MODES), captions included.

    "paper": §4.2's rotation within ±20°, k·90° rotations and flips. A flip or a quarter turn moves
        a lesion the caption places ("upper left lung") elsewhere, so for QaTa-style captions the
        text is wrong for most augmented samples, as it was in the paper (and in LViT).
    "text-consistent": rotation within ±20° and both flips, with the caption's left/right and
        upper/lower swapped to match; no quarter turns (they have no caption equivalent).
    "none": unchanged.

    Returns:
        (image (B, C, H, W), mask (B, 1, H, W), captions list[str])
    """
    if mode == "none":
        return image, mask, captions
    if mode == "paper":
        image, mask = augment_batch(image, mask, generator=generator)
        return image, mask, captions
    if mode != "text-consistent":
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {AUGMENT_MODES}")
    image, mask, p = augment_batch(image, mask, generator=generator, rot90=False, return_params=True)
    hflip, vflip = p["hflip"].tolist(), p["vflip"].tolist()
    captions = [swap_caption_sides(c, h, v) for c, h, v in zip(captions, hflip, vflip)]
    return image, mask, captions
