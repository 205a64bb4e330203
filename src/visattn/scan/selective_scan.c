/* The selective scan (Mamba's S6 recurrence) on CPU: forward and backward, float32.
 *
 * Compiled at first use by visattn/backends/cpu/build.py (same flags, cache and OpenMP runtime as the
 * neighborhood-attention kernel) and loaded with ctypes: no Python or PyTorch headers. The vector
 * type and its exp are the package's (vec8.h).
 *
 * For every batch b and channel d (channel d reads B and C of its group g = d / (D / G)):
 *
 *     dt_t   = softplus(delta_t + bias)            (softplus and bias optional)
 *     h_t[n] = exp(dt_t * A[n]) * h_{t-1}[n] + dt_t * u_t * B_t[n],   h_{-1} = 0,
 *     y_t    = sum_n C_t[n] * h_t[n] + Dskip * u_t,
 *     out_t  = y_t * silu(z_t)                     (gate optional).
 *
 * Layouts: u, delta, z, out and their gradients are [batch, L, D] with D contiguous (a channels-last
 * sequence); A is [N, D]; B and C are addressed through four strides (batch, group, state, time), so
 * any view of [batch, G, N, L] works.
 *
 * Vectorization: one vector holds 8 consecutive channels of a group (a "block"), so the recurrence of
 * 8 channels advances together and y needs no horizontal sum; the N states of a block are N vectors.
 * B_t[n] and C_t[n] are broadcast (one row of N floats per token, shared by the whole group).
 *
 * Memory: the forward optionally stores the state before every chunk of `chunk` tokens,
 * [batch, L/chunk, N, D]; the backward walks the chunks in reverse, recomputes each chunk's states,
 * exp(dt A) and y from its saved start (bitwise the forward's values: same operations, same order),
 * and runs the adjoint recurrence
 *
 *     lam_t = C_t dy_t + exp(dt_{t+1} A) lam_{t+1}     (the gradient reaching h_t),
 *
 * so its memory is linear in L: the chunk states plus O(chunk * N) vectors of scratch per thread.
 *
 * Work items: forward, one (batch, block) per item. Backward, one (batch, group, slice of `slice`
 * blocks) per item: dB and dC sum over the channels of a group, so each item accumulates its blocks'
 * share in vectors, reduces them once per chunk and writes its own partial slice ([S, batch, G, L, N],
 * summed by the caller); dA, dDskip and dbias get one partial per batch ([batch, N, D], [batch, D]).
 * No two items write the same element, and the partition depends on the shapes only: results do not
 * depend on the thread count. Threads: parallel.h (torch's OpenMP pool, else pthreads).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../backends/cpu/parallel.h"
#include "../backends/cpu/vec8.h"

#define W 8

typedef struct {
    const float *u, *delta, *z;  /* [batch, L, D]; z may be NULL */
    const float *bias, *Dskip;   /* [D] or NULL */
    const float *A;              /* [N, D] */
    const float *Bm, *Cm;        /* strided views of [batch, G, N, L] */
    int64_t sB[4], sC[4];        /* strides of Bm, Cm: batch, group, state, time (elements) */
    float *out;                  /* forward: [batch, L, D] */
    float *last;                 /* forward: [batch, N, D], or NULL */
    float *states;               /* forward: written, or NULL; backward: read. [batch, nchunks, N, D] */
    const float *dout;           /* backward: [batch, L, D] */
    const float *dlast;          /* backward: [batch, N, D], or NULL */
    float *du, *ddelta, *dz;     /* backward: [batch, L, D] (dz only with z) */
    float *dA;                   /* backward: [batch, N, D] partial sums over time */
    float *dDskip, *dbias;       /* backward: [batch, D] partial sums over time (each only with its input) */
    float *dB, *dC;              /* backward: [S, batch, G, L, N] partial sums over channels */
    int64_t batch, L, D, N, G, chunk, slice;
    int softplus, nthreads;
} ss_args;

/* The first `lanes` floats at p, zeros after them (a block at the end of a group). */
static inline v8f ldm(const float *p, int lanes) {
    if (lanes == W) return ld(p);
    float tmp[W] = {0};
    memcpy(tmp, p, sizeof(float) * lanes);
    return ld(tmp);
}

