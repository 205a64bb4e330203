"""Direct implementations for the selective-scan mixers' tests: each route scanned one at a time with
the sequential reference scan, the routes written with plain tensor ops (flips, transposes, slicing)
as the papers' code writes them, nothing from visattn.scan.routes or RouteScan."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from visattn.scan import selective_scan_reference


def route_scan(ssm, k: int, seq: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Route ``k`` of a ``RouteScan``'s parameters applied to ``seq [B, D, L]`` (Mamba's S6 with ``x_proj``,
    ``dt_proj``, ``A = -exp(A_log)``, ``D``, softplus on ``dt + bias``): ``[B, D, L]``."""
    D, R, N = ssm.channels, ssm.dt_rank, ssm.d_state
    x_dbl = torch.einsum("bdl,cd->bcl", seq, ssm.x_proj_weight[k])
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=1)
    dts = torch.einsum("brl,dr->bdl", dts, ssm.dt_projs_weight[k])
    rows = slice(k * D, (k + 1) * D)
    return selective_scan_reference(seq, dts, -ssm.A_logs[rows].exp(), Bs, Cs, ssm.Ds[rows], z, ssm.dt_projs_bias[k],
                                    delta_softplus=True)


def ss2d_prologue(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VMamba's SS2D before its scans: ``x, z = in_proj(x)``, ``x = SiLU(conv2d(x))`` as ``[B, D, H, W]``."""
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    return F.silu(m.conv2d(xi.permute(0, 3, 1, 2))), z


def ss2d_epilogue(m, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """VMamba's SS2D after its merge: ``out_proj(out_norm(y) * SiLU(z))`` for ``y [B, D, H, W]``."""
    return m.out_proj(m.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z))


def receptive(module: torch.nn.Module, x: torch.Tensor, i: int, j: int) -> set[tuple[int, int]]:
    """Input positions the output at ``(i, j)`` of sample 0 depends on."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(module(x)[0, i, j].sum(), x)
    nz = (g[0].abs().sum(-1) > 0).nonzero().tolist()
    return {tuple(p) for p in nz}
