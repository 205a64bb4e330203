"""MambaOut's Gated CNN against timm's GatedConvBlock (weights copied), its k x k receptive field and
parameter count."""

from __future__ import annotations

import pytest
import torch

from module_checks import count_params, receptive_field
from visattn.nn.mixers.mambaout import GatedCNN


@pytest.mark.parametrize("conv_ratio", [1.0, 0.5])
def test_equals_timms_gated_conv_block(conv_ratio):
    """timm's block is norm -> this mixer -> (LayerScale, drop path) -> + residual."""
    mambaout = pytest.importorskip("timm.models.mambaout", reason="timm is not installed")
    torch.manual_seed(0)
    block = mambaout.GatedConvBlock(24, conv_ratio=conv_ratio).eval()
    ours = GatedCNN(24, conv_ratio=conv_ratio).eval()
    ours.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("norm.")})
    x = torch.randn(2, 9, 10, 24)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + ours(block.norm(x)))


def test_receptive_field_is_one_kernel():
    torch.manual_seed(0)
    m = GatedCNN(16, kernel_size=5).double()
    x = torch.randn(1, 9, 9, 16, dtype=torch.double, requires_grad=True)
    expect = torch.zeros(9, 9, dtype=torch.bool)
    expect[2:7, 2:7] = True
    assert torch.equal(receptive_field(m, x, 4, 4), expect)


def test_param_count_closed_form():
    """fc1 C 2h + 2h; depthwise conv c (k^2 + 1); fc2 h C + C, with h = int(8/3 C), c = C."""
    C, k = 96, 7
    h = int(8 / 3 * C)
    assert count_params(GatedCNN(C)) == C * 2 * h + 2 * h + C * (k * k + 1) + h * C + C


def test_conv_ratio_is_checked():
    with pytest.raises(ValueError, match="conv_ratio=3.0 gives 48 conv channels"):
        GatedCNN(16, conv_ratio=3.0)
