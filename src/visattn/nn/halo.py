"""HaloNet blocked local self-attention with haloed key regions, on the GNA operator."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from ..spec import make_spec, neighbor_table
from ._mixer_common import QKVMixer, check_input, na_attend
from .registry import register_attn

__all__ = ["HaloAttention"]


@lru_cache(maxsize=32)
def _axis_offsets(H: int, W: int, kernel: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis relative offsets of the neighbourhood slots, as indices into a ``2k-1`` table: ``dy [H, k0]``
    (query row, slot row) and ``dx [W, k1]`` (query column, slot column), from the spec's flat
    relative index ``dy * (2k-1) + dx`` (effective kernels ``k0, k1`` per axis)."""
    spec = make_spec("HaloAttention", (H, W), kernel, block)
    _, _, rel = neighbor_table(spec)  # [H*W, k0*k1]
    k0, k1 = spec.kernel_size
    rel = rel.reshape(H, W, k0, k1)
    span = 2 * kernel - 1
    return (rel[:, 0, :, 0] // span).to(device), (rel[0, :, 0, :] % span).to(device)


@register_attn("halo", layout="channels_last",
               paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (2021)",
               complexity="O(N (b+2h)^2)", backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class HaloAttention(QKVMixer):
    """HaloNet attention: each ``b x b`` query block attends to its ``(b+2h) x (b+2h)`` haloed region,
    with content-dependent relative position logits. ``x [B, H, W, C] -> [B, H, W, C]``.

    Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (2021).
    Logits are ``scale * q.(k + r_row[dy] + r_col[dx])`` with learned ``r_row, r_col [2k-1, C/heads]``
    (factorised relative embeddings shared by the heads, as in HaloNet / SASA), ``k = b + 2h``.

    On GNA: kernel ``b + 2h`` with stride ``b`` puts every query of a block on the same window,
    ``[block_start - h, block_end + h)`` away from the borders, i.e. exactly HaloNet's region; the
    relative logits enter as ``attn_bias``. So it runs on every visattn backend.

    Deliberate differences: at the image border HaloNet zero-pads, so border blocks see zero keys
    (logit = relative term only) and zero values that dilute their attention; GNA instead moves the
    region inward, so every query sees ``(b+2h)^2`` real tokens (identical to HaloNet on interior
    blocks; both are tested). HaloNet has no output projection inside the attention (the bottleneck's
    1x1 conv follows); we keep ``proj`` for the zoo's common interface. When ``b`` does not divide a
    side (HaloNet requires it), the last partial block follows GNA's stride rule.
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 8, halo_size: int = 3, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"HaloAttention: need block_size >= 1 and halo_size >= 0, got {block_size}, {halo_size}.")
        self.block_size, self.halo_size, self.backend = block_size, halo_size, backend
        self.kernel_size = block_size + 2 * halo_size
        std = self.head_dim ** -0.5
        self.rel_row = nn.Parameter(torch.randn(2 * self.kernel_size - 1, self.head_dim) * std)
        self.rel_col = nn.Parameter(torch.randn(2 * self.kernel_size - 1, self.head_dim) * std)

    def _rel_logits(self, q: torch.Tensor) -> torch.Tensor:
        """``q [B, H, W, heads, D]`` -> ``scale * q.(r_row[dy] + r_col[dx])`` per neighbourhood slot:
        ``[B, H, W, heads, K]``. The row offset dy depends only on the query's row and the slot's row,
        dx on the columns, so the two terms are gathered per axis (``k`` slots each) and added by
        broadcasting over the ``k x k`` slots, never gathering ``[..., K]`` indices."""
        B, H, W, nh, _ = q.shape
        dy, dx = _axis_offsets(H, W, self.kernel_size, self.block_size, q.device)  # [H, k0], [W, k1]
        lr = torch.einsum("bhwnd,rd->bhwnr", q, self.rel_row)  # [B, H, W, heads, 2k-1]
        lc = torch.einsum("bhwnd,rd->bhwnr", q, self.rel_col)
        rows = torch.gather(lr, 4, dy[None, :, None, None, :].expand(B, H, W, nh, dy.shape[1]))
        cols = torch.gather(lc, 4, dx[None, None, :, None, :].expand(B, H, W, nh, dx.shape[1]))
        bias = (rows * self.scale)[..., :, None] + (cols * self.scale)[..., None, :]
        return bias.reshape(B, H, W, nh, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        o = na_attend(q, k, v, na_args=dict(kernel_size=self.kernel_size, stride=self.block_size),
                      scale=self.scale, attn_bias=self._rel_logits(q), attn_drop=self.attn_drop,
                      training=self.training, backend=self.backend)
        return self._out(o)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, block_size={self.block_size}, halo_size={self.halo_size}"
