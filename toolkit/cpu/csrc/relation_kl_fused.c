/* The MiniLMv2 relation KL on CPUs, one (sample, relation head) at a time, with the student's
 * gradient (toolkit/cpu/relation.py builds this file with the system C compiler and loads it
 * with ctypes).
 *
 * For a relation (Q-Q, K-K or V-V; or a query side against a key side), teacher rows tq_i, tk_j
 * (head size dt) and student rows sq_i, sk_j (head size ds) of one sample and relation head:
 *   a_ij = tq_i . tk_j / sqrt(dt),  s_ij = sq_i . sk_j / sqrt(ds)       (j over real keys)
 *   KL_i = KL(softmax_j a_ij || softmax_j s_ij),  g_ij = p_s,ij - p_t,ij = dKL_i / ds_ij
 *   dsq_i = sum_j g_ij sk_j / sqrt(ds),  dsk_j = sum_i g_ij sq_i / sqrt(ds)
 * Per block of 8 query rows: both logit rows from the shared micro-kernel (microkernel.h) on the
 * packed, transposed keys; the row math (relation_row.h) on the 8 x L block in L1; then
 * dsq for the 8 rows (the micro-kernel on the packed sk) and rank-8 updates of dsk (mk_outer).
 * Nothing of size L x L exists, and no [B, R, L, d] copy of the inputs is made: rows are read
 * in place from the [B, L, R * d] projections. Padded keys drop out of both softmaxes; padded
 * query rows give KL 0 and no gradient.
 *
 * Portable C: GNU vector extensions and `omp simd`; exp is exp_nonpos.h's polynomial. Threads:
 * OpenMP over (sample, relation head) pairs, as many as torch uses; each pair owns its slice of
 * the outputs, so no two threads write the same element.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_nonpos.h"
#include "microkernel.h"
#include "relation_row.h"

int relf_abi_version(void) { return 1; }

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* One relation. t*, s*: element (b, l, h * d + c) at x + b * xsb + l * xsl + h * d + c (unit
 * stride along c). key_valid: NULL (no padding) or [B, L] bytes, 1 = a real token. row_kl:
 * [B, R, L] out. dq, dk: NULL, or [B, L, R * ds] contiguous outs, the gradients of sum_i KL_i
 * with respect to sq and sk; dk == dq (one tensor on both sides) sums both into it. Returns 0,
 * or -1 when a buffer could not be allocated. */
