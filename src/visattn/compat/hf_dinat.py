"""Hugging Face ``transformers`` DiNAT weights in visattn's NAT/DiNAT (:class:`visattn.models.nat.NAT`).

``DinatModel``, ``DinatForImageClassification`` and ``DinatBackbone`` name their weights differently
from visattn and keep query, key and value projections apart; the computation is the same (NA with a
relative positional bias ``rpb [heads, 2k-1, 2k-1]``, pre-norm blocks, optional layer scale, the
convolutional tokenizer and downsamplers), so the converted weights reproduce the model wherever
every window fits its feature map (``kernel_size * dilation <= side``: Hugging Face then zero-pads
the map, visattn applies its variable-resolution rule instead).

=======================================================================  ===============================================
Hugging Face key (``dinat.`` prefix in ``DinatForImageClassification``)  visattn key
=======================================================================  ===============================================
``embeddings.patch_embeddings.projection.{0,1}.*``                       ``stem.conv{1,2}.*``
``embeddings.norm.*``                                                    ``stem.norm.*``
``encoder.levels.{i}.layers.{j}.layernorm_before.*``                     ``stages.{i}.blocks.{j}.norm1.*``
``...attention.self.{query,key,value}.{weight,bias}``                    ``...attn.qkv.{weight,bias}`` (concatenated)
``...attention.self.rpb``                                                ``...attn.rpb``
``...attention.output.dense.*``                                          ``...attn.proj.*``
``...layernorm_after.*``                                                 ``...norm2.*``
``...intermediate.dense.*`` / ``...output.dense.*``                      ``...mlp.fc1.*`` / ``...mlp.fc2.*``
``...layer_scale_parameters`` ``[2, dim]``                               ``...ls1.gamma`` / ``...ls2.gamma`` (rows 0, 1)
``encoder.levels.{i}.downsample.reduction.weight``                       ``stages.{i+1}.downsample.conv.weight``
``encoder.levels.{i}.downsample.norm.*``                                 ``stages.{i+1}.downsample.norm.*``
``layernorm.*`` / ``classifier.*``                                       ``norm.*`` / ``head.*``
``hidden_states_norms.stage{i+1}.*`` (``DinatBackbone``)                 ``out_norms.{i}.*`` (``features_only=True``)
=======================================================================  ===============================================

``DinatModel``'s ``pooler_output`` is ``NAT(num_classes=0)``'s output, ``DinatForImageClassification``'s
``logits`` the classifier's, and ``DinatBackbone``'s ``feature_maps`` (stages 1-4) the
``features_only`` model's outputs. The conversion reads a config's attributes and a state dict; it
does not import ``transformers``.

**transformers 4.54 and later** changed DiNAT's attention so that it no longer hands NATTEN
heads-first tensors: 4.54-4.57 unpack the 4-D ``[B, H, W, C]`` input as 3-D and raise, 5.x passes
``[B, W, H, heads, d]`` where NATTEN (every release) expects ``[B, heads, H, W, d]``. The stand-in
refuses that layout with an error; a real NATTEN runs it over the wrong axes when there are at least
``kernel_size * dilation`` heads, and fails otherwise. :func:`fix_transformers_dinat` puts back the
layout of transformers <= 4.53 (:func:`dinat_attention_forward`) so those releases' DiNAT runs.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import torch

__all__ = ["convert_hf_dinat_state_dict", "dinat_attention_forward", "fix_transformers_dinat", "nat_from_hf_dinat",
           "nat_kwargs_from_hf_config"]

#: The first transformers release whose DiNAT attention no longer passes NATTEN heads-first tensors.
LAYOUT_CHANGED_IN = (4, 54)

_LAYER = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "layernorm_before.": "norm1.", "attention.self.rpb": "attn.rpb", "attention.output.dense.": "attn.proj.",
    "layernorm_after.": "norm2.", "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2.",
}


def nat_kwargs_from_hf_config(config: Any, features_only: bool = False) -> dict:
    """Keyword arguments of :class:`visattn.models.nat.NAT` for a ``DinatConfig``.

    ``features_only``: a backbone for ``config.out_features`` (``stage1``-``stage4``; ``stem`` has no
    visattn counterpart and raises ``ValueError``).
    """
    kw = dict(depths=tuple(config.depths), num_heads=tuple(config.num_heads), embed_dim=config.embed_dim,
              mlp_ratio=config.mlp_ratio, kernel_size=config.kernel_size,
              dilations=[list(d) for d in config.dilations], qkv_bias=config.qkv_bias,
              layer_scale=config.layer_scale_init_value if config.layer_scale_init_value > 0 else None,
              drop_path_rate=config.drop_path_rate, in_chans=config.num_channels)
    if features_only:
        names = list(getattr(config, "out_features", None) or [f"stage{i + 1}" for i in range(len(config.depths))])
        if "stem" in names:
            raise ValueError(f"nat_kwargs_from_hf_config: out_features={names} includes 'stem', which visattn's NAT "
                             f"does not output; keep stage1-stage{len(config.depths)}.")
        kw.update(features_only=True, out_indices=tuple(int(n.removeprefix("stage")) - 1 for n in names))
    else:
        kw["num_classes"] = getattr(config, "num_labels", 0)
    return kw


def convert_hf_dinat_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face DiNAT state dict to visattn's NAT layout (table in the module docstring).

    Accepts the state dicts of ``DinatModel``, ``DinatForImageClassification`` and ``DinatBackbone``.
    Raises ``KeyError`` listing keys that are not part of that layout.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("dinat.")
        new = _rename(key)
        m = _LAYER.match(key)
        if new is None and m and re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", m.group(3)):
            part, kind = m.group(3).split(".")[2:]
            qkv.setdefault(f"stages.{m.group(1)}.blocks.{m.group(2)}.attn.qkv.{kind}", {})[part] = value
            continue
        if new is None and m and m.group(3) == "layer_scale_parameters":
            prefix = f"stages.{m.group(1)}.blocks.{m.group(2)}"
            out[f"{prefix}.ls1.gamma"], out[f"{prefix}.ls2.gamma"] = value[0], value[1]
            continue
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            unknown.append(f"{key} (only {sorted(parts)} of query/key/value)")
            continue
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise KeyError(f"convert_hf_dinat_state_dict: keys not in the Hugging Face DiNAT layout: {shown}.")
    return out


def _rename(key: str) -> Optional[str]:
    m = _LAYER.match(key)
    if m:
        rest = m.group(3)
        for old, new in _RENAMES.items():
            if rest.startswith(old):
                return f"stages.{m.group(1)}.blocks.{m.group(2)}.{new}{rest[len(old):]}"
        return None
    simple = [(r"^embeddings\.patch_embeddings\.projection\.0\.(.+)$", r"stem.conv1.\1"),
              (r"^embeddings\.patch_embeddings\.projection\.1\.(.+)$", r"stem.conv2.\1"),
              (r"^embeddings\.norm\.(.+)$", r"stem.norm.\1"),
              (r"^layernorm\.(.+)$", r"norm.\1"),
              (r"^classifier\.(.+)$", r"head.\1")]
    for pattern, repl in simple:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    m = re.match(r"^encoder\.levels\.(\d+)\.downsample\.(reduction|norm)\.(.+)$", key)
    if m:
        part = "conv" if m.group(2) == "reduction" else "norm"
        return f"stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"
    m = re.match(r"^hidden_states_norms\.stage(\d+)\.(.+)$", key)
    if m:
        return f"out_norms.{int(m.group(1)) - 1}.{m.group(2)}"
    return None


def nat_from_hf_dinat(hf_model: Any) -> torch.nn.Module:
    """visattn's NAT with the weights of a Hugging Face ``DinatModel``, ``DinatForImageClassification``
    or ``DinatBackbone`` (in eval mode if the Hugging Face model is)."""
    from ..models.nat import NAT

    backbone = type(hf_model).__name__.endswith("Backbone")
    kw = nat_kwargs_from_hf_config(hf_model.config, features_only=backbone)
    if type(hf_model).__name__ == "DinatModel":
        kw["num_classes"] = 0
    model = NAT(**kw)
    model.load_state_dict(convert_hf_dinat_state_dict(hf_model.state_dict()))
    return model.train(hf_model.training)


def dinat_attention_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple:
    """transformers' ``NeighborhoodAttention.forward`` (DiNAT) with queries, keys and values laid out
    heads-first ``[B, heads, H, W, d]`` for NATTEN's operators, as up to transformers 4.53."""
    import sys

    md = sys.modules[type(self).__module__]  # the natten operators transformers' module imported
    shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
    q, k, v = (p(hidden_states).view(shape).permute(0, 3, 1, 2, 4) for p in (self.query, self.key, self.value))
    scores = md.natten2dqkrpb(q / math.sqrt(self.attention_head_size), k, self.rpb, self.kernel_size, self.dilation)
    probs = self.dropout(torch.nn.functional.softmax(scores, dim=-1))
    context = md.natten2dav(probs, v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4).contiguous()
    context = context.view(context.size()[:-2] + (self.all_head_size,))
    return (context, probs) if output_attentions else (context,)


def fix_transformers_dinat() -> bool:
    """Make the installed transformers' DiNAT pass NATTEN heads-first tensors (module docstring).

    Replaces ``transformers.models.dinat.modeling_dinat.NeighborhoodAttention.forward`` by
    :func:`dinat_attention_forward` when transformers is 4.54 or later (returns True), and changes
    nothing for earlier releases, whose DiNAT is right (returns False). Call it after
    :func:`~visattn.compat.install_natten` (importing the DiNAT module binds the natten operators).
    """
    import importlib.metadata

    version = tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("transformers"))[:2])
    if version < LAYOUT_CHANGED_IN:
        return False
    from transformers.models.dinat import modeling_dinat

    modeling_dinat.NeighborhoodAttention.forward = dinat_attention_forward
    return True
