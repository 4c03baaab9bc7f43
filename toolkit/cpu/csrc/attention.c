/* Attention forward and backward on CPUs for small head sizes (toolkit/kernels/cpu_attention.py
 * builds this file with the system C compiler and loads it with ctypes; see docs/KERNELS.md).
 *
 * attn_fwd: out = softmax(scale Q K^T + mask) V and logsumexp, per (sample, head), in the layouts
 * of torch's CPU flash-attention op (out [B, Lq, H, D], lse [B, Lq, H]). torch's flash kernel
 * runs its blocks through a general GEMM with an inner dimension of D (32 for the MiniLM
 * shapes): it spends most of its time outside the FMAs. Here each (sample, head) packs K^T once
 * and runs two register-blocked micro-kernels, 8 query rows x 32 columns held in 16 vector
 * accumulators, for S = Q K^T and for O = P V, with the row softmax between them on an 8 x Lk
 * block that stays in L1. attn_bwd: the gradients from out and lse, in the same micro-kernels.
 *
 * Portable C: GNU vector extensions (16 floats, what AVX-512 holds in one register; other
 * targets split them) and `omp simd` loops; exp is a polynomial. Threads: OpenMP over
 * (sample, head) pairs, as many as torch uses. A row whose keys are all masked gets out 0 and
 * lse 0, as torch's kernel does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpos.h"
#include "microkernel.h"

typedef int32_t vi __attribute__((vector_size(64)));

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int attn_abi_version(void) { return 2; }

/* The one micro-kernel (microkernel.h, 8 query rows x 32 columns) runs S = Q K^T (a = Q,
 * b = K^T), O = P V, dP = dO V^T and dQ = dS K. */

/* s[r][0..31] = sum_j q[r][j] kt[j][0..31], r < 8, stored with row stride lds. */
static inline void mk_qk(const float *q, int64_t ldq, const float *kt, int64_t ldk, int64_t dp, float *s,
                         int64_t lds) {
    vf acc[RB][2];
    mk_8x32(q, ldq, 1, kt, ldk, dp, acc);
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        *(vf *)(s + r * lds) = acc[r][0];
        *(vf *)(s + r * lds + 16) = acc[r][1];
    }
}

/* q, k, v: element (b, h, l, d) at x + b*sb + h*sh + l*sl + d (d contiguous). mask: NULL, or
 * bytes (1 = attend) at mask + b*mb + h*mh + i*mq + j*mk (strides may be 0 to broadcast).
 * out: [B, Lq, H, D] contiguous; lse: [B, Lq, H] contiguous. */
