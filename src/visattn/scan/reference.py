"""The selective scan, one token at a time: the readable definition every fast path is tested against."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .checks import check_scan, compute_dtype, per_channel

__all__ = ["selective_scan_reference"]


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                             delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                             return_last_state: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mamba's selective scan (S6) as a loop over tokens, differentiable by autograd.

    Shapes (``mamba-ssm``'s): ``u, delta, z: [batch, dim, L]``, ``A: [dim, N]``, ``B, C: [batch, N, L]``
    or ``[batch, groups, N, L]``, ``D, delta_bias: [dim]``. With ``dt = delta + delta_bias``
    (then ``softplus(dt)`` if ``delta_softplus``), for every channel::

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (h_{-1} = 0, h_t: [N])
        y_t = <C_t, h_t> + D * u_t
        out = y * silu(z)

    Returns ``out [batch, dim, L]`` in ``u``'s dtype, and with ``return_last_state`` also
    ``h_{L-1} [batch, dim, N]`` in the compute dtype (float64 if any input is float64, else
    float32). Raises ``TypeError``/``ValueError`` for arguments off the convention.
    """
    check_scan("selective_scan_reference", u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    x, A = u.to(dtype), A.to(dtype)
    Bd, Cd = per_channel(B.to(dtype), x.shape[1]), per_channel(C.to(dtype), x.shape[1])
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    # per-token slices taken once (unbind): indexing token t of the whole tensor at every step would
    # make autograd's backward materialize a full-size gradient per step, quadratic in L
    for dt_t, x_t, B_t, C_t in zip(dt.unbind(2), x.unbind(2), Bd.unbind(3), Cd.unbind(3)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, -1) if ys else x.new_zeros(x.shape)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
