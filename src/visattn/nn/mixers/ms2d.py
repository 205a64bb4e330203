"""MSVMamba's MS2D: one full-resolution scan plus three scans of a 2x-downsampled map."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...scan.routes import column, merge_routes, raster, scan_routes
from ..registry import register_attn
from .base import check_input
from .scan_base import RouteScan, dt_rank_for

__all__ = ["MS2D", "SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Channel gate from the global average, channels-last: ``x [B, H, W, C] * sigmoid(W2 ReLU(W1 mean(x)))``
    (``C -> C / reduction -> C``, no biases: MSVMamba's SE)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, max(1, channels // reduction), bias=False)
        self.fc2 = nn.Linear(max(1, channels // reduction), channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((1, 2), keepdim=True)))))


@register_attn("ms2d", layout="channels_last",
               paper="Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model (2024)",
               complexity="O(N C N_state)", backends="visattn selective scan", bench_kwargs=dict())
class MS2D(nn.Module):
    """Multi-scale 2-D selective scan (MS2D), MSVMamba's token mixer. ``x [B, H, W, C] -> [B, H, W, C]``.

    Shi et al., "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model" (2024). Of
    VMamba's four scan directions only the first (row-major) runs at full resolution, on
    ``SiLU(DWConv3x3(x))``; the other three (row-major reversed, column-major, column-major reversed)
    run on ``SiLU(DWConv7x7/2(x))``, a 2x-downsampled map, as one sequence (the three routes one after
    the other, one parameter set: MSVMamba's code with its default ``ms_split``). Both outputs go
    through the shared ``out_norm``; the low-resolution one is merged on its map, upsampled bilinearly
    and added; an SE gate (reduction 8), ``* SiLU(z)``, ``out_proj``. The full-resolution scan sees only
    what precedes a token in row-major order; the low-resolution branch, scanned both ways, gives every
    output a view of the whole map at a quarter of the scan cost.

    Defaults are MSVMamba-T's (``d_state=1``, ``ssm_ratio=2``, SE on). ``x`` of any size: the strided
    conv gives ``ceil(H / 2) x ceil(W / 2)``.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, conv_bias: bool = True, bias: bool = False, se: bool = True, proj_drop: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.SiLU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        if d_inner < 1 or d_conv < 2:
            raise ValueError(f"MS2D: ssm_ratio={ssm_ratio} and d_conv={d_conv} must give >= 1 inner channel and a "
                             f"convolution (d_conv >= 2) on the full-resolution branch.")
        self.dim, self.d_inner = dim, d_inner
        rank = dt_rank_for(dim, dt_rank)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.conv2d_b1 = nn.Conv2d(d_inner, d_inner, 7, stride=2, padding=3, groups=d_inner, bias=conv_bias)
        self.ssm = RouteScan(d_inner, 1, d_state, rank, backend=backend)
        self.ssm_low = RouteScan(d_inner, 1, d_state, rank, backend=backend)
        self.out_norm = norm_layer(d_inner)
        self.se = SqueezeExcite(d_inner) if se else nn.Identity()
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        xc = x.permute(0, 3, 1, 2)
        full = self.act(self.conv2d(xc)).permute(0, 2, 3, 1)
        low = self.act(self.conv2d_b1(xc)).permute(0, 2, 3, 1)
        y = self.out_norm(self.ssm(scan_routes(full, [raster(H, W)]))).view(B, H, W, self.d_inner)
        h, w = low.shape[1:3]
        routes = (raster(h, w).flip(), column(h, w), column(h, w).flip())
        seq = scan_routes(low, routes)  # [B, L, 3, C]: one sequence, the three routes in turn
        L = seq.shape[1]
        out = self.out_norm(self.ssm_low(seq.transpose(1, 2).reshape(B, 3 * L, 1, self.d_inner)))
        y_low = merge_routes(out.view(B, 3, L, self.d_inner).transpose(1, 2), routes, (h, w))
        y_low = F.interpolate(y_low.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
        y = self.se(y + y_low.permute(0, 2, 3, 1)) * self.act(z)
        return self.dropout(self.out_proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_inner={self.d_inner}"
