"""SPAN's parameter-free attention: a gate from the features themselves through a symmetric activation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checks import check_input, check_positive_int
from ..registry import register_attn

__all__ = ["SPANAttention"]


@register_attn(
    "span",
    layout="channels_first",
    paper="Swift Parameter-free Attention Network for Efficient Super-Resolution (2024)",
    complexity="O(C*H*W)",
    backends="pure torch",
    bench_kwargs={},
)
class SPANAttention(nn.Module):
    """Parameter-free attention: ``y = (h + identity) * (sigmoid(h) - 1/2)`` for conv features ``h``.

    ``h: [B, C, H, W]`` (and optional ``identity`` of the same shape) -> ``[B, C, H, W]`` (same
    dtype); any ``H, W >= 1``; no parameters.

    Paper: Wan et al., "Swift Parameter-free Attention Network for Efficient Super-Resolution"
    (CVPRW 2024). Mechanism: in each SPAB block the attention map is computed directly from the
    block's conv output ``H_i`` by an origin-symmetric activation ``sigma_a(t) = sigmoid(t) - 1/2``
    (values in (-1/2, 1/2), odd: ``sigma_a(-t) = -sigma_a(t)``), and the block output is
    ``(O_{i-1} + H_i) * sigma_a(H_i)``: the residual ``O_{i-1}`` is passed as ``identity``. Without
    ``identity`` the module returns ``h * sigma_a(h)``, which is even in ``h`` and never negative.
    The convolutions that produce ``h`` belong to the host network, not to this module.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_positive_int(type(self).__name__, "channels", channels)

    def forward(self, h: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(self, h, self.channels)
        attn = torch.sigmoid(h) - 0.5
        if identity is None:
            return h * attn
        if identity.shape != h.shape:
            raise ValueError(
                f"{type(self).__name__}: identity has shape {tuple(identity.shape)} but the features have "
                f"{tuple(h.shape)}; the residual must match the conv output."
            )
        return (h + identity) * attn

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
