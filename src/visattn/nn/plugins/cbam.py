"""Convolutional Block Attention Module (CBAM): channel attention, then spatial attention."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["CBAM"]


@register_attn(
    "cbam",
    layout="channels_first",
    paper="CBAM: Convolutional Block Attention Module (2018)",
    complexity="O(C*H*W + C^2/r + k^2*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class CBAM(nn.Module):
    """Refine a feature map with a channel gate and then a spatial gate, both in (0, 1).

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1`` (the spatial conv is
    zero-padded, so even a 1x1 map works).

    Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module" (ECCV 2018).
    Mechanism: ``M_c = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x)))`` with one MLP
    ``C -> C/r -> C`` shared by both pooled vectors, ``x' = M_c * x``; then
    ``M_s = sigmoid(conv7x7([mean_c(x'); max_c(x')]))`` and ``y = M_s * x'``.

    Parameters: ``2*C*h + h + C`` (MLP with biases, ``h = max(1, C // reduction)``) ``+ 2*k*k``
    (the spatial conv, ``k = 7``). Deliberate difference: the authors' code follows the 7x7 conv
    with BatchNorm; the paper's equation has none, and we follow the equation (no BN, no conv bias),
    which also keeps the module's training-mode output independent of its batch neighbours.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.reduction = check_positive_int(name, "reduction", reduction)
        k = check_positive_int(name, "spatial_kernel", spatial_kernel)
        if k % 2 == 0:
            raise ValueError(f"{name}: spatial_kernel={k} must be odd so that the spatial gate stays aligned with x.")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c: [B, C]`` in (0, 1)."""
        return torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s: [B, 1, H, W]`` in (0, 1)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.channels)
        x = x * self.channel_gate(x)[:, :, None, None]
        return x * self.spatial_gate(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, spatial_kernel={self.spatial.kernel_size[0]}"
