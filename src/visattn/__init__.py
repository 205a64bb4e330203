"""visattn: fast, exact local attention for vision on every device.

The functional core (``na1d``, ``na2d``, ``na3d``, ``neighborhood_attention``) follows NATTEN 0.21's
API and semantics; backends are chosen automatically (``visattn info`` lists them). ``selective_scan``
is Mamba's selective scan with ``mamba-ssm``'s signature (:mod:`visattn.scan`).
"""

from .functional import merge_attentions, na1d, na2d, na3d, na_av, na_qk, neighborhood_attention
from .nn import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    NeighborhoodCrossAttention1D,
    NeighborhoodCrossAttention2D,
    NeighborhoodCrossAttention3D,
    create_attn,
    list_attn,
)
from .models import create_model, list_models
from .scan import selective_scan
from .varlen import na_varlen

__version__ = "0.1.0"


def __getattr__(name: str):
    # A measurement tool, imported on first use: it pulls in torch.utils.flop_counter and the bench.
    if name == "count_flops":
        from .bench.flops import count_flops

        return count_flops
    raise AttributeError(f"module 'visattn' has no attribute {name!r}")


__all__ = [
    "__version__",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodCrossAttention1D",
    "NeighborhoodCrossAttention2D",
    "NeighborhoodCrossAttention3D",
    "count_flops",
    "create_attn",
    "create_model",
    "list_attn",
    "list_models",
    "merge_attentions",
    "na1d",
    "na2d",
    "na3d",
    "na_av",
    "na_qk",
    "na_varlen",
    "neighborhood_attention",
    "selective_scan",
]
