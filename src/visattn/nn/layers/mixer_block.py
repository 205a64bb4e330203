"""The pre-norm transformer block around any registered token mixer."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..registry import create_attn
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp

__all__ = ["MixerBlock"]


class MixerBlock(nn.Module):
    """``x + drop_path(ls1 * mixer(norm1(x)))``, then ``x + drop_path(ls2 * mlp(norm2(x)))``:
    ``[B, H, W, C] -> [B, H, W, C]``.

    The block of Swin, NAT/DiNAT, MaxViT's attention, DaViT, ConViT, CSWin, BiFormer, ... (the
    "MetaFormer" of Yu et al., 2022): what differs between them is the token mixer, so it is an
    argument. ``mixer`` is a registered name (``create_attn(mixer, dim, **mixer_kwargs)``, e.g.
    ``"swin"``, ``"na2d"``, ``"maxvit_grid"``) or a callable ``mixer(dim, **mixer_kwargs)``.

    Options: ``mlp_layer(dim, hidden, drop=..., act_layer=...)`` builds the feed-forward network
    (:class:`Mlp`, or :class:`ConvFFN`); ``hidden = int(dim * mlp_ratio)``; ``mlp_layer=None`` leaves
    the second branch out (``x + drop_path(ls1 * mixer(norm1(x)))`` only: MambaOut's Gated CNN
    block, whose mixer is its own MLP). ``layer_scale`` (CaiT's
    per-channel residual scale, initial value or ``None``); ``drop_path`` (stochastic depth);
    ``drop`` (dropout in the MLP); ``pos_enc(dim)`` builds a positional module applied before each
    residual branch (DaViT's :class:`ConvPosEnc`: ``cpe1``, ``cpe2``); ``norm_layer(dim)``.
    """

    def __init__(self, dim: int, mixer: Union[str, Callable[..., nn.Module]], mixer_kwargs: Optional[dict] = None, *,
                 mlp_ratio: float = 4.0, mlp_layer: Optional[Callable[..., nn.Module]] = Mlp,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 layer_scale: Optional[float] = None, drop_path: float = 0.0, drop: float = 0.0,
                 pos_enc: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        build = (lambda d, **kw: create_attn(mixer, d, **kw)) if isinstance(mixer, str) else mixer
        self.cpe1 = pos_enc(dim) if pos_enc is not None else nn.Identity()
        self.norm1 = norm_layer(dim)
        self.attn = build(dim, **(mixer_kwargs or {}))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.cpe2 = pos_enc(dim) if pos_enc is not None else nn.Identity()
        self.mlp = None
        if mlp_layer is not None:
            self.norm2 = norm_layer(dim)
            self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop, act_layer=act_layer)
            self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = self.cpe2(x)
        if self.mlp is None:
            return x
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
