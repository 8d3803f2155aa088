"""Checkpoints as plain dicts that hold their own config, written so a crash never corrupts one.

Keys of best.pt (`weights_checkpoint`, below): "model" (state_dict), "model_config" (dataclasses.asdict),
"text_config" (the BERT architecture, so a checkpoint rebuilds without its hub model), "train_config",
"epoch", "best_metric", "metrics". last.pt (`training_checkpoint`) adds what --resume needs:
"optimizer", "scheduler", "scaler", "early_stop", "rng" (and "interrupted" after Ctrl-C).
Everything is tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from tmc.config import ModelConfig
from tmc.model import build_model
from tmc.text import FusedSelfAttention

MODEL_KEYS = ("model", "model_config")  # what rebuilding a model needs


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message names it and the fix."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, read-only folder); the file at the path
    is left as it was. The message names it and the fix."""


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch's writer turns the file's ENOSPC into a RuntimeError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphan_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of `save_checkpoint` whose writer has died (kill -9 mid-save).

    A temporary is `.<name>.<pid>.<random>.tmp`; one of a live process is kept, as is anything else.
    Returns the deleted paths.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = re.fullmatch(r"\..+?\.pt\.(?:(\d+)\.)?[^.]+\.tmp", p.name)
        if m and p.is_file() and not (m.group(1) and _pid_alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_checkpoint(path: str | Path, checkpoint: dict) -> Path:
    """Write `checkpoint` to `path` atomically: a temporary file in the same folder, fsync, rename.

    A crash or Ctrl-C mid-write leaves the previous file at `path` untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets `remove_orphan_temporaries` tell a dead writer's file from a live one.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            why, fix = "the disk is full", f"free space in {path.parent}"
        else:
            why, fix = f"cannot write there ({cause.strerror or cause})", "a folder you can write"
        error = CheckpointWriteError(f"{path}: {why}; {kept}; fix: {fix}")
        error.errno = cause.errno
        raise error from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    require: tuple[str, ...] = ()) -> dict:
    """The checkpoint dict at `path`, read with weights_only=True; `require`: keys it must hold.

    Raises CheckpointError (naming the file, what it is not, and the fix) for a missing, empty,
    truncated or foreign file.
    """
    path = Path(path)
    fix = "fix: pass a best.pt or last.pt that train.py wrote (in its --out folder)"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a checkpoint (a copy or save that did not "
                              f"finish?); {fix}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        # torch's own message would advise an unsafe load: name the problem instead.
        what = ("not a complete PyTorch file: cut short, or another kind of file"
                if not zipfile.is_zipfile(path) else
                f"a PyTorch file holding more than tensors and plain values ({type(e).__name__})")
        raise CheckpointError(f"{path}: not a TMC checkpoint ({what}); {fix}; a file cut short by "
                              f"a copy: copy it again") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a TMC checkpoint dict; "
                              f"{fix}")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: a dict without {missing} (keys: {sorted(ckpt)[:8]}), not a "
                              f"TMC checkpoint; {fix}")
    if isinstance(ckpt.get("model"), dict):
        ckpt["model"] = upgrade_state_dict(ckpt["model"])
    return ckpt


# Key names of earlier versions → today's: the decoder's ViT MLP was an nn.Sequential (mlp.0, mlp.2)
# before it became tmc.layers.Mlp (mlp.fc1, mlp.fc2). Same tensors, same order.
_RENAMED = (re.compile(r"^((?:_orig_mod\.|module\.)*decoder\.vit\.\d+\.blocks\.\d+\.mlp\.)([02])\."),
            {"0": "fc1", "2": "fc2"})


def upgrade_state_dict(state_dict: dict) -> dict:
    """A state_dict saved by an earlier version, with today's key names (others unchanged)."""
    pattern, names = _RENAMED
    return {pattern.sub(lambda m: f"{m[1]}{names[m[2]]}.", k): v for k, v in state_dict.items()}


def upgrade_optimizer_state(state: dict, saved_model_keys, optimizer, model) -> dict:
    """Adam's state_dict saved while each BERT self-attention held query, key and value as three
    Linears (their keys in `saved_model_keys`), renumbered for `optimizer` over today's `model`, where
    FusedSelfAttention joins them: the moments are joined as its weights are. Other states unchanged."""
    joined_names = FusedSelfAttention.JOINED  # query, key, value
    if not any(k.endswith(f"attention.self.{joined_names[0]}.weight") for k in saved_model_keys):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    new_names = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    old_names = []  # the order the saving optimizer numbered them in: query, key, value, weight then bias
    for name in new_names:
        prefix, _, leaf = name.rpartition(".attention.self.")
        if leaf == "qkv.weight":
            old_names += [f"{prefix}.attention.self.{p}.{k}" for p in joined_names
                          for k in ("weight", "bias")]
        elif leaf != "qkv.bias":
            old_names.append(name)
    if sum(len(g["params"]) for g in state["param_groups"]) != len(old_names):
        return state  # another model: load_state_dict names the mismatch
    old_index = {name: i for i, name in enumerate(old_names)}
    joined = {}
    for i, name in enumerate(new_names):
        prefix, _, leaf = name.rpartition(".attention.self.")
        if leaf in ("qkv.weight", "qkv.bias"):  # its three, as FusedSelfAttention joins its weights
            kind = leaf.removeprefix("qkv.")
            parts = [f"{prefix}.attention.self.{p}.{kind}" for p in joined_names]
        else:
            parts = [name]
        saved = [state["state"][old_index[p]] for p in parts if old_index[p] in state["state"]]
        if saved:  # "step" is one 0-d tensor per parameter; the moments are joined along dim 0
            joined[i] = {k: torch.cat([s[k] for s in saved]) if v.ndim else v for k, v in saved[0].items()}
    groups, start = [], 0
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
        groups.append({**saved_group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": joined, "param_groups": groups}


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
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint, map_location, require=MODEL_KEYS)
    cfg = ModelConfig.from_dict(checkpoint["model_config"])
    model = build_model(cfg, load_pretrained=False, text_config=checkpoint.get("text_config"))
    model.load_state_dict(clean_state_dict(checkpoint["model"]), strict=True)
    return model.eval(), cfg


# ---------------------------------------------------------------------------- building

def text_config_of(model) -> dict | None:
    """The text encoder's architecture as plain JSON values (so a checkpoint rebuilds offline)."""
    if model.text is None:
        return None
    return json.loads(model.text.encoder.config.to_json_string())


def weights_checkpoint(model, model_cfg, cfg, epoch: int, early: dict, metrics: dict) -> dict:
    """best.pt: what eval.py and inference need (weights and configs), without the optimizer state,
    which is twice the weights under Adam and only resuming needs (from last.pt)."""
    return {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "text_config": text_config_of(model),
        "train_config": dataclasses.asdict(cfg),
        "epoch": epoch,
        "best_metric": early["best"],
        "metrics": metrics,
    }


def training_checkpoint(model, model_cfg, cfg, epoch, optimizer, scheduler, scaler, early, rng, metrics,
                        interrupted=False) -> dict:
    """last.pt, the contract's plain dict (weights_only-loadable); `rng` has one state per rank."""
    return {
        **weights_checkpoint(model, model_cfg, cfg, epoch, early, metrics),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "early_stop": dict(early),
        "rng": rng,
        "interrupted": interrupted,
    }
