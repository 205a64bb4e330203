"""MBConv: the pre-norm inverted-bottleneck convolution block of MaxViT, CoAtNet and MOAT."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..plugins.se import SqueezeExcite
from .drop_path import DropPath

__all__ = ["MBConv", "pad_same"]


def pad_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """TensorFlow's ``"SAME"`` padding of ``x [B, C, H, W]`` for a ``kernel_size``/``stride`` window:
    ``ceil(L / stride)`` outputs per axis, the odd pixel of padding at the bottom/right."""
    pads = []
    for length in (x.shape[-1], x.shape[-2]):  # F.pad lists the last axis first
        total = max((math.ceil(length / stride) - 1) * stride + kernel_size - length, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _NormAct(nn.Sequential):
    def __init__(self, channels: int, eps: float, act_layer: Callable[[], nn.Module] | None) -> None:
        super().__init__(nn.BatchNorm2d(channels, eps=eps), act_layer() if act_layer is not None else nn.Identity())


class MBConv(nn.Module):
    """Pre-norm MBConv with squeeze-excitation, channels-last: ``[B, H, W, C_in] -> [B, H/s, W/s, C_out]``.

    Sandler et al., "MobileNetV2" (2018) as MaxViT (Tu et al., 2022) and CoAtNet use it::

        x -> BN -> 1x1 (C_in -> E) -> BN, act -> kxk depthwise, stride s -> BN, act -> SE -> 1x1 (E -> C_out)

    plus a shortcut: a 2x2 average pool when the block strides, a 1x1 conv when it changes width,
    else the identity. ``E = expand_ratio * C_out``; the SE hidden width is
    ``se_ratio * C_out``. ``tf_padding=True`` pads the strided conv and pool like TensorFlow's
    ``"SAME"`` (MaxViT's and MOAT's checkpoints), else ``k // 2`` on every side and a pool that
    rounds up. ``drop_path`` is stochastic depth on the residual branch.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, expand_ratio: float = 4.0, kernel_size: int = 3,
                 se_ratio: float = 0.25, act_layer: Callable[[], nn.Module] = nn.GELU, norm_eps: float = 1e-5,
                 tf_padding: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv: stride={stride} must be 1 or 2.")
        mid = int(out_dim * expand_ratio)
        self.stride, self.kernel_size, self.tf_padding = stride, kernel_size, tf_padding
        self.pool = stride == 2
        # TF's "SAME" is k // 2 on every side at stride 1 (odd k); only the strided conv pads unevenly.
        self.uneven_pad = tf_padding and stride > 1
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.pre_norm = _NormAct(in_dim, norm_eps, None)
        self.conv1 = nn.Conv2d(in_dim, mid, 1, bias=False)
        self.norm1 = _NormAct(mid, norm_eps, act_layer)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size, stride=stride, groups=mid, bias=False,
                               padding=0 if self.uneven_pad else kernel_size // 2)
        self.norm2 = _NormAct(mid, norm_eps, act_layer)
        self.se = SqueezeExcite(mid, hidden=int(se_ratio * out_dim), act_layer=nn.SiLU) if se_ratio else nn.Identity()
        self.conv3 = nn.Conv2d(mid, out_dim, 1)
        self.drop_path = DropPath(drop_path)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            if self.tf_padding:
                x = F.avg_pool2d(pad_same(x, 2, 2), 2)
            else:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view: the convs run in that memory format
        y = self.norm1(self.conv1(self.pre_norm(x)))
        if self.uneven_pad:
            y = pad_same(y, self.kernel_size, self.stride)
        y = self.conv3(self.se(self.norm2(self.conv2(y))))
        return (self.drop_path(y) + self._shortcut(x)).permute(0, 2, 3, 1)
