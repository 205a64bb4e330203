"""A second, independent oracle for the "beyond NATTEN" features: plain Python loops over queries
and neighbourhood slots in float64, written from the window rules of the README's "Semantics" section
and its variable-resolution rule, without ``visattn.spec`` (so a bug there cannot hide in both).

Also: a helper that runs a call on a named backend, or, where the backend refuses the call, checks
that automatic selection routes it to one that serves it.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

import pytest
import torch

from visattn.backends import Problem, why_not
from visattn.spec import make_spec


def axis_neighbors(x: int, L: int, k: int, s: int, d: int, causal: bool) -> tuple[int, list[tuple[int, int, int]]]:
    """Neighbours of coordinate ``x`` along one axis: ``(k_eff, [(slot, key_coord, key_minus_query)])``.

    ``key_minus_query`` is in dilation-group positions (what the RPB table is indexed by).
    """
    if k > L:  # variable resolution: full attention along a short axis
        k, d = L, 1
    elif k * d > L:  # ... or the largest dilation that fits
        d = L // k
    s = min(s, k)
    g, p = x % d, x // d
    n = len(range(g, L, d))
    if causal:
        leader = min((p // s) * s + s - 1, n - 1)
        base = leader - k + 1
        keys = [t for t in range(base, base + k) if 0 <= t <= p]
    else:
        leader = min((p // s) * s + s // 2, n - 1)
        centre = max(min(leader, n - 1 - (k - 1 - k // 2)), k // 2)
        base = centre - k // 2
        keys = list(range(base, base + k))
    return k, [(t - base, g + d * t, t - p) for t in keys]


def axis_args(na: dict, rank: int) -> list[tuple[int, int, int, bool]]:
    """Per-axis ``(kernel, stride, dilation, causal)`` from keyword arguments given as ints or tuples."""
    def get(name, default, a):
        value = na.get(name, default)
        return value[a] if isinstance(value, (tuple, list)) else value

    return [(get("kernel_size", 1, a), get("stride", 1, a), get("dilation", 1, a), get("is_causal", False, a))
            for a in range(rank)]


def brute_force(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
                attn_bias=None, key_padding_mask=None):
    """``(out [B, *S, H, Dv], lse [B, *S, H], attn [B, *S, H, K])`` in float64, differentiable.

    Per-axis arguments are ints or tuples; ``k``/``v`` may have fewer heads (GQA).
    """
    B, S, H, D = q.shape[0], tuple(q.shape[1:-2]), q.shape[-2], q.shape[-1]
    r = len(S)
    tup = lambda a: tuple(a) if isinstance(a, (tuple, list)) else (a,) * r  # noqa: E731
    ks, st, dl, ca = tup(kernel_size), tup(stride), tup(dilation), tup(is_causal)
    G = H // k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    outs, lses, attns = [], [], []
    for b in range(B):
        for x in itertools.product(*(range(L) for L in S)):
            per_axis = [axis_neighbors(x[a], S[a], ks[a], st[a], dl[a], ca[a]) for a in range(r)]
            K = math.prod(ke for ke, _ in per_axis)
            slot_strides = [math.prod(ke for ke, _ in per_axis[a + 1:]) for a in range(r)]
            for h in range(H):
                logits, slots, values = [], [], []
                for combo in itertools.product(*(nb for _, nb in per_axis)):
                    slot = sum(c[0] * m for c, m in zip(combo, slot_strides))
                    coord = tuple(c[1] for c in combo)
                    if key_padding_mask is not None and bool(key_padding_mask[(b, *coord)]):
                        continue
                    z = (q[(b, *x, h)] * k[(b, *coord, h // G)]).sum() * scale
                    if rpb is not None:
                        z = z + rpb[(h, *(c[2] + rk - 1 for c, rk in zip(combo, ks)))].double()
                    if attn_bias is not None:
                        z = z + attn_bias[(b, *x, h, slot)].double()
                    logits.append(z)
                    slots.append(slot)
                    values.append(v[(b, *coord, h // G)])
                probs = torch.zeros(K, dtype=torch.float64)
                if logits and not all(torch.isneginf(z) for z in logits):
                    z = torch.stack(logits)
                    lse = torch.logsumexp(z, 0)
                    p = torch.exp(z - lse)
                    probs = probs.index_put((torch.tensor(slots),), p)
                    outs.append((p[:, None] * torch.stack(values)).sum(0))
                else:  # no key: zeros and -inf, as documented
                    lse = torch.tensor(float("-inf"), dtype=torch.float64)
                    outs.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                lses.append(lse)
                attns.append(probs)
    out = torch.stack(outs).reshape(B, *S, H, v.shape[-1])
    lse = torch.stack(lses).reshape(B, *S, H)
    attn = torch.stack(attns).reshape(B, *S, H, -1)
    return out, lse, attn


def problem_for(q, k, v, *, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, attn_bias=None,
                key_padding_mask=None, return_attn=False, requires_grad=True) -> Problem:
    """The :class:`Problem` the dispatcher builds for this call (to ask a backend ``why_not``)."""
    spec = make_spec("test", tuple(q.shape[1:-2]), kernel_size, stride, dilation, is_causal)
    return Problem(spec=spec, batch=q.shape[0], heads=q.shape[-2], heads_kv=k.shape[-2], dim=q.shape[-1],
                   dim_v=v.shape[-1], dtype=q.dtype, device=q.device, scale=q.shape[-1] ** -0.5,
                   requires_grad=requires_grad, has_rpb=rpb is not None, has_attn_bias=attn_bias is not None,
                   has_key_padding_mask=key_padding_mask is not None, return_attn=return_attn)


def on_backend(name: str, call: Callable[[Optional[str]], object], problem: Problem):
    """``call(name)`` if backend ``name`` serves ``problem``; otherwise check that forcing it raises
    a clear error and return ``call(None)`` (automatic selection must route around it)."""
    if why_not(name) is not None:
        pytest.skip(f"backend {name!r} is not usable here: {why_not(name)}")
    reason = why_not(name, problem)
    if reason is None:
        return call(name)
    with pytest.raises(ValueError, match="cannot serve this call"):
        call(name)
    return call(None)


def takes_float64(backend: str) -> bool:
    """Whether ``backend`` serves float64 CPU calls (float32-only kernels such as cpu_c do not)."""
    p = Problem(spec=make_spec("t", (4,), 3), batch=1, heads=1, heads_kv=1, dim=8, dim_v=8, dtype=torch.float64,
                device=torch.device("cpu"), scale=1.0)
    return why_not(backend, p) is None


def assert_concurrent_calls_identical(backend: str, q: torch.Tensor) -> None:
    """Three Python threads calling ``backend`` five times each get the single-threaded result."""
    import threading

    from visattn import neighborhood_attention

    want = neighborhood_attention(q, q, q, 3, backend=backend)
    got: list[torch.Tensor] = []

    def work() -> None:
        for _ in range(5):
            got.append(neighborhood_attention(q, q, q, 3, backend=backend))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 15 and all(torch.equal(g, want) for g in got)
