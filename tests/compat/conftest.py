import os
import sys

import pytest

# natten_rules.py (NATTEN's own window rules, the second oracle) serves the stand-in's tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_natten_state():
    """Every test starts unpinned, with NATTEN's default switches, and leaves `import natten` as it found it."""
    from visattn.compat.natten import _versions, context

    saved = _versions.pinned()
    context.NattenContext.reset()
    _versions.pin(None)
    before = {name: module for name, module in sys.modules.items() if name == "natten" or name.startswith("natten.")}
    yield
    _versions.pin(None if saved is None else ".".join(map(str, saved)))
    context.NattenContext.reset()
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        del sys.modules[name]
    sys.modules.update(before)
