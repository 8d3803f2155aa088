"""One stage of the Multi-stage Cross-attention Module (MCM, paper §3.1), bidirectional:

    F_V^i = MLP(MHCA(V_i, L_i, L_i))        image tokens query the text
    F_L^i = MLP(MHCA(L_i, F_V^i, F_V^i))    text tokens query the *updated* image

This block only maps (V_i, L_i) → (F_V^i, F_L^i). `tmc/model.py` owns the language chain
(BERT runs once; L_i = Linear_i(F_L^{i-1}), or Linear_i(L) of BERT's L (B, T, d_l) up to the first
MCM stage) and the alignment loss, computed on V_i and CLS_i *before* this block (§3.2).

Shape key: B batch, N image tokens (H_i * W_i of the flattened stage map), L text tokens,
C_v = vis_dim, C_l = txt_dim.
"""
from __future__ import annotations

import torch
from torch import nn

from tmc.attention import MultiHeadCrossAttention
from tmc.layers import Mlp, PositionCode, sincos_position_embedding

__all__ = ["Mlp", "MultiStageCrossAttentionBlock", "sincos_position_embedding"]


class MultiStageCrossAttentionBlock(nn.Module):
    """Bidirectional image↔text cross-attention block for one encoder stage (pre-LN, residual).

        v = v + MHCA_v(LN(v), LN(l), LN(l))        # image queries text; padded text keys masked
        v = v + MLP_v(LN(v))                       # → f_v
        l = l + MHCA_l(LN(l), LN(f_v), LN(f_v))    # text queries the updated image; no mask
        l = l + MLP_l(LN(l))                       # → f_l

    A fixed 2D sine-cosine position code (`v_pos`) is added to the image queries of the first
    attention and the image keys of the second, never to values (Swin tokens carry no absolute
    position, yet captions name places). Padded text tokens are updated as queries (their f_l rows
    are meaningless) and must stay masked as keys later; they never influence f_v.

    Args:
        vis_dim: C_v, width of the image tokens (Swin's C_i).
        txt_dim: C_l, width of the stage-specific text tokens L_i.
        num_heads: heads of both attentions; must divide vis_dim and txt_dim.
        mlp_ratio: hidden width of both MLPs as a multiple of their input width.
        zero_init_visual: zero `v_attn.out_proj` and `v_mlp.fc2`, so f_v == v at step 0 and a
            pretrained Swin is undisturbed.
        update_text: False builds the image direction only and returns l as f_l (the last MCM
            stage, whose F_L has no consumer and would get no gradient).
        image_weighting: "softmax" (paper) or "sigmoid" where image tokens query the text.
        grid: (H, W) of this stage's map, for which `pos_code` builds its position code once.
    """

    def __init__(self, vis_dim: int, txt_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, zero_init_visual: bool = True, update_text: bool = True,
                 image_weighting: str = "softmax", grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        for name, dim in (("vis_dim", vis_dim), ("txt_dim", txt_dim)):
            if dim % num_heads:
                raise ValueError(f"{name} {dim} is not divisible by num_heads {num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.pos_code = PositionCode(vis_dim, grid)  # (N, C_v) position code, for the caller's v_pos
        # Image queries text (text→image guidance).
        self.v_norm_q = nn.LayerNorm(vis_dim)
        self.v_norm_kv = nn.LayerNorm(txt_dim)
        self.v_attn = MultiHeadCrossAttention(vis_dim, txt_dim, num_heads, dropout=dropout,
                                              weighting=image_weighting)
        self.v_norm_mlp = nn.LayerNorm(vis_dim)
        self.v_mlp = Mlp(vis_dim, int(vis_dim * mlp_ratio), dropout)
        self.update_text = update_text
        if update_text:
            self._build_text_path(vis_dim, txt_dim, num_heads, mlp_ratio, dropout)
        if zero_init_visual:
            for layer in (self.v_attn.out_proj, self.v_mlp.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _build_text_path(self, vis_dim: int, txt_dim: int, num_heads: int, mlp_ratio: float,
                         dropout: float) -> None:
        # Text queries the updated image (image→text refinement).
        self.l_norm_q = nn.LayerNorm(txt_dim)
        self.l_norm_kv = nn.LayerNorm(vis_dim)
        self.l_attn = MultiHeadCrossAttention(txt_dim, vis_dim, num_heads, dropout=dropout)
        self.l_norm_mlp = nn.LayerNorm(txt_dim)
        self.l_mlp = Mlp(txt_dim, int(txt_dim * mlp_ratio), dropout)

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_padding_mask: torch.Tensor | None = None,
                return_attention: bool = False, v_pos: torch.Tensor | None = None):
        """
        Args:
            v: (B, N, C_v) flattened stage map V_i (`x.flatten(2).transpose(1, 2)` of (B, C, H, W)).
            l: (B, L, C_l) stage-specific text L_i.
            text_padding_mask: optional (B, L) bool, True = padding token, or `KeyPadding`.
            v_pos: optional (N, C_v) or (B, N, C_v) position code of the image tokens.
        Returns:
            f_v (B, N, C_v), f_l (B, L, C_l), and with `return_attention` the head-averaged
            image→text weights (B, N, L) (Fig. 3; reshape to (B, H, W, L) for one map per word).
        """
        B, N, C = v.shape
        if l.shape[0] != B:
            raise ValueError(f"v has batch {B} but l has batch {l.shape[0]}")

        l_kv = self.v_norm_kv(l)  # (B, L, C_l)
        pos = 0 if v_pos is None else v_pos
        res = self.v_attn(self.v_norm_q(v) + pos, l_kv, kv_padding_mask=text_padding_mask,
                          return_weights=return_attention)
        attn, weights = res if return_attention else (res, None)  # (B, N, C_v), (B, N, L)
        v = v + attn
        f_v = v + self.v_mlp(self.v_norm_mlp(v))  # (B, N, C_v)

        if self.update_text:
            l = l + self.l_attn(self.l_norm_q(l), self.l_norm_kv(f_v), k_pos=v_pos)  # (B, L, C_l)
            l = l + self.l_mlp(self.l_norm_mlp(l))  # (B, L, C_l)
        f_l = l

        if return_attention:
            return f_v, f_l, weights
        return f_v, f_l
