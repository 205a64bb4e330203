"""Efficient Channel Attention (ECA): SE without dimensionality reduction, via a 1-D conv over channels."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """The paper's adaptive kernel size ``k = |log2(C)/gamma + b/gamma|_odd``.

    ``|t|_odd`` is "the nearest odd number of t"; it is ambiguous when ``t`` is an even integer
    (e.g. C=128: t=4). We follow the authors' released rule, ``int(t)`` bumped to the next odd
    number when even, which equals the nearest odd number everywhere else and breaks ties upwards:
    C=16 -> 3, 64 -> 3, 128 -> 5, 256 -> 5, 512 -> 5, 1024 -> 5, 2048 -> 7.
    """
    check_positive_int("eca_kernel_size", "channels", channels)
    if gamma <= 0:
        raise ValueError(f"eca_kernel_size: gamma={gamma!r} must be > 0.")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_attn(
    "eca",
    layout="channels_first",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks (2020)",
    complexity="O(C*H*W + C*k)",
    backends="pure torch",
    bench_kwargs={},
)
class ECA(nn.Module):
    """Scale each channel by a gate from a k-tap 1-D convolution over the pooled channel descriptor.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``.

    Paper: Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
    Networks" (CVPR 2020). Mechanism: global average pooling to ``[B, C]``, one 1-D convolution of
    ``k`` taps (no bias, shared by all channels, zero-padded at both ends of the channel axis),
    sigmoid, ``y = x * gate``: local cross-channel interaction without dimension reduction.

    Parameters: exactly ``k``; ``k`` follows :func:`eca_kernel_size` unless ``kernel_size`` is given.
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None, gamma: float = 2.0, b: float = 1.0) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        if kernel_size is None:
            k = eca_kernel_size(channels, gamma, b)
        else:
            k = check_positive_int(name, "kernel_size", kernel_size)
        if k % 2 == 0:
            # An even kernel cannot be centred on its channel: the gate of channel i would be shifted.
            raise ValueError(f"{name}: kernel_size={k} must be odd so that each channel's window is centred on it.")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gates ``[B, C]`` in (0, 1) for ``x: [B, C, H, W]``."""
        check_input(self, x, self.channels)
        return torch.sigmoid(self.conv(x.mean(dim=(2, 3))[:, None, :])[:, 0, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
