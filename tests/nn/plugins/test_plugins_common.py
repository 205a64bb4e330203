"""Contract shared by every channels-first plug-in in the registry (the per-family files test the papers)."""

from __future__ import annotations

import re

import pytest
import torch

from module_checks import check_all
from plugin_helpers import single_thread  # noqa: F401  (autouse fixture)
from visattn import create_attn, list_attn
from visattn.nn import attn_info

PLUGINS = list_attn("channels_first")
SHAPE_PRESERVING = [n for n in PLUGINS if attn_info(n).get("output", "same") == "same"]


def test_every_plugin_family_is_registered():
    expected = {"se", "eca", "cbam", "ulsam", "ela", "triplet", "polarized", "polarized_seq", "lka", "coord",
                "split_attn", "simpool", "span", "gc"}
    assert expected <= set(PLUGINS)


@pytest.mark.parametrize("name", PLUGINS)
def test_registry_record_is_complete(name):
    info = attn_info(name)
    assert info["layout"] == "channels_first"
    assert re.search(r"\(\d{4}\)$", info["paper"]), "paper must read 'Title (year)'"
    assert info["complexity"].startswith("O(") and info["backends"] == "pure torch"
    assert isinstance(info["bench_kwargs"], dict)
    assert info.get("output", "same") in ("same", "pooled")


@pytest.mark.parametrize("name", PLUGINS)
def test_bench_contract_on_64x56x56(name):
    """The zoo benchmark builds every plug-in as create_attn(name, 64, **bench_kwargs) on [B, 64, 56, 56]."""
    torch.manual_seed(0)
    info = attn_info(name)
    m = create_attn(name, 64, **info["bench_kwargs"]).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 64, 56, 56))
    assert y.shape == ((1, 64, 56, 56) if info.get("output", "same") == "same" else (1, 64))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", SHAPE_PRESERVING)
@pytest.mark.parametrize("hw", [(9, 13), (5, 7), (1, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_generic_properties_at_odd_and_non_square_sizes(name, hw):
    """Shape/dtype kept, every parameter gets gradient, eval is deterministic, batch-independent."""
    torch.manual_seed(0)
    check_all(create_attn(name, 32), torch.randn(3, 32, *hw))


@pytest.mark.parametrize("name", PLUGINS)
def test_float64_matches_float32(name):
    """The module runs in float64 (dtype kept) and float32 agrees with it: no hidden dtype casts."""
    torch.manual_seed(0)
    m = create_attn(name, 32).eval()
    x = torch.randn(2, 32, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        y32 = m(x.float())
        y64 = m.double()(x)
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PLUGINS)
def test_channels_last_input_is_refused_with_a_hint(name):
    m = create_attn(name, 32)
    with pytest.raises(ValueError, match=r"channels-first input \[B, 32, H, W\].*permute"):
        m(torch.randn(2, 9, 13, 32))


@pytest.mark.parametrize("name", PLUGINS)
def test_bad_channel_count_is_refused(name):
    with pytest.raises(ValueError, match="channels=0"):
        create_attn(name, 0)


@pytest.mark.parametrize("name", PLUGINS)
def test_channels_last_memory_format_gives_the_same_result(name):
    """CNNs often run with torch.channels_last strides; no view/reshape may assume NCHW strides."""
    torch.manual_seed(0)
    m = create_attn(name, 32).eval()
    x = torch.randn(2, 32, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), atol=1e-5, rtol=1e-5)


# bfloat16 keeps 8 significant bits: a few roundings per op stay well inside 3% of the output's scale.
BF16_REL_TOL = 3e-2


@pytest.mark.parametrize("name", PLUGINS)
def test_bfloat16_keeps_dtype_and_tracks_float32(name):
    torch.manual_seed(0)
    m = create_attn(name, 32).eval()
    x = torch.randn(2, 32, 9, 13)
    with torch.no_grad():
        y = m(x)
        yb = m.to(torch.bfloat16)(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y).abs().max() <= BF16_REL_TOL * y.abs().max()
