"""HorNet recursive gated convolution (gnConv): n-th order spatial interactions with convs and gates."""

from __future__ import annotations

import torch
from torch import nn

from .base import check_input
from ..registry import register_attn

__all__ = ["GnConv"]


@register_attn("hornet", layout="channels_last",
               paper="HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions (2022)",
               complexity="O(N C k^2)", backends="pure torch", bench_kwargs=dict())
class GnConv(nn.Module):
    """Recursive gated convolution ``g^n Conv``. ``x [B, H, W, C] -> [B, H, W, C]``.

    Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated
    Convolutions" (2022). With channel widths ``C_k = C / 2^(n-1-k)``: ``[p_0, q_0..q_{n-1}] =
    phi_in(x)``, ``p_{k+1} = f_k(q_k) * g_k(p_k)`` where ``f`` is one shared depthwise ``7x7`` conv
    (scaled by ``alpha = 1/3``) over all the ``q`` channels and ``g_k`` are 1x1 convs
    ``C_k -> C_{k+1}`` (``g_0`` is the identity); ``y = phi_out(p_n)``. The output is a polynomial
    of degree ``n + 1`` in ``x`` (when the biases are zero), the paper's "n-th order interaction",
    yet the receptive field is one ``k x k`` window.

    Readings: the 1x1 convs are ``nn.Linear`` on channels-last tensors (same parameters); the
    depthwise conv has a bias (HorNet's code). ``dim`` must be divisible by ``2^(order-1)``.
    """

    def __init__(self, dim: int, order: int = 5, kernel_size: int = 7, scale: float = 1.0 / 3.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if order < 1 or dim % (2 ** (order - 1)):
            raise ValueError(f"GnConv: dim={dim} must be divisible by 2^(order-1) = {2 ** max(order - 1, 0)} "
                             f"for order={order} (>= 1); lower the order or change dim.")
        self.dim, self.order, self.scale = dim, order, scale
        self.dims = [dim // 2 ** i for i in range(order)][::-1]
        self.proj_in = nn.Linear(dim, 2 * dim)
        self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), kernel_size, padding=kernel_size // 2,
                                groups=sum(self.dims))
        self.pws = nn.ModuleList(nn.Linear(self.dims[i], self.dims[i + 1]) for i in range(order - 1))
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        p, abc = torch.split(self.proj_in(x), [self.dims[0], sum(self.dims)], dim=-1)
        dw = self.dwconv(abc.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) * self.scale
        gates = torch.split(dw, self.dims, dim=-1)
        p = p * gates[0]
        for g, gate in zip(self.pws, gates[1:]):
            p = g(p) * gate
        return self.proj_drop(self.proj_out(p))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}, dims={self.dims}"
