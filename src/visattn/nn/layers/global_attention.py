"""Dense (global) self-attention over every token of a channels-last map, through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mixers.base import QKVMixer, check_input

__all__ = ["GlobalAttention2D"]


class GlobalAttention2D(QKVMixer):
    """Dense self-attention over all ``H*W`` tokens (SDPA): neighborhood attention with the window removed.

    ``x [B, H, W, C] -> [B, H, W, C]``. Same ``qkv``/``proj`` parameters as
    :class:`~visattn.nn.NeighborhoodAttention2D` minus the relative-position table (which has no
    meaning without a window), so a NAT block can swap one for the other as a dense baseline
    (``attn_type="global"``); cost ``O((HW)^2)``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias, None, attn_drop, proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of heads-last ``q, k, v [B, H, W, heads, D]`` over all tokens: ``[B, H, W, heads, D]``."""
        B, H, W = q.shape[:3]
        # [B, H, W, heads, D] -> [B, heads, H*W, D], SDPA's layout
        q, k, v = (t.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        return out.transpose(1, 2).reshape(B, H, W, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        return self._out(self.attend(*self._qkv(x)))
