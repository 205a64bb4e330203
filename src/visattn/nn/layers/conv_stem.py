"""Overlapping convolutional tokenizer and downsampler of hierarchical backbones (NAT, DiNAT).

Both take 3x3 stride-2 convolutions (overlapping windows, unlike ViT/Swin's patchify) and end
channels-last with a LayerNorm, the layout the token mixers work in.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvDownsample", "ConvStem"]


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (no activation between them, as in NAT) + LayerNorm:
    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]`` (channels-first in, channels-last out)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (no bias) + LayerNorm, channels-last on both sides:
    ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C_out]``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
