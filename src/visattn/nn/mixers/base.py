"""Pieces shared by the token mixers (channels-last ``[B, *S, C]``): the input check, the
qkv/projection pair most mixers start and end with (:class:`QKVMixer`), and one call into the GNA
operator that also handles attention dropout (:func:`na_attend`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...functional import na_av, neighborhood_attention
from ..linear import Linear


def check_input(module: nn.Module, x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """Raise unless ``x`` is ``[B, H, W, dim]``; return ``(B, H, W)``."""
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(f"{type(module).__name__}: expected a channels-last input [B, H, W, {dim}], got "
                         f"{tuple(x.shape)}. Permute a [B, C, H, W] tensor with x.permute(0, 2, 3, 1).")
    return x.shape[0], x.shape[1], x.shape[2]


def check_heads(cls: str, dim: int, num_heads: int, dim_arg: str = "dim") -> int:
    """Head dim for ``dim`` channels split into ``num_heads`` heads, or an error naming the
    constructor argument ``dim_arg`` that holds the channel count."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{cls}: {dim_arg}={dim} is not divisible by num_heads={num_heads}; choose num_heads "
                         f"among the divisors of {dim_arg}.")
    return dim // num_heads


def na_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, na_args: dict, scale: float,
              attn_drop: float = 0.0, training: bool = False, backend: Optional[str] = None,
              **extras) -> torch.Tensor:
    """GNA ``out [B, *S, heads, D_v]`` from heads-last ``q, k [B, *S, heads, D]``, ``v [.., D_v]``.

    With attention dropout active the probabilities must exist explicitly, so that path asks the
    operator for them and applies them with :func:`~visattn.functional.na_av` (slower, memory
    ``O(tokens * K)``); otherwise the fused path runs. ``extras`` are ``rpb``/``attn_bias``.
    """
    if attn_drop > 0 and training:
        _, attn = neighborhood_attention(q, k, v, **na_args, scale=scale, return_attn=True, backend=backend,
                                         **extras)
        attn = nn.functional.dropout(attn, attn_drop, training=True)
        return na_av(attn, v, **na_args)
    return neighborhood_attention(q, k, v, **na_args, scale=scale, backend=backend, **extras)


class QKVMixer(nn.Module):
    """Base of the softmax mixers: ``qkv = Linear(C, 3C)``, heads, ``proj = Linear(C, C)``.

    Subclasses implement ``forward``; ``_qkv(x)`` turns a channels-last ``x [B, *S, C]`` of any
    rank into heads-last ``q, k, v [B, *S, heads, C/heads]`` and ``_out(o)`` merges the heads of
    ``o [B, *S, heads, C/heads]`` and projects back to ``[B, *S, C]``. ``attn_drop`` is a
    probability (applied by :func:`na_attend` or the subclass), ``proj_drop`` a module.
    """

    #: the subclass constructor's name for the channel count, for error messages
    dim_arg: str = "dim"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = check_heads(type(self).__name__, dim, num_heads, self.dim_arg)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim).unbind(-3)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(o.flatten(-2)))


def dense_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            bias: Optional[torch.Tensor] = None, attn_drop: float = 0.0,
                            training: bool = False) -> torch.Tensor:
    """Plain attention over the second-to-last axis: ``q [..., Nq, D]``, ``k [..., Nk, D]``,
    ``v [..., Nk, D_v]``, additive ``bias`` broadcastable to ``[..., Nq, Nk]``; returns ``[..., Nq, D_v]``."""
    logits = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    attn = logits.softmax(dim=-1)
    if attn_drop > 0 and training:
        attn = nn.functional.dropout(attn, attn_drop, training=True)
    return torch.matmul(attn, v)
