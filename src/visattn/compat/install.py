"""Make ``import natten`` resolve to visattn's stand-in (:mod:`visattn.compat.natten`).

:func:`install_natten` registers the stand-in and each of its submodules in ``sys.modules`` under
``natten`` / ``natten.<submodule>``, so ``import natten``, ``from natten.functional import
natten2dqkrpb`` and ``importlib.util.find_spec("natten")`` (how transformers decides that NATTEN is
available) all find it. The objects are the stand-in's own: ``natten.functional is
visattn.compat.natten.functional``. It also answers ``importlib.metadata.version("natten")`` (with the
emulated release), which older transformers (up to 4.53, the last with a working DiNAT) and other
version checks read; ``pip`` does not see it.

The rule for a real NATTEN: **it is never shadowed silently.** If one is importable (installed on
``sys.path`` or already imported), :func:`install_natten` raises :class:`NattenInstalledError` naming
its version and location, unless called with ``replace=True``; then the stand-in takes the name for
this process only, with a warning, and the installed package is left untouched
(:func:`uninstall_natten` gives the name back).

Child processes do not inherit ``sys.modules``. ``python -m visattn.compat.run`` puts
:data:`BOOTSTRAP_DIR` on ``PYTHONPATH``: it holds a ``natten`` package whose import installs the
stand-in (with the same version pin and ``replace`` choice), so DataLoader workers, ``torchrun``
children and ``multiprocessing`` spawns get it too.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
import warnings
from types import ModuleType
from typing import Iterator, Optional

__all__ = ["BOOTSTRAP_DIR", "NattenInstalledError", "install_natten", "natten_stand_in", "real_natten",
           "uninstall_natten"]

#: A directory holding a ``natten`` package that installs the stand-in when imported (see module docstring).
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")
#: Environment variable: "1" lets the bootstrap package replace an installed NATTEN (``replace=True``).
REPLACE_ENV_VAR = "VISATTN_NATTEN_REPLACE"

_STAND_IN = "visattn.compat.natten"
_evicted: dict[str, ModuleType] = {}


class NattenInstalledError(RuntimeError):
    """A real NATTEN is importable and ``install_natten`` was not told to replace it."""


class _StandInDistribution(importlib.metadata.Distribution):
    """Package metadata of the stand-in: ``Name: natten``, ``Version:`` the emulated release, no files."""

    def read_text(self, filename: str) -> Optional[str]:
        if filename != "METADATA":
            return None
        from .natten._versions import version_string

        return (f"Metadata-Version: 2.1\nName: natten\nVersion: {version_string()}\n"
                f"Summary: visattn's stand-in for NATTEN (visattn.compat.natten)\n")

    def locate_file(self, path):  # no files on disk
        return None


class _MetadataFinder(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` while installed: finds no modules, and the stand-in's distribution for
    ``importlib.metadata`` queries about ``natten``."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name is None or context.name.lower().replace("-", "_") == "natten":
            yield _StandInDistribution()


_FINDER = _MetadataFinder()


def _ours(module: Optional[ModuleType]) -> bool:
    """The stand-in, or the bootstrap package that is replacing itself by it."""
    if module is None:
        return False
    if getattr(module, "__name__", "").startswith(_STAND_IN):
        return True
    return os.path.dirname(os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "."))) == BOOTSTRAP_DIR


def real_natten() -> Optional[tuple[str, str]]:
    """``(version, location)`` of a real NATTEN importable in this process, or ``None``.

    Looks at an already imported ``natten`` module, then searches ``sys.path`` (skipping
    :data:`BOOTSTRAP_DIR`) without importing anything.
    """
    loaded = sys.modules.get("natten")
    if loaded is not None and not _ours(loaded):
        return str(getattr(loaded, "__version__", "unknown")), str(getattr(loaded, "__file__", "?"))
    path = [p for p in sys.path if os.path.abspath(p or ".") != BOOTSTRAP_DIR]
    spec = importlib.machinery.PathFinder.find_spec("natten", path)
    if spec is None:
        return None
    try:
        version = importlib.metadata.version("natten")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return version, str(spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0])


def install_natten(version: Optional[str] = None, *, replace: bool = False) -> ModuleType:
    """Make ``import natten`` give visattn's NATTEN stand-in in this process; returns the stand-in.

    ``version``: the NATTEN release to emulate where releases disagree (``"0.15.1"``, ``"0.17.5"``,
    ...; ``None`` keeps the current pin, by default ``VISATTN_NATTEN_VERSION`` or none).
    ``replace``: take the name even if a real NATTEN is importable (module docstring).

    Raises :class:`NattenInstalledError` if a real NATTEN is importable and ``replace`` is False, and
    ``ValueError`` for a version outside 0.14.1-0.21.x. Once installed, calling it again only applies
    ``version``.
    """
    if getattr(sys.modules.get("natten"), "__name__", None) == _STAND_IN:  # installed already: the choice is made
        from .natten import _versions

        if version is not None:
            _versions.pin(version)
        return sys.modules[_STAND_IN]
    real = real_natten()
    if real is not None and not replace:
        raise NattenInstalledError(
            f"install_natten: NATTEN {real[0]} is installed ({real[1]}); visattn's stand-in never shadows it "
            f"silently. Use the real NATTEN (skip install_natten), or pass replace=True (python -m "
            f"visattn.compat.run --replace-natten ...) to use the stand-in in this process; the installed package "
            f"is left untouched.")
    from . import natten as stand_in
    from .natten import _versions

    if version is not None:
        _versions.pin(version)
    if real is not None:
        warnings.warn(f"install_natten: visattn's NATTEN stand-in replaces NATTEN {real[0]} ({real[1]}) in this "
                      f"process "
                      f"(replace=True); uninstall_natten() gives the name back.", UserWarning, stacklevel=2)
        for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
            module = sys.modules.pop(name)
            if not _ours(module):
                _evicted[name] = module
    for name, module in list(sys.modules.items()):
        if name == _STAND_IN or name.startswith(_STAND_IN + "."):
            sys.modules["natten" + name[len(_STAND_IN):]] = module
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return stand_in


def uninstall_natten() -> None:
    """Undo :func:`install_natten`: drop the ``natten`` names it registered and restore the modules of a
    real NATTEN it replaced. The version pin returns to ``VISATTN_NATTEN_VERSION`` (or none)."""
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        if _ours(sys.modules[name]):
            del sys.modules[name]
    sys.modules.update(_evicted)
    _evicted.clear()
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    if _STAND_IN in sys.modules:
        from .natten import _versions

        _versions.pin(None)
        _versions.pin_from_environment()


@contextlib.contextmanager
def natten_stand_in(version: Optional[str] = None, *, replace: bool = False) -> Iterator[ModuleType]:
    """``with natten_stand_in(): ...``: :func:`install_natten` for the block, then :func:`uninstall_natten`.

    Modules imported inside the block keep the objects they imported from ``natten``.
    """
    module = install_natten(version, replace=replace)
    try:
        yield module
    finally:
        uninstall_natten()
