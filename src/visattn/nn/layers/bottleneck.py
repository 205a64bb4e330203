"""ResNet's bottleneck block, whose 3x3 convolution a token mixer can replace (BoTNet, HaloNet, SASA)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..registry import create_attn
from .drop_path import DropPath

__all__ = ["Bottleneck", "ConvNormAct"]


class ConvNormAct(nn.Sequential):
    """``conv`` (no bias, padding ``k // 2``) + ``bn`` (BatchNorm) + ``act`` (ReLU, or none): channels-first."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chs))
        self.add_module("act", nn.ReLU(inplace=True) if act else nn.Identity())


class Bottleneck(nn.Module):
    """``relu(conv3(mid(conv1(x))) + shortcut(x))``, channels-last: ``[B, H, W, C_in] -> [B, H/s, W/s, C_out]``.

    He et al., "Deep Residual Learning" (2016): ``conv1`` (1x1, BN, ReLU) to ``mid`` channels,
    the spatial layer, ``conv3`` (1x1, BN) to ``C_out``, plus a shortcut (1x1 stride-``s`` conv + BN
    when the width or stride changes). The spatial layer is ``conv2`` (3x3 stride-``s`` conv, BN,
    ReLU) or, with ``mixer``, a token mixer ``attn`` (a registered name or a callable built as
    ``mixer(mid, stride=s, **mixer_kwargs)``, channels-last) followed by ``post_attn`` (BN, ReLU):
    the self-attention bottleneck of BoTNet and HaloNet. ``drop_path`` is stochastic depth.
    """

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, stride: int = 1,
                 mixer: Optional[Union[str, Callable[..., nn.Module]]] = None, mixer_kwargs: Optional[dict] = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        needs_shortcut = in_chs != out_chs or stride != 1
        self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride, act=False) if needs_shortcut else nn.Identity()
        self.conv1 = ConvNormAct(in_chs, mid_chs)
        if mixer is None:
            self.conv2 = ConvNormAct(mid_chs, mid_chs, 3, stride)
        else:
            build = (lambda d, **kw: create_attn(mixer, d, **kw)) if isinstance(mixer, str) else mixer
            self.attn = build(mid_chs, stride=stride, **(mixer_kwargs or {}))
            self.post_attn = nn.Sequential(nn.BatchNorm2d(mid_chs), nn.ReLU(inplace=True))
        self.conv3 = ConvNormAct(mid_chs, out_chs, act=False)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view: the convs run in that memory format
        y = self.conv1(x)
        if hasattr(self, "conv2"):
            y = self.conv2(y)
        else:
            y = self.post_attn(self.attn(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        y = self.drop_path(self.conv3(y)) + self.shortcut(x)
        return self.act(y).permute(0, 2, 3, 1)
