"""CSWin: sizes against the paper and the official code, any input size, the global last stage."""

from __future__ import annotations

import pytest
import torch

from family_checks import check_classifier_and_backbone, paper_row, params_and_gmacs
from visattn.models import create_model
from visattn.models.cswin import CSWIN_CONFIGS, CSWinStem
from visattn.nn.layers import GlobalLePEAttention2D
from visattn.nn.mixers.cswin import CSWinAttention

# Parameters of the official models (microsoft/CSWin-Transformer, models/cswin.py at f111ae2),
# counted by building them. The paper prints CSWin-T as 23M and CSWin-B as 78M, which the official
# code's 22.32M and 77.38M do not round to; our model has the official code's parameters.
OFFICIAL_PARAMS = {"cswin_tiny": 22_320_552, "cswin_small": 34_643_304, "cswin_base": 77_382_184}
# The official models measured with fvcore (what count_flops reproduces): the paper prints CSWin-S
# as 6.9G, the official model counts 6.83G.
OFFICIAL_GMACS = {"cswin_tiny": 4.34, "cswin_small": 6.83, "cswin_base": 15.00}


@pytest.mark.parametrize("name", sorted(CSWIN_CONFIGS))
def test_params_and_flops_match_the_official_model_and_the_paper(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(gmacs, 2) == OFFICIAL_GMACS[name], f"{name}: {gmacs:.3f}"
    assert abs(params / 1e6 - row.paper_params_m) < 0.7 and abs(gmacs - row.paper_gmacs) < 0.08
    if name != "cswin_small":
        assert round(gmacs, 1) == row.paper_gmacs
    if name == "cswin_small":
        assert round(params / 1e6) == row.paper_params_m


def test_stripes_then_a_global_last_stage() -> None:
    model = create_model("cswin_tiny", depths=(1, 1, 1, 1))
    mixers = [s.blocks[0].attn for s in model.stages]
    assert [m.split_size for m in mixers[:3]] == [1, 2, 7] and all(isinstance(m, CSWinAttention) for m in mixers[:3])
    assert isinstance(mixers[3], GlobalLePEAttention2D) and mixers[3].lepe_source == "value"
    assert [m.num_heads for m in mixers] == [2, 4, 8, 16]


def test_stripes_covering_the_map_are_the_global_last_stage() -> None:
    """CSWin switches to one global branch where the stripe is the map (the last stage at 224):
    the stripe mixer with split 7 on a 7x7 map computes exactly that."""
    torch.manual_seed(0)
    stripes = CSWinAttention(32, 4, split_size=7).double().eval()
    glob = GlobalLePEAttention2D(32, 4, lepe_kernel=3, lepe_source="value").double().eval()
    glob.load_state_dict(stripes.state_dict())
    x = torch.randn(2, 7, 7, 32, dtype=torch.double)
    torch.testing.assert_close(stripes(x), glob(x))


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("cswin_tiny", depths=(1, 1, 2, 1))


@pytest.mark.parametrize("side, out", [(224, 56), (45, 11), (67, 17), (3, 1)])
def test_stem_is_a_7x7_stride_4_conv_with_padding_2(side: int, out: int) -> None:
    stem = CSWinStem(3, 8)
    assert stem(torch.randn(1, 3, side, side + 1)).shape[1] == out
    with pytest.raises(ValueError, match=r"CSWinStem: the image is \(2, 9\)"):
        stem(torch.randn(1, 3, 2, 9))
