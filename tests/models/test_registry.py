"""The model registry: families register their variants with ``@register_model`` in their own file."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import visattn
from visattn.models import NAT_CONFIGS, create_model, list_models, model_info, register_model
from visattn.models import registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for the test to add to: nothing registered here outlives the test."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


FAMILY = '''
"""A toy family, written the way a real one is: one decorated builder per variant."""
from torch import nn

from visattn.models import register_model


class Toy(nn.Module):
    def __init__(self, width: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(x)


@register_model("toy_small", config=dict(width=8))
def toy_small(**kwargs) -> Toy:
    """Toy-Small."""
    return Toy(8, **kwargs)


@register_model("toy_large", config=dict(width=32))
def toy_large(**kwargs) -> Toy:
    """Toy-Large."""
    return Toy(32, **kwargs)
'''


def test_a_family_file_registers_its_variants_on_import(scratch_registry, tmp_path, monkeypatch):
    (tmp_path / "toy_family.py").write_text(textwrap.dedent(FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list_models("toy_*") == []
    before = set(list_models())
    family = importlib.import_module("toy_family")
    try:
        assert list_models("toy_*") == ["toy_large", "toy_small"]
        assert set(list_models()) == before | {"toy_large", "toy_small"} and set(NAT_CONFIGS) <= before
        info = model_info("toy_large")
        assert info["builder"] is family.toy_large and info["config"] == dict(width=32) and info["url"] is None
        model = visattn.create_model("toy_small", num_classes=3)
        assert isinstance(model, family.Toy) and model(torch.randn(2, 8)).shape == (2, 3)
        # The decorator returns the builder itself: it stays a plain function of the family's module.
        assert family.toy_small(num_classes=5).head.out_features == 5
        with pytest.raises(ValueError, match="'toy_small' registers no checkpoint loader"):
            create_model("toy_small", pretrained=True)
    finally:
        sys.modules.pop("toy_family", None)


def test_duplicate_name_raises(scratch_registry):
    def another_nat_tiny(**kwargs):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'nat_tiny' is already registered .*visattn.models.nat.nat_tiny"):
        register_model("nat_tiny")(another_nat_tiny)
    assert model_info("nat_tiny")["builder"] is not another_nat_tiny


def test_function_form_and_argument_checks(scratch_registry):
    def build(**kwargs):
        return torch.nn.Identity()

    assert register_model("plain", build) is build  # the call form returns the builder too
    assert isinstance(create_model("plain"), torch.nn.Identity)
    register_model("plain", build)  # the same builder again is not a duplicate (re-running a file)
    with pytest.raises(ValueError, match="lower-case"):
        register_model("Plain", build)
    with pytest.raises(ValueError, match="checkpoint url but no load_checkpoint"):
        register_model("with_url", build, url="https://example.invalid/w.pth")


def test_nat_variants_come_from_their_file():
    import visattn.models.nat as nat

    for name in NAT_CONFIGS:
        info = model_info(name)
        assert info["builder"] is getattr(nat, name) and info["config"] is NAT_CONFIGS[name]
        assert info["url"].endswith(".pth") and info["load_checkpoint"] is visattn.models.load_official_checkpoint
