"""nn.Modules: token mixers (channels-last) and CNN plug-ins (channels-first), one registry."""

from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .registry import attn_info, create_attn, list_attn, register_attn

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "attn_info",
    "create_attn",
    "list_attn",
    "register_attn",
]
