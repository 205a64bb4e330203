"""Triplet attention: three rotated Z-pool + conv gates capturing (C,W), (H,C) and (H,W) interactions."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["TripletAttention"]


class _ZPoolGate(nn.Module):
    """Gate of one plane: ``sigmoid(BN(conv_kxk([max; mean])))`` from the two Z-pooled maps ``[B, 2, P, Q]``."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, pooled_max: torch.Tensor, pooled_mean: torch.Tensor) -> torch.Tensor:
        """``[B, P, Q]`` twice -> the gate ``[B, P, Q]`` in (0, 1)."""
        z = torch.stack([pooled_max, pooled_mean], dim=1)
        return torch.sigmoid(self.bn(self.conv(z)))[:, 0]


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
    pooled axis; the output is the mean of the three re-rotated branches. Since each branch is
    ``x`` times a gate broadcast along its pooled axis, we compute ``x * mean(gates)`` with the gates
    kept at their small shapes ``[B, C, 1, W]``, ``[B, C, H, 1]``, ``[B, 1, H, W]`` (the same values
    as rotating the full tensor three times, without the three full-size permuted copies).

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

    def gates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The branch gates, broadcastable to ``x``: ``[B, C, 1, W]``, ``[B, C, H, 1]`` (and ``[B, 1, H, W]``)."""
        check_input(self, x, self.channels)
        # (C, W) plane, H pooled: the plane is [B, C, W] as in the rotated tensor [B, H, C, W].
        g_cw = self.cw(x.amax(dim=2), x.mean(dim=2))[:, :, None, :]
        # (H, C) plane, W pooled: the rotated tensor is [B, W, H, C], so the plane is [B, H, C].
        g_hc = self.hc(x.amax(dim=3).transpose(1, 2), x.mean(dim=3).transpose(1, 2)).transpose(1, 2)[..., None]
        gates = [g_cw, g_hc]
        if self.hw is not None:
            gates.append(self.hw(x.amax(dim=1), x.mean(dim=1))[:, None])
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        return x * (sum(gates) / len(gates))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.cw.conv.kernel_size[0]}, no_spatial={self.hw is None}"
