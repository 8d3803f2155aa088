"""Multi-head cross-attention (paper §3.1): MHCA(Q, K, V) = Softmax(QKᵀ / √d_k) V, per head.

`weighting="sigmoid"` uses σ(QKᵀ / √d_k − log N_k) V instead (Ramapuram et al. 2024, "Theory,
Analysis, and Best Practices for Sigmoid Self-Attention"; −log N_k starts the weights near the
softmax's 1/N_k): each key is weighted on its own, so one query can attend fully to several keys
(e.g. both "upper" and "left"). TMC uses it only where image tokens query the text.

Query and key/value inputs have their own widths (`q_dim`, `kv_dim`), projected to a shared
`embed_dim`, attended with `F.scaled_dot_product_attention`, and projected back to `q_dim`.

Shape key: B batch, Nq query tokens, Nk key/value tokens, nH heads, Dh head dim (embed_dim / nH).

`kv_padding_mask` is (B, Nk) bool with True = padding, as in `nn.MultiheadAttention(key_padding_mask=)`;
from a HuggingFace `attention_mask` (1 = real token) pass `attention_mask == 0`. Several attentions
over the same keys (TMC's MCM stages all read the caption) take it prepared once, as `KeyPadding`.
"""
from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import nn

from tmc.config import MCMAttention

__all__ = ["KeyPadding", "MultiHeadCrossAttention", "WEIGHTINGS", "attend"]

