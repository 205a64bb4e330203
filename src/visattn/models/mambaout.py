"""MambaOut (Yu and Wang, "MambaOut: Do We Really Need Mamba for Vision?", 2024) on the stage builder.

Layout, as the official ``mambaout_{femto,kobe,tiny,small,base}`` (yuweihao/MambaOut) and timm's port:

* ``stem``: 3x3 stride-2 conv to ``C/2``, LayerNorm, GELU, 3x3 stride-2 conv to ``C``, LayerNorm
  (:class:`~visattn.nn.layers.ConvStem` with ``mid_norm=True``);
* ``stages[i]``: for ``i > 0`` a 3x3 stride-2 conv (with bias) + LayerNorm, then ``depths[i]`` Gated CNN
  blocks: ``x + drop_path(GatedCNN(norm1(x)))`` (:class:`~visattn.nn.layers.MixerBlock` with the
  ``"mambaout"`` mixer, :class:`~visattn.nn.mixers.mambaout.GatedCNN`, and no MLP branch: the gated
  mixer is the block's only branch);
* head: global average pool, LayerNorm, ``Linear(C, 4C)``, GELU, LayerNorm, ``Linear(4C, classes)``.

Every LayerNorm has eps 1e-6. The convolutions are zero-padded to "same", so any input size works
(stride-2 stages round up: ``ceil(H / 4)``, ``ceil(h / 2)``). There is no attention and no window,
hence no ``mixer="na"`` switch. The blocks mix tokens with a 7x7 depthwise conv only: the paper's
point is that ImageNet classification needs neither the scan nor its causal long-range recurrence.

Weights: ``create_model("mambaout_tiny", pretrained=True)`` downloads the official ImageNet checkpoint;
``checkpoint_path=`` reads an official or a timm (``mambaout_*``, not the ``_rw`` variants) file, and
:func:`~visattn.models.convert_timm_state_dict` maps a timm state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ..nn.layers import ConvDownsample, ConvStem, MixerBlock
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["MAMBAOUT_CONFIGS", "MambaOut", "mambaout_from_official", "mambaout_from_timm"]


@dataclass(frozen=True)
class MambaOutConfig:
    """A MambaOut variant, the stochastic-depth rate of its official training script, and the numbers the
    official table prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = ("MambaOut: Do We Really Need Mamba for Vision? (Yu and Wang, 2024); the official repository's "
          "ImageNet table (yuweihao/MambaOut README)")
MAMBAOUT_CONFIGS: dict[str, MambaOutConfig] = {
    "mambaout_femto": MambaOutConfig((3, 3, 9, 3), (48, 96, 192, 288), 0.025, 7.3, 1.2),
    "mambaout_kobe": MambaOutConfig((3, 3, 15, 3), (48, 96, 192, 288), 0.025, 9.1, 1.5),
    "mambaout_tiny": MambaOutConfig((3, 3, 9, 3), (96, 192, 384, 576), 0.2, 26.5, 4.5),
    "mambaout_small": MambaOutConfig((3, 4, 27, 3), (96, 192, 384, 576), 0.4, 48.5, 9.0),
    "mambaout_base": MambaOutConfig((3, 4, 27, 3), (128, 256, 512, 768), 0.6, 84.8, 15.8),
}


def _init_weights(m: nn.Module) -> None:
    """MambaOut's initialisation: truncated-normal (std 0.02) convolutions and linears, zero biases."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MambaOut(Backbone):
    """MambaOut backbone and classifier (module docstring: layout).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size.
    ``expansion_ratio``, ``kernel_size`` and ``conv_ratio`` go to every Gated CNN mixer.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 576),
                 expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 drop_path_rate: float = 0.0, head_drop_rate: float = 0.0, in_chans: int = 3,
                 num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        dims = list(dims)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = drop_path_rates(drop_path_rate, depths)
        mixer_kw = dict(expansion_ratio=expansion_ratio, kernel_size=kernel_size, conv_ratio=conv_ratio)

        def stage(i: int) -> Stage:
            down = ConvDownsample(dims[i - 1], dims[i], bias=True, norm_layer=norm) if i > 0 else None
            return Stage([MixerBlock(dims[i], "mambaout", mixer_kw, mlp_layer=None, norm_layer=norm, drop_path=p)
                          for p in rates[i]], down)

        super().__init__(ConvStem(in_chans, dims[0], norm_layer=norm, mid_norm=True, act_layer=nn.GELU),
                         [partial(stage, i) for i in range(len(depths))], dims, pyramid(len(depths)),
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices, head_norm_layer=norm, head_hidden_size=4 * dims[-1],
                         head_act_layer=nn.GELU, head_hidden_norm_layer=norm, head_drop_rate=head_drop_rate,
                         init_weights=_init_weights)
        self.depths = tuple(depths)


