"""Fused Triton kernels for generalized neighborhood attention: forward, dQ, and dK/dV.

Imported lazily by :mod:`visattn.backends.triton.backend` (only when ``triton`` is installed). Every
call is seen as rank 3: a rank-1 or rank-2 problem gets leading axes of length 1 (kernel, stride
and dilation 1), so one kernel serves all ranks and the unused axes cost a tile of extent 1.

Tiling (the FNA idea: a multi-dimensional query tile attends a multi-dimensional key region, not
a 1-D mask over a flattened sequence). A program owns a ``T0 x T1 x T2`` query tile whose queries
all lie in one dilation group per axis (axis coordinate ``x = g + d * p``, group position ``p``).
Windows are monotone in ``p`` along every axis, so the keys the tile can see form one box of group
positions ``[min lo, max hi]`` per axis; the program walks that box in ``K0 x K1 x K2`` key tiles,
masking each (query, key) pair by the query's per-axis ``[lo, hi]``. The dK/dV kernel is the mirror
image: a key tile walks the box of queries that can see it (``[qmin, qmax]`` per key).

The window bounds are never re-derived here: the host passes, per axis, an int32 table
``[lo, hi, qmin, qmax]`` x ``L`` built from :func:`visattn.spec.axis_windows` (a few hundred bytes,
cache-resident), so the kernels and the oracle share one definition of the rules.

Softmax runs in base 2 (``exp2``), with the scale folded into one multiply; LSE is stored in
natural log (float32) for the backward and for merging extra KV tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Window-table value meaning "sees nothing" for a padding slot (any bound past every axis).
_FAR = tl.constexpr(1 << 30)


@triton.jit
def _split(m, T1: tl.constexpr, T2: tl.constexpr):
    """Row-major ``(i0, i1, i2)`` of a flat slot index ``m`` inside a ``T0 x T1 x T2`` tile."""
    return m // (T1 * T2), (m // T2) % T1, m % T2


@triton.jit
def _program(L0, L1, L2, DIL0, DIL1, DIL2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """This program's row (batch * heads + head) and per-axis tile ids.

    An axis has ``DIL * cdiv(cdiv(L, DIL), T)`` tiles (each dilation group is tiled separately, at
    the length of the longest group). The grid is 1-D with tiles fastest, so neighbouring programs
    share a (batch, head) and reuse each other's keys from L2 (and no grid axis hits 65535).
    """
    n0 = DIL0 * tl.cdiv(tl.cdiv(L0, DIL0), T0)
    n1 = DIL1 * tl.cdiv(tl.cdiv(L1, DIL1), T1)
    n2 = DIL2 * tl.cdiv(tl.cdiv(L2, DIL2), T2)
    pid = tl.program_id(0)
    tile = pid % (n0 * n1 * n2)
    return pid // (n0 * n1 * n2), tile // (n1 * n2), (tile // n2) % n1, tile % n2


@triton.jit
def _members(tile, i, L, DIL, T: tl.constexpr):
    """Dilation group ``g`` (scalar), group positions ``p`` and validity of slot ``i`` of a tile."""
    g = tile % DIL
    p = (tile // DIL) * T + i
    n = (L - g + DIL - 1) // DIL
    return g, p, p < n


@triton.jit
def _windows(TAB, L, x, ok):
    """Per-query window ``[lo, hi]`` (group positions); padding slots get an empty window."""
    lo = tl.load(TAB + x, mask=ok, other=_FAR)
    hi = tl.load(TAB + L + x, mask=ok, other=-1)
    return lo, hi


@triton.jit
def _seen_by(TAB, L, y, ok):
    """Per-key range ``[qmin, qmax]`` of query group positions that see it (empty for padding)."""
    qmin = tl.load(TAB + 2 * L + y, mask=ok, other=_FAR)
    qmax = tl.load(TAB + 3 * L + y, mask=ok, other=-1)
    return qmin, qmax


@triton.jit
def _rpb_index(p0, p1, p2, t0, t1, t2, RK0, RK1, RK2):
    """Flat index into a ``(2RK0-1, 2RK1-1, 2RK2-1)`` bias table of key minus query positions.

    ``p*`` index rows and ``t*`` columns of the result (shapes ``[M, 1]`` and ``[1, N]`` or the
    transpose); only meaningful inside the window, where ``|t - p| < RK``.
    """
    r0 = t0 - p0 + (RK0 - 1)
    r1 = t1 - p1 + (RK1 - 1)
    r2 = t2 - p2 + (RK2 - 1)
    return (r0 * (2 * RK1 - 1) + r1) * (2 * RK2 - 1) + r2


@triton.jit
def _tile(ta0, ta1, ta2, L0, L1, L2, DIL0, DIL1, DIL2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """The ``T0 x T1 x T2`` tile ``(ta0, ta1, ta2)``, flattened: per-axis dilation groups ``g*``
    (scalars), group positions ``p*``, coordinates ``x*`` and which slots are real positions."""
    i0, i1, i2 = _split(tl.arange(0, T0 * T1 * T2), T1, T2)
    g0, p0, ok0 = _members(ta0, i0, L0, DIL0, T0)
    g1, p1, ok1 = _members(ta1, i1, L1, DIL1, T1)
    g2, p2, ok2 = _members(ta2, i2, L2, DIL2, T2)
    return g0, g1, g2, p0, p1, p2, g0 + DIL0 * p0, g1 + DIL1 * p1, g2 + DIL2 * p2, ok0 & ok1 & ok2


@triton.jit
def _all_windows(TAB0, TAB1, TAB2, L0, L1, L2, x0, x1, x2, ok):
    """Per-query windows on the three axes (see :func:`_windows`)."""
    lo0, hi0 = _windows(TAB0, L0, x0, ok)
    lo1, hi1 = _windows(TAB1, L1, x1, ok)
    lo2, hi2 = _windows(TAB2, L2, x2, ok)
    return lo0, hi0, lo1, hi1, lo2, hi2


@triton.jit
def _rpb_bias(RPB, h, ridx, inside, RK0, RK1, RK2):
    """The bias of head ``h`` at flat table indices ``ridx``, in log2 units (0 outside the window)."""
    nb = (2 * RK0 - 1) * (2 * RK1 - 1) * (2 * RK2 - 1)
    return tl.load(RPB + h * nb + ridx, mask=inside, other=0.0).to(tl.float32) * _LOG2E


@triton.jit
def _key_box(qok, lo, hi):
    """Along one axis: the last key any query of the tile sees, and the range ``[all_lo, all_hi]``
    of keys that every valid query sees. A key block inside that box on every axis needs no per-pair
    window test (every block, for blocked attention with tiles aligned to the windows)."""
    return tl.max(hi, 0), tl.max(tl.where(qok, lo, -1), 0), tl.min(tl.where(qok, hi, _FAR), 0)


@triton.jit
def _inside(qok, s0, s1, s2, t0, t1, t2, lo0, hi0, lo1, hi1, lo2, hi2, all_lo0, all_hi0, all_lo1, all_hi1,
            all_lo2, all_hi2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TQ: tl.constexpr):
    """``[TQ, K0*K1*K2]``: which (query, key) pairs of the key block at ``(s0, s1, s2)`` are in the
    query's window; the per-pair test is skipped for blocks inside the tile's common box."""
    full = ((s0 >= all_lo0) & (s0 + K0 - 1 <= all_hi0) & (s1 >= all_lo1) & (s1 + K1 - 1 <= all_hi1)
            & (s2 >= all_lo2) & (s2 + K2 - 1 <= all_hi2))
    if full:
        inside = tl.broadcast_to(qok[:, None], [TQ, K0 * K1 * K2])
    else:
        inside = ((t0[None, :] >= lo0[:, None]) & (t0[None, :] <= hi0[:, None])
                  & (t1[None, :] >= lo1[:, None]) & (t1[None, :] <= hi1[:, None])
                  & (t2[None, :] >= lo2[:, None]) & (t2[None, :] <= hi2[:, None]))
    return inside


@triton.jit
def _key_block(K, V, RPB, b, hk, h, q, qok, p0, p1, p2, lo0, hi0, lo1, hi1, lo2, hi2,
               all_lo0, all_hi0, all_lo1, all_hi1, all_lo2, all_hi2, kend0, kend1, kend2,
               g0, g1, g2, s0, s1, s2, j0, j1, j2, dd, dv,
               skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
               DIL0, DIL1, DIL2, RK0, RK1, RK2, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, TQ: tl.constexpr,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, HAS_RPB: tl.constexpr, PREC: tl.constexpr):
    """One step of a query tile's walk (forward and dQ): the key block at group positions
    ``(s0, s1, s2)``; returns its K and V rows, the in-window mask ``[TQ, K0*K1*K2]``, the scores
    in log2 units (bias included) and, with ``HAS_RPB``, the bias-table indices (else 0)."""
    t0 = s0 + j0
    t1 = s1 + j1
    t2 = s2 + j2
    kok = (t0 <= kend0) & (t1 <= kend1) & (t2 <= kend2)
    koff = (g0 + DIL0 * t0) * sk0 + (g1 + DIL1 * t1) * sk1 + (g2 + DIL2 * t2) * sk2
    voff = (g0 + DIL0 * t0) * sv0 + (g1 + DIL1 * t1) * sv1 + (g2 + DIL2 * t2) * sv2
    k = tl.load(K + b * skb + hk * skh + koff[:, None] + dd[None, :],
                mask=kok[:, None] & (dd < HEAD_DIM)[None, :], other=0.0)
    v = tl.load(V + b * svb + hk * svh + voff[:, None] + dv[None, :],
                mask=kok[:, None] & (dv < HEAD_DIM_V)[None, :], other=0.0)
    inside = _inside(qok, s0, s1, s2, t0, t1, t2, lo0, hi0, lo1, hi1, lo2, hi2, all_lo0, all_hi0,
                     all_lo1, all_hi1, all_lo2, all_hi2, K0, K1, K2, TQ)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    ridx = 0
    if HAS_RPB:
        ridx = _rpb_index(p0[:, None], p1[:, None], p2[:, None], t0[None, :], t1[None, :], t2[None, :],
                          RK0, RK1, RK2)
        s += _rpb_bias(RPB, h, ridx, inside, RK0, RK1, RK2)
    return k, v, inside, s, ridx


@triton.jit
def na_fwd_kernel(
    Q, K, V, O, LSE, RPB, TAB0, TAB1, TAB2,
    sqb, sq0, sq1, sq2, sqh,
    skb, sk0, sk1, sk2, skh,
    svb, sv0, sv1, sv2, svh,
    sob, so0, so1, so2, soh,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, DIL0, DIL1, DIL2, RK0, RK1, RK2, WIN0, WIN1, WIN2,
    H, G, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HAS_RPB: tl.constexpr, PREC: tl.constexpr,
):
    """One query tile of one (batch, head): online softmax over its key box; writes O and LSE.

    ``WIN*`` (kernel * dilation per axis) are unused in the body: they key the autotuner.
    """
    bh, ta0, ta1, ta2 = _program(L0, L1, L2, DIL0, DIL1, DIL2, T0, T1, T2)
    b = (bh // H).to(tl.int64)  # int64: batch offsets may pass 2**31 elements
    h = bh % H
    hk = h // G  # GQA: query head h reads kv head h // G

    g0, g1, g2, p0, p1, p2, x0, x1, x2, qok = _tile(ta0, ta1, ta2, L0, L1, L2, DIL0, DIL1, DIL2, T0, T1, T2)
    lo0, hi0, lo1, hi1, lo2, hi2 = _all_windows(TAB0, TAB1, TAB2, L0, L1, L2, x0, x1, x2, qok)

    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptr = Q + b * sqb + h * sqh + (x0 * sq0 + x1 * sq1 + x2 * sq2)[:, None] + dd[None, :]
    q = tl.load(q_ptr, mask=qok[:, None] & (dd < HEAD_DIM)[None, :], other=0.0)
    qk_scale = scale * _LOG2E

    m_i = tl.full([T0 * T1 * T2], float("-inf"), tl.float32)
    l_i = tl.zeros([T0 * T1 * T2], tl.float32)
    acc = tl.zeros([T0 * T1 * T2, BLOCK_DV], tl.float32)

    n = tl.arange(0, K0 * K1 * K2)
    j0, j1, j2 = _split(n, K1, K2)
    kend0, all_lo0, all_hi0 = _key_box(qok, lo0, hi0)
    kend1, all_lo1, all_hi1 = _key_box(qok, lo1, hi1)
    kend2, all_lo2, all_hi2 = _key_box(qok, lo2, hi2)
    for s0 in range(tl.min(lo0, 0), kend0 + 1, K0):
        for s1 in range(tl.min(lo1, 0), kend1 + 1, K1):
            for s2 in range(tl.min(lo2, 0), kend2 + 1, K2):
                k, v, inside, s, ridx = _key_block(
                    K, V, RPB, b, hk, h, q, qok, p0, p1, p2, lo0, hi0, lo1, hi1, lo2, hi2,
                    all_lo0, all_hi0, all_lo1, all_hi1, all_lo2, all_hi2, kend0, kend1, kend2,
                    g0, g1, g2, s0, s1, s2, j0, j1, j2, dd, dv, skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
                    DIL0, DIL1, DIL2, RK0, RK1, RK2, qk_scale,
                    HEAD_DIM, HEAD_DIM_V, T0 * T1 * T2, K0, K1, K2, HAS_RPB, PREC)
                s = tl.where(inside, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row that has seen no key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    o_ptr = O + b * sob + h * soh + (x0 * so0 + x1 * so1 + x2 * so2)[:, None] + dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=qok[:, None] & (dv < HEAD_DIM_V)[None, :])
    tl.store(LSE + b * slb + h * slh + x0 * sl0 + x1 * sl1 + x2 * sl2, lse, mask=qok)


@triton.jit
def na_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DRPB, RPB, TAB0, TAB1, TAB2,
    sqb, sq0, sq1, sq2, sqh,
    skb, sk0, sk1, sk2, skh,
    svb, sv0, sv1, sv2, svh,
    sob, so0, so1, so2, soh,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, DIL0, DIL1, DIL2, RK0, RK1, RK2, WIN0, WIN1, WIN2,
    H, G, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HAS_RPB: tl.constexpr, PREC: tl.constexpr,
):
    """dQ of one query tile (same walk as the forward, P recomputed from the saved LSE).

    ``DELTA = rowsum(dO * O) - dLSE`` (float32, LSE layout) carries the gradient that flows into
    LSE. ``DQ`` has Q's strides, ``DO`` has O's (``so*``). With ``HAS_RPB`` the bias gradient
    (``dS`` summed over queries with one offset) is accumulated into float32 ``DRPB`` atomically.
    """
    bh, ta0, ta1, ta2 = _program(L0, L1, L2, DIL0, DIL1, DIL2, T0, T1, T2)
    b = (bh // H).to(tl.int64)  # int64: batch offsets may pass 2**31 elements
    h = bh % H
    hk = h // G

    g0, g1, g2, p0, p1, p2, x0, x1, x2, qok = _tile(ta0, ta1, ta2, L0, L1, L2, DIL0, DIL1, DIL2, T0, T1, T2)
    lo0, hi0, lo1, hi1, lo2, hi2 = _all_windows(TAB0, TAB1, TAB2, L0, L1, L2, x0, x1, x2, qok)

    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qoff = (x0 * sq0 + x1 * sq1 + x2 * sq2)[:, None] + dd[None, :]
    qmask = qok[:, None] & (dd < HEAD_DIM)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + qoff, mask=qmask, other=0.0)
    do = tl.load(DO + b * sob + h * soh + (x0 * so0 + x1 * so1 + x2 * so2)[:, None] + dv[None, :],
                 mask=qok[:, None] & (dv < HEAD_DIM_V)[None, :], other=0.0)
    loff = b * slb + h * slh + x0 * sl0 + x1 * sl1 + x2 * sl2
    lse2 = tl.load(LSE + loff, mask=qok, other=0.0) * _LOG2E
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # no key: P is masked to 0 anyway
    delta = tl.load(DELTA + loff, mask=qok, other=0.0)
    qk_scale = scale * _LOG2E
    dq = tl.zeros([T0 * T1 * T2, BLOCK_D], tl.float32)

    n = tl.arange(0, K0 * K1 * K2)
    j0, j1, j2 = _split(n, K1, K2)
    kend0, all_lo0, all_hi0 = _key_box(qok, lo0, hi0)
    kend1, all_lo1, all_hi1 = _key_box(qok, lo1, hi1)
    kend2, all_lo2, all_hi2 = _key_box(qok, lo2, hi2)
    for s0 in range(tl.min(lo0, 0), kend0 + 1, K0):
        for s1 in range(tl.min(lo1, 0), kend1 + 1, K1):
            for s2 in range(tl.min(lo2, 0), kend2 + 1, K2):
                k, v, inside, s, ridx = _key_block(
                    K, V, RPB, b, hk, h, q, qok, p0, p1, p2, lo0, hi0, lo1, hi1, lo2, hi2,
                    all_lo0, all_hi0, all_lo1, all_hi1, all_lo2, all_hi2, kend0, kend1, kend2,
                    g0, g1, g2, s0, s1, s2, j0, j1, j2, dd, dv, skb, sk0, sk1, sk2, skh, svb, sv0, sv1, sv2, svh,
                    DIL0, DIL1, DIL2, RK0, RK1, RK2, qk_scale,
                    HEAD_DIM, HEAD_DIM_V, T0 * T1 * T2, K0, K1, K2, HAS_RPB, PREC)
                p = tl.where(inside, tl.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
                if HAS_RPB:
                    nb = (2 * RK0 - 1) * (2 * RK1 - 1) * (2 * RK2 - 1)
                    tl.atomic_add(DRPB + h * nb + ridx, ds, mask=inside)
    tl.store(DQ + b * sqb + h * sqh + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def na_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, RPB, TAB0, TAB1, TAB2,
    sqb, sq0, sq1, sq2, sqh,
    skb, sk0, sk1, sk2, skh,
    svb, sv0, sv1, sv2, svh,
    sob, so0, so1, so2, soh,
    slb, sl0, sl1, sl2, slh,
    L0, L1, L2, DIL0, DIL1, DIL2, RK0, RK1, RK2, WIN0, WIN1, WIN2,
    H, G, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HAS_RPB: tl.constexpr, PREC: tl.constexpr,
):
    """dK and dV of one key tile (``K0 x K1 x K2``) of one (batch, kv head).

    Walks the box of queries that can see the tile in ``T0 x T1 x T2`` query tiles, for each of
    the ``G`` query heads sharing this kv head (GQA needs no atomics: one program owns its keys).
    ``DK``/``DV`` have K's/V's strides. Program rows are ``B * H_kv``.
    """
    HKV = H // G
    bh, ta0, ta1, ta2 = _program(L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2)
    b = (bh // HKV).to(tl.int64)  # int64: batch offsets may pass 2**31 elements
    hk = bh % HKV

    g0, g1, g2, t0, t1, t2, y0, y1, y2, kok = _tile(ta0, ta1, ta2, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2)
    qmin0, qmax0 = _seen_by(TAB0, L0, y0, kok)
    qmin1, qmax1 = _seen_by(TAB1, L1, y1, kok)
    qmin2, qmax2 = _seen_by(TAB2, L2, y2, kok)

    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    koff = (y0 * sk0 + y1 * sk1 + y2 * sk2)[:, None] + dd[None, :]
    voff = (y0 * sv0 + y1 * sv1 + y2 * sv2)[:, None] + dv[None, :]
    kmask = kok[:, None] & (dd < HEAD_DIM)[None, :]
    vmask = kok[:, None] & (dv < HEAD_DIM_V)[None, :]
    k = tl.load(K + b * skb + hk * skh + koff, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + voff, mask=vmask, other=0.0)
    qk_scale = scale * _LOG2E
    dk = tl.zeros([K0 * K1 * K2, BLOCK_D], tl.float32)
    dvacc = tl.zeros([K0 * K1 * K2, BLOCK_DV], tl.float32)

    m = tl.arange(0, T0 * T1 * T2)
    i0, i1, i2 = _split(m, T1, T2)
    pend0 = tl.max(qmax0, 0)
    pend1 = tl.max(qmax1, 0)
    pend2 = tl.max(qmax2, 0)
    for hq in range(G):
        h = hk * G + hq
        for s0 in range(tl.min(qmin0, 0), pend0 + 1, T0):
            p0 = s0 + i0
            for s1 in range(tl.min(qmin1, 0), pend1 + 1, T1):
                p1 = s1 + i1
                for s2 in range(tl.min(qmin2, 0), pend2 + 1, T2):
                    p2 = s2 + i2
                    qok = (p0 <= pend0) & (p1 <= pend1) & (p2 <= pend2)
                    x0 = g0 + DIL0 * p0
                    x1 = g1 + DIL1 * p1
                    x2 = g2 + DIL2 * p2
                    lo0, hi0, lo1, hi1, lo2, hi2 = _all_windows(TAB0, TAB1, TAB2, L0, L1, L2, x0, x1, x2, qok)
                    # Transposed layout: keys are rows, queries columns.
                    inside = ((t0[:, None] >= lo0[None, :]) & (t0[:, None] <= hi0[None, :])
                              & (t1[:, None] >= lo1[None, :]) & (t1[:, None] <= hi1[None, :])
                              & (t2[:, None] >= lo2[None, :]) & (t2[:, None] <= hi2[None, :]))
                    q = tl.load(Q + b * sqb + h * sqh + (x0 * sq0 + x1 * sq1 + x2 * sq2)[:, None] + dd[None, :],
                                mask=qok[:, None] & (dd < HEAD_DIM)[None, :], other=0.0)
                    do = tl.load(DO + b * sob + h * soh + (x0 * so0 + x1 * so1 + x2 * so2)[:, None] + dv[None, :],
                                 mask=qok[:, None] & (dv < HEAD_DIM_V)[None, :], other=0.0)
                    loff = b * slb + h * slh + x0 * sl0 + x1 * sl1 + x2 * sl2
                    lse2 = tl.load(LSE + loff, mask=qok, other=0.0) * _LOG2E
                    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
                    delta = tl.load(DELTA + loff, mask=qok, other=0.0)
                    s = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
                    if HAS_RPB:
                        ridx = _rpb_index(p0[None, :], p1[None, :], p2[None, :], t0[:, None], t1[:, None],
                                          t2[:, None], RK0, RK1, RK2)
                        s += _rpb_bias(RPB, h, ridx, inside, RK0, RK1, RK2)
                    p = tl.where(inside, tl.exp2(s - lse2[None, :]), 0.0)
                    dvacc += tl.dot(p.to(do.dtype), do, input_precision=PREC)
                    dp = tl.dot(v, tl.trans(do), input_precision=PREC)
                    ds = p * (dp - delta[None, :])
                    dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)
    tl.store(DK + b * skb + hk * skh + koff, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * svb + hk * svh + voff, dvacc.to(DV.dtype.element_ty), mask=vmask)
