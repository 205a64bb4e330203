"""PatchEmbed, ConvDownsample options and Swin's PatchMerging, against the operations written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visattn.nn.layers import ConvDownsample, PatchEmbed, PatchMerging


@pytest.mark.parametrize("size", [(16, 16), (17, 22), (3, 2)])
def test_patch_embed_pads_to_the_stride_and_ends_channels_last(size) -> None:
    torch.manual_seed(0)
    m = PatchEmbed(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, *size)
    H, W = size
    padded = F.pad(x, (0, -W % 4, 0, -H % 4))
    ref = F.layer_norm(F.conv2d(padded, m.conv.weight, m.conv.bias, stride=4).permute(0, 2, 3, 1), (8,))
    torch.testing.assert_close(m(x), ref)
    assert m(x).shape == (2, -(-H // 4), -(-W // 4), 8)


def test_overlapping_stem_and_norm_first_downsample() -> None:
    torch.manual_seed(0)
    stem = PatchEmbed(3, 8, kernel_size=7, stride=4)  # DaViT: padding 3
    assert stem(torch.randn(1, 3, 29, 30)).shape == (1, 8, 8, 8)
    down = ConvDownsample(8, 16, kernel_size=2, stride=2, bias=True, norm_first=True)  # DaViT
    x = torch.randn(2, 5, 4, 8)
    ref = F.conv2d(F.pad(F.layer_norm(x, (8,)).permute(0, 3, 1, 2), (0, 0, 0, 1)), down.conv.weight, down.conv.bias,
                   stride=2)
    torch.testing.assert_close(down(x), ref.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="kernel_size=4 is even but not the stride=2"):
        ConvDownsample(8, 16, kernel_size=4)


@pytest.mark.parametrize("size", [(8, 6), (7, 5)])
def test_patch_merging_is_swins_concatenation(size) -> None:
    """Swin's own formulation: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2]."""
    torch.manual_seed(0)
    m = PatchMerging(4, 8)
    x = torch.randn(2, *size, 4)
    xp = F.pad(x, (0, 0, 0, size[1] % 2, 0, size[0] % 2))
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(m(x), m.reduction(m.norm(cat)))
    assert m.reduction.bias is None
