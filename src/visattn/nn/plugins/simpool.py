"""SimPool: attention-based global pooling that replaces global average pooling."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["SimPool"]


@register_attn(
    "simpool",
    layout="channels_first",
    paper="Keep It SimPool: Who Said Supervised Transformers Suffer from Attention Deficit? (2023)",
    complexity="O(C^2*H*W)",
    backends="pure torch",
    bench_kwargs={},
    output="pooled",
)
class SimPool(nn.Module):
    """Pool a feature map to one vector per sample, weighting positions by attention to its mean.

    ``x: [B, C, H, W]`` -> ``[B, C]`` (same dtype): this is a *pooling* plug-in, registered with
    ``output="pooled"``; it replaces the global average pooling before a classifier, not a block
    inside the network. :meth:`attention` returns the map ``[B, H, W]`` for inspection.

    Paper: Psomas, Kakogeorgiou, Karantzalos, Avrithis, "Keep It SimPool: Who Said Supervised
    Transformers Suffer from Attention Deficit?" (ICCV 2023). Mechanism: tokens ``X: [B, HW, C]``;
    the query is ``q = W_q GAP(X)``, the keys ``K = W_k LN(X)``, ``a = softmax(K q / sqrt(C))`` over
    the ``HW`` positions, and the output is the generalized (power) mean
    ``(sum_p a_p * v_p^gamma)^(1/gamma)`` of the values ``v = LN(X) - min + eps`` (the paper's
    ``f_alpha`` with ``gamma = (1 - alpha)/2``; ``gamma=None`` is the plain weighted mean ``a @ LN(X)``).
    Default ``gamma = 2`` is the paper's choice for convolutional networks (1.25 for transformers).

    Parameters: ``2*C^2 + 2*C`` (``W_q``, ``W_k`` without bias, LayerNorm). Deliberate difference:
    the authors' code shifts the values by the minimum over the whole batch, which makes a sample's
    output depend on its neighbours; we shift by each sample's own minimum.
    """

    def __init__(self, channels: int, gamma: Optional[float] = 2.0, eps: float = 1e-6, qk_bias: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        if gamma is not None and not gamma > 0:
            raise ValueError(f"{name}: gamma={gamma!r} must be > 0 (or None for the plain weighted mean).")
        self.gamma, self.eps = gamma, eps
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.wq = nn.Linear(channels, channels, bias=qk_bias)
        self.wk = nn.Linear(channels, channels, bias=qk_bias)
        self.scale = channels ** -0.5

    def _tokens_and_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_input(self, x, self.channels)
        tokens = x.flatten(2).transpose(1, 2)                                # [B, HW, C]
        normed = self.norm(tokens)
        q = self.wq(tokens.mean(dim=1))                                      # [B, C]
        logits = torch.bmm(self.wk(normed), q[:, :, None])[..., 0] * self.scale
        return normed, torch.softmax(logits, dim=-1)                         # [B, HW, C], [B, HW]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling weights ``[B, H, W]`` (sum to 1 per sample)."""
        return self._tokens_and_attention(x)[1].view(x.shape[0], *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, attn = self._tokens_and_attention(x)
        if self.gamma is None:
            return torch.bmm(attn[:, None, :], values)[:, 0]
        # The power mean needs positive values: shift each sample to a minimum of eps.
        values = values - values.amin(dim=(1, 2), keepdim=True) + self.eps
        pooled = torch.bmm(attn[:, None, :], values.pow(self.gamma))[:, 0]
        return pooled.pow(1.0 / self.gamma)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gamma={self.gamma}"
