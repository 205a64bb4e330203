"""The selective-scan C kernel is built like the NA kernel: probing compiles nothing, the first call it
serves builds it (cached on disk); without a compiler, or with a broken one, the torch path serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from visattn import selective_scan
from visattn.backends.cpu import build
from visattn.scan import cpu
from visattn.scan.ops import why_not

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(1, 8, 20, generator=g), delta=torch.randn(1, 8, 20, generator=g),
                A=-torch.rand(8, 4, generator=g), B=torch.randn(1, 4, 20, generator=g),
                C=torch.randn(1, 4, 20, generator=g))


def test_probing_compiles_nothing_and_the_first_call_builds(tmp_path):
    script = """
        import os, torch
        import visattn
        from visattn.cli.main import main
        from visattn.scan.ops import why_not
        cache = os.environ["VISATTN_CACHE_DIR"]
        main(["info"])
        assert why_not("cpu", torch.device("cpu"), torch.float32) is None
        u = torch.randn(1, 8, 20, dtype=torch.float64)
        visattn.selective_scan(u, u, -torch.rand(8, 4, dtype=torch.float64), u[:, :4], u[:, :4])  # float64: torch path
        assert not os.listdir(cache), os.listdir(cache)
        visattn.selective_scan(u.float(), u.float(), -torch.rand(8, 4), u[:, :4].float(), u[:, :4].float())
        assert any(f.startswith("selective_scan-") for f in os.listdir(cache)), os.listdir(cache)
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         env={**os.environ, "VISATTN_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_pthreads_build_without_openmp(tmp_path):
    """Where torch's libgomp is not found the kernel starts its own threads: same results as the
    OpenMP build's (bitwise: the work partition does not depend on threads), on 3 threads."""
    script = """
        import torch
        from visattn import selective_scan
        from visattn.backends.cpu import build
        build.torch_openmp = lambda: None
        torch.set_num_threads(3)
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)
        args = [r(2, 40, 70), r(2, 40, 70), -torch.rand(40, 16, generator=g), r(2, 2, 16, 70), r(2, 2, 16, 70)]
        leaves = [a.requires_grad_() for a in args]
        out = selective_scan(*leaves, delta_softplus=True, backend="cpu")
        grads = torch.autograd.grad((out * out).sum(), leaves)
        want = selective_scan(*leaves, delta_softplus=True, backend="torch")
        wgrads = torch.autograd.grad((want * want).sum(), leaves)
        for a, b in zip([out, *grads], [want, *wgrads]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         env={**os.environ, "VISATTN_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    built = list(tmp_path.glob("selective_scan-*"))
    assert len(built) == 1
    if shutil.which("nm"):  # binutils present: the build really is the pthreads one
        symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
        assert "GOMP_parallel" not in symbols and "pthread_create" in symbols


@pytest.fixture
def fresh_kernel():
    """Forget the loaded kernel so the next call rebuilds (or fails) under a patched environment, and
    restore it afterwards."""
    saved = (cpu._KERNEL.lib, cpu._KERNEL.error)
    cpu._KERNEL.forget()
    yield
    cpu._KERNEL.lib, cpu._KERNEL.error = saved


def test_without_a_compiler_the_torch_path_serves(monkeypatch, fresh_kernel):
    monkeypatch.setattr(build, "compiler", lambda: None)
    reason = why_not("cpu", torch.device("cpu"), torch.float32)
    assert "no C compiler found" in reason and "selective scans use the portable torch path" in reason
    args = _inputs()
    torch.testing.assert_close(selective_scan(**args), selective_scan(**args, backend="reference"), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="backend='cpu' cannot serve this call: no C compiler"):
        selective_scan(**args, backend="cpu")


def test_a_failing_compiler_is_reported_and_routed_around(monkeypatch, tmp_path, fresh_kernel):
    """A compiler that exists but fails (here ``false``): the first call is served by the torch path,
    and from then on the reason carries the failed command."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("VISATTN_CACHE_DIR", str(tmp_path / "cache"))
    assert why_not("cpu", torch.device("cpu"), torch.float32) is None  # nothing tried yet
    args = _inputs()
    torch.testing.assert_close(selective_scan(**args), selective_scan(**args, backend="reference"), atol=1e-5,
                               rtol=1e-5)
    reason = why_not("cpu", torch.device("cpu"), torch.float32)
    assert "building the C kernel failed" in reason and "selective_scan.c" in reason
