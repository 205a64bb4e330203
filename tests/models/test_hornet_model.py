"""HorNet (7x7): sizes against the paper, any input size, and the official layout."""

from __future__ import annotations

import re

import pytest

from family_checks import check_classifier_and_backbone, check_loads_official_layout, paper_row, params_and_gmacs
from visattn.models import create_model
from visattn.models.hornet import HORNET_CONFIGS

# Parameters of the official models (raoyongming/HorNet, hornet.py at ac9e210), counted by building them.
OFFICIAL_PARAMS = {"hornet_tiny_7x7": 22_409_512, "hornet_small_7x7": 49_528_264, "hornet_base_7x7": 87_256_680}


@pytest.mark.parametrize("name", sorted(HORNET_CONFIGS))
def test_params_and_flops_match_the_paper(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(params / 1e6) == row.paper_params_m
    assert round(gmacs, 1) == row.paper_gmacs, f"{name}: {gmacs:.3f} GMACs"


def test_gnconv_orders_grow_per_stage() -> None:
    model = create_model("hornet_tiny_7x7", depths=(1, 1, 1, 1))
    assert [s.blocks[0].attn.order for s in model.stages] == [2, 3, 4, 5]
    assert model.stages[3].blocks[0].attn.dims == [32, 64, 128, 256, 512]  # 512 channels, order 5


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("hornet_tiny_7x7", depths=(1, 1, 2, 1))


_TO_OFFICIAL = (  # written from the official model: downsample_layers, stages.{i}.{j}.{gnconv,pwconv,gamma}
    (r"^stem\.conv\.(.+)$", r"downsample_layers.0.0.\1"),
    (r"^stem\.norm\.(.+)$", r"downsample_layers.0.1.\1"),
    (r"^stages\.(\d)\.downsample\.norm\.(.+)$", r"downsample_layers.\1.0.\2"),
    (r"^stages\.(\d)\.downsample\.conv\.(.+)$", r"downsample_layers.\1.1.\2"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.ls([12])\.gamma$", r"stages.\1.\2.gamma\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.(.+)$", r"stages.\1.\2.gnconv.\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc([12])\.(.+)$", r"stages.\1.\2.pwconv\3.\4"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.(norm[12]\..+)$", r"stages.\1.\2.\3"),
    (r"^head_norm\.(.+)$", r"norm.\1"),
    (r"^head\.(.+)$", r"head.\1"),
)


def _official_layout(model) -> dict:
    official = {}
    for key, value in model.state_dict().items():
        new = next(re.sub(p, r, key) for p, r in _TO_OFFICIAL if re.match(p, key))
        if re.search(r"gnconv\.(proj_in|proj_out|pws\.\d+)\.weight$", new):
            value = value[:, :, None, None]  # the official 1x1 convs
        official[new] = value
    return official


def test_official_checkpoint_layout_loads_and_reproduces_the_model() -> None:
    official = check_loads_official_layout("hornet_tiny_7x7", _official_layout, "model", (50, 61), depths=(1, 1, 2, 1))
    assert official["stages.3.0.gnconv.pws.3.weight"].shape == (512, 256, 1, 1)
