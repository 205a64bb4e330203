/* Fused neighborhood attention on CPU: forward and race-free backward, float32 and bfloat16.
 *
 * Compiled at first use by build.py (next to this file) with the system C compiler for the host CPU
 * (-O3 -march=native) and loaded with ctypes: no Python or PyTorch headers, no C++ ABI.
 *
 * Geometry (the tables of geometry.py): every tensor is the contiguous heads-last
 * [B, L0, L1, L2, heads, dim] one (queries, outputs) or [B, M0, M1, M2, heads, dim] (keys, values: the
 * key grid, the query grid unless cross-grid), seen as rows of `dim` elements (row of token t, head h
 * is t*heads + h). Each axis is walked in group-major order (dilation group 0, then 1, ...): pos[a][i]
 * is the coordinate of query index i, kpos[a][j] that of key index j, and a query's keys are the run
 * lo[a][i]..hi[a][i] of key indices on every axis, so dilation never appears in the loops. qlo/qhi are
 * the inverse runs (the queries seeing a key; empty, qlo > qhi, for a cross-grid key no query sees); key
 * index minus sof[a][i] is its neighbourhood slot along axis a (attn_bias and weights order).
 *
 * Work is blocked as 2 queries x 8 keys: two neighbouring queries along the last axis share all
 * but one of their keys per key row, so their union is walked once and each key loaded once serves
 * both. A query pass work item is a run of RUN such pairs along the last axis, with the head loop
 * outside the pairs: one head's keys of the whole run (key rows x ~14 keys) stay in L1 while its
 * pairs use them, instead of being fetched again from L2 for every pair.
 *
 * Two element types (dt), chosen by the caller:
 *   float32: natural layout. The score micro-kernel keeps 16 vector accumulators over the head dim
 *     and reduces them with one transpose-and-add tree (its shuffles run beside the FMAs: in L1 it
 *     matches a key-transposed layout, measured); slot lists put the union's key rows back to back
 *     and pad only the total to a multiple of 8.
 *   bfloat16: the dot products run on bf16 pairs (vdpbf16ps with AVX512-BF16: 2 multiply-adds per
 *     fp32 lane; elsewhere each pair is widened to fp32 and multiplied exactly the same way), fp32
 *     accumulation, fp32 softmax statistics. Per call, the operands are first copied into layouts
 *     where no horizontal reduction is needed (prep phase, in parallel):
 *       T layout [lines, heads, dim/4, l2p] of 64-bit bf16 quads (features 4w .. 4w + 3): a 64-byte
 *         vector is 8 consecutive keys (group-major along the last axis) x one quad, so the scores
 *         of 8 keys are sum_w broadcast(query quad w) . T[w], lane pairs summed at the end (keys for
 *         scores, queries and dO in the backward);
 *       P layout [lines, heads, l2p/2, dim, 2]: two consecutive keys interleaved feature by feature,
 *         so a weighted sum of rows is sum_pairs broadcast(weight pair) . P[pair] (values in the
 *         forward; queries, dO and keys in the backward).
 *     Slot lists are then chunks of 8 consecutive keys of one key row (lanes), padded row by row.
 * Pairs outside a query's own window, masked keys and padding get a logit of NEG (-inf) and an exact
 * zero weight.
 *
 * The backward recomputes probabilities from the LSE, from the key side (each key pair gathers from
 * the queries that see it): dK and dV in registers, dQ scattered into the queries' fp32 rows, made
 * race-free by running chunks of one axis in two colours whose query sets are disjoint (fused); or,
 * when that leaves too little parallel work, a dQ pass over query runs plus the key-side pass
 * without dQ (two-pass). One na_forward or na_backward call runs a whole forward or backward; its phases (layout
 * copies and the delta prologue, colour 0, colour 1, bf16 output conversion and the fold of periodic
 * copies) are separated by barriers. One na_run_many call runs the forwards of several problems
 * (na_varlen's samples, each with its own pointers, grids and tables) in one parallel region.
 *
 * Periodic axes: the key grid M is the spec's virtual one (the axis padded circularly), whose keys are
 * read from the real k, v and mask (grid N) through ksrc; dK and dV are written per virtual key (so
 * the key pass needs no atomics) and the last phase sums each real key's copies (fold_lines).
 *
 * Vectors are GCC/Clang vector extensions of 8 floats (AVX2/AVX-512 on x86, NEON pairs on Arm);
 * AVX-512 and AVX512-BF16 intrinsics are used where the compiler targets them, with portable
 * fallbacks (build.py can add flags such as -mno-avx512bf16 to build the fallback on any machine).
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
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define NA_DPBF16 1 /* vdpbf16ps: bf16 pair dot products */
#else
#define NA_DPBF16 0
#endif
/* Which entry points this translation unit defines. build.py compiles the file twice, concurrently,
 * into two libraries, so that the first forward of a process waits only for the forward's compile
 * (about 60% of the whole) while the backward's builds on another core: NA_PART=1: the forward
 * (na_forward, na_run_many, na_features); NA_PART=2: the backward (na_backward). Unset (0): all of
 * them and na_run, one unit (C drivers). The static helpers are in both; those a part does not reach
 * are dropped by the compiler before it optimises anything, so they cost it little. */
#ifndef NA_PART
#define NA_PART 0
#endif
#define NA_FWD (NA_PART != 2)
#define NA_BWD (NA_PART != 1)

#if defined(__AVX512F__) && defined(__AVX512VL__)
#define NA_AVX512 1 /* 32 vector registers, masked loads/stores, vscalefps */
#else
#define NA_AVX512 0
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8iu __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint32_t v8uu __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t bf16;
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint16_t v16hu __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint16_t v8hu __attribute__((vector_size(16), aligned(2), may_alias));
/* 64-byte vectors (one zmm with AVX-512, two ymm elsewhere): 16 floats, or 8 x 64-bit bf16 quads. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint64_t v8q __attribute__((vector_size(64)));
typedef uint64_t v8qu __attribute__((vector_size(64), aligned(8), may_alias));
typedef uint64_t v4q __attribute__((vector_size(32)));
typedef uint64_t v4qu __attribute__((vector_size(32), aligned(8), may_alias));

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* Built with -DNA_BOUNDS_CHECK (VISATTN_CPU_BOUNDS_CHECK=1), every row, table, bias, copy and scratch
 * index is checked and a violation aborts with its line: the tests run the sweeps so. */
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

#define W 8 /* floats per vector */
/* Logit of a pair outside the window, of a masked key, of a padding slot: exp gives exactly 0. A
 * query whose logits are all NEG (every key masked, or an attn_bias of -inf) has no key: zeros out,
 * LSE -inf; the backward then uses -lse = NEG for it, so its probabilities stay 0 (never inf - inf). */
#define NEG (-INFINITY)
#define MAX_THREADS 256
#ifndef SEG
#define SEG 32 /* query pairs per query-pass work item: a segment of a query row */
#endif
#define RUN 4 /* query pairs scored, then softmaxed together (8 rows), then accumulated */
#if NA_AVX512
#define NGMAX 8 /* chunks per bf16 score block: 2 x 8 accumulators (32 vector registers) */
#else
#define NGMAX 2 /* 16 vector registers, each 64-byte vector two of them */
#endif
#define F32 0
#define BF16 1

