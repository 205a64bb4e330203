"""Vision Mamba (Vim): the bidirectional Mamba block over a token sequence."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...scan.routes import merge_routes, raster, scan_routes
from ..registry import register_attn
from .scan_base import RouteScan, dt_rank_for

__all__ = ["BidirectionalMamba", "causal_depthwise_conv"]


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Mamba's causal depthwise ``Conv1d`` on a channels-last sequence: ``x [B, L, C]``, ``weight [C, 1, k]``;
    ``y_t = bias + sum_i weight[:, 0, i] * x_{t - k + 1 + i}`` (zeros before the start).

    The same as ``conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=C)[..., :L]``, as ``k``
    shifted multiply-adds in the sequence's own layout: PyTorch's CPU depthwise ``conv1d`` backward takes
    seconds on the transposed (non-contiguous) view a channels-last sequence gives it.
    """
    k, L = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    y = sum(padded[:, i:i + L] * weight[:, 0, i] for i in range(k))
    return y + bias if bias is not None else y


@register_attn("vim", layout="channels_last",
               paper="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space "
                     "Model (2024)",
               complexity="O(N C N_state)", backends="visattn selective scan", bench_kwargs=dict())
class BidirectionalMamba(nn.Module):
    """Vim's bidirectional Mamba mixer. ``x [B, H, W, C]`` (flattened row-major) or ``[B, L, C]`` -> same shape.

    Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
    Model" (2024). ``x, z = in_proj(x)`` (``d_inner = expand * C``); the sequence is processed forwards
    and backwards by two Mamba branches with their own causal depthwise ``Conv1d`` (``d_conv`` taps) and
    SiLU, ``x_proj``, ``dt_proj``, ``A``, ``D``; each branch's scan output is gated by ``SiLU(z)`` of its
    own direction; the backward output is flipped back, the two are averaged (Vim's ``if_divide_out``;
    summed with ``divide_out=False``) and projected by ``out_proj``. Every token sees the whole sequence.

    Defaults are Vim's (``d_state=16``, ``expand=2``, ``d_conv=4``, ``dt_rank = ceil(C / 16)``, no biases
    on the projections). The class token and position embeddings of the Vim model belong to the model;
    both directions run as one :func:`visattn.selective_scan` call.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: float = 2.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 4, conv_bias: bool = True, bias: bool = False, divide_out: bool = True,
                 proj_drop: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__()
        d_inner = int(expand * dim)
        if d_inner < 1 or d_conv < 1:
            raise ValueError(f"BidirectionalMamba: expand={expand} and d_conv={d_conv} must give >= 1 inner channel "
                             f"and >= 1 convolution tap.")
        self.dim, self.d_inner, self.divide_out = dim, d_inner, divide_out
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        # both directions' causal depthwise convolutions, channels [forward | backward]
        self.conv1d = nn.Conv1d(2 * d_inner, 2 * d_inner, d_conv, padding=d_conv - 1, groups=2 * d_inner,
                                bias=conv_bias)
        self.ssm = RouteScan(d_inner, 2, d_state, dt_rank_for(dim, dt_rank), backend=backend)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(f"BidirectionalMamba: expected a channels-last input [B, H, W, {self.dim}] or a token "
                             f"sequence [B, L, {self.dim}], got {tuple(x.shape)}. Permute a [B, C, H, W] tensor with "
                             f"x.permute(0, 2, 3, 1).")
        shape = x.shape
        grid = x if x.dim() == 4 else x[:, None]
        size = (grid.shape[1], grid.shape[2])
        routes = (raster(*size), raster(*size).flip())
        xs, zs = scan_routes(self.in_proj(grid), routes).chunk(2, dim=-1)  # [B, L, 2, d_inner] each
        B, L = xs.shape[:2]
        conv = causal_depthwise_conv(xs.reshape(B, L, 2 * self.d_inner), self.conv1d.weight, self.conv1d.bias)
        xs = F.silu(conv).view(B, L, 2, self.d_inner)
        y = merge_routes(self.ssm(xs, z=zs.contiguous()), routes, size)
        if self.divide_out:
            y = y / 2
        return self.dropout(self.out_proj(y)).reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_inner={self.d_inner}, divide_out={self.divide_out}"
