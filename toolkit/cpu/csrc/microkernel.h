/* The register-blocked micro-kernels of the compiled CPU kernels (relation_kl_fused.c).
 * toolkit/cpu/compiled.py's build puts this directory on the include path and hashes this header
 * into every kernel's cache key.
 *
 * 8 rows x 32 columns of a product held in 16 vectors of 16 floats (what AVX-512 holds in one
 * register; GNU vector extensions, so other targets split them): per step of the inner dimension,
 * two loads of b and 8 broadcasts of a, 16 FMAs. */
#ifndef TOOLKIT_MICROKERNEL_H
#define TOOLKIT_MICROKERNEL_H

#include <stdint.h>

typedef float vf __attribute__((vector_size(64)));

/* x in every lane (not (vf){0} + x, which costs an add: 0 + x is not x for x = -0). */
#define BCAST(x) ((vf){(x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x)})

#define RB 8  /* rows per micro-kernel */
#define CB 32 /* columns per micro-kernel (two vectors) */

/* acc[r][0..31] = sum_{j < n} a[r * ras + j * kas] b[j * ldb + 0..31] for r < 8: a's element
 * (r, j) at any strides (rows of a matrix: ras = its row stride, kas = 1; a packed [n][8]
 * sliver: ras = 1, kas = 8), b's rows at stride ldb, any alignment. Inlined with constant strides. */
static inline void mk_8x32(const float *a, int64_t ras, int64_t kas, const float *b, int64_t ldb, int64_t n,
                           vf acc[RB][2]) {
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = (vf){0};
    for (int64_t j = 0; j < n; j++) {
        vf b0, b1; /* unaligned loads (as fast as aligned ones on aligned data) */
        __builtin_memcpy(&b0, b + j * ldb, 64);
        __builtin_memcpy(&b1, b + j * ldb + 16, 64);
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const vf x = BCAST(a[r * ras + j * kas]);
            acc[r][0] += x * b0;
            acc[r][1] += x * b1;
        }
    }
}

/* acc[j][0..31] += sum_{r < 8} a[r * lda + j] x[r * ldx + 0..31] for j < n: rank-8 updates (the
 * attention backward's dK and dV, the relation KL's key-side gradient), the 8 rows of x held in
 * 16 vectors, each acc row loaded and stored once; any alignment. */
static inline void mk_outer(const float *a, int64_t lda, const float *x, int64_t ldx, float *acc, int64_t ldacc,
                            int64_t n) {
    vf x0[RB], x1[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        __builtin_memcpy(&x0[r], x + r * ldx, 64);
        __builtin_memcpy(&x1[r], x + r * ldx + 16, 64);
    }
    for (int64_t j = 0; j < n; j++) {
        vf s0, s1;
        __builtin_memcpy(&s0, acc + j * ldacc, 64);
        __builtin_memcpy(&s1, acc + j * ldacc + 16, 64);
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const vf b = BCAST(a[r * lda + j]);
            s0 += b * x0[r];
            s1 += b * x1[r];
        }
        __builtin_memcpy(acc + j * ldacc, &s0, 64);
        __builtin_memcpy(acc + j * ldacc + 16, &s1, 64);
    }
}

/* dst[d * ldd + j] = src[j * lds + d] for j < n, d < D (a transpose for the micro-kernel's b), in
 * tiles of 16 rows: contiguous stores, and loads from 16 rows that stay in L1. */
static inline void pack_t(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t n, int64_t D) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t jn = n - j0 < 16 ? n - j0 : 16;
        for (int64_t d = 0; d < D; d++) {
            float *o = dst + d * ldd + j0;
            const float *x = src + j0 * lds + d;
            for (int64_t j = 0; j < jn; j++) o[j] = x[j * lds];
        }
    }
}

/* dst[j * ldd + d] = src[j * lds + d] for j < n, d < D, zeros for D <= d < ldd and for the rows
 * n <= j < n_pad: a matrix's rows copied into a zero-padded block for the micro-kernel's b. */
static inline void pack_rows(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t n, int64_t n_pad,
                             int64_t D) {
    for (int64_t j = 0; j < n_pad; j++) {
        float *o = dst + j * ldd;
        int64_t d = 0;
        if (j < n)
            for (; d < D; d++) o[d] = src[j * lds + d];
        for (; d < ldd; d++) o[d] = 0.0f;
    }
}

#endif
