"""LayerScale: a per-channel learnable scale of the last axis, initialised to a constant."""

from __future__ import annotations

import torch

from module_checks import check_all
from visattn.nn import LayerScale


def test_scales_the_last_axis_per_channel() -> None:
    m = LayerScale(6, 1e-5)
    assert m.gamma.shape == (6,) and torch.all(m.gamma == 1e-5)
    with torch.no_grad():
        m.gamma.copy_(torch.arange(6.0))
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(m(x), x * torch.arange(6.0))
    assert list(m.state_dict()) == ["gamma"]  # the key official checkpoints are mapped onto


def test_module_properties() -> None:
    torch.manual_seed(0)
    check_all(LayerScale(8, 0.5), torch.randn(3, 5, 8))
