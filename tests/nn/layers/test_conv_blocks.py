"""The conv pieces of hybrid backbones: ConvPosEnc, ConvFFN and MBConv (with TF "SAME" padding)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all, receptive_field
from visattn.nn.layers import ConvFFN, ConvPosEnc, MBConv
from visattn.nn.layers.mbconv import pad_same


def test_conv_pos_enc_is_a_residual_depthwise_conv() -> None:
    torch.manual_seed(0)
    m = ConvPosEnc(8).eval()
    x = torch.randn(2, 6, 7, 8)
    ref = x + F.conv2d(x.permute(0, 3, 1, 2), m.proj.weight, m.proj.bias, padding=1, groups=8).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), ref)
    check_all(m, x)
    field = receptive_field(m, x.clone().requires_grad_(True), 3, 3)
    assert field.sum() == 9 and field[2:5, 2:5].all()


def test_conv_ffn_is_fc_dwconv_act_fc() -> None:
    torch.manual_seed(0)
    m = ConvFFN(8, 16).eval()
    x = torch.randn(2, 5, 4, 8)
    h = F.conv2d(m.fc1(x).permute(0, 3, 1, 2), m.dwconv.weight, m.dwconv.bias, padding=1, groups=16)
    torch.testing.assert_close(m(x), m.fc2(F.gelu(h.permute(0, 2, 3, 1))))
    check_all(m, x)


@pytest.mark.parametrize("length, kernel, stride", [(8, 3, 2), (7, 3, 2), (7, 2, 2), (6, 2, 2), (5, 3, 1), (1, 3, 2)])
def test_pad_same_is_tensorflows_rule(length, kernel, stride) -> None:
    """TF "SAME": ceil(L / s) outputs, total padding max((out - 1) * s + k - L, 0), the odd pixel after."""
    x = torch.randn(1, 1, length, length)
    y = pad_same(x, kernel, stride)
    out = math.ceil(length / stride)
    total = max((out - 1) * stride + kernel - length, 0)
    assert y.shape[-1] == length + total
    assert torch.equal(y[..., total // 2:total // 2 + length, total // 2:total // 2 + length], x)
    assert F.conv2d(y, torch.ones(1, 1, kernel, kernel), stride=stride).shape[-1] == out


@pytest.mark.parametrize("tf_padding", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 2)])
def test_mbconv_shapes_and_module_properties(tf_padding, size) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, *size, 8)
    down = MBConv(8, 16, stride=2, tf_padding=tf_padding)
    assert down(x).shape == (2, -(-size[0] // 2), -(-size[1] // 2), 16)
    same = MBConv(8, 8, tf_padding=tf_padding, drop_path=0.1)
    check_all(same, x)


def test_mbconv_equals_the_block_written_out() -> None:
    """MaxViT's MBConv (TF padding): BN -> 1x1 -> BN, GELU -> dw3x3/2 -> BN, GELU -> SE -> 1x1, + pool/1x1 shortcut."""
    torch.manual_seed(0)
    m = MBConv(4, 8, stride=2, tf_padding=True)
    for bn in (m.pre_norm[0], m.norm1[0], m.norm2[0]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(2, 6, 6, 4)
    xc = x.permute(0, 3, 1, 2)
    bn = lambda mod, t: F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias,  # noqa: E731
                                     eps=mod.eps)
    h = F.gelu(bn(m.norm1[0], m.conv1(bn(m.pre_norm[0], xc))))
    h = F.gelu(bn(m.norm2[0], F.conv2d(F.pad(h, (0, 1, 0, 1)), m.conv2.weight, stride=2, groups=32)))
    gate = torch.sigmoid(m.se.fc2(F.silu(m.se.fc1(h.mean((2, 3))))))
    h = m.conv3(h * gate[:, :, None, None])
    ref = h + m.shortcut(F.avg_pool2d(xc, 2))
    torch.testing.assert_close(m(x), ref.permute(0, 2, 3, 1))
    assert m.conv2.groups == 32 and m.se.fc1.out_features == 2  # expansion 4 * C_out, SE width C_out / 4
