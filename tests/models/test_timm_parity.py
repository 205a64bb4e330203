"""Equality with timm's implementations, and visattn's models in timm's factory (needs timm).

For every model with a timm counterpart: timm's model with random weights (every parameter
perturbed, so no mapping error can hide behind a default value, and BatchNorm statistics taken from
a random batch, so that no layer sits at its identity init), its state dict
through :func:`visattn.models.convert_timm_state_dict`, loaded strictly, and the same logits on
random images (fp32, within 1e-4 of the largest logit), at 224 (256 for HaloNet, its smallest
size) and at a larger size where both implementations support it. These tests run where timm
imports (the CI's second virtual environment) and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from visattn.models import convert_timm_state_dict, create_model, list_models, model_info

timm = pytest.importorskip("timm", reason="timm (with torchvision) is not importable here")
pytestmark = pytest.mark.timm

MODELS = [n for n in list_models() if model_info(n).get("from_timm") is not None]
NATIVE_SIZE = {"halonet26t": 256}  # timm's HaloNet needs sides divisible by 256
# A second size per family where both run: (visattn model, size, timm kwargs, visattn kwargs).
# ConViT is missing: timm's only runs at 224 (fixed position embedding and relative indices).
OTHER_SIZES = [
    ("swin_tiny", 448, dict(img_size=448), {}),
    ("focalnet_tiny_lrf", 288, {}, {}),
    ("davit_tiny", 448, {}, {}),
    ("maxvit_tiny", 448, dict(img_size=448), dict(img_size=448)),  # 14x14 partitions, as timm at 448
    ("halonet26t", 512, {}, {}),
    ("mambaout_tiny", 288, {}, {}),  # timm's test size
    ("mambaout_femto", 250, {}, {}),  # no stride divides it: both round up (63, 32, 16, 8)
]


def _random_timm(name: str, size: int = 224, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(model_info(name)["timm_name"], **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # Statistics of a real batch: random ones (unrelated to the activations) let a deep random
        # network's activations grow by 1e3 and more, and fp32 rounding with them.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        model.train()(torch.randn(4, 3, size, size))
    return model.eval()


def _assert_same_logits(name: str, size: int, timm_kw: dict, our_kw: dict) -> None:
    theirs = _random_timm(name, size, **timm_kw)
    ours = create_model(name, **our_kw).eval()
    ours.load_state_dict(convert_timm_state_dict(name, theirs.state_dict()))  # strict
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"{name} at {size}: relative error {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_same_logits_as_timm(name) -> None:
    _assert_same_logits(name, NATIVE_SIZE.get(name, 224), {}, {})


@pytest.mark.parametrize("name, size, timm_kw, our_kw", OTHER_SIZES)
def test_same_logits_as_timm_at_another_size(name, size, timm_kw, our_kw) -> None:
    _assert_same_logits(name, size, timm_kw, our_kw)


def test_parameter_counts_equal_timms() -> None:
    """Key for key, except ConViT's positional-projection biases (one per head and GPSA layer): a
    per-row constant in a softmax, which the converter drops because it has no effect."""
    for name in MODELS:
        with torch.device("meta"):
            ours, theirs = create_model(name), timm.create_model(model_info(name)["timm_name"])
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        no_op = ours.num_heads * ours.local_up_to_layer if name.startswith("convit") else 0
        assert count(ours) == count(theirs) - no_op, name


def test_timm_checkpoint_file_loads_through_create_model(tmp_path) -> None:
    theirs = _random_timm("swin_tiny")
    path = tmp_path / "swin_tiny_timm.pth"
    torch.save({"state_dict": theirs.state_dict()}, path)
    ours = create_model("swin_tiny", checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# register_timm: visattn's models through timm's factory
# --------------------------------------------------------------------------------------------------

def test_register_timm_adds_the_visattn_only_models_and_leaves_timms_own() -> None:
    from visattn.models import register_timm

    added = register_timm()
    assert register_timm() == added  # idempotent
    visattn_only = {n for n in list_models() if model_info(n).get("from_timm") is None}
    assert visattn_only <= set(added) and "dinat_tiny" in added
    for name in list_models():
        with torch.device("meta"):
            via_timm = timm.create_model(name)
        if name in added:  # every name timm lacks builds visattn's model through timm's factory
            with torch.device("meta"):
                direct = create_model(name)
            assert type(via_timm) is type(direct), name
            assert sum(p.numel() for p in via_timm.parameters()) == sum(p.numel() for p in direct.parameters())
        else:  # a name timm has (focalnet_tiny_srf, halonet26t, ...) keeps meaning timm's own model
            assert type(via_timm).__module__.startswith("timm."), name


def test_dinat_tiny_through_timms_factory() -> None:
    from visattn.models import register_timm

    register_timm()
    model = timm.create_model("dinat_tiny", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    backbone = timm.create_model("dinat_tiny", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 96, 64))] == [128, 512]
