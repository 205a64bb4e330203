"""Swin's patch merging: the 2x2 space-to-depth downsampler."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import Linear

__all__ = ["PatchMerging"]


class PatchMerging(nn.Module):
    """Concatenate each 2x2 patch's tokens, normalize, project: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C_out]``.

    Liu et al., "Swin Transformer" (2021). The four tokens are concatenated in Swin's order
    (``(0,0), (1,0), (0,1), (1,1)`` as ``(row, col)`` offsets), then ``LayerNorm(4C)`` and a bias-free
    ``Linear(4C, C_out)``; an odd side is zero-padded at the bottom/right first, as Swin does.
    """

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # [B, H/2, 2 (row), W/2, 2 (col), C] -> [B, H/2, W/2, col, row, C]: the row offset varies fastest.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))
