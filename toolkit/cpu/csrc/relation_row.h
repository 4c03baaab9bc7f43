/* The relation KL's row math, for relation_kl_fused.c. toolkit/cpu/compiled.py's build puts this
 * directory on the include path and hashes this header into every kernel's cache key.
 *
 * One row of teacher logits a and student logits s over L keys (kv: NULL, or bytes with 1 for a
 * real key), in one sweep that stays in L1:
 *   m_t, m_s = row maxima over real keys
 *   e_t = exp(a - m_t), e_s = exp(s - m_s)       (0 on padded keys)
 *   KL  = sum_j e_t,j ((a_j - s_j) - (m_t - m_s)) / sum e_t + log(sum e_s / sum e_t)
 *   g   = e_s / sum e_s - e_t / sum e_t           (= p_s - p_t = dKL/ds; relkl_row_grad)
 */
#ifndef TOOLKIT_RELATION_ROW_H
#define TOOLKIT_RELATION_ROW_H

#include <math.h>
#include <stdint.h>

#include "exp_nonpos.h"

/* KL of one row; a becomes e_t and s becomes e_s, and their sums go to *st_out, *ss_out. */
static inline float relkl_row(float *ar, float *sr, int64_t L, const uint8_t *kv, float *st_out, float *ss_out) {
    float mt = -INFINITY, ms = -INFINITY;
    float st = 0.0f, ss = 0.0f, sd = 0.0f, dot = 0.0f; /* sd: sum of e_s - e_t, see below */
    float dm;
    if (kv) {
#pragma omp simd reduction(max : mt, ms)
        for (int64_t j = 0; j < L; j++) {
            float va = kv[j] ? ar[j] : -INFINITY, vs = kv[j] ? sr[j] : -INFINITY;
            mt = va > mt ? va : mt;
            ms = vs > ms ? vs : ms;
        }
        dm = mt - ms;
#pragma omp simd reduction(+ : st, ss, sd, dot)
        for (int64_t j = 0; j < L; j++) {
            float ca = ar[j] - mt, cs = sr[j] - ms;
            float et = kv[j] ? exp_nonpos(ca) : 0.0f, es = kv[j] ? exp_nonpos(cs) : 0.0f;
            st += et;
            ss += es;
            sd += es - et;
            dot += kv[j] ? et * ((ar[j] - sr[j]) - dm) : 0.0f;
            ar[j] = et;
            sr[j] = es;
        }
    } else {
#pragma omp simd reduction(max : mt, ms)
        for (int64_t j = 0; j < L; j++) {
            mt = ar[j] > mt ? ar[j] : mt;
            ms = sr[j] > ms ? sr[j] : ms;
        }
        dm = mt - ms;
#pragma omp simd reduction(+ : st, ss, sd, dot)
        for (int64_t j = 0; j < L; j++) {
            float ca = ar[j] - mt, cs = sr[j] - ms;
            float et = exp_nonpos(ca), es = exp_nonpos(cs);
            st += et;
            ss += es;
            sd += es - et;
            dot += et * ((ar[j] - sr[j]) - dm);
            ar[j] = et;
            sr[j] = es;
        }
    }
    *st_out = st;
    *ss_out = ss;
    /* st, ss >= 1: the maximum's own term is exp(0). A student near its teacher has a KL of 1e-4
     * or less made of O(1e-2) terms that cancel, so nothing is taken as the difference of two
     * large rounded numbers: ss - st is summed term by term (sd), and the logit difference a - s
     * is taken before the maxima are subtracted (not (a - m_t) - (s - m_s), which rounds each
     * side first), which keeps small KLs close to float64. */
    return dot / st + log1pf(sd / st);
}

/* s <- g = p_s - p_t from relkl_row's e_s (in s), e_t (in a) and sums. Reciprocals, as torch's
 * softmax does: a division per element is far slower and rounds the probabilities the same. */
static inline void relkl_row_grad(float *sr, const float *ar, int64_t L, float st, float ss) {
    const float it = 1.0f / st, is = 1.0f / ss;
#pragma omp simd
    for (int64_t j = 0; j < L; j++) sr[j] = sr[j] * is - ar[j] * it;
}

#endif
