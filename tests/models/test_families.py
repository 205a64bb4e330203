"""Every family on the stage builder: sizes against the papers' tables, any input size, features_only,
the NA switch, and the errors. (Equality with timm's implementations: test_timm_parity.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import visattn
from visattn.models import create_model, list_models, model_info

# The families with a timm counterpart (NAT/DiNAT have their own file); the smallest variant of each.
MODELS = [n for n in list_models() if model_info(n).get("from_timm") is not None]
# The behaviour tests run narrow, shallow versions of the smallest variant of each family (the same
# code paths; the paper sizes are checked on the meta device above them).
TINY = {
    "swin_tiny": dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8)),
    "focalnet_tiny_srf": dict(depths=(1, 1, 1, 1), embed_dim=32),
    "davit_tiny": dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)),
    "maxvit_tiny": dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), stem_width=32, head_hidden_size=64),
    "convit_tiny": dict(depth=4, local_up_to_layer=2, num_heads=2),
    "halonet26t": dict(widths=(64, 128, 256, 512), stem_width=32),
    "mambaout_femto": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64)),
}
WINDOWED = ["swin_tiny", "davit_tiny", "maxvit_tiny"]


def _small(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **TINY[name], **kw)


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, **kw).eval()


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _gmacs_by_op(model: torch.nn.Module) -> dict[str, float]:
    ops = visattn.count_flops(model, torch.empty(1, 3, 224, 224, device="meta"), by_op=True)
    return {k: v / 1e9 for k, v in ops.items()}


def test_every_family_is_registered_with_its_variants() -> None:
    assert set(TINY) <= set(MODELS) and set(WINDOWED) <= set(TINY)
    assert len(MODELS) == 3 + 6 + 3 + 3 + 3 + 1 + 5
    for name in MODELS:
        info = model_info(name)
        assert info["from_timm"] is not None and info["timm_name"] and info["paper"]


# --------------------------------------------------------------------------------------------------
# Sizes at 224x224 against the tables (the tables' numbers are the reference). Each table has its own
# rounding and counting convention, spelled out here and in docs/models.md.
# --------------------------------------------------------------------------------------------------

# Tables that truncate instead of rounding (checked against the official architectures: DaViT's
# 28.36/49.75/87.95M print as 28.3/49.7/87.9; ConViT's 27.78/86.54M as 27/86, its Ti row rounds).
_TRUNCATED_PARAMS = {"davit_tiny", "davit_small", "davit_base", "convit_small", "convit_base"}


def _printed(value: float, reference: float, truncate: bool) -> float:
    digits = 0 if float(reference).is_integer() else 1
    scale = 10 ** digits
    return (math.floor(value * scale) if truncate else round(value * scale)) / scale


@pytest.mark.parametrize("name", [n for n in MODELS if hasattr(model_info(n)["config"], "paper_params_m")])
def test_params_match_the_paper(name) -> None:
    paper = model_info(name)["config"].paper_params_m
    assert _printed(_params_m(_meta(name)), paper, name in _TRUNCATED_PARAMS) == paper


def _swin_convention(ops: dict[str, float]) -> float:
    """Swin's own ``flops()`` (its table): LayerNorm is one op per element, and the relative position
    bias adds are not counted. Our count has fvcore's 5 per LayerNorm element and, per attention
    call, ``tokens * K * heads`` bias adds on top of ``2 * tokens * K * heads * 32`` (head dim 32)."""
    return sum(ops.values()) - 0.8 * ops["native_layer_norm"] - ops["neighborhood_attention"] / 65


def _convit_convention(ops: dict[str, float]) -> float:
    """ConViT's table counts the linear layers and the patch embedding, not the attention matmuls
    (its DeiT-S row, 4.3G, is DeiT's 4.6G minus them too); ours has them as ``bmm``."""
    return sum(ops.values()) - ops["bmm"]


_FLOPS_CONVENTION = {"swin": _swin_convention, "convit": _convit_convention}
# MaxViT's table comes from TensorFlow's profiler, which also counts element-wise ops (BatchNorm,
# GELU, softmax, SE gates): our fvcore-style count is 0.6% (S) and 1.0% (B) below it; T rounds equal.
_FLOPS_REL_TOLERANCE = {"maxvit_small": 0.015, "maxvit_base": 0.015}


@pytest.mark.parametrize("name", [n for n in MODELS if hasattr(model_info(n)["config"], "paper_gmacs")])
def test_gmacs_match_the_paper(name) -> None:
    paper = model_info(name)["config"].paper_gmacs
    ops = _gmacs_by_op(_meta(name))
    gmacs = _FLOPS_CONVENTION.get(name.split("_")[0], lambda o: sum(o.values()))(ops)
    if name in _FLOPS_REL_TOLERANCE:
        assert abs(gmacs - paper) / paper < _FLOPS_REL_TOLERANCE[name], (gmacs, paper)
    else:
        assert _printed(gmacs, paper, truncate=False) == paper, (gmacs, paper)


# --------------------------------------------------------------------------------------------------
# Backbone behaviour: any input size, features_only / out_indices, gradients
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {name: _small(name, num_classes=7).eval() for name in TINY}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(67, 45), (32, 32)])
def test_classifies_any_input_size(tiny_models, name, size) -> None:
    with torch.no_grad():
        out = tiny_models[name](torch.randn(2, 3, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_features_only_at_any_size_and_subset_of_stages(tiny_models, name) -> None:
    full = _small(name, features_only=True).eval()
    x = torch.randn(1, 3, 71, 50)
    with torch.no_grad():
        feats = full(x)
    assert len(feats) == len(full.feature_info)
    for f, info in zip(feats, full.feature_info):
        r = info["reduction"]
        assert f.shape == (1, info["num_chs"], math.ceil(71 / r), math.ceil(50 / r)), (name, f.shape, r)
    last = len(full.feature_info) - 1
    part = _small(name, features_only=True, out_indices=(0,))
    assert len(part.stages) == 1 < len(full.stages) or last == 0
    part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(part.eval()(x)[0], feats[0])


@pytest.mark.parametrize("name", TINY)
def test_classifier_from_features_and_batch_independence(tiny_models, name) -> None:
    model = tiny_models[name]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["swin_tiny", "davit_tiny", "convit_tiny", "mambaout_femto"])
def test_every_parameter_gets_a_gradient(name) -> None:
    model = _small(name, num_classes=3, drop_path_rate=0.0).train()  # no branch dropped for the whole batch
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


# --------------------------------------------------------------------------------------------------
# The NA switch
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WINDOWED)
def test_na_switch_keeps_every_parameter_and_changes_the_mixer(name) -> None:
    window = _small(name).eval()
    na = _small(name, mixer="na").eval()
    assert {k: v.shape for k, v in na.state_dict().items()} == {k: v.shape for k, v in window.state_dict().items()}
    na.load_state_dict(window.state_dict())  # a window model's weights run as neighborhood attention
    mixers = {type(m).__name__ for m in na.modules()}
    assert "NeighborhoodAttention2D" in mixers and not mixers & {"WindowAttention", "ShiftedWindowAttention",
                                                                 "MaxViTBlockAttention", "MaxViTGridAttention"}
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        a, b = window(x), na(x)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_maxvit_na_switch_dilates_in_place_of_the_grid() -> None:
    """Grid attention over a G x G grid of a 56-wide map becomes NA with kernel G and dilation 56 // G."""
    model = _meta("maxvit_tiny", mixer="na")
    block = model.stages[0].blocks[0]
    assert block.attn_block.attn.dilation == (1, 1) and block.attn_grid.attn.dilation == (8, 8)
    assert model.stages[3].blocks[0].attn_grid.attn.dilation == (1, 1)


