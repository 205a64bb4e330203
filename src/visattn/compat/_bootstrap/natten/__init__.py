"""Imported as ``natten`` in processes started under ``python -m visattn.compat.run`` (whose
``PYTHONPATH`` holds this package's parent directory): installs visattn's NATTEN stand-in, which then
takes this module's place in ``sys.modules``, so the import returns the stand-in."""

import os

from visattn.compat.install import REPLACE_ENV_VAR, install_natten

install_natten(replace=os.environ.get(REPLACE_ENV_VAR) == "1")
