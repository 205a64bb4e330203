"""Convolutional positional encoding: a residual depthwise convolution (DaViT, BiFormer, CPVT)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvPosEnc"]


class ConvPosEnc(nn.Module):
    """``x + act(DWConv_k(x))`` on a channels-last map: ``[B, H, W, C] -> [B, H, W, C]``.

    Chu et al., "Conditional Positional Encodings for Vision Transformers" (CPVT, 2021); DaViT puts
    one before the attention and one before the MLP of every block (``act=False``, ``k=3``),
    BiFormer one before each block. The conv has a bias and zero padding ``k // 2``.
    """

    def __init__(self, dim: int, kernel_size: int = 3, act: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.proj(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