int relf_forward(const float *tq, int64_t tqsb, int64_t tqsl, const float *tk, int64_t tksb, int64_t tksl,
                 const float *sq, int64_t sqsb, int64_t sqsl, const float *sk, int64_t sksb, int64_t sksl,
                 int64_t B, int64_t L, int64_t R, int64_t dt, int64_t ds, const uint8_t *key_valid,
                 float *row_kl, float *dq, float *dk, int nthreads) {
    const int64_t lp = round_up(L, CB), dtp = round_up(dt, CB), dsp = round_up(ds, CB);
    const float sc_t = 1.0f / sqrtf((float)dt), sc_s = 1.0f / sqrtf((float)ds);
    const int want = dq != NULL || dk != NULL, merged = dq != NULL && dq == dk;
    const int64_t Hs = R * ds;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        /* Per thread: tk^T [dt][lp], sk^T [ds][lp], sk [lp][dsp], 8 scaled query rows of each
         * side, the 8 x lp teacher and student blocks, sq's 8 rows [8][dsp], and the gradient
         * accumulators dq [lp][dsp], dk [lp][dsp]. */
        const size_t n_tkt = (size_t)dt * lp, n_skt = (size_t)ds * lp, n_sk = (size_t)lp * dsp,
                     n_tq = (size_t)RB * dt, n_sqs = (size_t)RB * ds, n_blk = (size_t)RB * lp,
                     n_sqr = (size_t)RB * dsp, n_acc = (size_t)lp * dsp;
        float *buf = aligned_alloc(64, ((n_tkt + n_skt + n_sk + n_tq + n_sqs + 2 * n_blk + n_sqr + 2 * n_acc) * 4 + 63)
                                           / 64 * 64);
        float *tkt = buf, *skt = tkt + n_tkt, *skp = skt + n_skt, *tqs = skp + n_sk, *sqs = tqs + n_tq,
              *ab = sqs + n_sqs, *sb = ab + n_blk, *sqr = sb + n_blk, *gq = sqr + n_sqr, *gk = gq + n_acc;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * R; bh++) {
            if (!buf) {
                failed = 1;
                continue;
            }
            const int64_t b = bh / R, h = bh % R;
            const float *tqb = tq + b * tqsb + h * dt, *tkb = tk + b * tksb + h * dt;
            const float *sqb = sq + b * sqsb + h * ds, *skb = sk + b * sksb + h * ds;
            const uint8_t *kv = key_valid ? key_valid + b * L : NULL;
            /* Keys: transposed for the logits (zeros past L), and sk as rows for dsq. */
            memset(tkt, 0, n_tkt * sizeof(float));
            memset(skt, 0, n_skt * sizeof(float));
            pack_t(tkt, lp, tkb, tksl, L, dt);
            pack_t(skt, lp, skb, sksl, L, ds);
            if (want) {
                pack_rows(skp, dsp, skb, sksl, L, lp, ds);
                memset(gq, 0, n_acc * sizeof(float));
                memset(gk, 0, n_acc * sizeof(float));
            }
            float *klb = row_kl + bh * L;
            for (int64_t i0 = 0; i0 < L; i0 += RB) {
                /* 8 query rows of each side, scaled (zeros past L). */
                for (int64_t r = 0; r < RB; r++) {
                    const int64_t i = i0 + r;
                    if (i < L) {
                        const float *xt = tqb + i * tqsl, *xs = sqb + i * sqsl;
#pragma omp simd
                        for (int64_t c = 0; c < dt; c++) tqs[r * dt + c] = xt[c] * sc_t;
#pragma omp simd
                        for (int64_t c = 0; c < ds; c++) sqs[r * ds + c] = xs[c] * sc_s;
                    } else {
                        memset(tqs + r * dt, 0, (size_t)dt * sizeof(float));
                        memset(sqs + r * ds, 0, (size_t)ds * sizeof(float));
                    }
                }
                for (int64_t c0 = 0; c0 < lp; c0 += CB) {
                    vf acc[RB][2];
                    mk_8x32(tqs, dt, 1, tkt + c0, lp, dt, acc);
                    for (int r = 0; r < RB; r++) {
                        memcpy(ab + r * lp + c0, &acc[r][0], 64);
                        memcpy(ab + r * lp + c0 + 16, &acc[r][1], 64);
                    }
                    mk_8x32(sqs, ds, 1, skt + c0, lp, ds, acc);
                    for (int r = 0; r < RB; r++) {
                        memcpy(sb + r * lp + c0, &acc[r][0], 64);
                        memcpy(sb + r * lp + c0 + 16, &acc[r][1], 64);
                    }
                }
                /* The row math (relation_row.h): sb becomes g (0 on padded keys, on padded
                 * query rows and past L). */
                for (int r = 0; r < RB; r++) {
                    const int64_t i = i0 + r;
                    float *ar = ab + r * lp, *sr = sb + r * lp;
                    if (i >= L || (kv && !kv[i])) {
                        if (i < L) klb[i] = 0.0f;
                        memset(sr, 0, (size_t)lp * sizeof(float));
                        continue;
                    }
                    float st, ss;
                    klb[i] = relkl_row(ar, sr, L, kv, &st, &ss);
                    if (want) {
                        relkl_row_grad(sr, ar, L, st, ss);
                        for (int64_t j = L; j < lp; j++) sr[j] = 0.0f;
                    }
                }
                if (!want) continue;
                /* dsq rows i0..i0+7 = g sk (scale applied at the end); dsk += g^T sq_rows. */
                if (dq) {
                    for (int64_t c0 = 0; c0 < dsp; c0 += CB) {
                        vf acc[RB][2];
                        mk_8x32(sb, lp, 1, skp + c0, dsp, L, acc);
                        for (int r = 0; r < RB && i0 + r < L; r++) {
                            memcpy(gq + (i0 + r) * dsp + c0, &acc[r][0], 64);
                            memcpy(gq + (i0 + r) * dsp + c0 + 16, &acc[r][1], 64);
                        }
                    }
                }
                if (dk) {
                    for (int64_t r = 0; r < RB; r++) {
                        float *dst = sqr + r * dsp;
                        if (i0 + r < L) {
                            memcpy(dst, sqb + (i0 + r) * sqsl, (size_t)ds * sizeof(float));
                            memset(dst + ds, 0, (size_t)(dsp - ds) * sizeof(float));
                        } else {
                            memset(dst, 0, (size_t)dsp * sizeof(float));
                        }
                    }
                    for (int64_t c0 = 0; c0 < dsp; c0 += CB) mk_outer(sb, lp, sqr + c0, dsp, gk + c0, dsp, L);
                }
            }
            if (!want) continue;
            /* Out: the scale, and the key side summed into the query side when they are one tensor. */
            for (int64_t j = 0; j < L; j++) {
                const float *q = gq + j * dsp, *k = gk + j * dsp;
                if (dq && merged) {
                    float *o = dq + (b * L + j) * Hs + h * ds;
#pragma omp simd
                    for (int64_t c = 0; c < ds; c++) o[c] = (q[c] + k[c]) * sc_s;
                } else {
                    if (dq) {
                        float *o = dq + (b * L + j) * Hs + h * ds;
#pragma omp simd
                        for (int64_t c = 0; c < ds; c++) o[c] = q[c] * sc_s;
                    }
                    if (dk) {
                        float *o = dk + (b * L + j) * Hs + h * ds;
#pragma omp simd
                        for (int64_t c = 0; c < ds; c++) o[c] = k[c] * sc_s;
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