static inline void stm(float *p, v8f x, int lanes) {
    if (lanes == W) {
        st(p, x);
        return;
    }
    float tmp[W];
    st(tmp, x);
    memcpy(p, tmp, sizeof(float) * lanes);
}

static inline float hsum(v8f x) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += x[i];
    return s;
}

/* log(w) for w >= 1: w = m 2^k with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m-1)/(m+1),
 * |s| < 0.172, five terms of the series (relative error < 1e-8). */
static inline v8f vlog_ge1(v8f w) {
    v8i bits = (v8i)w;
    v8i k = ((bits >> 23) & 0xff) - 127;
    v8f m = (v8f)((bits & 0x007fffff) | 0x3f800000);
    v8i big = m > bc(1.41421356f);
    m = sel(big, m * bc(0.5f), m);
    k = k + (big & 1);
    v8f s = (m - bc(1.0f)) / (m + bc(1.0f)), s2 = s * s;
    v8f q = bc(1.0f / 9) * s2 + bc(1.0f / 7);
    q = q * s2 + bc(1.0f / 5);
    q = q * s2 + bc(1.0f / 3);
    q = q * s2 + bc(1.0f);
    return bc(0.693147180559945309f) * __builtin_convertvector(k, v8f) + bc(2.0f) * s * q;
}

/* softplus(x) = log(1 + exp(x)), x itself above 20 (torch's threshold). log1p(e) = log(1 + e) -
 * ((1 + e) - 1 - e) / (1 + e) keeps full relative accuracy for tiny e. */
static inline v8f vsoftplus(v8f x) {
    v8f e = vexp(x), w = bc(1.0f) + e;
    v8f r = vlog_ge1(w) - ((w - bc(1.0f)) - e) / w;
    return sel(x > bc(20.0f), x, r);
}

static inline v8f vsigmoid(v8f x) { return bc(1.0f) / (bc(1.0f) + vexp(-x)); }

/* dt of one token and block: pre = delta + bias, dt = softplus(pre) or pre; also sigmoid(pre), the
 * softplus' derivative, when `dsig` is given (1 without softplus). */
static inline v8f step(const ss_args *S, int64_t row, int64_t d0, int lanes, v8f *dsig) {
    v8f pre = ldm(S->delta + row, lanes);
    if (S->bias) pre += ldm(S->bias + d0, lanes);
    if (!S->softplus) {
        if (dsig) *dsig = bc(1.0f);
        return pre;
    }
    if (dsig) *dsig = vsigmoid(pre);
    return vsoftplus(pre);
}

/* Block j of group g: its first channel and how many of its 8 lanes are channels. */
static inline int64_t blocks_per_group(const ss_args *S) { return (S->D / S->G + W - 1) / W; }
static inline int64_t block_start(const ss_args *S, int64_t g, int64_t j) { return g * (S->D / S->G) + j * W; }
static inline int block_lanes(const ss_args *S, int64_t j) {
    int64_t left = S->D / S->G - j * W;
    return left < W ? (int)left : W;
}

/* ---- forward: one (batch, block) ---------------------------------------------------------------- */

