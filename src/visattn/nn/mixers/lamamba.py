"""LaMamba-Diff's token mixing: a global selective scan along continuous routes, then local window attention."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ...scan.routes import Route, snake
from ..registry import register_attn
from .base import check_input
from .scan_base import VisualScanMixer
from .window import WindowAttention

__all__ = ["ContinuousSS2D", "LaMamba"]


class ContinuousSS2D(VisualScanMixer):
    """VMamba's SS2D along LaMamba-Diff's four continuous routes: snakes over the rows from the top-left
    and the bottom-left corners, over the columns from the bottom-left and the bottom-right ones (a
    route never jumps: consecutive tokens are neighbours)."""

    num_routes = 4

    def routes(self, H: int, W: int) -> tuple[Route, ...]:
        return (snake(H, W), snake(H, W, from_bottom=True), snake(H, W, vertical=True, from_bottom=True),
                snake(H, W, vertical=True, from_bottom=True, from_right=True))


@register_attn("lamamba", layout="channels_last",
               paper="LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba "
                     "(2024)",
               complexity="O(N C N_state + N M^2 C)", backends="visattn selective scan + visattn NA op",
               bench_kwargs=dict(num_heads=3))
class LaMamba(nn.Module):
    """LaMamba-Diff's token mixing: a global selective scan, then local window attention.
    ``x [B, H, W, C] -> [B, H, W, C]``.

    Fu et al., "LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and
    Mamba" (2024). The block's two token-mixing residual steps, ``x1 = x + SS2D(LN(x))`` with the scan
    along four continuous snake routes (:class:`ContinuousSS2D`) and ``x2 = x1 + WA(LN(x1))``, Swin
    window attention (on visattn's neighborhood-attention operator, ``shift_size`` as Swin); this module
    returns ``x2 - x``, so a block adds it to its residual stream. Every output sees the whole map (the
    scan) and, at full resolution, its window (the attention).

    Defaults are LaMamba-Diff's (window 8, ``d_state=1``, ``ssm_ratio=2``, conv without bias). Its adaLN
    conditioning on the diffusion timestep and class, and the MLP, belong to the diffusion block and are
    not part of this mixer. ``backend`` is the attention's; the scan chooses its own path.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 8, shift_size: int = 0, d_state: int = 1,
                 ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto", d_conv: int = 3, conv_bias: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, backend: Optional[str] = None) -> None:
        super().__init__()
        self.dim = dim
        self.norm_ssm = norm_layer(dim)
        self.ssm = ContinuousSS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv,
                                  conv_bias=conv_bias, proj_drop=proj_drop)
        self.norm_attn = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        y = self.ssm(self.norm_ssm(x))
        return y + self.attn(self.norm_attn(x + y))
