/* A linear layer's GEMM on CPUs: the forward y = x W^T + b (optionally through the exact GELU)
 * and the input gradient dx = dy W (toolkit/kernels/cpu_linear.py builds this file with the
 * system C compiler and loads it with ctypes; see docs/KERNELS.md).
 *
 * y[t][o] = act(sum_i x[t][i] w(o, i) + b[o]) for T tokens, I inputs, O outputs; w(o, i) at any
 * strides (the weight for the forward, its transpose for the input gradient). The weight is
 * packed once per call into 32-column slivers, [O/32][I][32] (zeros past O); each thread then
 * takes blocks of TB tokens and runs the shared micro-kernel (microkernel.h: 8 tokens x 32
 * outputs in 16 vector accumulators) straight on x's rows, broadcasting 8 of them per step of the
 * inner dimension, in blocks of KC inputs. The bias is added and the GELU applied in the
 * micro-kernel's epilogue, so y is written once.
 *
 * The GELU is the exact (erf) form x Phi(x), Phi from erfc(|x| / sqrt 2) by the Chebyshev fit of
 * Numerical Recipes (relative error < 1.2e-7) with exp_nonpos.h's exp.
 *
 * Portable C: GNU vector extensions (microkernel.h) and `omp simd` loops. Threads: OpenMP, as many
 * as torch uses.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpos.h"
#include "microkernel.h"

#define KC 384 /* inputs per block of the inner dimension */
#define TB 64  /* tokens per work item */