static inline __attribute__((always_inline)) void forward_block(const int NN, const ss_args *S, v8f *scratch,
                                                               int64_t b, int64_t g, int64_t d0, int lanes) {
    const int64_t D = S->D, N = NN ? NN : S->N;
    /* with N a literal the states live in local arrays, which the compiler keeps in registers */
    v8f h_local[NN ? NN : 1], a_local[NN ? NN : 1];
    v8f *h = NN ? h_local : scratch, *a_n = NN ? a_local : scratch + N;
    for (int64_t n = 0; n < N; n++) {
        a_n[n] = ldm(S->A + n * D + d0, lanes);
        h[n] = bc(0.0f);
    }
    const v8f skip = S->Dskip ? ldm(S->Dskip + d0, lanes) : bc(0.0f);
    const float *Bb = S->Bm + b * S->sB[0] + g * S->sB[1], *Cb = S->Cm + b * S->sC[0] + g * S->sC[1];
    const int64_t nchunks = (S->L + S->chunk - 1) / S->chunk;
    for (int64_t t = 0; t < S->L; t++) {
        if (S->states && t % S->chunk == 0) {
            float *sp = S->states + ((b * nchunks + t / S->chunk) * N) * D + d0;
            for (int64_t n = 0; n < N; n++) stm(sp + n * D, h[n], lanes);
        }
        const int64_t row = (b * S->L + t) * D + d0;
        const v8f dt = step(S, row, d0, lanes, NULL), u = ldm(S->u + row, lanes), dtu = dt * u;
        v8f y = skip * u;
        const float *Bt = Bb + t * S->sB[3], *Ct = Cb + t * S->sC[3];
        for (int64_t n = 0; n < N; n++) {
            h[n] = vexp(dt * a_n[n]) * h[n] + dtu * bc(Bt[n * S->sB[2]]);
            y += h[n] * bc(Ct[n * S->sC[2]]);
        }
        if (S->z) {
            const v8f z = ldm(S->z + row, lanes);
            y *= z * vsigmoid(z);
        }
        stm(S->out + row, y, lanes);
    }
    if (S->last)
        for (int64_t n = 0; n < N; n++) stm(S->last + (b * N + n) * D + d0, h[n], lanes);
}

static void forward_item(const ss_args *S, v8f *scratch, int64_t item) {
    const int64_t nb = blocks_per_group(S), j = item % nb, g = item / nb % S->G, b = item / nb / S->G;
    const int64_t d0 = block_start(S, g, j);
    const int lanes = block_lanes(S, j);
    /* the state count as a literal for the common sizes: the n loops unroll */
    switch (S->N) {
        case 1: forward_block(1, S, scratch, b, g, d0, lanes); break;
        case 4: forward_block(4, S, scratch, b, g, d0, lanes); break;
        case 8: forward_block(8, S, scratch, b, g, d0, lanes); break;
        case 16: forward_block(16, S, scratch, b, g, d0, lanes); break;
        default: forward_block(0, S, scratch, b, g, d0, lanes);
    }
}

/* ---- backward: one (batch, group, slice of blocks) ---------------------------------------------- */

typedef struct {
    v8f *lam, *dA;   /* [slice][N]: adjoint carried across chunks, dA accumulated over time */
    v8f *dskip;      /* [slice][2]: dDskip and dbias accumulated over time */
    v8f *hs;         /* [chunk + 1][N]: state before the chunk, then after each of its tokens */
    v8f *as;         /* [chunk][N]: exp(dt A) of each token */
    v8f *dB, *dC;    /* [chunk][N]: this slice's share of dB, dC, lanes not yet summed */
    v8f *a_n;        /* [N]: A of the current block */
} bwd_scratch;

