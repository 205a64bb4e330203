"""Bottleneck: ResNet's block, channels-last, with its 3x3 conv or a token mixer in the middle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_batch_independent, check_shape_and_grads
from visattn.nn.layers import Bottleneck


def _bn(mod, t):
    return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, eps=mod.eps)


def _randomize_stats(m) -> None:
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)


def test_conv_bottleneck_is_resnets_block() -> None:
    torch.manual_seed(0)
    m = Bottleneck(8, 16, 4, stride=2)
    _randomize_stats(m)
    m.eval()
    x = torch.randn(2, 7, 6, 8)
    xc = x.permute(0, 3, 1, 2)
    y = F.relu(_bn(m.conv1.bn, m.conv1.conv(xc)))
    y = F.relu(_bn(m.conv2.bn, F.conv2d(y, m.conv2.conv.weight, stride=2, padding=1)))
    y = _bn(m.conv3.bn, m.conv3.conv(y)) + _bn(m.shortcut.bn, F.conv2d(xc, m.shortcut.conv.weight, stride=2))
    torch.testing.assert_close(m(x), F.relu(y).permute(0, 2, 3, 1))


@pytest.mark.parametrize("stride", [1, 2])
def test_mixer_bottleneck_replaces_the_3x3_conv(stride) -> None:
    torch.manual_seed(0)
    kw = dict(num_heads=2, block_size=4, halo_size=1, border="zero", out_proj=False)
    m = Bottleneck(16, 16, 8, stride=stride, mixer="halo", mixer_kwargs=kw)
    assert not hasattr(m, "conv2") and type(m.attn).__name__ == "HaloAttention" and m.attn.stride == stride
    x = torch.randn(2, 9, 8, 16)
    assert m(x).shape == (2, -(-9 // stride), 4 if stride == 2 else 8, 16)
    if stride == 1:  # identity shortcut, same shape: the generic module checks apply
        check_shape_and_grads(m, x)
    check_batch_independent(m, x)
