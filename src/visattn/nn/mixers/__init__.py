"""Token mixers: attention over the tokens of a channels-last map ``[B, *S, C] -> [B, *S, C]``.

One file per family; each registers its classes with :func:`visattn.nn.register_attn` when imported,
and this package imports every file. :mod:`.base` holds what they share (:class:`~.base.QKVMixer`,
the qkv/heads/proj base, and :func:`~.base.na_attend`, the GNA call with attention dropout).
Patterns that are cases of generalized neighborhood attention (Swin, HaloNet, MaxViT, CSWin) run on
the ``visattn`` operator, hence on every backend.
"""

from .biformer import BiLevelRoutingAttention
from .convit import GatedPositionalSelfAttention
from .criss_cross import CrissCrossAttention
from .cross import NeighborhoodCrossAttention1D, NeighborhoodCrossAttention2D, NeighborhoodCrossAttention3D
from .cswin import CSWinAttention
from .davit import ChannelGroupAttention
from .focal import FocalModulation
from .halo import HaloAttention
from .hornet import GnConv
from .linear_attention import AgentAttention, FocusedLinearAttention, InLineAttention
from .maxvit import MaxViTBlockAttention, MaxViTGridAttention
from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .volo import OutlookAttention
from .window import ShiftedWindowAttention, WindowAttention

__all__ = [
    "AgentAttention",
    "BiLevelRoutingAttention",
    "CSWinAttention",
    "ChannelGroupAttention",
    "CrissCrossAttention",
    "FocalModulation",
    "FocusedLinearAttention",
    "GatedPositionalSelfAttention",
    "GnConv",
    "HaloAttention",
    "InLineAttention",
    "MaxViTBlockAttention",
    "MaxViTGridAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodCrossAttention1D",
    "NeighborhoodCrossAttention2D",
    "NeighborhoodCrossAttention3D",
    "OutlookAttention",
    "ShiftedWindowAttention",
    "WindowAttention",
]
