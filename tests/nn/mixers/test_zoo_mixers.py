"""The token-mixer zoo through the registry: every family is listed, builds from its registered
bench kwargs, documents its paper, and the GNA-based ones give the same result on every backend."""

from __future__ import annotations

import re

import pytest
import torch

import visattn
from visattn.nn.registry import attn_info

MIXERS = ["agent", "biformer", "ccnet", "convit", "cswin", "davit_channel", "flatten", "focalnet", "halo",
          "hornet", "inline", "maxvit_block", "maxvit_grid", "swin", "swin_shifted", "volo"]
ON_NA_OPERATOR = ["cswin", "halo", "maxvit_block", "maxvit_grid", "swin", "swin_shifted"]
#: the selective-scan (Mamba) family and its scan-free control; their own checks: test_scan_mixers.py
SCAN_FAMILY = {"ss2d": "visattn selective scan", "vim": "visattn selective scan", "es2d": "visattn selective scan",
               "ms2d": "visattn selective scan", "mhs_vm": "visattn selective scan",
               "local_scan": "visattn selective scan", "lamamba": "visattn selective scan + visattn NA op",
               "mambaout": "pure torch"}


def expected_backends(name: str) -> str:
    return SCAN_FAMILY.get(name) or ("visattn NA op" if name in ON_NA_OPERATOR else "pure torch")


def test_every_family_is_registered_as_channels_last():
    assert set(MIXERS) | set(SCAN_FAMILY) <= set(visattn.list_attn("channels_last"))


@pytest.mark.parametrize("name", MIXERS + list(SCAN_FAMILY))
def test_registration_record_and_docstring(name):
    info = attn_info(name)
    assert re.search(r"\(\d{4}\)$", info["paper"]), info["paper"]
    assert info["complexity"].startswith("O(")
    assert info["backends"] == expected_backends(name)
    doc = info["cls"].__doc__
    year = info["paper"][-5:-1]
    assert year in doc and "[B, H, W, C]" in doc, f"{name}: docstring must name the paper's year and the shapes"


@pytest.mark.parametrize("name", MIXERS + list(SCAN_FAMILY))
def test_builds_from_bench_kwargs(name):
    """``create_attn(name, 96, **bench_kwargs)`` is how the zoo bench builds each mixer."""
    torch.manual_seed(0)
    m = visattn.create_attn(name, 96, **attn_info(name)["bench_kwargs"]).eval()
    x = torch.randn(1, 14, 14, 96)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(set(visattn.list_attn("channels_last")) - {"na1d", "na3d"}))
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (13, 9), (2, 17)])
def test_any_input_size(name, size):
    """Every 2-D token mixer takes any map, however its windows, regions or grids divide it."""
    torch.manual_seed(0)
    kw = dict(num_heads=3, kernel_size=7) if name == "na2d" else attn_info(name)["bench_kwargs"]
    m = visattn.create_attn(name, 96, **kw).eval()
    with torch.no_grad():
        y = m(torch.randn(2, *size, 96))
    assert y.shape == (2, *size, 96) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ON_NA_OPERATOR)
def test_same_result_on_every_backend(name):
    """Built on the GNA operator, each such mixer runs on any backend (here: oracle vs portable torch)."""
    torch.manual_seed(0)
    kw = dict(attn_info(name)["bench_kwargs"])
    ref = visattn.create_attn(name, 32, **{**kw, "num_heads": 2}, backend="reference").double()
    fast = visattn.create_attn(name, 32, **{**kw, "num_heads": 2}, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 11, 32, dtype=torch.double)
    torch.testing.assert_close(fast(x), ref(x))


@pytest.mark.parametrize("name", MIXERS + list(SCAN_FAMILY))
def test_dtype_is_preserved(name):
    """float64 keeps its dtype and agrees with float32 (no hidden down-cast); bfloat16 stays bfloat16."""
    torch.manual_seed(0)
    m = visattn.create_attn(name, 32, num_heads=2) if "num_heads" in attn_info(name)["bench_kwargs"] \
        else visattn.create_attn(name, 32, **({"order": 3} if name == "hornet" else {}))
    if name == "ccnet":
        with torch.no_grad():
            m.gamma.fill_(1.0)
    m.eval()
    x = torch.randn(2, 7, 7, 32)
    with torch.no_grad():
        y32 = m(x)
        y64 = m.double()(x.double())
        y16 = m.bfloat16()(x.bfloat16())
    assert y64.dtype == torch.float64 and y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    # MHS-VM's scan-route attention divides by the spread of its four routes' outputs, small where they
    # agree, so float32 rounding is amplified there
    tol = dict(rtol=1e-2, atol=5e-3) if name == "mhs_vm" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y64.float(), y32, **tol)


@pytest.mark.parametrize("name", [n for n in MIXERS if n not in ("focalnet", "hornet")])
def test_bad_head_count_and_layout_raise_clear_errors(name):
    """Heads that do not divide the width, and channels-first input, fail with the rule named."""
    with pytest.raises(ValueError, match="not divisible by num_heads=5|multiple of"):
        visattn.create_attn(name, 32, num_heads=5)
    m = visattn.create_attn(name, 32, **({"num_heads": 2} if name != "ccnet" else {}))
    with pytest.raises(ValueError, match=r"channels-last input \[B, H, W, 32\]"):
        m(torch.randn(1, 32, 7, 7))


@pytest.mark.parametrize("size", [(9, 11), (5, 3), (1, 1)])
@pytest.mark.parametrize("name", visattn.list_attn("channels_last"))
def test_every_registered_mixer_takes_any_input_size(name, size):
    """Every channels-last mixer in the registry, at its bench kwargs (a 3x3 window where the
    constructor needs one), keeps the shape of an odd or single-token map with finite values."""
    torch.manual_seed(0)
    kw = attn_info(name).get("bench_kwargs") or (dict(num_heads=4, kernel_size=3) if name.startswith("na") else {})
    m = visattn.create_attn(name, 96, **kw).eval()
    shape = (2, *size, 96) if name != "na1d" else (2, size[0], 96)
    shape = (2, *size, 3, 96) if name == "na3d" else shape
    x = torch.randn(shape)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
