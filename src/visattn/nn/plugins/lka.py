"""Large kernel attention (LKA) from the Visual Attention Network (VAN)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["LargeKernelAttention"]


def _dilated_depthwise_on_subgrids(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a depthwise, dilated, zero-padded "same" conv, as an undilated conv per sub-grid.

    With dilation ``d``, output ``(a + d*i, b + d*j)`` reads only inputs with the same residues
    ``(a, b) mod d``: splitting ``x`` into its ``d*d`` sub-grids (zero-padded up to a multiple of
    ``d``) and running the undilated kernel on each gives exactly the same sums. PyTorch's CPU
    kernels for dilated depthwise convs are several times slower than this on [8, 64, 56, 56].

    ``x: [B, C, H, W]`` -> ``[B, C, Hp, Wp]`` with ``Hp, Wp`` rounded up to multiples of ``d``; the
    caller crops (the extra rows and columns are not outputs). All reshuffles move whole channel
    vectors (channels-last memory), which keeps the copies cheap.
    """
    d = conv.dilation[0]
    b, c, h, w = x.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    nhwc = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, wp - w, 0, hp - h))              # [B, Hp, Wp, C]
    grids = nhwc.reshape(b, hp // d, d, wp // d, d, c).permute(0, 2, 4, 1, 3, 5)
    grids = grids.reshape(b * d * d, hp // d, wp // d, c).permute(0, 3, 1, 2)       # NCHW view, NHWC memory
    out = F.conv2d(grids, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2, groups=conv.groups)
    out = out.permute(0, 2, 3, 1).reshape(b, d, d, hp // d, wp // d, c).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, hp, wp, c).permute(0, 3, 1, 2)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


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

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype and memory format); any ``H, W >= 1``
    (all convs are zero-padded "same" convs).

    Paper: Guo, Lu, Liu, Cheng, Hu, "Visual Attention Network" (CVMJ 2023, arXiv 2022). Mechanism:
    a ``K x K`` convolution is decomposed into a ``(2d-1) x (2d-1)`` depthwise conv, a
    ``ceil(K/d) x ceil(K/d)`` depthwise conv with dilation ``d`` and a 1x1 conv;
    ``attn = conv1(conv_spatial(conv0(x)))`` and ``y = attn * x``. The default ``K = 21, d = 3``
    gives the paper's 5x5, 7x7 (dilation 3) and 1x1 convs; the submodule names follow VAN's, so a
    VAN LKA state dict loads as is.

    Parameters: ``(2d-1)^2*C + ceil(K/d)^2*C + C^2 + 3*C`` (weights plus biases, as in VAN):
    ``C^2 + 77*C`` for the default. Note on the receptive field: the composition covers
    ``(2d-1) + (ceil(K/d)-1)*d`` pixels per axis, 23x23 for the default (the paper's "21x21" is the
    nominal K; the decomposition reaches one pixel further on each side).

    CPU speed: the depthwise convs run in channels-last layout and the dilated one on sub-grids
    (:func:`_dilated_depthwise_on_subgrids`), the same arithmetic on PyTorch's fast depthwise path.
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
        self.conv0 = nn.Conv2d(channels, channels, k_local, padding=k_local // 2, groups=channels)
        self.conv_spatial = nn.Conv2d(channels, channels, k_dilated, padding=dilation * (k_dilated // 2),
                                      dilation=dilation, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    @property
    def receptive_field(self) -> int:
        """Pixels per axis that one output position depends on: ``(2d-1) + (ceil(K/d)-1)*d``."""
        return self.conv0.kernel_size[0] + (self.conv_spatial.kernel_size[0] - 1) * self.dilation

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map ``[B, C, H, W]`` (unbounded; the output is ``attention(x) * x``)."""
        check_input(self, x, self.channels)
        if x.device.type != "cpu" or self.dilation == 1:
            return self.conv1(self.conv_spatial(self.conv0(x)))
        h, w = x.shape[2:]
        a = self.conv0(x.contiguous(memory_format=torch.channels_last))
        # conv1 is 1x1, so it may run on the sub-grid padding too; cropping after it saves a copy.
        return self.conv1(_dilated_depthwise_on_subgrids(a, self.conv_spatial))[:, :, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.attention(x)
        # Elementwise ops may follow the channels-last operand; hand back the caller's layout.
        return y.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else y.contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}"
