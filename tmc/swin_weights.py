"""Load Swin weights saved under any of the common key schemes into `tmc.swin.SwinTransformer`.

Schemes (see style.md §5.1; our model uses the official names):
- "official": microsoft/Swin-Transformer `.pth` (state dict nested under 'model').
- "timm": same names, but the patch merging sits at the START of the next stage
  (`layers.{I+1}.downsample`), head at `head.fc`.
- "transformers5": transformers 5.x `SwinModel` (`embeddings.patch_embeddings.projection`,
  `encoder.layers.I.blocks.J.attention.{q,k,v,o}_proj`, `...relative_position_bias.
  relative_position_bias_table`, `layernorm_before/after`, `mlp.fc1/fc2`, `layernorm`).
- "transformers4": transformers 4.x / Hub files (`attention.self.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`).
Any prefix (`swin.`, `module.`, `backbone.`, a whole-model checkpoint's encoder name) is found from
where the patch-embedding weight sits.

The mapping is built from our model's own state-dict keys (one source name, or three for q/k/v
that are concatenated into qkv), so it follows the model's actual depth/stage layout; every scheme
is tried and the one that explains the most of our keys wins. Derived buffers
(`relative_position_index`, `attn_mask`) and classifier heads are dropped; shapes are checked
before anything is copied.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

SCHEMES = ("official", "timm", "transformers5", "transformers4")
DERIVED = ("relative_position_index", "attn_mask")  # rebuilt by the model, never loaded
HEADS = ("head.", "classifier.", "pooler.")  # classification parts a backbone does not have

# our block sub-module -> transformers name (longest match first; q/k/v handled apart)
_HF_BLOCK = {
    "transformers5": {
        "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
        "attn.proj": "attention.o_proj",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "transformers4": {
        "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
        "attn.proj": "attention.output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}
_HF_QKV = {"transformers5": ("q_proj", "k_proj", "v_proj"),
           "transformers4": ("self.query", "self.key", "self.value")}


def source_keys(key: str, scheme: str) -> tuple[str, ...] | None:
    """Names, in `scheme`, of the tensors that make our (official-named) `key`.

    Several names are concatenated along dim 0 (q, k, v -> qkv). None: the scheme has no such key.
    """
    p = key.split(".")
    if scheme == "official":
        return (key,)
    if scheme == "timm":
        if p[0] == "layers" and p[2] == "downsample":
            return (".".join(["layers", str(int(p[1]) + 1), *p[2:]]),)
        return (key,)
    if scheme not in _HF_BLOCK:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if p[0] == "patch_embed":
        return (f"embeddings.{'patch_embeddings.projection' if p[1] == 'proj' else 'norm'}.{p[2]}",)
    if p[0] == "norm":
        return (f"layernorm.{p[1]}",)
    if p[0] != "layers":
        return None
    if p[2] == "downsample":
        return (f"encoder.{key}",)
    prefix, name = f"encoder.layers.{p[1]}.blocks.{p[3]}.attention.", ".".join(p[4:])
    if name in ("attn.qkv.weight", "attn.qkv.bias"):
        return tuple(f"{prefix}{qkv}.{p[-1]}" for qkv in _HF_QKV[scheme])
    prefix = prefix[: -len("attention.")]
    for ours, theirs in _HF_BLOCK[scheme].items():
        if name == ours or name.startswith(ours + "."):
            return (prefix + theirs + name[len(ours):],)
    return None


def _read(source) -> tuple[dict, str]:
    """A state dict of tensors and a name for messages, from a path or a (nested) dict."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if path.is_dir():  # a transformers snapshot folder
            files = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()]
            if not files:
                raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin inside; "
                                 "fix: pass the weight file itself")
            path = files[0]
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such Swin weight file; "
                                    "fix: check the path (ModelConfig.swin_weights)")
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickled objects besides tensors (e.g. a yacs config)
                raise ValueError(f"{path}: cannot be read with weights_only=True ({type(e).__name__}); fix: "
                                 "re-save only its state dict: torch.save(ckpt['model'], 'weights.pth')") from e
    else:
        obj, name = source, "<state dict>"
    for nest in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, name


