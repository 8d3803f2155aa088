"""Dual CNN/ViT U-decoder (paper §3.3): the image and MCM's features F_V^i → mask logits.

    image ─ stem: full-res ConvBlock S_0 ─ half-res ConvBlock S_½ ─ ConvBlock/2 ─ X_1      (CNN branch)
    image ─ patch embedding (conv k=4, s=4) ─ Y_1                                          (ViT branch)
    stage i = 1..n-1:  X_{i+1} = DownCNN_i(cat(X_i, F_V^i))          (ConvBlock, stride 2)
                       Ŷ_i = ViTStage_i(cat(Y_i, F_V^i)),  Y_{i+1} = Merge_i(Ŷ_i)   (DownViT_i)
                       skip_i = SkipFusion_i(cat(X_i, Ŷ_i))           (ViT fused into the CNN path)
    stage n:           Ŷ_n = ViTStage_n(cat(Y_n, F_V^n)),  Z_n = Bottleneck(cat(X_n, Ŷ_n, F_V^n)),
                       skip_n = X_n
    i = n..1:          Z_{i-1} = UpCNN_i(cat(Z_i, F_V^i, skip_i))     (ConvBlock, then ×2 up-conv)
    then               Z at H/2 = UpBlock(cat(Z_0, S_½)),  Z at H = ConvBlock(cat(·, S_0)),  1×1 conv → logit

Stage i (1-based) is at Swin's H/2**(i+1) × W/2**(i+1) with C_i channels, so H, W must divide by
2**(n+1). CNN parts are NCHW with BatchNorm, ViT parts (B, H, W, C); the permutes between them are
free in channels_last memory. The convolutions at H and H/2 (the stem and the last two up blocks)
run channels_last whatever the model's layout: on their few channels oneDNN's NHWC kernels train
faster than NCHW ones on CPU, where the deep maps are faster left NCHW.

Shape key: B batch, C channels, H, W spatial (of the map at hand), N image tokens, nH heads,
Dh head dim, nW windows, ws window size (wh × ww when clipped to a small map), T = wh*ww tokens
per window, s stem channels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tmc.layers import Mlp, from_window_heads, to_window_heads

__all__ = ["ConvBlock", "DecoderWindowAttention", "ViTBlock", "ViTStage", "UpBlock", "DualUDecoder"]


# --------------------------------------------------------------------------- helpers


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """nn.BatchNorm2d without the step counter it keeps for momentum=None: with momentum 0.1 the count
    is never read, and keeping it costs one op per layer in every training step. A state dict that
    holds the counter (earlier versions) still loads."""
    bn = nn.BatchNorm2d(channels)
    bn.register_buffer("num_batches_tracked", None)
    bn.register_load_state_dict_pre_hook(_drop_step_counter)
    return bn


def _drop_step_counter(module, state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "num_batches_tracked", None)  # saved, or added by BatchNorm's own loader


def conv_norm_act(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) → BatchNorm → ReLU; 'same' padding, optional stride."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        batch_norm(out_ch),
        nn.ReLU(inplace=True),
    )


def window_shape(H: int, W: int, window: int) -> tuple[int, int]:
    """Window (wh, ww) used on an H × W map: `window` clipped to the map; 0 means global."""
    if window == 0:
        return H, W
    return min(window, H), min(window, W)


# --------------------------------------------------------------------------- blocks


class ConvBlock(nn.Sequential):
    """U-Net double conv: two conv3x3-BN-ReLU, the first with `stride` (2 halves H, W).
    (B, in_ch, H, W) → (B, out_ch, H/stride, W/stride)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__(conv_norm_act(in_ch, out_ch, 3, stride), conv_norm_act(out_ch, out_ch, 3, 1))


