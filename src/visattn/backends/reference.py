"""The oracle: explicit neighbour lists from :func:`visattn.spec.neighbor_table` and a masked softmax.

Deliberately naive (memory ``O(tokens * K * H * D)``) so that it can be read in a minute; every
other backend is tested against it. Works in float64; half inputs are computed in float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..spec import neighbor_table
from .base import Backend, Extras, Problem, Result, lse_dtype


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis where ``mask`` is True; rows with no True give zeros and -inf LSE.

    Written so that gradients stay finite on empty rows (no ``exp(-inf - -inf)``).
    """
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.where(mask, torch.exp(logits - safe.unsqueeze(-1)), torch.zeros_like(logits))
    return probs, lse


class ReferenceBackend(Backend):
    name = "reference"
    description = "brute-force oracle: explicit neighbour indices, any device, float64"
    supports_gqa = True

    def priority(self, p: Problem) -> float:
        # Only chosen automatically when nothing else accepts the call.
        return -100.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, extras: Extras) -> Result:
        spec = p.spec
        B, N, Nk, H, G = p.batch, spec.num_tokens, spec.num_keys, p.heads, p.heads // p.heads_kv
        index, valid, rel = (t.to(q.device) for t in neighbor_table(spec))
        K = index.shape[1]
        cdt = lse_dtype(q.dtype)
        qf = q.reshape(B, N, H, p.dim).to(cdt)
        # Repeat k/v heads for GQA: query head h uses kv head h // G.
        kf = k.reshape(B, Nk, p.heads_kv, p.dim).to(cdt).repeat_interleave(G, dim=2)
        vf = v.reshape(B, Nk, p.heads_kv, p.dim_v).to(cdt).repeat_interleave(G, dim=2)
        kn, vn = kf[:, index], vf[:, index]  # [B, N, K, H, D]
        logits = torch.einsum("bnhd,bnkhd->bnhk", qf, kn) * p.scale
        if extras.rpb is not None:
            logits = logits + extras.rpb.to(cdt).reshape(H, -1)[:, rel].permute(1, 0, 2)
        if extras.attn_bias is not None:
            logits = logits + extras.attn_bias.to(cdt).reshape(B, N, H, K)
        mask = valid[None, :, None, :]
        if extras.key_padding_mask is not None:
            keep = ~extras.key_padding_mask.reshape(B, Nk)[:, index]  # [B, N, K]
            mask = mask & keep[:, :, None, :]
        probs, lse = masked_softmax(logits, mask.expand_as(logits))
        out = torch.einsum("bnhk,bnkhd->bnhd", probs, vn)
        S = spec.spatial
        attn: Optional[torch.Tensor] = probs.reshape(B, *S, H, K).to(q.dtype) if p.return_attn else None
        return Result(out.reshape(B, *S, H, p.dim_v).to(q.dtype), lse.reshape(B, *S, H), attn)
