"""Swin Transformer (Liu et al., ICCV 2021) on the stage builder, with timm's weights and an NA switch.

Layout (timm's ``swin_*_patch4_window7_224`` maps onto it with :func:`swin_from_timm`):

* ``stem``: 4x4 stride-4 patchify conv + LayerNorm (:class:`~visattn.nn.layers.PatchEmbed`);
* ``stages[i]``: for ``i > 0`` patch merging (2x2 concat, LayerNorm, bias-free linear, width x2),
  then ``depths[i]`` pre-norm blocks alternating window attention (``"swin"``) and shifted-window
  attention (``"swin_shifted"``, shift ``M // 2``), each with Swin's relative position bias;
* ``norm`` + global average pool + ``head``; per-output LayerNorms in ``features_only`` mode (as
  the official detection backbone).

``mixer="na"`` swaps every window attention for neighborhood attention with kernel ``M`` and the
same relative-position table shape (so the parameter count, and a converted checkpoint, are
unchanged): the comparison the NAT paper makes, on your task.

Any input size works. Where ``M`` does not divide a side, the window mixers follow GNA (the last
window moves inward) instead of Swin's zero padding; at sizes ``M * 32`` divides (224, 448, ...)
the model equals timm's (``tests/models/test_timm_parity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.layers import MixerBlock, PatchEmbed, PatchMerging
from .backbone import Backbone, Stage, drop_path_rates, pyramid
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["Swin", "SWIN_CONFIGS", "swin_from_timm"]


@dataclass(frozen=True)
class SwinConfig:
    """A Swin variant and the numbers its paper prints at 224x224 (millions of parameters, GMACs)."""

    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    embed_dim: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "Swin Transformer (ICCV 2021), Table 1(a)"
SWIN_CONFIGS: dict[str, SwinConfig] = {
    "swin_tiny": SwinConfig((2, 2, 6, 2), (3, 6, 12, 24), 96, 0.2, 28, 4.5),
    "swin_small": SwinConfig((2, 2, 18, 2), (3, 6, 12, 24), 96, 0.3, 50, 8.7),
    "swin_base": SwinConfig((2, 2, 18, 2), (4, 8, 16, 32), 128, 0.5, 88, 15.4),
}


def window_mixer(mixer: str, block: int, num_heads: int, window_size: int, **kw) -> tuple[str, dict]:
    """The token mixer of block ``block`` of a window-attention stage: ``(registered name, kwargs)``.

    ``mixer="window"``: Swin's W-MSA on even blocks, SW-MSA on odd ones; ``mixer="na"``:
    neighborhood attention with kernel ``window_size`` and a relative-position table of the same
    shape, in every block. Raises ``ValueError`` for another ``mixer``.
    """
    if mixer == "window":
        return ("swin" if block % 2 == 0 else "swin_shifted"), dict(num_heads=num_heads, window_size=window_size, **kw)
    if mixer == "na":
        return "na2d", dict(num_heads=num_heads, kernel_size=window_size, rel_pos_bias=True, **kw)
    raise ValueError(f"mixer={mixer!r}; choose 'window' (the paper's window attention) or 'na' (neighborhood "
                     f"attention with the same window).")


class Swin(Backbone):
    """Swin Transformer backbone and classifier (module docstring: layout, ``mixer``, input sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]``; ``features_only=True`` ->
    channels-first maps at strides 4, 8, 16, 32 for the stages in ``out_indices``.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 embed_dim: int = 96, window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 mixer: str = "window", in_chans: int = 3, num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> None:
        window_mixer(mixer, 0, 1, window_size)  # validates ``mixer`` before anything is built
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        rates = drop_path_rates(drop_path_rate, depths)
        attn_kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate, backend=backend)

        def stage(i: int) -> Stage:
            blocks = [MixerBlock(dims[i], *window_mixer(mixer, j, num_heads[i], window_size, **attn_kw),
                                 mlp_ratio=mlp_ratio, drop=drop_rate, drop_path=p) for j, p in enumerate(rates[i])]
            return Stage(blocks, PatchMerging(dims[i - 1], dims[i]) if i > 0 else None)

        super().__init__(PatchEmbed(in_chans, embed_dim, kernel_size=4, stride=4),
                         [partial(stage, i) for i in range(len(depths))], dims, pyramid(len(depths)),
                         in_chans=in_chans, num_classes=num_classes, features_only=features_only,
                         out_indices=out_indices, norm_layer=nn.LayerNorm, out_norm_layer=nn.LayerNorm)
        self.depths, self.num_heads, self.window_size, self.mixer = tuple(depths), tuple(num_heads), window_size, mixer


def _swin_rpb(table: torch.Tensor) -> torch.Tensor:
    """Swin's ``relative_position_bias_table [(2M-1)^2, heads]``, indexed by query minus key, as our
    ``rpb [heads, 2M-1, 2M-1]`` indexed by key minus query: transpose, unflatten, flip both offsets."""
    span = round(table.shape[0] ** 0.5)
    return table.t().reshape(-1, span, span).flip(1, 2).contiguous()


_TIMM_RULES = (
    (r"^patch_embed\.proj\.(.+)$", r"stem.conv.\1"),
    (r"^patch_embed\.norm\.(.+)$", r"stem.norm.\1"),
    (r"^layers\.(\d+)\.downsample\.(.+)$", r"stages.\1.downsample.\2"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", r"stages.\1.blocks.\2.attn.rpb", _swin_rpb),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.(.+)$", r"norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
)


def swin_from_timm(state_dict) -> dict[str, torch.Tensor]:
    """Rename (and reshape the bias tables of) a timm ``swin_*_patch4_window7_224`` state dict for :class:`Swin`."""
    return rename_state_dict(state_dict, _TIMM_RULES, "swin_from_timm", "timm Swin Transformer")


def _build(name: str, **kwargs) -> Swin:
    cfg = SWIN_CONFIGS[name]
    arch = dict(depths=cfg.depths, num_heads=cfg.num_heads, embed_dim=cfg.embed_dim, drop_path_rate=cfg.drop_path_rate)
    return Swin(**{**arch, **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_timm=swin_from_timm, load_checkpoint=timm_checkpoint_loader(swin_from_timm))


@register_model("swin_tiny", timm_name="swin_tiny_patch4_window7_224", config=SWIN_CONFIGS["swin_tiny"],
                **_REGISTRATION)
def swin_tiny(**kwargs) -> Swin:
    """Swin-T; ``kwargs`` override the config or go to :class:`Swin` (``mixer="na"``, ``num_classes``, ...)."""
    return _build("swin_tiny", **kwargs)


@register_model("swin_small", timm_name="swin_small_patch4_window7_224", config=SWIN_CONFIGS["swin_small"],
                **_REGISTRATION)
def swin_small(**kwargs) -> Swin:
    """Swin-S; ``kwargs`` as in :func:`swin_tiny`."""
    return _build("swin_small", **kwargs)


@register_model("swin_base", timm_name="swin_base_patch4_window7_224", config=SWIN_CONFIGS["swin_base"],
                **_REGISTRATION)
def swin_base(**kwargs) -> Swin:
    """Swin-B; ``kwargs`` as in :func:`swin_tiny`."""
    return _build("swin_base", **kwargs)
