"""Pictures of predictions: contour overlays, text→image attention heatmaps (paper Fig. 3), mosaics.

PIL and NumPy only. Images are (H, W) floats in [0, 1] (grayscale) or (H, W, 3) uint8; masks are
(H, W) bool.

Shape key: B batch, N image tokens of one stage (H_i * W_i), L text tokens, H, W image size.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

GT_COLOR = (0, 255, 0)  # ground truth: green
PRED_COLOR = (255, 0, 255)  # prediction: magenta (tells apart from green for most colour vision)

# A perceptually ordered dark-blue → cyan → yellow → red ramp (anchors of a "turbo"-like map).
_RAMP = np.array([
    (0.00, 48, 18, 59), (0.15, 65, 105, 225), (0.35, 30, 200, 220), (0.50, 90, 240, 120),
    (0.65, 220, 230, 50), (0.80, 250, 140, 30), (1.00, 170, 20, 10),
], dtype=np.float64)


# ---------------------------------------------------------------------------- helpers

def _numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy() if x.dtype != torch.bool else x.detach().cpu().numpy()
    return np.asarray(x)


def to_rgb(image) -> np.ndarray:
    """(H, W) / (1, H, W) / (3, H, W) float in [0, 1], or (H, W, 3) uint8 → (H, W, 3) uint8."""
    a = _numpy(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        return a
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (H, W, 1 or 3)
    if a.ndim == 2:
        a = a[..., None]  # (H, W, 1)
    a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a  # (H, W, 3)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def outline(mask, width: int = 1, outer: bool = False) -> np.ndarray:
    """Boundary ring of a binary mask, `width` pixels thick (4-neighbour erosion/dilation).

    Inner ring (default): mask pixels next to the background. Outer ring: background pixels next
    to the mask. Drawing the ground truth outside and the prediction inside keeps both visible
    where they coincide.
    """
    m = _numpy(mask).astype(bool).squeeze()
    grown = ~m if not outer else m.copy()
    for _ in range(width):  # erode the mask = dilate the background
        p = np.pad(grown, 1, constant_values=not outer)
        grown = grown | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m & grown if not outer else grown & ~m


def colormap(values) -> np.ndarray:
    """(H, W) floats in [0, 1] → (H, W, 3) uint8 on the ramp above."""
    v = np.clip(_numpy(values).astype(np.float64), 0.0, 1.0)
    channels = [np.interp(v, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)]
    return (np.stack(channels, axis=-1) + 0.5).astype(np.uint8)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Min-max each map of (B, ...) to [0, 1] (a flat map becomes 0)."""
    flat = x.flatten(1)  # (B, rest)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


# ---------------------------------------------------------------------------- drawings

def overlay_contours(image, gt=None, pred=None, width: int = 1, scale: int = 1) -> Image.Image:
    """The image with ground-truth (green, just outside) and predicted (magenta, just inside) contours.

    Args:
        image: (H, W) float in [0, 1] or (H, W, 3) uint8.
        gt, pred: (H, W) bool masks or None.
        scale: nearest-neighbour magnification (small demo images), applied before drawing so the
            contour stays `width` pixels thin.
    """
    rgb = to_rgb(image)
    if scale > 1:
        rgb = rgb.repeat(scale, 0).repeat(scale, 1)
    for mask, color, outer in ((gt, GT_COLOR, True), (pred, PRED_COLOR, False)):
        if mask is None:
            continue
        m = _numpy(mask).astype(bool).squeeze()
        if scale > 1:
            m = m.repeat(scale, 0).repeat(scale, 1)
        rgb[outline(m, width, outer=outer)] = color
    return Image.fromarray(rgb)


def heatmap_overlay(image, heat, alpha: float = 0.5, scale: int = 1) -> Image.Image:
    """Blend a [0, 1] heatmap (H, W) in colour over the grayscale image (H, W)."""
    rgb = to_rgb(image).astype(np.float64)
    color = colormap(heat).astype(np.float64)
    out = Image.fromarray(((1 - alpha) * rgb + alpha * color + 0.5).astype(np.uint8))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    return out


