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
 * The GELU is the erf form x Phi(x), Phi from a rational fit of erf (phi_cdf below); the same
 * GELU and its gradient also run alone (lin_gelu, lin_gelu_grad: the trained student's
 * activation, toolkit/kernels/cpu_linear.py).
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

int lin_abi_version(void) { return 2; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Phi(x), the standard normal CDF: 0.5 + 0.5 erf(z), z = x / sqrt 2, with erf(z) = z P(z^2) / Q(z^2),
 * a (5, 5) rational fit on |z| <= 3.925 (beyond, erf is 1 to fp32 precision; z is clamped there).
 * Absolute error < 5e-7 in fp32 arithmetic, as good as torch's own fp32 F.gelu (its erf:
 * Abramowitz-Stegun 7.1.26 with an exp and a division); no exp, one division: ~0.42 ns per element
 * on one Zen 4 core against ~0.8 for an erfc through exp (linear.c before 2026-12-05). */
static inline float phi_cdf(float x) {
    float z = x * 0.70710678118654752f;
    z = z > 3.925f ? 3.925f : z < -3.925f ? -3.925f : z;
    const float u = z * z;
    float p = 2.030537700332407e-06f;
    p = p * u + 2.8749729997189975e-04f;
    p = p * u + 3.877135539355773e-03f;
    p = p * u + 5.308678585813584e-02f;
    p = p * u + 1.929931711606871e-01f;
    p = p * u + 1.1283790192845073f;
    float q = 3.8028283104625906e-05f;
    q = q * u + 1.18992213105898e-03f;
    q = q * u + 1.5189978483662962e-02f;
    q = q * u + 1.1517571825133846e-01f;
    q = q * u + 5.043673784347718e-01f;
    q = q * u + 1.0f;
    const float c = 0.5f + 0.5f * (z * p / q);
    return c < 0.0f ? 0.0f : c;
}

/* x Phi(x) (torch's gelu, approximate="none"). */
static inline float gelu_erf(float x) { return x * phi_cdf(x); }

/* d/dx x Phi(x) = Phi(x) + x phi(x), phi the standard normal density. */
static inline float gelu_erf_grad(float x) {
    return phi_cdf(x) + x * 0.39894228040143268f * exp_nonpos(-0.5f * x * x);
}

/* y[i] = gelu(x[i]) for i < n (y may be x). */
void lin_gelu(const float *x, float *y, int64_t n, int nthreads) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = gelu_erf(x[i]);
}

/* dx[i] = dy[i] gelu'(h[i]) for i < n: the GELU's backward from its input h. */
void lin_gelu_grad(const float *h, const float *dy, float *dx, int64_t n, int nthreads) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * gelu_erf_grad(h[i]);
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
                y[t * O + o] = gelu ? gelu_erf(v) : v;
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
                            for (int64_t e = 0; e < RB * CB; e++) tile[e] = gelu_erf(tile[e]);
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
