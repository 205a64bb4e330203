"""Pieces shared by the selective-scan (visual Mamba) mixers.

* :class:`RouteScan`: the selective scans of ``K`` routes over one map, each route with its own
  projections and state matrices (Mamba's ``x_proj``, ``dt_proj``, ``A_log``, ``D``), run as ONE
  :func:`visattn.selective_scan` call with the routes as groups of ``B``/``C``;
* :class:`VisualScanMixer`: VMamba's SS2D skeleton (``in_proj`` to ``x, z``; depthwise conv and
  activation on ``x``; scans along routes; merge; ``out_norm``; gate by ``act(z)``; ``out_proj``), which
  the SS2D-family mixers specialize by their routes and their merge.

The parameter names follow VMamba's (``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``,
``dt_projs_bias``, ``A_logs``, ``Ds``, ``out_norm``, ``out_proj``) and so does the initialization
(Mamba's: ``dt`` log-uniform in ``[dt_min, dt_max]`` through the inverse softplus of the ``dt`` bias,
``A = -[1..N]`` per channel, ``D = 1``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ...scan import selective_scan
from ...scan.routes import Route, merge_routes, scan_routes
from .base import check_input

__all__ = ["RouteScan", "VisualScanMixer", "dt_rank_for"]


def dt_rank_for(dim: int, dt_rank: Union[int, str]) -> int:
    """Mamba's ``dt_rank="auto"``: ``ceil(dim / 16)`` of the model width."""
    return math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A state-space parameter in at least float32 (Mamba keeps them so under half-precision autocast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class RouteScan(nn.Module):
    """Selective scans of ``num_routes`` sequences of ``channels`` channels each, one parameter set per
    route: ``xs [B, L, K, channels] -> ys [B, L, K, channels]``, optionally gated inside the scan by
    ``z`` (same shape; Mamba's ``y * silu(z)``).

    Per route ``k``: ``[dt_low, B, C] = xs_k x_proj_weight[k]^T``, ``delta = dt_low dt_projs_weight[k]^T``,
    ``y = selective_scan(xs_k, delta, -exp(A_logs_k), B, C, Ds_k, z_k, dt_projs_bias[k],
    delta_softplus=True)``. No data is copied around the scan: ``[B, L, K, channels]`` is the layout
    the kernel reads and writes.
    """

    def __init__(self, channels: int, num_routes: int, d_state: int = 16, dt_rank: int = 6, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, backend: Optional[str] = None) -> None:
        super().__init__()
        if d_state < 1 or dt_rank < 1:
            raise ValueError(f"RouteScan: d_state={d_state} and dt_rank={dt_rank} must be >= 1.")
        K, D, N, R = num_routes, channels, d_state, dt_rank
        self.channels, self.num_routes, self.d_state, self.dt_rank, self.backend = D, K, N, R, backend
        bound = D ** -0.5  # nn.Linear's default init, which VMamba keeps for x_proj
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R).uniform_(-R ** -0.5, R ** -0.5))
        log_dt = torch.rand(K, D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * D, 1))
        self.Ds = nn.Parameter(torch.ones(K * D))

    def forward(self, xs: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, K, D = xs.shape
        N, R = self.d_state, self.dt_rank
        x_dbl = torch.einsum("blkd,kcd->blkc", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=-1)
        dts = torch.einsum("blkr,kdr->blkd", dts, self.dt_projs_weight)
        seq = lambda t: t.reshape(B, L, K * D).transpose(1, 2)  # noqa: E731  [B, K*D, L], a view
        y = selective_scan(seq(xs), seq(dts), -torch.exp(_full(self.A_logs)), Bs.permute(0, 2, 3, 1),
                           Cs.permute(0, 2, 3, 1), _full(self.Ds), seq(z) if z is not None else None,
                           _full(self.dt_projs_bias).reshape(-1), delta_softplus=True, backend=self.backend)
        return y.transpose(1, 2).reshape(B, L, K, D)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_routes={self.num_routes}, d_state={self.d_state}, dt_rank={self.dt_rank}"


class VisualScanMixer(nn.Module):
    """VMamba's SS2D skeleton, channels-last ``[B, H, W, C] -> [B, H, W, C]``.

    ``x, z = in_proj(x)`` (``d_inner = ssm_ratio * dim`` channels each); ``x = act(conv2d(x))`` (a
    ``d_conv x d_conv`` depthwise conv; with ``d_conv <= 1`` no conv, ``x = act(x)``); the routes of
    :meth:`routes` are scanned by :class:`RouteScan`; :meth:`merge` puts them back on the map (default:
    sum, VMamba's cross-merge); ``y = out_norm(y) * act(z)``; ``out_proj``; dropout.

    Subclasses define :meth:`routes` (and :meth:`merge` when the routes are not simply summed) and
    their number, :attr:`num_routes` (or pass ``num_routes``). ``backend`` selects the selective-scan
    path (see :func:`visattn.selective_scan`).
    """

    #: routes per call, fixed by the subclass
    num_routes: int = 4

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto",
                 d_conv: int = 3, conv_bias: bool = True, bias: bool = False, proj_drop: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.SiLU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 backend: Optional[str] = None, num_routes: Optional[int] = None) -> None:
        super().__init__()
        if num_routes is not None:
            self.num_routes = num_routes
        d_inner = int(ssm_ratio * dim)
        if d_inner < 1:
            raise ValueError(f"{type(self).__name__}: ssm_ratio={ssm_ratio} gives {d_inner} inner channels for "
                             f"dim={dim}; use a positive ratio.")
        self.dim, self.d_inner, self.d_conv = dim, d_inner, d_conv
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias) if d_conv > 1 else None
        self.ssm = RouteScan(d_inner, self.num_routes, d_state, dt_rank_for(dim, dt_rank), backend=backend)
        self.out_norm = norm_layer(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(proj_drop)

    def routes(self, H: int, W: int) -> Sequence[Route]:
        """The :attr:`num_routes` routes over an ``H x W`` map: the one hook every subclass defines (SS2D's
        cross-scan, ES2D's atrous sub-grids, ...); the base class has no routes of its own."""
        raise NotImplementedError(f"{type(self).__name__} defines no routes(H, W): VisualScanMixer is a base class; "
                                  f"use a registered mixer such as 'ss2d', or subclass it and define routes().")

    def merge(self, ys: torch.Tensor, routes: Sequence[Route], size: tuple[int, int]) -> torch.Tensor:
        """The routes' outputs ``ys [B, L, K, d_inner]`` on the map, ``[B, H, W, d_inner]``."""
        return merge_routes(ys, routes, size)

    def scan_map(self, x: torch.Tensor) -> torch.Tensor:
        """The routes' scans of the prepared map ``x [B, H, W, d_inner]``, merged: ``[B, H, W, d_inner]``."""
        size = (x.shape[1], x.shape[2])
        routes = self.routes(*size)
        return self.merge(self.ssm(scan_routes(x, routes)), routes, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, self.dim)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        if self.conv2d is not None:
            x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.out_norm(self.scan_map(self.act(x))) * self.act(z)
        return self.dropout(self.out_proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_inner={self.d_inner}, d_conv={self.d_conv}"
