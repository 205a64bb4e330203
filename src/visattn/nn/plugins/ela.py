"""Efficient Local Attention (ELA): coordinate-style attention with 1-D convs and GroupNorm."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checks import check_choice, check_divisible, check_input, check_positive_int
from ..registry import register_attn

__all__ = ["ELA", "ELA_VARIANTS"]

# variant -> (1-D kernel size, channels per conv group (1 = depthwise), GroupNorm groups).
ELA_VARIANTS: dict[str, tuple[int, int, int]] = {
    "T": (5, 1, 32),
    "B": (7, 1, 16),
    "S": (5, 8, 16),
    "L": (7, 8, 16),
}


@register_attn(
    "ela",
    layout="channels_first",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks (2024)",
    complexity="O(C*H*W + C*k*(H+W))",
    backends="pure torch",
    bench_kwargs={},
)
class ELA(nn.Module):
    """Gate ``x`` by a row map and a column map, each from a strip-pooled 1-D conv + GroupNorm.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``; ``C`` must be a
    multiple of the GroupNorm groups and of the conv group width.

    Paper: Xu, Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks"
    (arXiv 2024). Mechanism: strip pooling gives ``z_h = mean_W(x): [B, C, H]`` and
    ``z_w = mean_H(x): [B, C, W]``; one 1-D conv (shared by both directions) followed by GroupNorm
    and a sigmoid gives ``y_h, y_w`` and ``out = x * y_h[..., None] * y_w[..., None, :]``. No
    channel reduction (unlike coordinate attention) and no BatchNorm.

    Variants (kernel size, conv groups, GroupNorm groups): ELA-T (5, C, 32), ELA-B (7, C, 16),
    ELA-S (5, C/8, 16), ELA-L (7, C/8, 16); pass ``variant`` or override any of the three.
    Parameters: ``C * (C/conv_groups) * k + 2*C``: T ``7C``, B ``9C``, S ``42C``, L ``58C``.
    Reading chosen: the paper names the three hyperparameters (kernel size, conv groups, GroupNorm
    groups) of its four versions; the values above are those of the implementation circulated with
    it (we could not reach the paper's table itself to cross-check), including ``C // 8`` conv
    groups (8 channels each) for S and L.
    """

    def __init__(
        self,
        channels: int,
        variant: str = "B",
        kernel_size: Optional[int] = None,
        group_width: Optional[int] = None,
        num_groups: Optional[int] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        check_choice(name, "variant", variant, ELA_VARIANTS)
        k, width, gn = ELA_VARIANTS[variant]
        k = k if kernel_size is None else check_positive_int(name, "kernel_size", kernel_size)
        width = width if group_width is None else check_positive_int(name, "group_width", group_width)
        gn = gn if num_groups is None else check_positive_int(name, "num_groups", num_groups)
        if k % 2 == 0:
            raise ValueError(f"{name}: kernel_size={k} must be odd so that the gates stay aligned with x.")
        check_divisible(name, "channels", channels, "num_groups (GroupNorm)", gn)
        check_divisible(name, "channels", channels, "group_width (channels per conv group)", width)
        self.variant, self.kernel_size = variant, k
        self.conv = nn.Conv1d(channels, channels, k, padding=k // 2, groups=channels // width, bias=False)
        self.norm = nn.GroupNorm(gn, channels)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gates ``[B, C, H]`` and column gates ``[B, C, W]``, both in (0, 1)."""
        check_input(self, x, self.channels)
        row = torch.sigmoid(self.norm(self.conv(x.mean(dim=3))))
        col = torch.sigmoid(self.norm(self.conv(x.mean(dim=2))))
        return row, col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row, col = self.gates(x)
        return x * row[:, :, :, None] * col[:, :, None, :]

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, variant={self.variant!r}, kernel_size={self.kernel_size}, "
                f"conv_groups={self.conv.groups}, num_groups={self.norm.num_groups}")
