"""MambaOut: sizes against the official table, any input size, the block, and the official layout.
(Equality with timm's implementation: test_timm_parity.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from family_checks import check_classifier_and_backbone, check_loads_official_layout, paper_row, params_and_gmacs
from visattn.models import create_model, model_info
from visattn.models.mambaout import MAMBAOUT_CONFIGS

# Parameters of the official models (yuweihao/MambaOut, models/mambaout.py), counted by building them;
# the official table prints them to 0.1M.
OFFICIAL_PARAMS = {"mambaout_femto": 7_304_536, "mambaout_kobe": 9_141_208, "mambaout_tiny": 26_545_096,
                   "mambaout_small": 48_488_072, "mambaout_base": 84_813_092}


@pytest.mark.parametrize("name", sorted(MAMBAOUT_CONFIGS))
def test_params_and_flops_match_the_official_table(name: str) -> None:
    params, gmacs = params_and_gmacs(name)
    row = paper_row(name)
    assert params == OFFICIAL_PARAMS[name] and round(params / 1e6, 1) == row.paper_params_m
    assert round(gmacs, 1) == row.paper_gmacs, f"{name}: {gmacs:.3f} GMACs"


def test_any_size_classifier_and_backbone() -> None:
    check_classifier_and_backbone("mambaout_femto", depths=(1, 1, 2, 1))


def test_block_is_the_gated_cnn_plus_its_input_and_nothing_else() -> None:
    """``x + fc2(gelu(g) * cat(i, dwconv7(c)))`` of ``norm(x)``, with ``g, i, c = split(fc1(norm(x)))``:
    the official GatedCNNBlock, written out; no second (MLP) branch."""
    torch.manual_seed(0)
    block = create_model("mambaout_femto", depths=(1, 1, 1, 1), drop_path_rate=0.0).stages[1].blocks[0].eval()
    assert block.mlp is None and not hasattr(block, "norm2")
    x = torch.randn(2, 9, 7, 96)
    mixer = block.attn
    hidden = int(8 / 3 * 96)
    g, i, c = torch.split(mixer.fc1(F.layer_norm(x, (96,), block.norm1.weight, block.norm1.bias, 1e-6)),
                          (hidden, hidden - 96, 96), dim=-1)
    c = F.conv2d(c.permute(0, 3, 1, 2), mixer.conv.weight, mixer.conv.bias, padding=3, groups=96).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + mixer.fc2(F.gelu(g) * torch.cat((i, c), dim=-1)))


def test_head_is_pool_norm_mlp_norm_linear() -> None:
    torch.manual_seed(0)
    model = create_model("mambaout_femto", depths=(1, 1, 1, 1), num_classes=5).eval()
    feats = torch.randn(2, 3, 4, 288)
    pooled = F.layer_norm(feats.mean((1, 2)), (288,), model.head_norm.weight, model.head_norm.bias, 1e-6)
    hidden = F.gelu(model.pre_logits.fc(pooled))
    hidden = F.layer_norm(hidden, (1152,), model.pre_logits.norm.weight, model.pre_logits.norm.bias, 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats), model.head(hidden))


def _official_layout(model) -> dict[str, torch.Tensor]:
    """Our weights under the official key names (written from yuweihao/MambaOut's models/mambaout.py:
    downsample_layers.0 = StemLayer(conv1, norm1, conv2, norm2), downsample_layers.{i} =
    DownsampleLayer(conv, norm), stages.{i}.{j} = GatedCNNBlock(norm, fc1, conv, fc2), norm, head =
    MlpHead(fc1, norm, fc2))."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stem":
            key = "downsample_layers.0." + ("norm2" if parts[1] == "norm" else parts[1]) + "." + parts[2]
        elif parts[0] == "stages" and parts[2] == "downsample":
            key = f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
        elif parts[0] == "stages":
            rest = parts[4:] if parts[4] == "attn" else ["norm"] + parts[5:]
            key = f"stages.{parts[1]}.{parts[3]}." + ".".join(p for p in rest if p != "attn")
        else:
            key = {"head_norm": "norm", "pre_logits": "head", "head": "head"}[parts[0]] + "." + ".".join(
                {"fc": "fc1"}.get(p, p) for p in parts[1:])
            key = key.replace("head.weight", "head.fc2.weight").replace("head.bias", "head.fc2.bias")
        out[key] = value
    return out


def test_official_checkpoint_layout_loads_and_reproduces_the_model() -> None:
    official = check_loads_official_layout("mambaout_femto", _official_layout, "model", (40, 36),
                                           depths=(1, 2, 1, 1))
    assert {"downsample_layers.0.norm1.weight", "downsample_layers.2.conv.weight", "stages.1.1.conv.weight",
            "stages.0.0.norm.bias", "norm.weight", "head.fc1.weight", "head.norm.bias",
            "head.fc2.weight"} <= set(official)
    assert len(official) == len(create_model("mambaout_femto", depths=(1, 2, 1, 1)).state_dict())
    with pytest.raises(KeyError, match="mambaout_from_official: keys not in the official MambaOut layout: extra"):
        model_info("mambaout_femto")["from_official"]({**official, "extra": torch.zeros(1)})


def test_a_checkpoint_in_neither_layout_names_both() -> None:
    model = create_model("mambaout_femto", depths=(1, 1, 1, 1))
    with pytest.raises(KeyError, match="neither the official nor timm's layout.*official MambaOut.*timm MambaOut"):
        model_info("mambaout_femto")["load_checkpoint"](model, {"bogus.weight": torch.zeros(1)})


def test_pretrained_points_to_the_official_release() -> None:
    for name in MAMBAOUT_CONFIGS:
        assert model_info(name)["url"] == ("https://github.com/yuweihao/MambaOut/releases/download/model/"
                                           f"{name}.pth")
