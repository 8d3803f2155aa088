"""Segment images of any size with a trained model and one caption.

The model sees what the training cache stored: each (H, W) image in [0, 1] resized to S × S
(bilinear, antialiased), quantised to 8 bits. The predicted (S, S) mask is resized back to (H, W),
nearest neighbour. Reading files (PNG, DICOM, NIfTI) is the caller's part (eval.py, datasets/).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tmc.engine import autocast
from tmc.metrics import THRESHOLD


# ---------------------------------------------------------------------------- the input grid

def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float32 [0, 1] → (S, S) float32 [0, 1], bilinear with antialiasing."""
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    out = Image.fromarray(image.astype(np.float32, copy=False)).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(out), 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) bool → (S, S) (or `size` = (H', W')) bool, nearest neighbour."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if mask.shape == shape:
        return mask.astype(bool, copy=False)
    out = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(out) > 127


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) float [0, 1] → (H, W) uint8 0..255, rounded."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) float [0, 1] → (1, 1, S, S) float [0, 1], exactly as the cache stores images."""
    return torch.from_numpy(to_uint8(resize_image(image, size)).astype(np.float32) / 255.0)[None, None]


# ---------------------------------------------------------------------------- prediction

def make_segmenter(model, text: str | None, device: torch.device, amp: str = "off"):
    """A function (B, 1, S, S) images in [0, 1] → (B, 1, S, S) bool masks for one caption.

    A blank or missing caption is no caption: the text-guided model reads "" ([CLS] [SEP]), which
    it is trained on (train.py --caption-dropout), and segments from the image alone."""
    text = (text or "").strip()
    tokens = {k: v.to(device) for k, v in model.tokenize([text]).items()}  # (1, T) each

    @torch.no_grad()
    def segment(images: torch.Tensor) -> torch.Tensor:
        batch = {k: v.expand(images.shape[0], *v.shape[1:]) for k, v in tokens.items()}  # (B, T[, d])
        with autocast(device, amp):
            logits = model(images.to(device), **batch)["logits"]  # (B, 1, S, S)
        return (torch.sigmoid(logits.float()) > THRESHOLD).cpu()

    return segment


def segment_images(segment, images: list[np.ndarray], size: int, batch_size: int = 8) -> list[np.ndarray]:
    """Masks of (H, W) images in [0, 1] (sizes may differ), each at its image's own size, bool."""
    masks = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pred = segment(torch.cat([model_input(im, size) for im in chunk]))[:, 0].numpy()  # (b, S, S)
        masks += [resize_mask(m, im.shape) for im, m in zip(chunk, pred)]
    return masks
