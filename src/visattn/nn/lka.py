"""Large kernel attention (LKA) from the Visual Attention Network (VAN)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._plugin_utils import check_input, check_positive_int
from .registry import register_attn

__all__ = ["LargeKernelAttention"]


@register_attn(
    "lka",
    layout="channels_first",
    paper="Visual Attention Network (2022)",
    complexity="O((25 + 49 + C)*C*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class LargeKernelAttention(nn.Module):
    """Multiply ``x`` by an attention map from a decomposed large-kernel convolution.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1`` (all convs are
    zero-padded "same" convs).

    Paper: Guo, Lu, Liu, Cheng, Hu, "Visual Attention Network" (CVMJ 2023, arXiv 2022). Mechanism:
    a ``K x K`` convolution is decomposed into a ``(2d-1) x (2d-1)`` depthwise conv, a
    ``ceil(K/d) x ceil(K/d)`` depthwise conv with dilation ``d`` and a 1x1 conv;
    ``attn = conv1x1(dw_dilated(dw(x)))`` and ``y = attn * x``. The default ``K = 21, d = 3`` gives
    the paper's 5x5, 7x7 (dilation 3) and 1x1 convs.

    Parameters: ``(2d-1)^2*C + ceil(K/d)^2*C + C^2 + 3*C`` (weights plus biases, as in VAN):
    ``C^2 + 77*C`` for the default. Note on the receptive field: the composition covers
    ``(2d-1) + (ceil(K/d)-1)*d`` pixels per axis, 23x23 for the default (the paper's "21x21" is the
    nominal K; the decomposition reaches one pixel further on each side).
    """

    def __init__(self, channels: int, kernel_size: int = 21, dilation: int = 3) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.kernel_size = check_positive_int(name, "kernel_size", kernel_size)
        self.dilation = check_positive_int(name, "dilation", dilation)
        k_local, k_dilated = 2 * dilation - 1, math.ceil(kernel_size / dilation)
        if k_dilated % 2 == 0:
            raise ValueError(
                f"{name}: kernel_size={kernel_size} with dilation={dilation} gives an even dilated kernel "
                f"ceil({kernel_size}/{dilation})={k_dilated}, which cannot be centred; choose kernel_size so "
                f"that ceil(kernel_size/dilation) is odd (e.g. 21 with dilation 3)."
            )
        self.dw = nn.Conv2d(channels, channels, k_local, padding=k_local // 2, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, k_dilated, padding=dilation * (k_dilated // 2),
                                    dilation=dilation, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    @property
    def receptive_field(self) -> int:
        """Pixels per axis that one output position depends on: ``(2d-1) + (ceil(K/d)-1)*d``."""
        return self.dw.kernel_size[0] + (self.dw_dilated.kernel_size[0] - 1) * self.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.channels)
        return x * self.pw(self.dw_dilated(self.dw(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}"
