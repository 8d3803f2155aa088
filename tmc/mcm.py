"""One stage of the Multi-stage Cross-attention Module (MCM, paper §3.1), bidirectional.

The paper's equations for stage i are

    F_V^i = MLP(MHCA(V_i, L_i, L_i))        image tokens query the text
    F_L^i = MLP(MHCA(L_i, F_V^i, F_V^i))    text tokens query the *updated* image

`MultiStageCrossAttentionBlock` implements them as a pre-LayerNorm transformer block with residuals
(the departures are listed, with reasons, in the class docstring).

Our reading of "F_L^i is passed to the next stages of the language encoder": BERT runs once on the
caption and gives L (B, T, d_l). The language stream of MCM is then the chain

    L_first = Linear_first(L),   L_i = Linear_i(F_L^{i-1})  for the later MCM stages,

so the text refined at one stage (F_L) is what the next stage's MCM attends to; BERT itself is not
re-entered. The model assembler (`tmc/model.py`) owns those per-stage Linear projections and the
chain; this block only maps (V_i, L_i) → (F_V^i, F_L^i). Likewise the alignment loss (§3.2) is
computed by the assembler on V_i and CLS_i *before* this block (paper: "before each cross-attention").

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
    """Bidirectional image↔text cross-attention block for one encoder stage.

    Computation (pre-LN, residual):

        v = v + MHCA_v(LN(v), LN(l), LN(l))        # image queries text; padded text keys masked
        v = v + MLP_v(LN(v))                       # → f_v
        l = l + MHCA_l(LN(l), LN(f_v), LN(f_v))    # text queries the updated image; no mask
        l = l + MLP_l(LN(l))                       # → f_l

    Departures from the paper's bare equations, and why:

    0. Position codes. Swin's tokens carry no absolute position (only a relative bias inside each
       window), yet captions name places ("upper left lung"). So, as SAM and DETR do for their
       cross-attention, a fixed 2D sine-cosine code of each token's grid position is added to the
       image side where it meets the text: to the image queries of the first attention and to the
       image keys of the second. Values carry no code, so the residual stream stays Swin's feature.
       On the demo, where the caption alone decides which blobs to segment, TMC could not beat the
       image-only model without it (README, results).

    1. Residual connections. The paper writes F_V = MLP(MHCA(V, L, L)), which would *replace* the
       Swin feature by a function of the text-weighted values only; the result is fed to the next
       Swin stage and to the decoder. Without the residual, the next (pretrained) Swin stage would
       receive a feature unlike anything it was trained on, and the image's own content would reach
       it only through the value path of an attention over ~10 text tokens. With the residual
       the block learns a text-conditioned *correction* of the Swin feature.
    2. Pre-LayerNorms (one per input of each sub-layer): Swin's stage maps and the projected text
       have very different scales; normalising the attention inputs keeps the logits QKᵀ/√d_k in a
       sane range, as in every transformer block (Swin included).
    3. Identity at initialisation (`zero_init_visual=True`, the default): the output projection of
       the image-side attention (`v_attn.out_proj`) and the last layer of the image-side MLP
       (`v_mlp.fc2`) start at zero, so f_v == v exactly at step 0 and a pretrained Swin is
       undisturbed when training starts (the same trick as ControlNet's zero convolutions and DiT's
       adaLN-zero). We chose this over a learnable scalar gate (Flamingo's tanh gate or a small
       LayerScale) because it adds no parameters and no single-scalar bottleneck: the zeroed
       matrices receive gradients at step 0 and every other parameter from step 1 on. The text path
       keeps the default init: at step 0 it still learns from the (unchanged) image tokens.

    4. Optional sigmoid weighting of the image→text attention (`image_weighting="sigmoid"`; the
       paper's softmax is the default). With a softmax an image token spends one unit of attention
       over the words, so attending to a second word ("upper" beside "left") takes weight from the
       first. Demo runs then learned one factor of the caption (sides or levels) and stopped there;
       with sigmoid weights more of them learned both (README, results). The text-side attention
       (a word choosing image tokens) keeps the softmax.

    The text-side attention has no mask: every image token is valid. Padded text tokens are still
    updated as queries (their f_l rows are meaningless) and must stay masked as keys in later
    stages; they never influence f_v, because a padded key gets exactly zero attention weight.

    Args:
        vis_dim: C_v, width of the image tokens (Swin's C_i).
        txt_dim: C_l, width of the stage-specific text tokens L_i.
        num_heads: heads of both attentions; must divide vis_dim and txt_dim.
        mlp_ratio: hidden width of both MLPs as a multiple of their input width.
        dropout: dropout on attention weights and inside the MLPs.
        zero_init_visual: start with f_v == v (see 3. above).
        update_text: False builds the image direction only and returns l unchanged as f_l. The
            model uses it at the last MCM stage, where F_L has no consumer (no later stage, and the
            alignment loss reads CLS_i before cross-attention): its parameters would get no gradient.
        image_weighting: "softmax" or "sigmoid" weights where image tokens query the text (4. above).
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
        self.pos_code = PositionCode(vis_dim, grid)  # (N, C_v) code of 0. above, for the caller's v_pos
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
        """Run one MCM stage.

        Args:
            v: (B, N, C_v) flattened stage map V_i (`x.flatten(2).transpose(1, 2)` of (B, C, H, W)).
            l: (B, L, C_l) stage-specific text L_i.
            text_padding_mask: optional (B, L) bool, True = padding token.
            return_attention: also return the image→text attention weights.
            v_pos: optional (N, C_v) or (B, N, C_v) position code of the image tokens (see 0. above).

        Returns:
            f_v (B, N, C_v), f_l (B, L, C_l), and with `return_attention` the head-averaged weights
            (B, N, L) of each image token over the text tokens (the paper's Fig. 3 heatmaps;
            reshape to (B, H, W, L) to draw one map per word).
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
