"""Checkpoints as plain dicts that hold their own config, written so a crash never corrupts one.

Keys written by train.py in best.pt: "model" (state_dict), "model_config" (dataclasses.asdict),
"text_config" (the BERT architecture, so a checkpoint rebuilds without its hub model), "train_config",
"epoch", "best_metric", "metrics"; last.pt adds what --resume needs: "optimizer", "scheduler", "scaler",
"early_stop", "rng" (and "interrupted" after Ctrl-C).
Everything is tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from tmc.config import ModelConfig


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    """Write `checkpoint` to `path` atomically: a temporary file in the same folder, fsync, rename.

    A crash or Ctrl-C mid-write leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (train.py writes best.pt and last.pt in --out)")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(checkpoint.get("model"), dict):
        checkpoint["model"] = upgrade_state_dict(checkpoint["model"])
    return checkpoint


# Key names of earlier versions → today's: the decoder's ViT MLP was an nn.Sequential (mlp.0, mlp.2)
# before it became tmc.layers.Mlp (mlp.fc1, mlp.fc2). Same tensors, same order.
_RENAMED = (re.compile(r"^((?:_orig_mod\.|module\.)*decoder\.vit\.\d+\.blocks\.\d+\.mlp\.)([02])\."),
            {"0": "fc1", "2": "fc2"})


def upgrade_state_dict(state_dict: dict) -> dict:
    """A state_dict saved by an earlier version, with today's key names (others unchanged)."""
    pattern, names = _RENAMED
    return {pattern.sub(lambda m: f"{m[1]}{names[m[2]]}.", k): v for k, v in state_dict.items()}


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_from_checkpoint(checkpoint: dict | str | Path, map_location="cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights (strict).

    Returns:
        (model in eval mode, ModelConfig)
    """
    from tmc.model import build_model

    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint, map_location)
    cfg = ModelConfig.from_dict(checkpoint["model_config"])
    model = build_model(cfg, load_pretrained=False, text_config=checkpoint.get("text_config"))
    model.load_state_dict(clean_state_dict(checkpoint["model"]), strict=True)
    return model.eval(), cfg
