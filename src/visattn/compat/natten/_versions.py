"""Which NATTEN release the stand-in emulates, and how a call is read when releases disagree.

NATTEN changed the meaning of a few positional arguments and defaults between releases (the fused
``na2d``'s fifth argument is ``dilation`` in 0.17 and ``stride`` from 0.20; the modules' relative
positional bias is on by default up to 0.15 and off from 0.17; ...). Every such API is described
here as a list of :class:`Era` objects: one signature per range of releases, and a function that
turns a call bound to that signature into a *canonical* dict (the same keys for every era, defaults
filled in). :func:`resolve` reads a call as follows:

* the eras whose signature accepts the call are the candidates (none: ``TypeError``);
* if the candidates read it the same way, the pinned release's era is used when it is one of them,
  else the newest;
* if they read it differently, the pinned release decides when its era is a candidate; otherwise the
  call is ambiguous: an error for differences in what the call computes, and for differences
  only in defaults that NATTEN changed (:attr:`Era.soft`) the newest reading with a warning.

The pin: ``install_natten(version=...)``, ``python -m visattn.compat.run --natten-version ...`` or the
``VISATTN_NATTEN_VERSION`` environment variable; unpinned, ``natten.__version__`` reports
:data:`NEWEST`.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["Era", "NEWEST", "OLDEST", "ENV_VAR", "parse_version", "pin", "pinned", "resolve", "version_string"]

#: The releases the stand-in covers (the first with NATTEN's Python API as documented, the newest).
OLDEST = "0.14.1"
NEWEST = "0.21.7"
ENV_VAR = "VISATTN_NATTEN_VERSION"

Version = tuple[int, int, int]

_pin: Optional[Version] = None
_warned: set = set()


def parse_version(fn: str, version: str) -> Version:
    """``"0.17.5"`` -> ``(0, 17, 5)``; raises ``ValueError`` naming ``fn`` outside 0.14.1-0.21.x."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.(\d+))?(?:[.+-].*)?\s*", str(version))
    got = tuple(int(g or 0) for g in m.groups()) if m else None
    if got is None or not _tuple(OLDEST) <= got <= (0, 21, 99):
        raise ValueError(f"{fn}: version={version!r} is not a NATTEN release the stand-in emulates; pass one from "
                         f"{OLDEST} to {NEWEST}, such as '0.14.6', '0.15.1', '0.17.5' or '0.21.7'.")
    return got


def _tuple(version: str) -> Version:
    return tuple(int(x) for x in version.split("."))  # type: ignore[return-value]


def pin(version: Optional[str], fn: str = "install_natten") -> None:
    """Emulate ``version`` from now on (``None``: unpinned)."""
    global _pin
    _pin = None if version is None else parse_version(fn, version)


def pinned() -> Optional[Version]:
    """The pinned release, or ``None``."""
    return _pin


def version_string() -> str:
    """What ``natten.__version__`` reports: the pinned release, else :data:`NEWEST`."""
    return NEWEST if _pin is None else ".".join(map(str, _pin))


def pin_from_environment() -> None:
    """Apply ``VISATTN_NATTEN_VERSION`` if it is set (an invalid value raises, naming the variable)."""
    value = os.environ.get(ENV_VAR)
    if value:
        pin(value, fn=f"environment variable {ENV_VAR}")


@dataclass(frozen=True)
class Era:
    """One reading of an API: the releases ``first``-``last`` and their signature (given as a stub
    function), and ``canon(arguments) -> dict`` (``arguments``: the bound call with defaults applied;
    it raises ``TypeError`` for values that release could not have meant, such as an int where it
    takes a tensor). ``soft``: canonical keys whose differences are defaults NATTEN changed (warn, do
    not refuse)."""

    first: str
    last: str
    stub: Callable[..., Any]
    canon: Callable[[dict], dict]
    soft: frozenset = field(default_factory=frozenset)
    #: read only when pinned to one of its releases (its positional order clashes with every later one)
    pinned_only: bool = False

    @property
    def name(self) -> str:
        return f"NATTEN {self.first}" + (f"-{self.last}" if self.last != self.first else "")

    def covers(self, version: Version) -> bool:
        return _tuple(self.first) <= version <= _tuple(self.last)

    def bind(self, args: Sequence, kwargs: dict) -> dict:
        bound = inspect.signature(self.stub).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def _differences(readings: list[tuple[Era, dict]]) -> set:
    base = readings[0][1]
    return {key for _, canon in readings[1:] for key in base if not _same(base[key], canon[key])}


def resolve(fn: str, eras: Sequence[Era], args: Sequence, kwargs: dict) -> tuple[Era, dict]:
    """The era that reads ``fn(*args, **kwargs)`` and its canonical arguments (module docstring)."""
    readings, complaints = [], []
    for era in eras:
        if era.pinned_only and (_pin is None or not era.covers(_pin)):
            continue
        try:
            readings.append((era, era.canon(era.bind(args, kwargs))))
        except TypeError as e:
            complaints.append(f"{era.name}: {e}")
    if not readings:
        raise TypeError(f"{fn}: these arguments match no NATTEN release's signature ({'; '.join(complaints)}).")
    chosen = _prefer(readings)
    differ = _differences(readings)
    if not differ or _pin is not None:
        return chosen
    hard = differ - chosen[0].soft
    if hard:
        ways = "; ".join(f"{era.name} reads {', '.join(f'{k}={_show(c[k])}' for k in sorted(hard))}"
                         for era, c in readings)
        pins = " or ".join(dict.fromkeys(era.last for era, _ in readings))
        raise TypeError(f"{fn}: this call means different things in different NATTEN releases ({ways}). Pass those "
                        f"arguments by keyword, or pin the release the code was written for: {ENV_VAR}={pins} (or "
                        f"install_natten(version=...), or --natten-version in python -m visattn.compat.run).")
    key = (fn, tuple(sorted(differ)))
    if key not in _warned:
        _warned.add(key)
        others = ", ".join(era.name for era, canon in readings if _differences([chosen, (era, canon)]))
        warnings.warn(f"{fn}: {others} would build this with other defaults ({', '.join(sorted(differ))}); built as "
                      f"{chosen[0].name}. Pin the release the code was written for to choose ({ENV_VAR}=..., "
                      f"install_natten(version=...)) or pass the argument explicitly.", UserWarning, stacklevel=3)
    return chosen


def _prefer(readings: list[tuple[Era, dict]]) -> tuple[Era, dict]:
    """The pinned release's reading if it is a candidate, else the nearest era to the pin, else the newest."""
    if _pin is not None:
        for era, canon in readings:
            if era.covers(_pin):
                return era, canon
        return min(readings, key=lambda r: abs(_distance(r[0], _pin)))
    return max(readings, key=lambda r: _tuple(r[0].last))


def _distance(era: Era, version: Version) -> int:
    """How far ``version`` lies outside ``era`` (0 inside), in a rough release count."""
    lo, hi = _tuple(era.first), _tuple(era.last)
    flat = lambda v: v[1] * 100 + v[2]  # noqa: E731
    return 0 if lo <= version <= hi else min(abs(flat(version) - flat(lo)), abs(flat(version) - flat(hi)))


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)
