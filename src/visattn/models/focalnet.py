"""FocalNet (Yang et al., NeurIPS 2022) on the stage builder, with timm's weights.

Layout (timm's ``focalnet_{tiny,small,base}_{srf,lrf}`` maps onto it with :func:`focalnet_from_timm`):

* ``stem``: 4x4 stride-4 patchify conv + LayerNorm;
* ``stages[i]``: for ``i > 0`` a 2x2 stride-2 conv + LayerNorm (width x2), then ``depths[i]``
  pre-norm blocks with focal modulation (``"focalnet"``) as the token mixer and an MLP;
* ``norm`` + global average pool + ``head``.

The small/large receptive field variants (SRF/LRF) differ only in ``focal_level`` (2 or 3 levels of
depthwise 3x3, 5x5(, 7x7) contexts). timm runs the same model channels-first (1x1 convs and
LayerNorm2d); we run it channels-last (linears and LayerNorm), so the converter reshapes the 1x1
conv weights. There is no window attention here, so there is no ``mixer="na"`` switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import ConvDownsample, MixerBlock, PatchEmbed
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import conv1x1_to_linear, rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["FOCALNET_CONFIGS", "FocalNet", "focalnet_from_timm"]


@dataclass(frozen=True)
class FocalNetConfig:
    """A FocalNet variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dim: int
    focal_level: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "Focal Modulation Networks (NeurIPS 2022), Table 1"
FOCALNET_CONFIGS: dict[str, FocalNetConfig] = {
    "focalnet_tiny_srf": FocalNetConfig((2, 2, 6, 2), 96, 2, 0.2, 28.4, 4.4),
    "focalnet_small_srf": FocalNetConfig((2, 2, 18, 2), 96, 2, 0.3, 49.9, 8.6),
    "focalnet_base_srf": FocalNetConfig((2, 2, 18, 2), 128, 2, 0.5, 88.1, 15.3),
    "focalnet_tiny_lrf": FocalNetConfig((2, 2, 6, 2), 96, 3, 0.2, 28.6, 4.5),
    "focalnet_small_lrf": FocalNetConfig((2, 2, 18, 2), 96, 3, 0.3, 50.3, 8.7),
    "focalnet_base_lrf": FocalNetConfig((2, 2, 18, 2), 128, 3, 0.5, 88.7, 15.4),
}


