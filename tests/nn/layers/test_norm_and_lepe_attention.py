"""BatchNorm on channels-last maps, and global attention with LePE (CSWin's and BiFormer's last stage)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from module_checks import check_all
from visattn.nn.layers import BatchNorm2dChannelsLast, GlobalLePEAttention2D


def test_batch_norm_channels_last_is_batch_norm_on_the_permuted_map() -> None:
    torch.manual_seed(0)
    bn = BatchNorm2dChannelsLast(6)
    ref = torch.nn.BatchNorm2d(6)
    assert bn.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 5, 4, 6)
    for mode in ("train", "eval"):
        getattr(bn, mode)(), getattr(ref, mode)()
        torch.testing.assert_close(bn(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    with pytest.raises(ValueError, match=r"expected a channels-last map \[B, H, W, 6\], got \(3, 6, 5, 4\)"):
        bn(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("source", ["value", "input"])
def test_lepe_attention_is_global_attention_plus_a_depthwise_conv(source: str) -> None:
    torch.manual_seed(0)
    m = GlobalLePEAttention2D(16, 2, qkv_bias=source == "value", lepe_kernel=3 if source == "value" else 5,
                              lepe_source=source).double().eval()
    x = torch.randn(2, 5, 7, 16, dtype=torch.double)
    q, k, v = m.qkv(x).reshape(2, 35, 3, 2, 8).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1) @ v  # [B, heads, N, D]
    o = o.transpose(1, 2).reshape(2, 5, 7, 16)
    s = v.transpose(1, 2).reshape(2, 5, 7, 16) if source == "value" else x
    lepe = F.conv2d(s.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.lepe.padding, groups=16)
    torch.testing.assert_close(m(x), m.proj(o + lepe.permute(0, 2, 3, 1)))
    check_all(m.float(), x.float())


def test_lepe_attention_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lepe_source='key'"):
        GlobalLePEAttention2D(16, 2, lepe_source="key")
    with pytest.raises(ValueError, match="lepe_kernel=4 must be odd"):
        GlobalLePEAttention2D(16, 2, lepe_kernel=4)
