"""Building blocks shared by the models (timm's ``layers`` in spirit): one concept per file.

* :class:`MixerBlock`: the pre-norm transformer block around any registered token mixer, with
  :class:`DropPath` (stochastic depth), :class:`LayerScale`, an :class:`Mlp` or :class:`ConvFFN`
  and an optional :class:`ConvPosEnc`;
* :class:`MBConv`: the inverted-bottleneck conv block with squeeze-excitation (MaxViT, MOAT);
  :class:`Bottleneck`: ResNet's block, its 3x3 conv optionally a token mixer (HaloNet, BoTNet);
* :class:`ConvStem`, :class:`PatchEmbed`: stems; :class:`ConvDownsample`, :class:`PatchMerging`:
  downsamplers between stages;
* :class:`GlobalAttention2D`: dense attention over all tokens, the baseline a local mixer replaces;
  :class:`GlobalLePEAttention2D`: the same plus LePE's depthwise conv (CSWin's, BiFormer's last stage);
* :class:`BatchNorm2dChannelsLast`: BatchNorm on a channels-last map (VAN, BiFormer).
"""

from .batch_norm import BatchNorm2dChannelsLast
from .bottleneck import Bottleneck, ConvNormAct
from .conv_ffn import ConvFFN
from .conv_pos_enc import ConvPosEnc
from .conv_stem import ConvDownsample, ConvStem, PatchEmbed
from .drop_path import DropPath
from .global_attention import GlobalAttention2D
from .lepe_attention import GlobalLePEAttention2D
from .layer_scale import LayerScale
from .mbconv import MBConv
from .mixer_block import MixerBlock
from .mlp import Mlp
from .patch_merging import PatchMerging

__all__ = ["BatchNorm2dChannelsLast", "Bottleneck", "ConvDownsample", "ConvNormAct", "ConvFFN", "ConvPosEnc",
           "ConvStem", "DropPath", "GlobalAttention2D", "GlobalLePEAttention2D", "LayerScale", "MBConv",
           "MixerBlock", "Mlp", "PatchEmbed", "PatchMerging"]
