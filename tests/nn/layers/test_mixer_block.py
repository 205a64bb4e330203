"""MixerBlock: the pre-norm transformer block around any registered (or given) token mixer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from module_checks import check_all
from visattn.nn import create_attn
from visattn.nn.layers import ConvFFN, ConvPosEnc, GlobalAttention2D, MixerBlock


@pytest.mark.parametrize("mixer, kw", [("na2d", dict(num_heads=2, kernel_size=3)),
                                       ("swin", dict(num_heads=2, window_size=4)),
                                       ("maxvit_grid", dict(num_heads=2, grid_size=2)), ("focalnet", {}),
                                       ("davit_channel", dict(num_heads=2))])
def test_any_registered_mixer_by_name(mixer, kw) -> None:
    torch.manual_seed(0)
    block = MixerBlock(16, mixer, kw, mlp_ratio=2.0, layer_scale=1e-2, drop_path=0.1)
    assert type(block.attn) is type(create_attn(mixer, 16, **kw))
    check_all(block, torch.randn(2, 8, 8, 16))


def test_equals_the_block_written_out() -> None:
    torch.manual_seed(0)
    block = MixerBlock(16, GlobalAttention2D, dict(num_heads=4), mlp_ratio=3.0, layer_scale=0.5,
                       pos_enc=ConvPosEnc).eval()
    x = torch.randn(2, 5, 6, 16)
    dw = lambda conv, t: t + conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # noqa: E731
    y = dw(block.cpe1.proj, x)
    y = y + 0.5 * block.attn(nn.functional.layer_norm(y, (16,), block.norm1.weight, block.norm1.bias))
    y = dw(block.cpe2.proj, y)
    h = nn.functional.layer_norm(y, (16,), block.norm2.weight, block.norm2.bias)
    y = y + 0.5 * block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(h)))
    torch.testing.assert_close(block(x), y)
    assert block.mlp.fc1.out_features == 48


def test_options_build_what_they_name() -> None:
    block = MixerBlock(8, "na2d", dict(num_heads=2, kernel_size=3), mlp_layer=ConvFFN,
                       act_layer=lambda: nn.GELU(approximate="tanh"), norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    assert isinstance(block.mlp, ConvFFN) and block.mlp.act.approximate == "tanh" and block.norm1.eps == 1e-6
    assert isinstance(block.ls1, nn.Identity) and isinstance(block.cpe1, nn.Identity)
    keys = set(MixerBlock(8, "na2d", dict(num_heads=2, kernel_size=3)).state_dict())
    assert {k.split(".")[0] for k in keys} == {"norm1", "attn", "norm2", "mlp"}  # NAT's checkpoint names


def test_unknown_mixer_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown attention 'nope'.*na2d"):
        MixerBlock(8, "nope")
