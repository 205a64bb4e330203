"""Load checkpoints of the official NAT/DiNAT code (SHI-Labs/Neighborhood-Attention-Transformer).

The official classification models (``classification/nat.py``, ``dinat.py``) and the detection /
segmentation backbones (``norm{i}`` output norms) name their weights differently from ours, and put
each downsampler at the *end* of a level where we open the next stage with it:

==========================================  =============================================
official key                                visattn key
==========================================  =============================================
``patch_embed.proj.0.*``                     ``stem.conv1.*``
``patch_embed.proj.1.*``                     ``stem.conv2.*``
``patch_embed.norm.*``                       ``stem.norm.*``
``levels.{i}.blocks.{j}.gamma1`` / ``gamma2``  ``stages.{i}.blocks.{j}.ls1.gamma`` / ``ls2.gamma``
``levels.{i}.blocks.{j}.<rest>``             ``stages.{i}.blocks.{j}.<rest>`` (``norm1``,
                                             ``attn.qkv``, ``attn.rpb``, ``attn.proj``, ``norm2``,
                                             ``mlp.fc1``, ``mlp.fc2``: unchanged)
``levels.{i}.downsample.reduction.weight``  ``stages.{i+1}.downsample.conv.weight``
``levels.{i}.downsample.norm.*``            ``stages.{i+1}.downsample.norm.*``
``norm.*``, ``head.*``                      unchanged
``norm{i}.*`` (detection/segmentation)      ``out_norms.{i}.*`` (``features_only=True``)
==========================================  =============================================

Tensors keep their shapes and values (the relative-position tables ``rpb [heads, 2k-1, 2k-1]``
index offsets the same way), so a converted checkpoint reproduces the official model exactly.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Union

import torch
from torch import nn

__all__ = ["convert_official_state_dict", "load_official_checkpoint"]

# (pattern on the official key, replacement); tried in order, the first match wins.
_RULES: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r"^patch_embed\.proj\.0\.(.+)$"), r"stem.conv1.\1"),
    (re.compile(r"^patch_embed\.proj\.1\.(.+)$"), r"stem.conv2.\1"),
    (re.compile(r"^patch_embed\.norm\.(.+)$"), r"stem.norm.\1"),
    (re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.gamma([12])$"), r"stages.\1.blocks.\2.ls\3.gamma"),
    (re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.(.+)$"), r"stages.\1.blocks.\2.\3"),
    (re.compile(r"^levels\.(\d+)\.downsample\.reduction\.(.+)$"),
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.conv.{m.group(2)}"),
    (re.compile(r"^levels\.(\d+)\.downsample\.norm\.(.+)$"),
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.norm.{m.group(2)}"),
    (re.compile(r"^norm(\d+)\.(.+)$"), r"out_norms.\1.\2"),
    (re.compile(r"^(norm|head)\.(.+)$"), r"\1.\2"),
)

# Training wrappers put the weights under one of these keys, and DDP prefixes every key with "module.".
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")


def _unwrap(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official NAT/DiNAT state dict to visattn's layout (table in the module docstring).

    Accepts a bare state dict or a training checkpoint holding one under ``state_dict``/``model``;
    strips a DDP ``module.`` prefix. Raises ``KeyError`` listing any key that is not part of the
    official layout (so a wrong file fails loudly instead of loading half a model).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _unwrap(state_dict).items():
        key = key.removeprefix("module.")
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise KeyError(f"convert_official_state_dict: keys not in the official NAT/DiNAT layout: {shown}. "
                       f"Is this a NAT/DiNAT checkpoint from SHI-Labs/Neighborhood-Attention-Transformer?")
    return out


def load_official_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                             strict: bool = True):
    """Load an official checkpoint (path or state dict) into a visattn NAT/DiNAT ``model``.

    Returns ``model.load_state_dict``'s result. With ``strict=False``, weights the model lacks or
    holds in another shape (a 1000-class head in a 10-class or ``features_only`` model) are
    skipped and reported as unexpected/missing instead of raising.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = convert_official_state_dict(checkpoint)
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    return model.load_state_dict(state, strict=strict)
