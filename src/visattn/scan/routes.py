"""Scan routes: orders in which a selective scan visits the tokens of an ``H x W`` map, and the gather /
scatter that turn ``[B, H, W, C]`` into route sequences and back.

A :class:`Route` is a recipe (kind, map size, options, reversed or not): hashable, so the index
tensors are built once per recipe and device. Its :attr:`~Route.index` lists the flat token indices
``i * W + j`` in visiting order; a route visits a token at most once and may skip tokens (a dilation
group visits only its sub-grid). The families of the vision Mamba papers:

* :func:`raster`, :func:`column` and their :meth:`~Route.flip` (VMamba's four-way cross-scan is
  :func:`cross`; Vim's bidirectional scan is ``[raster, raster.flip()]`` of a ``1 x L`` map);
* :func:`snake` (boustrophedon rows or columns, from any corner: LaMamba-Diff's continuous scans, MHS-VM's
  "C" pattern), :func:`diagonal` (MHS-VM's "X"), :func:`spiral` (MHS-VM's "S");
* :func:`dilation_group` (one sub-grid of a dilated grid; EfficientVMamba's atrous scan is
  :func:`atrous`) and :func:`windows` (LocalMamba's windowed scan): both take their grouping from
  :mod:`visattn.spec`, the dilation groups and the blocked (``stride = kernel``) windows of
  neighborhood attention, so a route and an attention call agree on what a group or a window is.

:func:`scan_routes` gathers a map along several routes at once into ``[B, L, K, C]`` (``L``: the
longest route; shorter ones are padded with zeros *at the end*, which is exact for a causal scan: no
real token comes after a padded one); :func:`unscan_routes` puts each route's outputs back on the map,
:func:`merge_routes` sums them (VMamba's cross-merge). For a route that visits every token,
``unscan_routes(scan_routes(x, [r]), [r])`` is ``x`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import torch

from ..spec import make_spec

__all__ = ["Route", "atrous", "column", "cross", "diagonal", "dilation_group", "merge_routes", "raster",
           "scan_routes", "snake", "spiral", "unscan_routes", "windows"]


@dataclass(frozen=True)
class Route:
    """One scan order over an ``H x W`` map (build it with the functions of this module).

    ``kind`` and ``options`` name the order, ``size`` is ``(H, W)``, ``reverse`` visits it backwards.
    """

    kind: str
    size: tuple[int, int]
    options: tuple = ()
    reverse: bool = False

    def flip(self) -> "Route":
        """The same tokens, visited in the opposite order."""
        return replace(self, reverse=not self.reverse)

    @property
    def index(self) -> torch.Tensor:
        """Flat token indices ``i * W + j`` in visiting order: int64 ``[len(route)]`` on CPU (cached)."""
        return _index(self)

    def __len__(self) -> int:
        return self.index.numel()

    def __str__(self) -> str:
        opts = ", ".join(map(str, self.options))
        return f"{self.kind}({opts}){'.flip()' if self.reverse else ''}"


def _grid(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W).view(H, W)


def _check_size(fn: str, H: int, W: int) -> tuple[int, int]:
    if not all(isinstance(v, int) and v >= 1 for v in (H, W)):
        raise ValueError(f"{fn}: the map size must be two positive ints, got H={H!r}, W={W!r}.")
    return H, W


def raster(H: int, W: int) -> Route:
    """Row-major: row 0 left to right, then row 1, ... (the flattening of ``[H, W]``)."""
    return Route("raster", _check_size("raster", H, W))


def column(H: int, W: int) -> Route:
    """Column-major: column 0 top to bottom, then column 1, ..."""
    return Route("column", _check_size("column", H, W))


def cross(H: int, W: int) -> tuple[Route, Route, Route, Route]:
    """VMamba's cross-scan, in its order: row-major, column-major, and both reversed."""
    r, c = raster(H, W), column(H, W)
    return r, c, r.flip(), c.flip()


def snake(H: int, W: int, vertical: bool = False, from_bottom: bool = False, from_right: bool = False) -> Route:
    """Boustrophedon: row by row (``vertical``: column by column), each line in the opposite direction
    of the previous one, so consecutive tokens are always neighbours. It starts at the top-left corner,
    or the bottom (``from_bottom``) / right (``from_right``) one."""
    return Route("snake", _check_size("snake", H, W), (bool(vertical), bool(from_bottom), bool(from_right)))


def diagonal(H: int, W: int, mirror: bool = False) -> Route:
    """Zigzag over the anti-diagonals ``i + j = 0, 1, ...`` (MHS-VM's diagonal scan): even diagonals
    run bottom-left to top-right, odd ones top-right to bottom-left. ``mirror`` flips the columns."""
    return Route("diagonal", _check_size("diagonal", H, W), (bool(mirror),))


