"""The portable selective scan: chunks of tokens, each scanned in parallel with PyTorch ops (any device).

Within a chunk of ``T`` tokens the recurrence ``h_t = a_t h_{t-1} + x_t`` (``a = exp(dt A)``,
``x = dt u B``) is a Hillis-Steele scan: ``log2(T)`` steps of elementwise products on
``[batch, T, dim, N]`` tensors, with no division (so nothing overflows that the recurrence itself
would not). Chunks run one after the other, each starting from the previous one's last state.

The backward is explicit, not autograd through the forward: it walks the chunks in reverse, recomputes
each chunk's states (and its output before the gate) from the state saved at its start, and runs the
adjoint recurrence ``lam_t = C_t dy_t + a_{t+1} lam_{t+1}`` as the same scan on reversed time. Memory
is linear in ``L``: the chunk-start states plus a few chunk-sized tensors. The forward alone is
differentiable too (double backward differentiates it).

Interface and layouts, shared with the C kernel (:mod:`.cpu`): ``u, delta, z`` and ``out`` are
``[batch, L, dim]`` (any strides), ``A: [dim, N]``, ``B, C: [batch, groups, N, L]``, ``D`` (the skip)
and ``delta_bias: [dim]``; states ``[batch, ceil(L / chunk), N, dim]`` (the state before each chunk),
last state ``[batch, N, dim]``; every tensor in the compute dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["backward", "forward"]


def _per_channel_chunk(Bg: torch.Tensor, t0: int, t1: int, dim: int) -> torch.Tensor:
    """``B[..., t0:t1]`` of ``[batch, groups, N, L]`` repeated over each group's channels: ``[batch, T, dim, N]``."""
    batch, groups, state, _ = Bg.shape
    x = Bg[..., t0:t1].permute(0, 3, 1, 2)[:, :, :, None, :]
    return x.expand(batch, t1 - t0, groups, dim // groups, state).reshape(batch, t1 - t0, dim, state)


def _linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All ``h_t = a_t h_{t-1} + x_t`` along dim 1 from ``h_{-1} = h0``: ``a, x [batch, T, ...]``.

    Hillis-Steele: after the step of shift ``s``, entry ``t`` holds the composition ``(a, x)`` of the
    ``2s`` steps ending at ``t``; composing with the entry ``s`` earlier doubles it.
    """
    s, T = 1, a.shape[1]
    while s < T:
        x = torch.cat([x[:, :s], a[:, s:] * x[:, :-s] + x[:, s:]], 1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1)
        s *= 2
    return x + a * h0[:, None]


def _pre(delta: torch.Tensor, delta_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return delta + delta_bias if delta_bias is not None else delta


def _chunk(dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
           D: Optional[torch.Tensor], h0: torch.Tensor, t0: int, t1: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``t0..t1-1`` from state ``h0``: ``exp(dt A)`` and the states ``[batch, T, dim, N]``, ``dt u``
    and the output before the gate ``y = <C, h> + D u`` ``[batch, T, dim]``."""
    dtc, uc = dt[:, t0:t1], u[:, t0:t1]
    dtu = dtc * uc
    a = torch.exp(dtc[..., None] * A)
    h = _linear_scan(a, dtu[..., None] * _per_channel_chunk(Bg, t0, t1, A.shape[0]), h0)
    y = (h * _per_channel_chunk(Cg, t0, t1, A.shape[0])).sum(-1)
    return a, h, dtu, (y + D * uc if D is not None else y)


def forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
            chunk: int, save_states: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``out [batch, L, dim]``, the last state ``[batch, N, dim]`` and, if ``save_states``, the state
    before every chunk ``[batch, ceil(L / chunk), N, dim]`` (layouts: module docstring)."""
    batch, length, dim = u.shape
    pre = _pre(delta, delta_bias)
    dt = F.softplus(pre) if softplus else pre
    h = u.new_zeros(batch, dim, A.shape[1])
    ys, states = [], []
    for t0 in range(0, length, chunk):
        t1 = min(t0 + chunk, length)
        states.append(h)
        _, hs, _, y = _chunk(dt, u, A, Bg, Cg, D, h, t0, t1)
        ys.append(y)
        h = hs[:, -1]
    y = torch.cat(ys, 1) if ys else u.new_zeros(batch, 0, dim)
    out = y * F.silu(z) if z is not None else y
    saved = torch.stack(states, 1).transpose(-1, -2) if save_states and states else None
    return out, h.transpose(-1, -2), saved


def backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
             D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
             states: torch.Tensor, dout: torch.Tensor, dlast: Optional[torch.Tensor], chunk: int
             ) -> tuple[torch.Tensor, ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` of :func:`forward`'s ``out``
    (cotangent ``dout``) and last state (``dlast [batch, N, dim]`` or ``None``); ``dB, dC`` as
    ``[batch, groups, N, L]``; those of absent inputs are ``None``."""
    batch, length, dim = u.shape
    groups, state = Bg.shape[1], A.shape[1]
    pre = _pre(delta, delta_bias)
    dt = F.softplus(pre) if softplus else pre
    ddt, du = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dA = torch.zeros_like(A)
    dD = torch.zeros_like(D) if D is not None else None
    dB, dC = Bg.new_empty(batch, groups, state, length), Cg.new_empty(batch, groups, state, length)
    # the gradient reaching the last state of the chunk being processed, from everything after it
    carry = dlast.transpose(-1, -2) if dlast is not None else u.new_zeros(batch, dim, state)
    starts = list(range(0, length, chunk))
    for c in reversed(range(len(starts))):
        t0 = starts[c]
        t1 = min(t0 + chunk, length)
        h0 = states[:, c].transpose(-1, -2)
        a, hs, dtu, y = _chunk(dt, u, A, Bg, Cg, D, h0, t0, t1)
        dy = dout[:, t0:t1]
        if z is not None:
            zc = z[:, t0:t1]
            sig = torch.sigmoid(zc)
            dz[:, t0:t1] = dy * y * sig * (1 + zc * (1 - sig))
            dy = dy * zc * sig
        h_prev = torch.cat([h0[:, None], hs[:, :-1]], 1)
        Bc, Cc = _per_channel_chunk(Bg, t0, t1, dim), _per_channel_chunk(Cg, t0, t1, dim)
        # lam_t = C_t dy_t + a_{t+1} lam_{t+1}: the same scan on reversed time, coefficients shifted by one
        a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], 1)
        lam = _linear_scan(a_next.flip(1), (dy[..., None] * Cc).flip(1), carry).flip(1)
        carry = a[:, 0] * lam[:, 0]
        g_a = lam * h_prev * a  # d(loss)/d(dt A) through exp(dt A) h_{t-1}
        lb = (lam * Bc).sum(-1)
        uc = u[:, t0:t1]
        ddt[:, t0:t1] = (g_a * A).sum(-1) + lb * uc
        du[:, t0:t1] = lb * dt[:, t0:t1] + (dy * D if D is not None else 0)
        dA += torch.einsum("btdn,btd->dn", g_a, dt[:, t0:t1])
        if D is not None:
            dD += (dy * uc).sum((0, 1))
        per_group = (batch, t1 - t0, groups, dim // groups, state)
        dB[..., t0:t1] = (lam * dtu[..., None]).reshape(per_group).sum(3).permute(0, 2, 3, 1)
        dC[..., t0:t1] = (hs * dy[..., None]).reshape(per_group).sum(3).permute(0, 2, 3, 1)
    ddelta = ddt * torch.sigmoid(pre) if softplus else ddt
    dbias = ddelta.sum((0, 1)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias
