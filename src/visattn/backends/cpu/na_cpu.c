/* Fused neighborhood attention on CPU: forward and race-free backward, float32.
 *
 * Compiled at first use by build.py (next to this file) with the system C compiler for the host CPU
 * (-O3 -march=native) and loaded with ctypes: no Python or PyTorch headers, no C++ ABI.
 *
 * Geometry (the tables of geometry.py): every tensor is the contiguous
 * heads-last [B, L0, L1, L2, heads, dim] one, seen as rows of `dim` floats (row of token t, head h
 * is t*heads + h). Each axis is walked in group-major order (dilation group 0, then 1, ...):
 * pos[a][i] is the coordinate of index i and a query's keys are the run lo[a][i]..hi[a][i] on every
 * axis, so dilation never appears in the loops. qlo/qhi are the inverse runs (the queries seeing a key).
 *
 * Work is blocked as 2 queries x 8 keys: two neighbouring queries along the last axis share all
 * but one of their keys per key row, so their union is walked once and each key row loaded once
 * serves both. The score micro-kernel keeps 16 vector accumulators over the head dim (register
 * resident with 32 vector registers) and reduces them with one transpose-and-add tree; the value
 * update keeps 2 x 4 accumulators of 8 features per pass. Slot lists put the key rows of the union
 * back to back and pad only the total to a multiple of 8. Pairs outside a query's own window get a
 * bias of NEG and an exact zero weight. The backward recomputes probabilities from the LSE, from
 * the key side (each key pair gathers from the queries that see it): dK and dV in registers, dQ
 * scattered into the queries' rows, made race-free by running chunks of one axis in two colours
 * whose query sets are disjoint (pass 4, 5); or, when that leaves too little parallel work, a dQ
 * pass per query pair, then the key-side pass without dQ (passes 1, 2).
 *
 * Vectors are GCC/Clang vector extensions of 8 floats: AVX2/AVX-512 on x86, NEON pairs on Arm.
 * Head dims must be multiples of 8 (the Python side pads others with zeros).
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8iu __attribute__((vector_size(32), aligned(4), may_alias));

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* Built with -DNA_BOUNDS_CHECK (VISATTN_CPU_BOUNDS_CHECK=1), every row, table and bias index and
 * every scratch write is checked and a violation aborts with its line: the tests run a sweep so. */
#ifdef NA_BOUNDS_CHECK
#include <stdio.h>
#define CHECK(cond)                                                                         \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "na_cpu.c:%d: bounds check failed: %s\n", __LINE__, #cond);    \
            abort();                                                                        \
        }                                                                                   \
    } while (0)
#else
#define CHECK(cond) ((void)0)
#endif

#define W 8            /* floats per vector */
/* Logit of a pair outside the window, of a masked key, of a padding slot: exp gives exactly 0. A
 * query whose logits are all NEG (every key masked, or an attn_bias of -inf) has no key: zeros out,
 * LSE -inf; the backward then uses -lse = NEG for it, so its probabilities stay 0 (never inf - inf). */
#define NEG (-INFINITY)
#define MAX_THREADS 256