def spiral(H: int, W: int, mirror: bool = False) -> Route:
    """Clockwise spiral from the top-left corner inwards (MHS-VM's spiral scan); ``mirror`` flips the rows
    (a counter-clockwise spiral from the bottom-left corner)."""
    return Route("spiral", _check_size("spiral", H, W), (bool(mirror),))


def dilation_group(H: int, W: int, dilation: int, group: tuple[int, int], column_major: bool = False) -> Route:
    """The tokens of dilation group ``group = (gh, gw)`` (``i % d == gh``, ``j % d == gw``), row-major
    over the sub-grid (``column_major``: column-major).

    The groups are :mod:`visattn.spec`'s: on an axis shorter than the dilation, the dilation shrinks
    as in :func:`~visattn.spec.fit_axis`, and a group beyond it is empty.
    """
    H, W = _check_size("dilation_group", H, W)
    if dilation < 1 or not all(0 <= g < dilation for g in group):
        raise ValueError(f"dilation_group: group={group} must lie in [0, dilation={dilation}) on both axes.")
    return Route("dilation_group", (H, W), (int(dilation), tuple(int(g) for g in group), bool(column_major)))


def atrous(H: int, W: int, step: int = 2) -> tuple[Route, ...]:
    """EfficientVMamba's atrous (skip-sampled) scan: the ``step x step`` dilation groups, group
    ``(gh, gw)`` in the order ``gw``-major then ``gh`` (``(0, 0), (1, 0), (0, 1), (1, 1)`` for step 2),
    scanned row-major where ``gh`` is even and column-major where it is odd."""
    return tuple(dilation_group(H, W, step, (gh, gw), column_major=gh % 2 == 1)
                 for gw in range(step) for gh in range(step))


def windows(H: int, W: int, window: int, column_major: bool = False) -> Route:
    """LocalMamba's windowed scan: ``window x window`` windows one after the other (row-major over the
    windows and inside each; ``column_major``: both column-major).

    The windows are :mod:`visattn.spec`'s blocked neighbourhoods (``kernel = stride = window``): where
    the window does not divide a side, the last window of that side is the remaining partial one
    (LocalMamba pads the map with zeros instead; identical when it divides), and a side shorter than
    the window is one window.
    """
    H, W = _check_size("windows", H, W)
    if window < 1:
        raise ValueError(f"windows: window={window} must be >= 1.")
    return Route("windows", (H, W), (int(window), bool(column_major)))


# ------------------------------------------------------------------------------------------------
# index construction (cached per route)

def _snake_index(H: int, W: int, vertical: bool, from_bottom: bool, from_right: bool) -> torch.Tensor:
    g = _grid(H, W)
    if from_bottom:
        g = g.flip(0)
    if from_right:
        g = g.flip(1)
    if vertical:
        g = g.t()
    g = g.clone()
    g[1::2] = g[1::2].flip(1)
    return g.flatten()


