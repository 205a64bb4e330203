"""ConvStem / ConvDownsample: overlapping stride-2 convolutions that end channels-last."""

from __future__ import annotations

import pytest
import torch

from visattn.nn import ConvDownsample, ConvStem


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (5, 6)])
def test_stem_divides_by_four_rounding_up_and_goes_channels_last(size) -> None:
    H, W = size
    y = ConvStem(3, 16)(torch.randn(2, 3, H, W))
    assert y.shape == (2, -(-H // 4), -(-W // 4), 16)


@pytest.mark.parametrize("size", [(14, 14), (7, 9)])
def test_downsample_halves_rounding_up_and_changes_width(size) -> None:
    H, W = size
    m = ConvDownsample(16, 32)
    assert m.conv.bias is None
    y = m(torch.randn(2, H, W, 16))
    assert y.shape == (2, -(-H // 2), -(-W // 2), 32)
