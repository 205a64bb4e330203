"""CCNet criss-cross attention (recurrent): every pixel attends to its row and its column."""

from __future__ import annotations

import torch
from torch import nn

from .base import check_heads, check_input
from ..registry import register_attn

__all__ = ["CrissCrossAttention", "criss_cross_attention"]


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """One softmax over each pixel's ``H + W - 1`` criss-cross keys (its row, then its column
    without itself). ``q, k [B, H, W, heads, D]``, ``v [B, H, W, heads, D_v]`` -> ``[B, H, W, heads, D_v]``.

    Two einsums, ``O(N (H + W))`` time and memory. The same numbers come from the GNA operator as
    ``NA(kernel=(1, W))`` and ``NA(kernel=(H, 1))`` with the self slot masked, merged through their
    log-sum-exps (:func:`~visattn.merge_attentions`); the tests prove it. We keep the einsums because
    on the portable backend they are ~10x cheaper (a 1-wide window wastes its tiles).
    """
    H = q.shape[1]
    row = torch.einsum("bijnd,bilnd->bijnl", q, k) * scale  # [B, H, W, h, W]
    col = torch.einsum("bijnd,bkjnd->bijnk", q, k) * scale  # [B, H, W, h, H]
    self_in_col = torch.eye(H, dtype=torch.bool, device=q.device)[None, :, None, None, :]
    col = col.masked_fill(self_in_col, float("-inf"))  # the pixel itself is counted in its row
    p = torch.cat([row, col], dim=-1).softmax(-1)
    return (torch.einsum("bijnl,bilnd->bijnd", p[..., : row.shape[-1]], v)
            + torch.einsum("bijnk,bkjnd->bijnd", p[..., row.shape[-1]:], v))


@register_attn("ccnet", layout="channels_last", paper="CCNet: Criss-Cross Attention for Semantic Segmentation (2019)",
               complexity="O(N (H + W))", backends="pure torch", bench_kwargs=dict(num_heads=3))
class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention: every pixel attends to its row and column (``H + W - 1``
    keys, itself once), ``recurrence`` times with shared weights. ``x [B, H, W, C] -> [B, H, W, C]``.

    Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation" (2019). One pass is
    ``x + gamma * A(x)`` with ``q, k = Linear(C, C/8)``, ``v = Linear(C, C)``, unscaled dot-product
    logits and a learned scalar ``gamma`` initialised to 0 (so the module starts as the identity);
    two passes (RCCA) let every pixel reach every other.

    The aggregation is :func:`criss_cross_attention` (a union of two GNA patterns, see there).

    Readings / differences: the output includes CCNet's own residual (``x + gamma * ...``), as the
    paper's module does. ``num_heads`` (default 1 = CCNet) splits q/k and v channels into heads, an
    extension; C/8 must be divisible by it. No attention dropout (CCNet has none).
    """

    def __init__(self, dim: int, num_heads: int = 1, qk_reduction: int = 8, recurrence: int = 2) -> None:
        super().__init__()
        if dim % qk_reduction or dim < qk_reduction:
            raise ValueError(f"CrissCrossAttention: dim={dim} must be a multiple of qk_reduction={qk_reduction}.")
        if recurrence < 1:
            raise ValueError(f"CrissCrossAttention: recurrence={recurrence} must be >= 1 (CCNet uses 2).")
        self.dim, self.num_heads, self.recurrence = dim, num_heads, recurrence
        qk_dim = dim // qk_reduction
        self.qk_head_dim = check_heads("CrissCrossAttention(dim/qk_reduction)", qk_dim, num_heads)
        self.v_head_dim = check_heads("CrissCrossAttention", dim, num_heads)
        self.query = nn.Linear(dim, qk_dim)
        self.key = nn.Linear(dim, qk_dim)
        self.value = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross aggregation ``A(x)`` (no residual, no gamma): ``[B, H, W, C]``."""
        heads = (self.num_heads, -1)
        q, k, v = (f(x).unflatten(-1, heads) for f in (self.query, self.key, self.value))
        return criss_cross_attention(q, k, v).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        for _ in range(self.recurrence):
            x = x + self.gamma * self.attend(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, recurrence={self.recurrence}"
