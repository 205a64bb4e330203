"""LayerScale (Touvron et al., "Going deeper with Image Transformers", CaiT, 2021)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch, initialised to ``init``: ``[..., C] -> [..., C]``.

    The parameter is ``gamma [C]`` (the name official NAT/DiNAT checkpoints map onto).
    """

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
