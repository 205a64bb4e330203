"""The transformer block's feed-forward network."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..linear import Linear

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Two-layer MLP with dropout after each layer: ``[..., C] -> [..., C]`` through ``hidden`` channels.

    ``act_layer`` builds the activation between the layers (GELU; MaxViT's TF checkpoints use
    ``partial(nn.GELU, approximate="tanh")``).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
