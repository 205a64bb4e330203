"""Feed-forward network with a depthwise convolution between its layers (PVTv2, VAN, SegFormer)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..linear import Linear

__all__ = ["ConvFFN"]


class ConvFFN(nn.Module):
    """``fc2(drop(act(DWConv3x3(fc1(x)))))`` with dropout after each layer: ``[B, H, W, C] -> [B, H, W, C]``.

    Wang et al., "PVT v2" (2022) and Guo et al., "Visual Attention Network" (VAN, 2022): the 3x3
    depthwise conv (with bias) on the hidden features gives the FFN a local receptive field.
    Same constructor as :class:`~visattn.nn.layers.Mlp`, so a block can take either.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = act_layer()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.drop(self.act(x))))