static inline v8f ld(const float *p) { return *(const v8fu *)p; }
static inline void st(float *p, v8f x) { *(v8fu *)p = x; }
static inline v8f bc(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8i bci(int32_t x) { return (v8i){x, x, x, x, x, x, x, x}; }
static inline v8f sel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline int64_t round8(int64_t n) { return (n + W - 1) / W * W; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------------------------------
 * bfloat16 helpers */

/* 8 bf16 -> 8 floats (exact). */
static inline v8h ld8h(const bf16 *p) { return *(const v8hu *)p; }
static inline v8f bf2f(v8h h) { return (v8f)(__builtin_convertvector(h, v8u) << 16); }
static inline v8f ldh(const bf16 *p) { return bf2f(ld8h(p)); }

/* 8 floats -> 8 bf16, round to nearest even, NaN kept NaN (torch's rounding): for outputs. */
static inline v8h f2bf(v8f x) {
    const v8u u = (v8u)x;
    const v8u nan = (v8u)((u & 0x7fffffffu) > 0x7f800000u);
    const v8u r = ((u + 0x7fffu + ((u >> 16) & 1u)) & ~nan) | ((u | 0x400000u) & nan);
    return __builtin_convertvector(r >> 16, v8h);
}

/* 8 floats -> 8 bf16 for weights fed to the pair dot products (finite): vcvtneps2bf16 where present. */
static inline v8h f2bf_fast(v8f x) {
#if NA_DPBF16
    return (v8h)_mm256_cvtneps_pbh((__m256)x);
#else
    const v8u u = (v8u)x;
    return __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, v8h);
#endif
}

/* Two rows of 8 bf16 interleaved into 8 pairs (a[i] low, b[i] high): one P layout vector. */
static inline v8u pairs(v8h a, v8h b) { return __builtin_convertvector(a, v8u) | (__builtin_convertvector(b, v8u) << 16); }

/* Broadcast the bf16 pair at p (p[0] low) to all 8 lanes. */
static inline v16h bcp(const void *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    return (v16h)(v8u){w, w, w, w, w, w, w, w};
}

/* acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1] for bf16 pairs: vdpbf16ps where present; elsewhere the
 * same sums with each bf16 widened to fp32 (bf16 products are exact in fp32, so both differ only in
 * the native instruction's flushing of denormals). */
static inline v8f dp2(v8f acc, v16h a, v16h b) {
#if NA_DPBF16
    return (v8f)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
#else
    const v8u hi = (v8u)bci(-65536);
    acc += (v8f)((v8u)a & hi) * (v8f)((v8u)b & hi);
    return acc + (v8f)((v8u)a << 16) * (v8f)((v8u)b << 16);
#endif
}

/* dp2 on 64-byte vectors: acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1] (bf16 pairs). */
static inline v16f dpq(v16f acc, v8q a, v8q b) {
#if NA_DPBF16
    return (v16f)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
    const v16u hi = {0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                     0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                     0xffff0000u, 0xffff0000u};
    acc += (v16f)((v16u)a & hi) * (v16f)((v16u)b & hi);
    return acc + (v16f)((v16u)a << 16) * (v16f)((v16u)b << 16);
#endif
}

/* Broadcast the 4 bf16 at p (a quad of features) to all 8 quads. */
static inline v8q bcq(const void *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return (v8q){w, w, w, w, w, w, w, w};
}

/* 8 consecutive elements of a row of dtype dt as floats. */
static inline v8f ldt(const void *p, int64_t i, int dt) {
    return dt == BF16 ? ldh((const bf16 *)p + i) : ld((const float *)p + i);
}

static inline void stt(void *p, int64_t i, v8f x, int dt) {
    if (dt == BF16) *(v8hu *)((bf16 *)p + i) = f2bf(x);
    else st((float *)p + i, x);
}

/* ------------------------------------------------------------------------------------------------
 * exp */

#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

/* exp(x) = 2^n e^r with n = round(x / ln2), |r| <= ln2/2; e^r by a polynomial: degree 5 (relative
 * error < 2e-7, fitted) for float32, degree 3 (< 1.1e-4, below bf16's 4e-3) for the bf16 path, whose
 * weights are rounded to bf16 anyway. Exactly 0 for x = -inf (NEG) and below ~-104. The portable
 * version sets n by adding 1.5 * 2^23, which relies on IEEE rounding being kept: the file is never
 * compiled with -ffast-math (build.py's flags are not). */
static inline __attribute__((always_inline)) v8f vexp_deg(v8f x, const int deg) {
    v8f p;
#if NA_AVX512
    x = (v8f)_mm256_max_ps((__m256)x, _mm256_set1_ps(-104.0f)); /* 2^-150: scalef underflows to 0; NaN too */
    const v8f n = (v8f)_mm256_roundscale_ps((__m256)(x * bc(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v8f r = x - n * bc(LN2);
#else
    const v8f magic = bc(12582912.0f);
    const v8i keep = x > bc(-87.0f);
    x = sel(keep, x, bc(-87.0f));
    const v8f t = x * bc(LOG2E) + magic;
    const v8f r = x - (t - magic) * bc(LN2);
#endif
    if (deg == 5) {
        p = bc(8.290314642e-03f) * r + bc(4.189793026e-02f);
        p = p * r + bc(1.666763620e-01f);
        p = p * r + bc(4.999914952e-01f);
        p = p * r + bc(9.999997072e-01f);
        p = p * r + bc(1.0f);
    } else {
        p = bc(1.651797527e-01f) * r + bc(5.041304040e-01f);
        p = p * r + bc(1.000195843e+00f);
        p = p * r + bc(1.0f);
    }
#if NA_AVX512
    return (v8f)_mm256_scalef_ps((__m256)p, (__m256)n);
#else
    const v8i two_n = ((v8i)t - (v8i)magic + 127) << 23;
    return (v8f)((v8i)(p * (v8f)two_n) & keep);
#endif
}
static inline v8f vexp(v8f x) { return vexp_deg(x, 5); }
static inline v8f vexp_dt(v8f x, int dt) { return dt == BF16 ? vexp_deg(x, 3) : vexp_deg(x, 5); }

/* ------------------------------------------------------------------------------------------------
 * Masked vector loads and stores (lanes whose mask is 0 are neither read nor written). */

static inline v8f mload(const float *p, v8i m) {
#if defined(__AVX__)
    return (v8f)_mm256_maskload_ps(p, (__m256i)m);
#else
    v8f x = bc(0.0f);
    for (int i = 0; i < W; i++)
        if (m[i]) x[i] = p[i];
    return x;
#endif
}

static inline void mstore(float *p, v8i m, v8f x) {
#if NA_AVX512
    _mm256_mask_storeu_ps(p, (__mmask8)_mm256_movemask_ps((__m256)m), (__m256)x);
#else
    for (int i = 0; i < W; i++)
        if (m[i]) p[i] = x[i];
#endif
}

/* Lanes 0 .. n - 1 on. */
static inline v8i first_lanes(int64_t n) { return (v8i){0, 1, 2, 3, 4, 5, 6, 7} < bci((int32_t)min64(max64(n, 0), W)); }

/* log(x) for x > 0 (relative error of the result ~1e-7): x = 2^e m, m in [sqrt(1/2), sqrt(2)),
 * log m = 2 atanh(t) with t = (m - 1) / (m + 1), |t| < 0.172, by its odd series to t^9. */
static inline v8f vlog(v8f x) {
    v8i e = (((v8i)x >> 23) & 0xff) - 127;
    v8f m = (v8f)(((v8i)x & 0x007fffff) | 0x3f800000);
    const v8i big = m > bc(1.41421356f);
    m = sel(big, m * bc(0.5f), m);
    e += big & 1;
    const v8f t = (m - bc(1.0f)) / (m + bc(1.0f)), t2 = t * t;
    v8f p = bc(1.0f / 9) * t2 + bc(1.0f / 7);
    p = p * t2 + bc(1.0f / 5);
    p = p * t2 + bc(1.0f / 3);
    p = p * t2 + bc(1.0f);
    return __builtin_convertvector(e, v8f) * bc(LN2) + bc(2.0f) * t * p;
}

static inline v8f vmax(v8f a, v8f b) {
#if defined(__AVX__)
    return (v8f)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return sel(a > b, a, b);
#endif
}

/* ------------------------------------------------------------------------------------------------
 * float32 micro-kernels (natural layout, packed slot lists) */

/* Sums (or maxima) of each of 8 vectors, as one vector: a transpose-and-add tree (14 shuffles, 7 adds). */
static inline __attribute__((always_inline)) v8f hred8(const v8f c[8], const int max) {
    v8f u[4], w[2];
#define RED(x, y) (max ? vmax(x, y) : (x) + (y))
    for (int i = 0; i < 4; i++) {
        v8f a = c[2 * i], b = c[2 * i + 1];
        u[i] = RED(SHUF(a, b, 0, 8, 1, 9, 4, 12, 5, 13), SHUF(a, b, 2, 10, 3, 11, 6, 14, 7, 15));
    }
    for (int i = 0; i < 2; i++) {
        v8f a = u[2 * i], b = u[2 * i + 1];
        w[i] = RED(SHUF(a, b, 0, 1, 8, 9, 4, 5, 12, 13), SHUF(a, b, 2, 3, 10, 11, 6, 7, 14, 15));
    }
    return RED(SHUF(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11), SHUF(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15));
#undef RED
}
static inline v8f hsum8(const v8f c[8]) { return hred8(c, 0); }
static inline v8f hmax8(const v8f c[8]) { return hred8(c, 1); }

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
 * accumulators stay in registers: two sets (even and odd j), 4*NC independent chains, since 8 leave the
 * FMA latency exposed (measured: 60% of the throughput of 16). */
static inline __attribute__((always_inline)) void accum_block(const int NC, const float *w0, const float *w1,
                                                             const float *B, const int64_t *row, int64_t n,
                                                             int64_t dim, int64_t c, float f0, float f1,
                                                             float *o0, float *o1) {
    v8f a0[4], a1[4], b0[4], b1[4];
    for (int t = 0; t < NC; t++) a0[t] = a1[t] = b0[t] = b1[t] = bc(0.0f);
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
        const float *bp = B + row[j] * dim + c, *bq = B + row[j + 1] * dim + c;
        const v8f p0 = bc(w0[j]), p1 = bc(w1[j]), q0 = bc(w0[j + 1]), q1 = bc(w1[j + 1]);
        for (int t = 0; t < NC; t++) {
            const v8f y = ld(bp + W * t), z = ld(bq + W * t);
            a0[t] += p0 * y;
            a1[t] += p1 * y;
            b0[t] += q0 * z;
            b1[t] += q1 * z;
        }
    }
    if (j < n) {
        const float *bp = B + row[j] * dim + c;
        const v8f p0 = bc(w0[j]), p1 = bc(w1[j]);
        for (int t = 0; t < NC; t++) {
            const v8f y = ld(bp + W * t);
            a0[t] += p0 * y;
            a1[t] += p1 * y;
        }
    }
    for (int t = 0; t < NC; t++) {
        st(o0 + c + W * t, ld(o0 + c + W * t) + (a0[t] + b0[t]) * bc(f0));
        st(o1 + c + W * t, ld(o1 + c + W * t) + (a1[t] + b1[t]) * bc(f1));
    }
}

#if NA_AVX512
/* accum_block on 512-bit vectors (16 features), four accumulator sets (slots j mod 4): forward 3-4%,
 * backward 7-8% faster than 256-bit with two sets (single thread, alternated builds). */
typedef float v16fu_ __attribute__((vector_size(64), aligned(4), may_alias));
static inline __attribute__((always_inline)) void accum16_block(const int NC, const float *w0, const float *w1,
                                                               const float *B, const int64_t *row, int64_t n,
                                                               int64_t dim, int64_t c, float f0, float f1,
                                                               float *o0, float *o1) {
    v16f a[4][2][2];
    for (int k = 0; k < 4; k++)
        for (int t = 0; t < NC; t++) a[k][0][t] = a[k][1][t] = (v16f){0};
    int64_t j = 0;
    for (; j + 3 < n; j += 4)
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const float *bp = B + row[j + k] * dim + c;
            const v16f p0 = (v16f){0} + w0[j + k], p1 = (v16f){0} + w1[j + k];
            for (int t = 0; t < NC; t++) {
                const v16f y = *(const v16fu_ *)(bp + 2 * W * t);
                a[k][0][t] += p0 * y;
                a[k][1][t] += p1 * y;
            }
        }
    for (int k = 0; j < n; j++, k++) {
        const float *bp = B + row[j] * dim + c;
        const v16f p0 = (v16f){0} + w0[j], p1 = (v16f){0} + w1[j];
        for (int t = 0; t < NC; t++) {
            const v16f y = *(const v16fu_ *)(bp + 2 * W * t);
            a[k][0][t] += p0 * y;
            a[k][1][t] += p1 * y;
        }
    }
    for (int t = 0; t < NC; t++) {
        float *q0 = o0 + c + 2 * W * t, *q1 = o1 + c + 2 * W * t;
        *(v16fu_ *)q0 = *(const v16fu_ *)q0 + ((a[0][0][t] + a[1][0][t]) + (a[2][0][t] + a[3][0][t])) * f0;
        *(v16fu_ *)q1 = *(const v16fu_ *)q1 + ((a[0][1][t] + a[1][1][t]) + (a[2][1][t] + a[3][1][t])) * f1;
    }
}
#endif

static void accum2(const float *w0, const float *w1, const float *B, const int64_t *row, int64_t n, int64_t dim,
                   float f0, float f1, float *o0, float *o1) {
    int64_t c0 = 0;
#if NA_AVX512
    const int64_t full = dim / (2 * W) * (2 * W); /* 16-feature blocks; an 8-feature tail below */
    for (; c0 < full; c0 += 4 * W) {
        if (full - c0 == 2 * W) accum16_block(1, w0, w1, B, row, n, dim, c0, f0, f1, o0, o1);
        else accum16_block(2, w0, w1, B, row, n, dim, c0, f0, f1, o0, o1);
    }
    c0 = full;
#endif
    for (int64_t c = c0; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: accum_block(1, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            case 2: accum_block(2, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            case 3: accum_block(3, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
            default: accum_block(4, w0, w1, B, row, n, dim, c, f0, f1, o0, o1); break;
        }
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
    int64_t c0 = 0;
    for (int64_t c = c0; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: scatter_block(1, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            case 2: scatter_block(2, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            case 3: scatter_block(3, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
            default: scatter_block(4, w0, w1, a0, a1, f0, f1, row, n, dim, c, G); break;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Arguments, tables, slot lists */

typedef struct {
    const void *q, *k, *v;              /* [T*H, D], [Tk*Hk, D], [Tk*Hk, Dv] of type dt (Tk: key tokens) */
    const float *rpb;                   /* [H, R0, R1, R2], or NULL */
    const float *ab;                    /* attn_bias: element (b, t, h, slot) at b*ab_sb + t*ab_st + h*ab_sh + slot */
    const uint8_t *kpm;                 /* key_padding_mask [Tk], nonzero = ignore that key; or NULL */
    const int64_t *pos, *lo, *hi, *rof; /* [3, lmax] each */
    const int64_t *qlo, *qhi;           /* [3, lmax]: inverse runs (backward only) */
    const int64_t *sof;                 /* [3, lmax]: key index - sof = the key's slot along the axis */
    const int64_t *kpos;                /* [3, lmax]: coordinate of key index j on the key grid */
    const int64_t *ksrc;                /* [3, lmax]: coordinate of the real key behind key index j */
    /* L: the query grid, M: the key grid the kernels walk, N: the real keys' grid (k, v, kpm). M = N
     * unless an axis is periodic: then M is its virtual grid, whose coordinate v stands for real key
     * (v - kb) mod N, and the kernel reads the real keys directly (ksrc). */
    int64_t lmax, B, L0, L1, L2, M0, M1, M2, N0, N1, N2, kb0, kb1, kb2, H, Hk, D, Dv, R0, R1, R2, K0, K1, K2;
    int64_t ab_sb, ab_st, ab_sh;
    float scale;
    int32_t dt;                         /* element type of q, k, v, out, dout, dk, dv, dq_out: F32 or BF16 */
    float *attn;                        /* [T*H, K]: the weights (forward, return_attn), or NULL */
    const float *dattn;                 /* [T*H, K]: their gradient (backward), or NULL */
    float *dab;                         /* [T*H, K]: the gradient of attn_bias (backward), or NULL */
    void *out;                          /* [T*H, Dv] of type dt: written by the forward */
    float *lse;                         /* [T*H]: written by the forward, read by the backward */
    const void *dout;                   /* [T*H, Dv] of type dt */
    const float *dlse;                  /* [T*H] or NULL (no gradient into the LSE) */
    float *dq;                          /* [T*H, D] float32: accumulated by the backward */
    void *dk, *dv, *dq_out;             /* [Tk*Hk, D], [Tk*Hk, Dv] (key grid M), (bf16) dq converted: of type dt */
    void *dkf, *dvf;                    /* periodic: dk, dv on the real grid N (dk, dv folded), else NULL */
    float *drpb;                        /* [nthreads, H*R0*R1*R2]: one slice per thread, summed by the caller */
    float *nlse_t, *delta_t;            /* backward: -lse and delta at qt(...) (see qt), + 8 zeroed floats */
    void *kt, *vt, *qt, *dot;           /* bf16 T layout copies of k, v, q, dout (see the file comment), or NULL */
    void *kp, *vp, *qp, *dop;           /* bf16 P layout copies */
    int64_t l2p;                        /* the copies' padded last axis: round8(max(L2, M2)) + 8 */
    int64_t split, chunk;               /* fused backward: chunks of `chunk` indices (pairs on axis 2) of axis `split`; chunk 0: two-pass */
    int32_t nthreads;
} na_args;

#define TAB(t, a, i) ((t)[(a) * A->lmax + (i)])

static int64_t nslots_k(const na_args *A) { return A->K0 * A->K1 * A->K2; }
static int64_t ntokens(const na_args *A) { return A->B * A->L0 * A->L1 * A->L2; }
static int64_t nlines(const na_args *A) { return A->B * A->L0 * A->L1; }
static int64_t nkeys(const na_args *A) { return A->B * A->N0 * A->N1 * A->N2; }
static int64_t nklines(const na_args *A) { return A->B * A->M0 * A->M1; }

/* Flat query token index of (b, group-major query indices i0, i1, i2). */
static int64_t token(const na_args *A, int64_t b, int64_t i0, int64_t i1, int64_t i2) {
    return ((b * A->L0 + TAB(A->pos, 0, i0)) * A->L1 + TAB(A->pos, 1, i1)) * A->L2 + TAB(A->pos, 2, i2);
}

/* Flat index of the real key token (in k, v, kpm) behind group-major key indices (j0, j1, j2). */
static int64_t ktoken(const na_args *A, int64_t b, int64_t j0, int64_t j1, int64_t j2) {
    return ((b * A->N0 + TAB(A->ksrc, 0, j0)) * A->N1 + TAB(A->ksrc, 1, j1)) * A->N2 + TAB(A->ksrc, 2, j2);
}

/* Flat index of key (j0, j1, j2) on the key grid M (the rows of dk, dv). */
static int64_t vtoken(const na_args *A, int64_t b, int64_t j0, int64_t j1, int64_t j2) {
    return ((b * A->M0 + TAB(A->kpos, 0, j0)) * A->M1 + TAB(A->kpos, 1, j1)) * A->M2 + TAB(A->kpos, 2, j2);
}

static int64_t qrow(const na_args *A, int64_t b, int64_t x0, int64_t x1, int64_t x2, int64_t heads, int64_t h) {
    CHECK(0 <= b && b < A->B && 0 <= x0 && x0 < A->L0 && 0 <= x1 && x1 < A->L1 && 0 <= x2 && x2 < A->L2);
    return token(A, b, x0, x1, x2) * heads + h;
}

static int64_t krow(const na_args *A, int64_t b, int64_t y0, int64_t y1, int64_t y2, int64_t heads, int64_t h) {
    CHECK(0 <= b && b < A->B && 0 <= y0 && y0 < A->M0 && 0 <= y1 && y1 < A->M1 && 0 <= y2 && y2 < A->M2);
    return ktoken(A, b, y0, y1, y2) * heads + h;
}

/* Whether key (b, j0, j1, j2) (group-major key indices) is masked out by key_padding_mask. */
static int masked(const na_args *A, int64_t b, int64_t j0, int64_t j1, int64_t j2) {
    return A->kpm && A->kpm[ktoken(A, b, j0, j1, j2)];
}

/* Index of query (b, x0, x1, x2) head h (group-major indices) in the backward's -lse and delta
 * copies, laid out [B, L0, L1, H, L2]: the queries of one key row are then consecutive. */
static int64_t qt(const na_args *A, int64_t b, int64_t x0, int64_t x1, int64_t h, int64_t x2) {
    return (((b * A->L0 + x0) * A->L1 + x1) * A->H + h) * A->L2 + x2;
}

/* The attn_bias row of query row r (token * H + head): K slots. */
static const float *ab_row(const na_args *A, int64_t r) {
    const int64_t t = r / A->H, h = r % A->H, T = A->L0 * A->L1 * A->L2;
    return A->ab + (t / T) * A->ab_sb + (t % T) * A->ab_st + h * A->ab_sh;
}

/* Software prefetch of n floats from p (into L2 and L1). */
static inline void prefetch_floats(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
    __builtin_prefetch(p + n - 1);
}

/* Whether slots need their neighbourhood-slot index (per-pair tensors in slot order). */
static int wants_sidx(const na_args *A) { return A->ab || A->attn || A->dattn || A->dab; }

/* Whether a slot's bias depends on the head (rpb, attn_bias): then it is written per head. */
static int per_head_bias(const na_args *A) { return A->rpb || A->ab; }

/* Offsets (elements of the copy) of a T layout chunk (64-bit quads) and of a P layout pair row. */
static int64_t t_off(const na_args *A, int64_t line, int64_t heads, int64_t h, int64_t Q, int64_t start) {
    CHECK(0 <= line && line < max64(nlines(A), nklines(A)) && 0 <= h && h < heads && 0 <= start &&
          start + W <= A->l2p);
    return ((line * heads + h) * Q) * A->l2p + start;
}
static int64_t p_off(const na_args *A, int64_t line, int64_t heads, int64_t h, int64_t dim, int64_t pair) {
    CHECK(0 <= line && line < max64(nlines(A), nklines(A)) && 0 <= h && h < heads && 0 <= pair &&
          2 * pair + 2 <= A->l2p);
    return (((line * heads + h) * (A->l2p / 2) + pair) * dim) * 2;
}

/* A run of consecutive slots: one key row's union (packed layout) or one row padded to lanes. */
typedef struct {
    int64_t at, len;      /* first slot; slots holding keys */
    int64_t line, start;  /* group-major line (b, i0, i1) and first last-axis index of its keys */
    int64_t rb[2], sb[2]; /* query side: rpb / neighbourhood-slot index of the first key for pair i */
} seg_t;

/* A slot list: keys of a query pair (query side) or queries of a key pair (key side), both "pairs" i
 * = 0, 1 of each slot in the arrays' two halves. */
typedef struct {
    int64_t n, nseg;     /* slots (a multiple of 8), segments */
    int64_t *row;        /* [cap]: row (head 0 on the query side) of the slot's token in the gathered tensor */
    int32_t *ok;         /* [2][cap]: -1 where pair i counts (inside the window, key not masked), else 0 */
    int32_t *ridx;       /* [2][cap]: flat rpb index (head 0 on the query side), -1 where it does not count */
    int32_t *sidx;       /* [2][cap]: neighbourhood slot of the pair (attn_bias, weights), or -1 */
    float *bias;         /* [2][cap] */
    seg_t *seg;          /* [segcap] */
    int64_t cap, segcap;
} slots_t;

typedef struct {
    slots_t set[SEG];
    float *s;            /* [RUN][2][cap]: scores, then weights (pair j of a forward run at j * 2 * cap) */
    float *dp;           /* [2][cap] */
    float *dadd;         /* [2][cap]: the weights' gradient of each pair (backward with dattn), else 0 */
    float *dl;           /* [cap]: per-slot delta (key side) */
    float *tmp;          /* [2][dmax]: rows of a discarded duplicate (odd tail), bf16 output rows */
    float *acc;          /* [2][D + Dv]: dK, dV of a key pair */
    uint32_t *wb;        /* [2][cap * 2]: bf16 weight pairs, chunk by chunk */
    uint32_t *kp;        /* [dmax]: a key pair interleaved (bf16 fused dQ) */
    int64_t *col, *a2;   /* [cap]: axis-2 template (see axis2_template) */
    int32_t *in;         /* [2][cap]: -1 where pair i is inside its window, else 0 */
    int64_t cap;
    /* Key side: the axis-2 template of key pair p (it depends on p alone), built on first use in a call:
     * queries ulo[p] .. ulo[p] + nu[p] - 1; for u < round8(nu), kpos[p * tcap + u] = their coordinate
     * (copies of the last past nu) and kin[(2p + i) * tcap + u] = -1 where key i is in their window. */
    int64_t *kulo, *knu;
    int32_t *kpos, *kin, *kdone;
    int64_t tcap;
    char *block;         /* the one allocation all of the above live in */
} scratch;

/* Carves n elements of `size` bytes, 64-byte aligned, from the scratch block at *at (p == NULL: only
 * counts the bytes). */
static void *carve(char *p, int64_t *at, int64_t n, int64_t size) {
    void *r = p ? p + *at : NULL;
    *at += (n * size + 63) / 64 * 64;
    return r;
}

/* Lays the scratch out in one block (p == NULL: computes its size); returns the bytes used. */
static int64_t scratch_layout(scratch *S, char *p, int64_t cap, int64_t segcap, int64_t D, int64_t Dv, int64_t npair,
                              int64_t tcap) {
    const int64_t dmax = D > Dv ? D : Dv;
    int64_t at = 0;
    S->cap = cap;
    for (int i = 0; i < SEG; i++) {
        slots_t *T = &S->set[i];
        T->cap = cap;
        T->segcap = segcap;
        T->row = carve(p, &at, cap, sizeof(int64_t));
        T->ok = carve(p, &at, 2 * cap, sizeof(int32_t));
        T->ridx = carve(p, &at, 2 * cap, sizeof(int32_t));
        T->sidx = carve(p, &at, 2 * cap, sizeof(int32_t));
        T->bias = carve(p, &at, 2 * cap, sizeof(float));
        T->seg = carve(p, &at, segcap, sizeof(seg_t));
    }
    S->s = carve(p, &at, 2 * RUN * cap, sizeof(float));
    S->dp = carve(p, &at, 2 * cap, sizeof(float));
    S->dadd = carve(p, &at, 2 * cap, sizeof(float));
    S->dl = carve(p, &at, cap, sizeof(float));
    S->tmp = carve(p, &at, 2 * dmax, sizeof(float));
    S->acc = carve(p, &at, 2 * (D + Dv), sizeof(float));
    S->wb = carve(p, &at, 4 * cap, sizeof(uint32_t));
    S->kp = carve(p, &at, dmax, sizeof(uint32_t));
    S->col = carve(p, &at, cap, sizeof(int64_t));
    S->a2 = carve(p, &at, cap, sizeof(int64_t));
    S->in = carve(p, &at, 2 * cap, sizeof(int32_t));
    S->kulo = carve(p, &at, npair, sizeof(int64_t));
    S->knu = carve(p, &at, npair, sizeof(int64_t));
    S->kdone = carve(p, &at, npair, sizeof(int32_t));
    S->kpos = carve(p, &at, npair * tcap, sizeof(int32_t));
    S->kin = carve(p, &at, 2 * npair * tcap, sizeof(int32_t));
    S->tcap = tcap;
    return at;
}

/* One allocation per thread and call. Every array is written before it is read; the weights'
 * gradient and the spare rows start zeroed all the same. */
static int scratch_init(scratch *S, int64_t cap, int64_t segcap, int64_t D, int64_t Dv, int64_t npair, int64_t tcap) {
    const int64_t bytes = scratch_layout(S, NULL, cap, segcap, D, Dv, npair, tcap);
    S->block = aligned_alloc(64, (size_t)bytes);
    if (!S->block) return 0;
    scratch_layout(S, S->block, cap, segcap, D, Dv, npair, tcap);
    memset(S->dadd, 0, sizeof(float) * 2 * cap);
    memset(S->tmp, 0, sizeof(float) * 2 * (D > Dv ? D : Dv));
    memset(S->kdone, 0, sizeof(int32_t) * npair);
    return 1;
}

static void scratch_free(scratch *S) { free(S->block); }

/* Slots and segments one slot list may need: (longest run on axes 0, 1) x (widest union of two
 * neighbouring runs on axis 2, rounded up to a vector with lanes), rounded up to a vector, plus one
 * vector that row-wise vector stores may overrun. The runs are indexed on the grid of extents L (the
 * queries' for lo/hi, the keys' for qlo/qhi); an empty run (a key no query sees) counts as 1. */
static void max_slots(const na_args *A, const int64_t *lo, const int64_t *hi, const int64_t L[3], int64_t *cap,
                      int64_t *segcap) {
    int64_t m[3];
    for (int a = 0; a < 3; a++) {
        const int64_t *l = lo + a * A->lmax, *h = hi + a * A->lmax;
        m[a] = 1;
        for (int64_t i = 0; i < L[a]; i++) {
            /* axis 2: the union of the runs of i and i + 1 */
            const int64_t j = a == 2 && i + 1 < L[a] ? i + 1 : i, run = h[j] - l[i] + 1;
            m[a] = run > m[a] ? run : m[a];
        }
    }
    *cap = round8(m[0] * m[1] * round8(m[2])) + W;
    *segcap = m[0] * m[1] + 1;
}

/* The axis-2 part of a query pair's slot list, shared by every row of it: for union slot u
 * (0 <= u < nub, padded with copies of the last index), col[u] = pos * heads + head (row offset within
 * a row of tokens), a2[u] the key's index and in_i[u] = -1 if the key is in query pair[i]'s window
 * (0 for u >= nu). (The key side's counterpart is key_template, cached per key pair.) */
static void axis2_template(const na_args *A, scratch *S, int64_t ulo, int64_t nu, int64_t nub, int64_t heads,
                           int64_t head, const int64_t pair[2]) {
    const int64_t *pos2 = A->ksrc + 2 * A->lmax, *lo2 = A->lo + 2 * A->lmax, *hi2 = A->hi + 2 * A->lmax;
    for (int64_t u = 0; u < nub; u++) {
        const int64_t a2 = ulo + (u < nu ? u : nu - 1);
        CHECK(u < S->cap && 0 <= a2 && a2 < A->M2 && 0 <= pos2[a2] && pos2[a2] < A->N2);
        S->col[u] = pos2[a2] * heads + head;
        S->a2[u] = a2;
        for (int i = 0; i < 2; i++)
            S->in[i * S->cap + u] = u < nu && lo2[pair[i]] <= a2 && a2 <= hi2[pair[i]] ? -1 : 0;
    }
}

/* Pads a packed slot list of n slots to a multiple of 8 with copies of its last row, bias NEG, no rpb
 * or slot index (weight 0: they add nothing anywhere); returns the padded count. Rows are not padded
 * one by one: for k = 5 that would be 8 slots for a 6-key union, for k = 3 8 for 4. */
static int64_t pad_slots(slots_t *T, float *dl, int64_t n) {
    if (n == 0) return 0; /* a key pair no query sees (cross-grid): nothing to pad, nothing to copy */
    const int64_t np = round8(n), cap = T->cap;
    CHECK(np <= cap);
    for (int64_t j = n; j < np; j++) {
        T->row[j] = T->row[n - 1];
        T->bias[j] = T->bias[cap + j] = NEG;
        T->ok[j] = T->ok[cap + j] = 0;
        T->ridx[j] = T->ridx[cap + j] = -1;
        T->sidx[j] = T->sidx[cap + j] = -1;
        if (dl) dl[j] = 0.0f;
    }
    return np;
}

/* What a query pass reads from its slot lists beyond ok, bias and segments. */
#define NEED_ROWS 1 /* rows (float32 kernels) */
#define NEED_RIDX 2 /* per-slot rpb index (rpb gradient) */
#define NEED_SIDX 4 /* per-slot neighbourhood slot (weights' gradient) */

/* Slots of the query pair (x2[0], x2[1]) at (b, x0, x1): every key of the union of their windows,
 * key-row by key-row: rows of nu slots back to back, the total padded by pad_slots (float32), or each
 * row padded to a multiple of 8 lanes (lanes = 1, bf16). Rows are those of kv head 0 (kv head hk
 * reads row + hk); ok marks where pair i counts (key inside query i's window and not masked), ridx is
 * the flat rpb index of head 0 and sidx the neighbourhood slot (-1 where the pair does not count),
 * so one slot list serves every head. Without rpb and attn_bias the bias (0 where the pair counts,
 * NEG elsewhere) is written here; with them, head_bias writes it per head. */
static void query_slots(const na_args *A, scratch *S, slots_t *T, int64_t b, int64_t x0, int64_t x1,
                        const int64_t x2[2], int lanes, int need) {
    const int64_t cap = T->cap;
    const int64_t ulo = TAB(A->lo, 2, x2[0]), nu = TAB(A->hi, 2, x2[1]) - ulo + 1, nub = round8(nu);
    axis2_template(A, S, ulo, nu, nub, A->Hk, 0, x2);
    const int64_t rof2[2] = {TAB(A->rof, 2, x2[0]), TAB(A->rof, 2, x2[1])};
    const int64_t sof2[2] = {TAB(A->sof, 2, x2[0]), TAB(A->sof, 2, x2[1])};
    const int ridx = A->rpb && (need & NEED_RIDX), slots = wants_sidx(A) && (need & NEED_SIDX);
    int64_t n = 0, nseg = 0;
    for (int64_t a0 = TAB(A->lo, 0, x0); a0 <= TAB(A->hi, 0, x0); a0++) {
        for (int64_t a1 = TAB(A->lo, 1, x1); a1 <= TAB(A->hi, 1, x1); a1++) {
            const int64_t base = ((b * A->N0 + TAB(A->ksrc, 0, a0)) * A->N1 + TAB(A->ksrc, 1, a1)) * A->N2 * A->Hk;
            CHECK(0 <= a0 && a0 < A->M0 && 0 <= a1 && a1 < A->M1 && n + nub <= cap && nseg < T->segcap);
            const int64_t r01 = ((a0 - TAB(A->rof, 0, x0)) * A->R1 + a1 - TAB(A->rof, 1, x1)) * A->R2;
            const int64_t s01 = ((a0 - TAB(A->sof, 0, x0)) * A->K1 + a1 - TAB(A->sof, 1, x1)) * A->K2;
            seg_t *g = &T->seg[nseg++];
            g->at = n;
            g->len = nu;
            g->line = (b * A->M0 + a0) * A->M1 + a1; /* a key line: the kt, vt, kp, vp copies */
            g->start = ulo;
            for (int i = 0; i < 2; i++) {
                g->rb[i] = r01 + ulo - rof2[i];
                g->sb[i] = s01 + ulo - sof2[i];
            }
            if (need & NEED_ROWS)
                for (int64_t u = 0; u < nub; u++) {
                    T->row[n + u] = base + S->col[u];
                    CHECK(0 <= T->row[n + u] && T->row[n + u] + A->Hk - 1 < nkeys(A) * A->Hk);
                }
            /* ok: inside the pair's window and not masked; vector stores past nu are overwritten by
             * the next row (or padding) */
            for (int i = 0; i < 2; i++)
                for (int64_t u = 0; u < nub; u += W) *(v8iu *)(T->ok + i * cap + n + u) = *(const v8iu *)(S->in + i * cap + u);
            if (A->kpm)
                for (int64_t u = 0; u < nu; u++)
                    if (masked(A, b, a0, a1, S->a2[u])) T->ok[n + u] = T->ok[cap + n + u] = 0;
            if (!per_head_bias(A))
                for (int i = 0; i < 2; i++)
                    for (int64_t u = 0; u < nub; u += W)
                        st(T->bias + i * cap + n + u, sel(*(const v8iu *)(T->ok + i * cap + n + u), bc(0.0f), bc(NEG)));
            for (int i = 0; i < 2 && (ridx || slots); i++) {
                const int32_t *ok = T->ok + i * cap + n;
                for (int64_t u = 0; u < nub; u++) {
                    T->ridx[i * cap + n + u] = T->sidx[i * cap + n + u] = -1;
                    if (!ok[u]) continue;
                    if (ridx) {
                        const int64_t ri = g->rb[i] + u;
                        CHECK(0 <= ri && ri < A->R0 * A->R1 * A->R2 && ri == r01 + S->a2[u] - rof2[i]);
                        T->ridx[i * cap + n + u] = (int32_t)ri;
                    }
                    if (slots) {
                        const int64_t si = g->sb[i] + u;
                        CHECK(0 <= si && si < nslots_k(A) && si == s01 + S->a2[u] - sof2[i]);
                        T->sidx[i * cap + n + u] = (int32_t)si;
                    }
                }
            }
            n += lanes ? nub : nu;
        }
    }
    T->nseg = nseg;
    T->n = lanes ? n : pad_slots(T, NULL, n);
    CHECK(!lanes || T->n % W == 0);
}

/* With rpb or attn_bias: the bias of head h for the slots of query_slots (rpb of head h plus
 * attn_bias of query row r[i] where pair i counts, NEG elsewhere). Within a segment the keys, and so
 * their rpb and slot indices, are consecutive: one masked vector load per 8 slots. */
static void head_bias(const na_args *A, slots_t *T, int64_t h, const int64_t r[2]) {
    const float *rpb = A->rpb ? A->rpb + h * A->R0 * A->R1 * A->R2 : NULL;
    for (int i = 0; i < 2; i++) {
        const float *ab = A->ab ? ab_row(A, r[i]) : NULL;
        const int32_t *ok = T->ok + i * T->cap;
        float *bias = T->bias + i * T->cap;
        for (int64_t s = 0; s < T->nseg; s++) {
            const seg_t *g = &T->seg[s];
            for (int64_t u = 0; u < g->len; u += W) { /* stores past len: overwritten by the next segment */
                const v8i m = *(const v8iu *)(ok + g->at + u) & first_lanes(g->len - u);
                v8f x = bc(0.0f);
                if (rpb) x += mload(rpb + g->rb[i] + u, m);
                if (ab) x += mload(ab + g->sb[i] + u, m);
                st(bias + g->at + u, sel(m, x, bc(NEG)));
            }
        }
        if (T->n > 0) { /* slots after the last segment (padding) */
            const seg_t *g = &T->seg[T->nseg - 1];
            for (int64_t j = g->at + g->len; j < T->n; j++) bias[j] = NEG;
        }
    }
}

/* With dattn: the weights' gradient of query rows r[0], r[1] in slot order (0 where a pair does not
 * count), into dadd. */
static void head_dattn(const na_args *A, const slots_t *T, float *dadd, const int64_t r[2]) {
    const int64_t K = nslots_k(A);
    for (int i = 0; i < 2; i++) {
        const int32_t *si = T->sidx + i * T->cap;
        const float *da = A->dattn + r[i] * K;
        float *d = dadd + i * T->cap;
        for (int64_t j = 0; j < T->n; j++) d[j] = si[j] >= 0 ? da[si[j]] : 0.0f;
    }
}

/* out[r_i * K + slot] = w_i[j] * f_i for the slots where pair i counts (the rows of attn or dab),
 * pairs 0 .. npairs - 1; rows are zeroed before, so slots that hold no key stay 0. Within a segment
 * the slots are consecutive: masked vector stores. */
static void scatter_slots(const na_args *A, const slots_t *T, int npairs, const int64_t r[2], const float *w0,
                          const float *w1, const float f[2], float *out) {
    const int64_t K = nslots_k(A);
    const float *w[2] = {w0, w1};
    for (int i = 0; i < npairs; i++) {
        const int32_t *ok = T->ok + i * T->cap;
        float *o = out + r[i] * K;
        for (int64_t s = 0; s < T->nseg; s++) {
            const seg_t *g = &T->seg[s];
            for (int64_t u = 0; u < g->len; u += W) {
                const v8i m = *(const v8iu *)(ok + g->at + u) & first_lanes(g->len - u);
                CHECK(!m[0] || (0 <= g->sb[i] + u && g->sb[i] + u < K));
                mstore(o + g->sb[i] + u, m, ld(w[i] + g->at + u) * bc(f[i]));
            }
        }
    }
}

/* drpb[ridx_i[j]] += dS_i[j] for the slots where pair i counts, pairs 0 .. npairs - 1. */
static void add_drpb(float *drpb, const slots_t *T, const float *ds, int npairs) {
    for (int i = 0; i < npairs; i++) {
        const int32_t *ri = T->ridx + i * T->cap;
        const float *d = ds + i * T->cap;
        for (int64_t j = 0; j < T->n; j++)
            if (ri[j] >= 0) drpb[ri[j]] += d[j];
    }
}

/* Row-wise softmax of up to 8 rows in place (row r: n[r] slots at s[r]; unnormalized weights
 * exp(s - max)); writes the LSE of each row and 1 / its sum into inv. A row without any key (all NEG)
 * gets weights 0, inv 0 and LSE -inf. The rows' maxima and sums are reduced together by transpose
 * trees, and the log and the division are done once for all rows. */
static inline __attribute__((always_inline)) void softmax_rows(const int dt, float *const s[], const int64_t n[],
                                                               int nrow, float lse[8], float inv[8]) {
    v8f mv[8], sv[8];
    for (int r = 0; r < 8; r++) {
        mv[r] = bc(NEG);
        if (r < nrow)
            for (int64_t j = 0; j < n[r]; j += W) mv[r] = vmax(mv[r], ld(s[r] + j));
    }
    const v8f M = hmax8(mv);
    for (int r = 0; r < 8; r++) {
        sv[r] = bc(0.0f);
        if (r >= nrow) continue;
        const v8f m = bc(M[r]); /* -inf for a row without keys: its exp(NEG - NEG) gives 0 */
        for (int64_t j = 0; j < n[r]; j += W) {
            const v8f p = vexp_dt(ld(s[r] + j) - m, dt);
            st(s[r] + j, p);
            sv[r] += p;
        }
    }
    const v8f sum = hsum8(sv);
    const v8i some = sum > bc(0.0f);
    const v8f safe = sel(some, sum, bc(1.0f));
    st(lse, sel(some, M + vlog(safe), bc(NEG)));
    st(inv, sel(some, bc(1.0f) / safe, bc(0.0f)));
}

/* ------------------------------------------------------------------------------------------------
 * bfloat16 micro-kernels (T and P layout copies, lane slot lists) */

/* Scores of chunks c0 .. c0 + NG - 1 (8 lanes each): for quad w of the features, the T layout vector
 * holds 8 keys x 4 bf16; the query's quad is broadcast; lane 2k gets features 4w, 4w + 1 of key k and
 * lane 2k + 1 features 4w + 2, 4w + 3: acc[g][i] pairs of lanes sum to key k's score. */
static inline __attribute__((always_inline)) void tscore_block(const int NG, const bf16 *a0, const bf16 *a1,
                                                              const uint64_t *T, const seg_t *const *cseg,
                                                              const int64_t *cst, int64_t heads, int64_t h,
                                                              int64_t Q, int64_t l2p, const na_args *A, v16f acc[][2]) {
    const uint64_t *p[NGMAX];
    for (int g = 0; g < NG; g++) {
        p[g] = T + t_off(A, cseg[g]->line, heads, h, Q, cst[g]);
        acc[g][0] = acc[g][1] = (v16f){0};
    }
    for (int64_t w = 0; w < Q; w++) {
        const v8q x0 = bcq(a0 + 4 * w), x1 = bcq(a1 + 4 * w);
#pragma GCC unroll 8
        for (int g = 0; g < NG; g++) {
            v8q y = *(const v8qu *)(p[g] + w * l2p);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && NA_AVX512
            __asm__("" : "+v"(y)); /* one load feeding both products, not one folded into each */
#endif
            acc[g][0] = dpq(acc[g][0], x0, y);
            acc[g][1] = dpq(acc[g][1], x1, y);
        }
    }
}

/* Lane pairs of a and b summed: (a0 + a1, a2 + a3, ..., a14 + a15, b0 + b1, ..., b14 + b15). */
static inline v16f pair_sums(v16f a, v16f b) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
    v16f r;
    for (int i = 0; i < W; i++) {
        r[i] = a[2 * i] + a[2 * i + 1];
        r[W + i] = b[2 * i] + b[2 * i + 1];
    }
    return r;
#endif
}

/* s_i[j] = (a_i . key of lane j) * scale + bias_i[j] over the lanes of slot list T (bias may be NULL):
 * the keys come from the T layout copy Tc of `heads` heads (head h) with Q quads of 64 bits. */
static void tscores(const na_args *A, const bf16 *a0, const bf16 *a1, const uint64_t *Tc, int64_t heads, int64_t h,
                    int64_t Q, const slots_t *T, float scale, const float *bias0, const float *bias1, float *s0,
                    float *s1) {
    const seg_t *cseg[NGMAX];
    int64_t cst[NGMAX], cat[NGMAX];
    int ng = 0;
    for (int64_t s = 0; s < T->nseg; s++) {
        const seg_t *g = &T->seg[s];
        for (int64_t c = 0; c < g->len; c += W) {
            cseg[ng] = g;
            cst[ng] = g->start + c;
            cat[ng] = g->at + c;
            ng++;
            const int last = s + 1 == T->nseg && c + W >= g->len;
            if (ng < NGMAX && !last) continue;
            v16f acc[NGMAX][2];
            switch (ng) {
                case 1: tscore_block(1, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
#if NGMAX > 2
                case 2: tscore_block(2, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
                case 3: tscore_block(3, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
                case 4: tscore_block(4, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
                case 5: tscore_block(5, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
                case 6: tscore_block(6, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
                case 7: tscore_block(7, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
#endif
                default: tscore_block(NGMAX, a0, a1, Tc, cseg, cst, heads, h, Q, A->l2p, A, acc); break;
            }
            for (int k = 0; k < ng; k++) {
                const int64_t j = cat[k];
                const v16f r = pair_sums(acc[k][0], acc[k][1]) * scale;
                v8f y0, y1;
                memcpy(&y0, &r, sizeof(y0));
                memcpy(&y1, (const float *)&r + W, sizeof(y1));
                st(s0 + j, bias0 ? y0 + ld(bias0 + j) : y0);
                st(s1 + j, bias1 ? y1 + ld(bias1 + j) : y1);
            }
            ng = 0;
        }
    }
}

/* 8 bf16 at positions par .. par + 7 of 16 (zeros elsewhere). */
static inline v16h shift_lanes(v8h h, int par) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    const v8h z = {0};
    return par ? __builtin_shufflevector(h, z, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8)
               : __builtin_shufflevector(h, z, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8);
#else
    v16h r = {0};
    for (int i = 0; i < W; i++) r[i + par] = h[i];
    return r;
#endif
}

/* The lanes' weights w_i as bf16 pairs in P layout order, chunk by chunk: chunk c (first key at
 * index start, parity par) gets 8 pair words at wb_i + 8c with weight of lane l at bf16 position
 * par + l (the other position of an edge pair gets 0). */
static void weight_pairs(const slots_t *T, const float *w0, const float *w1, uint32_t *wb, int64_t cap) {
    const float *w[2] = {w0, w1};
    int64_t c = 0;
    for (int64_t s = 0; s < T->nseg; s++) {
        const seg_t *g = &T->seg[s];
        for (int64_t u = 0; u < g->len; u += W, c++) {
            const int par = (int)((g->start + u) & 1);
            for (int i = 0; i < 2; i++)
                *(v16hu *)(wb + i * 2 * cap + W * c) = shift_lanes(f2bf_fast(ld(w[i] + g->at + u)), par);
        }
    }
}

/* o_i[c .. c + 8NC) += f_i * sum over lanes of w_i . row (P layout copy Pc, `heads` heads, head h);
 * wb holds the weight pairs (weight_pairs). Two accumulator sets (even and odd pairs) hide the
 * dot products' latency. */
static inline __attribute__((always_inline)) void paccum_block(const int NC, const na_args *A, const slots_t *T,
                                                              const uint32_t *wb, int64_t cap, const bf16 *Pc,
                                                              int64_t heads, int64_t h, int64_t dim, int64_t c,
                                                              float f0, float f1, float *o0, float *o1) {
    v8f a0[4], a1[4], b0[4], b1[4];
    for (int t = 0; t < NC; t++) a0[t] = a1[t] = b0[t] = b1[t] = bc(0.0f);
    int64_t ch = 0;
    for (int64_t s = 0; s < T->nseg; s++) {
        const seg_t *g = &T->seg[s];
        for (int64_t u = 0; u < g->len; u += W, ch++) {
            const int64_t st0 = g->start + u, len = min64(W, g->len - u), par = st0 & 1;
            const int64_t npair = (par + len + 1) / 2;
            const bf16 *base = Pc + p_off(A, g->line, heads, h, dim, st0 / 2) + 2 * c;
            const uint32_t *x0 = wb + W * ch, *x1 = wb + 2 * cap + W * ch;
            CHECK(p_off(A, g->line, heads, h, dim, st0 / 2 + npair - 1) >= 0);
            int64_t j = 0;
            for (; j + 1 < npair; j += 2) {
                const v16h p0 = bcp(x0 + j), p1 = bcp(x1 + j), q0 = bcp(x0 + j + 1), q1 = bcp(x1 + j + 1);
                const bf16 *r = base + j * 2 * dim;
                for (int t = 0; t < NC; t++) {
                    const v16h y = *(const v16hu *)(r + 2 * W * t), z = *(const v16hu *)(r + 2 * dim + 2 * W * t);
                    a0[t] = dp2(a0[t], p0, y);
                    a1[t] = dp2(a1[t], p1, y);
                    b0[t] = dp2(b0[t], q0, z);
                    b1[t] = dp2(b1[t], q1, z);
                }
            }
            if (j < npair) {
                const v16h p0 = bcp(x0 + j), p1 = bcp(x1 + j);
                const bf16 *r = base + j * 2 * dim;
                for (int t = 0; t < NC; t++) {
                    const v16h y = *(const v16hu *)(r + 2 * W * t);
                    a0[t] = dp2(a0[t], p0, y);
                    a1[t] = dp2(a1[t], p1, y);
                }
            }
        }
    }
    for (int t = 0; t < NC; t++) {
        st(o0 + c + W * t, ld(o0 + c + W * t) + (a0[t] + b0[t]) * bc(f0));
        st(o1 + c + W * t, ld(o1 + c + W * t) + (a1[t] + b1[t]) * bc(f1));
    }
}

static void paccum(const na_args *A, const slots_t *T, const uint32_t *wb, int64_t cap, const bf16 *Pc,
                   int64_t heads, int64_t h, int64_t dim, float f0, float f1, float *o0, float *o1) {
    int64_t c = 0;
    for (; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: paccum_block(1, A, T, wb, cap, Pc, heads, h, dim, c, f0, f1, o0, o1); break;
            case 2: paccum_block(2, A, T, wb, cap, Pc, heads, h, dim, c, f0, f1, o0, o1); break;
            case 3: paccum_block(3, A, T, wb, cap, Pc, heads, h, dim, c, f0, f1, o0, o1); break;
            default: paccum_block(4, A, T, wb, cap, Pc, heads, h, dim, c, f0, f1, o0, o1); break;
        }
    }
}

/* The fused pass's dQ update in bf16: G[row[j]] += pair (f0 * w0[j], f1 * w1[j]) . (k0, k1)
 * interleaved (kp, dim pairs), over the lanes holding queries; G is float32. */
static inline __attribute__((always_inline)) void pscatter_block(const int NC, const slots_t *T, const float *w0,
                                                                const float *w1, float f0, float f1,
                                                                const uint32_t *kp, int64_t dim, int64_t c,
                                                                float *G) {
    v16h x[4];
    for (int t = 0; t < NC; t++) x[t] = *(const v16hu *)(kp + c + W * t);
    for (int64_t s = 0; s < T->nseg; s++) {
        const seg_t *g = &T->seg[s];
        for (int64_t u = 0; u < g->len; u += W) {
            const int64_t j0 = g->at + u, len = min64(W, g->len - u);
            const v8u wp = pairs(f2bf_fast(ld(w0 + j0) * bc(f0)), f2bf_fast(ld(w1 + j0) * bc(f1)));
            for (int64_t l = 0; l < len; l++) {
                const uint32_t wl = wp[l];
                const v16h p = (v16h)(v8u){wl, wl, wl, wl, wl, wl, wl, wl};
                float *gr = G + T->row[j0 + l] * dim + c;
                for (int t = 0; t < NC; t++) st(gr + W * t, dp2(ld(gr + W * t), p, x[t]));
            }
        }
    }
}

static void pscatter(const slots_t *T, const float *w0, const float *w1, float f0, float f1, const uint32_t *kp,
                     int64_t dim, float *G) {
    for (int64_t c = 0; c < dim; c += 4 * W) {
        switch ((dim - c) / W) {
            case 1: pscatter_block(1, T, w0, w1, f0, f1, kp, dim, c, G); break;
            case 2: pscatter_block(2, T, w0, w1, f0, f1, kp, dim, c, G); break;
            case 3: pscatter_block(3, T, w0, w1, f0, f1, kp, dim, c, G); break;
            default: pscatter_block(4, T, w0, w1, f0, f1, kp, dim, c, G); break;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Layout copies (bf16, prep phase): items are (line, head) of the source */

/* Source row of the token at group-major (line, last-axis index i), head h, of the query grid (key = 0)
 * or of the key grid (key = 1). */
static int64_t src_row(const na_args *A, int key, int64_t line, int64_t i, int64_t heads, int64_t h) {
    if (key) {
        const int64_t j1 = line % A->M1, j0 = line / A->M1 % A->M0, b = line / A->M1 / A->M0;
        return ktoken(A, b, j0, j1, i) * heads + h;
    }
    const int64_t i1 = line % A->L1, i0 = line / A->L1 % A->L0, b = line / A->L1 / A->L0;
    return token(A, b, i0, i1, i) * heads + h;
}

/* In-register 4 x 4 transpose of 64-bit elements. */
static inline void transpose4q(v4q r[4]) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    const v4q t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6), t1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
    const v4q t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6), t3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
    r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    r[1] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    r[2] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
#else
    v4q o[4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) o[i][j] = r[j][i];
    for (int i = 0; i < 4; i++) r[i] = o[i];
#endif
}

/* T layout: dst[((line * heads + h) * Q + w) * l2p + i] = quad w (features 4w .. 4w + 3) of the token
 * at index i of the line, head h; 0 for i >= L2 (M2 for a tensor of the key grid: key = 1). */
static void t_copy(const na_args *A, int key, const void *src, int64_t heads, int64_t dim, void *dst, int64_t begin,
                   int64_t end) {
    const int64_t Q = dim / 4, l2p = A->l2p, L2 = key ? A->M2 : A->L2;
    const uint64_t *S = src;
    for (int64_t item = begin; item < end; item++) {
        const int64_t line = item / heads, h = item % heads;
        uint64_t *D = (uint64_t *)dst + (line * heads + h) * Q * l2p;
        int64_t i = 0;
        for (; i + 4 <= L2; i += 4) {
            const uint64_t *rows[4];
            for (int t = 0; t < 4; t++) rows[t] = S + src_row(A, key, line, i + t, heads, h) * Q;
            int64_t w = 0;
            for (; w + 4 <= Q; w += 4) {
                v4q r[4];
                for (int t = 0; t < 4; t++) r[t] = *(const v4qu *)(rows[t] + w);
                transpose4q(r);
                for (int t = 0; t < 4; t++) *(v4qu *)(D + (w + t) * l2p + i) = r[t];
            }
            for (; w < Q; w++)
                for (int t = 0; t < 4; t++) D[w * l2p + i + t] = rows[t][w];
        }
        for (; i < L2; i++) {
            const uint64_t *row = S + src_row(A, key, line, i, heads, h) * Q;
            for (int64_t w = 0; w < Q; w++) D[w * l2p + i] = row[w];
        }
        for (int64_t w = 0; w < Q; w++) memset(D + w * l2p + L2, 0, sizeof(uint64_t) * (l2p - L2));
    }
}

/* P layout: dst[(((line * heads + h) * (l2p / 2) + m) * dim + c) * 2 + e] = element c of the token at
 * index 2m + e, head h; 0 for indices >= L2 (M2 for the key grid: key = 1). */
static void p_copy(const na_args *A, int key, const void *src, int64_t heads, int64_t dim, void *dst, int64_t begin,
                   int64_t end) {
    const bf16 *S = src;
    const int64_t L2 = key ? A->M2 : A->L2;
    const v8h zero = {0};
    for (int64_t item = begin; item < end; item++) {
        const int64_t line = item / heads, h = item % heads;
        for (int64_t m = 0; m < A->l2p / 2; m++) {
            uint32_t *D = (uint32_t *)dst + (((line * heads + h) * (A->l2p / 2) + m) * dim);
            const bf16 *r0 = 2 * m < L2 ? S + src_row(A, key, line, 2 * m, heads, h) * dim : NULL;
            const bf16 *r1 = 2 * m + 1 < L2 ? S + src_row(A, key, line, 2 * m + 1, heads, h) * dim : NULL;
            for (int64_t c = 0; c < dim; c += W)
                *(v8uu *)(D + c) = pairs(r0 ? ld8h(r0 + c) : zero, r1 ? ld8h(r1 + c) : zero);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Query passes: forward, and the two-pass backward's dQ pass */

/* Work item -> (b, i0, i1, first pair along axis 2, pairs in the item). */
static void unravel_seg(const na_args *A, int64_t item, int64_t *b, int64_t *i0, int64_t *i1, int64_t *p0,
                        int64_t *np) {
    const int64_t npair = (A->L2 + 1) / 2, nseg = (npair + SEG - 1) / SEG;
    const int64_t r = item % nseg;
    item /= nseg;
    *i1 = item % A->L1;
    item /= A->L1;
    *i0 = item % A->L0;
    *b = item / A->L0;
    *p0 = r * SEG;
    *np = min64(SEG, npair - *p0);
}

static int64_t query_items(const na_args *A) {
    const int64_t npair = (A->L2 + 1) / 2;
    return nlines(A) * ((npair + SEG - 1) / SEG);
}

/* Forward scores of one query pair, head h, on its slot list T, into s (2 rows of cap). */
static inline __attribute__((always_inline)) void forward_scores(const int dt, const na_args *A, slots_t *T,
                                                                const int64_t r[2], int64_t h, float *s) {
    const int64_t D = A->D, cap = T->cap, hk = h / (A->H / A->Hk);
    if (per_head_bias(A)) head_bias(A, T, h, r);
    if (dt == BF16)
        tscores(A, (const bf16 *)A->q + r[0] * D, (const bf16 *)A->q + r[1] * D, A->kt, A->Hk, hk, D / 4, T, A->scale,
                T->bias, T->bias + cap, s, s + cap);
    else
        scores2((const float *)A->q + r[0] * D, (const float *)A->q + r[1] * D, (const float *)A->k + hk * D, T->row,
                T->n, D, A->scale, T->bias, T->bias + cap, s, s + cap);
}

/* Forward output of one query pair, head h, from its weights s (exp(s - max), softmax_rows). */
static inline __attribute__((always_inline)) void forward_out(const int dt, const na_args *A, scratch *S, slots_t *T,
                                                             const int64_t r[2], int two, int64_t h, float *s,
                                                             const float lse[2], const float inv[2]) {
    const int64_t Dv = A->Dv, cap = T->cap, hk = h / (A->H / A->Hk);
    if (A->attn) {
        const int64_t K = nslots_k(A);
        for (int i = 0; i < 1 + two; i++) memset(A->attn + r[i] * K, 0, sizeof(float) * K);
        scatter_slots(A, T, 1 + two, r, s, s + cap, inv, A->attn);
    }
    float *o0 = S->tmp, *o1 = S->tmp + Dv;
    if (dt == F32) {
        o0 = (float *)A->out + r[0] * Dv;
        o1 = two ? (float *)A->out + r[1] * Dv : S->tmp;
    }
    memset(o0, 0, sizeof(float) * Dv);
    memset(o1, 0, sizeof(float) * Dv);
    if (dt == BF16) {
        weight_pairs(T, s, s + cap, S->wb, cap);
        paccum(A, T, S->wb, cap, A->vp, A->Hk, hk, Dv, inv[0], inv[1], o0, o1);
        for (int i = 0; i < 1 + two; i++)
            for (int64_t c = 0; c < Dv; c += W) stt(A->out, r[i] * Dv + c, ld(S->tmp + i * Dv + c), BF16);
    } else {
        accum2(s, s + cap, (const float *)A->v + hk * Dv, T->row, T->n, Dv, inv[0], inv[1], o0, o1);
    }
    A->lse[r[0]] = lse[0];
    if (two) A->lse[r[1]] = lse[1];
}

/* The two-pass backward's dQ (and drpb, dattn_bias) of one query pair, head h. */
static inline __attribute__((always_inline)) void dq_pair(const int dt, const na_args *A, scratch *S, slots_t *T,
                                                         float *drpb, int64_t b, int64_t x0, int64_t x1,
                                                         const int64_t x2[2], int64_t h) {
    const int64_t D = A->D, Dv = A->Dv, cap = T->cap, G = A->H / A->Hk, hk = h / G, n = T->n;
    const int two = x2[1] != x2[0];
    const int64_t r[2] = {qrow(A, b, x0, x1, x2[0], A->H, h), qrow(A, b, x0, x1, x2[1], A->H, h)};
    float *s0 = S->s, *s1 = S->s + cap, *p0 = S->dp, *p1 = S->dp + cap;
    float nlse[2], delta[2]; /* from the prologue's copies (-lse is NEG for a query without keys) */
    for (int i = 0; i < 2; i++) {
        nlse[i] = A->nlse_t[qt(A, b, x0, x1, h, x2[i])];
        delta[i] = A->delta_t[qt(A, b, x0, x1, h, x2[i])];
    }
    if (per_head_bias(A)) head_bias(A, T, h, r);
    if (A->dattn) head_dattn(A, T, S->dadd, r);
    const float *da0 = A->dattn ? S->dadd : NULL, *da1 = A->dattn ? S->dadd + cap : NULL;
    /* S, then dP = dO . V (+ the weights' gradient), then dS = P * (dP - delta) in place of dP. */
    if (dt == BF16) {
        tscores(A, (const bf16 *)A->q + r[0] * D, (const bf16 *)A->q + r[1] * D, A->kt, A->Hk, hk, D / 4, T, A->scale,
                T->bias, T->bias + cap, s0, s1);
        tscores(A, (const bf16 *)A->dout + r[0] * Dv, (const bf16 *)A->dout + r[1] * Dv, A->vt, A->Hk, hk, Dv / 4, T,
                1.0f, da0, da1, p0, p1);
    } else {
        scores2((const float *)A->q + r[0] * D, (const float *)A->q + r[1] * D, (const float *)A->k + hk * D, T->row, n,
                D, A->scale, T->bias, T->bias + cap, s0, s1);
        scores2((const float *)A->dout + r[0] * Dv, (const float *)A->dout + r[1] * Dv, (const float *)A->v + hk * Dv,
                T->row, n, Dv, 1.0f, da0, da1, p0, p1);
    }
    for (int64_t j = 0; j < n; j += W) {
        st(p0 + j, vexp_dt(ld(s0 + j) + bc(nlse[0]), dt) * (ld(p0 + j) - bc(delta[0])));
        st(p1 + j, vexp_dt(ld(s1 + j) + bc(nlse[1]), dt) * (ld(p1 + j) - bc(delta[1])));
    }
    float *g0 = A->dq + r[0] * D, *g1 = two ? A->dq + r[1] * D : S->tmp;
    if (!two) memset(g1, 0, sizeof(float) * D); /* dq itself was zeroed by the prologue */
    if (dt == BF16) {
        weight_pairs(T, p0, p1, S->wb, cap);
        paccum(A, T, S->wb, cap, A->kp, A->Hk, hk, D, A->scale, A->scale, g0, g1);
    } else {
        accum2(p0, p1, (const float *)A->k + hk * D, T->row, n, D, A->scale, A->scale, g0, g1);
    }
    if (drpb) add_drpb(drpb + h * A->R0 * A->R1 * A->R2, T, S->dp, 1 + two); /* ridx: relative to head 0's table */
    if (A->dab) scatter_slots(A, T, 1 + two, r, p0, p1, (const float[2]){1.0f, 1.0f}, A->dab);
}

/* Query pass items: segments of up to SEG query pairs of the line (b, x0, x1). The slot lists are
 * built once per pair and serve every head; then each head sweeps the segment, so its keys (and
 * their layout copies) stream through L1 in order along the line. The forward scores RUN pairs,
 * runs one softmax over their rows, then accumulates them. */
static inline __attribute__((always_inline)) void query_items_run(const int dt, const int dq, const na_args *A,
                                                                 scratch *S, float *drpb, int64_t begin,
                                                                 int64_t end) {
    const int need = dt == F32 ? NEED_ROWS : 0;
    for (int64_t item = begin; item < end; item++) {
        int64_t b, x0, x1, p0, np, x2[SEG][2];
        unravel_seg(A, item, &b, &x0, &x1, &p0, &np);
        for (int64_t j = 0; j < np; j++) {
            x2[j][0] = 2 * (p0 + j);
            x2[j][1] = min64(2 * (p0 + j) + 1, A->L2 - 1);
            query_slots(A, S, &S->set[j], b, x0, x1, x2[j], dt == BF16,
                        dq ? need | NEED_RIDX | NEED_SIDX : need);
        }
        for (int64_t h = 0; h < A->H; h++) {
            if (dq) {
                for (int64_t j = 0; j < np; j++) dq_pair(dt, A, S, &S->set[j], drpb, b, x0, x1, x2[j], h);
                continue;
            }
            for (int64_t j0 = 0; j0 < np; j0 += RUN) {
                const int64_t nr = min64(RUN, np - j0);
                int64_t r[RUN][2], n[2 * RUN];
                float *rows[2 * RUN], lse[2 * RUN], inv[2 * RUN];
                for (int64_t j = 0; j < nr; j++) {
                    float *s = S->s + j * 2 * S->cap;
                    for (int i = 0; i < 2; i++) {
                        r[j][i] = qrow(A, b, x0, x1, x2[j0 + j][i], A->H, h);
                        rows[2 * j + i] = s + i * S->cap;
                        n[2 * j + i] = S->set[j0 + j].n;
                    }
                    if (A->ab && j0 + j + 2 < np) /* attn_bias is read once: fetch a later pair's rows early */
                        for (int i = 0; i < 2; i++)
                            prefetch_floats(ab_row(A, qrow(A, b, x0, x1, x2[j0 + j + 2][i], A->H, h)), nslots_k(A));
                    forward_scores(dt, A, &S->set[j0 + j], r[j], h, s);
                }
                softmax_rows(dt, rows, n, (int)(2 * nr), lse, inv);
                for (int64_t j = 0; j < nr; j++)
                    forward_out(dt, A, S, &S->set[j0 + j], r[j], x2[j0 + j][1] != x2[j0 + j][0], h,
                                S->s + j * 2 * S->cap, lse + 2 * j, inv + 2 * j);
            }
        }
    }
}

static void forward_items(const na_args *A, scratch *S, int64_t begin, int64_t end) {
    if (A->dt == BF16) query_items_run(BF16, 0, A, S, NULL, begin, end);
    else query_items_run(F32, 0, A, S, NULL, begin, end);
}

static void backward_dq_items(const na_args *A, scratch *S, float *drpb, int64_t begin, int64_t end) {
    if (A->dt == BF16) query_items_run(BF16, 1, A, S, drpb, begin, end);
    else query_items_run(F32, 1, A, S, drpb, begin, end);
}

/* ------------------------------------------------------------------------------------------------
 * Key passes: the backward's dK, dV (and, fused, dQ, drpb, dattn_bias) */

/* The key-side axis-2 template of key pair y2 = (2p, 2p + 1 or 2p) (see scratch), built on first use. */
static void key_template(const na_args *A, scratch *S, const int64_t y2[2], int64_t *ulo, int64_t *nu,
                         const int32_t **pos, const int32_t **in) {
    const int64_t p = y2[0] / 2, tc = S->tcap;
    const int64_t *pos2 = A->pos + 2 * A->lmax, *lo2 = A->lo + 2 * A->lmax, *hi2 = A->hi + 2 * A->lmax;
    CHECK(0 <= p && p < (A->M2 + 1) / 2);
    if (!S->kdone[p]) {
        /* n = 0: no query sees either key (cross-grid keys between the queries' windows) */
        const int64_t lo = TAB(A->qlo, 2, y2[0]), n = max64(TAB(A->qhi, 2, y2[1]) - lo + 1, 0), nb = round8(n);
        CHECK(nb <= tc);
        for (int64_t u = 0; u < nb; u++) {
            const int64_t a2 = lo + (u < n ? u : n - 1);
            CHECK(0 <= a2 && a2 < A->L2 && 0 <= pos2[a2] && pos2[a2] < A->L2);
            S->kpos[p * tc + u] = (int32_t)pos2[a2];
            for (int i = 0; i < 2; i++) /* key y2[i] in the window of query a2 */
                S->kin[(2 * p + i) * tc + u] = u < n && lo2[a2] <= y2[i] && y2[i] <= hi2[a2] ? -1 : 0;
        }
        S->kulo[p] = lo;
        S->knu[p] = n;
        S->kdone[p] = 1;
    }
    *ulo = S->kulo[p];
    *nu = S->knu[p];
    *pos = S->kpos + p * tc;
    *in = S->kin + 2 * p * tc;
}

/* Slots of the key pair (y2[0], y2[1]) at (b, y0, y1) for query head h: every query whose window
 * holds either key (inverse runs qlo..qhi), row by row, laid out like query_slots (lanes: bf16).
 * Pair (query, key i) counts (ok) where key i is in the query's window and not masked; its bias is
 * then -lse(query) + rpb + attn_bias, NEG elsewhere; dl is the query's delta; ridx (rpb) and sidx
 * (attn_bias, weights) index the pair's bias entries, -1 where it does not count; with dattn, dadd
 * holds the weights' gradient. A row's queries are consecutive in the qt layout, so -lse and delta
 * come as vector loads (slots past the row read the next values: finite or NEG, masked to NEG and
 * weight 0). */
static void key_slots(const na_args *A, scratch *S, slots_t *T, int64_t b, int64_t y0, int64_t y1,
                      const int64_t y2[2], int64_t h, int lanes) {
    const int64_t cap = T->cap, *rof2 = A->rof + 2 * A->lmax, *sof2 = A->sof + 2 * A->lmax, tc = S->tcap;
    const int64_t K = nslots_k(A);
    const int slots = wants_sidx(A);
    int64_t ulo, nu;
    const int32_t *pos, *in;
    key_template(A, S, y2, &ulo, &nu, &pos, &in);
    const int64_t nub = round8(nu);
    /* a masked key counts for no query */
    const v8i live[2] = {bci(masked(A, b, y0, y1, y2[0]) ? 0 : -1), bci(masked(A, b, y0, y1, y2[1]) ? 0 : -1)};
    int64_t n = 0, nseg = 0;
    for (int64_t x0 = TAB(A->qlo, 0, y0); x0 <= TAB(A->qhi, 0, y0) && nu > 0; x0++) {
        for (int64_t x1 = TAB(A->qlo, 1, y1); x1 <= TAB(A->qhi, 1, y1); x1++) {
            const int64_t base = ((b * A->L0 + TAB(A->pos, 0, x0)) * A->L1 + TAB(A->pos, 1, x1)) * A->L2 * A->H;
            const int64_t t0 = qt(A, b, x0, x1, h, ulo);
            CHECK(0 <= x0 && x0 < A->L0 && 0 <= x1 && x1 < A->L1 && n + nub <= cap && nseg < T->segcap);
            CHECK(t0 + nub <= ntokens(A) * A->H + W);
            seg_t *g = &T->seg[nseg++];
            g->at = n;
            g->len = nu;
            g->line = (b * A->L0 + x0) * A->L1 + x1;
            g->start = ulo;
            int64_t *rows = T->row + n;
            float *dl = S->dl + n;
            for (int64_t u = 0; u < nub; u++) {
                rows[u] = base + pos[u] * A->H + h;
                CHECK(0 <= rows[u] && rows[u] < ntokens(A) * A->H);
            }
            for (int64_t u = 0; u < nub; u += W) { /* stores past nu: overwritten by the next row or padding */
                const v8f nl = ld(A->nlse_t + t0 + u);
                st(dl + u, ld(A->delta_t + t0 + u));
                for (int i = 0; i < 2; i++) {
                    const v8i ok = *(const v8iu *)(in + i * tc + u) & live[i];
                    *(v8iu *)(T->ok + i * cap + n + u) = ok;
                    st(T->bias + i * cap + n + u, sel(ok, nl, bc(NEG)));
                }
            }
            n += lanes ? nub : nu;
            if (!A->rpb && !slots) continue; /* ridx, sidx and dadd are not read */
            const int64_t r01 = ((h * A->R0 + y0 - TAB(A->rof, 0, x0)) * A->R1 + y1 - TAB(A->rof, 1, x1)) * A->R2;
            const int64_t s01 = ((y0 - TAB(A->sof, 0, x0)) * A->K1 + y1 - TAB(A->sof, 1, x1)) * A->K2;
            const int64_t at = g->at;
            for (int i = 0; i < 2; i++) {
                const int32_t *ok = T->ok + i * cap + at;
                float *bias = T->bias + i * cap + at, *dadd = S->dadd + i * cap + at;
                int32_t *ridx = T->ridx + i * cap + at, *sidx = T->sidx + i * cap + at;
                for (int64_t u = 0; u < nub; u++) {
                    ridx[u] = sidx[u] = -1;
                    if (A->dattn) dadd[u] = 0.0f;
                    if (!ok[u]) continue;
                    const int64_t a2 = ulo + u; /* u < nu where ok */
                    if (A->rpb) {
                        const int64_t ri = r01 + y2[i] - rof2[a2];
                        CHECK(0 <= ri && ri < A->H * A->R0 * A->R1 * A->R2);
                        ridx[u] = (int32_t)ri;
                        bias[u] += A->rpb[ri];
                    }
                    if (slots) {
                        const int64_t si = s01 + y2[i] - sof2[a2];
                        CHECK(0 <= si && si < K);
                        sidx[u] = (int32_t)si;
                        if (A->ab) bias[u] += ab_row(A, rows[u])[si];
                        if (A->dattn) dadd[u] = A->dattn[rows[u] * K + si];
                    }
                }
            }
        }
    }
    T->nseg = nseg;
    if (lanes) {
        T->n = n;
    } else {
        if (A->dattn)
            for (int64_t j = n; j < round8(n); j++) S->dadd[j] = S->dadd[cap + j] = 0.0f;
        T->n = pad_slots(T, S->dl, n);
    }
}

/* dab[row[j] * K + sidx_i[j]] = dS_i[j] (the pair's bias gradient) for the slots of key_slots where
 * pair i counts, pairs 0 .. npairs - 1: each (query, slot) is written by exactly one key. */
static void scatter_key_slots(const na_args *A, const slots_t *T, int npairs, const float *ds) {
    const int64_t K = nslots_k(A);
    for (int i = 0; i < npairs; i++) {
        const int32_t *si = T->sidx + i * T->cap;
        const float *d = ds + i * T->cap;
        for (int64_t j = 0; j < T->n; j++)
            if (si[j] >= 0) A->dab[T->row[j] * K + si[j]] = d[j];
    }
}

/* dK and dV of the key pair (y2[0], y2[1]) at (b, y0, y1), kv head hk: each key gathers from the
 * queries that see it. fused: also scatter dQ += scale * dS K into those queries' rows, the bias
 * gradient into drpb and dattn_bias; the caller guarantees no other thread touches those rows
 * meanwhile. */
static inline __attribute__((always_inline)) void dkv_item_dt(const int dt, const na_args *A, scratch *S,
                                                             int64_t b, int64_t y0, int64_t y1, const int64_t y2[2],
                                                             int64_t hk, int fused, float *drpb) {
    const int64_t D = A->D, Dv = A->Dv, G = A->H / A->Hk;
    slots_t *T = &S->set[0];
    const int64_t cap = T->cap;
    float *s0 = S->s, *s1 = S->s + cap, *p0 = S->dp, *p1 = S->dp + cap;
    const int two = y2[1] != y2[0];
    const int64_t r0 = krow(A, b, y0, y1, y2[0], A->Hk, hk), r1 = krow(A, b, y0, y1, y2[1], A->Hk, hk);
    /* rows of dk, dv: on the key grid M (a periodic axis's copies of a key each get their own row) */
    const int64_t w0 = vtoken(A, b, y0, y1, y2[0]) * A->Hk + hk, w1 = vtoken(A, b, y0, y1, y2[1]) * A->Hk + hk;
    float *gk0 = S->acc, *gk1 = S->acc + D, *gv0 = S->acc + 2 * D, *gv1 = S->acc + 2 * D + Dv;
    memset(S->acc, 0, sizeof(float) * 2 * (D + Dv));
    if (dt == BF16 && fused) { /* the key pair interleaved, for the dQ dot products */
        const bf16 *k0 = (const bf16 *)A->k + r0 * D, *k1 = (const bf16 *)A->k + r1 * D;
        for (int64_t c = 0; c < D; c += W) *(v8uu *)(S->kp + c) = pairs(ld8h(k0 + c), ld8h(k1 + c));
    }
    for (int64_t h = hk * G; h < hk * G + G; h++) {
        key_slots(A, S, T, b, y0, y1, y2, h, dt == BF16);
        const int64_t n = T->n;
        const float *da0 = A->dattn ? S->dadd : NULL, *da1 = A->dattn ? S->dadd + cap : NULL;
        /* P^T (bias holds -lse), dP^T = V . dO (+ the weights' gradient), dS^T = P^T (dP^T - delta) */
        if (dt == BF16) {
            tscores(A, (const bf16 *)A->k + r0 * D, (const bf16 *)A->k + r1 * D, A->qt, A->H, h, D / 4, T, A->scale,
                    T->bias, T->bias + cap, s0, s1);
            tscores(A, (const bf16 *)A->v + r0 * Dv, (const bf16 *)A->v + r1 * Dv, A->dot, A->H, h, Dv / 4, T, 1.0f,
                    da0, da1, p0, p1);
        } else {
            scores2((const float *)A->k + r0 * D, (const float *)A->k + r1 * D, (const float *)A->q, T->row, n, D,
                    A->scale, T->bias, T->bias + cap, s0, s1);
            scores2((const float *)A->v + r0 * Dv, (const float *)A->v + r1 * Dv, (const float *)A->dout, T->row, n, Dv,
                    1.0f, da0, da1, p0, p1);
        }
        for (int64_t j = 0; j < n; j += W) {
            v8f P0 = vexp_dt(ld(s0 + j), dt), P1 = vexp_dt(ld(s1 + j), dt), dl = ld(S->dl + j);
            st(s0 + j, P0);
            st(s1 + j, P1);
            st(p0 + j, P0 * (ld(p0 + j) - dl));
            st(p1 + j, P1 * (ld(p1 + j) - dl));
        }
        if (dt == BF16) {
            weight_pairs(T, s0, s1, S->wb, cap);
            paccum(A, T, S->wb, cap, A->dop, A->H, h, Dv, 1.0f, 1.0f, gv0, gv1);
            weight_pairs(T, p0, p1, S->wb, cap);
            paccum(A, T, S->wb, cap, A->qp, A->H, h, D, A->scale, A->scale, gk0, gk1);
        } else {
            accum2(s0, s1, (const float *)A->dout, T->row, n, Dv, 1.0f, 1.0f, gv0, gv1);
            accum2(p0, p1, (const float *)A->q, T->row, n, D, A->scale, A->scale, gk0, gk1);
        }
        if (!fused) continue;
        /* Padding slots and dead lanes have dS = 0 exactly; the duplicate of an odd tail's second key
         * is weighted 0 so it is not counted twice. */
        if (dt == BF16)
            pscatter(T, p0, p1, A->scale, two ? A->scale : 0.0f, S->kp, D, A->dq);
        else
            scatter2(p0, p1, (const float *)A->k + r0 * D, (const float *)A->k + r1 * D, A->scale, two ? A->scale : 0.0f,
                     T->row, n, D, A->dq);
        if (drpb) add_drpb(drpb, T, S->dp, 1 + two);
        if (A->dab) scatter_key_slots(A, T, 1 + two, S->dp);
    }
    for (int64_t c = 0; c < D; c += W) {
        stt(A->dk, w0 * D + c, ld(gk0 + c), dt);
        if (two) stt(A->dk, w1 * D + c, ld(gk1 + c), dt);
    }
    for (int64_t c = 0; c < Dv; c += W) {
        stt(A->dv, w0 * Dv + c, ld(gv0 + c), dt);
        if (two) stt(A->dv, w1 * Dv + c, ld(gv1 + c), dt);
    }
}

static void dkv_item(const na_args *A, scratch *S, int64_t b, int64_t y0, int64_t y1, const int64_t y2[2],
                     int64_t hk, int fused, float *drpb) {
    if (A->dt == BF16) dkv_item_dt(BF16, A, S, b, y0, y1, y2, hk, fused, drpb);
    else dkv_item_dt(F32, A, S, b, y0, y1, y2, hk, fused, drpb);
}

/* Work item -> (b, i0, i1, pair of indices along axis 2, kv head), kv head fastest. */
static void unravel_key(const na_args *A, int64_t item, int64_t *b, int64_t *i0, int64_t *i1, int64_t i2[2],
                        int64_t *hk) {
    const int64_t npair = (A->M2 + 1) / 2;
    *hk = item % A->Hk;
    item /= A->Hk;
    const int64_t p = item % npair;
    item /= npair;
    *i1 = item % A->M1;
    item /= A->M1;
    *i0 = item % A->M0;
    *b = item / A->M0;
    i2[0] = 2 * p;
    i2[1] = 2 * p + 1 < A->M2 ? 2 * p + 1 : 2 * p;
}

static void backward_dkv_items(const na_args *A, scratch *S, int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; item++) {
        int64_t b, y0, y1, y2[2], hk;
        unravel_key(A, item, &b, &y0, &y1, y2, &hk);
        dkv_item(A, S, b, y0, y1, y2, hk, 0, NULL);
    }
}

static int64_t split_length(const na_args *A) {
    return A->split == 2 ? (A->M2 + 1) / 2 : A->split == 1 ? A->M1 : A->M0; /* an axis of the key grid */
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
 * order whatever the thread count. Needs the prologue first (delta, dq zeroed). */
static void backward_fused_units(const na_args *A, scratch *S, float *drpb, int colour, int64_t begin, int64_t end) {
    const int64_t npair = (A->M2 + 1) / 2;
    for (int64_t unit = begin; unit < end; unit++) {
        const int64_t hk = unit % A->Hk, b = unit / (fused_units(A, colour) / A->B);
        int64_t lo[3] = {0, 0, 0}, hi[3] = {A->M0, A->M1, npair}, first;
        const int64_t len = unit_chunk(A, colour, unit, &first);
        lo[A->split] = first;
        hi[A->split] = first + len;
        for (int64_t y0 = lo[0]; y0 < hi[0]; y0++)
            for (int64_t y1 = lo[1]; y1 < hi[1]; y1++)
                for (int64_t p = lo[2]; p < hi[2]; p++) {
                    const int64_t y2[2] = {2 * p, 2 * p + 1 < A->M2 ? 2 * p + 1 : 2 * p};
                    dkv_item(A, S, b, y0, y1, y2, hk, 1, drpb);
                }
    }
}

/* Backward prologue over lines (b, x0, x1, h) of the qt layout: delta = rowsum(dO * O) - dLSE, the
 * backward's per-query constant, and -lse, into the qt copies; also zeroes dq, which both backward
 * paths accumulate into, and the rows of the attn_bias gradient, whose slots without a key are never
 * written (here, in parallel, not in a separate fill). */
static void delta_lines(const na_args *A, int64_t begin, int64_t end) {
    const int64_t K = nslots_k(A), Dv = A->Dv;
    for (int64_t line = begin; line < end; line++) {
        const int64_t h = line % A->H, x1 = line / A->H % A->L1, x0 = line / A->H / A->L1 % A->L0;
        const int64_t b = line / A->H / A->L1 / A->L0;
        for (int64_t x2 = 0; x2 < A->L2; x2++) {
            const int64_t r = qrow(A, b, x0, x1, x2, A->H, h), t = line * A->L2 + x2;
            CHECK(t == qt(A, b, x0, x1, h, x2));
            /* a query without keys (LSE -inf) has P = 0 everywhere: -lse NEG keeps it so, delta 0 */
            const int empty = A->lse[r] == NEG;
            v8f acc = bc(0.0f);
            for (int64_t c = 0; c < Dv; c += W) acc += ldt(A->dout, r * Dv + c, A->dt) * ldt(A->out, r * Dv + c, A->dt);
            float dot = 0;
            for (int i = 0; i < W; i++) dot += acc[i];
            A->delta_t[t] = empty ? 0.0f : dot - (A->dlse ? A->dlse[r] : 0.0f);
            A->nlse_t[t] = empty ? NEG : -A->lse[r];
            memset(A->dq + r * A->D, 0, sizeof(float) * A->D);
            if (A->dab) memset(A->dab + r * K, 0, sizeof(float) * K);
        }
    }
}

/* Periodic axes: dkf, dvf of the real keys (b, y0, y1, *) of lines [begin, end) as the sums of the rows
 * of dk, dv of their copies on the key grid (v = y + kb + m N for m in -1, 0, 1 within 0 .. M - 1 on
 * each axis; one copy on an axis that does not wrap), summed in float32. */
static void fold_lines(const na_args *A, int64_t begin, int64_t end) {
    const int64_t N[3] = {A->N0, A->N1, A->N2}, M[3] = {A->M0, A->M1, A->M2}, kb[3] = {A->kb0, A->kb1, A->kb2};
    const int64_t Hk = A->Hk, nd[2] = {Hk * A->D, Hk * A->Dv};
    const void *src[2] = {A->dk, A->dv};
    void *dst[2] = {A->dkf, A->dvf};
    float acc[2 * 4096];
    for (int64_t line = begin; line < end; line++) {
        const int64_t y1 = line % A->N1, y0 = line / A->N1 % A->N0, b = line / A->N1 / A->N0;
        for (int64_t y2 = 0; y2 < A->N2; y2++) {
            const int64_t y[3] = {y0, y1, y2};
            int64_t v[3][3], nv[3];
            for (int a = 0; a < 3; a++) {
                nv[a] = 0;
                for (int64_t m = -1; m <= 1; m++) {
                    const int64_t c = y[a] + kb[a] + m * N[a];
                    if (0 <= c && c < M[a] && (m == 0 || M[a] != N[a])) v[a][nv[a]++] = c;
                }
            }
            const int64_t out = ((b * N[0] + y0) * N[1] + y1) * N[2] + y2;
            for (int t = 0; t < 2; t++) {
                for (int64_t c0 = 0; c0 < nd[t]; c0 += 4096) { /* a token's rows (all kv heads), in blocks */
                    const int64_t n = min64(4096, nd[t] - c0);
                    for (int64_t c = 0; c < n; c += W) st(acc + c, bc(0.0f));
                    for (int64_t i0 = 0; i0 < nv[0]; i0++)
                        for (int64_t i1 = 0; i1 < nv[1]; i1++)
                            for (int64_t i2 = 0; i2 < nv[2]; i2++) {
                                const int64_t row = ((b * M[0] + v[0][i0]) * M[1] + v[1][i1]) * M[2] + v[2][i2];
                                CHECK(0 <= row && row < A->B * M[0] * M[1] * M[2]);
                                for (int64_t c = 0; c < n; c += W)
                                    st(acc + c, ld(acc + c) + ldt(src[t], row * nd[t] + c0 + c, A->dt));
                            }
                    for (int64_t c = 0; c < n; c += W) stt(dst[t], out * nd[t] + c0 + c, ld(acc + c), A->dt);
                }
            }
        }
    }
}

/* bf16: dq (float32, accumulated) into dq_out, rows [begin, end). */
static void dq_out_rows(const na_args *A, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++)
        for (int64_t c = 0; c < A->D; c += W) stt(A->dq_out, r * A->D + c, ld(A->dq + r * A->D + c), BF16);
}

/* ------------------------------------------------------------------------------------------------
 * Phases and threads */

enum { W_KT, W_VT, W_QT, W_DOT, W_KP, W_VP, W_QP, W_DOP, W_DELTA, W_FWD, W_DQ, W_DKV, W_DQOUT, W_FOLD };

typedef struct {
    int kind;
    int64_t n;
} work_t;

typedef struct {
    pthread_mutex_t m;
    pthread_cond_t c;
    int count, n, gen;
} barrier_t;

typedef struct {
    const na_args *A;
    int pass, tid, nt;
    int status;
    barrier_t *bar;
    /* na_run_many: the problems (A is the first), their count, and the shared counter of forward
     * items handed out so far (dynamic scheduling: see run_many_job); NULL, 0, NULL for one problem. */
    const na_args *const *many;
    int nmany;
    int64_t *next;
} job;

static void sync_threads(job *J) {
#ifdef _OPENMP
    (void)J;
#pragma omp barrier
#else
    barrier_t *B = J->bar;
    pthread_mutex_lock(&B->m);
    const int gen = B->gen;
    if (++B->count == B->n) {
        B->count = 0;
        B->gen++;
        pthread_cond_broadcast(&B->c);
    } else {
        while (gen == B->gen) pthread_cond_wait(&B->c, &B->m);
    }
    pthread_mutex_unlock(&B->m);
#endif
}

static float *drpb_slice(const na_args *A, int tid) {
    return A->drpb ? A->drpb + (int64_t)tid * A->H * A->R0 * A->R1 * A->R2 : NULL;
}

static void do_work(const na_args *A, scratch *S, float *drpb, int kind, int64_t begin, int64_t end) {
    const int64_t D = A->D, Dv = A->Dv;
    (void)S, (void)drpb, (void)D, (void)Dv;
    switch (kind) {
        /* the key and value copies the bf16 forward reads: in both parts */
        case W_KT: t_copy(A, 1, A->k, A->Hk, D, A->kt, begin, end); break;
        case W_VP: p_copy(A, 1, A->v, A->Hk, Dv, A->vp, begin, end); break;
#if NA_FWD
        case W_FWD: forward_items(A, S, begin, end); break;
#endif
#if NA_BWD
        case W_VT: t_copy(A, 1, A->v, A->Hk, Dv, A->vt, begin, end); break;
        case W_QT: t_copy(A, 0, A->q, A->H, D, A->qt, begin, end); break;
        case W_DOT: t_copy(A, 0, A->dout, A->H, Dv, A->dot, begin, end); break;
        case W_KP: p_copy(A, 1, A->k, A->Hk, D, A->kp, begin, end); break;
        case W_QP: p_copy(A, 0, A->q, A->H, D, A->qp, begin, end); break;
        case W_DOP: p_copy(A, 0, A->dout, A->H, Dv, A->dop, begin, end); break;
        case W_DELTA: delta_lines(A, begin, end); break;
        case W_DQ: backward_dq_items(A, S, drpb, begin, end); break;
        case W_DKV: backward_dkv_items(A, S, begin, end); break;
        case W_DQOUT: dq_out_rows(A, begin, end); break;
        case W_FOLD: fold_lines(A, begin, end); break;
#endif
    }
}

/* This thread's share of a phase made of several kinds of work, split evenly by item counts. */
static void run_phase(job *J, scratch *S, const work_t *w, int nw) {
    int64_t total = 0, off = 0;
    for (int i = 0; i < nw; i++) total += w[i].n;
    const int64_t begin = total * J->tid / J->nt, end = total * (J->tid + 1) / J->nt;
    for (int i = 0; i < nw; i++) {
        const int64_t lo = max64(begin, off) - off, hi = min64(end, off + w[i].n) - off;
        if (lo < hi && J->status == 0) do_work(J->A, S, drpb_slice(J->A, J->tid), w[i].kind, lo, hi);
        off += w[i].n;
    }
}

/* round8 of the widest union of queries seeing two neighbouring keys on axis 2. */
static int64_t key_template_cap(const na_args *A) {
    int64_t m = 1;
    for (int64_t j = 0; j < A->M2; j++) {
        const int64_t j1 = j + 1 < A->M2 ? j + 1 : j;
        m = max64(m, TAB(A->qhi, 2, j1) - TAB(A->qlo, 2, j) + 1);
    }
    return round8(m);
}

#if NA_FWD
static void *run_many_job(job *J);
#endif

static void *run_job(void *arg) {
    job *J = arg;
#if NA_FWD
    if (J->many) return run_many_job(J);
#endif
    const na_args *A = J->A;
    const int64_t lines = nlines(A), klines = nklines(A), bf = A->dt == BF16, fused = A->chunk > 0;
    const int64_t qext[3] = {A->L0, A->L1, A->L2}, kext[3] = {A->M0, A->M1, A->M2};
    scratch S;
    int64_t cap, segcap, cap2 = 0, segcap2, npair = 0, tcap = 0;
    max_slots(A, A->lo, A->hi, qext, &cap, &segcap);
    if (J->pass == 1) { /* both sides */
        max_slots(A, A->qlo, A->qhi, kext, &cap2, &segcap2);
        cap = max64(cap, cap2);
        segcap = max64(segcap, segcap2);
        npair = (A->M2 + 1) / 2;
        tcap = key_template_cap(A);
    }
    J->status = scratch_init(&S, cap, segcap, A->D, A->Dv, npair, tcap) ? 0 : 1;
    if (J->status) S.block = NULL;
    if (J->pass == 0) {
#if NA_FWD
        if (bf) {
            const work_t prep[] = {{W_KT, klines * A->Hk}, {W_VP, klines * A->Hk}};
            run_phase(J, &S, prep, 2);
            sync_threads(J);
        }
        const work_t fwd[] = {{W_FWD, query_items(A)}};
        run_phase(J, &S, fwd, 1);
#endif
    } else {
#if NA_BWD
        const int64_t H = A->H, Hk = A->Hk;
        const work_t pro[] = {{W_DELTA, lines * H},
                              {W_QT, bf ? lines * H : 0}, {W_DOT, bf ? lines * H : 0},
                              {W_QP, bf ? lines * H : 0}, {W_DOP, bf ? lines * H : 0},
                              {W_KT, bf && !fused ? klines * Hk : 0}, {W_VT, bf && !fused ? klines * Hk : 0},
                              {W_KP, bf && !fused ? klines * Hk : 0}};
        run_phase(J, &S, pro, 8);
        sync_threads(J);
        if (fused) {
            for (int colour = 0; colour < 2; colour++) {
                int64_t begin, end;
                fused_share(A, colour, J->tid, J->nt, &begin, &end);
                if (J->status == 0) backward_fused_units(A, &S, drpb_slice(A, J->tid), colour, begin, end);
                sync_threads(J);
            }
        } else {
            const work_t two[] = {{W_DQ, query_items(A)}, {W_DKV, klines * ((A->M2 + 1) / 2) * Hk}};
            run_phase(J, &S, two, 2);
            sync_threads(J);
        }
        if (bf || A->dkf) {
            const work_t out[] = {{W_DQOUT, bf ? ntokens(A) * H : 0}, {W_FOLD, A->dkf ? A->B * A->N0 * A->N1 : 0}};
            run_phase(J, &S, out, 2);
        }
#endif
    }
    (void)lines, (void)klines, (void)bf, (void)fused;
    scratch_free(&S);
    return NULL;
}

#ifndef _OPENMP
static void *thread_main(void *arg) {
    job *J = arg;
    pthread_mutex_lock(&J->bar->m);
    J->nt = J->bar->n;
    pthread_mutex_unlock(&J->bar->m);
    return run_job(J);
}
#endif

/* Runs run_job on nt threads, each with a copy of `proto` (its own tid and team size); returns the OR
 * of their statuses.
 *
 * Threads: built with -fopenmp against the libgomp that PyTorch itself loaded, the work runs on
 * PyTorch's own OpenMP pool, whose workers are usually still spinning after the previous torch op
 * (a Linear, a copy): a separate pool would share the cores with them for the next ~ms (measured:
 * 2.4 ms lost per call at 56x56). Otherwise, one pthread per share. */
static int launch(job proto, int nt) {
#ifdef _OPENMP
    int status = 0;
#pragma omp parallel num_threads(nt) reduction(| : status)
    {
        job J = proto;
        J.tid = omp_get_thread_num();
        J.nt = omp_get_num_threads();
        J.status = 0;
        J.bar = NULL;
        run_job(&J);
        status |= J.status;
    }
    return status;
#else
    job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    barrier_t bar;
    pthread_mutex_init(&bar.m, NULL);
    pthread_cond_init(&bar.c, NULL);
    bar.count = bar.gen = 0;
    /* The team is only known once the threads started (one that cannot start means fewer shares):
     * they wait for the lock, held until then, before reading its size. */
    pthread_mutex_lock(&bar.m);
    int n = 1;
    for (int t = 1; t < nt; t++) {
        jobs[n] = proto;
        jobs[n].tid = n;
        jobs[n].nt = 0;
        jobs[n].status = 0;
        jobs[n].bar = &bar;
        if (pthread_create(&threads[n], NULL, thread_main, &jobs[n]) == 0) n++;
    }
    bar.n = n;
    pthread_mutex_unlock(&bar.m);
    jobs[0] = proto;
    jobs[0].tid = 0;
    jobs[0].nt = n;
    jobs[0].status = 0;
    jobs[0].bar = &bar;
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < n; t++) {
        pthread_join(threads[t], NULL);
        status |= jobs[t].status;
    }
    pthread_mutex_destroy(&bar.m);
    pthread_cond_destroy(&bar.c);
    return status;
#endif
}

/* A pass of one problem on A->nthreads threads (clamped to [1, MAX_THREADS]); 2 for a bad element type. */
static int run_pass(const na_args *A, int pass) {
    if (A->dt != F32 && A->dt != BF16) return 2;
    /* drpb has one slice per thread: the caller allocates A->nthreads slices, in [1, MAX_THREADS] */
    const int nt = A->nthreads < 1 ? 1 : A->nthreads > MAX_THREADS ? MAX_THREADS : A->nthreads;
    return launch((job){A, pass, 0, 0, 0, NULL, NULL, 0, NULL}, nt);
}

#if NA_FWD
/* The forward: out, lse, and the weights. Returns 0, 1 when scratch memory could not be allocated, 2
 * for a bad request. */
int na_forward(const na_args *A) { return run_pass(A, 0); }
#endif

#if NA_BWD
/* The backward: dq, dk, dv, drpb, dattn_bias; the fused one when chunk > 0, else two-pass. Returns as
 * na_forward. */
int na_backward(const na_args *A) {
    if (A->chunk > 0 && (A->split < 0 || A->split > 2)) return 2;
    return run_pass(A, 1);
}
#endif

#if NA_PART == 0
/* pass 0: na_forward; pass 1: na_backward; else 2 (for C drivers that build the whole file as one). */
int na_run(const na_args *A, int pass) { return pass == 0 ? na_forward(A) : pass == 1 ? na_backward(A) : 2; }
#endif

#if NA_FWD

/* ------------------------------------------------------------------------------------------------
 * Several problems in one launch (a batch of samples of different sizes, each its own problem:
 * its own pointers into packed tensors, grid, tables and window arguments) */

/* Forward items of the problems handed out per grab of the shared counter: enough grabs per thread
 * that problems of very different cost even out, few enough that a thread keeps neighbouring lines
 * (which share most of their keys) together. */
#define MANY_GRABS_PER_THREAD 16

/* This thread's part of a multi-problem forward. One scratch block sized for the largest problem
 * serves all of them (slot lists depend on a problem's windows only through their extents). Phase 1
 * (bf16 problems): every problem's key and value layout copies, split evenly over the threads by
 * item count; a barrier, since any forward item may read any copy of its problem. Phase 2: the query
 * items of all problems, one index space in problem order, grabbed in chunks from a shared atomic
 * counter: items differ in cost between problems (line lengths, windows), so a static split by item
 * count would leave threads idle. Which thread runs an item never changes what it writes (each item
 * writes its own rows of out, lse and attn), so results do not depend on the schedule. */
static void *run_many_job(job *J) {
    const na_args *const *P = J->many;
    const int n = J->nmany;
    int64_t cap = 0, segcap = 0, D = 0, Dv = 0, nprep = 0, nfwd = 0;
    for (int p = 0; p < n; p++) {
        const na_args *A = P[p];
        const int64_t qext[3] = {A->L0, A->L1, A->L2};
        int64_t c, sc;
        max_slots(A, A->lo, A->hi, qext, &c, &sc);
        cap = max64(cap, c);
        segcap = max64(segcap, sc);
        D = max64(D, A->D);
        Dv = max64(Dv, A->Dv);
        if (A->dt == BF16) nprep += 2 * nklines(A) * A->Hk;
        nfwd += query_items(A);
    }
    scratch S;
    J->status = scratch_init(&S, cap, segcap, D, Dv, 0, 0) ? 0 : 1;
    if (J->status) S.block = NULL;
    if (nprep) {
        const int64_t begin = nprep * J->tid / J->nt, end = nprep * (J->tid + 1) / J->nt;
        int64_t off = 0;
        for (int p = 0; p < n && off < end; p++) {
            const na_args *A = P[p];
            if (A->dt != BF16) continue;
            const int64_t m = nklines(A) * A->Hk;
            for (int kind = 0; kind < 2; kind++, off += m) {
                const int64_t lo = max64(begin, off) - off, hi = min64(end, off + m) - off;
                if (lo < hi && J->status == 0) do_work(A, &S, NULL, kind ? W_VP : W_KT, lo, hi);
            }
        }
        sync_threads(J);
    }
    const int64_t grab = max64(1, nfwd / ((int64_t)J->nt * MANY_GRABS_PER_THREAD));
    int p = 0;
    int64_t first = 0; /* first item of problem p in the joint index space */
    for (;;) {
        const int64_t begin = __atomic_fetch_add(J->next, grab, __ATOMIC_RELAXED);
        if (begin >= nfwd) break;
        const int64_t end = min64(begin + grab, nfwd);
        /* grabs only grow, so the problem cursor only moves forward */
        for (int64_t at = begin; at < end;) {
            while (first + query_items(P[p]) <= at) first += query_items(P[p++]);
            const int64_t hi = min64(end, first + query_items(P[p]));
            if (J->status == 0) forward_items(P[p], &S, at - first, hi - first);
            at = hi;
        }
    }
    scratch_free(&S);
    return NULL;
}

/* The forward (pass 0, the only one) of n problems in one parallel region: problems[i] is a complete
 * na_args as na_forward takes it (same element type not required; nthreads is taken from problems[0]).
 * Returns 0, 1 when scratch memory could not be allocated, 2 for a bad request. */
int na_run_many(const na_args *const *problems, int n, int pass) {
    if (pass != 0 || n < 1 || !problems) return 2;
    for (int i = 0; i < n; i++)
        if (!problems[i] || (problems[i]->dt != F32 && problems[i]->dt != BF16)) return 2;
    const int nt = problems[0]->nthreads < 1 ? 1 : problems[0]->nthreads > MAX_THREADS ? MAX_THREADS
                                                                                       : problems[0]->nthreads;
    int64_t next = 0;
    return launch((job){problems[0], pass, 0, 0, 0, NULL, problems, n, &next}, nt);
}

/* What this build computes with (build.py reports it): bit 0: vdpbf16ps (AVX512-BF16) for bf16 dot
 * products, else widened to fp32; bit 1: AVX-512 (32 registers, masked stores, vscalefps exp). */
int na_features(void) { return NA_DPBF16 | (NA_AVX512 << 1); }
#endif /* NA_FWD */