int lin_abi_version(void) { return 1; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* x Phi(x) (torch's gelu, approximate="none"). */
static inline float gelu_exact(float x) {
    const float z = fabsf(x) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const float upper = 0.5f * t * exp_nonpos(p - z * z); /* P(Z > |x|) = erfc(z) / 2 */
    return x >= 0.0f ? x * (1.0f - upper) : x * upper;
}

/* Tile j of w(o, i) (at w[o * wso + i * wsi]) into [I][32], zeros past O: 32 rows of the weight
 * read side by side (their lines stay in L1), the packed sliver written in order. */
static void pack_w(const float *w, int64_t wso, int64_t wsi, int64_t I, int64_t O, float *wp, int64_t j) {
    float *dst = wp + j * I * CB;
    const int64_t o0 = j * CB, nn = min64(CB, O - o0);
    for (int64_t i = 0; i < I; i++) {
        const float *src = w + o0 * wso + i * wsi;
        for (int64_t n = 0; n < nn; n++) dst[i * CB + n] = src[n * wso];
        for (int64_t n = nn; n < CB; n++) dst[i * CB + n] = 0.0f;
    }
}

/* y[t * O + o] = act(sum_i x[t * ldx + i] w[o * wso + i * wsi] + bias[o]) for t < T, o < O;
 * bias may be NULL; act is the exact GELU when gelu != 0, else the identity. y is contiguous.
 * Returns 0, or -1 when a buffer could not be allocated (y is then undefined). */
int lin_gemm(const float *x, int64_t ldx, const float *w, int64_t wso, int64_t wsi, const float *bias, float *y,
             int64_t T, int64_t I, int64_t O, int gelu, int nthreads) {
    if (T <= 0 || O <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    const int64_t ntiles = (O + CB - 1) / CB, tblocks = (T + TB - 1) / TB;
    if (I <= 0) { /* no inputs: act(bias) */
        for (int64_t t = 0; t < T; t++)
            for (int64_t o = 0; o < O; o++) {
                const float v = bias ? bias[o] : 0.0f;
                y[t * O + o] = gelu ? gelu_exact(v) : v;
            }
        return 0;
    }
    float *wp = aligned_alloc(64, (size_t)ntiles * I * CB * sizeof(float));
    float *bias_p = aligned_alloc(64, (size_t)ntiles * CB * sizeof(float));   /* zeros past O */
    if (!wp || !bias_p) {
        free(wp);
        free(bias_p);
        return -1;
    }
    for (int64_t o = 0; o < ntiles * CB; o++) bias_p[o] = bias && o < O ? bias[o] : 0.0f;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        /* w is packed at any strides, the input gradient's W^T too: read in place, W^T's rows
         * lie O floats apart, and at O = 1536 (6 KiB) the k-steps of a sliver fall into 4 of
         * L1's 64 sets, so the sliver streamed from L2 on every pass (bench_gemm.py: the input
         * gradient at 4096 x 384 -> 1536 199 GFLOP/s in place, 214 packed; equal at O = 384). */
#pragma omp for schedule(static)
        for (int64_t j = 0; j < ntiles; j++) pack_w(w, wso, wsi, I, O, wp, j);
        /* A tail of fewer than 8 tokens runs from a zero-padded copy of its rows. */
        float *xpad = aligned_alloc(64, (size_t)RB * KC * sizeof(float));
        float tile[RB * CB] __attribute__((aligned(64)));
        if (!xpad) failed = 1;
        /* Every thread reaches the worksharing loop, even one without its scratch row buffer. */
#pragma omp for schedule(static)
        for (int64_t tb = 0; tb < tblocks; tb++) {
            if (!xpad) continue;
            const int64_t t_lo = tb * TB, t_hi = min64(T, t_lo + TB);
            for (int64_t k0 = 0; k0 < I; k0 += KC) {
                const int64_t kc = min64(KC, I - k0);
                const int first = k0 == 0, last = k0 + kc >= I;
                for (int64_t j = 0; j < ntiles; j++) {
                    const int64_t o0 = j * CB, nn = min64(CB, O - o0);
                    const float *bs = wp + (j * I + k0) * CB;
                    for (int64_t t = t_lo; t < t_hi; t += RB) {
                        const int64_t rows = min64(RB, t_hi - t);
                        const float *a = x + t * ldx + k0;
                        int64_t ras = ldx;
                        if (rows < RB) {
                            for (int64_t r = 0; r < RB; r++) {
                                if (r < rows) memcpy(xpad + r * KC, a + r * ldx, (size_t)kc * sizeof(float));
                                else memset(xpad + r * KC, 0, (size_t)kc * sizeof(float));
                            }
                            a = xpad;
                            ras = KC;
                        }
                        vf acc[RB][2];
                        if (kc == KC) /* a constant trip count for the full blocks */
                            mk_8x32(a, ras, 1, bs, CB, KC, acc);
                        else
                            mk_8x32(a, ras, 1, bs, CB, kc, acc);
                        /* Epilogue: + bias (first block) or + the earlier blocks' sums, then the
                         * GELU after the last block. A whole tile stays in registers; a partial
                         * one, or one through the GELU, goes through the tile buffer. */
                        float *out = y + t * O + o0;
                        vf b0, b1;
                        memcpy(&b0, bias_p + o0, 64);
                        memcpy(&b1, bias_p + o0 + 16, 64);
                        if (rows == RB && nn == CB && !(gelu && last)) {
#pragma GCC unroll 8
                            for (int r = 0; r < RB; r++) {
                                vf a0 = acc[r][0], a1 = acc[r][1], p0, p1;
                                if (first) {
                                    a0 += b0;
                                    a1 += b1;
                                } else {
                                    memcpy(&p0, out + r * O, 64);
                                    memcpy(&p1, out + r * O + 16, 64);
                                    a0 += p0;
                                    a1 += p1;
                                }
                                memcpy(out + r * O, &a0, 64);
                                memcpy(out + r * O + 16, &a1, 64);
                            }
                            continue;
                        }
                        for (int r = 0; r < RB; r++) {
                            if (first) {
                                acc[r][0] += b0;
                                acc[r][1] += b1;
                            } else if (r < rows) {
                                float prev[CB] __attribute__((aligned(64))) = {0};
                                memcpy(prev, out + r * O, (size_t)nn * sizeof(float));
                                acc[r][0] += *(vf *)prev;
                                acc[r][1] += *(vf *)(prev + 16);
                            }
                            memcpy(tile + r * CB, &acc[r][0], 64);
                            memcpy(tile + r * CB + 16, &acc[r][1], 64);
                        }
                        if (gelu && last) {
#pragma omp simd
                            for (int64_t e = 0; e < RB * CB; e++) tile[e] = gelu_exact(tile[e]);
                        }
                        for (int64_t r = 0; r < rows; r++) memcpy(out + r * O, tile + r * CB, (size_t)nn * sizeof(float));
                    }
                }
            }
        }
        free(xpad);
    }
    free(wp);
    free(bias_p);
    return failed ? -1 : 0;
}
