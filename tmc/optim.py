"""The optimizer and the learning-rate schedule of a training run (paper §4.2: Adam, ReduceLROnPlateau
on validation Dice; a cosine for fixed budgets)."""
from __future__ import annotations

import math
import time

import torch

from tmc.train_config import TrainConfig


def parameter_groups(model, cfg: TrainConfig) -> list[dict]:
    """Adam's parameter groups: everything at cfg.lr, the text encoder at cfg.text_lr when set.

    The main group comes first, so `param_groups[0]["lr"]` is the lr that the log reports.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not cfg.text_lr or model.text is None:
        return [{"params": trainable}]
    text_ids = {id(p) for p in model.text.parameters()}
    text = [p for p in trainable if id(p) in text_ids]  # empty when the encoder is frozen
    groups = [{"params": [p for p in trainable if id(p) not in text_ids]}]
    return groups + [{"params": text, "lr": cfg.text_lr}] if text else groups


def make_scheduler(optimizer, cfg: TrainConfig, start: float | None = None):
    """The paper's ReduceLROnPlateau on validation Dice, or a cosine decay from lr to min_lr over
    cfg.epochs, stepped once per epoch (a known budget: the lr reaches its floor as the run ends).
    "cosine-time" decays over the share of cfg.time_limit used since `start` (time.time()), for a
    wall-clock budget, where the number of epochs that fit is not known in advance."""
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            min_lr=cfg.min_lr)
    if cfg.lr_schedule == "cosine-time":
        start = time.time() if start is None else start

        def factor(base_lr: float):  # LambdaLR multiplies each group's own lr by it
            floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
            return lambda _: floor + (1 - floor) * 0.5 * (1 + math.cos(
                math.pi * min(1.0, (time.time() - start) / (60 * cfg.time_limit))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 [factor(g["lr"]) for g in optimizer.param_groups])
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over `parameter_groups`; fused (one kernel for all tensors) on CPU and CUDA."""
    return torch.optim.Adam(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cuda", "cpu"))


def step_scheduler(scheduler, cfg: TrainConfig, val_dice: float) -> None:
    """Once per epoch, after validation: the plateau schedule reads validation Dice, the others not."""
    if cfg.lr_schedule == "plateau":
        scheduler.step(val_dice)
    else:
        scheduler.step()
