"""Coordinate attention: direction-aware gates from pooling along H and along W."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["CoordinateAttention"]


@register_attn(
    "coord",
    layout="channels_first",
    paper="Coordinate Attention for Efficient Mobile Network Design (2021)",
    complexity="O(C*H*W + C*m*(H+W))",
    backends="pure torch",
    bench_kwargs={},
)
class CoordinateAttention(nn.Module):
    """Gate ``x`` by a per-row and a per-column channel gate from a shared bottleneck.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``.

    Paper: Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network Design" (CVPR 2021).
    Mechanism: pool along W (``[B, C, H]``) and along H (``[B, C, W]``), concatenate along the
    spatial axis, ``f = h_swish(BN(conv1x1(C -> m)))``, split back, ``g_h = sigmoid(conv1x1(m -> C))``
    and ``g_w = sigmoid(conv1x1(m -> C))``; ``y = x * g_h[..., :, None] * g_w[..., None, :]``.
    Bottleneck width ``m = max(min_hidden, C // reduction)`` (the authors' rule, 8 and 32).

    Parameters: ``3*C*m + 2*m + 2*C``. Deliberate difference: the first 1x1 conv has no bias
    (BatchNorm right after it subtracts any bias; in training mode it would get zero gradient).
    BatchNorm makes training-mode outputs depend on batch neighbours; eval mode does not.
    """

    def __init__(self, channels: int, reduction: int = 32, min_hidden: int = 8) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.reduction = check_positive_int(name, "reduction", reduction)
        check_positive_int(name, "min_hidden", min_hidden)
        self.hidden = max(min_hidden, channels // reduction)
        self.squeeze = nn.Sequential(
            nn.Conv2d(channels, self.hidden, 1, bias=False), nn.BatchNorm2d(self.hidden), nn.Hardswish()
        )
        self.to_h = nn.Conv2d(self.hidden, channels, 1)
        self.to_w = nn.Conv2d(self.hidden, channels, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gates ``[B, C, H]`` and column gates ``[B, C, W]`` in (0, 1)."""
        check_input(self, x, self.channels)
        h = x.shape[2]
        # One conv over the concatenated [B, C, H + W, 1] strip, as in the paper, so that BN sees
        # row and column descriptors together.
        strip = torch.cat([x.mean(dim=3), x.mean(dim=2)], dim=2)[..., None]
        f = self.squeeze(strip)
        g_h = torch.sigmoid(self.to_h(f[:, :, :h]))[..., 0]
        g_w = torch.sigmoid(self.to_w(f[:, :, h:]))[..., 0]
        return g_h, g_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_h, g_w = self.gates(x)
        return x * g_h[:, :, :, None] * g_w[:, :, None, :]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}"
