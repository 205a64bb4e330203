"""Compatibility layers: code written for other libraries' APIs, run by visattn.

:mod:`visattn.compat.natten` is a stand-in for NATTEN's Python API (releases 0.14 to 0.21);
:func:`install_natten` makes ``import natten`` resolve to it (never silently over a real NATTEN), and
``python -m visattn.compat.run script.py`` runs an unmodified program with it. See docs/natten.md.
Importing :mod:`visattn` does not import this package.
"""

from .install import NattenInstalledError, install_natten, natten_stand_in, real_natten, uninstall_natten

__all__ = ["NattenInstalledError", "install_natten", "natten_stand_in", "real_natten", "uninstall_natten"]
