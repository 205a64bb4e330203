"""``natten.context`` and the top-level flags: capability checks answer for this machine, switches are
remembered (and documented as no-ops), the version pin, and ``natten.flops``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import visattn
from visattn.backends import why_not
from visattn.compat import natten as N
from visattn.compat.natten import _versions


def test_capabilities_are_this_machines() -> None:
    cuda = torch.cuda.is_available()
    assert N.has_cuda() is cuda and N.has_half() is cuda and N.has_gemm() is cuda and N.has_fp64_gemm() is cuda
    assert N.has_fused_na() is (why_not("cpu") is None or (cuda and why_not("triton") is None))
    assert N.has_fna is N.has_fused_na and N.HAS_LIBNATTEN is False
    if not cuda:
        assert not (N.has_bfloat() or N.has_tf32_gemm() or N.has_fp32_gemm() or N.enable_tf32())


def test_switches_are_remembered() -> None:
    for use, query in [(N.use_fused_na, N.is_fused_na_enabled), (N.use_deterministic_algorithms,
                       N.are_deterministic_algorithms_enabled), (N.use_kv_parallelism_in_fused_na,
                       N.is_kv_parallelism_in_fused_na_enabled), (N.use_tiled_na, N.is_tiled_na_enabled),
                       (N.use_gemm_na, N.is_gemm_na_enabled), (N.use_tf32_in_gemm_na, N.is_tf32_in_gemm_na_enabled)]:
        use(True)
        assert query() is True
        use(False)
        assert query() is False
    N.use_autotuner(forward_pass=True, thorough_mode_backward=True)
    assert N.is_autotuner_enabled() and N.is_autotuner_thorough_for_backward()
    N.disable_autotuner()
    assert not N.is_autotuner_enabled()
    N.set_memory_usage_preference("strict")
    assert N.is_memory_usage_strict() and not N.is_memory_usage_default()
    with pytest.raises(ValueError, match=r"set_memory_usage_preference: pref='low'; choose 'default', 'strict'"):
        N.set_memory_usage_preference("low")
    N.allow_flex_compile(backprop=True)
    assert N.is_flex_compile_allowed() and N.is_flex_compile_backprop_allowed()
    N.disable_flex_compile()
    assert not N.is_flex_compile_allowed()
    assert N.enable_gemm_na() is True and N.disable_tiled_na() is False
    assert N.get_configs_for_cutlass_fna(torch.zeros(1)) == [] and N.backends.get_bwd_configs_for_cutlass_fmha() == []


def test_the_version_pin() -> None:
    assert N.__version__ == _versions.NEWEST
    _versions.pin("0.15")
    assert N.__version__ == "0.15.0" and N.version.__version__ == "0.15.0"
    done = subprocess.run([sys.executable, "-c", "import visattn.compat.natten as n; print(n.__version__)"],
                          capture_output=True, text=True, env={"VISATTN_NATTEN_VERSION": "0.17.4", "PATH": ""},
                          timeout=120)
    assert done.stdout.strip() == "0.17.4", done.stderr
    with pytest.raises(ValueError, match=r"environment variable VISATTN_NATTEN_VERSION: version='banana'"):
        _versions.pin("banana", fn="environment variable VISATTN_NATTEN_VERSION")


def test_flop_counts() -> None:
    from visattn.spec import make_spec, na_flops

    shape = (2, 14, 12, 4, 32)  # heads-last
    spec = make_spec("t", (14, 12), (3, 5))
    assert N.flops.fna_flop_count(shape, shape, shape, (3, 5), 1, False, True) == na_flops(spec, 2, 4, 32)
    heads_first = (2, 4, 14, 12, 32)
    assert N.flops.na_qk_flop_count(heads_first, heads_first, (3, 5), 1, False, False, return_macs=True) == \
        2 * 14 * 12 * 15 * 4 * 32
    m = N.NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=3)
    x = torch.randn(1, 8, 8, 32)
    assert N.flops.get_flops(m, x) == visattn.count_flops(m, x)
    assert N.flops.add_natten_handle("counter") == "counter"
