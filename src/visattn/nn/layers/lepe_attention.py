"""Global self-attention with a locally-enhanced positional encoding (LePE), the last stage of CSWin and BiFormer."""

from __future__ import annotations

import torch
from torch import nn

from ..mixers.base import check_input
from .global_attention import GlobalAttention2D

__all__ = ["GlobalLePEAttention2D"]


class GlobalLePEAttention2D(GlobalAttention2D):
    """Dense self-attention plus a depthwise convolution: ``proj(Attention(Q, K, V) + DWConv_k(s))``,
    ``x [B, H, W, C] -> [B, H, W, C]``.

    Dong et al., "CSWin Transformer" (2022) name the depthwise term LePE: in CSWin's last stage,
    where a stripe is the whole map, the attention is global and ``s = V`` (``lepe_source="value"``,
    3x3). BiFormer (Zhu et al., 2023) ends with the same block on the attention's input, ``s = x``
    (``lepe_source="input"``, 5x5, no qkv bias). The convolution has a bias and zero padding
    ``k // 2``; the attention is :class:`GlobalAttention2D` (SDPA). Raises ``ValueError`` for another
    ``lepe_source`` or an even ``lepe_kernel``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, lepe_kernel: int = 3,
                 lepe_source: str = "value", attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        name = type(self).__name__
        if lepe_source not in ("value", "input"):
            raise ValueError(f"{name}: lepe_source={lepe_source!r}; choose 'value' (CSWin: DWConv(V)) or 'input' "
                             f"(BiFormer: DWConv(x)).")
        if lepe_kernel < 1 or lepe_kernel % 2 == 0:
            raise ValueError(f"{name}: lepe_kernel={lepe_kernel} must be odd and positive (padded by k // 2).")
        self.lepe_source = lepe_source
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        q, k, v = self._qkv(x)
        source = v.flatten(-2) if self.lepe_source == "value" else x
        lepe = self.lepe(source.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(self.attend(q, k, v).flatten(-2) + lepe))

    def extra_repr(self) -> str:
        k = self.lepe.kernel_size[0]
        return f"dim={self.dim}, num_heads={self.num_heads}, lepe={k}x{k} on the {self.lepe_source}"
