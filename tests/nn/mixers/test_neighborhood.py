"""NeighborhoodAttention1D/2D/3D modules: NATTEN-compatible constructor and results, RPB, dropout."""

from __future__ import annotations

import warnings

import pytest
import torch

from module_checks import check_all
from visattn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D, create_attn, na2d


@pytest.mark.parametrize("cls,shape", [
    (NeighborhoodAttention1D, (2, 11, 16)),
    (NeighborhoodAttention2D, (2, 7, 9, 16)),
    (NeighborhoodAttention3D, (2, 4, 5, 6, 16)),
])
@pytest.mark.parametrize("rpb", [False, True])
def test_module_properties(cls, shape, rpb) -> None:
    torch.manual_seed(0)
    m = cls(16, 2, kernel_size=3, dilation=1, rel_pos_bias=rpb)
    check_all(m, torch.randn(*shape))


def test_module_is_qkv_then_na_then_proj() -> None:
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(32, 4, kernel_size=5, dilation=2, stride=1).eval()
    x = torch.randn(2, 12, 13, 32)
    q, k, v = m.qkv(x).reshape(2, 12, 13, 3, 4, 8).unbind(3)
    ref = m.proj(na2d(q, k, v, 5, dilation=2).reshape(2, 12, 13, 32))
    torch.testing.assert_close(m(x), ref)


def test_rel_pos_bias_changes_output_and_has_paper_shape() -> None:
    m = NeighborhoodAttention2D(16, 2, kernel_size=7, rel_pos_bias=True)
    assert m.rpb.shape == (2, 13, 13)
    x = torch.randn(1, 9, 9, 16)
    with torch.no_grad():
        a = m(x)
        m.rpb.zero_()
        b = m(x)
    assert not torch.allclose(a, b)


def test_attn_drop_acts_on_probabilities() -> None:
    """In training, dropout zeroes attention probabilities (rescaled by 1/(1-p)); in eval it is off."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(16, 2, kernel_size=3, attn_drop=0.5)
    x = torch.randn(1, 6, 6, 16)
    m.eval()
    plain = NeighborhoodAttention2D(16, 2, kernel_size=3)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain.eval()(x))
    m.train()
    torch.manual_seed(1)
    dropped = m(x)
    assert not torch.allclose(dropped, plain(x))
    dropped.sum().backward()
    assert m.qkv.weight.grad is not None


def test_registry_builds_modules() -> None:
    assert isinstance(create_attn("na2d", 32, num_heads=4, kernel_size=3), NeighborhoodAttention2D)


def test_input_shape_error() -> None:
    m = NeighborhoodAttention2D(16, 2, kernel_size=3)
    with pytest.raises(ValueError, match=r"NeighborhoodAttention2D: expected a channels-last input \[B, S0, S1, 16\], got \(1, 16, 8, 8, 1\)"):
        m(torch.randn(1, 16, 8, 8, 1))


def test_matches_natten_module() -> None:
    natten = pytest.importorskip("natten", reason="natten is not installed (optional test oracle)")
    torch.manual_seed(0)
    ours = NeighborhoodAttention2D(64, 4, kernel_size=5, dilation=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = natten.NeighborhoodAttention2D(64, 4, kernel_size=5, dilation=2).eval()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(1, 12, 11, 64)
        with torch.no_grad():  # NATTEN has no backward on CPU
            torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)
