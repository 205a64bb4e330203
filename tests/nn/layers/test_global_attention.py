"""GlobalAttention2D: dense softmax attention over every token, with the mixer base's qkv/proj."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all
from visattn.nn import GlobalAttention2D, NeighborhoodAttention2D


def test_module_properties() -> None:
    torch.manual_seed(0)
    check_all(GlobalAttention2D(16, 2), torch.randn(2, 5, 7, 16))


def test_equals_attention_written_out() -> None:
    torch.manual_seed(0)
    m = GlobalAttention2D(12, 3).eval()
    x = torch.randn(2, 4, 5, 12)
    q, k, v = m.qkv(x).reshape(2, 20, 3, 3, 4).permute(2, 0, 3, 1, 4)  # each [B, heads, N, D]
    attn = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # scale 4 ** -0.5
    ref = m.proj((attn @ v).transpose(1, 2).reshape(2, 4, 5, 12))
    torch.testing.assert_close(m(x), ref)


def test_has_the_neighborhood_layer_weights_minus_rpb() -> None:
    dense, local = GlobalAttention2D(16, 2), NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True)
    assert set(dense.state_dict()) == set(local.state_dict()) - {"rpb"}


def test_input_error_names_the_layout() -> None:
    with pytest.raises(ValueError, match=r"GlobalAttention2D: expected a channels-last input \[B, H, W, 16\]"):
        GlobalAttention2D(16, 2)(torch.randn(1, 16, 8, 8))
