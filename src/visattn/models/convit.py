"""ConViT (d'Ascoli et al., ICML 2021) on the stage builder, with timm's weights.

ConViT is a plain (non-hierarchical) ViT: every block works at stride 16. It maps onto the stage
builder as two stages on the same grid (timm's ``convit_{tiny,small,base}`` map onto it with
:func:`convit_from_timm`):

* ``stem`` (:class:`ViTEmbed`): 16x16 patchify conv + learned absolute position embedding,
  resampled (bicubic) for another grid than the 14x14 it was trained on;
* ``stages[0]``: ``local_up_to_layer`` (10) blocks with gated positional self-attention
  (``"convit"``) on the patch map;
* ``stages[1]`` (:class:`ClassTokenStage`): the class token joins the patches and
  ``depth - local_up_to_layer`` (2) blocks of plain self-attention run on all ``1 + h*w`` tokens;
* ``norm`` + the class token + ``head``.

``features_only`` returns both stages' patch maps (stride 16; the class token is dropped). Any
input size: the position embedding is resampled and GPSA's relative positions follow the grid
(timm's ConViT only runs at 224). No window attention, hence no ``mixer="na"`` switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import GlobalAttention2D, MixerBlock
from ..nn.layers.conv_stem import pad_to_multiple
from .backbone import Backbone, Stage, drop_path_rates
from .convert import rename_state_dict, timm_checkpoint_loader
from .registry import register_model

__all__ = ["CONVIT_CONFIGS", "ClassTokenStage", "ConViT", "ViTEmbed", "convit_from_timm"]


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)  # ConViT's (DeiT's) eps


@dataclass(frozen=True)
class ConViTConfig:
    """A ConViT variant (``embed_dim = 48 * num_heads``) and its paper's numbers at 224x224."""

    num_heads: int
    drop_path_rate: float
    paper_params_m: float
    paper_gmacs: float


_PAPER = "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases (ICML 2021), Table 1"
CONVIT_CONFIGS: dict[str, ConViTConfig] = {
    "convit_tiny": ConViTConfig(4, 0.1, 6, 1),
    "convit_small": ConViTConfig(9, 0.1, 27, 5.4),
    "convit_base": ConViTConfig(16, 0.1, 86, 17),
}