def _prefixes(sd: dict, anchor: str) -> list[str]:
    """Prefixes under which `anchor` (the patch-embedding weight) occurs in sd."""
    found = [k[: -len(anchor)] for k in sd if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return sorted(set(found), key=len) or [""]


def _plan(sd: dict, targets: list[str], scheme: str, prefix: str) -> dict[str, tuple[str, ...]]:
    """Our keys whose every source tensor is in sd: {our key: source names}."""
    plan = {}
    for t in targets:
        names = source_keys(t, scheme)
        if names and all(prefix + n in sd for n in names):
            plan[t] = tuple(prefix + n for n in names)
    return plan


def load_swin_weights(model: nn.Module, source, verbose: bool = True) -> dict:
    """Copy Swin weights into `model` (a `tmc.swin.SwinTransformer`), whatever the key scheme.

    Args:
        model: the encoder to fill (official parameter names).
        source: path to a .pth/.bin/.safetensors file (or a transformers folder), or a state dict;
            a dict nested under 'model' or 'state_dict' is unwrapped.
        verbose: print a one-line summary.
    Returns:
        {"scheme", "source", "loaded", "missing", "unexpected", "dropped"}: `loaded`/`missing` are
        our keys, `unexpected` the source keys that were neither used nor derived/head,
        `dropped` the derived buffers, heads and keys outside the encoder's prefix.
    Raises:
        ValueError naming the source when no scheme matches, or when shapes disagree.
    """
    sd, name = _read(source)
    own = model.state_dict()
    targets = list(own)
    best = None
    for scheme in SCHEMES:  # ties keep the earlier scheme
        for prefix in _prefixes(sd, source_keys("patch_embed.proj.weight", scheme)[0]):
            plan = _plan(sd, targets, scheme, prefix)
            if best is None or len(plan) > len(best[2]):
                best = (scheme, prefix, plan)
    scheme, prefix, plan = best
    if not plan:
        raise ValueError(f"{name}: no Swin weights recognised (tried schemes {', '.join(SCHEMES)}); first keys: "
                         f"{list(sd)[:5]}; fix: pass an official, timm or transformers Swin checkpoint")

    new, bad = {}, []
    for t, names in plan.items():
        tensor = torch.cat([sd[n] for n in names], dim=0) if len(names) > 1 else sd[names[0]]
        if tensor.shape != own[t].shape:
            bad.append(f"{names[0]} {tuple(tensor.shape)} vs model {t} {tuple(own[t].shape)}")
        new[t] = tensor
    if bad:
        raise ValueError(f"{name}: {len(bad)} tensors ({scheme} scheme) do not fit this model, e.g. "
                         f"{'; '.join(bad[:3])}; fix: build SwinTransformer with the checkpoint's embed_dim, "
                         "depths, num_heads and window_size")

    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # plan keys come from the model itself
    used = {n for names in plan.values() for n in names}
    rest = [k for k in sd if k not in used]
    drop = {k for k in rest if not k.startswith(prefix) or k.rsplit(".", 1)[-1] in DERIVED
            or k[len(prefix):].startswith(HEADS)}
    report = {
        "scheme": scheme,
        "source": name,
        "loaded": list(plan),
        "missing": [t for t in targets if t not in plan],
        "unexpected": [k for k in rest if k not in drop],
        "dropped": [k for k in rest if k in drop],
    }
    if verbose:
        print(f"load_swin_weights: {name}: {scheme} scheme{f' (prefix {prefix!r})' if prefix else ''}, loaded "
              f"{len(plan)}/{len(targets)}, missing {len(report['missing'])}, unexpected "
              f"{len(report['unexpected'])}, dropped {len(drop)} (derived buffers/head)")
    return report
