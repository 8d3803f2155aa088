"""What lab.bench times and lab.op_count counts: a preset's model, a synthetic batch with captions, and
train.py's training step with the paper's objective (segmentation_loss + λ·multistage_alignment_loss).

Shape key: B batch, H, W spatial, T text tokens.
"""
from __future__ import annotations

import contextlib

import torch

from tmc.config import get_config
from tmc.engine import compute_loss
from tmc.losses import caption_positive_mask, multistage_alignment_loss, segmentation_loss
from tmc.model import build_model
from tmc.step import TrainStep

ALIGN_WEIGHT = 0.1  # λ of the paper (§4.2)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}
CAPTIONS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle left lung.",
    "Bilateral pulmonary infection, three infected areas, all over the right lung.",
    "No lung infection is visible.",
]


def make_model(preset: str, text_model: str | None = None, image_size: int | None = None):
    """(cfg, model) of a preset; the paper preset gets a random BERT-base-shaped encoder by default."""
    overrides = {"text_model": text_model} if text_model else {}
    if image_size:
        overrides["image_size"] = image_size
    if preset == "paper" and not text_model:
        overrides["text_model"] = "random:12x768"  # BERT-base's shape; no download needed
    cfg = get_config(preset, **overrides)
    return cfg, build_model(cfg)


def make_batch(model, image_size: int, batch: int, device, channels_last: bool = False):
    """Synthetic (image (B,1,H,W), mask (B,1,H,W), tokens {(B,T)}, positive_mask (B,B)) on `device`."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 1, image_size, image_size, generator=g).to(device)
    mask = (torch.rand(batch, 1, image_size, image_size, generator=g) > 0.7).float().to(device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    tokens = {k: v.to(device) for k, v in model.tokenize(captions).items()}
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, mask, tokens, caption_positive_mask(captions, device=device)


def autocast(device: torch.device, amp: str):
    return contextlib.nullcontext() if amp == "off" else torch.autocast(device.type, dtype=DTYPES[amp])


def paper_loss(model, batch, amp: str, form: str) -> torch.Tensor:
    """Forward pass and the paper's objective under autocast, the way training ran before tmc.step: the
    reference its bf16 working weights are compared against (tests)."""
    image, mask, tokens, positive = batch
    with autocast(image.device, amp):
        out = model(image, **tokens)
        align = multistage_alignment_loss(out["alignment"], form, positive, device=image.device)
        return segmentation_loss(out["logits"].float(), mask) + ALIGN_WEIGHT * align


def step_inputs(batch) -> dict:
    """A make_batch tuple as tmc.step.TrainStep's batch dict."""
    image, mask, tokens, positive = batch
    return {"image": image, "mask": mask, **tokens, "positives": positive}


def make_train_step(model, optimizer, scaler, amp: str, form: str, compiled: bool = False) -> TrainStep:
    """train.py's step with the paper's objective, segmentation_loss + λ·multistage_alignment_loss:
    bf16 working weights for --amp bf16 (autocast under torch.compile), autocast for fp16."""
    def loss_fn(out, b):
        return compute_loss(out, b["mask"], b["positives"], "bce", ALIGN_WEIGHT, form)

    precision = {"off": "off", "fp16": "autocast-fp16", "bf16": "autocast-bf16" if compiled else "bf16"}[amp]
    return TrainStep(model, optimizer, loss_fn, precision=precision, scaler=scaler)
