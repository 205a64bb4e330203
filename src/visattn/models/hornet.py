"""HorNet (Rao et al., NeurIPS 2022) with 7x7 recursive gated convolutions, on the stage builder.

Layout, as the official ``hornet_{tiny,small,base}_7x7`` (raoyongming/HorNet):

* ``stem``: 4x4 stride-4 conv + LayerNorm (eps 1e-6);
* ``stages[i]``: for ``i > 0`` LayerNorm + 2x2 stride-2 conv (ConvNeXt's downsampler), then
  ``depths[i]`` :class:`~visattn.nn.layers.MixerBlock` s: LayerNorm, ``g^n Conv`` (the
  ``"hornet"`` mixer, :class:`~visattn.nn.mixers.hornet.GnConv`) of order ``i + 2`` with a 7x7
  depthwise conv scaled by 1/3, LayerNorm, MLP (ratio 4), layer scale 1e-6 on both branches;
* global average pool + ``head_norm`` (LayerNorm on the pooled vector) + ``head``; per-output
  LayerNorms in ``features_only`` mode, as the official detection backbone.

The GF variants (a global FFT filter in the last two stages) are not here. Any input size: the
patchify convs zero-pad the bottom/right to their stride, the 7x7 convs are "same". gnConv has no
attention window, hence no ``mixer="na"`` switch. Official checkpoints (classification, and the
detection backbone's ``norm{i}``) load through ``checkpoint_path=``, mapped by
:func:`hornet_from_official`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import ConvDownsample, MixerBlock, PatchEmbed
from .backbone import Backbone, Stage, drop_path_rates
from .convert import conv1x1_to_linear, rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["HORNET_CONFIGS", "HorNet", "hornet_from_official"]


@dataclass(frozen=True)
class HorNetConfig:
    """A HorNet (7x7) variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    embed_dim: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = ("HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions (NeurIPS 2022), "
          "ImageNet-1K table; the official repository's README")
HORNET_CONFIGS: dict[str, HorNetConfig] = {
    "hornet_tiny_7x7": HorNetConfig(64, 0.2, 22, 4.0),
    "hornet_small_7x7": HorNetConfig(96, 0.4, 50, 8.8),
    "hornet_base_7x7": HorNetConfig(128, 0.5, 87, 15.6),
}


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class HorNet(Backbone):
    """HorNet backbone and classifier (module docstring: layout, sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. ``orders[i]``
    is stage ``i``'s gnConv order (the paper's 2, 3, 4, 5); ``embed_dim * 2**i`` must be divisible
    by ``2 ** (orders[i] - 1)``.
    """

    def __init__(self, depths: Sequence[int] = (2, 3, 18, 2), embed_dim: int = 64,
                 orders: Sequence[int] = (2, 3, 4, 5), kernel_size: int = 7, gnconv_scale: float = 1.0 / 3.0,
                 mlp_ratio: float = 4.0, layer_scale: float = 1e-6, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None) -> None:
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        rates = drop_path_rates(drop_path_rate, depths)

        def stage(i: int) -> Stage:
            down = (ConvDownsample(dims[i - 1], dims[i], kernel_size=2, stride=2, bias=True, norm_layer=_layer_norm,
                                   norm_first=True) if i > 0 else None)
            gnconv = dict(order=orders[i], kernel_size=kernel_size, scale=gnconv_scale)
            return Stage([MixerBlock(dims[i], "hornet", gnconv, mlp_ratio=mlp_ratio, norm_layer=_layer_norm,
                                     layer_scale=layer_scale, drop=drop_rate, drop_path=p) for p in rates[i]], down)

        super().__init__(PatchEmbed(in_chans, dims[0], kernel_size=4, stride=4, norm_layer=_layer_norm),
                         [partial(stage, i) for i in range(len(depths))], dims, [4 * 2 ** i for i in range(len(depths))],
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices, head_norm_layer=_layer_norm, out_norm_layer=_layer_norm)
        self.depths, self.orders = tuple(depths), tuple(orders)


_BLOCK = r"^stages\.(\d+)\.(\d+)\."
_OFFICIAL_RULES = (
    (r"^downsample_layers\.0\.0\.(.+)$", r"stem.conv.\1"),
    (r"^downsample_layers\.0\.1\.(.+)$", r"stem.norm.\1"),
    (r"^downsample_layers\.(\d+)\.0\.(.+)$", r"stages.\1.downsample.norm.\2"),
    (r"^downsample_layers\.(\d+)\.1\.(.+)$", r"stages.\1.downsample.conv.\2"),
    (_BLOCK + r"gamma([12])$", r"stages.\1.blocks.\2.ls\3.gamma"),
    (_BLOCK + r"gnconv\.(proj_in|proj_out|pws\.\d+)\.weight$", r"stages.\1.blocks.\2.attn.\3.weight",
     conv1x1_to_linear),
    (_BLOCK + r"gnconv\.(.+)$", r"stages.\1.blocks.\2.attn.\3"),
    (_BLOCK + r"pwconv([12])\.(.+)$", r"stages.\1.blocks.\2.mlp.fc\3.\4"),
    (_BLOCK + r"(norm[12]\..+)$", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.(.+)$", r"head_norm.\1"),
    (r"^norm(\d)\.(.+)$", r"out_norms.\1.\2"),
    (r"^head\.(.+)$", r"head.\1"),
)


def hornet_from_official(state_dict) -> dict[str, torch.Tensor]:
    """Rename an official HorNet state dict (raoyongming/HorNet, 7x7 variants) for :class:`HorNet`.

    ``downsample_layers.0`` is the stem, ``downsample_layers.i`` stage ``i``'s downsampler; in the
    blocks ``gnconv`` is the mixer (its 1x1 convs become linears), ``pwconv1/2`` the MLP and
    ``gamma1/2`` the layer scales; ``norm`` is the pooled-vector norm and the detection backbone's
    ``norm{i}`` the per-output norms. Raises ``KeyError`` for keys outside that layout.
    """
    return rename_state_dict(state_dict, _OFFICIAL_RULES, "hornet_from_official", "official HorNet (7x7)")


def _build(name: str, **kwargs) -> HorNet:
    cfg = HORNET_CONFIGS[name]
    return HorNet(**{**dict(embed_dim=cfg.embed_dim, drop_path_rate=cfg.drop_path_rate), **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_official=hornet_from_official,
                     load_checkpoint=timm_checkpoint_loader(hornet_from_official))


@register_model("hornet_tiny_7x7", config=HORNET_CONFIGS["hornet_tiny_7x7"], **_REGISTRATION)
def hornet_tiny_7x7(**kwargs) -> HorNet:
    """HorNet-T (7x7); ``kwargs`` override the config or go to :class:`HorNet` (``num_classes``, ...)."""
    return _build("hornet_tiny_7x7", **kwargs)


@register_model("hornet_small_7x7", config=HORNET_CONFIGS["hornet_small_7x7"], **_REGISTRATION)
def hornet_small_7x7(**kwargs) -> HorNet:
    """HorNet-S (7x7); ``kwargs`` as in :func:`hornet_tiny_7x7`."""
    return _build("hornet_small_7x7", **kwargs)


@register_model("hornet_base_7x7", config=HORNET_CONFIGS["hornet_base_7x7"], **_REGISTRATION)
def hornet_base_7x7(**kwargs) -> HorNet:
    """HorNet-B (7x7); ``kwargs`` as in :func:`hornet_tiny_7x7`."""
    return _build("hornet_base_7x7", **kwargs)
