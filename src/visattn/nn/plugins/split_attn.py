"""Split attention (ResNeSt): a grouped conv producing ``radix`` splits, fused by a softmax over splits."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_divisible, check_input, check_positive_int
from ..registry import register_attn

__all__ = ["SplitAttention"]


@register_attn(
    "split_attn",
    layout="channels_first",
    paper="ResNeSt: Split-Attention Networks (2020)",
    complexity="O(C^2*k^2*H*W/K)",
    backends="pure torch",
    bench_kwargs={},
)
class SplitAttention(nn.Module):
    """ResNeSt's split-attention convolution: ``radix`` conv splits per cardinal group, softmax-fused.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``; ``C`` must be a
    multiple of ``cardinality * radix``.

    Paper: Zhang et al., "ResNeSt: Split-Attention Networks" (arXiv 2020, CVPRW 2022). Mechanism:
    a ``k x k`` conv with ``G = K*R`` groups (cardinality ``K``, radix ``R``) + BN + ReLU gives ``R``
    splits ``U_r: [B, C, H, W]``; ``s = GAP(sum_r U_r)``; per cardinal group, ``a = rSoftMax(
    fc2(ReLU(BN(fc1(s)))))`` (softmax over the ``R`` splits; a sigmoid when ``R = 1``);
    ``y = sum_r a_r * U_r``. Unlike the other plug-ins this is a convolution *replacement* (it
    contains the ``k x k`` conv), as in the paper; it is not a gate on ``x``.

    Parameters: ``C^2*k^2/K + 2*R*C`` (conv + BN) ``+ C*h/K + 2*h`` (fc1 + BN)
    ``+ R*C*h/K + R*C`` (fc2 with bias), with ``h = max(C*R // reduction, min_hidden)`` (the
    paper's rule, reduction 4 and at least 32). Deliberate difference: fc1 has no bias (BatchNorm
    follows it and would cancel it). BatchNorm makes training-mode outputs depend on batch
    neighbours; eval mode does not.
    """

    def __init__(
        self,
        channels: int,
        radix: int = 2,
        cardinality: int = 1,
        kernel_size: int = 3,
        reduction: int = 4,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        self.radix = check_positive_int(name, "radix", radix)
        self.cardinality = check_positive_int(name, "cardinality", cardinality)
        k = check_positive_int(name, "kernel_size", kernel_size)
        check_positive_int(name, "reduction", reduction)
        if k % 2 == 0:
            raise ValueError(f"{name}: kernel_size={k} must be odd to keep the output the size of the input.")
        groups = f"cardinality * radix ({cardinality} * {radix})"
        check_divisible(name, "channels", channels, groups, cardinality * radix)
        hidden = max(channels * radix // reduction, min_hidden)
        # fc1/fc2 are grouped by cardinality, so the hidden width must split evenly too.
        hidden += (-hidden) % cardinality
        self.hidden = hidden
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels * radix, k, padding=k // 2, groups=cardinality * radix, bias=False),
            nn.BatchNorm2d(channels * radix),
            nn.ReLU(inplace=True),
        )
        self.fc1 = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, groups=cardinality, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fc2 = nn.Conv2d(hidden, channels * radix, 1, groups=cardinality)

    def split_weights(self, splits: torch.Tensor) -> torch.Tensor:
        """Attention over splits ``[B, R, C]`` for ``splits: [B, R, C, H, W]``; sums to 1 over ``R`` when ``R > 1``."""
        b, r, c = splits.shape[:3]
        s = splits.sum(dim=1).mean(dim=(2, 3))[:, :, None, None]           # [B, C, 1, 1]
        logits = self.fc2(self.fc1(s)).view(b, self.cardinality, r, c // self.cardinality)
        if r == 1:
            weights = torch.sigmoid(logits)
        else:
            weights = torch.softmax(logits, dim=2)
        # fc2 emits channels grouped by cardinal group first; the conv's splits are radix-major.
        return weights.transpose(1, 2).reshape(b, r, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.channels)
        b, c, h, w = x.shape
        splits = self.conv(x).view(b, self.radix, c, h, w)
        weights = self.split_weights(splits)
        return (splits * weights[..., None, None]).sum(dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, radix={self.radix}, cardinality={self.cardinality}, hidden={self.hidden}"
