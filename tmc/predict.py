"""Segment images of any size with a trained model and one caption.

The model sees what the training cache stored: each (H, W) image in [0, 1] resized to S × S
(bilinear, antialiased), quantised to 8 bits. The predicted (S, S) mask is resized back to (H, W),
nearest neighbour. Reading files (PNG, DICOM, NIfTI) is the caller's part (eval.py, datasets/).
"""
from __future__ import annotations

import unicodedata
import warnings

import numpy as np
import torch

from tmc.grid import model_input, resize_mask
from tmc.metrics import THRESHOLD
from tmc.precision import autocast
from tmc.visualize import attention_heatmap


# ---------------------------------------------------------------------------- prediction

def _foreign(word: str) -> bool:
    """A word with a letter outside the Latin script, or a symbol the vocabulary lacks (emoji)."""
    return any((ch.isalpha() and "LATIN" not in unicodedata.name(ch, "")) or unicodedata.category(ch) == "So"
               for ch in word)


def check_caption(text: str, ids: list[int], tokenizer) -> None:
    """Refuse a caption the English text model cannot read (no letter or digit, or no English word);
    warn naming the words it reads as [UNK] or as letters of another script."""
    if not any(ch.isalnum() for ch in text):
        raise ValueError(f"--text {text!r}: no letters or digits; fix: write the caption in words, "
                         f"or leave --text out to segment from the image alone")
    words = text.split()
    foreign = [w for w in words if _foreign(w) or tokenizer.unk_token_id in ids
               and tokenizer.unk_token_id in tokenizer(w, add_special_tokens=False)["input_ids"]]
    if len(foreign) == len(words):
        raise ValueError(f"--text {text!r}: no English word (the text model reads English; other "
                         f"scripts and emoji become [UNK] or stray letters); fix: an English "
                         f"caption, or leave --text out")
    if foreign:
        warnings.warn(f"--text: {len(foreign)} word(s) the English text model cannot read: {foreign}; "
                      f"fix: English words for them", stacklevel=4)


def _forward(model, images: torch.Tensor, tokens: dict, device: torch.device, amp: str,
             attention: bool):
    """(B, 1, S, S) bool masks, and with `attention` MCM's {stage: (B, N_i, L)} weights (else None)."""
    batch = {k: v.expand(images.shape[0], *v.shape[1:]) for k, v in tokens.items()}  # (B, T[, d])
    with autocast(device, amp):
        out = model(images.to(device), **batch, return_attention=attention)
    masks = (torch.sigmoid(out["logits"].float()) > THRESHOLD).cpu()  # (B, 1, S, S)
    return masks, out.get("attention") if attention else None


def _tokens(model, text: str | None, device: torch.device) -> dict:
    """One caption's tokens, (1, T) each; a blank or missing caption is ""."""
    text = (text or "").strip()
    tokens = model.tokenize([text])  # (1, T) each
    if text and model.text is not None:
        check_caption(text, tokens["input_ids"][0].tolist(), model.text.tokenizer)
    return {k: v.to(device) for k, v in tokens.items()}


def make_segmenter(model, text: str | None, device: torch.device, amp: str = "off"):
    """A function (B, 1, S, S) images in [0, 1] → (B, 1, S, S) bool masks for one caption.

    A blank or missing caption is no caption: the text-guided model reads "" ([CLS] [SEP]), which
    it is trained on (train.py --caption-dropout), and segments from the image alone."""
    tokens = _tokens(model, text, device)

    @torch.no_grad()
    def segment(images: torch.Tensor) -> torch.Tensor:
        return _forward(model, images, tokens, device, amp, attention=False)[0]

    return segment


@torch.no_grad()
def explain_image(model, text: str | None, image: np.ndarray, size: int, device: torch.device,
                  amp: str = "off") -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """One image's mask and where each MCM stage's text looked, from one forward pass.

    The mask is `segment_images`' for the same caption (MCM's output does not depend on whether its
    weights are returned).

    Returns:
        mask (H, W) bool at the image's size; the model's input (S, S) float in [0, 1];
        {stage: (S, S) float in [0, 1]} heatmaps (tmc.visualize.attention_heatmap of that stage
        alone), empty for a model without MCM.
    """
    tokens = _tokens(model, text, device)
    x = model_input(image, size)  # (1, 1, S, S)
    masks, attention = _forward(model, x, tokens, device, amp, attention=True)
    heat = {stage: attention_heatmap({stage: a}, tokens.get("attention_mask"), (size, size))[0].numpy()
            for stage, a in sorted((attention or {}).items())}
    return resize_mask(masks[0, 0].numpy(), image.shape), x[0, 0].numpy(), heat


def segment_images(segment, images: list[np.ndarray], size: int, batch_size: int = 8) -> list[np.ndarray]:
    """Masks of (H, W) images in [0, 1] (sizes may differ), each at its image's own size, bool."""
    masks = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pred = segment(torch.cat([model_input(im, size) for im in chunk]))[:, 0].numpy()  # (b, S, S)
        masks += [resize_mask(m, im.shape) for im, m in zip(chunk, pred)]
    return masks