static inline __attribute__((always_inline)) void backward_block_chunk(const int NN, const ss_args *S,
                                                                      bwd_scratch *X, int64_t jj, int64_t b,
                                                                      int64_t g, int64_t d0, int lanes,
                                                                      int64_t c, int64_t t0, int64_t t1) {
    const int64_t D = S->D, N = NN ? NN : S->N, nchunks = (S->L + S->chunk - 1) / S->chunk;
    v8f *lam = X->lam + jj * N, *dAacc = X->dA + jj * N, *dsk = X->dskip + jj * 2, *a_n = X->a_n;
    for (int64_t n = 0; n < N; n++) a_n[n] = ldm(S->A + n * D + d0, lanes);
    const v8f skip = S->Dskip ? ldm(S->Dskip + d0, lanes) : bc(0.0f);
    const float *Bb = S->Bm + b * S->sB[0] + g * S->sB[1], *Cb = S->Cm + b * S->sC[0] + g * S->sC[1];
    /* recompute the chunk's states from its saved start */
    const float *sp = S->states + ((b * nchunks + c) * N) * D + d0;
    for (int64_t n = 0; n < N; n++) X->hs[n] = ldm(sp + n * D, lanes);
    for (int64_t t = t0; t < t1; t++) {
        const int64_t row = (b * S->L + t) * D + d0, i = t - t0;
        const v8f dt = step(S, row, d0, lanes, NULL), dtu = dt * ldm(S->u + row, lanes);
        const float *Bt = Bb + t * S->sB[3];
        v8f *hp = X->hs + i * N, *hn = hp + N, *as = X->as + i * N;
        for (int64_t n = 0; n < N; n++) {
            as[n] = vexp(dt * a_n[n]);
            hn[n] = as[n] * hp[n] + dtu * bc(Bt[n * S->sB[2]]);
        }
    }
    /* adjoint, latest token first */
    for (int64_t t = t1 - 1; t >= t0; t--) {
        const int64_t row = (b * S->L + t) * D + d0, i = t - t0;
        v8f dsig;
        const v8f dt = step(S, row, d0, lanes, &dsig), u = ldm(S->u + row, lanes), dtu = dt * u;
        const v8f dout = ldm(S->dout + row, lanes);
        v8f dy = dout, gate_d = bc(0.0f);
        if (S->z) { /* out = y silu(z): dy = dout silu(z), dz = dout y silu'(z) with y summed below */
            const v8f z = ldm(S->z + row, lanes), sz = vsigmoid(z);
            dy = dout * z * sz;
            gate_d = dout * sz * (bc(1.0f) + z * (bc(1.0f) - sz));
        }
        const float *Bt = Bb + t * S->sB[3], *Ct = Cb + t * S->sC[3];
        v8f *hp = X->hs + i * N, *hn = hp + N, *as = X->as + i * N, *dBv = X->dB + i * N, *dCv = X->dC + i * N;
        v8f sum_lb = bc(0.0f), ddt = bc(0.0f), y = skip * u;
        for (int64_t n = 0; n < N; n++) {
            const v8f bn = bc(Bt[n * S->sB[2]]), cn = bc(Ct[n * S->sC[2]]);
            const v8f l = lam[n] + cn * dy; /* lam_t */
            y += cn * hn[n];
            dCv[n] += dy * hn[n];
            dBv[n] += l * dtu;
            sum_lb += l * bn;
            const v8f gA = l * hp[n] * as[n]; /* d/d(dt A) of exp(dt A) h_{t-1} */
            ddt += gA * a_n[n];
            dAacc[n] += gA * dt;
            lam[n] = l * as[n]; /* what reaches h_{t-1} */
        }
        const v8f dpre = (ddt + sum_lb * u) * dsig;
        stm(S->ddelta + row, dpre, lanes);
        stm(S->du + row, sum_lb * dt + dy * skip, lanes);
        if (S->z) stm(S->dz + row, gate_d * y, lanes);
        dsk[0] += dy * u;
        dsk[1] += dpre;
    }
}

