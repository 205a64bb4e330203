"""Token mixers: attention over the tokens of a channels-last map ``[B, *S, C] -> [B, *S, C]``.

One file per family; each registers its classes with :func:`visattn.nn.register_attn` when imported,
and this package imports every file. :mod:`.base` holds what they share (:class:`~.base.QKVMixer`,
the qkv/heads/proj base, and :func:`~.base.na_attend`, the GNA call with attention dropout).
Patterns that are cases of generalized neighborhood attention (Swin, HaloNet, MaxViT, CSWin) run on
the ``visattn`` operator, hence on every backend. The visual Mamba mixers (SS2D, Vim, ES2D, MS2D, MHS-VM,
LocalMamba, LaMamba-Diff) run on :func:`visattn.selective_scan` along :mod:`visattn.scan.routes`, with
their shared pieces in :mod:`.scan_base`; MambaOut's Gated CNN is the scan-free control.
"""

from .biformer import BiLevelRoutingAttention
from .convit import GatedPositionalSelfAttention
from .criss_cross import CrissCrossAttention
from .cross import NeighborhoodCrossAttention1D, NeighborhoodCrossAttention2D, NeighborhoodCrossAttention3D
from .cswin import CSWinAttention
from .davit import ChannelGroupAttention
from .es2d import ES2D
from .focal import FocalModulation
from .halo import HaloAttention
from .hornet import GnConv
from .lamamba import LaMamba
from .linear_attention import AgentAttention, FocusedLinearAttention, InLineAttention
from .local_scan import LocalScan
from .mambaout import GatedCNN
from .maxvit import MaxViTBlockAttention, MaxViTGridAttention
from .mhs_vm import MultiHeadScan
from .ms2d import MS2D
from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .ss2d import SS2D
from .vim import BidirectionalMamba
from .volo import OutlookAttention
from .window import ShiftedWindowAttention, WindowAttention

__all__ = [
    "AgentAttention",
    "BiLevelRoutingAttention",
    "BidirectionalMamba",
    "CSWinAttention",
    "ChannelGroupAttention",
    "CrissCrossAttention",
    "ES2D",
    "FocalModulation",
    "FocusedLinearAttention",
    "GatedCNN",
    "GatedPositionalSelfAttention",
    "GnConv",
    "HaloAttention",
    "InLineAttention",
    "LaMamba",
    "LocalScan",
    "MS2D",
    "MaxViTBlockAttention",
    "MaxViTGridAttention",
    "MultiHeadScan",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodCrossAttention1D",
    "NeighborhoodCrossAttention2D",
    "NeighborhoodCrossAttention3D",
    "OutlookAttention",
    "SS2D",
    "ShiftedWindowAttention",
    "WindowAttention",
]
