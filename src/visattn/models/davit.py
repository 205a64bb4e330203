"""DaViT (Ding et al., ECCV 2022) on the stage builder, with timm's weights and an NA switch.

Layout (timm's ``davit_{tiny,small,base}`` maps onto it with :func:`davit_from_timm`):

* ``stem``: 7x7 stride-4 conv + LayerNorm;
* ``stages[i]``: for ``i > 0`` LayerNorm + 2x2 stride-2 conv (width x2), then ``depths[i]`` dual
  attention pairs, each a *spatial* block (window attention without a bias table, ``"swin"`` with
  ``rel_pos_bias=False``) followed by a *channel* block (channel group attention,
  ``"davit_channel"``); every block is a :class:`~visattn.nn.layers.MixerBlock` with a
  :class:`~visattn.nn.layers.ConvPosEnc` before each residual branch (``cpe1``, ``cpe2``);
* global average pool + ``head_norm`` (LayerNorm on the pooled vector) + ``head``.

``depths`` counts pairs, as the paper does, so ``stages[i].blocks`` holds ``2 * depths[i]``
blocks. ``mixer="na"`` swaps the spatial window attention for neighborhood attention with the
same window (still without a bias table: the same parameters). Where the window does not divide a
side, the window mixer follows GNA instead of DaViT's zero padding; at multiples of 224 the model
equals timm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import ConvDownsample, ConvPosEnc, MixerBlock, PatchEmbed
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["DAVIT_CONFIGS", "DaViT", "davit_from_timm"]


@dataclass(frozen=True)
class DaViTConfig:
    """A DaViT variant (``depths`` in dual-attention pairs) and its paper's numbers at 224x224."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "DaViT: Dual Attention Vision Transformers (ECCV 2022), Table 1"
DAVIT_CONFIGS: dict[str, DaViTConfig] = {
    "davit_tiny": DaViTConfig((1, 1, 3, 1), (96, 192, 384, 768), (3, 6, 12, 24), 0.1, 28.3, 4.5),
    "davit_small": DaViTConfig((1, 1, 9, 1), (96, 192, 384, 768), (3, 6, 12, 24), 0.2, 49.7, 8.8),
    "davit_base": DaViTConfig((1, 1, 9, 1), (128, 256, 512, 1024), (4, 8, 16, 32), 0.4, 87.9, 15.5),
}


class DaViT(Backbone):
    """DaViT backbone and classifier (module docstring: layout, ``mixer``).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``. Any input size.
    """

    def __init__(self, depths: Sequence[int] = (1, 1, 3, 1), embed_dims: Sequence[int] = (96, 192, 384, 768),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.1, mixer: str = "window", in_chans: int = 3,
                 num_classes: int = 1000, features_only: bool = False, out_indices: Optional[Sequence[int]] = None,
                 backend: Optional[str] = None) -> None:
        if mixer not in ("window", "na"):
            raise ValueError(f"DaViT: mixer={mixer!r}; choose 'window' (the paper's window attention) or 'na' "
                             f"(neighborhood attention with the same window).")
        dims = list(embed_dims)
        rates = drop_path_rates(drop_path_rate, depths)
        spatial_kw = dict(qkv_bias=qkv_bias, rel_pos_bias=False, backend=backend)
        spatial_kw.update(dict(window_size=window_size) if mixer == "window" else dict(kernel_size=window_size))
        spatial = "swin" if mixer == "window" else "na2d"
        block = partial(MixerBlock, mlp_ratio=mlp_ratio, pos_enc=ConvPosEnc)

        def stage(i: int) -> Stage:
            down = (ConvDownsample(dims[i - 1], dims[i], kernel_size=2, stride=2, bias=True, norm_first=True)
                    if i > 0 else None)
            blocks = []
            for p in rates[i]:  # one dual-attention pair per entry, both halves at the pair's rate
                blocks.append(block(dims[i], spatial, dict(num_heads=num_heads[i], **spatial_kw), drop_path=p))
                blocks.append(block(dims[i], "davit_channel", dict(num_heads=num_heads[i], qkv_bias=qkv_bias),
                                    drop_path=p))
            return Stage(blocks, down)

        super().__init__(PatchEmbed(in_chans, dims[0], kernel_size=7, stride=4),
                         [partial(stage, i) for i in range(len(depths))], dims, pyramid(len(depths)),
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices, head_norm_layer=nn.LayerNorm)
        self.depths, self.num_heads, self.window_size, self.mixer = tuple(depths), tuple(num_heads), window_size, mixer


def _channel_qkv(t: torch.Tensor) -> torch.Tensor:
    """timm's channel attention computes ``softmax(K^T V)`` and applies it to ``Q``; ours follows the
    paper (``softmax(Q^T K)`` applied to ``V``): the same map with q, k, v relabelled (ours = k, v, q)."""
    q, k, v = t.chunk(3, dim=0)
    return torch.cat([k, v, q], dim=0)


def _block(m) -> str:
    # timm nests each pair (spatial, channel) as blocks.{pair}.{0|1}; ours is flat: block 2 * pair + half.
    return f"stages.{m.group(1)}.blocks.{2 * int(m.group(2)) + int(m.group(3))}.{m.group(4)}"


_TIMM_RULES = (
    (r"^stem\.(conv|norm)\.(.+)$", r"stem.\1.\2"),
    (r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", r"stages.\1.downsample.\2.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(1)\.(attn\.qkv\..+)$", _block, _channel_qkv),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.([01])\.(.+)$", _block),
    (r"^head\.norm\.(.+)$", r"head_norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)


def davit_from_timm(state_dict) -> dict[str, torch.Tensor]:
    """Rename a timm ``davit_*`` state dict for :class:`DaViT` (and relabel the channel attention's q, k, v)."""
    return rename_state_dict(state_dict, _TIMM_RULES, "davit_from_timm", "timm DaViT")


def _build(name: str, **kwargs) -> DaViT:
    cfg = DAVIT_CONFIGS[name]
    arch = dict(depths=cfg.depths, embed_dims=cfg.embed_dims, num_heads=cfg.num_heads,
                drop_path_rate=cfg.drop_path_rate)
    return DaViT(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_timm=davit_from_timm, load_checkpoint=timm_checkpoint_loader(davit_from_timm))


@register_model("davit_tiny", timm_name="davit_tiny", config=DAVIT_CONFIGS["davit_tiny"], **_REGISTRATION)
def davit_tiny(**kwargs) -> DaViT:
    """DaViT-Tiny; ``kwargs`` override the config or go to :class:`DaViT` (``mixer="na"``, ``num_classes``, ...)."""
    return _build("davit_tiny", **kwargs)


@register_model("davit_small", timm_name="davit_small", config=DAVIT_CONFIGS["davit_small"], **_REGISTRATION)
def davit_small(**kwargs) -> DaViT:
    """DaViT-Small; ``kwargs`` as in :func:`davit_tiny`."""
    return _build("davit_small", **kwargs)


@register_model("davit_base", timm_name="davit_base", config=DAVIT_CONFIGS["davit_base"], **_REGISTRATION)
def davit_base(**kwargs) -> DaViT:
    """DaViT-Base; ``kwargs`` as in :func:`davit_tiny`."""
    return _build("davit_base", **kwargs)
