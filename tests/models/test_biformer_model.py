"""BiFormer: sizes against the paper, any input size, the last stage, and the official layout."""

from __future__ import annotations

import re

import pytest

from family_checks import check_classifier_and_backbone, check_loads_official_layout, paper_row, params_and_gmacs
from visattn.models import create_model
from visattn.models.biformer import BIFORMER_CONFIGS
from visattn.nn.layers import GlobalLePEAttention2D
from visattn.nn.mixers.biformer import BiLevelRoutingAttention

# Parameters of the official models (rayleizhu/BiFormer, models/biformer.py at 1697bbb), counted by
# building them; its README prints them to 0.1M, the paper to 1M.
OFFICIAL_PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}


@pytest.mark.parametrize("name", sorted(BIFORMER_CONFIGS))
def test_params_and_flops_match_the_paper(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(params / 1e6, 1) == row.paper_params_m
    assert round(gmacs, 1) == row.paper_gmacs, f"{name}: {gmacs:.3f} GMACs"


def test_stages_route_then_attend_globally() -> None:
    """Stages 0-2 route 1, 4, 16 regions of a 7x7 grid with 32-channel heads and the official
    dim ** -0.5 scale; stage 3 is global attention with 8 heads, LePE 5x5 on its input, no qkv bias."""
    model = create_model("biformer_tiny", depths=(1, 1, 1, 1))
    routed = [s.blocks[0].block.attn for s in model.stages[:3]]
    assert all(isinstance(a, BiLevelRoutingAttention) for a in routed)
    assert [(a.topk, a.n_win, a.num_heads, a.scale) for a in routed] == [
        (1, 7, 2, 64 ** -0.5), (4, 7, 4, 128 ** -0.5), (16, 7, 8, 256 ** -0.5)]
    last = model.stages[3].blocks[0].block.attn
    assert isinstance(last, GlobalLePEAttention2D) and last.num_heads == 8 and last.qkv.bias is None
    assert last.lepe_source == "input" and last.lepe.kernel_size == (5, 5)


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("biformer_tiny", depths=(1, 1, 2, 1))


_TO_OFFICIAL = (  # written from the official model: downsample_layers, stages.{i}.{j}, QKVLinear, wo, mlp.0/3
    (r"^stem\.(.+)$", r"downsample_layers.0.\1"),
    (r"^stages\.(\d)\.downsample\.conv\.(.+)$", r"downsample_layers.\1.0.\2"),
    (r"^stages\.(\d)\.downsample\.norm\.(.+)$", r"downsample_layers.\1.1.\2"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.cpe\.proj\.(.+)$", r"stages.\1.\2.pos_embed.\3"),
    (r"^stages\.([012])\.blocks\.(\d+)\.block\.attn\.qkv\.(.+)$", r"stages.\1.\2.attn.qkv.qkv.\3"),
    (r"^stages\.([012])\.blocks\.(\d+)\.block\.attn\.proj\.(.+)$", r"stages.\1.\2.attn.wo.\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.block\.attn\.(?:lce|lepe)\.(.+)$", r"stages.\1.\2.attn.lepe.\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.block\.mlp\.fc1\.(.+)$", r"stages.\1.\2.mlp.0.\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.block\.mlp\.fc2\.(.+)$", r"stages.\1.\2.mlp.3.\3"),
    (r"^stages\.(\d)\.blocks\.(\d+)\.block\.(.+)$", r"stages.\1.\2.\3"),
    (r"^(norm|head)\.(.+)$", r"\1.\2"),
)


def _official_layout(model) -> dict:
    return {next(re.sub(p, r, k) for p, r in _TO_OFFICIAL if re.match(p, k)): v for k, v in model.state_dict().items()}


def test_official_checkpoint_layout_loads_and_reproduces_the_model() -> None:
    # 64x80: stage maps 16x20 ... 2x3, so the routed stages pad.
    official = check_loads_official_layout("biformer_tiny", _official_layout, "model", (64, 80), depths=(1, 1, 2, 1))
    assert "stages.2.1.attn.qkv.qkv.weight" in official and "stages.3.0.attn.qkv.weight" in official
