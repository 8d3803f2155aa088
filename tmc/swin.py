"""Swin-Tiny image encoder (Liu et al., 2021), written by hand with the official parameter names.

TMC reads the stage maps *before* patch merging via `forward_stage(i, x)` (one stage at a time, so
a cross-modal feature can replace a map between stages) or `forward(x)`. `layers.I.downsample`
ends stage I, as in microsoft/Swin-Transformer; the derived `relative_position_index` and
`attn_mask` are non-persistent buffers. Only `forward_features` applies the final `norm`.

Image sides must be multiples of patch_size * 2**(n_stages-1) (32 for Swin-T); grids that are not a
multiple of the window are padded right/bottom and cropped around attention, as in HF/timm.

Shape key: B batch, C channels, H, W token grid of a stage, N tokens per window (ws*ws), nH heads,
Dh head dim, nW windows per image, ws window size, s shift. Tokens are (B, H, W, C) inside the
encoder; stage outputs are (B, C, H, W).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tmc.attention import attend
from tmc.layers import DropPath, Mlp, branch_scales, from_window_heads, to_window_heads

# ----------------------------------------------------------------------------- window helpers


def relative_position_index(ws: int) -> torch.Tensor:
    """Row of the (2ws-1)^2 bias table for every (query, key) pair of a ws x ws window: (N, N)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))  # (2, ws, ws)
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), in [0, 2ws-2]
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # (N, N)


def shift_attention_mask(H: int, W: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """Additive mask (nW, N, N) for shifted windows on a (padded) H x W grid: 0 where query and key
    come from the same region before the cyclic shift, -100 (official; not -inf) otherwise."""

    def region(n: int) -> torch.Tensor:  # 0, 1, 2 for the slices [0:-ws], [-ws:-s], [-s:]
        i = torch.arange(n, device=device)
        return (i >= n - ws).long() + (i >= n - shift).long()

    label = region(H)[:, None] * 3 + region(W)[None, :]  # (H, W), 9 region ids
    win = to_window_heads(label[None, :, :, None], (ws, ws), heads=1).view(-1, ws * ws)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]  # (nW, N, N)
    return torch.zeros(diff.shape, device=device).masked_fill(diff != 0, -100.0)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C) in the official order (row offset fastest); another order
    keeps every shape but silently breaks pretrained weights."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // 2, 2, W // 2, 2, C)  # (B, H/2, dy, W/2, dx, C)
    return x.permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)  # (B, H/2, W/2, [dx, dy, C])


# ----------------------------------------------------------------------------- blocks


