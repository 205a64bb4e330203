"""Polarized self-attention (PSA): a channel-only and a spatial-only branch, parallel or sequential."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_choice, check_divisible, check_input, check_positive_int
from ..registry import register_attn

__all__ = ["PolarizedSelfAttention", "SequentialPolarizedSelfAttention"]


@register_attn(
    "polarized",
    layout="channels_first",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression (2021)",
    complexity="O(C^2*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class PolarizedSelfAttention(nn.Module):
    """Channel gate ``[B, C, 1, 1]`` and spatial gate ``[B, 1, H, W]``, each from a softmax-pooled branch.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]`` (same dtype); any ``H, W >= 1``; ``C`` must be even.

    Paper: Liu, Xu, Lin, Ji, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression"
    (arXiv 2021). Mechanism, with 1x1 convs ``W``:

    * channel-only: ``A_ch = sigmoid(LN(W_z(W_v(x) @ softmax_HW(W_q(x)))))`` with
      ``W_q: C -> 1``, ``W_v: C -> C/2``, ``W_z: C/2 -> C`` and a LayerNorm over channels;
    * spatial-only: ``A_sp = sigmoid(softmax_C(GAP(W_q'(x))) @ W_v'(x))`` with
      ``W_q', W_v': C -> C/2``;
    * ``mode="parallel"``: ``y = A_ch * x + A_sp * x``; ``mode="sequential"``:
      ``y = A_sp(z) * z`` with ``z = A_ch(x) * x``.

    Parameters: ``2*C^2 + 3*C`` (five bias-free 1x1 convs: ``C + C^2/2 + C^2/2 + C^2/2 + C^2/2``,
    plus the LayerNorm's ``2*C``). Reading chosen: the paper does not say whether the 1x1 convs
    have biases; we leave them out (a bias on ``W_q``, which feeds a softmax over positions, could
    not change the output at all).
    """

    def __init__(self, channels: int, mode: str = "parallel") -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_positive_int(name, "channels", channels)
        check_divisible(name, "channels", channels, "2 (the branches work at C/2)", 2)
        check_choice(name, "mode", mode, ("parallel", "sequential"))
        self.mode = mode
        half = channels // 2
        self.ch_q = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_v = nn.Conv2d(channels, half, 1, bias=False)
        self.ch_z = nn.Conv2d(half, channels, 1, bias=False)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_q = nn.Conv2d(channels, half, 1, bias=False)
        self.sp_v = nn.Conv2d(channels, half, 1, bias=False)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_ch: [B, C, 1, 1]`` in (0, 1)."""
        weights = torch.softmax(self.ch_q(x).flatten(2), dim=-1)            # [B, 1, HW]
        z = torch.bmm(self.ch_v(x).flatten(2), weights.transpose(1, 2))     # [B, C/2, 1]
        z = self.ch_z(z[..., None])                                          # [B, C, 1, 1]
        return torch.sigmoid(self.ch_norm(z.flatten(1)))[:, :, None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``A_sp: [B, 1, H, W]`` in (0, 1)."""
        q = torch.softmax(self.sp_q(x).mean(dim=(2, 3)), dim=-1)            # [B, C/2]
        a = torch.bmm(q[:, None, :], self.sp_v(x).flatten(2))                # [B, 1, HW]
        return torch.sigmoid(a).view(x.shape[0], 1, *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.channels)
        if self.mode == "parallel":
            return x * self.channel_gate(x) + x * self.spatial_gate(x)
        z = x * self.channel_gate(x)
        return z * self.spatial_gate(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"


@register_attn(
    "polarized_seq",
    layout="channels_first",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression (2021)",
    complexity="O(C^2*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class SequentialPolarizedSelfAttention(PolarizedSelfAttention):
    """:class:`PolarizedSelfAttention` with ``mode="sequential"``: channel gate first, then spatial gate.

    ``x: [B, C, H, W]`` -> ``[B, C, H, W]``; registered separately so that ``create_attn`` and the
    zoo benchmark can name the paper's second layout directly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, mode="sequential")
