"""CSWin Transformer (Dong et al., CVPR 2022) on the stage builder, its stripes on the GNA operator.

Layout, as the official ``CSWin_64_12211_tiny_224``, ``CSWin_64_24322_small_224`` and
``CSWin_96_24322_base_224`` (microsoft/CSWin-Transformer):

* ``stem`` (:class:`CSWinStem`): 7x7 stride-4 conv with padding 2 + LayerNorm;
* ``stages[i]``: for ``i > 0`` a 3x3 stride-2 conv + LayerNorm (width x2), then ``depths[i]``
  pre-norm :class:`~visattn.nn.layers.MixerBlock` s (MLP ratio 4). In stages 0-2 the mixer is
  cross-shaped window attention (``"cswin"``: half the heads in horizontal stripes of
  ``split_sizes[i]`` rows, half in vertical stripes, plus LePE, a 3x3 depthwise conv on V); in the
  last stage, where CSWin's stripe is the whole map, it is global attention with LePE
  (:class:`~visattn.nn.layers.GlobalLePEAttention2D`);
* ``norm`` + global average pool + ``head``; per-output LayerNorms in ``features_only`` mode (as
  the official segmentation backbone).

Any input size. Stripes that do not divide a side follow GNA (the last stripe moves inward)
instead of CSWin's divisibility requirement; the last stage stays global at every size, as CSWin
sets its last stripe to the map. Readings of the ``"cswin"`` mixer (its docstring has the
details): LePE runs on the whole V map, where the official code convolves each stripe with zero
padding at the stripe's edges, and the first half of the heads take the horizontal stripes (the
official code gives them the vertical ones). Parameters and FLOPs are the official model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import ConvDownsample, GlobalLePEAttention2D, MixerBlock
from .backbone import Backbone, Stage, drop_path_rates
from .registry import register_model

__all__ = ["CSWIN_CONFIGS", "CSWin", "CSWinStem"]


@dataclass(frozen=True)
class CSWinConfig:
    """A CSWin variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    embed_dim: int
    num_heads: tuple[int, ...]
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = ("CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows (CVPR 2022), "
          "ImageNet-1K table; the official repository's README")
CSWIN_CONFIGS: dict[str, CSWinConfig] = {
    "cswin_tiny": CSWinConfig((1, 2, 21, 1), 64, (2, 4, 8, 16), 0.2, 23, 4.3),
    "cswin_small": CSWinConfig((2, 4, 32, 2), 64, (2, 4, 8, 16), 0.4, 35, 6.9),
    "cswin_base": CSWinConfig((2, 4, 32, 2), 96, (4, 8, 16, 32), 0.5, 78, 15.0),
}


class CSWinStem(nn.Module):
    """7x7 stride-4 conv with padding 2 (CSWin's, one less than "same") + LayerNorm:
    ``[B, C_in, H, W] -> [B, floor((H - 3) / 4) + 1, floor((W - 3) / 4) + 1, C]`` (56x56 at 224)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=4, padding=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < 3 or x.shape[-1] < 3:
            raise ValueError(f"CSWinStem: the image is {tuple(x.shape[-2:])}; its 7x7 stride-4 conv with padding 2 "
                             f"needs both sides >= 3 pixels.")
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWin(Backbone):
    """CSWin Transformer backbone and classifier (module docstring: layout, sizes, readings).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``.
    """

    def __init__(self, depths: Sequence[int] = (1, 2, 21, 1), embed_dim: int = 64,
                 num_heads: Sequence[int] = (2, 4, 8, 16), split_sizes: Sequence[int] = (1, 2, 7),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> None:
        if len(split_sizes) != len(depths) - 1:
            raise ValueError(f"CSWin: split_sizes={tuple(split_sizes)} needs one stripe width per stage but the last "
                             f"(global) one: {len(depths) - 1} entries.")
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        rates = drop_path_rates(drop_path_rate, depths)
        attn_kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)

        def stage(i: int) -> Stage:
            if i < len(split_sizes):
                mixer, mixer_kw = "cswin", dict(num_heads=num_heads[i], split_size=split_sizes[i], backend=backend)
            else:
                mixer = GlobalLePEAttention2D
                mixer_kw = dict(num_heads=num_heads[i], lepe_kernel=3, lepe_source="value")
            blocks = [MixerBlock(dims[i], mixer, dict(mixer_kw, **attn_kw), mlp_ratio=mlp_ratio, drop=drop_rate,
                                 drop_path=p) for p in rates[i]]
            return Stage(blocks, ConvDownsample(dims[i - 1], dims[i], bias=True) if i > 0 else None)

        super().__init__(CSWinStem(in_chans, embed_dim), [partial(stage, i) for i in range(len(depths))], dims,
                         [4 * 2 ** i for i in range(len(depths))], in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, norm_layer=nn.LayerNorm,
                         out_norm_layer=nn.LayerNorm)
        self.depths, self.num_heads, self.split_sizes = tuple(depths), tuple(num_heads), tuple(split_sizes)


def _build(name: str, **kwargs) -> CSWin:
    cfg = CSWIN_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path_rate)
    return CSWin(**{**arch, **kwargs})


@register_model("cswin_tiny", config=CSWIN_CONFIGS["cswin_tiny"], paper=_PAPER)
def cswin_tiny(**kwargs) -> CSWin:
    """CSWin-T; ``kwargs`` override the config or go to :class:`CSWin` (``num_classes``, ``split_sizes``, ...)."""
    return _build("cswin_tiny", **kwargs)


@register_model("cswin_small", config=CSWIN_CONFIGS["cswin_small"], paper=_PAPER)
def cswin_small(**kwargs) -> CSWin:
    """CSWin-S; ``kwargs`` as in :func:`cswin_tiny`."""
    return _build("cswin_small", **kwargs)


@register_model("cswin_base", config=CSWIN_CONFIGS["cswin_base"], paper=_PAPER)
def cswin_base(**kwargs) -> CSWin:
    """CSWin-B; ``kwargs`` as in :func:`cswin_tiny`."""
    return _build("cswin_base", **kwargs)
