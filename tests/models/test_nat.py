"""NAT / DiNAT: the papers' sizes, backbone use at any resolution, the registry, official checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

import visattn
from visattn.models import (
    NAT,
    NAT_CONFIGS,
    convert_official_state_dict,
    create_model,
    dinat_dilations,
    list_models,
    load_official_checkpoint,
)
from visattn.models.nat import GlobalAttention2D, NATBlock

VARIANTS = sorted(NAT_CONFIGS)

# The DiNAT table prints DiNAT-Large as "200M"; the official code (and ours, key for key, see
# test_param_count_equals_official_layout) has 200.94M: that row truncates instead of rounding.
_TRUNCATED_IN_TABLE = {"dinat_large"}


def _meta_model(name: str, **kw) -> NAT:
    with torch.device("meta"):
        return create_model(name, **kw)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_params_match_paper(name):
    cfg = NAT_CONFIGS[name]
    millions = _n_params(_meta_model(name)) / 1e6
    printed = math.floor(millions) if name in _TRUNCATED_IN_TABLE else round(millions)
    assert printed == cfg.paper_params_m, f"{name}: {millions:.2f}M vs paper {cfg.paper_params_m}M"


# --------------------------------------------------------------------------------------------------
# The official checkpoint layout (SHI-Labs/Neighborhood-Attention-Transformer, classification/nat.py),
# written out independently of our model: names and shapes only.
# --------------------------------------------------------------------------------------------------

def _official_shapes(cfg, num_classes=1000, in_chans=3, out_norms=()) -> dict[str, tuple]:
    C, k = cfg.embed_dim, cfg.kernel_size
    s = {"patch_embed.proj.0.weight": (C // 2, in_chans, 3, 3), "patch_embed.proj.0.bias": (C // 2,),
         "patch_embed.proj.1.weight": (C, C // 2, 3, 3), "patch_embed.proj.1.bias": (C,),
         "patch_embed.norm.weight": (C,), "patch_embed.norm.bias": (C,)}
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        d = C * 2 ** i
        hidden = int(d * cfg.mlp_ratio)
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            s.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                      p + "attn.rpb": (heads, 2 * k - 1, 2 * k - 1),
                      p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                      p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                      p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                      p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,),
                      p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,)})
            if cfg.layer_scale is not None:
                s.update({p + "gamma1": (d,), p + "gamma2": (d,)})
        if i < len(cfg.depths) - 1:
            s.update({f"levels.{i}.downsample.reduction.weight": (2 * d, d, 3, 3),
                      f"levels.{i}.downsample.norm.weight": (2 * d,), f"levels.{i}.downsample.norm.bias": (2 * d,)})
    last = C * 2 ** (len(cfg.depths) - 1)
    if out_norms:
        for i in out_norms:
            s.update({f"norm{i}.weight": (C * 2 ** i,), f"norm{i}.bias": (C * 2 ** i,)})
    else:
        s.update({"norm.weight": (last,), "norm.bias": (last,),
                  "head.weight": (num_classes, last), "head.bias": (num_classes,)})
    return s


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_equals_official_layout(name):
    """Every official tensor has a home of the same shape in ours, and nothing else exists."""
    official = _official_shapes(NAT_CONFIGS[name])
    ours = {k: tuple(v.shape) for k, v in _meta_model(name).state_dict().items()}
    converted = {new: official[old] for old, new in zip(official, convert_official_state_dict(
        {k: torch.empty(0) for k in official}))}
    assert converted == ours


def _synthetic_official(cfg, **kw) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) for k, shape in _official_shapes(cfg, **kw).items()}


# Fewer blocks keep these tests fast; the layout is the same (see test_param_count_equals_official_layout).
_SHORT = (1, 2, 3, 1)


def test_official_checkpoint_loads_and_lands_in_place(tmp_path):
    cfg = replace(NAT_CONFIGS["nat_small"], depths=_SHORT)  # has layer scale: exercises the gamma renames
    sd = _synthetic_official(cfg, num_classes=7)
    path = tmp_path / "nat_small.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # a DDP training checkpoint
    model = create_model("nat_small", depths=_SHORT, num_classes=7, checkpoint_path=str(path))  # strict load
    assert torch.equal(model.stem.conv1.weight, sd["patch_embed.proj.0.weight"])
    assert torch.equal(model.stages[1].downsample.conv.weight, sd["levels.0.downsample.reduction.weight"])
    assert torch.equal(model.stages[3].downsample.norm.bias, sd["levels.2.downsample.norm.bias"])
    assert torch.equal(model.stages[2].blocks[2].ls2.gamma, sd["levels.2.blocks.2.gamma2"])
    assert torch.equal(model.stages[1].blocks[1].attn.rpb, sd["levels.1.blocks.1.attn.rpb"])
    assert torch.equal(model.head.weight, sd["head.weight"])


def test_official_detection_backbone_layout_loads_into_features_only():
    cfg = replace(NAT_CONFIGS["dinat_mini"], depths=_SHORT)
    sd = _synthetic_official(cfg, out_norms=(0, 1, 2, 3))
    model = create_model("dinat_mini", depths=_SHORT, features_only=True)
    load_official_checkpoint(model, sd, strict=True)
    assert torch.equal(model.out_norms["2"].weight, sd["norm2.weight"])


def test_classifier_checkpoint_into_other_head_skips_only_the_head():
    sd = _synthetic_official(replace(NAT_CONFIGS["nat_mini"], depths=_SHORT))
    model = create_model("nat_mini", depths=_SHORT, num_classes=10)
    result = load_official_checkpoint(model, sd, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert torch.equal(model.norm.weight, sd["norm.weight"])


def test_convert_rejects_foreign_keys():
    with pytest.raises(KeyError, match="blocks.0.attn.relative_position_bias_table"):
        convert_official_state_dict({"layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# Architecture details
# --------------------------------------------------------------------------------------------------

def test_dinat_dilations_are_the_official_ones():
    depths = NAT_CONFIGS["dinat_tiny"].depths
    assert dinat_dilations(depths, 7, 224) == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    # The official dinat_large_384 config: 13, 6, 3, 1.
    assert dinat_dilations(depths, 7, 384) == [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
    model = _meta_model("dinat_tiny")
    assert [b.attn.dilation for b in model.stages[0].blocks] == [(1, 1), (8, 8), (1, 1)]
    assert all(b.attn.dilation == (1, 1) for b in _meta_model("nat_tiny").modules() if isinstance(b, NATBlock))


def test_layer_scale_and_drop_path_follow_the_config():
    small = _meta_model("nat_small")
    assert small.stages[0].blocks[0].ls1.gamma.shape == (96,)
    assert isinstance(_meta_model("nat_tiny").stages[0].blocks[0].ls1, torch.nn.Identity)
    rates = [b.drop_path.p for s in small.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)


def _tiny(**kw) -> NAT:
    """A 4-stage DiNAT small enough for fast forward tests (same code paths as the paper sizes)."""
    torch.manual_seed(0)
    kw.setdefault("dilations", dinat_dilations((1, 2, 2, 1), 7, 64))
    return NAT(depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), embed_dim=16, mlp_ratio=2.0, drop_path_rate=0.1, **kw)


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (33, 47), (20, 20)])
def test_features_only_multiscale_maps_at_any_resolution(size):
    model = _tiny(features_only=True).eval()
    feats = model(torch.randn(2, 3, *size))
    assert len(feats) == 4
    H, W = size
    for i, (f, info) in enumerate(zip(feats, model.feature_info)):
        r = info["reduction"]
        assert r == 4 * 2 ** i
        assert f.shape == (2, info["num_chs"], math.ceil(H / r), math.ceil(W / r)), (i, f.shape)
        assert torch.isfinite(f).all()


def test_features_only_out_indices_subset_match_full_model():
    full = _tiny(features_only=True).eval()
    part = _tiny(features_only=True, out_indices=(1, 3)).eval()
    part.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("out_norms.0", "out_norms.2"))})
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        a, b = full(x), part(x)
    torch.testing.assert_close(b[0], a[1])
    torch.testing.assert_close(b[1], a[3])


def test_features_only_builds_only_the_stages_it_needs():
    model = _tiny(features_only=True, out_indices=(0, 1))
    assert len(model.stages) == 2 and len(model(torch.randn(1, 3, 32, 32))) == 2
    sum(f.square().sum() for f in model(torch.randn(1, 3, 32, 32))).backward()
    assert all(p.grad is not None for p in model.parameters())  # no unused parameters (DDP-safe)


def test_classifier_forward_features_and_reset():
    model = _tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 40, 72)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 3, 128)  # ceil(40/32), ceil(72/32), embed 16 * 8
    assert model(x).shape == (2, 5)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)


def test_every_parameter_gets_a_gradient():
    model = _tiny(num_classes=4).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_batch_independence_and_eval_determinism():
    model = _tiny(num_classes=4).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_na_equals_global_attention_when_the_window_covers_the_map():
    """A 7x7 window on a 7x7 map (or a 5x6 map: the variable-resolution rule) is global attention."""
    torch.manual_seed(0)
    na = NATBlock(32, 4, kernel_size=7).eval()
    dense = NATBlock(32, 4, attn_type="global").eval()
    with torch.no_grad():
        na.attn.rpb.zero_()  # the table is the only thing dense attention lacks
    dense.load_state_dict({k: v for k, v in na.state_dict().items() if "rpb" not in k})
    for shape in [(2, 7, 7, 32), (2, 5, 6, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(na(x), dense(x), atol=1e-5, rtol=1e-5)


def test_global_variant_has_the_same_weights_minus_rpb():
    na, dense = _meta_model("nat_tiny"), _meta_model("nat_tiny", attn_type="global")
    keys_na = {k for k in na.state_dict() if not k.endswith("rpb")}
    assert keys_na == set(dense.state_dict())
    assert isinstance(dense.stages[0].blocks[0].attn, GlobalAttention2D)


def test_drop_path_is_stochastic_in_training_only():
    block = NATBlock(16, 2, kernel_size=3, drop_path=0.5).train()
    x = torch.randn(64, 4, 4, 16)
    torch.manual_seed(0)
    y = block(x)
    # A sample whose two residual branches were both dropped comes out unchanged (p = 0.25 each).
    unchanged = sum(bool(torch.equal(y[i], x[i])) for i in range(64))
    assert 0 < unchanged < 64
    block.eval()
    torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)
    assert not torch.equal(block(x)[0], x[0])


@pytest.mark.parametrize("bad, match", [
    (dict(dilations=[[1], [1], [1, 1], [1]]), "one entry per block"),
    (dict(out_indices=(0, 4)), r"\[4\] outside 0..3"),
    (dict(attn_type="swin"), "attn_type='swin'"),
])
def test_bad_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**bad)


def test_bad_input_error_names_the_layout():
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        _tiny()(torch.randn(1, 64, 64, 3))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

def test_registry_lists_and_builds():
    assert list_models("nat_*") == ["nat_base", "nat_mini", "nat_small", "nat_tiny"]
    assert set(NAT_CONFIGS) <= set(visattn.list_models())
    model = visattn.create_model("dinat_mini", num_classes=3, in_chans=1, img_size=384, depths=(1, 1, 1, 1))
    assert model.depths == (1, 1, 1, 1) and model.dilations == [[1], [1], [1], [1]]
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown model 'dinat_huge'.*dinat_base"):
        create_model("dinat_huge")


def test_timm_hook():
    timm = pytest.importorskip("timm", reason="timm is optional (and not importable with the CPU torch build here)")
    from visattn.models import register_timm

    assert "dinat_tiny" in register_timm()
    model = timm.create_model("dinat_mini", num_classes=4, depths=(1, 1, 1, 1), features_only=True)
    assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [64, 128, 256, 512]


def test_register_timm_without_timm_says_how_to_install():
    try:
        import timm  # noqa: F401
    except ImportError:
        from visattn.models import register_timm

        with pytest.raises(ImportError, match="pip install timm"):
            register_timm()
    else:
        pytest.skip("timm is importable here; test_timm_hook covers it")


def test_import_visattn_loads_no_optional_dependency():
    import subprocess
    import sys

    # (torch.utils.flop_counter is part of torch and is imported on purpose: visattn.ops registers
    # the attention ops' FLOP formulas before any FlopCounterMode is built; torch itself imports
    # triton when it is installed.)
    code = ("import sys, visattn; bad = [m for m in ('timm', 'sklearn', 'matplotlib', 'numba', 'natten') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
