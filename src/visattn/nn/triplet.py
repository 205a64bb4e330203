"""Triplet attention: three rotated Z-pool + conv gates capturing (C,H), (C,W) and (H,W) interactions."""

from __future__ import annotations

import torch
from torch import nn

from ._plugin_utils import check_input, check_positive_int
from .registry import register_attn

__all__ = ["TripletAttention"]


class _ZPoolGate(nn.Module):
    """Gate a tensor ``[B, D, P, Q]`` over its ``(P, Q)`` plane: Z-pool over ``D``, ``k x k`` conv, BN, sigmoid."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(z)))


@register_attn(
    "triplet",
    layout="channels_first",
    paper="Rotate to Attend: Convolutional Triplet Attention Module (2021)",
    complexity="O(C*H*W + k^2*(C*H + C*W + H*W))",
    backends="pure torch",
    bench_kwargs={},
)
class TripletAttention(nn.Module):
    """Average of three branches, each gating one plane of ``x`` seen from a rotated viewpoint.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``.

    Paper: Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend: Convolutional Triplet Attention
    Module" (WACV 2021). Mechanism: branch 1 rotates ``x`` so that ``H`` is the pooled axis and gates
    the ``(C, W)`` plane, branch 2 pools ``W`` and gates ``(H, C)``, branch 3 pools ``C`` and gates
    ``(H, W)``; each gate is ``sigmoid(BN(conv_kxk(Z-pool)))`` with Z-pool = ``[max; mean]`` over the
    pooled axis; the output is the mean of the three re-rotated branches.

    Parameters: ``3 * (2*k*k + 2)`` (three 2->1 convs without bias, three 1-channel BatchNorms):
    300 for ``k = 7``, i.e. the paper's 4.8K extra parameters over ResNet-50's 16 blocks. The
    BatchNorm follows the paper; in training mode it normalizes over the batch, so only eval-mode
    outputs are independent of batch neighbours. ``no_spatial=True`` drops the ``(H, W)`` branch
    (the paper's ablation) and averages the other two.
    """

    def __init__(self, channels: int, kernel_size: int = 7, no_spatial: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        k = check_positive_int(name, "kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"{name}: kernel_size={k} must be odd so that the gates stay aligned with x.")
        self.cw = _ZPoolGate(k)
        self.hc = _ZPoolGate(k)
        self.hw = None if no_spatial else _ZPoolGate(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.channels)
        # permute(0, 2, 1, 3) and permute(0, 3, 2, 1) are their own inverses.
        outs = [self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3), self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)]
        if self.hw is not None:
            outs.append(self.hw(x))
        return sum(outs) / len(outs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.cw.conv.kernel_size[0]}, no_spatial={self.hw is None}"
