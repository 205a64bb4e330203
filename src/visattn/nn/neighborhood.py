"""Transitional alias: ``visattn.flops`` still imports ``_NeighborhoodAttentionNd`` from here.

The class lives in :mod:`visattn.nn.mixers.neighborhood`. Delete this file once ``flops.py`` no
longer imports it (its rewrite drops that import); nothing else may use this path.
"""

from .mixers.neighborhood import _NeighborhoodAttentionNd  # noqa: F401

__all__: list[str] = []