class FocalNet(Backbone):
    """FocalNet backbone and classifier (module docstring: layout).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size
    (the patchify convs pad to their stride; the depthwise contexts zero-pad).
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 6, 2), embed_dim: int = 96, focal_level: int = 2,
                 focal_window: int = 3, mlp_ratio: float = 4.0, layer_scale: Optional[float] = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None) -> None:
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        rates = drop_path_rates(drop_path_rate, depths)
        mixer_kw = dict(focal_window=focal_window, focal_level=focal_level, proj_drop=drop_rate)

        def stage(i: int) -> Stage:
            down = ConvDownsample(dims[i - 1], dims[i], kernel_size=2, stride=2, bias=True) if i > 0 else None
            return Stage([MixerBlock(dims[i], "focalnet", mixer_kw, mlp_ratio=mlp_ratio, layer_scale=layer_scale,
                                     drop=drop_rate, drop_path=p) for p in rates[i]], down)

        super().__init__(PatchEmbed(in_chans, embed_dim, kernel_size=4, stride=4),
                         [partial(stage, i) for i in range(len(depths))], dims, pyramid(len(depths)),
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices, norm_layer=nn.LayerNorm)
        self.depths, self.focal_level = tuple(depths), focal_level


_BLOCK = r"^layers\.(\d+)\.blocks\.(\d+)\."
_TIMM_RULES = (
    (r"^stem\.proj\.(.+)$", r"stem.conv.\1"),
    (r"^stem\.norm\.(.+)$", r"stem.norm.\1"),
    (r"^layers\.(\d+)\.downsample\.proj\.(.+)$", r"stages.\1.downsample.conv.\2"),
    (r"^layers\.(\d+)\.downsample\.norm\.(.+)$", r"stages.\1.downsample.norm.\2"),
    # 1x1 convolutions that act per token are our linears: f (q, context, gates), proj, the MLP.
    (_BLOCK + r"modulation\.(f|proj)\.weight$", r"stages.\1.blocks.\2.attn.\3.weight", conv1x1_to_linear),
    (_BLOCK + r"modulation\.(.+)$", r"stages.\1.blocks.\2.attn.\3"),
    (_BLOCK + r"mlp\.(fc[12])\.weight$", r"stages.\1.blocks.\2.mlp.\3.weight", conv1x1_to_linear),
    (_BLOCK + r"(norm[12]|mlp)\.(.+)$", r"stages.\1.blocks.\2.\3.\4"),
    (_BLOCK + r"ls([12])\.gamma$", r"stages.\1.blocks.\2.ls\3.gamma", lambda g: g.flatten()),
    (r"^norm\.(.+)$", r"norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)


def focalnet_from_timm(state_dict) -> dict[str, torch.Tensor]:
    """Rename (and reshape the 1x1 convs of) a timm ``focalnet_*`` state dict for :class:`FocalNet`."""
    return rename_state_dict(state_dict, _TIMM_RULES, "focalnet_from_timm", "timm FocalNet")


def _build(name: str, **kwargs) -> FocalNet:
    cfg = FOCALNET_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dim=cfg.embed_dim, focal_level=cfg.focal_level,
                drop_path_rate=cfg.drop_path_rate)
    return FocalNet(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_timm=focalnet_from_timm,
                     load_checkpoint=timm_checkpoint_loader(focalnet_from_timm))


@register_model("focalnet_tiny_srf", timm_name="focalnet_tiny_srf", config=FOCALNET_CONFIGS["focalnet_tiny_srf"],
                **_REGISTRATION)
def focalnet_tiny_srf(**kwargs) -> FocalNet:
    """FocalNet-T (SRF); ``kwargs`` override the config or go to :class:`FocalNet`."""
    return _build("focalnet_tiny_srf", **kwargs)


@register_model("focalnet_small_srf", timm_name="focalnet_small_srf", config=FOCALNET_CONFIGS["focalnet_small_srf"],
                **_REGISTRATION)
def focalnet_small_srf(**kwargs) -> FocalNet:
    """FocalNet-S (SRF); ``kwargs`` as in :func:`focalnet_tiny_srf`."""
    return _build("focalnet_small_srf", **kwargs)


@register_model("focalnet_base_srf", timm_name="focalnet_base_srf", config=FOCALNET_CONFIGS["focalnet_base_srf"],
                **_REGISTRATION)
def focalnet_base_srf(**kwargs) -> FocalNet:
    """FocalNet-B (SRF); ``kwargs`` as in :func:`focalnet_tiny_srf`."""
    return _build("focalnet_base_srf", **kwargs)


@register_model("focalnet_tiny_lrf", timm_name="focalnet_tiny_lrf", config=FOCALNET_CONFIGS["focalnet_tiny_lrf"],
                **_REGISTRATION)
def focalnet_tiny_lrf(**kwargs) -> FocalNet:
    """FocalNet-T (LRF); ``kwargs`` as in :func:`focalnet_tiny_srf`."""
    return _build("focalnet_tiny_lrf", **kwargs)


@register_model("focalnet_small_lrf", timm_name="focalnet_small_lrf", config=FOCALNET_CONFIGS["focalnet_small_lrf"],
                **_REGISTRATION)
def focalnet_small_lrf(**kwargs) -> FocalNet:
    """FocalNet-S (LRF); ``kwargs`` as in :func:`focalnet_tiny_srf`."""
    return _build("focalnet_small_lrf", **kwargs)


@register_model("focalnet_base_lrf", timm_name="focalnet_base_lrf", config=FOCALNET_CONFIGS["focalnet_base_lrf"],
                **_REGISTRATION)
def focalnet_base_lrf(**kwargs) -> FocalNet:
    """FocalNet-B (LRF); ``kwargs`` as in :func:`focalnet_tiny_srf`."""
    return _build("focalnet_base_lrf", **kwargs)
