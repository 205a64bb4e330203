"""numba kernels of the ``cpu`` backend: fused forward and backward of neighborhood attention.

Imported only by :mod:`visattn.backends.cpu_numba` once numba is known to be installed.

Every kernel sees a rank-3 problem (lower ranks get leading axes of length 1) and walks each axis
in *group-major* order: along an axis with dilation ``d`` the indices ``i`` enumerate dilation
group 0, then group 1, ..., and ``pos[i]`` is the coordinate they stand for. A query's keys are then
a contiguous run ``[lo[i], hi[i]]`` of indices on every axis and dilation never appears in the
loops; tensors stay in their own layout (no permuted copies). Per-axis tables, ``int64 [3, Lmax]``:

* ``pos``: coordinate of index ``i``; ``lo, hi``: the key run of query index ``i``;
  ``rof``: ``key index - rof[i]`` indexes the bias table;
* ``qlo, qhi``: the queries whose run contains key ``j`` (windows move monotonically, so this is a
  contiguous run too); used by the key-centric dK/dV pass, which is therefore race-free.

Tensors are the contiguous heads-last ``[B, L0, L1, L2, H, D]`` ones viewed as 2-D arrays of rows
(``q [T*H, D]``, ``k [T*Hk, D]``, ``v [T*Hk, Dv]``, ``lse/delta [T*H]``, ``T = B*L0*L1*L2``), plus
``rpb [H, R0, R1, R2]``. Query head ``h`` uses kv head ``h // (H // Hk)`` (GQA natively).

Speed comes from (1) inner loops that are plain contiguous ``D``-vectors (rows of 2-D arrays,
indexed without creating views, which would cost atomic reference counts per key), each over
eight (then four, then one) keys or queries at once, taken from one index list that flattens all
the rows of a window (:func:`_dots`, :func:`_axpys`): a loop over only 32 features otherwise spends
most of its time on set-up (vector prologue, alias check, horizontal reduction), now paid once per
eight keys, and the shared row or accumulator is loaded once per eight (1.0-1.4x forward, 1.1-1.3x
forward+backward, measured on one core); (2) scores of a
query kept in a small scratch row, never a ``[N, K]`` matrix; (3) exponentials evaluated as a
vectorizable polynomial for float32 (numba has no vector ``exp`` without Intel's SVML), and with
``math.exp`` for float64, whose parity tolerance is 1e-10.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# float32 constants: a Python float would promote the whole vectorized loop to float64.
_LN2 = np.float32(math.log(2.0))
_LOG2E = np.float32(1.0 / math.log(2.0))
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_C2, _C3, _C4, _C5, _C6 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 7))
_BIAS = np.int32(127)
# Scores this far below the row max give exp(x) < 1.2e-38 and are flushed to the smallest normal
# float32, which also keeps the exponent bits in range.
_XMIN32 = np.float32(-87.0)

_OPTS = dict(cache=True, nogil=True, fastmath=True, boundscheck=None)


@njit(inline="always", **_OPTS)
def _exp_rows(buf, ibuf, n, shift, fast, zero):
    """``buf[:n] = exp(buf[:n] - shift)``; returns the sum.

    ``fast`` (float32): ``exp(x) = 2**e * exp(r)`` with a degree-6 polynomial for ``exp(r)`` and
    ``2**e`` built from its IEEE bits in the int32 scratch ``ibuf``; both loops vectorize, where a
    per-element ``expf`` call (LLVM cannot vectorize it without SVML) took half of the forward's
    time. Relative error < 2e-7. Otherwise ``math.exp``, exact enough for float64.
    """
    total = zero
    if fast:
        bits_as_float = ibuf.view(np.float32)
        for j in range(n):
            x = max(buf[j] - shift, _XMIN32)
            e = np.floor(x * _LOG2E + _HALF)
            r = x - e * _LN2
            buf[j] = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
            ibuf[j] = (np.int32(e) + _BIAS) << 23
        for j in range(n):
            y = buf[j] * bits_as_float[j]
            buf[j] = y
            total += y
    else:
        for j in range(n):
            y = math.exp(buf[j] - shift)
            buf[j] = y
            total += y
    return total


# The helpers index rows of 2-D arrays instead of taking row views: a view costs two atomic
# reference-count updates on the parent array, which also bounce its cache line between threads.
@njit(inline="always", **_OPTS)
def _dot(a, i, b, j, n, zero):
    """``a[i, :n] . b[j, :n]``."""
    t = zero
    for d in range(n):
        t += a[i, d] * b[j, d]
    return t


@njit(inline="always", **_OPTS)
def _axpy(alpha, x, i, y, n):
    """``y[:n] += alpha * x[i, :n]``."""
    for d in range(n):
        y[d] += alpha * x[i, d]


@njit(inline="always", **_OPTS)
def _dot4(a, i, b, j0, j1, j2, j3, n, zero):
    """``a[i, :n] . b[j, :n]`` for four rows ``j`` of ``b`` in one pass: ``a``'s row is loaded once
    per four keys and the loop's set-up is paid once, where four :func:`_dot` calls pay it 4x."""
    t0 = t1 = t2 = t3 = zero
    for d in range(n):
        x = a[i, d]
        t0 += x * b[j0, d]
        t1 += x * b[j1, d]
        t2 += x * b[j2, d]
        t3 += x * b[j3, d]
    return t0, t1, t2, t3