static inline v8f ld(const float *p) { return *(const v8fu *)p; }
static inline void st(float *p, v8f x) { *(v8fu *)p = x; }
static inline v8f bc(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8i bci(int32_t x) { return (v8i){x, x, x, x, x, x, x, x}; }
static inline v8f sel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline int64_t round8(int64_t n) { return (n + W - 1) / W * W; }

/* exp(x) for x <= ~0; exactly 0 below -87 (masked pairs). exp(x) = 2^e * exp(r), |r| <= ln2/2,
 * degree-6 Taylor polynomial: relative error < 2e-7. e = round(x / ln2) by adding 1.5 * 2^23, which
 * leaves the integer in the low mantissa bits; this relies on IEEE rounding being kept, i.e. the
 * file is never compiled with -ffast-math / -fassociative-math (build.py's flags are not). */
static inline v8f vexp(v8f x) {
    const v8f magic = bc(12582912.0f);
    v8i keep = x > bc(-87.0f);
    x = sel(keep, x, bc(-87.0f));
    v8f t = x * bc(1.44269504088896341f) + magic;
    v8f ef = t - magic;
    v8f r = x - ef * bc(0.693147180559945309f);
    v8f p = bc(1.0f / 720) * r + bc(1.0f / 120);
    p = p * r + bc(1.0f / 24);
    p = p * r + bc(1.0f / 6);
    p = p * r + bc(0.5f);
    p = p * r + bc(1.0f);
    p = p * r + bc(1.0f);
    v8i two_e = ((v8i)t - (v8i)magic + 127) << 23;
    return (v8f)((v8i)(p * (v8f)two_e) & keep);
}

/* Sums of each of 8 vectors, as one vector: a transpose-and-add tree (14 shuffles, 7 adds). */
static inline v8f hsum8(const v8f c[8]) {
    v8f u[4], w[2];
    for (int i = 0; i < 4; i++) {
        v8f a = c[2 * i], b = c[2 * i + 1];
        u[i] = SHUF(a, b, 0, 8, 1, 9, 4, 12, 5, 13) + SHUF(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 2; i++) {
        v8f a = u[2 * i], b = u[2 * i + 1];
        w[i] = SHUF(a, b, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    }
    return SHUF(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* s_i[j] = (a_i . B[row[j]]) * scale + bias_i[j] for i = 0, 1 and j < n (a multiple of 8); the
 * biases may be NULL. */
static void scores2(const float *a0, const float *a1, const float *B, const int64_t *row, int64_t n, int64_t dim,
                    float scale, const float *bias0, const float *bias1, float *s0, float *s1) {
    for (int64_t j = 0; j < n; j += W) {
        const float *bp[W];
        for (int t = 0; t < W; t++) bp[t] = B + row[j + t] * dim;
        v8f c0[W], c1[W];
        for (int t = 0; t < W; t++) c0[t] = c1[t] = bc(0.0f);
        for (int64_t d = 0; d < dim; d += W) {
            v8f x0 = ld(a0 + d), x1 = ld(a1 + d);
#pragma GCC unroll 8
            for (int t = 0; t < W; t++) {
                v8f y = ld(bp[t] + d);
                c0[t] += x0 * y;
                c1[t] += x1 * y;
            }
        }
        v8f y0 = hsum8(c0) * bc(scale), y1 = hsum8(c1) * bc(scale);
        st(s0 + j, bias0 ? y0 + ld(bias0 + j) : y0);
        st(s1 + j, bias1 ? y1 + ld(bias1 + j) : y1);
    }
}

/* o_i[c:c+8*NC] += f_i * sum_j w_i[j] * B[row[j]][c:c+8*NC]; NC is a literal after inlining, so the
 * 2*NC accumulators stay in registers. */
static inline __attribute__((always_inline)) void accum_block(const int NC, const float *w0, const float *w1,
                                                             const float *B, const int64_t *row, int64_t n,
                                                             int64_t dim, int64_t c, float f0, float f1,
                                                             float *o0, float *o1) {
    v8f a0[4], a1[4];
    for (int t = 0; t < NC; t++) a0[t] = a1[t] = bc(0.0f);
    for (int64_t j = 0; j < n; j++) {
        const float *bp = B + row[j] * dim + c;
        v8f p0 = bc(w0[j]), p1 = bc(w1[j]);
        for (int t = 0; t < NC; t++) {
            v8f y = ld(bp + W * t);
            a0[t] += p0 * y;
            a1[t] += p1 * y;
        }
    }
    for (int t = 0; t < NC; t++) {
        st(o0 + c + W * t, ld(o0 + c + W * t) + a0[t] * bc(f0));
        st(o1 + c + W * t, ld(o1 + c + W * t) + a1[t] * bc(f1));
    }
}

static void accum2(const float *w0, const float *w1, const float *B, const int64_t *row, int64_t n, int64_t dim,
                   float f0, float f1, float *o0, float *o1) {
    for (int64_t c = 0; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: accum_block(1, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            case 2: accum_block(2, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            case 3: accum_block(3, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            default: accum_block(4, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
        }
    }
}

static float dot(const float *a, const float *b, int64_t dim) {
    v8f acc = bc(0.0f);
    for (int64_t d = 0; d < dim; d += W) acc += ld(a + d) * ld(b + d);
    float t = 0;
    for (int i = 0; i < W; i++) t += acc[i];
    return t;
}

typedef struct {
    const float *q, *k, *v;             /* [T*H, D], [T*Hk, D], [T*Hk, Dv] */
    const float *rpb;                   /* [H, R0, R1, R2], or NULL */
    const float *ab;                    /* attn_bias [T*H, K] (K = K0*K1*K2 slots), or NULL */
    const uint8_t *kpm;                 /* key_padding_mask [T], nonzero = ignore that key; or NULL */
    const int64_t *pos, *lo, *hi, *rof; /* [3, lmax] each */
    const int64_t *qlo, *qhi;           /* [3, lmax]: inverse runs (backward only) */
    const int64_t *sof;                 /* [3, lmax]: key index - sof = the key's slot along the axis */
    int64_t lmax, B, L0, L1, L2, H, Hk, D, Dv, R0, R1, R2, K0, K1, K2;
    float scale;
    float *attn;                        /* [T*H, K]: the weights (forward, return_attn), or NULL */
    const float *dattn;                 /* [T*H, K]: their gradient (backward), or NULL */
    float *dab;                         /* [T*H, K]: the gradient of attn_bias (backward), or NULL */
    float *out, *lse;                   /* [T*H, Dv], [T*H]: written by forward, read by backward */
    const float *dout, *dlse;           /* [T*H, Dv], [T*H] or NULL (no gradient into the LSE) */
    float *dq, *dk, *dv;                /* [T*H, D], [T*Hk, D], [T*Hk, Dv] */
    float *drpb;                        /* [nthreads, H*R0*R1*R2]: one slice per thread, summed by the caller */
    float *nlse_t, *delta_t;            /* backward: -lse and delta at qt(...) (see qt), + 8 zeroed floats */
    int64_t split, chunk;               /* fused backward: chunks of `chunk` indices (pairs on axis 2) of axis `split` */
    int nthreads;
} na_args;

#define TAB(t, a, i) ((t)[(a) * A->lmax + (i)])

/* Scratch slots one item may need: (longest run on axes 0, 1) x (widest union of two neighbouring
 * runs on axis 2), rounded up to a vector, plus one vector that row-wise vector stores may overrun. */
static int64_t max_slots(const na_args *A, const int64_t *lo, const int64_t *hi) {
    const int64_t L[3] = {A->L0, A->L1, A->L2};
    int64_t n = 1;
    for (int a = 0; a < 3; a++) {
        const int64_t *l = lo + a * A->lmax, *h = hi + a * A->lmax;
        int64_t m = 1;
        for (int64_t i = 0; i < L[a]; i++) {
            /* axis 2: the union of the runs of i and i + 1 */
            const int64_t j = a == 2 && i + 1 < L[a] ? i + 1 : i, run = h[j] - l[i] + 1;
            m = run > m ? run : m;
        }
        n *= m;
    }
    return round8(n) + W;
}

typedef struct {
    int64_t *row;    /* slot -> row of the gathered tensor */
    int32_t *ok;     /* [2][cap]: -1 where pair i counts (inside its window, key not masked), else 0 */
    int32_t *ridx;   /* [2][cap]: slot -> flat rpb index, -1 where the pair does not count */
    int32_t *sidx;   /* [2][cap]: slot -> neighbourhood slot of the pair (attn_bias, weights), or -1 */
    float *bias;     /* [2][cap] */
    float *dadd;     /* [2][cap]: the weights' gradient of each pair (backward with dattn), else 0 */
    float *s, *dp;   /* [2][cap] */
    float *dl;       /* [cap]: per-slot delta (dK/dV pass) */
    float *tmp;      /* [2][max(D, Dv)]: rows of the discarded second query of an odd tail */
    int64_t *col, *a2; /* [cap]: axis-2 template (see axis2_template) */
    int32_t *in;     /* [2][cap]: -1 where pair i is inside its window, else 0 */
    int64_t cap;
} scratch;

static int scratch_init(scratch *S, int64_t cap, int64_t dim) {
    S->cap = cap;
    S->row = malloc(sizeof(int64_t) * cap);
    S->ok = malloc(sizeof(int32_t) * 2 * cap);
    S->ridx = malloc(sizeof(int32_t) * 2 * cap);
    S->sidx = malloc(sizeof(int32_t) * 2 * cap);
    S->bias = malloc(sizeof(float) * 2 * cap);
    S->dadd = malloc(sizeof(float) * 2 * cap);
    S->s = malloc(sizeof(float) * 2 * cap);
    S->dp = malloc(sizeof(float) * 2 * cap);
    S->dl = malloc(sizeof(float) * cap);
    S->tmp = calloc(2 * dim, sizeof(float));
    S->col = malloc(sizeof(int64_t) * cap);
    S->a2 = malloc(sizeof(int64_t) * cap);
    S->in = malloc(sizeof(int32_t) * 2 * cap);
    return S->row && S->ok && S->ridx && S->sidx && S->bias && S->dadd && S->s && S->dp && S->dl && S->tmp &&
           S->col && S->a2 && S->in;
}

static void scratch_free(scratch *S) {
    free(S->row); free(S->ok); free(S->ridx); free(S->sidx); free(S->bias); free(S->dadd); free(S->s);
    free(S->dp); free(S->dl); free(S->tmp); free(S->col); free(S->a2); free(S->in);
}

/* Whether slots need their neighbourhood-slot index (per-pair tensors in slot order). */
static int wants_sidx(const na_args *A) { return A->ab || A->attn || A->dattn || A->dab; }

/* Whether a slot's bias depends on the head (rpb, attn_bias): then head_bias writes it per head. */
static int per_head_bias(const na_args *A) { return A->rpb || A->ab; }

/* Flat token index of (b, group-major indices i0, i1, i2). */
static int64_t token(const na_args *A, int64_t b, int64_t i0, int64_t i1, int64_t i2) {
    return ((b * A->L0 + TAB(A->pos, 0, i0)) * A->L1 + TAB(A->pos, 1, i1)) * A->L2 + TAB(A->pos, 2, i2);
}

/* Whether key (b, i0, i1, i2) is masked out by key_padding_mask. */
static int masked(const na_args *A, int64_t b, int64_t i0, int64_t i1, int64_t i2) {
    return A->kpm && A->kpm[token(A, b, i0, i1, i2)];
}

/* The axis-2 part of a slot list, shared by every row of it: for union slot u (0 <= u < nub, padded
 * with copies of the last index), col[u] = pos * heads + head (row offset within a row of tokens) and
 * in_i[u] = -1 if pair i is inside its window (0 for u >= nu); for key slots (keys = 1) the window
 * test is made from the query at u's side. */
static void axis2_template(const na_args *A, scratch *S, int64_t ulo, int64_t nu, int64_t nub, int64_t heads,
                           int64_t head, const int64_t pair[2], int keys) {
    const int64_t *pos2 = A->pos + 2 * A->lmax, *lo2 = A->lo + 2 * A->lmax, *hi2 = A->hi + 2 * A->lmax;
    for (int64_t u = 0; u < nub; u++) {
        const int64_t a2 = ulo + (u < nu ? u : nu - 1);
        CHECK(u < S->cap && 0 <= a2 && a2 < A->L2 && 0 <= pos2[a2] && pos2[a2] < A->L2);
        S->col[u] = pos2[a2] * heads + head;
        S->a2[u] = a2;
        for (int i = 0; i < 2; i++) {
            /* query slots: key a2 in the window of query pair[i]; key slots: key pair[i] in query a2's */
            const int64_t qq = keys ? a2 : pair[i], kk = keys ? pair[i] : a2;
            S->in[i * S->cap + u] = u < nu && lo2[qq] <= kk && kk <= hi2[qq] ? -1 : 0;
        }
    }
}

/* Pads a slot list of n slots to a multiple of 8 with copies of its last row, bias NEG, no rpb or
 * slot index and delta 0 (weight 0: they add nothing anywhere); returns the padded count. Rows are
 * not padded one by one: for k = 5 that would be 8 slots for a 6-key union, for k = 3 8 for 4. */
static int64_t pad_slots(scratch *S, int64_t n) {
    const int64_t np = round8(n), cap = S->cap;
    CHECK(n >= 1 && np <= cap);
    for (int64_t j = n; j < np; j++) {
        S->row[j] = S->row[n - 1];
        S->bias[j] = S->bias[cap + j] = NEG;
        S->ok[j] = S->ok[cap + j] = 0;
        S->ridx[j] = S->ridx[cap + j] = -1;
        S->sidx[j] = S->sidx[cap + j] = -1;
        S->dl[j] = 0.0f;
    }
    return np;
}

/* Slots of the query pair (x2[0], x2[1]) at (b, x0, x1): every key of the union of their windows,
 * key-row by key-row (rows of nu slots, back to back), padded by pad_slots. Rows are those of kv
 * head 0 (kv head hk reads row + hk); ok marks where pair i counts (key inside query i's window and
 * not masked), ridx is the flat rpb index of head 0 and sidx the neighbourhood slot (-1 where the
 * pair does not count), so one slot list serves every head. Without rpb and attn_bias the bias (0
 * where the pair counts, NEG elsewhere) is written here; with them, head_bias writes it per head.
 * Returns the padded slot count. */
static int64_t query_slots(const na_args *A, scratch *S, int64_t b, int64_t x0, int64_t x1, const int64_t x2[2]) {
    const int64_t cap = S->cap;
    const int64_t ulo = TAB(A->lo, 2, x2[0]), nu = TAB(A->hi, 2, x2[1]) - ulo + 1, nub = round8(nu);
    axis2_template(A, S, ulo, nu, nub, A->Hk, 0, x2, 0);
    const int64_t rof2[2] = {TAB(A->rof, 2, x2[0]), TAB(A->rof, 2, x2[1])};
    const int64_t sof2[2] = {TAB(A->sof, 2, x2[0]), TAB(A->sof, 2, x2[1])};
    const int slots = wants_sidx(A);
    int64_t n = 0;
    for (int64_t a0 = TAB(A->lo, 0, x0); a0 <= TAB(A->hi, 0, x0); a0++) {
        for (int64_t a1 = TAB(A->lo, 1, x1); a1 <= TAB(A->hi, 1, x1); a1++, n += nu) {
            const int64_t base = ((b * A->L0 + TAB(A->pos, 0, a0)) * A->L1 + TAB(A->pos, 1, a1)) * A->L2 * A->Hk;
            CHECK(0 <= a0 && a0 < A->L0 && 0 <= a1 && a1 < A->L1 && n + nub <= S->cap);
            for (int64_t u = 0; u < nu; u++) {
                S->row[n + u] = base + S->col[u];
                CHECK(0 <= S->row[n + u] && S->row[n + u] + A->Hk - 1 < A->B * A->L0 * A->L1 * A->L2 * A->Hk);
            }
            /* ok: inside the pair's window and not masked; vector stores past nu are overwritten by
             * the next row (or padding) */
            for (int i = 0; i < 2; i++)
                for (int64_t u = 0; u < nub; u += W) *(v8iu *)(S->ok + i * cap + n + u) = *(const v8iu *)(S->in + i * cap + u);
            if (A->kpm)
                for (int64_t u = 0; u < nu; u++)
                    if (masked(A, b, a0, a1, S->a2[u])) S->ok[n + u] = S->ok[cap + n + u] = 0;
            if (!per_head_bias(A))
                for (int64_t u = 0; u < nu; u += W)
                    for (int i = 0; i < 2; i++)
                        st(S->bias + i * cap + n + u, sel(*(const v8iu *)(S->ok + i * cap + n + u), bc(0.0f), bc(NEG)));
            const int64_t r01 = ((a0 - TAB(A->rof, 0, x0)) * A->R1 + a1 - TAB(A->rof, 1, x1)) * A->R2;
            const int64_t s01 = ((a0 - TAB(A->sof, 0, x0)) * A->K1 + a1 - TAB(A->sof, 1, x1)) * A->K2;
            for (int i = 0; i < 2; i++) {
                const int32_t *ok = S->ok + i * cap + n;
                for (int64_t u = 0; u < nu; u++) {
                    if (A->rpb) {
                        const int64_t ri = r01 + S->a2[u] - rof2[i];
                        CHECK(!ok[u] || (0 <= ri && ri < A->R0 * A->R1 * A->R2));
                        S->ridx[i * cap + n + u] = ok[u] ? (int32_t)ri : -1;
                    }
                    if (slots) {
                        const int64_t si = s01 + S->a2[u] - sof2[i];
                        CHECK(!ok[u] || (0 <= si && si < A->K0 * A->K1 * A->K2));
                        S->sidx[i * cap + n + u] = ok[u] ? (int32_t)si : -1;
                    }
                }
            }
        }
    }
    return pad_slots(S, n);
}

/* With rpb or attn_bias: the bias of head h for the n slots of query_slots (rpb of head h plus
 * attn_bias of query row r[i] where pair i counts, NEG elsewhere). */
static void head_bias(const na_args *A, scratch *S, int64_t n, int64_t h, const int64_t r[2]) {
    const int64_t K = A->K0 * A->K1 * A->K2;
    const float *rpb = A->rpb ? A->rpb + h * A->R0 * A->R1 * A->R2 : NULL;
    for (int i = 0; i < 2; i++) {
        const int32_t *ok = S->ok + i * S->cap, *ri = S->ridx + i * S->cap, *si = S->sidx + i * S->cap;
        const float *ab = A->ab ? A->ab + r[i] * K : NULL;
        float *bias = S->bias + i * S->cap;
        for (int64_t j = 0; j < n; j++)
            bias[j] = ok[j] ? (rpb ? rpb[ri[j]] : 0.0f) + (ab ? ab[si[j]] : 0.0f) : NEG;
    }
}

/* With dattn: the weights' gradient of the pairs of rows r[0], r[1] in slot order (0 where a pair does
 * not count), into S->dadd. */
static void head_dattn(const na_args *A, scratch *S, int64_t n, const int64_t r[2]) {
    const int64_t K = A->K0 * A->K1 * A->K2;
    for (int i = 0; i < 2; i++) {
        const int32_t *si = S->sidx + i * S->cap;
        const float *da = A->dattn + r[i] * K;
        float *dadd = S->dadd + i * S->cap;
        for (int64_t j = 0; j < n; j++) dadd[j] = si[j] >= 0 ? da[si[j]] : 0.0f;
    }
}

/* out[r_i * K + slot] = w_i[j] * f_i for the slots where pair i counts (the rows of attn or dab),
 * pairs 0 .. npairs - 1; rows are zeroed before, so slots that hold no key stay 0. */
static void scatter_slots(const na_args *A, const scratch *S, int64_t n, int npairs, const int64_t r[2],
                          const float *w0, const float *w1, const float f[2], float *out) {
    const int64_t K = A->K0 * A->K1 * A->K2;
    const float *w[2] = {w0, w1};
    for (int i = 0; i < npairs; i++) {
        const int32_t *si = S->sidx + i * S->cap;
        float *o = out + r[i] * K;
        for (int64_t j = 0; j < n; j++)
            if (si[j] >= 0) o[si[j]] = w[i][j] * f[i];
    }
}

/* Work item -> (b, i0, i1, pair of indices along axis 2, head), head fastest (heads = 1: no head). */
static void unravel(const na_args *A, int64_t item, int64_t heads, int64_t *b, int64_t *i0, int64_t *i1,
                    int64_t i2[2], int64_t *head) {
    const int64_t npair = (A->L2 + 1) / 2;
    *head = item % heads;
    item /= heads;
    const int64_t p = item % npair;
    item /= npair;
    *i1 = item % A->L1;
    item /= A->L1;
    *i0 = item % A->L0;
    *b = item / A->L0;
    i2[0] = 2 * p;
    i2[1] = 2 * p + 1 < A->L2 ? 2 * p + 1 : 2 * p;
}

static int64_t qrow(const na_args *A, int64_t b, int64_t x0, int64_t x1, int64_t x2, int64_t heads, int64_t h) {
    CHECK(0 <= b && b < A->B && 0 <= x0 && x0 < A->L0 && 0 <= x1 && x1 < A->L1 && 0 <= x2 && x2 < A->L2);
    return (((b * A->L0 + TAB(A->pos, 0, x0)) * A->L1 + TAB(A->pos, 1, x1)) * A->L2 + TAB(A->pos, 2, x2)) * heads + h;
}

/* Row-wise softmax of the pair's scores in place (unnormalized: exp(s - max)); returns the LSE of
 * each row and writes 1 / its sum into inv. A row without any key (all NEG) gets weights 0, inv 0
 * and LSE -inf. */
static void softmax2(float *s0, float *s1, int64_t n, float lse[2], float inv[2]) {
    float *s[2] = {s0, s1};
    for (int i = 0; i < 2; i++) {
        v8f mv = bc(NEG);
        for (int64_t j = 0; j < n; j += W) {
            v8f x = ld(s[i] + j);
            mv = sel(x > mv, x, mv);
        }
        float m = mv[0];
        for (int t = 1; t < W; t++) m = mv[t] > m ? mv[t] : m;
        if (m == NEG) {
            for (int64_t j = 0; j < n; j += W) st(s[i] + j, bc(0.0f));
            lse[i] = NEG;
            inv[i] = 0.0f;
            continue;
        }
        v8f sum = bc(0.0f);
        for (int64_t j = 0; j < n; j += W) {
            v8f p = vexp(ld(s[i] + j) - bc(m));
            st(s[i] + j, p);
            sum += p;
        }
        float l = 0;
        for (int t = 0; t < W; t++) l += sum[t];
        lse[i] = m + logf(l);
        inv[i] = 1.0f / l;
    }
}

/* Index of query (b, x0, x1, x2) head h (group-major indices) in the backward's -lse and delta
 * copies, laid out [B, L0, L1, H, L2]: the queries of one key row are then consecutive. */
static int64_t qt(const na_args *A, int64_t b, int64_t x0, int64_t x1, int64_t h, int64_t x2) {
    return (((b * A->L0 + x0) * A->L1 + x1) * A->H + h) * A->L2 + x2;
}

/* drpb[ridx_i[j]] += dS_i[j] for the slots inside a window (ridx >= 0), pairs 0 .. npairs - 1. */
static void add_drpb(float *drpb, const scratch *S, int64_t n, int npairs) {
    for (int i = 0; i < npairs; i++) {
        const int32_t *ri = S->ridx + i * S->cap;
        const float *ds = S->dp + i * S->cap;
        for (int64_t j = 0; j < n; j++)
            if (ri[j] >= 0) drpb[ri[j]] += ds[j];
    }
}

/* Work items of the query passes: (b, x0, x1, pair along axis 2); each item builds its slots once
 * and runs every head on them. A token's heads are one contiguous record, so the head loop reads
 * whole records (sliding one head along a row instead, the 512-byte strides defeated the prefetchers:
 * measured 1.25x slower). */
static void forward_items(const na_args *A, scratch *S, int64_t begin, int64_t end) {
    const int64_t D = A->D, Dv = A->Dv, cap = S->cap, G = A->H / A->Hk;
    float *s0 = S->s, *s1 = S->s + cap;
    for (int64_t item = begin; item < end; item++) {
        int64_t b, x0, x1, x2[2], unused;
        unravel(A, item, 1, &b, &x0, &x1, x2, &unused);
        const int two = x2[1] != x2[0];
        const int64_t n = query_slots(A, S, b, x0, x1, x2);
        for (int64_t h = 0; h < A->H; h++) {
            const int64_t hk = h / G;
            const int64_t r0 = qrow(A, b, x0, x1, x2[0], A->H, h), r1 = qrow(A, b, x0, x1, x2[1], A->H, h);
            const int64_t r[2] = {r0, r1};
            if (per_head_bias(A)) head_bias(A, S, n, h, r);
            scores2(A->q + r0 * D, A->q + r1 * D, A->k + hk * D, S->row, n, D, A->scale, S->bias, S->bias + cap,
                    s0, s1);
            float lse[2], inv[2];
            softmax2(s0, s1, n, lse, inv);
            if (A->attn) {
                const int64_t K = A->K0 * A->K1 * A->K2;
                for (int i = 0; i < 1 + two; i++) memset(A->attn + r[i] * K, 0, sizeof(float) * K);
                scatter_slots(A, S, n, 1 + two, r, s0, s1, inv, A->attn);
            }
            float *o0 = A->out + r0 * Dv, *o1 = two ? A->out + r1 * Dv : S->tmp;
            memset(o0, 0, sizeof(float) * Dv);
            memset(o1, 0, sizeof(float) * Dv);
            accum2(s0, s1, A->v + hk * Dv, S->row, n, Dv, inv[0], inv[1], o0, o1);
            A->lse[r0] = lse[0];
            if (two) A->lse[r1] = lse[1];
        }
    }
}

static void backward_dq_items(const na_args *A, scratch *S, float *drpb, int64_t begin, int64_t end) {
    const int64_t D = A->D, Dv = A->Dv, cap = S->cap, G = A->H / A->Hk, R = A->R0 * A->R1 * A->R2;
    float *s0 = S->s, *s1 = S->s + cap, *p0 = S->dp, *p1 = S->dp + cap;
    for (int64_t item = begin; item < end; item++) {
        int64_t b, x0, x1, x2[2], unused;
        unravel(A, item, 1, &b, &x0, &x1, x2, &unused);
        const int two = x2[1] != x2[0];
        const int64_t n = query_slots(A, S, b, x0, x1, x2);
        for (int64_t h = 0; h < A->H; h++) {
            const int64_t hk = h / G;
            const int64_t r[2] = {qrow(A, b, x0, x1, x2[0], A->H, h), qrow(A, b, x0, x1, x2[1], A->H, h)};
            float nlse[2], delta[2]; /* from pass 3's copies (-lse is NEG for a query without keys) */
            for (int i = 0; i < 2; i++) {
                nlse[i] = A->nlse_t[qt(A, b, x0, x1, h, x2[i])];
                delta[i] = A->delta_t[qt(A, b, x0, x1, h, x2[i])];
            }
            if (per_head_bias(A)) head_bias(A, S, n, h, r);
            if (A->dattn) head_dattn(A, S, n, r);
            scores2(A->q + r[0] * D, A->q + r[1] * D, A->k + hk * D, S->row, n, D, A->scale, S->bias, S->bias + cap,
                    s0, s1);
            /* dP = dO . V (+ the weights' gradient), then dS = P * (dP - delta) in place of dP. */
            scores2(A->dout + r[0] * Dv, A->dout + r[1] * Dv, A->v + hk * Dv, S->row, n, Dv, 1.0f,
                    A->dattn ? S->dadd : NULL, A->dattn ? S->dadd + cap : NULL, p0, p1);
            for (int64_t j = 0; j < n; j += W) {
                st(p0 + j, vexp(ld(s0 + j) + bc(nlse[0])) * (ld(p0 + j) - bc(delta[0])));
                st(p1 + j, vexp(ld(s1 + j) + bc(nlse[1])) * (ld(p1 + j) - bc(delta[1])));
            }
            float *g0 = A->dq + r[0] * D, *g1 = two ? A->dq + r[1] * D : S->tmp;
            if (!two) memset(g1, 0, sizeof(float) * D); /* dq itself was zeroed by pass 3 */
            accum2(p0, p1, A->k + hk * D, S->row, n, D, A->scale, A->scale, g0, g1);
            if (drpb) add_drpb(drpb + h * R, S, n, 1 + two); /* ridx is relative to head 0's table */
            if (A->dab) scatter_slots(A, S, n, 1 + two, r, p0, p1, (const float[2]){1.0f, 1.0f}, A->dab);
        }
    }
}

/* Slots of the key pair (y2[0], y2[1]) at (b, y0, y1) for query head h: every query whose window
 * holds either key (inverse runs qlo..qhi), row by row, laid out and padded like query_slots. Pair
 * (query, key i) counts (ok) where key i is in the query's window and not masked; its bias is then
 * -lse(query) + rpb + attn_bias, NEG elsewhere; dl is the query's delta; ridx (rpb) and sidx
 * (attn_bias, weights) index the pair's bias entries, -1 where it does not count; with dattn, dadd
 * holds the weights' gradient. A row's queries are consecutive in the qt layout, so -lse and delta
 * come as vector loads (padding slots read past the row: finite values or NEG, masked to NEG and
 * weight 0). */
static int64_t key_slots(const na_args *A, scratch *S, int64_t b, int64_t y0, int64_t y1, const int64_t y2[2],
                         int64_t h) {
    const int64_t cap = S->cap, *rof2 = A->rof + 2 * A->lmax, *sof2 = A->sof + 2 * A->lmax, *col = S->col;
    const int64_t ulo = TAB(A->qlo, 2, y2[0]), nu = TAB(A->qhi, 2, y2[1]) - ulo + 1, nub = round8(nu);
    const int64_t K = A->K0 * A->K1 * A->K2;
    const int slots = wants_sidx(A);
    axis2_template(A, S, ulo, nu, nub, A->H, h, y2, 1);
    /* a masked key counts for no query */
    const v8i live[2] = {bci(masked(A, b, y0, y1, y2[0]) ? 0 : -1), bci(masked(A, b, y0, y1, y2[1]) ? 0 : -1)};
    int64_t n = 0;
    for (int64_t x0 = TAB(A->qlo, 0, y0); x0 <= TAB(A->qhi, 0, y0); x0++) {
        for (int64_t x1 = TAB(A->qlo, 1, y1); x1 <= TAB(A->qhi, 1, y1); x1++, n += nu) {
            const int64_t base = ((b * A->L0 + TAB(A->pos, 0, x0)) * A->L1 + TAB(A->pos, 1, x1)) * A->L2 * A->H;
            const int64_t t0 = qt(A, b, x0, x1, h, ulo);
            CHECK(0 <= x0 && x0 < A->L0 && 0 <= x1 && x1 < A->L1 && n + nub <= S->cap);
            CHECK(t0 + nub <= A->B * A->L0 * A->L1 * A->L2 * A->H + W);
            int64_t *rows = S->row + n;
            float *dl = S->dl + n;
            for (int64_t u = 0; u < nu; u++) {
                rows[u] = base + col[u];
                CHECK(0 <= rows[u] && rows[u] < A->B * A->L0 * A->L1 * A->L2 * A->H);
            }
            for (int64_t u = 0; u < nu; u += W) { /* stores past nu: overwritten by the next row or padding */
                const v8f nl = ld(A->nlse_t + t0 + u);
                st(dl + u, ld(A->delta_t + t0 + u));
                for (int i = 0; i < 2; i++) {
                    const v8i ok = *(const v8iu *)(S->in + i * cap + u) & live[i];
                    *(v8iu *)(S->ok + i * cap + n + u) = ok;
                    st(S->bias + i * cap + n + u, sel(ok, nl, bc(NEG)));
                }
            }
            if (!A->rpb && !slots) continue;
            const int64_t r01 = ((h * A->R0 + y0 - TAB(A->rof, 0, x0)) * A->R1 + y1 - TAB(A->rof, 1, x1)) * A->R2;
            const int64_t s01 = ((y0 - TAB(A->sof, 0, x0)) * A->K1 + y1 - TAB(A->sof, 1, x1)) * A->K2;
            for (int i = 0; i < 2; i++) {
                const int32_t *ok = S->ok + i * cap + n;
                float *bias = S->bias + i * cap + n, *dadd = S->dadd + i * cap + n;
                int32_t *ridx = S->ridx + i * cap + n, *sidx = S->sidx + i * cap + n;
                for (int64_t u = 0; u < nu; u++) {
                    ridx[u] = sidx[u] = -1;
                    if (A->dattn) dadd[u] = 0.0f;
                    if (!ok[u]) continue;
                    if (A->rpb) {
                        const int64_t ri = r01 + y2[i] - rof2[S->a2[u]];
                        CHECK(0 <= ri && ri < A->H * A->R0 * A->R1 * A->R2);
                        ridx[u] = (int32_t)ri;
                        bias[u] += A->rpb[ri];
                    }
                    if (slots) {
                        const int64_t si = s01 + y2[i] - sof2[S->a2[u]];
                        CHECK(0 <= si && si < K);
                        sidx[u] = (int32_t)si;
                        if (A->ab) bias[u] += A->ab[rows[u] * K + si];
                        if (A->dattn) dadd[u] = A->dattn[rows[u] * K + si];
                    }
                }
            }
        }
    }
    if (A->dattn)
        for (int64_t j = n; j < round8(n); j++) S->dadd[j] = S->dadd[cap + j] = 0.0f;
    return pad_slots(S, n);
}

/* dab[row[j] * K + sidx_i[j]] = dS_i[j] (the pair's bias gradient) for the slots of key_slots where
 * pair i counts, pairs 0 .. npairs - 1: each (query, slot) is written by exactly one key. */
static void scatter_key_slots(const na_args *A, const scratch *S, int64_t n, int npairs, const float *ds0,
                              const float *ds1) {
    const int64_t K = A->K0 * A->K1 * A->K2;
    const float *ds[2] = {ds0, ds1};
    for (int i = 0; i < npairs; i++) {
        const int32_t *si = S->sidx + i * S->cap;
        for (int64_t j = 0; j < n; j++)
            if (si[j] >= 0) A->dab[S->row[j] * K + si[j]] = ds[i][j];
    }
}

/* G[row[j]][c:c+8*NC] += f0 * w0[j] * a0[c:..] + f1 * w1[j] * a1[c:..] for j < n; NC is a literal
 * after inlining, so a0 and a1's 2*NC vectors stay in registers. */
static inline __attribute__((always_inline)) void scatter_block(const int NC, const float *w0, const float *w1,
                                                               const float *a0, const float *a1, float f0,
                                                               float f1, const int64_t *row, int64_t n,
                                                               int64_t dim, int64_t c, float *G) {
    v8f x0[4], x1[4];
    for (int t = 0; t < NC; t++) {
        x0[t] = ld(a0 + c + W * t) * bc(f0);
        x1[t] = ld(a1 + c + W * t) * bc(f1);
    }
    for (int64_t j = 0; j < n; j++) {
        float *g = G + row[j] * dim + c;
        const v8f p0 = bc(w0[j]), p1 = bc(w1[j]);
        for (int t = 0; t < NC; t++) st(g + W * t, ld(g + W * t) + p0 * x0[t] + p1 * x1[t]);
    }
}

/* The fused pass's dQ update, a rank-2 update of n scattered rows: G[row[j]] += f0 * w0[j] * a0 +
 * f1 * w1[j] * a1. */
static void scatter2(const float *w0, const float *w1, const float *a0, const float *a1, float f0, float f1,
                     const int64_t *row, int64_t n, int64_t dim, float *G) {
    for (int64_t c = 0; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: scatter_block(1, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            case 2: scatter_block(2, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            case 3: scatter_block(3, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            default: scatter_block(4, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
        }
    }
}

/* dK and dV of the key pair (y2[0], y2[1]) at (b, y0, y1), kv head hk: each key gathers from the
 * queries that see it. fused: also scatter dQ += scale * dS K into those queries' rows and the bias
 * gradient into drpb; the caller guarantees no other thread touches those rows meanwhile. */
static void dkv_item(const na_args *A, scratch *S, int64_t b, int64_t y0, int64_t y1, const int64_t y2[2],
                     int64_t hk, int fused, float *drpb) {
    const int64_t D = A->D, Dv = A->Dv, cap = S->cap, G = A->H / A->Hk;
    float *s0 = S->s, *s1 = S->s + cap, *p0 = S->dp, *p1 = S->dp + cap;
    const int two = y2[1] != y2[0];
    const int64_t r0 = qrow(A, b, y0, y1, y2[0], A->Hk, hk), r1 = qrow(A, b, y0, y1, y2[1], A->Hk, hk);
    float *gk0 = A->dk + r0 * D, *gk1 = two ? A->dk + r1 * D : S->tmp;
    float *gv0 = A->dv + r0 * Dv, *gv1 = two ? A->dv + r1 * Dv : S->tmp + D;
    memset(gk0, 0, sizeof(float) * D);
    memset(gk1, 0, sizeof(float) * D);
    memset(gv0, 0, sizeof(float) * Dv);
    memset(gv1, 0, sizeof(float) * Dv);
    for (int64_t h = hk * G; h < hk * G + G; h++) {
        const int64_t n = key_slots(A, S, b, y0, y1, y2, h);
        /* P^T (bias holds -lse), dP^T = V . dO, dS^T = P^T (dP^T - delta) */
        scores2(A->k + r0 * D, A->k + r1 * D, A->q, S->row, n, D, A->scale, S->bias, S->bias + cap, s0, s1);
        scores2(A->v + r0 * Dv, A->v + r1 * Dv, A->dout, S->row, n, Dv, 1.0f, A->dattn ? S->dadd : NULL,
                A->dattn ? S->dadd + cap : NULL, p0, p1); /* + the weights' gradient */
        for (int64_t j = 0; j < n; j += W) {
            v8f P0 = vexp(ld(s0 + j)), P1 = vexp(ld(s1 + j)), dl = ld(S->dl + j);
            st(s0 + j, P0);
            st(s1 + j, P1);
            st(p0 + j, P0 * (ld(p0 + j) - dl));
            st(p1 + j, P1 * (ld(p1 + j) - dl));
        }
        accum2(s0, s1, A->dout, S->row, n, Dv, 1.0f, 1.0f, gv0, gv1);
        accum2(p0, p1, A->q, S->row, n, D, A->scale, A->scale, gk0, gk1);
        if (!fused) continue;
        /* Padding slots repeat a real row with dS = 0 exactly; the duplicate of an odd tail's second
         * key is weighted 0 so it is not counted twice. */
        scatter2(p0, p1, A->k + r0 * D, A->k + r1 * D, A->scale, two ? A->scale : 0.0f, S->row, n, D, A->dq);
        if (drpb) add_drpb(drpb, S, n, 1 + two);
        if (A->dab) scatter_key_slots(A, S, n, 1 + two, p0, p1);
    }
}

static void backward_dkv_items(const na_args *A, scratch *S, int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; item++) {
        int64_t b, y0, y1, y2[2], hk;
        unravel(A, item, A->Hk, &b, &y0, &y1, y2, &hk);
        dkv_item(A, S, b, y0, y1, y2, hk, 0, NULL);
    }
}

static int64_t split_length(const na_args *A) {
    return A->split == 2 ? (A->L2 + 1) / 2 : A->split == 1 ? A->L1 : A->L0;
}

static int64_t fused_units(const na_args *A, int colour) {
    const int64_t nchunks = (split_length(A) + A->chunk - 1) / A->chunk;
    return A->B * ((nchunks - colour + 1) / 2) * A->Hk;
}

/* Indices of the split axis in a unit's chunk: the work of the unit (the last chunk may be short). */
static int64_t unit_chunk(const na_args *A, int colour, int64_t unit, int64_t *first) {
    const int64_t per_b = fused_units(A, colour) / (A->B * A->Hk), len = split_length(A);
    *first = (colour + 2 * ((unit / A->Hk) % per_b)) * A->chunk;
    return *first + A->chunk < len ? A->chunk : len - *first;
}

/* Thread tid's run of units [*begin, *end): split by work (chunk lengths), not by unit count, since
 * a short last chunk would leave one thread idle at the barrier between the colours. */
static void fused_share(const na_args *A, int colour, int tid, int nt, int64_t *begin, int64_t *end) {
    const int64_t units = fused_units(A, colour);
    int64_t total = 0, done = 0, first;
    for (int64_t u = 0; u < units; u++) total += unit_chunk(A, colour, u, &first);
    *begin = *end = units;
    for (int64_t u = 0; u < units; u++) {
        const int64_t w = unit_chunk(A, colour, u, &first);
        int64_t owner = (2 * done + w) * nt / (2 * total); /* the thread owning the unit's midpoint */
        owner = owner < nt ? owner : nt - 1;
        if (owner == tid && *begin == units) *begin = u;
        if (owner > tid) {
            *end = u;
            break;
        }
        done += w;
    }
    if (*begin == units) *end = units;
}

/* Fused backward, one colour: units (b, chunk, kv head), kv head fastest, for the chunks
 * colour, colour + 2, ... of the split axis. The caller chose the chunk length so that the queries
 * seeing chunk c and those seeing chunk c + 2 are disjoint: units of one colour write disjoint dQ
 * rows (and dK/dV rows), so the threads need no atomics, and each dQ row sums its terms in the same
 * order whatever the thread count. Needs pass 3 first (delta, dq zeroed). */
static void backward_fused_units(const na_args *A, scratch *S, float *drpb, int colour, int64_t begin, int64_t end) {
    const int64_t npair = (A->L2 + 1) / 2;
    for (int64_t unit = begin; unit < end; unit++) {
        const int64_t hk = unit % A->Hk, b = unit / (fused_units(A, colour) / A->B);
        int64_t lo[3] = {0, 0, 0}, hi[3] = {A->L0, A->L1, npair}, first;
        const int64_t len = unit_chunk(A, colour, unit, &first);
        lo[A->split] = first;
        hi[A->split] = first + len;
        for (int64_t y0 = lo[0]; y0 < hi[0]; y0++)
            for (int64_t y1 = lo[1]; y1 < hi[1]; y1++)
                for (int64_t p = lo[2]; p < hi[2]; p++) {
                    const int64_t y2[2] = {2 * p, 2 * p + 1 < A->L2 ? 2 * p + 1 : 2 * p};
                    dkv_item(A, S, b, y0, y1, y2, hk, 1, drpb);
                }
    }
}

/* Pass 3, first of either backward, over lines (b, x0, x1, h) of the qt layout: delta =
 * rowsum(dO * O) - dLSE, the backward's per-query constant, and -lse, into the qt copies; also
 * zeroes dq, which both backward paths accumulate into, and the rows of the attn_bias gradient, whose
 * slots without a key are never written (here, in parallel, not in a separate fill). */
static void delta_lines(const na_args *A, int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; line++) {
        const int64_t h = line % A->H, x1 = line / A->H % A->L1, x0 = line / A->H / A->L1 % A->L0;
        const int64_t b = line / A->H / A->L1 / A->L0;
        for (int64_t x2 = 0; x2 < A->L2; x2++) {
            const int64_t r = qrow(A, b, x0, x1, x2, A->H, h), t = line * A->L2 + x2;
            CHECK(t == qt(A, b, x0, x1, h, x2));
            /* a query without keys (LSE -inf) has P = 0 everywhere: -lse NEG keeps it so, delta 0 */
            const int empty = A->lse[r] == NEG;
            A->delta_t[t] = empty ? 0.0f : dot(A->dout + r * A->Dv, A->out + r * A->Dv, A->Dv) - (A->dlse ? A->dlse[r] : 0.0f);
            A->nlse_t[t] = empty ? NEG : -A->lse[r];
            memset(A->dq + r * A->D, 0, sizeof(float) * A->D);
            if (A->dab) memset(A->dab + r * A->K0 * A->K1 * A->K2, 0, sizeof(float) * A->K0 * A->K1 * A->K2);
        }
    }
}

typedef struct {
    const na_args *A;
    int pass, tid, nt;
    int64_t items;
    int status;
} job;

static float *drpb_slice(const na_args *A, int tid) {
    return A->drpb ? A->drpb + (int64_t)tid * A->H * A->R0 * A->R1 * A->R2 : NULL;
}

static void *run_job(void *arg) {
    job *J = arg;
    const na_args *A = J->A;
    int64_t begin = J->items * J->tid / J->nt, end = J->items * (J->tid + 1) / J->nt;
    if (J->pass >= 4) fused_share(A, J->pass - 4, J->tid, J->nt, &begin, &end);
    J->status = 0;
    if (J->pass == 3) {
        delta_lines(A, begin, end);
        return NULL;
    }
    const int kv = J->pass >= 2;
    scratch S;
    int64_t dmax = A->D > A->Dv ? A->D : A->Dv;
    if (!scratch_init(&S, max_slots(A, kv ? A->qlo : A->lo, kv ? A->qhi : A->hi), dmax)) {
        scratch_free(&S);
        J->status = 1;
        return NULL;
    }
    if (J->pass == 0) forward_items(A, &S, begin, end);
    else if (J->pass == 1) backward_dq_items(A, &S, drpb_slice(A, J->tid), begin, end);
    else if (J->pass == 2) backward_dkv_items(A, &S, begin, end);
    else backward_fused_units(A, &S, drpb_slice(A, J->tid), J->pass - 4, begin, end);
    scratch_free(&S);
    return NULL;
}

/* pass 0: forward (out, lse). Backward, two ways:
 *   first 3: the -lse and delta copies, dq zeroed; then either
 *   1: dQ pass (dq, drpb), then 2: dK/dV pass; or
 *   4 and 5: fused dQ/dK/dV/drpb, colours 0 and 1 of the split axis's chunks, which saves the dQ
 *      pass's recomputation of S and dP.
 * Returns 0, 1 when scratch memory could not be allocated, 2 for a fused pass without a chunk plan.
 *
 * Threads: built with -fopenmp against the libgomp that PyTorch itself loaded, the work runs on
 * PyTorch's own OpenMP pool, whose workers are usually still spinning after the previous torch op
 * (a Linear, a copy): a separate pool would share the cores with them for the next ~ms (measured:
 * 2.4 ms lost per call at 56x56). Otherwise, one pthread per share. */
int na_run(const na_args *A, int pass) {
    if (pass >= 4 && (A->chunk < 1 || A->split < 0 || A->split > 2)) return 2;
    const int64_t tokens = A->B * A->L0 * A->L1 * A->L2;
    const int64_t items = pass == 3   ? tokens / A->L2 * A->H
                          : pass >= 4 ? fused_units(A, pass - 4)
                                      : A->B * A->L0 * A->L1 * ((A->L2 + 1) / 2) * (pass == 2 ? A->Hk : 1);
    /* drpb has one slice per thread: the caller allocates A->nthreads slices, in [1, MAX_THREADS] */
    const int nt = A->nthreads < 1 ? 1 : A->nthreads > MAX_THREADS ? MAX_THREADS : A->nthreads;
#ifdef _OPENMP
    int status = 0;
#pragma omp parallel num_threads(nt) reduction(| : status)
    {
        job J = {A, pass, omp_get_thread_num(), omp_get_num_threads(), items, 0};
        run_job(&J);
        status |= J.status;
    }
    return status;
#else
    job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    for (int t = 0; t < nt; t++) jobs[t] = (job){A, pass, t, nt, items, 0};
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&threads[t], NULL, run_job, &jobs[t]) == 0;
    for (int t = 1; t < nt; t++)
        if (!started[t]) run_job(&jobs[t]); /* no thread: do its share here */
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < nt; t++) {
        if (started[t]) pthread_join(threads[t], NULL);
        status |= jobs[t].status;
    }
    return status;
#endif
}
