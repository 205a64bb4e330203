"""MambaOut's Gated CNN: Mamba's block without the state-space model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..linear import Linear
from ..registry import register_attn
from .base import check_input

__all__ = ["GatedCNN"]


@register_attn("mambaout", layout="channels_last", paper="MambaOut: Do We Really Need Mamba for Vision? (2024)",
               complexity="O(N C k^2)", backends="pure torch", bench_kwargs=dict())
class GatedCNN(nn.Module):
    """MambaOut's Gated CNN token mixer (no scan). ``x [B, H, W, C] -> [B, H, W, C]``.

    Yu and Wang, "MambaOut: Do We Really Need Mamba for Vision?" (2024). ``g, i, c = split(fc1(x))`` with
    ``hidden = int(expansion_ratio * C)`` channels for ``g`` and ``i ++ c``; the last ``conv_ratio * C``
    (``c``) go through a ``k x k`` depthwise conv; ``fc2(act(g) * cat(i, conv(c)))``. The paper's
    argument: image classification needs neither the causal token mixing nor the long-range recurrence
    of the SSM, so the block keeps Mamba's gate and drops the scan; its receptive field is one
    ``k x k`` window.

    Equal to timm's ``GatedConvBlock`` without its norm, LayerScale, drop-path and residual (tested
    against timm with copied weights). Defaults are MambaOut's (``8/3``, ``7 x 7``, ``conv_ratio=1``, GELU).
    """

    def __init__(self, dim: int, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU, proj_drop: float = 0.0) -> None:
        super().__init__()
        hidden, conv_channels = int(expansion_ratio * dim), int(conv_ratio * dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(f"GatedCNN: conv_ratio={conv_ratio} gives {conv_channels} conv channels for dim={dim}; "
                             f"they must be between 1 and the hidden width int(expansion_ratio * dim) = {hidden}.")
        self.dim, self.kernel_size = dim, kernel_size
        self.split_indices = (hidden, hidden - conv_channels, conv_channels)
        self.fc1 = Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2, groups=conv_channels)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.act(g) * torch.cat((i, c), dim=-1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, split={self.split_indices}, kernel_size={self.kernel_size}"