class DecoderWindowAttention(nn.Module):
    """Multi-head self-attention in non-overlapping windows, all windows in one SDPA call.

    The map is padded right/bottom to whole windows and padded keys are masked (= attention in border
    windows clipped to the map); without padding no mask is built, keeping SDPA's fastest kernels.
    `window` is ws; a map no larger than it, or window=0, gets global attention.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DecoderWindowAttention: dim {dim} is not divisible by num_heads {num_heads}; "
                             "fix: choose heads that divide the stage channels")
        self.num_heads, self.head_dim, self.window = num_heads, dim // num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        nH, Dh = self.num_heads, self.head_dim
        wh, ww = window_shape(H, W, self.window)
        ph, pw = -H % wh, -W % ww
        Hp, Wp = H + ph, W + pw
        nh, nw = Hp // wh, Wp // ww

        qkv = self.qkv(x)  # (B, H, W, 3C)
        if ph or pw:
            qkv = F.pad(qkv, (0, 0, 0, pw, 0, ph))  # (B, Hp, Wp, 3C)
        qkv = to_window_heads(qkv, (wh, ww), nH, parts=3)  # (3, B, nW, nH, T, Dh)
        q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*nW, nH, T, Dh)

        mask = None
        if ph or pw:  # keys that are padding get no attention
            valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
            valid[:H, :W] = True
            valid = valid.view(nh, wh, nw, ww).transpose(1, 2)  # (nh, nw, wh, ww)
            mask = valid.reshape(1, nh * nw, 1, 1, wh * ww).expand(B, -1, -1, -1, -1)  # (B, nW, 1, 1, T)
            mask = mask.reshape(B * nh * nw, 1, 1, wh * ww)  # (B*nW, 1, 1, T)

        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B*nW, nH, T, Dh)
        o = from_window_heads(o.view(B, nh * nw, nH, wh * ww, Dh), (Hp, Wp), (wh, ww))  # (B, Hp, Wp, C)
        o = o[:, :H, :W]  # (B, H, W, C)
        return self.proj(o)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + DecoderWindowAttention(LN(x)), then x + MLP(LN(x)).
    (B, H, W, C) → (B, H, W, C); window 0 = global attention."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DecoderWindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTStage(nn.Module):
    """The ViT branch at one stage: Ŷ_i = LN(blocks(Linear(cat(Y_i, F_V^i)))).

    The Linear projects Ỹ_i = CONCAT(Y_i, F_V^i) back to C_i; the LN closes the pre-LN residual
    stream. The paper's DownViT_i is this stage plus its 2×2 stride-2 merge conv (in DualUDecoder).
    `depth` 0 keeps only the projection and the norm.
    """

    def __init__(self, dim: int, num_heads: int, depth: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """y: Y_i (B, C, H, W), f: F_V^i (B, C, H, W) → Ŷ_i (B, C, H, W), a permuted view with
        channels_last strides (no copy)."""
        B, C, H, W = y.shape
        t = torch.cat([y, f], dim=1).permute(0, 2, 3, 1)  # (B, H, W, 2C); a view if channels_last
        t = self.proj(t)  # (B, H, W, C)
        for block in self.blocks:
            t = block(t)
        return self.norm(t).permute(0, 3, 1, 2)  # (B, C, H, W)


class UpBlock(nn.Module):
    """UpCNN: ConvBlock(in_ch → mid_ch) on the concatenation, then a 2×2 stride-2 transposed conv.
    (B, in_ch, H, W) → (B, out_ch, 2H, 2W)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.conv = ConvBlock(in_ch, mid_ch)
        self.up = nn.ConvTranspose2d(mid_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.conv(x))


# --------------------------------------------------------------------------- top module