@njit(inline="always", **_OPTS)
def _axpy4(p0, p1, p2, p3, x, i0, i1, i2, i3, y, n):
    """``y[:n] += sum_k p_k * x[i_k, :n]`` over four rows: one load and store of ``y`` per four
    FMAs, and one alias check (``y`` vs ``x``) instead of four."""
    for d in range(n):
        y[d] += p0 * x[i0, d] + p1 * x[i1, d] + p2 * x[i2, d] + p3 * x[i3, d]


@njit(inline="always", **_OPTS)
def _dot8(a, i, b, j0, j1, j2, j3, j4, j5, j6, j7, n, zero):
    """:func:`_dot4` for eight rows of ``b``."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = zero
    for d in range(n):
        x = a[i, d]
        t0 += x * b[j0, d]
        t1 += x * b[j1, d]
        t2 += x * b[j2, d]
        t3 += x * b[j3, d]
        t4 += x * b[j4, d]
        t5 += x * b[j5, d]
        t6 += x * b[j6, d]
        t7 += x * b[j7, d]
    return t0, t1, t2, t3, t4, t5, t6, t7


@njit(inline="always", **_OPTS)
def _axpy8(p, j, x, idx, y, n):
    """:func:`_axpy4` for the eight rows ``idx[j:j+8]`` of ``x`` with weights ``p[j:j+8]``."""
    p0, p1, p2, p3, p4, p5, p6, p7 = p[j], p[j + 1], p[j + 2], p[j + 3], p[j + 4], p[j + 5], p[j + 6], p[j + 7]
    i0, i1, i2, i3, i4, i5, i6, i7 = idx[j], idx[j + 1], idx[j + 2], idx[j + 3], idx[j + 4], idx[j + 5], idx[j + 6], idx[j + 7]
    for d in range(n):
        y[d] += (p0 * x[i0, d] + p1 * x[i1, d] + p2 * x[i2, d] + p3 * x[i3, d]
                 + p4 * x[i4, d] + p5 * x[i5, d] + p6 * x[i6, d] + p7 * x[i7, d])


@njit(inline="always", **_OPTS)
def _dots(a, i, b, idx, n, out, zero):
    """``out[j] = a[i, :] . b[idx[j], :]`` for ``j < n``: eight rows per pass, then four, then one."""
    D = a.shape[1]
    # eight running vector sums of D > 32 features spill registers: four rows per pass then
    n8 = n - n % 8 if D <= 32 else 0
    n4 = n - n % 4
    for j in range(0, n8, 8):
        out[j], out[j + 1], out[j + 2], out[j + 3], out[j + 4], out[j + 5], out[j + 6], out[j + 7] = _dot8(
            a, i, b, idx[j], idx[j + 1], idx[j + 2], idx[j + 3], idx[j + 4], idx[j + 5], idx[j + 6], idx[j + 7], D, zero)
    for j in range(n8, n4, 4):
        out[j], out[j + 1], out[j + 2], out[j + 3] = _dot4(a, i, b, idx[j], idx[j + 1], idx[j + 2], idx[j + 3], D, zero)
    for j in range(n4, n):
        out[j] = _dot(a, i, b, idx[j], D, zero)


@njit(inline="always", **_OPTS)
def _axpys(p, x, idx, n, y):
    """``y[:] += sum_j p[j] * x[idx[j], :]`` for ``j < n``: eight rows per pass, then four, then one."""
    C = y.shape[0]
    n8 = n - n % 8
    n4 = n - n % 4
    for j in range(0, n8, 8):
        _axpy8(p, j, x, idx, y, C)
    for j in range(n8, n4, 4):
        _axpy4(p[j], p[j + 1], p[j + 2], p[j + 3], x, idx[j], idx[j + 1], idx[j + 2], idx[j + 3], y, C)
    for j in range(n4, n):
        _axpy(p[j], x, idx[j], y, C)


@njit(inline="always", **_OPTS)
def _key_rows(b, x0, x1, x2, dims, heads, head, pos, lo, hi, idx):
    """Fills ``idx`` with the rows (of a ``[T*heads, .]`` array, head ``head``) of the tokens in
    the window ``[lo, hi]`` of index ``(x0, x1, x2)`` on each axis, in (a0, a1, a2) order; returns
    how many. ``dims = (L0, L1, L2)``."""
    L0, L1, L2 = dims
    n = 0
    for a0 in range(lo[0, x0], hi[0, x0] + 1):
        for a1 in range(lo[1, x1], hi[1, x1] + 1):
            row0 = ((b * L0 + pos[0, a0]) * L1 + pos[1, a1]) * L2 * heads + head
            for a2 in range(lo[2, x2], hi[2, x2] + 1):
                idx[n] = row0 + pos[2, a2] * heads
                n += 1
    return n


@njit(inline="always", **_OPTS)
def _add_bias(s, rpb, h, x0, x1, x2, lo, hi, rof):
    """``s[j] += rpb[h, offset of key j]`` over the keys of query index ``(x0, x1, x2)``, in
    :func:`_key_rows` order."""
    j = 0
    for a0 in range(lo[0, x0], hi[0, x0] + 1):
        for a1 in range(lo[1, x1], hi[1, x1] + 1):
            for a2 in range(lo[2, x2], hi[2, x2] + 1):
                s[j] += rpb[h, a0 - rof[0, x0], a1 - rof[1, x1], a2 - rof[2, x2]]
                j += 1


@njit(inline="always", **_OPTS)
def _widest(lo, hi):
    """Product over the 3 axes of the longest run ``hi - lo + 1``: a score row's capacity."""
    w = 1
    for a in range(3):
        wa = 1
        for i in range(lo.shape[1]):
            wa = max(wa, hi[a, i] - lo[a, i] + 1)
        w *= wa
    return w


