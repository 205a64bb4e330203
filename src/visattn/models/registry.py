"""Model registry: ``create_model(name, pretrained=False, **kw)``, ``list_models()``, and a timm hook.

Every NAT/DiNAT variant of :data:`visattn.models.nat.NAT_CONFIGS` is registered by name. Keyword
arguments override the variant's config (``depths``, ``embed_dim``, ...) or go to
:class:`~visattn.models.nat.NAT` (``num_classes``, ``in_chans``, ``features_only``, ``out_indices``,
``attn_type``, ``backend``, ...); DiNAT variants also take ``img_size`` to pick their dilations.

timm: :func:`visattn.models.timm_hook.register_timm` adds the same names to timm's registry.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Optional

from torch import nn

from .convert import load_official_checkpoint
from .nat import NAT_CONFIGS, build_nat

__all__ = ["create_model", "list_models", "model_info", "register_model"]

_MODELS: dict[str, dict] = {}

# Official ImageNet checkpoints (SHI-Labs), loaded through convert.py by ``pretrained=True``.
_URLS = {
    "nat_mini": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth",
    "nat_tiny": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth",
    "nat_small": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth",
    "nat_base": "https://shi-labs.com/projects/nat/checkpoints/CLS/nat_base.pth",
    "dinat_mini": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth",
    "dinat_tiny": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth",
    "dinat_small": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth",
    "dinat_base": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_base_in1k_224.pth",
    "dinat_large": "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_large_in22k_in1k_224.pth",
}


def register_model(name: str, builder: Callable[..., nn.Module], *, url: Optional[str] = None, **info) -> None:
    """Register ``builder(**kwargs) -> nn.Module`` as ``name`` (lower-case); ``info`` goes to :func:`model_info`."""
    if name != name.lower():
        raise ValueError(f"register_model: names are lower-case, got {name!r}.")
    if name in _MODELS and _MODELS[name]["builder"] is not builder:
        raise ValueError(f"register_model: {name!r} is already registered.")
    _MODELS[name] = dict(builder=builder, url=url, **info)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the shell-style ``pattern`` (e.g. ``"dinat_*"``)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> dict:
    """Registration record of ``name``: ``builder``, checkpoint ``url``, and the variant's config."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    return dict(_MODELS[name])


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    ``pretrained=True`` downloads the official ImageNet checkpoint (cached by ``torch.hub``) and
    loads it through :func:`~visattn.models.convert.load_official_checkpoint`;
    ``checkpoint_path`` loads a local official checkpoint instead. A head of another size
    (``num_classes != 1000``) or ``features_only`` loads non-strictly and keeps its fresh layers.
    """
    record = model_info(name.lower())
    model = record["builder"](**kwargs)
    if pretrained or checkpoint_path is not None:
        if checkpoint_path is None:
            if record["url"] is None:
                raise ValueError(f"create_model: {name!r} has no pretrained checkpoint; use pretrained=False.")
            import torch.hub

            checkpoint = torch.hub.load_state_dict_from_url(record["url"], map_location="cpu")
        else:
            checkpoint = checkpoint_path
        strict = not kwargs.get("features_only", False) and kwargs.get("num_classes", 1000) == 1000
        load_official_checkpoint(model, checkpoint, strict=strict)
    return model


def _builder(variant: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return build_nat(variant, **kwargs)

    build.__name__ = variant
    build.__doc__ = f"{variant}: {NAT_CONFIGS[variant].paper}."
    return build


for _name, _cfg in NAT_CONFIGS.items():
    register_model(_name, _builder(_name), url=_URLS.get(_name), config=_cfg)