def _diagonal_index(H: int, W: int, mirror: bool) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    k = i + j
    # along diagonal k: i ascending where k is odd, descending where it is even
    index = _ordered((k, torch.where(k % 2 == 1, i, H - 1 - i)), torch.ones(H, W, dtype=torch.bool))
    return (index // W) * W + (W - 1 - index % W) if mirror else index


def _spiral_index(H: int, W: int, mirror: bool) -> torch.Tensor:
    out: list[int] = []
    top, bottom, left, right = 0, H - 1, 0, W - 1
    while top <= bottom and left <= right:
        out += [top * W + j for j in range(left, right + 1)]
        out += [i * W + right for i in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * W + j for j in range(right - 1, left - 1, -1)]
        if left < right:
            out += [i * W + left for i in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    index = torch.tensor(out, dtype=torch.int64)
    return (H - 1 - index // W) * W + index % W if mirror else index


def _ordered(keys: Sequence[torch.Tensor], select: torch.Tensor) -> torch.Tensor:
    """Flat indices of the selected tokens sorted by the keys (``[H, W]`` each, most significant first)."""
    flat = torch.arange(select.numel())[select.flatten()]
    key = torch.zeros(flat.numel(), dtype=torch.int64)
    for k in keys:
        k = k.flatten()[flat]
        key = key * (int(k.max()) + 1 if k.numel() else 1) + k
    return flat[torch.argsort(key, stable=True)]


def _axes(H: int, W: int, kernel: int, stride: int, dilation: int):
    """:mod:`visattn.spec`'s windows of both axes, as ``[H, W]`` grids of each field (broadcast)."""
    spec = make_spec("visattn.scan.routes", (H, W), kernel, stride, dilation)
    wh, ww = spec.windows()
    return wh, ww, lambda a, b: (a[:, None].expand(H, W), b[None, :].expand(H, W))


def _dilation_group_index(H: int, W: int, dilation: int, group: tuple[int, int], column_major: bool) -> torch.Tensor:
    wh, ww, grid = _axes(H, W, 1, 1, dilation)
    gh, gw = grid(wh.group, ww.group)
    ph, pw = grid(wh.pos, ww.pos)
    select = (gh == group[0]) & (gw == group[1])
    return _ordered((pw, ph) if column_major else (ph, pw), select)


def _windows_index(H: int, W: int, window: int, column_major: bool) -> torch.Tensor:
    wh, ww, grid = _axes(H, W, window, window, 1)
    bh, bw = grid(wh.base, ww.base)  # the first key of a query's window: one value per window
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    keys = (bw, bh, j, i) if column_major else (bh, bw, i, j)
    return _ordered(keys, torch.ones(H, W, dtype=torch.bool))


_BUILDERS = {
    "raster": lambda H, W: torch.arange(H * W),
    "column": lambda H, W: _grid(H, W).t().flatten(),
    "snake": _snake_index,
    "diagonal": _diagonal_index,
    "spiral": _spiral_index,
    "dilation_group": _dilation_group_index,
    "windows": _windows_index,
}


@lru_cache(maxsize=512)
def _index(route: Route) -> torch.Tensor:
    index = _BUILDERS[route.kind](*route.size, *route.options).contiguous()
    return index.flip(0) if route.reverse else index


# ------------------------------------------------------------------------------------------------
# gather / scatter

@lru_cache(maxsize=256)
def _plan(routes: tuple[Route, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``gather [Lmax * K]`` (route-position-major, pads point at the zero row ``H * W``),
    ``inverse [H * W, K]`` (each token's position in each route, ``Lmax`` where a route skips it: the
    zero row of the padded output), and ``Lmax``."""
    tokens, K = routes[0].size[0] * routes[0].size[1], len(routes)
    lmax = max(len(r) for r in routes)
    gather = torch.full((lmax, K), tokens, dtype=torch.int64)
    inverse = torch.full((tokens, K), lmax, dtype=torch.int64)
    for k, r in enumerate(routes):
        gather[: len(r), k] = r.index
        inverse[r.index, k] = torch.arange(len(r))
    return gather.flatten().to(device), inverse.to(device), lmax


def _routes(fn: str, routes: Sequence[Route], size: tuple[int, int]) -> tuple[Route, ...]:
    routes = tuple(routes)
    if not routes or any(not isinstance(r, Route) for r in routes):
        raise TypeError(f"{fn}: routes must be a non-empty sequence of Route (visattn.scan.routes), got {routes!r}.")
    wrong = [str(r) for r in routes if r.size != tuple(size)]
    if wrong:
        raise ValueError(f"{fn}: routes {wrong} are for maps of another size than {tuple(size)}; build them with "
                         f"the map's (H, W).")
    return routes


def scan_routes(x: torch.Tensor, routes: Sequence[Route]) -> torch.Tensor:
    """Gather ``x [B, H, W, C]`` along ``K`` routes: ``[B, L, K, C]`` (``L``: the longest route; shorter
    ones end with zeros). Raises for routes of another map size."""
    B, H, W, C = x.shape
    routes = _routes("scan_routes", routes, (H, W))
    gather, _, lmax = _plan(routes, x.device)
    flat = torch.cat([x.reshape(B, H * W, C), x.new_zeros(B, 1, C)], 1)
    return flat[:, gather].view(B, lmax, len(routes), C)


def unscan_routes(ys: torch.Tensor, routes: Sequence[Route], size: tuple[int, int]) -> torch.Tensor:
    """Each route's sequence ``ys [B, L, K, C]`` back on the ``size = (H, W)`` map: ``[B, H, W, K, C]``
    (zeros where a route does not pass). The inverse of :func:`scan_routes` on the tokens a route visits."""
    B, L, K, C = ys.shape
    routes = _routes("unscan_routes", routes, size)
    _, inverse, lmax = _plan(routes, ys.device)
    if L != lmax or K != len(routes):
        raise ValueError(f"unscan_routes: ys has shape {tuple(ys.shape)}; expected [B, {lmax}, {len(routes)}, C] "
                         f"for these routes (the shape scan_routes returns).")
    padded = torch.cat([ys, ys.new_zeros(B, 1, K, C)], 1).reshape(B, (lmax + 1) * K, C)
    flat = inverse * K + torch.arange(K, device=ys.device)
    return padded[:, flat.flatten()].view(B, *size, K, C)


def merge_routes(ys: torch.Tensor, routes: Sequence[Route], size: tuple[int, int]) -> torch.Tensor:
    """VMamba's cross-merge: the routes' sequences put back on the map and summed, ``[B, H, W, C]``."""
    return unscan_routes(ys, routes, size).sum(-2)
