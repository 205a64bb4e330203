"""Test-side helpers on top of the reference backend: an independent extra-KV oracle (concatenating
the extra tokens to each neighbourhood, one softmax) and tolerance tables."""

from __future__ import annotations

import torch

from visattn.spec import make_spec, neighbor_table

# (atol, rtol) per dtype, for outputs/LSE and for gradients; not tuned per case.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


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