@njit(inline="always", **_OPTS)
def _query_logits(q, k, rpb, has_rpb, scale, zero, b, x0, x1, x2, dims, H, Hk, h, hk, pos, lo, hi, rof, idx, s):
    """Scaled (and biased) logits of query ``(b, x0, x1, x2)``, head ``h``, against its keys.

    Writes the key rows to ``idx[:n]`` (all key rows of the window in one list, so that the dot
    products and the AV update go eight keys per pass across rows) and the logits to ``s[:n]``;
    returns ``(row, n)`` with ``row`` the query's row in ``q``. Shared by the forward and the dQ pass.
    """
    L0, L1, L2 = dims
    row = (((b * L0 + pos[0, x0]) * L1 + pos[1, x1]) * L2 + pos[2, x2]) * H + h
    n = _key_rows(b, x0, x1, x2, dims, Hk, hk, pos, lo, hi, idx)
    _dots(q, row, k, idx, n, s, zero)
    for j in range(n):
        s[j] *= scale
    if has_rpb:
        _add_bias(s, rpb, h, x0, x1, x2, lo, hi, rof)
    return row, n


@njit(inline="always", **_OPTS)
def _work_item(item, heads, nblk, L1, L0):
    """Unravel a work-item index into ``(batch, i0, i1, block, head)`` (head fastest, as the
    kernels enumerate them: neighbouring items share keys, which stay in cache)."""
    head = item % heads
    rest = item // heads
    blk = rest % nblk
    rest //= nblk
    i1 = rest % L1
    rest //= L1
    return rest // L0, rest % L0, i1, blk, head


