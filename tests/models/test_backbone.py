"""The stage builder: stem, stages of any blocks, downsampling, head options, multi-scale features."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from visattn.models.backbone import Backbone, Stage, drop_path_rates
from visattn.nn.layers import ConvDownsample, MBConv, MixerBlock, PatchEmbed


def _toy(calls: list | None = None, **kw) -> Backbone:
    """Three stages with three kinds of blocks: MBConv, Swin windows, neighborhood attention."""
    dims = (8, 16, 32)

    def stage(i: int) -> Stage:
        if calls is not None:
            calls.append(i)
        if i == 0:
            return Stage([MBConv(8, 8)])
        mixer, mkw = [None, ("swin", dict(num_heads=2, window_size=3)), ("na2d", dict(num_heads=4, kernel_size=3))][i]
        rates = drop_path_rates(0.1, (1, 2, 2))[i]
        return Stage([MixerBlock(dims[i], mixer, mkw, mlp_ratio=2.0, drop_path=p) for p in rates],
                     ConvDownsample(dims[i - 1], dims[i]))

    torch.manual_seed(0)
    return Backbone(PatchEmbed(3, 8), [partial(stage, i) for i in range(3)], dims, (4, 8, 16), **kw)


def test_drop_path_rates_grow_linearly_over_all_blocks() -> None:
    assert drop_path_rates(0.3, (1, 2, 1)) == [[0.0], pytest.approx([0.1, 0.2]), pytest.approx([0.3])]
    assert drop_path_rates(0.5, (1,)) == [[0.0]]


@pytest.mark.parametrize("size", [(64, 64), (50, 37), (9, 9)])
def test_classifier_and_features_at_any_size(size) -> None:
    model = _toy(num_classes=5, norm_layer=nn.LayerNorm).eval()
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 5)
    feats = _toy(features_only=True).eval()(x)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info["num_chs"], math.ceil(size[0] / info["reduction"]),
                           math.ceil(size[1] / info["reduction"]))


def test_features_only_builds_only_the_stages_it_needs_and_matches_the_classifier() -> None:
    calls: list[int] = []
    part = _toy(calls, features_only=True, out_indices=(1,), out_norm_layer=nn.LayerNorm).eval()
    assert calls == [0, 1] and len(part.stages) == 2 and set(part.out_norms) == {"1"}
    full = _toy(num_classes=3).eval()
    shared = {k: v for k, v in full.state_dict().items() if k.startswith(("stem.", "stages.0.", "stages.1."))}
    assert set(part.state_dict()) - set(shared) == {"out_norms.1.weight", "out_norms.1.bias"}
    part.load_state_dict(shared, strict=False)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        mid = full.forward_stages(x)[1]
        torch.testing.assert_close(part(x)[0], part.out_norms["1"](mid).permute(0, 3, 1, 2))


def test_head_options_norm_pool_mlp_linear() -> None:
    """MaxViT's head: pool, LayerNorm, Linear + tanh, Linear; the pieces in that order."""
    model = _toy(num_classes=4, head_norm_layer=nn.LayerNorm, head_hidden_size=12).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = nn.functional.layer_norm(feats.mean((1, 2)), (32,), model.head_norm.weight, model.head_norm.bias)
        hidden = torch.tanh(model.pre_logits.fc(pooled))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), hidden)
        torch.testing.assert_close(model(x), model.head(hidden))
    model.reset_classifier(7)
    assert model.head.in_features == 12 and model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 12)


def test_every_parameter_gets_a_gradient() -> None:
    model = _toy(num_classes=3, norm_layer=nn.LayerNorm).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"Backbone: out_indices=\(0, 3\) has \[3\] outside 0..2"):
        _toy(features_only=True, out_indices=(0, 3))
    with pytest.raises(ValueError, match="need one entry per stage"):
        Backbone(nn.Identity(), [nn.Identity], (8, 16), (4,))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        _toy()(torch.randn(1, 32, 32, 3))
    with pytest.raises(RuntimeError, match="features_only=True"):
        _toy(features_only=True).forward_features(torch.randn(1, 3, 32, 32))
