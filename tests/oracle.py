"""Test-side helpers on top of the reference backend: an independent extra-KV oracle (concatenating
the extra tokens to each neighbourhood, one softmax) and tolerance tables."""

from __future__ import annotations

import torch

from visattn.bench.problem import GRAD_TOLERANCE, TOLERANCE
from visattn.spec import make_spec, neighbor_table

# (atol, rtol) per dtype, for outputs/LSE and for gradients; one table shared with `visattn bench`.
TOL, GRAD_TOL = TOLERANCE, GRAD_TOLERANCE


def oracle(q, k, v, extra_k=None, extra_v=None, *, kernel_size, stride, dilation, is_causal, scale=None):
    """Neighbourhood (from spec.neighbor_table) plus extra tokens, one softmax, in float64.

    Returns ``out [B, *S, H, Dv]`` and ``lse [B, *S, H]``; independent of the library's merge path.
    """
    B, S, H, D = q.shape[0], tuple(q.shape[1:-2]), q.shape[-2], q.shape[-1]
    spec = make_spec("oracle", S, kernel_size, stride, dilation, is_causal)
    index, valid, _ = neighbor_table(spec)
    G = H // k.shape[-2]
    f = lambda t: t.double().reshape(B, -1, t.shape[-2], t.shape[-1]).repeat_interleave(G, dim=2)  # noqa: E731
    qf, kf, vf = q.double().reshape(B, -1, H, D), f(k), f(v)
    kn, vn = kf[:, index], vf[:, index]  # [B, N, K, H, D]
    scale = D ** -0.5 if scale is None else scale
    logits = torch.einsum("bnhd,bnkhd->bnhk", qf, kn) * scale
    logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
    values = vn.permute(0, 1, 3, 2, 4)  # [B, N, H, K, Dv]
    if extra_k is not None:
        ek = extra_k.double().repeat_interleave(G, dim=2)
        ev = extra_v.double().repeat_interleave(G, dim=2)
        logits = torch.cat([logits, torch.einsum("bnhd,bmhd->bnhm", qf, ek) * scale], dim=-1)
        values = torch.cat([values, ev.permute(0, 2, 1, 3)[:, None].expand(-1, values.shape[1], -1, -1, -1)], dim=3)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bnhk,bnhkd->bnhd", torch.softmax(logits, dim=-1), values)
    return out.reshape(B, *S, H, -1), lse.reshape(B, *S, H)
