"""Mlp: the transformer block's two-layer GELU feed-forward network."""

from __future__ import annotations

import pytest
import torch

from module_checks import check_all, count_params
from visattn.nn import Mlp


@pytest.mark.parametrize("shape", [(2, 16), (2, 5, 16), (2, 4, 7, 16)])
def test_keeps_shape_through_hidden_width(shape) -> None:
    torch.manual_seed(0)
    m = Mlp(16, 48)
    assert m.fc1.out_features == 48 and m.fc2.in_features == 48
    assert count_params(m) == 16 * 48 + 48 + 48 * 16 + 16
    check_all(m, torch.randn(*shape))


def test_is_fc_gelu_fc() -> None:
    torch.manual_seed(0)
    m = Mlp(8, 12).eval()
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), m.fc2(torch.nn.functional.gelu(m.fc1(x))))