def attention_heatmap(attention: dict, attention_mask: torch.Tensor | None,
                      size: tuple[int, int]) -> torch.Tensor:
    """Where the text looks in the image: the paper's Fig. 3 heatmap from MCM's attention.

    MCM's rows sum to 1 over L, so a plain mean would be flat: each word's column is normalised over
    the image, real tokens' columns are averaged, and each stage is min-max scaled, upsampled
    bilinearly and averaged over stages.

    Args:
        attention: {stage: (B, N_i, L)} from `model(..., return_attention=True)["attention"]`.
        attention_mask: (B, L) 1 for real tokens, 0 for padding (from `model.tokenize`), or None.
        size: (H, W) of the image.

    Returns:
        (B, H, W) float in [0, 1]; zeros when there is no MCM stage.
    """
    H, W = size
    maps = []
    for stage in sorted(attention):
        a = attention[stage].float()  # (B, N, L)
        B, N, L = a.shape
        keep = (torch.ones(B, L, device=a.device) if attention_mask is None
                else attention_mask.to(a.device).float())  # (B, L)
        per_token = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, N, L) columns sum to 1
        heat = (per_token * keep[:, None, :]).sum(-1) / keep.sum(-1, keepdim=True).clamp_min(1)  # (B, N)
        h = max(1, round(math.sqrt(N * H / W)))
        w = N // h
        if h * w != N:
            raise ValueError(f"stage {stage}: {N} tokens do not form a grid with the image's "
                             f"aspect {H}x{W}")
        heat = heat.view(B, 1, h, w)  # (B, 1, h, w)
        heat = F.interpolate(_normalize(heat), size=(H, W), mode="bilinear", align_corners=False)
        maps.append(heat[:, 0])  # (B, H, W)
    if not maps:
        raise ValueError("no attention maps: the model has no MCM stage (--mcm-stages none / --no-text)")
    return _normalize(torch.stack(maps).mean(0))  # (B, H, W)


# ---------------------------------------------------------------------------- layouts

def side_by_side(images: list[Image.Image], labels: list[str] | None = None, gap: int = 4
                 ) -> Image.Image:
    """Panels left to right on a black background, each with an optional caption at the top-left."""
    h = max(im.height for im in images)
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for k, im in enumerate(images):
        canvas.paste(im.convert("RGB"), (x, 0))
        if labels and labels[k]:
            draw.text((x + 3, 2), labels[k], fill=(255, 255, 255))
        x += im.width + gap
    return canvas


def mosaic(images: list[Image.Image], ncols: int = 4, gap: int = 4) -> Image.Image:
    """A grid of images (rows of `ncols`), cells sized to the largest image."""
    if not images:
        raise ValueError("mosaic of no images")
    cw, ch = max(im.width for im in images), max(im.height for im in images)
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    canvas = Image.new("RGB", (ncols * cw + (ncols - 1) * gap, nrows * ch + (nrows - 1) * gap))
    for k, im in enumerate(images):
        r, c = divmod(k, ncols)
        canvas.paste(im.convert("RGB"), (c * (cw + gap), r * (ch + gap)))
    return canvas


def prediction_panel(image, gt, pred, heat=None, caption: str = "", scale: int = 1) -> Image.Image:
    """One evaluation picture: image | contours (GT green, prediction magenta) | attention heatmap.

    Args:
        image: (H, W) float in [0, 1]; gt, pred: (H, W) bool; heat: (H, W) in [0, 1] or None.
        caption: the text prompt, written under the panels.
    """
    panels = [overlay_contours(image, scale=scale), overlay_contours(image, gt, pred, scale=scale)]
    labels = ["image", "gt / pred"]
    if heat is not None:
        panels.append(heatmap_overlay(image, heat, scale=scale))
        labels.append("text attention")
    row = side_by_side(panels, labels)
    if not caption:
        return row
    canvas = Image.new("RGB", (row.width, row.height + 14))
    canvas.paste(row, (0, 0))
    text = caption[: max(20, row.width // 6)]  # about what fits in PIL's default 6-pixel font
    ImageDraw.Draw(canvas).text((3, row.height + 1), text, fill=(255, 255, 255))
    return canvas


class OverlayWriter:
    """Collects evaluation pictures (image | GT and predicted contours | text attention heatmap)."""

    def __init__(self, folder: Path, model, limit: int, mosaic_size: int = 8):
        """Call it with each evaluated batch; `finish()` writes mosaic.png of the first pictures."""
        self.folder, self.model, self.limit, self.mosaic_size = folder, model, limit, mosaic_size
        self.panels, self.written = [], 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch, out, prob, pred):
        n = prob.shape[0]
        take = n if self.limit <= 0 else min(n, self.limit - self.written)
        if take <= 0:
            return
        H, W = prob.shape[-2:]
        heat = None
        if out.get("attention"):
            mask = self.model.tokenize(list(batch["text"][:take])).get("attention_mask")  # (b, T)
            heat = attention_heatmap({k: v[:take] for k, v in out["attention"].items()}, mask, (H, W))
        scale = max(1, 224 // H)
        for i in range(take):
            panel = prediction_panel(batch["image"][i, 0], batch["mask"][i, 0] > 0.5, pred[i, 0],
                                     None if heat is None else heat[i], caption=batch["text"][i],
                                     scale=scale)
            name = re.sub(r"[^A-Za-z0-9_.#-]+", "_", str(batch["key"][i]))
            panel.save(self.folder / f"{name}.png")
            self.written += 1
            if len(self.panels) < self.mosaic_size:
                self.panels.append(panel)

    def finish(self) -> Path | None:
        if not self.panels:
            return None
        path = self.folder / "mosaic.png"
        mosaic(self.panels, ncols=2).save(path)
        return path
