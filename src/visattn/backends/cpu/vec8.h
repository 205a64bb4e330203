/* Vectors of 8 floats for the package's C kernels (GCC/Clang vector extensions: AVX2/AVX-512 on x86,
 * NEON pairs on Arm): unaligned load/store, broadcast, select, and a vector exp.
 *
 * Included by the kernels next to it and elsewhere in the package (build.py hashes included headers
 * into a kernel's cache key). */
#ifndef VISATTN_VEC8_H
#define VISATTN_VEC8_H

#include <stdint.h>

typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8iu __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f ld(const float *p) { return *(const v8fu *)p; }
static inline void st(float *p, v8f x) { *(v8fu *)p = x; }
static inline v8f bc(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8f sel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }

/* exp(x) = 2^e * exp(r), |r| <= ln2/2, degree-6 Taylor polynomial: relative error < 2e-7; exactly 0
 * below -87.3 (the edge of float's normal range; masked scores land there), saturating at exp(88).
 * e = round(x / ln2) by adding 1.5 * 2^23, which leaves the integer in the low mantissa bits; this
 * relies on IEEE rounding being kept, i.e. never compiling with -ffast-math / -fassociative-math
 * (build.py's flags do not). */
static inline v8f vexp(v8f x) {
    const v8f magic = bc(12582912.0f);
    v8i keep = x > bc(-87.3f);
    x = sel(keep, x, bc(-87.3f));
    x = sel(x > bc(88.0f), bc(88.0f), x);
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

#endif
