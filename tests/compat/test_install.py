"""``import natten`` resolving to the stand-in: ``install_natten`` and its rule for a real NATTEN (never
shadowed silently), package metadata, the runner (scripts, ``-m`` modules, child processes, version
pins) and a ``torch.hub`` model whose hubconf imports natten."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import visattn.compat.natten as stand_in
from visattn.compat import NattenInstalledError, install_natten, natten_stand_in, real_natten, uninstall_natten
from visattn.compat.install import BOOTSTRAP_DIR

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(stand_in.__file__))))


@pytest.fixture
def fake_natten(tmp_path, monkeypatch):
    """A package named ``natten`` first on ``sys.path``: a real NATTEN, as far as the stand-in can tell."""
    (tmp_path / "natten").mkdir()
    (tmp_path / "natten" / "__init__.py").write_text("__version__ = '0.17.4'\nREAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


#: Where a real NATTEN is installed (CI has 0.21.7), the stand-in is asked to replace it.
REPLACE = real_natten() is not None


@pytest.fixture
def quiet():
    """Silence the notice that the stand-in replaces an installed NATTEN."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_install_makes_import_natten_find_the_stand_in(quiet) -> None:
    assert (importlib.util.find_spec("natten") is None) is not REPLACE
    with natten_stand_in("0.17.5", replace=REPLACE) as module:
        assert module is stand_in
        import natten
        import natten.functional
        from natten.functional import natten2dqkrpb  # noqa: F401 (what transformers imports)
        from natten.na2d import NeighborhoodAttention2D

        assert natten is stand_in and natten.functional is stand_in.functional
        assert importlib.util.find_spec("natten") is not None
        assert natten.__version__ == importlib.metadata.version("natten") == "0.17.5"
        assert NeighborhoodAttention2D is stand_in.NeighborhoodAttention2D
        q = torch.randn(1, 6, 6, 2, 4)
        assert natten.na2d(q, q, q, 3).shape == q.shape  # importing natten.na2d kept natten.na2d callable
    if not REPLACE:
        assert importlib.util.find_spec("natten") is None
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("natten")
    else:
        assert importlib.metadata.version("natten") != "0.17.5"  # the installed package's again


def test_a_real_natten_is_never_shadowed_silently(fake_natten) -> None:
    with pytest.raises(NattenInstalledError, match=rf"install_natten: NATTEN .* is installed \({fake_natten}.*never "
                                                   r"shadows it silently.*replace=True"):
        install_natten()
    with pytest.warns(UserWarning, match=r"stand-in replaces NATTEN .* \(replace=True\)"):
        install_natten(replace=True)
    try:
        import natten

        assert natten is stand_in and not hasattr(natten, "REAL")
        assert install_natten("0.15.1") is stand_in and natten.__version__ == "0.15.1"  # again: the choice stands
    finally:
        uninstall_natten()
    import natten

    assert natten.REAL  # the name goes back to the installed package


def test_an_imported_real_natten_is_restored(fake_natten) -> None:
    import natten as real

    with pytest.warns(UserWarning):
        with natten_stand_in(replace=True):
            assert sys.modules["natten"] is stand_in
    assert sys.modules["natten"] is real


def _run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "VISATTN_NATTEN_VERSION"}  # no pin unless asked
    environment = {**inherited, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run([sys.executable, "-m", "visattn.compat.run", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=300)


SCRIPT = textwrap.dedent('''
    import multiprocessing as mp
    import sys
    import natten
    from natten.functional import natten2dqkrpb

    def child(queue):
        import natten
        queue.put(natten.__version__)

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        p = ctx.Process(target=child, args=(queue,))
        p.start()
        print(natten.__name__, natten.__version__, sys.argv[1:], "child:", queue.get())
        p.join()
''')


def _replace() -> list[str]:
    return ["--replace-natten"] if REPLACE else []


def test_runner_runs_an_unmodified_script_and_its_children(tmp_path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    done = _run(*_replace(), "--natten-version", "0.15.1", str(tmp_path / "train.py"), "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "visattn.compat.natten 0.15.1 ['--epochs', '3'] child: 0.15.1"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main.py").write_text("import sys, natten\nprint(natten.__version__, sys.argv[1:])\n")
    done = _run(*_replace(), "-m", "pkg.main", "x", cwd=tmp_path, env={"PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{stand_in._versions.NEWEST} ['x']"


def test_runner_refuses_over_a_real_natten(tmp_path) -> None:
    (tmp_path / "natten").mkdir()
    (tmp_path / "natten" / "__init__.py").write_text("__version__ = '0.17.4'\n")
    (tmp_path / "s.py").write_text("import natten\nprint(natten.__name__)\n")
    env = {"PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}"}
    done = _run(str(tmp_path / "s.py"), env=env)
    assert done.returncode == 2 and "never shadows it silently" in done.stderr
    done = _run("--replace-natten", str(tmp_path / "s.py"), env=env)
    assert done.returncode == 0 and done.stdout.strip() == "visattn.compat.natten"


def test_runner_options(capsys) -> None:
    from visattn.compat.run import main

    assert main(["--print-pythonpath"]) == 0 and capsys.readouterr().out.strip() == BOOTSTRAP_DIR
    assert main([]) == 2 and "give a script or -m module" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown option '--bogus'"):
        main(["--bogus", "s.py"])


def test_a_bad_version_pin_is_refused() -> None:
    with pytest.raises(ValueError, match=r"install_natten: version='0\.9' is not a NATTEN release the stand-in "
                                         r"emulates; pass one from 0\.14\.1 to 0\.21\.7"):
        install_natten("0.9", replace=True)


def test_torch_hub_model_whose_hubconf_imports_natten(tmp_path, quiet) -> None:
    (tmp_path / "hubconf.py").write_text(textwrap.dedent('''
        dependencies = ["torch"]
        from natten import NeighborhoodAttention2D

        def tiny_na(**kwargs):
            return NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=3, rel_pos_bias=True, **kwargs)
    '''))
    with natten_stand_in(replace=REPLACE):
        model = torch.hub.load(str(tmp_path), "tiny_na", source="local")
    assert isinstance(model, stand_in.NeighborhoodAttention2D)
    assert model(torch.randn(1, 5, 5, 16)).shape == (1, 5, 5, 16)
    script = tmp_path / "use_hub.py"
    script.write_text(f"import torch\nm = torch.hub.load({str(tmp_path)!r}, 'tiny_na', source='local')\n"
                      f"print(type(m).__module__)\n")
    done = _run(*_replace(), str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "visattn.compat.natten.modules"
