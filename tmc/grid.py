"""The model's input grid: how an (H, W) image in [0, 1] becomes the S × S input the model sees, and
how a predicted S × S mask returns to (H, W). The training cache (datasets/cache.py) and prediction
(tmc/predict.py) both use these, so a model is fed at test time exactly what it was trained on."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


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
