"""Training losses of TMC as pure functions (paper §3.2, §3.4); each returns a 0-d tensor.

Total objective (§3.4): L = segmentation_loss(...) + λ · multistage_alignment_loss(...), λ = 0.1.
The per-stage `logit_scale` (log-temperature) and `logit_bias` live in the model and are passed in.

Shape key: B batch, H, W spatial, D alignment embedding width.
"""
from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from tmc.choices import SegLoss
from tmc.config import AlignmentForm

__all__ = [
    "segmentation_loss",
    "soft_dice_loss",
    "sigmoid_alignment_loss",
    "literal_alignment_loss",
    "multistage_alignment_loss",
    "caption_positive_mask",
]

SEGMENTATION_KINDS = typing.get_args(SegLoss)
ALIGNMENT_FORMS = typing.get_args(AlignmentForm)


# ---------------------------------------------------------------------------- segmentation

def _check_seg(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ; "
                         f"fix: pass the (B, 1, H, W) mask at the logits' size")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, per image then batch-averaged.

    logits: (B, 1, H, W) raw scores; target: (B, 1, H, W) in {0, 1} (float).
    loss_b = 1 - (2 Σ p·t + eps) / (Σ p + Σ t + eps); `eps` scores empty-vs-empty 0, not 0/0.
    """
    _check_seg(logits, target)
    p = torch.sigmoid(logits).flatten(1)  # (B, H*W)
    t = target.to(p.dtype).flatten(1)  # (B, H*W)
    inter = (p * t).sum(dim=1)  # (B,)
    denom = p.sum(dim=1) + t.sum(dim=1)  # (B,)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: SegLoss = "bce") -> torch.Tensor:
    """Segmentation loss on raw logits (B, 1, H, W) and a (B, 1, H, W) target in {0, 1}.

    kind: "bce", the paper's pixel-wise BCE (§3.4), stable from logits, mean over B·H·W pixels;
    "bce+dice", that BCE plus `soft_dice_loss` (LViT-family recipe, not the paper's).
    """
    if kind not in SEGMENTATION_KINDS:
        raise ValueError(f"kind must be one of {SEGMENTATION_KINDS}, not {kind!r}")
    _check_seg(logits, target)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    if kind == "bce+dice":
        loss = loss + soft_dice_loss(logits, target)
    return loss


# ---------------------------------------------------------------------------- alignment

def _cosine_matrix(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
        raise ValueError(f"img_emb {tuple(img_emb.shape)} and txt_emb {tuple(txt_emb.shape)} must "
                         f"both be (B, D)")
    both = F.normalize(torch.cat([img_emb, txt_emb]), dim=-1)  # (2B, D): one normalisation, not two
    img, txt = both.split(img_emb.shape[0])  # (B, D) each
    return img @ txt.T  # (B, B)


def sigmoid_alignment_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: torch.Tensor, positive_mask: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """SigLIP-style pairwise logistic alignment loss (the default reading of §3.2).

    logits_ij = cos(img_i, txt_j) · exp(logit_scale) + logit_bias, label_ij = ±1 (positive or not),
    loss = -Σ_ij logsigmoid(label_ij · logits_ij) / B (sum over the B² pairs, over B as SigLIP).

    Args:
        img_emb, txt_emb: (B, D) pooled image and text embeddings (normalised here).
        logit_scale: 0-d, log of the inverse temperature (τ = exp(-logit_scale)).
        positive_mask: optional (B, B) bool, True = positive pair; default the diagonal. Pass
            `caption_positive_mask(captions)` so images with the same caption are not pushed apart.
    """
    B = img_emb.shape[0]
    cos = _cosine_matrix(img_emb, txt_emb)  # (B, B)
    scale = torch.as_tensor(logit_scale, dtype=cos.dtype, device=cos.device)
    bias = torch.as_tensor(logit_bias, dtype=cos.dtype, device=cos.device)
    logits = cos * scale.exp() + bias  # (B, B)
    if positive_mask is None:
        positive_mask = torch.eye(B, dtype=torch.bool, device=logits.device)
    elif positive_mask.shape != (B, B) or positive_mask.dtype != torch.bool:
        raise ValueError(f"positive_mask must be bool of shape {(B, B)}, got "
                         f"{positive_mask.dtype} {tuple(positive_mask.shape)}")
    labels = positive_mask.to(logits.device, logits.dtype) * 2.0 - 1.0  # (B, B), ±1
    return -F.logsigmoid(labels * logits).sum() / B


def literal_alignment_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor,
                           logit_scale: torch.Tensor) -> torch.Tensor:
    """The alignment loss exactly as printed in §3.2, on matched pairs img_emb, txt_emb (B, D).

    z_b = cos(img_b, txt_b) / τ, τ = exp(-logit_scale);
    loss = mean_b [-log σ(z_b) - log(1 - σ(z_b))], smallest at cosine 0: it drives matched
    embeddings to be *orthogonal*, not to align.
    """
    cos = _cosine_matrix(img_emb, txt_emb).diagonal()  # (B,) matched pairs
    z = cos * torch.as_tensor(logit_scale, dtype=cos.dtype, device=cos.device).exp()  # (B,)
    # log(1 - σ(z)) = logsigmoid(-z): stable for large |z|.
    return -(F.logsigmoid(z) + F.logsigmoid(-z)).mean()


def multistage_alignment_loss(stage_outputs: list[dict], form: AlignmentForm = "sigmoid",
                              positive_mask: torch.Tensor | None = None,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Average of the per-stage alignment losses (§3.2: L_align = 1/n Σ_i L_align^i).

    Args:
        stage_outputs: the model's output["alignment"], per stage {"img": (B, D), "txt": (B, D),
            "logit_scale": 0-d, "logit_bias": 0-d}.
        form: "sigmoid" or "literal" (ignores logit_bias and positive_mask).
        device: of the zero returned for an empty list (alignment off; default CPU). That zero
            requires grad, so `seg + λ·align` and `align.backward()` work unchanged.
    """
    if form not in ALIGNMENT_FORMS:
        raise ValueError(f"form must be one of {ALIGNMENT_FORMS}, not {form!r}")
    if not stage_outputs:
        return torch.zeros((), device=device, requires_grad=True)
    total = None
    for i, out in enumerate(stage_outputs):
        missing = {"img", "txt", "logit_scale", "logit_bias"} - set(out)
        if missing:
            raise ValueError(f"alignment stage output {i} lacks keys {sorted(missing)}")
        if form == "sigmoid":
            loss = sigmoid_alignment_loss(out["img"], out["txt"], out["logit_scale"],
                                          out["logit_bias"], positive_mask)
        else:
            loss = literal_alignment_loss(out["img"], out["txt"], out["logit_scale"])
        total = loss if total is None else total + loss
    return total / len(stage_outputs)


def _normalise_caption(text: str) -> str:
    return " ".join(text.lower().split())


def caption_positive_mask(captions: list[str], device: torch.device | str | None = None
                          ) -> torch.Tensor:
    """(B, B) bool `positive_mask`: True where two captions are equal after lower-casing and
    collapsing whitespace (so always on the diagonal)."""
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption {i} is {type(c).__name__}, expected str; fix: generate a "
                             f"caption (datasets/text_from_mask.py) for samples without text")
    keys = [_normalise_caption(c) for c in captions]
    ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    idx = torch.tensor([ids[k] for k in keys], dtype=torch.long, device=device)  # (B,)
    return idx[:, None] == idx[None, :]  # (B, B)