@njit(parallel=True, **_OPTS)
def forward(q, k, v, shape, rpb, has_rpb, scale, zero, pos, lo, hi, rof, qblock, fast, out, lse):
    """Fused forward: writes ``out [T*H, Dv]`` and ``lse [T*H]``.

    ``q [T*H, D]``, ``k [T*Hk, D]``, ``v [T*Hk, Dv]`` are the heads-last tensors flattened to rows
    (``T = B*L0*L1*L2`` tokens; row of token ``t``, head ``h`` is ``t*H + h``); flat rows make the
    inner loops plain contiguous vectors. ``shape = (B, L0, L1, L2, H, Hk)``.
    One work item is ``qblock`` consecutive queries of one head along the last axis; a query's
    scores live in a scratch row of ``prod(kernel)`` entries, never in a ``[N, K]`` matrix.
    """
    B, L0, L1, L2, H, Hk = shape
    Dv = v.shape[1]
    G = H // Hk
    nblk = (L2 + qblock - 1) // qblock
    items = B * L0 * L1 * nblk * H
    kmax = _widest(lo, hi)
    for item in prange(items):
        b, x0, x1, blk, h = _work_item(item, H, nblk, L1, L0)
        hk = h // G
        s = np.empty(kmax, dtype=q.dtype)
        ibuf = np.empty(kmax, dtype=np.int32)
        kidx = np.empty(kmax, dtype=np.int64)
        acc = np.empty(Dv, dtype=q.dtype)
        for x2 in range(blk * qblock, min((blk + 1) * qblock, L2)):
            row, n = _query_logits(q, k, rpb, has_rpb, scale, zero, b, x0, x1, x2, (L0, L1, L2), H, Hk, h, hk,
                                   pos, lo, hi, rof, kidx, s)
            m = s[0]
            for j in range(1, n):
                m = max(m, s[j])
            total = _exp_rows(s, ibuf, n, m, fast, zero)
            for d in range(Dv):
                acc[d] = zero
            _axpys(s, v, kidx, n, acc)
            inv = _ONE / total
            for d in range(Dv):
                out[row, d] = acc[d] * inv
            lse[row] = m + math.log(total)


@njit(parallel=True, **_OPTS)
def backward_dq(q, k, v, shape, rpb, has_rpb, scale, zero, pos, lo, hi, rof, out, lse, dlse, has_dlse, dout, fast,
                qblock, nchunks, delta, dq, drpb):
    """Query-centric pass: writes ``dq [T*H, D]`` and accumulates ``drpb [nchunks, H, R0, R1, R2]``
    per chunk of work (the caller sums the chunks, so no two threads add to the same entry).

    Layouts as in :func:`forward`; ``lse, dlse [T*H]``, ``out, dout [T*H, Dv]``.
    ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dLSE``, so gradients flowing into
    the LSE (e.g. from the extra-KV merge) are included; ``delta [T*H]`` is written for
    :func:`backward_dkv`, which must run after this pass.
    """
    B, L0, L1, L2, H, Hk = shape
    D = q.shape[1]
    Dv = v.shape[1]
    G = H // Hk
    nblk = (L2 + qblock - 1) // qblock
    items = B * L0 * L1 * nblk * H
    kmax = _widest(lo, hi)
    per = (items + nchunks - 1) // nchunks
    for c in prange(nchunks):
        s = np.empty(kmax, dtype=q.dtype)
        dp = np.empty(kmax, dtype=q.dtype)
        ibuf = np.empty(kmax, dtype=np.int32)
        kidx = np.empty(kmax, dtype=np.int64)
        acc = np.empty(D, dtype=q.dtype)
        for item in range(c * per, min(items, (c + 1) * per)):
            b, x0, x1, blk, h = _work_item(item, H, nblk, L1, L0)
            hk = h // G
            for x2 in range(blk * qblock, min((blk + 1) * qblock, L2)):
                row, n = _query_logits(q, k, rpb, has_rpb, scale, zero, b, x0, x1, x2, (L0, L1, L2), H, Hk, h,
                                       hk, pos, lo, hi, rof, kidx, s)
                _exp_rows(s, ibuf, n, lse[row], fast, zero)
                dl = _dot(dout, row, out, row, Dv, zero)
                if has_dlse:
                    dl -= dlse[row]
                delta[row] = dl
                _dots(dout, row, v, kidx, n, dp, zero)
                for j in range(n):
                    dp[j] = s[j] * (dp[j] - dl)  # dS
                for d in range(D):
                    acc[d] = zero
                _axpys(dp, k, kidx, n, acc)
                if has_rpb:
                    j = 0
                    for a0 in range(lo[0, x0], hi[0, x0] + 1):
                        for a1 in range(lo[1, x1], hi[1, x1] + 1):
                            for a2 in range(lo[2, x2], hi[2, x2] + 1):
                                drpb[c, h, a0 - rof[0, x0], a1 - rof[1, x1], a2 - rof[2, x2]] += dp[j]
                                j += 1
                for d in range(D):
                    dq[row, d] = acc[d] * scale


