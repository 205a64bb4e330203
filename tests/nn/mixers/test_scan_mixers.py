"""The eight visual-Mamba mixers through the registry: registered channels-last with paper and
docstring, built from their bench kwargs, generic module properties on odd sizes, dtypes, and the
same result on every selective-scan path."""

from __future__ import annotations

import re

import pytest
import torch

import visattn
from module_checks import check_all
from visattn.nn.registry import attn_info
from visattn.scan.ops import why_not

SCAN_MIXERS = ["ss2d", "vim", "es2d", "ms2d", "mhs_vm", "local_scan", "lamamba"]
MIXERS = SCAN_MIXERS + ["mambaout"]


def float32_tolerance(name: str, **tol: float) -> dict:
    """``tol``, except for MHS-VM: its scan-route attention divides by the spread of the four routes'
    outputs, small where they agree, so float32 rounding (of any summation order) is amplified there."""
    return dict(rtol=1e-2, atol=5e-3) if name == "mhs_vm" else tol


def small(name: str, dim: int = 16, **kw) -> torch.nn.Module:
    """A small instance: 2 heads where the mixer takes heads, window 4 for LaMamba-Diff."""
    kwargs = dict(attn_info(name)["bench_kwargs"])
    if "num_heads" in kwargs:
        kwargs["num_heads"] = 2
    if name == "lamamba":
        kwargs["window_size"] = 4
    return visattn.create_attn(name, dim, **{**kwargs, **kw})


def test_every_family_is_registered_as_channels_last():
    assert set(MIXERS) <= set(visattn.list_attn("channels_last"))


@pytest.mark.parametrize("name", MIXERS)
def test_registration_record_and_docstring(name):
    info = attn_info(name)
    assert re.search(r"\(\d{4}\)$", info["paper"]), info["paper"]
    assert info["complexity"].startswith("O(")
    assert ("visattn selective scan" in info["backends"]) == (name in SCAN_MIXERS)
    doc = info["cls"].__doc__
    assert info["paper"][-5:-1] in doc and "[B, H, W, C]" in doc, f"{name}: docstring must name the year and shapes"


@pytest.mark.parametrize("name", MIXERS)
def test_builds_from_bench_kwargs_at_the_zoo_width(name):
    torch.manual_seed(0)
    m = visattn.create_attn(name, 96, **attn_info(name)["bench_kwargs"]).eval()
    x = torch.randn(1, 14, 14, 96)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("H,W", [(7, 9), (1, 5), (10, 3)])
def test_generic_properties_on_odd_sizes(name, H, W):
    torch.manual_seed(0)
    check_all(small(name), torch.randn(2, H, W, 16))


@pytest.mark.parametrize("name", MIXERS)
def test_dtype_is_preserved(name):
    """float64 keeps its dtype and agrees with float32; bfloat16 stays bfloat16 and finite."""
    torch.manual_seed(0)
    m = small(name).eval()
    x = torch.randn(2, 6, 7, 16)
    with torch.no_grad():
        y32 = m(x)
        y64 = m.double()(x.double())
        y16 = m.bfloat16()(x.bfloat16())
    assert y64.dtype == torch.float64 and y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    torch.testing.assert_close(y64.float(), y32, **float32_tolerance(name, rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("name", [n for n in SCAN_MIXERS if n != "lamamba"])
def test_same_result_on_every_scan_path(name):
    """The mixers run on the sequential reference, the chunked torch scan and the C kernel alike."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 16)
    outs = []
    for backend in ("reference", "torch", "cpu"):
        if why_not(backend, x.device, torch.float32):
            continue
        torch.manual_seed(0)
        outs.append(small(name, backend=backend)(x))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], **float32_tolerance(name, rtol=1e-4, atol=2e-5))


@pytest.mark.parametrize("name", MIXERS)
def test_channels_first_input_raises_a_clear_error(name):
    m = small(name)
    with pytest.raises(ValueError, match=r"channels-last input \[B, H, W, 16\]"):
        m(torch.randn(1, 16, 5, 5, 2))