class ViTEmbed(nn.Module):
    """Patchify conv + absolute position embedding: ``[B, C_in, H, W] -> [B, ceil(H/p), ceil(W/p), C]``.

    ``pos_embed [1, gh * gw, C]`` is learned for a ``grid``; on another grid it is resampled
    bicubically (as timm does for ViTs). The image is zero-padded to a multiple of the patch size.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 16, grid: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, tuple(grid)
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """``[1, h, w, C]`` position embedding for an ``h x w`` patch grid."""
        pos = self.pos_embed.reshape(1, *self.grid, -1)
        if (h, w) == self.grid:
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(pad_to_multiple(x, self.patch_size)).permute(0, 2, 3, 1)
        return x + self.position_embedding(x.shape[1], x.shape[2])


class ClassTokenStage(nn.Module):
    """Prepend a learned class token to the patches and run ``blocks`` on all tokens:
    ``[B, h, w, C] -> [B, 1, 1 + h*w, C]`` (token 0 is the class token).

    The tokens travel as a ``1 x (1 + h*w)`` map, so the blocks are ordinary channels-last blocks;
    their mixer must be global (every token sees every other), as ConViT's self-attention is.
    """

    def __init__(self, dim: int, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(1, 2)[:, None]  # [B, 1, h*w, C]
        return self.blocks(torch.cat([self.cls_token.expand(x.shape[0], -1, -1, -1), tokens], dim=2))


class ConViT(Backbone):
    """ConViT classifier and (single-scale) backbone (module docstring: layout, sizes).

    ``forward(x [B, C_in, H, W])`` -> logits ``[B, num_classes]`` from the class token;
    ``features_only=True`` -> channels-first patch maps ``[B, C, ceil(H/16), ceil(W/16)]``.
    """

    def __init__(self, num_heads: int = 4, embed_dim: Optional[int] = None, depth: int = 12,
                 local_up_to_layer: int = 10, mlp_ratio: float = 4.0, locality_strength: float = 1.0,
                 qkv_bias: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.1, img_size: int = 224,
                 patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        dim = embed_dim or 48 * num_heads
        if not 0 < local_up_to_layer < depth:
            raise ValueError(f"ConViT: local_up_to_layer={local_up_to_layer} must be in [1, depth={depth}).")
        rates = drop_path_rates(drop_path_rate, (local_up_to_layer, depth - local_up_to_layer))
        block = partial(MixerBlock, mlp_ratio=mlp_ratio, norm_layer=_layer_norm, drop=drop_rate)
        gpsa_kw = dict(num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=drop_rate, locality_strength=locality_strength)
        mhsa_kw = dict(num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=drop_rate)

        def local_stage() -> Stage:
            return Stage([block(dim, "convit", gpsa_kw, drop_path=p) for p in rates[0]])

        def class_token_stage() -> ClassTokenStage:
            return ClassTokenStage(dim, [block(dim, GlobalAttention2D, mhsa_kw, drop_path=p) for p in rates[1]])

        grid = (-(-img_size // patch_size),) * 2
        super().__init__(ViTEmbed(in_chans, dim, patch_size, grid), [local_stage, class_token_stage], [dim, dim],
                         [patch_size, patch_size], in_chans=in_chans, num_classes=num_classes,
                         features_only=features_only, out_indices=out_indices, norm_layer=_layer_norm,
                         pos_drop_rate=drop_rate)
        self.num_heads, self.local_up_to_layer = num_heads, local_up_to_layer

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The class token of the final ``[B, 1, 1 + h*w, C]`` tokens: ``[B, C]``."""
        return x[:, 0, 0]

    def feature_maps(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop the class token of the last stage and lay its patches out on the first stage's grid."""
        h, w = outs[0].shape[1:3]
        return [outs[0]] + [o[:, 0, 1:].unflatten(1, (h, w)) for o in outs[1:]]


def _blocks(m) -> str:
    j = int(m.group(1))
    return f"stages.{int(j >= 10)}.blocks.{j - 10 * (j >= 10)}.{m.group(2)}"


_TIMM_RULES = (
    (r"^patch_embed\.proj\.(.+)$", r"stem.proj.\1"),
    (r"^pos_embed$", "stem.pos_embed"),
    (r"^cls_token$", "stages.1.cls_token", lambda t: t[:, None]),
    # A per-head constant added to every positional logit of a row cancels in its softmax: the bias
    # has no effect, and ours has none.
    (r"^blocks\.\d+\.attn\.pos_proj\.bias$", None),
    (r"^blocks\.(\d+)\.(.+)$", _blocks),
    (r"^(norm|head)\.(.+)$", r"\1.\2"),
)


def convit_from_timm(state_dict) -> dict[str, torch.Tensor]:
    """Rename a timm ``convit_*`` state dict for :class:`ConViT` (10 local layers, as every ConViT variant)."""
    return rename_state_dict(state_dict, _TIMM_RULES, "convit_from_timm", "timm ConViT")


def _build(name: str, **kwargs) -> ConViT:
    cfg = CONVIT_CONFIGS[name]
    return ConViT(**{**dict(num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path_rate), **kwargs})


_REGISTRATION = dict(paper=_PAPER, from_timm=convit_from_timm, load_checkpoint=timm_checkpoint_loader(convit_from_timm))


@register_model("convit_tiny", timm_name="convit_tiny", config=CONVIT_CONFIGS["convit_tiny"], **_REGISTRATION)
def convit_tiny(**kwargs) -> ConViT:
    """ConViT-Ti; ``kwargs`` override the config or go to :class:`ConViT`."""
    return _build("convit_tiny", **kwargs)


@register_model("convit_small", timm_name="convit_small", config=CONVIT_CONFIGS["convit_small"], **_REGISTRATION)
def convit_small(**kwargs) -> ConViT:
    """ConViT-S; ``kwargs`` as in :func:`convit_tiny`."""
    return _build("convit_small", **kwargs)


@register_model("convit_base", timm_name="convit_base", config=CONVIT_CONFIGS["convit_base"], **_REGISTRATION)
def convit_base(**kwargs) -> ConViT:
    """ConViT-B; ``kwargs`` as in :func:`convit_tiny`."""
    return _build("convit_base", **kwargs)
