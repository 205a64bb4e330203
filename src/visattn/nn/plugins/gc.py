"""Global context (GC) block: a query-independent non-local context fused SE-style into every position."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_choice, check_input, check_positive_int
from ..registry import register_attn

__all__ = ["GlobalContextBlock"]


@register_attn(
    "gc",
    layout="channels_first",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond (2019)",
    complexity="O(C*H*W + C^2/r)",
    backends="pure torch",
    bench_kwargs={},
)
class GlobalContextBlock(nn.Module):
    """Add (or multiply by a gate of) one attention-pooled, transformed context vector at every position.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``.

    Paper: Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
    Beyond" (ICCV Workshops 2019). Mechanism: context modelling ``c = sum_p softmax_p(W_k x_p) x_p``
    (one attention map shared by all queries), transform ``t = W_v2 ReLU(LN(W_v1 c))`` with a
    bottleneck ``C -> C/r -> C``, fusion ``y = x + t`` (``fusion="add"``, the paper's default) or
    ``y = x * sigmoid(t)`` (``fusion="mul"``, the paper's scaling ablation).

    Parameters: ``2*C^2/r`` for the transform's weights (the paper's count) ``+ C/r + C`` biases
    ``+ 2*C/r`` LayerNorm ``+ C`` for ``W_k``; with ``h = max(1, C // reduction)``. Deliberate
    difference: ``W_k`` has no bias (a constant added before a softmax over positions cannot change
    it; the authors' code keeps one, which only ever gets zero gradient).
    """

    def __init__(self, channels: int, reduction: int = 16, fusion: str = "add") -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.reduction = check_positive_int(name, "reduction", reduction)
        check_choice(name, "fusion", fusion, ("add", "mul"))
        self.fusion = fusion
        hidden = max(1, channels // reduction)
        self.key = nn.Conv2d(channels, 1, 1, bias=False)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The attention-pooled context ``[B, C, 1, 1]``."""
        check_input(self, x, self.channels)
        weights = torch.softmax(self.key(x).flatten(2), dim=-1)             # [B, 1, HW]
        return torch.bmm(x.flatten(2), weights.transpose(1, 2))[..., None]   # [B, C, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform(self.context(x))
        return x + t if self.fusion == "add" else x * torch.sigmoid(t)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, fusion={self.fusion!r}"
