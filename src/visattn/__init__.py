"""visattn: fast, exact local attention for vision on every device.

The functional core (``na1d``, ``na2d``, ``na3d``, ``neighborhood_attention``) follows NATTEN 0.21's
API and semantics; backends are chosen automatically (``visattn info`` lists them).
"""

from .flops import count_flops
from .functional import merge_attentions, na1d, na2d, na3d, na_av, neighborhood_attention
from .nn import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    create_attn,
    list_attn,
)
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
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
    "neighborhood_attention",
]
