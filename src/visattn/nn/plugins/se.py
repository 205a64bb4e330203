"""Squeeze-and-Excitation (SE) channel attention for CNN feature maps."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["SqueezeExcite"]


@register_attn(
    "se",
    layout="channels_first",
    paper="Squeeze-and-Excitation Networks (2018)",
    complexity="O(C*H*W + C^2/r)",
    backends="pure torch",
    bench_kwargs={},
)
class SqueezeExcite(nn.Module):
    """Scale each channel by a gate computed from the globally pooled features.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``.

    Paper: Hu, Shen, Sun, "Squeeze-and-Excitation Networks" (CVPR 2018). Mechanism: squeeze with
    global average pooling to ``[B, C]``, excite with ``FC(C -> C/r) -> ReLU -> FC(C/r -> C) ->
    sigmoid``, then ``y = x * gate``; every gate lies in (0, 1).

    Parameters: ``2*C*h + h + C`` with ``h = max(1, C // reduction)`` (the paper's ``2*C^2/r`` plus
    the two FC biases). Deliberate choice: when ``C`` is not a multiple of ``reduction`` the hidden
    width rounds down (never below 1); the paper only uses multiples.

    EfficientNet-style blocks (MBConv in MaxViT, CoAtNet, MOAT) set the hidden width from the block
    instead (``hidden``, which overrides ``reduction``) and use ``act_layer=nn.SiLU``.
    """

    def __init__(self, channels: int, reduction: int = 16, hidden: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.reduction = check_positive_int(name, "reduction", reduction)
        hidden = max(1, channels // reduction) if hidden is None else check_positive_int(name, "hidden", hidden)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gates ``[B, C]`` in (0, 1) for ``x: [B, C, H, W]``."""
        check_input(self, x, self.channels)
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"
