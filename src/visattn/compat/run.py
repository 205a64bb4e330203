"""Run an unmodified program with visattn's NATTEN stand-in: ``python -m visattn.compat.run``.

::

    python -m visattn.compat.run [--natten-version 0.15.1] [--replace-natten] script.py [args ...]
    python -m visattn.compat.run [--natten-version 0.17.5] -m package.module [args ...]
    python -m visattn.compat.run --fix-transformers-dinat script.py   # transformers >= 4.54's DiNAT layout
    python -m visattn.compat.run --print-pythonpath   # the PYTHONPATH entry that makes `import natten` find it

The program runs as ``__main__`` in this process after :func:`~visattn.compat.install_natten`, with
``sys.argv`` as if started directly; child processes (DataLoader workers, ``torchrun``,
``multiprocessing``) find the stand-in through ``PYTHONPATH`` and the same version pin. A real NATTEN
is not replaced unless ``--replace-natten`` is given (the run then stops with the reason). A
``torch.hub`` model whose ``hubconf.py`` imports natten loads the same way from a script run here.
``--fix-transformers-dinat`` also applies :func:`visattn.compat.hf_dinat.fix_transformers_dinat` (in
this process), without which transformers 4.54 and later cannot run DiNAT with any NATTEN.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

from .install import BOOTSTRAP_DIR, REPLACE_ENV_VAR, NattenInstalledError, install_natten
from .natten._versions import ENV_VAR

__all__ = ["main"]


_USAGE = ("usage: python -m visattn.compat.run [--natten-version X.Y.Z] [--replace-natten] [--fix-transformers-dinat] "
          "(script.py | -m module) [args ...]")


_FLAGS = {"--replace-natten": "replace", "--fix-transformers-dinat": "fix_dinat", "--print-pythonpath": "print_path",
          "-h": "help", "--help": "help"}


def _split(argv: Sequence[str]) -> tuple[dict, Optional[str], Optional[str], list[str]]:
    """``(options, script, module, program args)``: the runner's options end at the script or ``-m``."""
    opts: dict = {"version": None, "replace": False, "fix_dinat": False, "print_path": False, "help": False}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--natten-version" and i + 1 < len(argv):
            opts["version"], i = argv[i + 1], i + 2
        elif a.startswith("--natten-version="):
            opts["version"], i = a.split("=", 1)[1], i + 1
        elif a in _FLAGS:
            opts[_FLAGS[a]] = True
            i += 1
        elif a == "-m" and i + 1 < len(argv):
            return opts, None, argv[i + 1], list(argv[i + 2:])
        elif a.startswith("-"):
            raise SystemExit(f"{_USAGE}\npython -m visattn.compat.run: unknown option {a!r}")
        else:
            return opts, a, None, list(argv[i + 1:])
    return opts, None, None, []


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status for errors before the program starts."""
    opts, script, module, rest = _split(list(sys.argv[1:] if argv is None else argv))
    if opts["help"]:
        print(f"{_USAGE}\n\n{__doc__}")
        return 0
    if opts["print_path"]:
        print(BOOTSTRAP_DIR)
        return 0
    if script is None and module is None:
        print(f"{_USAGE}\npython -m visattn.compat.run: give a script or -m module to run", file=sys.stderr)
        return 2
    try:
        install_natten(opts["version"], replace=opts["replace"])
    except (NattenInstalledError, ValueError) as e:
        print(f"python -m visattn.compat.run: {e}", file=sys.stderr)
        return 2
    # Children inherit the stand-in through the bootstrap package, with the same choices: started
    # programs through PYTHONPATH, multiprocessing's spawned children through the parent's sys.path.
    os.environ["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, BOOTSTRAP_DIR)
    if opts["version"]:
        os.environ[ENV_VAR] = opts["version"]
    if opts["replace"]:
        os.environ[REPLACE_ENV_VAR] = "1"
    if opts["fix_dinat"]:
        from .hf_dinat import fix_transformers_dinat

        fix_transformers_dinat()
    if module is not None:
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
