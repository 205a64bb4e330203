"""LocalMamba: SS2D whose routes mix global scans and windowed (local) scans, fused by channel attention."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import nn

from ...scan.routes import Route, column, raster, unscan_routes, windows
from ..registry import register_attn
from .scan_base import VisualScanMixer

__all__ = ["LocalScan", "ScanChannelAttention"]

_DIRECTION = re.compile(r"^(h|v|w(\d+))(_flip)?$")


class ScanChannelAttention(nn.Module):
    """LocalMamba's per-route attention: a channel gate from the route output's global average.

    ``x [B, N, C]``: ``g = sigmoid(W2 GELU(W1 mean_N(LayerNorm(x))))`` (``C -> C/8 -> C``), ``x * g``.
    The paper's module also has a spatial gate; its code (used here) keeps only the channel one.
    """

    def __init__(self, channels: int, ratio: float = 0.125) -> None:
        super().__init__()
        reduced = max(1, int(channels * ratio))
        self.norm = nn.LayerNorm(channels)
        self.global_reduce = nn.Linear(channels, reduced)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.act(self.global_reduce(self.norm(x).mean(1, keepdim=True)))
        return x * torch.sigmoid(self.channel_select(g))


@register_attn("local_scan", layout="channels_last",
               paper="LocalMamba: Visual State Space Model with Windowed Selective Scan (2024)",
               complexity="O(N C N_state)", backends="visattn selective scan", bench_kwargs=dict())
class LocalScan(VisualScanMixer):
    """LocalMamba's SS2D with searched scan directions. ``x [B, H, W, C] -> [B, H, W, C]``.

    Huang et al., "LocalMamba: Visual State Space Model with Windowed Selective Scan" (2024). VMamba's
    SS2D (:class:`~visattn.nn.mixers.ss2d.SS2D`) where each layer scans along its own set of
    ``directions``: ``"h"`` (row-major), ``"v"`` (column-major), ``"w<k>"`` (``k x k`` windows one after
    another, row-major inside each), each optionally reversed (``"_flip"``). The routes' outputs are put
    back on the map, each gated by :class:`ScanChannelAttention` (shared by the routes), and summed.
    The default directions are the first layer of LocalVMamba-T's searched set.

    A windowed route keeps the tokens of a window together in the sequence, so a token's first
    predecessors are its window's; the state is not reset between windows (as in LocalMamba's code),
    so it also sees the windows scanned before. Deliberate difference: where ``k`` does not divide a
    side, LocalMamba zero-pads the map and the padded tokens enter the scan; here the last window of
    the side is the partial one of real tokens (the blocked windows of :mod:`visattn.spec`; identical
    when ``k`` divides the side). ``channel_attention=False`` drops the gate (an ablation: the gate's
    global average makes every output depend on every token).
    """

    def __init__(self, dim: int, directions: Sequence[str] = ("h", "h_flip", "w7", "w7_flip"),
                 channel_attention: bool = True, **kwargs) -> None:
        directions = tuple(directions)
        for d in directions:
            if not _DIRECTION.match(d):
                raise ValueError(f"LocalScan: direction {d!r} is not one of 'h', 'v', 'w<k>' (e.g. 'w7'), each "
                                 f"optionally followed by '_flip'.")
        if not directions:
            raise ValueError("LocalScan: directions is empty; give at least one, e.g. ('h', 'w7').")
        super().__init__(dim, num_routes=len(directions), **kwargs)
        self.directions = directions
        self.attn: Optional[ScanChannelAttention] = ScanChannelAttention(self.d_inner) if channel_attention else None

    def routes(self, H: int, W: int) -> tuple[Route, ...]:
        out = []
        for d in self.directions:
            kind, window, flip = _DIRECTION.match(d).groups()
            route = raster(H, W) if kind == "h" else column(H, W) if kind == "v" else windows(H, W, int(window))
            out.append(route.flip() if flip else route)
        return tuple(out)

    def merge(self, ys: torch.Tensor, routes: Sequence[Route], size: tuple[int, int]) -> torch.Tensor:
        maps = unscan_routes(ys, routes, size)  # [B, H, W, K, C]
        if self.attn is None:
            return maps.sum(-2)
        B, H, W, K, C = maps.shape
        gated = self.attn(maps.permute(0, 3, 1, 2, 4).reshape(B * K, H * W, C))
        return gated.view(B, K, H, W, C).sum(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, directions={self.directions}"
