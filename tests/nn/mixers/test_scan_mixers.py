"""The eight visual-Mamba mixers (their registration records and zoo builds: test_zoo_mixers.py):
generic module properties on odd sizes, channels-first errors, and the same result on every
selective-scan path (dtypes: test_zoo_mixers.py)."""

from __future__ import annotations

import pytest
import torch

import visattn
from module_checks import check_all
from visattn.nn.registry import attn_info
from visattn.scan.ops import why_not

SCAN_MIXERS = ["ss2d", "vim", "es2d", "ms2d", "mhs_vm", "local_scan", "lamamba"]
MIXERS = SCAN_MIXERS + ["mambaout"]


def small(name: str, dim: int = 16, **kw) -> torch.nn.Module:
    """A small instance: 2 heads where the mixer takes heads, window 4 for LaMamba-Diff."""
    kwargs = dict(attn_info(name)["bench_kwargs"])
    if "num_heads" in kwargs:
        kwargs["num_heads"] = 2
    if name == "lamamba":
        kwargs["window_size"] = 4
    return visattn.create_attn(name, dim, **{**kwargs, **kw})


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("H,W", [(7, 9), (1, 5), (10, 3)])
def test_generic_properties_on_odd_sizes(name, H, W):
    torch.manual_seed(0)
    check_all(small(name), torch.randn(2, H, W, 16))


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
        # MHS-VM's scan-route attention amplifies float32 rounding (see test_zoo_mixers' dtype test)
        tol = dict(rtol=1e-2, atol=5e-3) if name == "mhs_vm" else dict(rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(y, outs[0], **tol)


@pytest.mark.parametrize("name", MIXERS)
def test_channels_first_input_raises_a_clear_error(name):
    m = small(name)
    with pytest.raises(ValueError, match=r"channels-last input \[B, H, W, 16\]"):
        m(torch.randn(1, 16, 5, 5, 2))
