"""VAN, the Visual Attention Network (Guo et al., CVMJ 2023), on the stage builder.

Layout, as the official ``van_b0`` ... ``van_b3`` (Visual-Attention-Network/VAN-Classification):

* ``stem``: 7x7 stride-4 conv (padding 3) + BatchNorm;
* ``stages[i]`` (:class:`VANStage`): for ``i > 0`` a 3x3 stride-2 conv (padding 1) + BatchNorm,
  then ``depths[i]`` blocks, then a LayerNorm (eps 1e-6) on the stage's output. A block is a
  :class:`~visattn.nn.layers.MixerBlock` with BatchNorm as its norms, the *spatial attention*
  :class:`VANAttention` (1x1, GELU, large kernel attention, 1x1, plus a shortcut) as its mixer,
  a :class:`~visattn.nn.layers.ConvFFN` (1x1, 3x3 depthwise, GELU, 1x1) and layer scale 1e-2;
* global average pool + ``head``.

The 1x1 convolutions are ``nn.Linear`` on channels-last maps (same parameters). Every convolution
is zero-padded to "same", so any input size works; the stem and the downsamplers round up
(``ceil(H / 4)``, then ``ceil(h / 2)``). With ``features_only`` the stages' outputs are returned
after their LayerNorm, which the official model applies inside every stage. VAN has no window
(its large kernel attention is a convolution), hence no ``mixer="na"`` switch.

The official checkpoints load with ``create_model("van_b0", pretrained=True)`` (or
``checkpoint_path=``), mapped by :func:`van_from_official`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import BatchNorm2dChannelsLast, ConvDownsample, ConvFFN, MixerBlock, PatchEmbed
from ..nn.plugins.lka import LargeKernelAttention
from .backbone import Backbone, Stage, drop_path_rates
from .convert import conv1x1_to_linear, rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["VAN", "VAN_CONFIGS", "VANAttention", "VANStage", "van_from_official"]


@dataclass(frozen=True)
class VANConfig:
    """A VAN variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "Visual Attention Network (CVMJ 2023), ImageNet-1K table; the official repository's README"
VAN_CONFIGS: dict[str, VANConfig] = {
    "van_b0": VANConfig((3, 3, 5, 2), (32, 64, 160, 256), (8, 8, 4, 4), 0.1, 4.1, 0.9),
    "van_b1": VANConfig((2, 2, 4, 2), (64, 128, 320, 512), (8, 8, 4, 4), 0.1, 13.9, 2.5),
    "van_b2": VANConfig((3, 3, 12, 3), (64, 128, 320, 512), (8, 8, 4, 4), 0.1, 26.6, 5.0),
    "van_b3": VANConfig((3, 5, 27, 3), (64, 128, 320, 512), (8, 8, 4, 4), 0.2, 44.8, 9.0),
}


