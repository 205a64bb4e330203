"""MHS-VM: multi-head scan, each head subspace scanned along its own route pattern, fused by scan-route attention."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...scan.routes import Route, column, diagonal, raster, scan_routes, snake, spiral, unscan_routes
from ..registry import register_attn
from .base import check_heads, check_input
from .scan_base import RouteScan, dt_rank_for

__all__ = ["MultiHeadScan", "scan_route_attention"]

#: MHS-VM's scan patterns, in the order heads take them: two routes each (each also scanned reversed).
PATTERNS = {
    "C": lambda H, W: (snake(H, W), snake(H, W, vertical=True)),              # continuous (boustrophedon)
    "X": lambda H, W: (diagonal(H, W), diagonal(H, W, mirror=True)),          # diagonal zigzags
    "S": lambda H, W: (spiral(H, W), spiral(H, W, mirror=True)),              # spirals
    "Z": lambda H, W: (raster(H, W), column(H, W)),                           # row / column major
}


def scan_route_attention(ys: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """MHS-VM's scan-route attention (its gated fusion unit): ``ys [..., K, C]`` of ``K`` routes fused as
    ``sum_k y_k * ReLU(cv - threshold)`` with the relative coefficient of variation
    ``cv = std_k(y) / (mean_k(y - min_k y) + 1e-5)`` (unbiased std), per token and channel."""
    cv = ys.std(-2) / ((ys - ys.amin(-2, keepdim=True)).mean(-2) + 1e-5)
    return ys.sum(-2) * F.relu(cv - threshold)


@register_attn("mhs_vm", layout="channels_last",
               paper="MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba (2024)",
               complexity="O(N C N_state)", backends="visattn selective scan", bench_kwargs=dict(num_heads=3))
class MultiHeadScan(nn.Module):
    """Multi-head scan (MHS) in the gated visual state-space layer of MHS-VM. ``x [B, H, W, C] -> [B, H, W, C]``.

    Ji, "MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba" (2024). ``x, z = in_proj(x)``;
    ``x = SiLU(DWConv3x3(x))``; a projection splits ``x`` into ``num_heads`` subspaces of ``C / heads``
    channels; head ``i`` scans its subspace along pattern ``i`` of C (snake rows, snake columns), X
    (diagonal zigzag, mirrored), S (spiral, mirrored), Z (row-, column-major), each route forwards and
    reversed (four scans, own parameters); the four outputs are fused by scan-route attention
    (:func:`scan_route_attention`); heads are concatenated, LayerNorm, projected; then
    ``out_norm(y) * SiLU(z)``. All scans run as one :func:`visattn.selective_scan` call.

    Readings (the official code): ``d_inner = C`` (no expansion), ``dt_rank = ceil(C_head / 16)``, no
    output projection after the gate. Deliberate difference: on a map whose innermost ring is a single
    row or column the official spiral revisits tokens and truncates; ours visits each token once
    (identical on even square maps).
    """

    def __init__(self, dim: int, num_heads: int = 4, d_state: int = 16, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, conv_bias: bool = True, bias: bool = False, threshold: float = 0.0,
                 proj_drop: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__()
        if not 1 <= num_heads <= len(PATTERNS):
            raise ValueError(f"MultiHeadScan: num_heads={num_heads}; MHS-VM has {len(PATTERNS)} scan patterns "
                             f"({', '.join(PATTERNS)}), one per head: choose 1 to {len(PATTERNS)}.")
        self.dim, self.num_heads, self.threshold = dim, num_heads, threshold
        self.head_dim = check_heads("MultiHeadScan", dim, num_heads)
        self.patterns = tuple(PATTERNS)[:num_heads]
        self.in_proj = nn.Linear(dim, 2 * dim, bias=bias)
        self.conv2d = nn.Conv2d(dim, dim, d_conv, padding=(d_conv - 1) // 2, groups=dim, bias=conv_bias)
        self.x_ssproj = nn.Linear(dim, dim, bias=False)
        rank = dt_rank_for(self.head_dim, dt_rank)
        self.ssm = RouteScan(self.head_dim, 4 * num_heads, d_state, rank, backend=backend)
        self.cat_norm = nn.LayerNorm(dim)
        self.y_proj = nn.Linear(dim, dim, bias=False)
        self.out_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(proj_drop)

    def routes(self, H: int, W: int) -> list[tuple[Route, ...]]:
        """Each head's four routes: its pattern's two, and each reversed."""
        return [(a, a.flip(), b, b.flip()) for a, b in (PATTERNS[p](H, W) for p in self.patterns)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W = check_input(self, x, self.dim)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        heads = self.x_ssproj(x).split(self.head_dim, dim=-1)
        per_head = self.routes(H, W)
        xs = torch.cat([scan_routes(h, r) for h, r in zip(heads, per_head)], dim=2)  # [B, L, 4 * heads, C_h]
        ys = unscan_routes(self.ssm(xs), [r for rs in per_head for r in rs], (H, W))
        ys = ys.view(B, H, W, self.num_heads, 4, self.head_dim)
        y = scan_route_attention(ys, self.threshold).flatten(-2)
        y = self.out_norm(self.y_proj(self.cat_norm(y))) * F.silu(z)
        return self.dropout(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, patterns={''.join(self.patterns)}"