class ShiftedWindowAttention(nn.Module):
    """Window self-attention with a learned relative-position bias, added with the shift mask to the
    scores (`tmc.attention.attend`). A smaller window (a small stage grid) reads its offsets from the
    same table."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def relative_position_bias(self, window: int) -> torch.Tensor:
        """Bias for a window x window window (window <= window_size): (nH, N, N)."""
        index = self.relative_position_index  # (ws*ws, ws*ws)
        if window != self.window_size:
            r = torch.arange(window, device=index.device)
            keep = (r[:, None] * self.window_size + r[None, :]).flatten()  # tokens of the top-left sub-window
            index = index[keep][:, keep]  # (N, N): offsets depend only on differences
        # a lookup: its gradient is one op (an index's is two: zeros, then a scatter-add)
        bias = F.embedding(index, self.relative_position_bias_table)  # (N, N, nH)
        return bias.permute(2, 0, 1)  # (nH, N, N)

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Hp, Wp, C) token grid of whole windows; mask: (nW, N, N) additive shift mask or
        None. Returns (B, Hp, Wp, C). The projections act per token, so they run on the grid, and
        windows and heads are formed together in one copy each way (`to_window_heads`)."""
        B, Hp, Wp, C = x.shape
        nH, N = self.num_heads, window * window
        qkv = to_window_heads(self.qkv(x), (window, window), nH, parts=3)  # (3, B, nW, nH, N, Dh)
        bias = self.relative_position_bias(window)  # (nH, N, N)
        if mask is None:
            q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*nW, nH, N, Dh)
            attn_mask = bias[None]  # (1, nH, N, N), broadcast over windows
        else:
            # windows x heads as one axis, so the per-window mask broadcasts over the batch
            q, k, v = qkv.flatten(2, 3).unbind(0)  # each (B, nW*nH, N, Dh)
            nW = mask.shape[0]
            attn_mask = (mask[:, None] + bias[None]).reshape(1, nW * nH, N, N)  # (1, nW*nH, N, N)
        out = attend(q, k, v, attn_mask.to(q.dtype))  # (B*nW, nH, N, Dh) or (B, nW*nH, N, Dh)
        out = from_window_heads(out.view(B, -1, nH, N, C // nH), (Hp, Wp), (window, window))
        return self.proj(out)  # (B, Hp, Wp, C)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual with stochastic depth.
    `window_size`/`shift_size` are for `input_resolution` (as in the official code); forward
    re-derives them from the actual grid, so other image sizes behave like HF/timm."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 input_resolution: tuple[int, int] = (56, 56)):
        super().__init__()
        self.nominal_window = window_size
        self.nominal_shift = window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        H, W = input_resolution
        self.window_size, self.shift_size = self.window_and_shift(H, W)
        Hp, Wp = -(-H // self.window_size) * self.window_size, -(-W // self.window_size) * self.window_size
        mask = shift_attention_mask(Hp, Wp, self.window_size, self.shift_size) if self.shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)  # (nW, N, N) for the padded grid
        self._mask_key = (Hp, Wp, self.window_size, self.shift_size)

    def window_and_shift(self, H: int, W: int) -> tuple[int, int]:
        """(window, shift) for an H x W grid: a grid no larger than the window is one unshifted window."""
        if min(H, W) <= self.nominal_window:
            return min(H, W), 0
        return self.nominal_window, self.nominal_shift

    def _shift_mask(self, Hp: int, Wp: int, ws: int, s: int, device) -> torch.Tensor:
        if self.attn_mask is not None and self._mask_key == (Hp, Wp, ws, s):
            return self.attn_mask
        return shift_attention_mask(Hp, Wp, ws, s, device=device)  # another image size: rebuild

    def forward(self, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C). `scales`: optional (2, B, 1, 1, 1) stochastic-depth scales of
        the attention and MLP branches, drawn by the stage (otherwise each branch draws its own)."""
        B, H, W, C = x.shape
        ws, s = self.window_and_shift(H, W)
        shortcut = x
        x = self.norm1(x)
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:  # zero tokens after the norm, as HF/timm do
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_b, W + pad_r
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        mask = self._shift_mask(Hp, Wp, ws, s, x.device) if s else None
        x = self.attn(x, ws, mask)  # (B, Hp, Wp, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :H, :W]  # (B, H, W, C), padding cropped
        attn_scale, mlp_scale = (None, None) if scales is None else scales
        x = self.drop_path.add(shortcut, x, attn_scale)  # shortcut + drop_path(x), one op
        return self.drop_path.add(x, self.mlp(self.norm2(x)), mlp_scale)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> LayerNorm(4C) -> Linear(4C -> 2C, no bias): halves the grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/2, W/2, 2C)."""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"patch merging needs an even grid, got {H}x{W}; fix: use image sides that "
                             "are multiples of patch_size * 2**(num_stages-1) (32 for Swin-T)")
        return self.reduction(self.norm(merge_2x2(x)))  # (B, H/2, W/2, 2C)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv, then LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H/p, W/p, C)."""
        B, C, H, W = x.shape
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, embed_dim)
        return self.norm(x)


class SwinStage(nn.Module):
    """Official `BasicLayer`: one stage's blocks plus the merging that *follows* it; forward runs the
    blocks only (`SwinTransformer.forward_stage(i+1)` calls `downsample`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_paths: list[float], input_resolution: tuple[int, int], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, shift=j % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop_path=drop_paths[j], input_resolution=input_resolution)
            for j in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None
        # keep probability of each block's attention and MLP branch: (2 * depth,)
        keep = torch.tensor([1.0 - p for p in drop_paths[:depth] for _ in range(2)])
        self.register_buffer("keep", keep, persistent=False)
        self.drops = any(p > 0 for p in drop_paths[:depth])  # a Python bool: no device read per step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C). In training the stage draws every branch's stochastic depth in
        one go (two ops instead of two per branch)."""
        scales = None
        if self.training and self.drops:
            scales = branch_scales(self.keep, x.shape[0]).view(len(self.blocks), 2, -1, 1, 1, 1)
        for j, block in enumerate(self.blocks):
            x = block(x, None if scales is None else scales[j])  # scales[j]: (2, B, 1, 1, 1)
        return x


