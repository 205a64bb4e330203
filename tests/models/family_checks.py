"""Checks every backbone family on the stage builder must pass: its size against the paper's table,
and the classifier and multi-scale backbone at an input size no stride divides."""

from __future__ import annotations

import math
from typing import Callable

import torch

from visattn import count_flops
from visattn.models import create_model, model_info


def params_and_gmacs(name: str, **kwargs) -> tuple[int, float]:
    """Parameters and GMACs (fvcore's convention, ``count_flops``) of ``create_model(name)`` at 224x224,
    counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    return params, count_flops(model, torch.empty(1, 3, 224, 224, device="meta")) / 1e9


def check_classifier_and_backbone(name: str, size: tuple[int, int] = (67, 51), **kwargs) -> None:
    """At an odd size: logits of the right shape; ``features_only`` maps at ``ceil(H / reduction)``
    with the classifier's stage outputs as values; a shallower ``out_indices`` builds fewer stages."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    model = create_model(name, num_classes=7, **kwargs).eval()
    backbone = create_model(name, features_only=True, **kwargs).eval()
    shared = {k: v for k, v in model.state_dict().items() if k in backbone.state_dict()}
    backbone.load_state_dict(shared, strict=False)  # the per-output norms (if any) stay fresh
    with torch.no_grad():
        logits = model(x)
        feats = backbone(x)
        stages = model.forward_stages(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert len(feats) == len(model.feature_info) == len(stages)
    norms = getattr(backbone, "out_norms", None)
    for i, (f, info) in enumerate(zip(feats, model.feature_info)):
        assert f.shape == (2, info["num_chs"], math.ceil(size[0] / info["reduction"]),
                           math.ceil(size[1] / info["reduction"])), (name, i, f.shape)
        expect = norms[str(i)](stages[i]) if norms is not None else stages[i]
        torch.testing.assert_close(f, expect.permute(0, 3, 1, 2))
    shallow = create_model(name, features_only=True, out_indices=(1,), **kwargs)
    assert len(shallow.stages) == 2 and len(shallow(x)) == 1


def check_loads_official_layout(name: str, to_official: Callable[[torch.nn.Module], dict], wrapper: str,
                                size: tuple[int, int], **kwargs) -> dict:
    """Write a model's weights in the official layout (``to_official``, written from the official
    code), load them through the registered ``load_checkpoint`` (wrapped as the official training
    scripts save them, under ``wrapper``) into a fresh model, and check it computes the same logits.
    Returns the official-layout state dict."""
    torch.manual_seed(0)
    ours = create_model(name, **kwargs).eval()
    official = to_official(ours)
    fresh = create_model(name, **kwargs).eval()
    model_info(name)["load_checkpoint"](fresh, {wrapper: official})
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x))
    return official


def paper_row(name: str):
    """The registered config of ``name`` (its ``paper_params_m``, ``paper_gmacs``)."""
    return model_info(name)["config"]