static void backward_item(const ss_args *S, bwd_scratch *X, int64_t item) {
    const int64_t nb = blocks_per_group(S), nslices = (nb + S->slice - 1) / S->slice;
    const int64_t s = item % nslices, g = item / nslices % S->G, b = item / nslices / S->G;
    const int64_t j0 = s * S->slice, j1 = j0 + S->slice < nb ? j0 + S->slice : nb;
    const int64_t N = S->N, D = S->D, T = S->chunk, nchunks = (S->L + T - 1) / T;
    for (int64_t j = j0; j < j1; j++) {
        const int64_t d0 = block_start(S, g, j);
        const int lanes = block_lanes(S, j);
        for (int64_t n = 0; n < N; n++) {
            X->lam[(j - j0) * N + n] = S->dlast ? ldm(S->dlast + (b * N + n) * D + d0, lanes) : bc(0.0f);
            X->dA[(j - j0) * N + n] = bc(0.0f);
        }
        X->dskip[(j - j0) * 2] = X->dskip[(j - j0) * 2 + 1] = bc(0.0f);
    }
    const int64_t part = ((s * S->batch + b) * S->G + g) * S->L * N;
    for (int64_t c = nchunks - 1; c >= 0; c--) {
        const int64_t t0 = c * T, t1 = t0 + T < S->L ? t0 + T : S->L;
        memset(X->dB, 0, sizeof(v8f) * (t1 - t0) * N);
        memset(X->dC, 0, sizeof(v8f) * (t1 - t0) * N);
        for (int64_t j = j0; j < j1; j++) {
            const int64_t d0 = block_start(S, g, j);
            const int lanes = block_lanes(S, j);
            switch (N) {
                case 1: backward_block_chunk(1, S, X, j - j0, b, g, d0, lanes, c, t0, t1); break;
                case 4: backward_block_chunk(4, S, X, j - j0, b, g, d0, lanes, c, t0, t1); break;
                case 8: backward_block_chunk(8, S, X, j - j0, b, g, d0, lanes, c, t0, t1); break;
                case 16: backward_block_chunk(16, S, X, j - j0, b, g, d0, lanes, c, t0, t1); break;
                default: backward_block_chunk(0, S, X, j - j0, b, g, d0, lanes, c, t0, t1);
            }
        }
        for (int64_t i = 0; i < (t1 - t0) * N; i++) {
            S->dB[part + t0 * N + i] = hsum(X->dB[i]);
            S->dC[part + t0 * N + i] = hsum(X->dC[i]);
        }
    }
    for (int64_t j = j0; j < j1; j++) {
        const int64_t d0 = block_start(S, g, j);
        const int lanes = block_lanes(S, j);
        for (int64_t n = 0; n < N; n++) stm(S->dA + (b * N + n) * D + d0, X->dA[(j - j0) * N + n], lanes);
        if (S->dDskip) stm(S->dDskip + b * D + d0, X->dskip[(j - j0) * 2], lanes);
        if (S->dbias) stm(S->dbias + b * D + d0, X->dskip[(j - j0) * 2 + 1], lanes);
    }
}

/* ---- threads ------------------------------------------------------------------------------------ */

typedef struct {
    const ss_args *S;
    int pass;
    int64_t items;
} ss_job;

/* Items [items * tid / nt, items * (tid + 1) / nt) of a pass, with this thread's scratch memory. */
static int ss_work(void *ctx, int tid, int nt) {
    const ss_job *J = ctx;
    const ss_args *S = J->S;
    const int64_t begin = J->items * tid / nt, end = J->items * (tid + 1) / nt, N = S->N;
    if (begin >= end) return 0;
    if (J->pass == 0) {
        v8f *scratch = aligned_alloc(sizeof(v8f), sizeof(v8f) * 2 * N);
        if (!scratch) return 1;
        for (int64_t item = begin; item < end; item++) forward_item(S, scratch, item);
        free(scratch);
        return 0;
    }
    const int64_t T = S->chunk, sl = S->slice;
    const int64_t sizes[8] = {sl * N, sl * N, sl * 2, (T + 1) * N, T * N, T * N, T * N, N};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    v8f *mem = aligned_alloc(sizeof(v8f), sizeof(v8f) * total);
    if (!mem) return 1;
    v8f *p = mem;
    bwd_scratch X;
    v8f **fields[8] = {&X.lam, &X.dA, &X.dskip, &X.hs, &X.as, &X.dB, &X.dC, &X.a_n};
    for (int i = 0; i < 8; i++) {
        *fields[i] = p;
        p += sizes[i];
    }
    for (int64_t item = begin; item < end; item++) backward_item(S, &X, item);
    free(mem);
    return 0;
}

/* pass 0: forward (out, and last / states when given); pass 1: backward (du, ddelta, dz, and the
 * partial sums dA, dDskip, dbias, dB, dC). Returns 0, 1 when scratch memory could not be allocated,
 * 2 for arguments the kernel cannot serve. */
int ss_run(const ss_args *S, int pass) {
    if (S->G < 1 || S->D % S->G || S->N < 1 || S->chunk < 1 || S->slice < 1 || (pass == 1 && !S->states))
        return 2;
    const int64_t nb = blocks_per_group(S);
    ss_job J = {S, pass, pass == 0 ? S->batch * S->G * nb : S->batch * S->G * ((nb + S->slice - 1) / S->slice)};
    return parallel_run(S->nthreads < J.items ? S->nthreads : (int)(J.items > 0 ? J.items : 1), ss_work, &J);
}
