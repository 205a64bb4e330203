"""Convolutional tokenizers (stems) and downsamplers of hierarchical backbones.

All of them end channels-last (``[B, H, W, C]``), the layout the token mixers work in, and round
odd sizes up: an ``H x W`` map becomes ``ceil(H / s) x ceil(W / s)`` for stride ``s``.

* :class:`ConvStem`: NAT/DiNAT's two overlapping 3x3 stride-2 convolutions + LayerNorm (MambaOut's
  with a norm and an activation between them);
* :class:`ConvDownsample`: one strided convolution and a norm after it (NAT, FocalNet, CSWin) or
  before it (DaViT), between stages;
* :class:`PatchEmbed`: the same on the input image (Swin, FocalNet, DaViT, ViT stems).

An odd kernel ``k`` is padded by ``k // 2`` on every side; an even kernel must equal the stride
(patchify) and the map is zero-padded on the bottom/right to a multiple of it, as Swin and DaViT do.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvDownsample", "ConvStem", "PatchEmbed", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom/right of a channels-first ``x [B, C, H, W]`` to multiples of ``multiple``."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs + a norm: ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C]``
    (channels-first in, channels-last out).

    Defaults are NAT's: nothing between the convolutions, ``nn.LayerNorm`` after them. MambaOut's
    (InternImage's) stem puts a norm (``mid_norm=True``: ``norm1``, on the ``C/2`` channels) and an
    activation (``act_layer``) between them.
    """

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 mid_norm: bool = False, act_layer: Optional[Callable[[], nn.Module]] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = norm_layer(dim // 2) if mid_norm else None
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.norm1 is not None:  # a channels-last norm on the channels-first map, and back (views)
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(self.conv2(self.act(x)).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """Strided convolution with a norm after it (or before it), channels-last on both sides:
    ``[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), C_out]``.

    Defaults are NAT's (3x3, stride 2, no bias, LayerNorm after); FocalNet uses ``kernel_size=2,
    bias=True``, DaViT ``kernel_size=2, bias=True, norm_first=True``. ``norm_layer=None`` drops the
    norm. Raises ``ValueError`` for an even kernel that is not the stride (its padding is ambiguous).
    """

    def __init__(self, dim: int, out_dim: int, kernel_size: int = 3, stride: int = 2, bias: bool = False,
                 norm_layer: Optional[Callable[[int], nn.Module]] = nn.LayerNorm, norm_first: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 == 0 and kernel_size != stride:
            raise ValueError(f"{type(self).__name__}: kernel_size={kernel_size} is even but not the stride={stride}; "
                             f"use an odd kernel (padded by kernel_size // 2) or kernel_size == stride (patchify).")
        self.stride, self.norm_first = stride, norm_first
        self.patchify = kernel_size % 2 == 0
        padding = 0 if self.patchify else kernel_size // 2
        self.conv = nn.Conv2d(dim, out_dim, kernel_size, stride=stride, padding=padding, bias=bias)
        self.norm = norm_layer(dim if norm_first else out_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x)
        # A channels-last map seen as [B, C, H, W] is a channels_last-strided view: no copy either way.
        x = x.permute(0, 3, 1, 2)
        if self.patchify:
            x = pad_to_multiple(x, self.stride)
        x = self.conv(x).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


class PatchEmbed(ConvDownsample):
    """Stem: a strided convolution (+ norm) on the image, ``[B, C_in, H, W] -> [B, ceil(H/s), ceil(W/s), C]``.

    ``PatchEmbed(3, 96, kernel_size=4, stride=4, bias=True)`` is Swin's and FocalNet's patchify stem,
    ``kernel_size=7, stride=4`` DaViT's overlapping one. Arguments as :class:`ConvDownsample`.
    """

    def __init__(self, in_chans: int, dim: int, kernel_size: int = 4, stride: int = 4, bias: bool = True,
                 norm_layer: Optional[Callable[[int], nn.Module]] = nn.LayerNorm) -> None:
        super().__init__(in_chans, dim, kernel_size, stride, bias, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1))