_BLOCK_PARTS = r"(fc1|conv|fc2)"
_TIMM_RULES = (
    (r"^stem\.(conv1|norm1|conv2)\.(.+)$", r"stem.\1.\2"),
    (r"^stem\.norm2\.(.+)$", r"stem.norm.\1"),
    (r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", r"stages.\1.downsample.\2.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.(.+)$", r"stages.\1.blocks.\2.norm1.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\." + _BLOCK_PARTS + r"\.(.+)$", r"stages.\1.blocks.\2.attn.\3.\4"),
    (r"^head\.norm\.(.+)$", r"head_norm.\1"),
    (r"^head\.pre_logits\.(fc|norm)\.(.+)$", r"pre_logits.\1.\2"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)

_OFFICIAL_RULES = (
    (r"^downsample_layers\.0\.(conv1|norm1|conv2)\.(.+)$", r"stem.\1.\2"),
    (r"^downsample_layers\.0\.norm2\.(.+)$", r"stem.norm.\1"),
    (r"^downsample_layers\.(\d+)\.(conv|norm)\.(.+)$", r"stages.\1.downsample.\2.\3"),
    (r"^stages\.(\d+)\.(\d+)\.norm\.(.+)$", r"stages.\1.blocks.\2.norm1.\3"),
    (r"^stages\.(\d+)\.(\d+)\." + _BLOCK_PARTS + r"\.(.+)$", r"stages.\1.blocks.\2.attn.\3.\4"),
    (r"^norm\.(.+)$", r"head_norm.\1"),
    (r"^head\.fc1\.(.+)$", r"pre_logits.fc.\1"),
    (r"^head\.norm\.(.+)$", r"pre_logits.norm.\1"),
    (r"^head\.fc2\.(.+)$", r"head.\1"),
)


def mambaout_from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ``mambaout_{femto,kobe,tiny,small,base}`` state dict for :class:`MambaOut`
    (the blocks' ``fc1``/``conv``/``fc2`` become the mixer's, ``attn.*``; the head's pieces move to the
    builder's ``head_norm``, ``pre_logits``, ``head``). Raises ``KeyError`` for keys outside that layout."""
    return rename_state_dict(state_dict, _TIMM_RULES, "mambaout_from_timm", "timm MambaOut")


def mambaout_from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official MambaOut state dict (yuweihao/MambaOut) for :class:`MambaOut`:
    ``downsample_layers.0`` is the stem, ``downsample_layers.{i}`` stage ``i``'s downsampler,
    ``stages.{i}.{j}`` its blocks, ``norm`` the pooled vector's norm, ``head.fc1/norm/fc2`` the MLP head.
    Raises ``KeyError`` for keys outside that layout."""
    return rename_state_dict(state_dict, _OFFICIAL_RULES, "mambaout_from_official", "official MambaOut")


def _from_either(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official or a timm state dict (told apart by their stem's name), mapped for :class:`MambaOut`."""
    try:
        return mambaout_from_official(state_dict)
    except KeyError as official_error:
        try:
            return mambaout_from_timm(state_dict)
        except KeyError as timm_error:
            raise KeyError(f"MambaOut checkpoint in neither the official nor timm's layout: "
                           f"{official_error.args[0]} / {timm_error.args[0]}") from None


def _build(name: str, **kwargs) -> MambaOut:
    cfg = MAMBAOUT_CONFIGS[name]
    arch = dict(depths=cfg.depths, dims=cfg.dims, drop_path_rate=cfg.drop_path_rate)
    return MambaOut(**{**arch, **kwargs})


_RELEASES = "https://github.com/yuweihao/MambaOut/releases/download/model/"
_REGISTRATION = dict(paper=_PAPER, from_timm=mambaout_from_timm, from_official=mambaout_from_official,
                     load_checkpoint=timm_checkpoint_loader(_from_either))


@register_model("mambaout_femto", url=_RELEASES + "mambaout_femto.pth", timm_name="mambaout_femto",
                config=MAMBAOUT_CONFIGS["mambaout_femto"], **_REGISTRATION)
def mambaout_femto(**kwargs) -> MambaOut:
    """MambaOut-Femto; ``kwargs`` override the config or go to :class:`MambaOut` (``num_classes``, ...)."""
    return _build("mambaout_femto", **kwargs)


@register_model("mambaout_kobe", url=_RELEASES + "mambaout_kobe.pth", timm_name="mambaout_kobe",
                config=MAMBAOUT_CONFIGS["mambaout_kobe"], **_REGISTRATION)
def mambaout_kobe(**kwargs) -> MambaOut:
    """MambaOut-Kobe (Femto's widths, 24 blocks); ``kwargs`` as in :func:`mambaout_femto`."""
    return _build("mambaout_kobe", **kwargs)


@register_model("mambaout_tiny", url=_RELEASES + "mambaout_tiny.pth", timm_name="mambaout_tiny",
                config=MAMBAOUT_CONFIGS["mambaout_tiny"], **_REGISTRATION)
def mambaout_tiny(**kwargs) -> MambaOut:
    """MambaOut-Tiny; ``kwargs`` as in :func:`mambaout_femto`."""
    return _build("mambaout_tiny", **kwargs)


@register_model("mambaout_small", url=_RELEASES + "mambaout_small.pth", timm_name="mambaout_small",
                config=MAMBAOUT_CONFIGS["mambaout_small"], **_REGISTRATION)
def mambaout_small(**kwargs) -> MambaOut:
    """MambaOut-Small; ``kwargs`` as in :func:`mambaout_femto`."""
    return _build("mambaout_small", **kwargs)


@register_model("mambaout_base", url=_RELEASES + "mambaout_base.pth", timm_name="mambaout_base",
                config=MAMBAOUT_CONFIGS["mambaout_base"], **_REGISTRATION)
def mambaout_base(**kwargs) -> MambaOut:
    """MambaOut-Base; ``kwargs`` as in :func:`mambaout_femto`."""
    return _build("mambaout_base", **kwargs)
