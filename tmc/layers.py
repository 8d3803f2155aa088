"""Building blocks shared by the Swin encoder, MCM and the decoder, written once (as timm.layers and
SAM's modeling/common.py do): the MLP, stochastic depth, native dropout, the fixed 2D position code
and the window/head layout of windowed attention.

Each is also written so one training step issues few kernels: stochastic depth is fused with its
residual add (and a Swin stage draws all its blocks' scales at once), dropout is one kernel on every
device, and the position code of a grid is built once and kept as a buffer instead of being rebuilt
in every forward; windowed attention moves its tokens into windows and heads in one copy
(`to_window_heads`) and back in one.

Shape key: B batch, M tokens, C channels (dim), h x w a token grid, H x W a grid of whole windows,
wh x ww a window, nW = (H/wh)(W/ww) windows, T = wh*ww tokens per window, nH heads, Dh head dim.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Dropout", "DropPath", "Mlp", "PositionCode", "branch_scales", "from_window_heads",
           "sincos_position_embedding", "to_window_heads"]


class Dropout(nn.Dropout):
    """nn.Dropout as one kernel on every device (`torch.native_dropout`).

    On CUDA F.dropout already calls it; on CPU F.dropout issues four ops (empty, bernoulli_, div_,
    mul). The Bernoulli draws are the same (one per element, in order), so results agree with
    nn.Dropout up to the order of the two multiplications.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors by 1/keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - self.drop_prob
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self._mask(x) / (1.0 - self.drop_prob)

    def add(self, residual: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """residual + self(x), the residual add and the rescaling fused into one addcmul. `scale`,
        (B, 1, ...) of 0 and 1/keep drawn ahead for several branches at once (`branch_scales`),
        replaces this call's own draw."""
        if self.drop_prob == 0.0 or not self.training:
            return residual + x
        if scale is not None:
            return torch.addcmul(residual, x, scale)
        return torch.addcmul(residual, x, self._mask(x), value=1.0 / (1.0 - self.drop_prob))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def branch_scales(keep: torch.Tensor, batch: int) -> torch.Tensor:
    """Stochastic-depth scales of n residual branches for a batch in two ops: (n,) keep probabilities
    → (n, B), each 1/keep (kept) or 0 (dropped), drawn independently."""
    keep = keep[:, None]  # (n, 1)
    return torch.bernoulli(keep.expand(-1, batch)) / keep  # (n, B)


class Mlp(nn.Module):
    """Position-wise feed-forward network: fc1 → exact GELU → dropout → fc2 → dropout.

    Args:
        dim: input and output width.
        hidden_dim: inner width.
        dropout: dropout probability (training only; 0 builds no dropout op).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) → (..., dim)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def sincos_position_embedding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sine-cosine position code of an h × w grid (ViT-MAE / DETR style), (h·w, dim).

    Half the channels encode the row, half the column, each as sin/cos at geometric frequencies.
    It has no parameters, so it fits every stage and image size.
    """
    if dim % 4:
        raise ValueError(f"position code width {dim} must be divisible by 4")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # (h, dim/4)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # (w, dim/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, dim // 2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim).to(dtype or torch.float32)  # (h·w, dim)


class PositionCode(nn.Module):
    """`sincos_position_embedding` of one width, kept as a non-persistent buffer for the grid it was
    last asked for (the model's stage grid, so it is built once, not in every forward).

    Args:
        dim: width of the code (divisible by 4).
        grid: (h, w) to build at once, or None to build on the first call.
    """

    def __init__(self, dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.dim = dim
        self.register_buffer("code", None, persistent=False)
        self._grid = None
        if grid is not None:
            self.code = sincos_position_embedding(*grid, dim)
            self._grid = tuple(grid)

    def forward(self, h: int, w: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(h·w, dim) in `dtype` (a cast only if the buffer's dtype differs)."""
        if self._grid != (h, w) or self.code is None:
            device = self.code.device if self.code is not None else None
            self.code = sincos_position_embedding(h, w, self.dim, device=device)
            self._grid = (h, w)
        return self.code if dtype is None else self.code.to(dtype)


def to_window_heads(x: torch.Tensor, window: tuple[int, int], heads: int, parts: int = 1) -> torch.Tensor:
    """(B, H, W, parts*nH*Dh) token grid, H and W multiples of the window (wh, ww) → (parts, B, nW,
    nH, T, Dh), contiguous: windows row-major, tokens row-major in each window. `parts` = 3 splits a
    stacked q/k/v projection. Window partition and head split are one copy; done one after the
    other they are two (three when the matmul copies q, k and v again)."""
    B, H, W, C = x.shape
    wh, ww = window
    nh, nw = H // wh, W // ww
    x = x.view(B, nh, wh, nw, ww, parts, heads, C // (parts * heads))  # (B, nh, wh, nw, ww, parts, nH, Dh)
    x = x.permute(5, 0, 1, 3, 6, 2, 4, 7)  # (parts, B, nh, nw, nH, wh, ww, Dh)
    return x.reshape(parts, B, nh * nw, heads, wh * ww, -1)  # (parts, B, nW, nH, T, Dh), the copy


def from_window_heads(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_window_heads` for one part: (B, nW, nH, T, Dh) → (B, H, W, nH*Dh), one copy."""
    B, nW, nH, T, Dh = x.shape
    (H, W), (wh, ww) = grid, window
    x = x.view(B, H // wh, W // ww, nH, wh, ww, Dh).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, wh, nw, ww, nH, Dh)
    return x.reshape(B, H, W, nH * Dh)  # (B, H, W, nH*Dh)
