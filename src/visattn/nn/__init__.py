"""nn.Modules, by what they hold, and one registry for the attention modules.

* :mod:`.mixers`: token mixers, channels-last ``[B, *S, C]`` (NeighborhoodAttention1D/2D/3D, Swin,
  HaloNet, MaxViT, CSWin, ... on a shared base);
* :mod:`.plugins`: CNN plug-ins, channels-first ``[B, C, H, W]`` (SE, ECA, CBAM, ...);
* :mod:`.layers`: building blocks shared by the models (DropPath, LayerScale, Mlp, conv stem and
  downsampler, dense global attention);
* :mod:`.registry`: ``create_attn`` / ``list_attn`` / ``attn_info`` / ``register_attn``.

Importing this package imports the mixers and plug-ins, whose files register themselves, so the
registry is complete as soon as ``visattn.nn`` (or anything inside it) is imported.
"""

from . import plugins  # noqa: F401  (registers the plug-ins: the registry is how they are reached)
from .layers import ConvDownsample, ConvStem, DropPath, GlobalAttention2D, LayerScale, Mlp
from .mixers import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    NeighborhoodCrossAttention1D,
    NeighborhoodCrossAttention2D,
    NeighborhoodCrossAttention3D,
)
from .registry import attn_info, create_attn, list_attn, register_attn

__all__ = [
    "ConvDownsample",
    "ConvStem",
    "DropPath",
    "GlobalAttention2D",
    "LayerScale",
    "Mlp",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodCrossAttention1D",
    "NeighborhoodCrossAttention2D",
    "NeighborhoodCrossAttention3D",
    "attn_info",
    "create_attn",
    "list_attn",
    "register_attn",
]
