"""VMamba's SS2D: selective scans along the four cross-scan routes of the map, summed."""

from __future__ import annotations

from ...scan.routes import Route, cross
from ..registry import register_attn
from .scan_base import VisualScanMixer

__all__ = ["SS2D"]


@register_attn("ss2d", layout="channels_last", paper="VMamba: Visual State Space Model (2024)",
               complexity="O(N C N_state)", backends="visattn selective scan", bench_kwargs=dict())
class SS2D(VisualScanMixer):
    """2-D selective scan (SS2D), VMamba's token mixer. ``x [B, H, W, C] -> [B, H, W, C]``.

    Liu et al., "VMamba: Visual State Space Model" (2024). ``x, z = in_proj(x)`` with
    ``d_inner = ssm_ratio * C``; ``x = SiLU(DWConv3x3(x))``; the cross-scan unfolds the map along four
    routes (row-major, column-major, both reversed); each route has its own selective-scan parameters
    (S6: ``x_proj``, ``dt_proj``, ``A``, ``D``); the cross-merge sums the four outputs back on the map;
    ``y = LayerNorm(y) * SiLU(z)``; ``out_proj``. Every output depends on the whole map: each token is
    reached by the scans that start before it in some direction.

    Defaults are the first VMamba-T's (``d_state=16``, ``ssm_ratio=2``, ``d_conv=3``, ``dt_rank =
    ceil(C / 16)``); the final VMamba-T uses ``d_state=1`` (and an MLP after the mixer, which belongs to the
    block). Readings: the parameter names and initialization are VMamba's; the scans run as one
    :func:`visattn.selective_scan` call with the routes as groups.
    """

    num_routes = 4

    def routes(self, H: int, W: int) -> tuple[Route, ...]:
        return cross(H, W)