class VANAttention(nn.Module):
    """VAN's spatial attention: ``x + proj_2(LKA(GELU(proj_1(x))))``, ``[B, H, W, C] -> [B, H, W, C]``.

    ``proj_1``/``proj_2`` are VAN's 1x1 convolutions (as linears); ``spatial_gating_unit`` is
    :class:`~visattn.nn.plugins.lka.LargeKernelAttention` (5x5 depthwise, 7x7 depthwise with
    dilation 3, 1x1, and the product with its input). The shortcut is VAN's own, inside the
    mixer; the block adds its residual on top.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj_1 = nn.Linear(dim, dim)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LargeKernelAttention(dim)
        self.proj_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.proj_1(x)).permute(0, 3, 1, 2)  # a channels_last-strided NCHW view
        return self.proj_2(self.spatial_gating_unit(y).permute(0, 2, 3, 1)) + x


class VANStage(Stage):
    """A :class:`~visattn.models.backbone.Stage` whose output is normalized: ``norm(blocks(downsample(x)))``."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module], norm: nn.Module) -> None:
        super().__init__(blocks, downsample)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class VAN(Backbone):
    """VAN backbone and classifier (module docstring: layout, sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 5, 2), embed_dims: Sequence[int] = (32, 64, 160, 256),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), layer_scale: float = 1e-2, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, in_chans: int = 3, num_classes: int = 1000,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None) -> None:
        dims = list(embed_dims)
        rates = drop_path_rates(drop_path_rate, depths)

        def stage(i: int) -> Stage:
            down = (ConvDownsample(dims[i - 1], dims[i], kernel_size=3, stride=2, bias=True,
                                   norm_layer=BatchNorm2dChannelsLast) if i > 0 else None)
            blocks = [MixerBlock(dims[i], VANAttention, mlp_ratio=mlp_ratios[i], mlp_layer=ConvFFN,
                                 norm_layer=BatchNorm2dChannelsLast, layer_scale=layer_scale, drop=drop_rate,
                                 drop_path=p) for p in rates[i]]
            return VANStage(blocks, down, nn.LayerNorm(dims[i], eps=1e-6))

        super().__init__(PatchEmbed(in_chans, dims[0], kernel_size=7, stride=4, norm_layer=BatchNorm2dChannelsLast),
                         [partial(stage, i) for i in range(len(depths))], dims, [4 * 2 ** i for i in range(len(depths))],
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices)
        self.depths = tuple(depths)


_BLOCK = r"^block(\d)\.(\d+)\."


def _stage(i: str) -> int:
    return int(i) - 1


_OFFICIAL_RULES = (
    (r"^patch_embed1\.(proj|norm)\.(.+)$", lambda m: f"stem.{'conv' if m[1] == 'proj' else 'norm'}.{m[2]}"),
    (r"^patch_embed(\d)\.(proj|norm)\.(.+)$",
     lambda m: f"stages.{_stage(m[1])}.downsample.{'conv' if m[2] == 'proj' else 'norm'}.{m[3]}"),
    (_BLOCK + r"layer_scale_(\d)$", lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.ls{m[3]}.gamma"),
    (_BLOCK + r"(attn\.proj_[12]|mlp\.fc[12])\.weight$", lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.{m[3]}.weight",
     conv1x1_to_linear),
    (_BLOCK + r"mlp\.dwconv\.dwconv\.(.+)$", lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.mlp.dwconv.{m[3]}"),
    (_BLOCK + r"(.+)$", lambda m: f"stages.{_stage(m[1])}.blocks.{m[2]}.{m[3]}"),
    (r"^norm(\d)\.(.+)$", lambda m: f"stages.{_stage(m[1])}.norm.{m[2]}"),
    (r"^head\.(.+)$", r"head.\1"),
)


def van_from_official(state_dict) -> dict[str, torch.Tensor]:
    """Rename an official VAN state dict (Visual-Attention-Network/VAN-Classification) for :class:`VAN`.

    ``patch_embed1`` is the stem, ``patch_embed{i+1}`` / ``block{i+1}`` / ``norm{i+1}`` are stage
    ``i``'s downsampler, blocks and norm; the blocks' 1x1 convs become linears, ``layer_scale_k``
    is ``ls{k}.gamma``. Raises ``KeyError`` for keys outside that layout.
    """
    return rename_state_dict(state_dict, _OFFICIAL_RULES, "van_from_official", "official VAN")


def _build(name: str, **kwargs) -> VAN:
    cfg = VAN_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dims=cfg.embed_dims, mlp_ratios=cfg.mlp_ratios,
                drop_path_rate=cfg.drop_path_rate)
    return VAN(**{**arch, **kwargs})


_HF = "https://huggingface.co/Visual-Attention-Network/"
_REGISTRATION = dict(paper=_PAPER, from_official=van_from_official,
                     load_checkpoint=timm_checkpoint_loader(van_from_official))


@register_model("van_b0", url=_HF + "VAN-Tiny-original/resolve/main/van_tiny_754.pth.tar", config=VAN_CONFIGS["van_b0"],
                **_REGISTRATION)
def van_b0(**kwargs) -> VAN:
    """VAN-B0; ``kwargs`` override the config or go to :class:`VAN` (``num_classes``, ``features_only``, ...)."""
    return _build("van_b0", **kwargs)


@register_model("van_b1", url=_HF + "VAN-Small-original/resolve/main/van_small_811.pth.tar",
                config=VAN_CONFIGS["van_b1"], **_REGISTRATION)
def van_b1(**kwargs) -> VAN:
    """VAN-B1; ``kwargs`` as in :func:`van_b0`."""
    return _build("van_b1", **kwargs)


@register_model("van_b2", url=_HF + "VAN-Base-original/resolve/main/van_base_828.pth.tar",
                config=VAN_CONFIGS["van_b2"], **_REGISTRATION)
def van_b2(**kwargs) -> VAN:
    """VAN-B2; ``kwargs`` as in :func:`van_b0`."""
    return _build("van_b2", **kwargs)


@register_model("van_b3", url=_HF + "VAN-Large-original/resolve/main/van_large_839.pth.tar",
                config=VAN_CONFIGS["van_b3"], **_REGISTRATION)
def van_b3(**kwargs) -> VAN:
    """VAN-B3; ``kwargs`` as in :func:`van_b0`."""
    return _build("van_b3", **kwargs)
