"""CCNet criss-cross attention (recurrent), as a union of two GNA patterns merged exactly."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional import merge_attentions, neighborhood_attention
from ._mixer_common import check_heads, check_input
from .registry import register_attn

__all__ = ["CrissCrossAttention"]


@register_attn("ccnet", layout="channels_last", paper="CCNet: Criss-Cross Attention for Semantic Segmentation (2019)",
               complexity="O(N (H + W))", backends="visattn NA op", bench_kwargs=dict(num_heads=3))
class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention: every pixel attends to its row and column (``H + W - 1``
    keys, itself once), ``recurrence`` times with shared weights. ``x [B, H, W, C] -> [B, H, W, C]``.

    Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (2019). One pass is
    ``x + gamma * A(x)`` with ``q, k = Linear(C, C/8)``, ``v = Linear(C, C)``, unscaled dot-product
    logits and a learned scalar ``gamma`` initialised to 0 (so the module starts as the identity);
    two passes (RCCA) let every pixel reach every other.

    On GNA: the row is NA with kernel ``(1, W)``, the column NA with kernel ``(H, 1)`` whose self slot
    is masked (``attn_bias = -inf``) so the pixel counts once; the two disjoint key sets are merged
    exactly through their log-sum-exps (:func:`~visattn.merge_attentions`).

    Readings / differences: the output includes CCNet's own residual (``x + gamma * ...``), as the
    paper's module does. ``num_heads`` (default 1 = CCNet) splits q/k and v channels into heads, an
    extension; C/8 must be divisible by it. No attention dropout (CCNet has none).
    """

    def __init__(self, dim: int, num_heads: int = 1, qk_reduction: int = 8, recurrence: int = 2,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if dim % qk_reduction or dim < qk_reduction:
            raise ValueError(f"CrissCrossAttention: dim={dim} must be a multiple of qk_reduction={qk_reduction}.")
        if recurrence < 1:
            raise ValueError(f"CrissCrossAttention: recurrence={recurrence} must be >= 1 (CCNet uses 2).")
        self.dim, self.num_heads, self.recurrence, self.backend = dim, num_heads, recurrence, backend
        qk_dim = dim // qk_reduction
        self.qk_head_dim = check_heads("CrissCrossAttention(dim/qk_reduction)", qk_dim, num_heads)
        self.v_head_dim = check_heads("CrissCrossAttention", dim, num_heads)
        self.query = nn.Linear(dim, qk_dim)
        self.key = nn.Linear(dim, qk_dim)
        self.value = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross aggregation ``A(x)`` (no residual, no gamma): ``[B, H, W, C]``."""
        B, H, W = x.shape[:3]
        heads = (self.num_heads, -1)
        q, k, v = (f(x).unflatten(-1, heads) for f in (self.query, self.key, self.value))
        na = dict(scale=1.0, return_lse=True, backend=self.backend)
        out_row, lse_row = neighborhood_attention(q, k, v, kernel_size=(1, W), **na)
        if H == 1:  # the column holds only the pixel itself, already counted in its row
            return out_row.flatten(-2)
        # Column window = the whole column, so slot j is row j; mask the query's own row there.
        self_slot = torch.eye(H, dtype=torch.bool, device=x.device)[:, None, None, :]  # [H, 1, 1, H]
        bias = torch.zeros(H, 1, 1, H, dtype=q.dtype, device=x.device).masked_fill_(self_slot, float("-inf"))
        out_col, lse_col = neighborhood_attention(q, k, v, kernel_size=(H, 1),
                                                  attn_bias=bias.expand(B, H, W, self.num_heads, H), **na)
        out, _ = merge_attentions([out_row, out_col], [lse_row, lse_col])
        return out.flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        for _ in range(self.recurrence):
            x = x + self.gamma * self.attend(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, recurrence={self.recurrence}"
