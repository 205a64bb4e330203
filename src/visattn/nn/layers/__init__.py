"""Building blocks shared by the models (timm's ``layers`` in spirit): one concept per file.

* :class:`DropPath` (stochastic depth), :class:`LayerScale`, :class:`Mlp`: the pieces of a pre-norm
  transformer block around its token mixer;
* :class:`ConvStem`, :class:`ConvDownsample`: overlapping convolutional tokenizer and downsampler;
* :class:`GlobalAttention2D`: dense attention over all tokens, the baseline a local mixer replaces.
"""

from .conv_stem import ConvDownsample, ConvStem
from .drop_path import DropPath
from .global_attention import GlobalAttention2D
from .layer_scale import LayerScale
from .mlp import Mlp

__all__ = ["ConvDownsample", "ConvStem", "DropPath", "GlobalAttention2D", "LayerScale", "Mlp"]
