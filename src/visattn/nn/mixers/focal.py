"""FocalNet focal modulation: hierarchical depthwise contexts, gated aggregation, multiplicative modulation."""

from __future__ import annotations

import torch
from torch import nn

from ..linear import Linear
from .base import check_input
from ..registry import register_attn

__all__ = ["FocalModulation"]


@register_attn("focalnet", layout="channels_last", paper="Focal Modulation Networks (2022)",
               complexity="O(N C sum_l k_l^2)", backends="pure torch", bench_kwargs=dict())
class FocalModulation(nn.Module):
    """Focal modulation: ``y_i = q(x_i) * h(sum_l g_i^l z_i^l)``. ``x [B, H, W, C] -> [B, H, W, C]``.

    Yang et al., "Focal Modulation Networks" (2022). One linear layer gives the query ``q``, the
    context ``z^0`` and ``L + 1`` gates; ``z^l = GELU(DWConv_{k_l}(z^{l-1}))`` with
    ``k_l = focal_factor * (l - 1) + focal_window`` for ``l = 1..L`` (3, 5 by default) and a global
    level ``z^{L+1} = GELU(mean(z^L))``; the gated sum goes through ``h`` (a 1x1 conv) and multiplies
    ``q``; then ``proj``. No attention map: the cost is linear in tokens.

    Readings: the depthwise convs have no bias (FocalNet's code); ``normalize_modulator`` divides the
    gated sum by ``L + 1`` (off by default, as in FocalNet-T/S/B). A map smaller than a kernel is fine
    (zero padding, as in the paper).
    """

    def __init__(self, dim: int, focal_window: int = 3, focal_level: int = 2, focal_factor: int = 2,
                 proj_drop: float = 0.0, normalize_modulator: bool = False) -> None:
        super().__init__()
        if focal_level < 1 or focal_window < 1:
            raise ValueError(f"FocalModulation: focal_level={focal_level} and focal_window={focal_window} "
                             f"must be >= 1.")
        self.dim, self.focal_level, self.normalize_modulator = dim, focal_level, normalize_modulator
        self.f = Linear(dim, 2 * dim + focal_level + 1)
        self.kernel_sizes = [focal_factor * level + focal_window for level in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU())
            for k in self.kernel_sizes)
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        q, ctx, gates = torch.split(self.f(x).permute(0, 3, 1, 2), [self.dim, self.dim, self.focal_level + 1], 1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = nn.functional.gelu(ctx.mean((2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = q * self.h(ctx_all)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_sizes={self.kernel_sizes}, normalize_modulator={self.normalize_modulator}"
