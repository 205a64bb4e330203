"""VAN: sizes against the paper, any input size, the spatial attention, and the official layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from family_checks import check_classifier_and_backbone, check_loads_official_layout, paper_row, params_and_gmacs
from visattn.models import model_info
from visattn.models.van import VAN_CONFIGS, VANAttention

# Parameters of the official models (Visual-Attention-Network/VAN-Classification, models/van.py at
# e19779b), counted by building them; the paper prints them to 0.1M.
OFFICIAL_PARAMS = {"van_b0": 4_105_800, "van_b1": 13_861_800, "van_b2": 26_578_472, "van_b3": 44_765_608}


@pytest.mark.parametrize("name", sorted(VAN_CONFIGS))
def test_params_and_flops_match_the_paper(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(params / 1e6, 1) == row.paper_params_m
    if name == "van_b3":
        # The table prints 9.0G; the official model counts 8.94G with fvcore (8.93 without its
        # BatchNorm term, which count_flops leaves out), so the table rounds up here.
        assert round(gmacs, 2) == 8.93
    else:
        assert round(gmacs, 1) == row.paper_gmacs, f"{name}: {gmacs:.3f} GMACs"


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("van_b0")


def test_spatial_attention_is_proj_gelu_lka_proj_plus_shortcut() -> None:
    torch.manual_seed(0)
    m = VANAttention(8).eval()
    x = torch.randn(2, 9, 7, 8)
    y = F.gelu(m.proj_1(x)).permute(0, 3, 1, 2)
    lka = m.spatial_gating_unit
    a = F.conv2d(y, lka.conv0.weight, lka.conv0.bias, padding=2, groups=8)
    a = F.conv2d(a, lka.conv_spatial.weight, lka.conv_spatial.bias, padding=9, dilation=3, groups=8)
    a = F.conv2d(a, lka.conv1.weight, lka.conv1.bias)
    torch.testing.assert_close(m(x), m.proj_2((y * a).permute(0, 2, 3, 1)) + x)


def _official_layout(model) -> dict[str, torch.Tensor]:
    """Our weights under the official key names and shapes (written from the official model's
    layout: patch_embed{s}, block{s}.{j}, norm{s}, 1x1 convs as [out, in, 1, 1])."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stem":
            key = f"patch_embed1.{'proj' if parts[1] == 'conv' else 'norm'}." + ".".join(parts[2:])
        elif parts[0] == "stages":
            s = int(parts[1]) + 1
            if parts[2] == "downsample":
                key = f"patch_embed{s}.{'proj' if parts[3] == 'conv' else 'norm'}." + ".".join(parts[4:])
            elif parts[2] == "norm":
                key = f"norm{s}." + ".".join(parts[3:])
            else:
                rest = ".".join(parts[4:])
                rest = {"ls1.gamma": "layer_scale_1", "ls2.gamma": "layer_scale_2"}.get(rest, rest)
                rest = rest.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
                if rest.endswith(("proj_1.weight", "proj_2.weight", "fc1.weight", "fc2.weight")):
                    value = value[:, :, None, None]
                key = f"block{s}.{parts[3]}.{rest}"
        out[key] = value
    return out


def test_official_checkpoint_layout_loads_and_reproduces_the_model() -> None:
    official = check_loads_official_layout("van_b0", _official_layout, "state_dict", (40, 36), depths=(1, 2, 1, 1))
    assert "block2.1.attn.spatial_gating_unit.conv_spatial.weight" in official
    assert official["block1.0.mlp.fc1.weight"].shape == (256, 32, 1, 1)
    with pytest.raises(KeyError, match="van_from_official: keys not in the official VAN layout: extra"):
        model_info("van_b0")["from_official"]({**official, "extra": torch.zeros(1)})
