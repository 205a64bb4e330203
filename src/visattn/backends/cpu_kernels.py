"""numba kernels of the ``cpu`` backend: fused forward and backward of neighborhood attention.

Imported only by :mod:`visattn.backends.cpu_numba` once numba is known to be installed.

Every kernel sees a rank-3 problem (lower ranks get leading axes of length 1) in *group-major*
memory order: along an axis with dilation ``d`` the tokens are stored group by group, so a query's
keys are a contiguous run ``[lo[i], hi[i]]`` of memory indices on every axis and dilation never
appears in the kernels (the wrapper permutes once). Per-axis tables, all ``int64 [3, Lmax]``:

* ``lo, hi``: the key run of query ``i``; ``rof``: ``key - rof[i]`` indexes the bias table;
* ``qlo, qhi``: the queries whose run contains key ``j`` (windows move monotonically, so this is a
  contiguous run too); used by the key-centric dK/dV pass, which is therefore race-free.

Tensors are heads-last and contiguous: ``q [B, L0, L1, L2, H, D]``, ``k [.., Hk, D]``,
``v [.., Hk, Dv]``, ``lse/delta [B, L0, L1, L2, H]``, ``rpb [H, R0, R1, R2]``. Query head ``h`` uses
kv head ``h // (H // Hk)`` (GQA natively).

Speed comes from (1) a query block: ``QB`` consecutive queries along the last axis share their key
rows on the other axes, so each key row is streamed once per block while it is hot in L1; (2)
scores of a block are kept in a small scratch tile, never a full ``[N, K]`` matrix; (3) the
exponentials are evaluated as a vectorizable polynomial (numba has no vector ``exp`` without
Intel's SVML) for float32, and with ``math.exp`` for float64, whose tolerance is 1e-10.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: 2**n for n = -126..0: the exponent part of the float32 polynomial exp (a gather, vectorizes).
POW2_F32 = np.ldexp(np.float32(1.0), np.arange(-126, 1)).astype(np.float32)
# float32 constants: a Python float would promote the whole vectorized loop to float64.
_LN2 = np.float32(math.log(2.0))
_LOG2E = np.float32(1.0 / math.log(2.0))
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_C2, _C3, _C4, _C5, _C6 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 7))
# Scores this far below the row max give exp(x) < 1.2e-38 and are flushed to the smallest normal
# float32, which also keeps the table index in range.
_XMIN32 = np.float32(-87.0)

_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=None)


@njit(inline="always", **_OPTS)
def _exp_rows(buf, n, shift, fast, pow2, zero):
    """``buf[:n] = exp(buf[:n] - shift)``; returns the sum. ``fast``: the float32 polynomial path
    (``pow2 = POW2_F32``), else ``math.exp`` (exact enough for float64)."""
    total = zero
    if fast:
        for j in range(n):
            x = max(buf[j] - shift, _XMIN32)
            e = np.floor(x * _LOG2E + _HALF)
            r = x - e * _LN2
            # Taylor to degree 6 on |r| <= ln2/2: relative error < 2e-7 (float32 epsilon 1.2e-7).
            p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
            y = p * pow2[np.int32(e) + 126]
            buf[j] = y
            total += y
    else:
        for j in range(n):
            y = math.exp(buf[j] - shift)
            buf[j] = y
            total += y
    return total


@njit(parallel=True, **_OPTS)
def forward(q, k, v, rpb, has_rpb, scale, zero, lo, hi, rof, qblock, fast, pow2, out, lse):
    """Fused forward: ``out [B, L0, L1, L2, H, Dv]`` and ``lse [B, L0, L1, L2, H]`` (written)."""
    B, L0, L1, L2, H, D = q.shape
    Hk = k.shape[4]
    Dv = v.shape[5]
    G = H // Hk
    nblk = (L2 + qblock - 1) // qblock
    items = B * L0 * L1 * nblk * H
    # Widest key run per axis: the size of one query's score row.
    w0 = 1
    w1 = 1
    w2 = 1
    for i in range(L0):
        w0 = max(w0, hi[0, i] - lo[0, i] + 1)
    for i in range(L1):
        w1 = max(w1, hi[1, i] - lo[1, i] + 1)
    for i in range(L2):
        w2 = max(w2, hi[2, i] - lo[2, i] + 1)
    kmax = w0 * w1 * w2
    for item in prange(items):
        h = item % H
        rest = item // H
        blk = rest % nblk
        rest //= nblk
        x1 = rest % L1
        rest //= L1
        x0 = rest % L0
        b = rest // L0
        hk = h // G
        s = np.empty((qblock, kmax), dtype=q.dtype)
        acc = np.empty(Dv, dtype=q.dtype)
        qv = np.empty(D, dtype=q.dtype)
        xa = blk * qblock
        xb = min(xa + qblock, L2)
        # Scores of the whole block, key row by key row: a row k[b, a0, a1, :, hk] is read once
        # per block and reused by every query in it while it sits in L1.
        for x2 in range(xa, xb):
            qi = x2 - xa
            for d in range(D):
                qv[d] = q[b, x0, x1, x2, h, d] * scale
            n = 0
            for a0 in range(lo[0, x0], hi[0, x0] + 1):
                for a1 in range(lo[1, x1], hi[1, x1] + 1):
                    for a2 in range(lo[2, x2], hi[2, x2] + 1):
                        acc0 = zero
                        for d in range(D):
                            acc0 += qv[d] * k[b, a0, a1, a2, hk, d]
                        if has_rpb:
                            acc0 += rpb[h, a0 - rof[0, x0], a1 - rof[1, x1], a2 - rof[2, x2]]
                        s[qi, n] = acc0
                        n += 1
            m = s[qi, 0]
            for j in range(1, n):
                m = max(m, s[qi, j])
            total = _exp_rows(s[qi], n, m, fast, pow2, zero)
            for d in range(Dv):
                acc[d] = zero
            n = 0
            for a0 in range(lo[0, x0], hi[0, x0] + 1):
                for a1 in range(lo[1, x1], hi[1, x1] + 1):
                    for a2 in range(lo[2, x2], hi[2, x2] + 1):
                        p = s[qi, n]
                        for d in range(Dv):
                            acc[d] += p * v[b, a0, a1, a2, hk, d]
                        n += 1
            inv = _ONE / total
            for d in range(Dv):
                out[b, x0, x1, x2, h, d] = acc[d] * inv
            lse[b, x0, x1, x2, h] = m + math.log(total)


@njit(parallel=True, **_OPTS)
def backward_dq(q, k, v, rpb, has_rpb, scale, zero, lo, hi, rof, lse, delta, dout, fast, pow2, nchunks, dq, drpb):
    """Query-centric pass: ``dq`` (written) and, per chunk of work, ``drpb [nchunks, H, R0, R1, R2]``.

    ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dLSE`` (so gradients flowing into
    the LSE, e.g. from the extra-KV merge, are included).
    """
    B, L0, L1, L2, H, D = q.shape
    Hk = k.shape[4]
    Dv = v.shape[5]
    G = H // Hk
    items = B * L0 * L1 * H
    w = 1
    for a in range(3):
        wa = 1
        for i in range(lo.shape[1]):
            wa = max(wa, hi[a, i] - lo[a, i] + 1)
        w *= wa
    per = (items + nchunks - 1) // nchunks
    for c in prange(nchunks):
        s = np.empty(w, dtype=q.dtype)
        qv = np.empty(D, dtype=q.dtype)
        dov = np.empty(Dv, dtype=q.dtype)
        acc = np.empty(D, dtype=q.dtype)
        for item in range(c * per, min(items, (c + 1) * per)):
            h = item % H
            rest = item // H
            x1 = rest % L1
            rest //= L1
            x0 = rest % L0
            b = rest // L0
            hk = h // G
            for x2 in range(L2):
                for d in range(D):
                    qv[d] = q[b, x0, x1, x2, h, d] * scale
                for d in range(Dv):
                    dov[d] = dout[b, x0, x1, x2, h, d]
                n = 0
                for a0 in range(lo[0, x0], hi[0, x0] + 1):
                    for a1 in range(lo[1, x1], hi[1, x1] + 1):
                        for a2 in range(lo[2, x2], hi[2, x2] + 1):
                            t = zero
                            for d in range(D):
                                t += qv[d] * k[b, a0, a1, a2, hk, d]
                            if has_rpb:
                                t += rpb[h, a0 - rof[0, x0], a1 - rof[1, x1], a2 - rof[2, x2]]
                            s[n] = t
                            n += 1
                _exp_rows(s, n, lse[b, x0, x1, x2, h], fast, pow2, zero)
                dl = delta[b, x0, x1, x2, h]
                for d in range(D):
                    acc[d] = zero
                n = 0
                for a0 in range(lo[0, x0], hi[0, x0] + 1):
                    for a1 in range(lo[1, x1], hi[1, x1] + 1):
                        for a2 in range(lo[2, x2], hi[2, x2] + 1):
                            dp = zero
                            for d in range(Dv):
                                dp += dov[d] * v[b, a0, a1, a2, hk, d]
                            ds = s[n] * (dp - dl)
                            for d in range(D):
                                acc[d] += ds * k[b, a0, a1, a2, hk, d]
                            if has_rpb:
                                drpb[c, h, a0 - rof[0, x0], a1 - rof[1, x1], a2 - rof[2, x2]] += ds
                            n += 1
                for d in range(D):
                    dq[b, x0, x1, x2, h, d] = acc[d] * scale


@njit(parallel=True, **_OPTS)
def backward_dkv(q, k, v, rpb, has_rpb, scale, zero, rof, qlo, qhi, lse, delta, dout, fast, pow2, dk, dv):
    """Key-centric pass: every key gathers from the queries that see it, so ``dk``/``dv`` (written)
    need no atomics. Loops over the query heads of a kv head (GQA) inside."""
    B, L0, L1, L2, H, D = q.shape
    Hk = k.shape[4]
    Dv = v.shape[5]
    G = H // Hk
    items = B * L0 * L1 * Hk
    w = 1
    for a in range(3):
        wa = 1
        for i in range(qlo.shape[1]):
            wa = max(wa, qhi[a, i] - qlo[a, i] + 1)
        w *= wa
    for item in prange(items):
        hk = item % Hk
        rest = item // Hk
        y1 = rest % L1
        rest //= L1
        y0 = rest % L0
        b = rest // L0
        s = np.empty(w, dtype=q.dtype)
        kv = np.empty(D, dtype=q.dtype)
        vv = np.empty(Dv, dtype=q.dtype)
        ak = np.empty(D, dtype=q.dtype)
        av = np.empty(Dv, dtype=q.dtype)
        for y2 in range(L2):
            for d in range(D):
                kv[d] = k[b, y0, y1, y2, hk, d] * scale
                ak[d] = zero
            for d in range(Dv):
                vv[d] = v[b, y0, y1, y2, hk, d]
                av[d] = zero
            for h in range(hk * G, hk * G + G):
                n = 0
                for x0 in range(qlo[0, y0], qhi[0, y0] + 1):
                    for x1 in range(qlo[1, y1], qhi[1, y1] + 1):
                        for x2 in range(qlo[2, y2], qhi[2, y2] + 1):
                            t = zero
                            for d in range(D):
                                t += kv[d] * q[b, x0, x1, x2, h, d]
                            if has_rpb:
                                t += rpb[h, y0 - rof[0, x0], y1 - rof[1, x1], y2 - rof[2, x2]]
                            s[n] = t - lse[b, x0, x1, x2, h]
                            n += 1
                _exp_rows(s, n, zero, fast, pow2, zero)
                n = 0
                for x0 in range(qlo[0, y0], qhi[0, y0] + 1):
                    for x1 in range(qlo[1, y1], qhi[1, y1] + 1):
                        for x2 in range(qlo[2, y2], qhi[2, y2] + 1):
                            p = s[n]
                            dp = zero
                            for d in range(Dv):
                                g = dout[b, x0, x1, x2, h, d]
                                dp += g * vv[d]
                                av[d] += p * g
                            ds = p * (dp - delta[b, x0, x1, x2, h])
                            for d in range(D):
                                ak[d] += ds * q[b, x0, x1, x2, h, d]
                            n += 1
            for d in range(D):
                dk[b, y0, y1, y2, hk, d] = ak[d] * scale
            for d in range(Dv):
                dv[b, y0, y1, y2, hk, d] = av[d]