@njit(parallel=True, **_OPTS)
def backward_dkv(q, k, v, shape, rpb, has_rpb, scale, zero, pos, rof, qlo, qhi, lse, delta, dout, fast, qblock, dk, dv):
    """Key-centric pass: every key gathers from the queries that see it, so ``dk [T*Hk, D]`` and
    ``dv [T*Hk, Dv]`` (written) need no atomics and no per-thread copies. The query heads of a kv
    head (GQA) are summed inside. Layouts as in :func:`backward_dq`."""
    B, L0, L1, L2, H, Hk = shape
    D = q.shape[1]
    Dv = v.shape[1]
    G = H // Hk
    nblk = (L2 + qblock - 1) // qblock
    items = B * L0 * L1 * nblk * Hk
    qmax = _widest(qlo, qhi)
    for item in prange(items):
        b, y0, y1, blk, hk = _work_item(item, Hk, nblk, L1, L0)
        s = np.empty(qmax, dtype=q.dtype)
        dp = np.empty(qmax, dtype=q.dtype)
        ibuf = np.empty(qmax, dtype=np.int32)
        qidx = np.empty(qmax, dtype=np.int64)
        ak = np.empty(D, dtype=q.dtype)
        av = np.empty(Dv, dtype=q.dtype)
        for y2 in range(blk * qblock, min((blk + 1) * qblock, L2)):
            kr = (((b * L0 + pos[0, y0]) * L1 + pos[1, y1]) * L2 + pos[2, y2]) * Hk + hk
            for d in range(D):
                ak[d] = zero
            for d in range(Dv):
                av[d] = zero
            for h in range(hk * G, hk * G + G):
                n = _key_rows(b, y0, y1, y2, (L0, L1, L2), H, h, pos, qlo, qhi, qidx)  # the queries seeing kr
                _dots(k, kr, q, qidx, n, s, zero)
                for j in range(n):
                    s[j] = s[j] * scale - lse[qidx[j]]
                if has_rpb:
                    j = 0
                    for x0 in range(qlo[0, y0], qhi[0, y0] + 1):
                        for x1 in range(qlo[1, y1], qhi[1, y1] + 1):
                            for x2 in range(qlo[2, y2], qhi[2, y2] + 1):
                                s[j] += rpb[h, y0 - rof[0, x0], y1 - rof[1, x1], y2 - rof[2, x2]]
                                j += 1
                _exp_rows(s, ibuf, n, zero, fast, zero)  # P
                _dots(v, kr, dout, qidx, n, dp, zero)
                for j in range(n):
                    dp[j] = s[j] * (dp[j] - delta[qidx[j]])  # dS
                _axpys(s, dout, qidx, n, av)
                _axpys(dp, q, qidx, n, ak)
            for d in range(D):
                dk[kr, d] = ak[d] * scale
            for d in range(Dv):
                dv[kr, d] = av[d]