def test_halonet_gna_switch_moves_the_border_regions_inward() -> None:
    zero = _small("halonet26t").eval()
    gna = _small("halonet26t", mixer="gna").eval()
    gna.load_state_dict(zero.state_dict())
    borders = {m.border for m in gna.modules() if type(m).__name__ == "HaloAttention"}
    assert borders == {"gna", "zero"}  # the strided block keeps the zero-padded form
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(zero(x), gna(x))


@pytest.mark.parametrize("name, match", [("swin_tiny", "mixer='bogus'"), ("davit_tiny", "mixer='bogus'"),
                                         ("maxvit_tiny", "mixer='bogus'"), ("halonet26t", "mixer='bogus'")])
def test_unknown_mixer_names_the_choices(name, match) -> None:
    with pytest.raises(ValueError, match=match + ".*choose"):
        _meta(name, mixer="bogus")


def test_models_without_window_attention_have_no_switch() -> None:
    with pytest.raises(TypeError, match="mixer"):
        _meta("focalnet_tiny_srf", mixer="na")


def test_convert_timm_state_dict_errors() -> None:
    with pytest.raises(ValueError, match="'nat_tiny' has no timm counterpart; models with one: .*swin_tiny"):
        visattn.models.convert_timm_state_dict("nat_tiny", {})
    with pytest.raises(KeyError, match="swin_from_timm: keys not in the timm Swin Transformer layout: bogus"):
        visattn.models.convert_timm_state_dict("swin_tiny", {"bogus": torch.zeros(1)})


def test_pretrained_points_to_timms_weights() -> None:
    with pytest.raises(ValueError, match="'swin_tiny' has no pretrained checkpoint to download.*"
                                         "'swin_tiny_patch4_window7_224'.*convert_timm_state_dict"):
        create_model("swin_tiny", pretrained=True)