WEIGHTINGS = typing.get_args(MCMAttention)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √Dh + bias) v, then dropout on the weights: F.scaled_dot_product_attention's result.

    q (..., Nq, Dh), k and v (..., Nk, Dh), bias broadcastable to (..., Nq, Nk) → (..., Nq, Dh).
    SDPA runs a fused kernel wherever it has one. On CPU it has none for dropout or for a bias that
    needs a gradient (Swin's relative-position bias), and its fallback upcasts bf16 to fp32 and issues
    about 50 ops with the backward; the same product written out here issues about 12, in the
    inputs' dtype (softmax accumulates in fp32 on every device).
    """
    if q.device.type != "cpu" or (dropout_p == 0.0 and (bias is None or not bias.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1)  # (..., Nq, Nk)
    scores = scores * scale if bias is None else torch.add(bias, scores, alpha=scale)  # one op
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = torch.native_dropout(weights, dropout_p, True)[0]
    return weights @ v  # (..., Nq, Dh)


class KeyPadding(typing.NamedTuple):
    """A (B, Nk) key-padding mask in the form attention adds it: built once per batch, read by every
    attention over those keys (each bool mask would otherwise be turned into this in every call).

    A sample whose keys are *all* padding is unmasked, so its softmax stays finite, and `keep` zeroes
    its output instead."""

    bias: torch.Tensor  # (B, 1, 1, Nk) added to the scores: 0 = attend, -inf = padding
    keep: torch.Tensor  # (B, 1, 1, 1): 0 for a sample whose keys are all padding, else 1

    @classmethod
    def from_mask(cls, padding: torch.Tensor, dtype: torch.dtype) -> KeyPadding:
        """padding: (B, Nk) bool, True = padding; dtype: the attention's working dtype."""
        all_pad = padding.all(dim=1, keepdim=True)  # (B, 1)
        valid = ~padding | all_pad  # (B, Nk), True = attend
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
        return cls(bias[:, None, None, :], (~all_pad).to(dtype)[:, :, None, None])


class MultiHeadCrossAttention(nn.Module):
    """Multi-head scaled dot-product cross-attention with separate q / k / v projections (with bias).

    A sample whose keys are *all* padding gets a zero attention output (rows return `out_proj.bias`)
    and zero weights instead of NaN, so no NaN reaches the gradients.

    Args:
        q_dim: width of the query input (and of the output).
        kv_dim: width of the key/value input.
        num_heads: nH; must divide embed_dim.
        embed_dim: inner width nH * Dh; defaults to q_dim.
        weighting: "softmax" (the paper) or "sigmoid" (see the module docstring).
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int, embed_dim: int | None = None,
                 dropout: float = 0.0, weighting: MCMAttention = "softmax") -> None:
        super().__init__()
        embed_dim = q_dim if embed_dim is None else embed_dim
        if min(q_dim, kv_dim, num_heads, embed_dim) <= 0:
            raise ValueError(f"q_dim, kv_dim, num_heads, embed_dim must be positive, got "
                             f"{q_dim}, {kv_dim}, {num_heads}, {embed_dim}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                             f"fix: choose a head count that divides it")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(q_dim, embed_dim)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, q_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, M, _ = x.shape
        x = x.view(B, M, self.num_heads, self.head_dim)  # (B, M, nH, Dh)
        return x.transpose(1, 2)  # (B, nH, M, Dh)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_padding_mask: torch.Tensor | None = None,
                return_weights: bool = False, k_pos: torch.Tensor | None = None):
        """
        Args:
            q: (B, Nq, q_dim) queries.
            kv: (B, Nk, kv_dim) keys and values.
            kv_padding_mask: optional (B, Nk) bool, True = padding (never attended to), or the same
                prepared as `KeyPadding`.
            k_pos: optional position code added to `kv` for the keys only.
        Returns:
            out (B, Nq, q_dim), and with `return_weights` the head-averaged weights (B, Nq, Nk) before
            dropout (softmax: rows sum to 1; sigmoid: each in (0, 1)); 0 on padded keys.
        """
        B, Nq, _ = q.shape
        Nk = kv.shape[1]
        if kv.shape[0] != B:
            raise ValueError(f"q has batch {B} but kv has batch {kv.shape[0]}")

        padding = kv_padding_mask
        if padding is not None and not isinstance(padding, KeyPadding):
            if padding.dtype != torch.bool or padding.shape != (B, Nk):
                raise ValueError(
                    f"kv_padding_mask must be bool of shape {(B, Nk)} with True = padding, got "
                    f"{padding.dtype} {tuple(padding.shape)}; fix: from a "
                    f"HuggingFace attention_mask pass `attention_mask == 0`")
            padding = KeyPadding.from_mask(padding, q.dtype)
        elif padding is not None and (padding.bias.shape, padding.keep.shape) != ((B, 1, 1, Nk), (B, 1, 1, 1)):
            raise ValueError(f"KeyPadding has bias {tuple(padding.bias.shape)} and keep "
                             f"{tuple(padding.keep.shape)}, expected {(B, 1, 1, Nk)} and {(B, 1, 1, 1)}; "
                             f"fix: build it with KeyPadding.from_mask from this batch's (B, Nk) mask")
        attn_mask = None if padding is None else padding.bias.to(q.dtype)  # (B, 1, 1, Nk), over nH and Nq

        qh = self._split_heads(self.q_proj(q))  # (B, nH, Nq, Dh)
        kh = self._split_heads(self.k_proj(kv if k_pos is None else kv + k_pos))  # (B, nH, Nk, Dh)
        vh = self._split_heads(self.v_proj(kv))  # (B, nH, Nk, Dh)

        drop = self.dropout if self.training else 0.0
        weights = None
        if self.weighting == "softmax":  # fused kernel; weights are rebuilt below only if asked for
            x = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, dropout_p=drop)
        else:
            weights = self._weights(qh, kh, attn_mask)  # (B, nH, Nq, Nk)
            x = F.dropout(weights, drop, training=self.training) @ vh
        # x: (B, nH, Nq, Dh)
        if padding is not None:  # always applied (no `if`): reading all_pad would sync with the host
            x = x * padding.keep
        x = x.transpose(1, 2).reshape(B, Nq, self.embed_dim)  # (B, Nq, nH*Dh)
        out = self.out_proj(x)  # (B, Nq, q_dim)
        if not return_weights:
            return out

        if weights is None:  # explicit weights for inspection (Fig. 3 heatmaps), as SDPA computed them
            weights = self._weights(qh, kh, attn_mask)
        if padding is not None:
            weights = weights * padding.keep
        return out, weights.mean(dim=1)  # (B, Nq, Nk)

    def _weights(self, qh: torch.Tensor, kh: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention weights (B, nH, Nq, Nk) from qh (B, nH, Nq, Dh) and kh (B, nH, Nk, Dh)."""
        scores = (qh @ kh.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, nH, Nq, Nk)
        if attn_mask is not None:
            scores = scores + attn_mask  # -inf on padded keys: weight 0 under softmax and sigmoid
        if self.weighting == "sigmoid":
            return torch.sigmoid(scores - math.log(kh.shape[-2]))
        return scores.softmax(dim=-1)