class DualUDecoder(nn.Module):
    """The segmentation part of TMC (§3.3): a dual CNN/ViT down path and a U-shaped CNN up path.

    Both branches use Swin's resolutions and channels C_i (§3.1) and take F_V^i at every stage by
    concatenation. The ViT branch enters the CNN path through the skips (1×1 conv-BN-ReLU, as in
    LViT), at stage n through the bottleneck. The up path ends on the stem features, so the logits
    come out at the input size.

    Args:
        stage_channels: (C_1, ..., C_n), the Swin stage widths; n >= 2.
        stem_channels: s; the stem has s channels at H × W and 2s at H/2 × W/2.
        vit_heads: attention heads per stage; each must divide C_i.
        vit_window: attention window of the ViT branch (0 = global attention everywhere).
    """

    def __init__(self, stage_channels: Sequence[int] = (96, 192, 384, 768), in_chans: int = 3,
                 stem_channels: int = 32, vit_depth: int = 1, vit_heads: Sequence[int] = (3, 6, 12, 24),
                 vit_window: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        ch, heads, n, s = tuple(stage_channels), tuple(vit_heads), len(stage_channels), stem_channels
        if n < 2 or len(heads) != n:
            raise ValueError(f"DualUDecoder: got {n} stage_channels and {len(heads)} vit_heads; "
                             "fix: give one entry per stage (at least 2), e.g. (96,192,384,768) and (3,6,12,24)")
        if min(*ch, s, in_chans) < 1 or vit_depth < 0 or vit_window < 0:
            raise ValueError("DualUDecoder: channels must be >= 1, vit_depth and vit_window >= 0; "
                             f"got stage_channels={ch}, stem_channels={s}, in_chans={in_chans}, "
                             f"vit_depth={vit_depth}, vit_window={vit_window}")
        for c, h in zip(ch, heads):
            if h < 1 or c % h:
                raise ValueError(f"DualUDecoder: vit_heads {heads} must divide stage_channels {ch} "
                                 "stage by stage; fix: e.g. heads = C_i // 32")
        self.stage_channels, self.in_chans = ch, in_chans

        # CNN stem: S_0 (s, H), S_½ (2s, H/2), X_1 (C_1, H/4). ViT stem: Y_1 = patch embedding.
        self.stem_full = ConvBlock(in_chans, s)
        self.stem_half = ConvBlock(s, 2 * s, stride=2)
        self.stem_quarter = ConvBlock(2 * s, ch[0], stride=2)
        self.patch_embed = nn.Conv2d(in_chans, ch[0], kernel_size=4, stride=4)

        # Down path, stage i = 1..n (index i-1). DownCNN and the merges stop at stage n-1.
        self.down_cnn = nn.ModuleList(ConvBlock(2 * ch[i], ch[i + 1], stride=2) for i in range(n - 1))
        self.vit = nn.ModuleList(ViTStage(ch[i], heads[i], vit_depth, vit_window, mlp_ratio) for i in range(n))
        self.vit_merge = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 2, stride=2) for i in range(n - 1))
        self.skip = nn.ModuleList(conv_norm_act(2 * ch[i], ch[i], kernel=1) for i in range(n - 1))
        self.bottleneck = ConvBlock(3 * ch[-1], ch[-1])  # Z_n from cat(X_n, Ŷ_n, F_V^n)

        # Up path: UpCNN_i maps cat(Z_i, F_V^i, skip_i) to Z_{i-1} at the next scale; UpCNN_1 lands
        # on the half-resolution stem (2s channels).
        outs = (2 * s, *ch[:-1])
        self.up = nn.ModuleList(UpBlock(3 * ch[i], ch[i], outs[i]) for i in range(n))
        self.up_half = UpBlock(4 * s, 2 * s, s)  # cat(Z_0, S_½) at H/2 → H
        self.up_full = ConvBlock(2 * s, s)  # cat(·, S_0) at H
        self.head = nn.Conv2d(s, 1, kernel_size=1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Transformer convention for the ViT branch; convolutions keep PyTorch's default init.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def _check_inputs(self, image: torch.Tensor, fused: Sequence[torch.Tensor]) -> None:
        n, ch = len(self.stage_channels), self.stage_channels
        if image.ndim != 4 or image.shape[1] != self.in_chans:
            raise ValueError(f"DualUDecoder: image must be (B, {self.in_chans}, H, W), got "
                             f"{tuple(image.shape)}; fix: pass the normalised image batch")
        B, _, H, W = image.shape
        m = 2 ** (n + 1)
        if H % m or W % m:
            raise ValueError(f"DualUDecoder: image size {H}x{W} is not divisible by {m} "
                             f"(the stage-{n} stride); fix: resize or pad the image to a multiple of {m}")
        if len(fused) != n:
            raise ValueError(f"DualUDecoder: fused must hold {n} stage maps F_V^1..F_V^{n}, got "
                             f"{len(fused)}; fix: pass Swin's own map at stages without MCM")
        for i, f in enumerate(fused):
            want = (B, ch[i], H // 2 ** (i + 2), W // 2 ** (i + 2))
            if tuple(f.shape) != want:
                raise ValueError(f"DualUDecoder: fused[{i}] (F_V^{i + 1}) has shape {tuple(f.shape)}, "
                                 f"expected {want}; fix: pass stage {i + 1}'s (B, C, H, W) map for this image")

    def forward(self, image: torch.Tensor, fused: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            image: (B, in_chans, H, W), normalised; H, W divisible by 2**(n+1).
            fused: n maps F_V^i, each (B, C_i, H/2**(i+1), W/2**(i+1)), i = 1..n.
        Returns:
            logits (B, 1, H, W) (no sigmoid).
        """
        self._check_inputs(image, fused)
        B, _, H, W = image.shape
        n = len(self.stage_channels)

        nhwc = torch.channels_last  # the H and H/2 convolutions (module docstring)
        s_full = self.stem_full(image.contiguous(memory_format=nhwc))  # S_0 (B, s, H, W)
        s_half = self.stem_half(s_full)  # S_½ (B, 2s, H/2, W/2)
        x = self.stem_quarter(s_half).contiguous()  # X_1 (B, C_1, H/4, W/4)
        y = self.patch_embed(image)  # Y_1 (B, C_1, H/4, W/4)

        skips = []
        for i in range(n - 1):  # stages 1..n-1
            f = fused[i]  # F_V^{i+1} (B, C_i, H_i, W_i)
            y_hat = self.vit[i](y, f)  # Ŷ_i (B, C_i, H_i, W_i)
            skips.append(self.skip[i](torch.cat([x, y_hat], dim=1)))  # (B, C_i, H_i, W_i)
            x = self.down_cnn[i](torch.cat([x, f], dim=1))  # X_{i+1} (B, C_{i+1}, H_i/2, W_i/2)
            y = self.vit_merge[i](y_hat)  # Y_{i+1} (B, C_{i+1}, H_i/2, W_i/2)
        y_hat = self.vit[-1](y, fused[-1])  # Ŷ_n (B, C_n, H_n, W_n)
        z = self.bottleneck(torch.cat([x, y_hat, fused[-1]], dim=1))  # Z_n (B, C_n, H_n, W_n)
        skips.append(x)  # X_n: Ŷ_n already entered through the bottleneck

        for i in reversed(range(n)):  # UpCNN_n .. UpCNN_1
            z = self.up[i](torch.cat([z, fused[i], skips[i]], dim=1))  # Z_{i-1}: next scale up
        z = self.up_half(torch.cat([z.contiguous(memory_format=nhwc), s_half], dim=1))  # (B, s, H, W)
        z = self.up_full(torch.cat([z, s_full], dim=1))  # (B, s, H, W)
        return self.head(z).contiguous()  # (B, 1, H, W)