int attn_fwd(const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
             int64_t D, int64_t qsb, int64_t qsh, int64_t qsl, int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb,
             int64_t vsh, int64_t vsl, const uint8_t *mask, int64_t mb, int64_t mh, int64_t mq, int64_t mk,
             float scale, float *out, float *lse, int nthreads) {
    const int64_t dp = round_up(D, CB), lkp = round_up(Lk, CB), lqp = round_up(Lq, RB);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        /* Per thread: q rows (scaled, padded to dp), K^T [dp][lkp], V [lkp][dp], an 8 x lkp
         * block of logits / probabilities, and one key-bias row. */
        const size_t n_q = (size_t)lqp * dp, n_kt = (size_t)dp * lkp, n_v = (size_t)lkp * dp,
                     n_s = (size_t)RB * lkp, n_bias = (size_t)lkp;
        float *buf = aligned_alloc(64, (n_q + n_kt + n_v + n_s + n_bias) * sizeof(float));
        float *qp = buf, *ktp = qp + n_q, *vp = ktp + n_kt, *sb = vp + n_v, *bias = sb + n_s;
        /* Every thread must reach the worksharing loop, even one without scratch memory. */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!buf) {
                failed = 1;
                continue;
            }
            {
                const int64_t b = bh / H, h = bh % H;
                const float *qb = q + b * qsb + h * qsh, *kb = k + b * ksb + h * ksh, *vb = v + b * vsb + h * vsh;
                /* Pack: Q scaled, K transposed, V; zero padding contributes nothing. */
                for (int64_t i = 0; i < lqp; i++) {
                    float *dst = qp + i * dp;
                    if (i < Lq) {
                        const float *src = qb + i * qsl;
                        for (int64_t d = 0; d < D; d++) dst[d] = src[d] * scale;
                        for (int64_t d = D; d < dp; d++) dst[d] = 0.0f;
                    } else {
                        memset(dst, 0, (size_t)dp * sizeof(float));
                    }
                }
                memset(ktp, 0, n_kt * sizeof(float));
                pack_t(ktp, lkp, kb, ksl, Lk, D);
                pack_rows(vp, dp, vb, vsl, Lk, lkp, D);
                /* The next (sample, head)'s Q, K and V rows (D floats each, a row stride apart)
                 * are fetched while this one computes, a share per row block: without it the
                 * packing below waits on memory for most of them. */
                const int has_next = bh + 1 < B * H;
                const int64_t nb = (bh + 1) / H, nh = (bh + 1) % H, nblocks = (Lq + RB - 1) / RB;
                const char *nq = (const char *)(q + nb * qsb + nh * qsh);
                const char *nk = (const char *)(k + nb * ksb + nh * ksh);
                const char *nv = (const char *)(v + nb * vsb + nh * vsh);
                const uint8_t *mbh = mask ? mask + b * mb + h * mh : NULL;
                /* A query-independent mask (key padding) becomes one bias row for all queries. */
                if (!mbh || mq == 0) {
                    for (int64_t j = 0; j < lkp; j++)
                        bias[j] = (j < Lk && (!mbh || mbh[j * mk])) ? 0.0f : -INFINITY;
                }
                for (int64_t i0 = 0; i0 < Lq; i0 += RB) {
                    if (has_next) {
                        const int64_t t = i0 / RB;
                        for (int64_t i = t * Lq / nblocks; i < (t + 1) * Lq / nblocks; i++)
                            for (int64_t off = 0; off < D * 4; off += 64) __builtin_prefetch(nq + i * qsl * 4 + off, 0, 3);
                        for (int64_t j = t * Lk / nblocks; j < (t + 1) * Lk / nblocks; j++)
                            for (int64_t off = 0; off < D * 4; off += 64) {
                                __builtin_prefetch(nk + j * ksl * 4 + off, 0, 3);
                                __builtin_prefetch(nv + j * vsl * 4 + off, 0, 3);
                            }
                    }
                    for (int64_t c0 = 0; c0 < lkp; c0 += CB)
                        mk_qk(qp + i0 * dp, dp, ktp + c0, lkp, dp, sb + c0, lkp);
                    float inv[RB];
                    for (int r = 0; r < RB; r++) {
                        const int64_t i = i0 + r;
                        float *s = sb + r * lkp;
                        inv[r] = 0.0f;
                        if (i >= Lq) continue;
                        if (mbh && mq != 0) {
                            const uint8_t *mrow = mbh + i * mq;
                            for (int64_t j = 0; j < lkp; j++) bias[j] = (j < Lk && mrow[j * mk]) ? 0.0f : -INFINITY;
                        }
                        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
                        for (int64_t j = 0; j < lkp; j++) {
                            const float x = s[j] + bias[j];
                            mx = x > mx ? x : mx;
                        }
                        float *lrow = lse + (b * Lq + i) * H + h;
                        if (mx == -INFINITY) { /* every key masked: out 0, lse 0 (torch's convention) */
                            memset(s, 0, (size_t)lkp * sizeof(float));
                            *lrow = 0.0f;
                            continue;
                        }
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = 0; j < lkp; j++) {
                            const float e = exp_nonpos(s[j] + bias[j] - mx);
                            s[j] = e;
                            sum += e;
                        }
                        inv[r] = 1.0f / sum;
                        *lrow = mx + logf(sum);
                    }
                    for (int64_t c0 = 0; c0 < dp; c0 += CB) {
                        vf acc[RB][2];
                        mk_8x32(sb, lkp, 1, vp + c0, dp, Lk, acc);
                        for (int r = 0; r < RB && i0 + r < Lq; r++) {
                            const vf sc = BCAST(inv[r]);
                            float tmp[CB] __attribute__((aligned(64)));
                            *(vf *)tmp = acc[r][0] * sc;
                            *(vf *)(tmp + 16) = acc[r][1] * sc;
                            const int64_t n = D - c0 < CB ? D - c0 : CB;
                            memcpy(out + ((b * Lq + i0 + r) * H + h) * D + c0, tmp, (size_t)n * sizeof(float));
                        }
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* The backward of attn_fwd. q, k, v, mask as there; o: attn_fwd's out [B, Lq, H, D]; dout:
 * (b, h, i, d) at dout + b*gsb + h*gsh + i*gsl + d; lse: attn_fwd's [B, Lq, H]. dq: [B, Lq, H, D],
 * dk, dv: [B, Lk, H, D], all contiguous. Per (sample, head), 8 query rows at a time:
 *   S = scale Q K^T (recomputed), P = exp(S + mask - lse), dP = dO V^T,
 *   dS = P (dP - rowsum(dO o O)), dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO. */
int attn_bwd(const float *q, const float *k, const float *v, const float *o, const float *dout, const float *lse,
             int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, int64_t qsb, int64_t qsh, int64_t qsl,
             int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb, int64_t vsh, int64_t vsl, int64_t gsb, int64_t gsh,
             int64_t gsl, const uint8_t *mask, int64_t mb, int64_t mh, int64_t mq, int64_t mk, float scale, float *dq,
             float *dk, float *dv, int nthreads) {
    const int64_t dp = round_up(D, CB), lkp = round_up(Lk, CB), lqp = round_up(Lq, RB);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        /* Per thread: Q (scaled) and dO rows [lqp][dp], K^T and V^T [dp][lkp], K rows [lkp][dp],
         * dK and dV accumulators [lkp][dp], P and dS blocks [8][lkp], the key-bias row and the
         * row sums rowsum(dO o O). */
        const size_t n_q = (size_t)lqp * dp, n_t = (size_t)dp * lkp, n_k = (size_t)lkp * dp, n_s = (size_t)RB * lkp;
        const size_t total = (size_t)round_up((int64_t)(2 * n_q + 2 * n_t + 3 * n_k + 2 * n_s + lkp + lqp), 16);
        float *buf = aligned_alloc(64, total * sizeof(float)); /* a multiple of 64 bytes, as C11 asks */
        float *qp = buf, *dop = qp + n_q, *ktp = dop + n_q, *vtp = ktp + n_t, *kp = vtp + n_t, *dka = kp + n_k,
              *dva = dka + n_k, *pb = dva + n_k, *db = pb + n_s, *bias = db + n_s, *drow = bias + lkp;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!buf) {
                failed = 1;
                continue;
            }
            const int64_t b = bh / H, h = bh % H;
            const float *qb = q + b * qsb + h * qsh, *kb = k + b * ksb + h * ksh, *vb = v + b * vsb + h * vsh;
            const float *gb = dout + b * gsb + h * gsh;
            memset(buf, 0, (2 * n_q + 2 * n_t + 3 * n_k) * sizeof(float));
            for (int64_t i = 0; i < Lq; i++) {
                const float *src = qb + i * qsl, *g = gb + i * gsl, *orow = o + ((b * Lq + i) * H + h) * D;
                float dsum = 0.0f;
                for (int64_t d = 0; d < D; d++) {
                    qp[i * dp + d] = src[d] * scale;
                    dop[i * dp + d] = g[d];
                    dsum += g[d] * orow[d];
                }
                drow[i] = dsum;
            }
            pack_t(ktp, lkp, kb, ksl, Lk, D);
            pack_t(vtp, lkp, vb, vsl, Lk, D);
            for (int64_t j = 0; j < Lk; j++) memcpy(kp + j * dp, kb + j * ksl, (size_t)D * sizeof(float));
            const uint8_t *mbh = mask ? mask + b * mb + h * mh : NULL;
            if (!mbh || mq == 0) {
                for (int64_t j = 0; j < lkp; j++) bias[j] = (j < Lk && (!mbh || mbh[j * mk])) ? 0.0f : -INFINITY;
            }
            for (int64_t i0 = 0; i0 < Lq; i0 += RB) {
                for (int64_t c0 = 0; c0 < lkp; c0 += CB) {
                    mk_qk(qp + i0 * dp, dp, ktp + c0, lkp, dp, pb + c0, lkp);
                    mk_qk(dop + i0 * dp, dp, vtp + c0, lkp, dp, db + c0, lkp);
                }
                for (int r = 0; r < RB; r++) {
                    const int64_t i = i0 + r;
                    float *p = pb + r * lkp, *ds = db + r * lkp;
                    if (i >= Lq) {
                        memset(p, 0, (size_t)lkp * sizeof(float));
                        memset(ds, 0, (size_t)lkp * sizeof(float));
                        continue;
                    }
                    if (mbh && mq != 0) {
                        const uint8_t *mrow = mbh + i * mq;
                        for (int64_t j = 0; j < lkp; j++) bias[j] = (j < Lk && mrow[j * mk]) ? 0.0f : -INFINITY;
                    }
                    const float l = lse[(b * Lq + i) * H + h], dr = drow[i];
#pragma omp simd
                    for (int64_t j = 0; j < lkp; j++) {
                        const float x = p[j] + bias[j] - l;
                        /* exp_nonpos wants x <= 0: true up to rounding (lse is the row's
                         * log-sum-exp); a masked key is -inf, which gives 0. */
                        const float e = exp_nonpos(x < 0.0f ? x : 0.0f);
                        p[j] = e;
                        ds[j] = e * (ds[j] - dr);
                    }
                }
                for (int64_t c0 = 0; c0 < dp; c0 += CB) {
                    vf acc[RB][2];
                    mk_8x32(db, lkp, 1, kp + c0, dp, Lk, acc);
                    const vf sc = BCAST(scale);
                    for (int r = 0; r < RB && i0 + r < Lq; r++) {
                        float tmp[CB] __attribute__((aligned(64)));
                        *(vf *)tmp = acc[r][0] * sc;
                        *(vf *)(tmp + 16) = acc[r][1] * sc;
                        const int64_t n = D - c0 < CB ? D - c0 : CB;
                        memcpy(dq + ((b * Lq + i0 + r) * H + h) * D + c0, tmp, (size_t)n * sizeof(float));
                    }
                    mk_outer(db, lkp, qp + i0 * dp + c0, dp, dka + c0, dp, Lk);
                    mk_outer(pb, lkp, dop + i0 * dp + c0, dp, dva + c0, dp, Lk);
                }
            }
            for (int64_t j = 0; j < Lk; j++) {
                memcpy(dk + ((b * Lk + j) * H + h) * D, dka + j * dp, (size_t)D * sizeof(float));
                memcpy(dv + ((b * Lk + j) * H + h) * D, dva + j * dp, (size_t)D * sizeof(float));
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