# ----------------------------------------------------------------------------- encoder


class SwinTransformer(nn.Module):
    """Swin Transformer backbone returning per-stage maps (defaults: Swin-T); other args as official.

    Args:
        img_size: side (int or (H, W)) the derived buffers are built for; other multiples of
            patch_size * 2**(len(depths)-1) also work.
        drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
    """

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need the same length")
        for i, h in enumerate(num_heads):
            if (embed_dim * 2**i) % h:
                raise ValueError(f"stage {i + 1}: {embed_dim * 2**i} channels do not split into {h} heads")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_stages = n
        self.size_multiple = patch_size * 2 ** (n - 1)
        self._check_image_size(*img_hw, what="img_size")
        self.img_size = img_hw
        self.stage_channels = tuple(embed_dim * 2**i for i in range(n))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        H, W = img_hw[0] // patch_size, img_hw[1] // patch_size
        self.layers = nn.ModuleList([
            SwinStage(self.stage_channels[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                      dpr[sum(depths[:i]):sum(depths[:i + 1])], (H // 2**i, W // 2**i), downsample=i < n - 1)
            for i in range(n)
        ])
        self.norm = nn.LayerNorm(self.stage_channels[-1])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_image_size(self, H: int, W: int, what: str = "image") -> None:
        m = self.size_multiple
        if H % m or W % m or H <= 0 or W <= 0:
            near = sorted({m * max(1, v // m) for v in (H, W)} | {m * (v // m + 1) for v in (H, W)})
            raise ValueError(f"{what} {H}x{W} is not a multiple of {m} (patch {self.patch_size} x "
                             f"2**{self.num_stages - 1} merges); fix: resize to a multiple of {m}, e.g. "
                             + " or ".join(map(str, near)))

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage i (1-based) alone on x: the image (B, in_chans, H, W) for i == 1, else stage
        i-1's (B, C_{i-1}, H_{i-1}, W_{i-1}) output (or a feature replacing it), merged by
        `layers[i-2].downsample` first. Returns (B, C_i, H_i, W_i), H_i = H / 2**(i+1), a
        channels-last view (no copy)."""
        n = self.num_stages
        if not 1 <= i <= n:
            raise ValueError(f"stage {i} is outside 1..{n}")
        if x.ndim != 4:
            raise ValueError(f"stage {i} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if i == 1:
            if C != self.in_chans:
                raise ValueError(f"image has {C} channels, the encoder expects {self.in_chans}")
            if H % self.patch_size or W % self.patch_size:
                self._check_image_size(H, W)
            x = self.patch_embed(x)  # (B, H/4, W/4, C1)
        else:
            if C != self.stage_channels[i - 2]:
                raise ValueError(f"stage {i} expects the {self.stage_channels[i - 2]}-channel map of "
                                 f"stage {i - 1}, got {C} channels")
            x = self.layers[i - 2].downsample(x.permute(0, 2, 3, 1))  # (B, H/2, W/2, C_i)
        x = self.layers[i - 1](x)  # (B, H_i, W_i, C_i)
        return x.permute(0, 3, 1, 2)  # (B, C_i, H_i, W_i)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, H, W), sides multiples of `size_multiple` -> list of num_stages maps
        (B, C_i, H / 2**(i+1), W / 2**(i+1)), before patch merging."""
        if x.ndim == 4:
            self._check_image_size(x.shape[-2], x.shape[-1])
        maps = []
        for i in range(1, self.num_stages + 1):
            x = self.forward_stage(i, x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage tokens after the final norm (HF's last_hidden_state): (B, N, C_last),
        N = H_last * W_last. Not used by TMC's decoder."""
        x = self.forward(x)[-1]  # (B, C, H, W)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
