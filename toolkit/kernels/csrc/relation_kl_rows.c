/* Fused row math of the chunked relation KL on CPUs (toolkit/kernels/cpu_rows.py builds this
 * file with the system C compiler and loads it with ctypes; see docs/KERNELS.md).
 *
 * One query block holds teacher logits `a` and student logits `s`, both [n_mat, rows, L] fp32,
 * row-major (n_mat = samples x relation heads). For every row, in one sweep that stays in L1:
 *   m_t, m_s = row maxima over real keys
 *   e_t = exp(a - m_t), e_s = exp(s - m_s)       (0 on padded keys)
 *   KL  = sum_j e_t,j ((a_j - s_j) - (m_t - m_s)) / sum e_t + log(sum e_s / sum e_t)
 *   g   = e_s / sum e_s - e_t / sum e_t           (= p_s - p_t = dKL/ds, written over s)
 * The torch block math (relation_kl_chunked._block_kl) needs about ten passes over the block
 * for the same numbers. Padded query rows get KL 0 and g 0. With `symmetric` (rows == L, the
 * student's self relation) g is replaced by g + g^T per matrix, so the caller needs one
 * gradient matmul instead of two (query side and key side use the same tensor).
 *
 * Only portable C: the loops are written so that gcc/clang vectorise them (`omp simd`), and
 * exp is a polynomial (no libm call in the loop). Threads: OpenMP, as many as torch uses.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpos.h"
#include "relation_row.h"

/* For the tests: y[i] = exp_nonpos(x[i]). */
void relkl_exp_nonpos(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = exp_nonpos(x[i]);
}

/* Version of the calling convention below; cpu_rows.py refuses a library with another. */
int relkl_abi_version(void) { return 1; }

/* a, s: [n_mat, rows, L] teacher and student logits of query rows row0 .. row0 + rows - 1
 * (already scaled; padded keys may hold anything). key_valid: NULL (no padding) or
 * [n_mat / heads, L] bytes, 1 for a real token (keys and query rows of a sample).
 * row_kl: [n_mat, rows] out. a is clobbered (it holds e_t afterwards). With want_grad, s
 * becomes p_s - p_t, or (p_s - p_t) + its transpose with symmetric (requires rows == L). */
void relkl_block(float *a, float *s, int64_t n_mat, int64_t rows, int64_t L, int64_t heads, int64_t row0,
                 const uint8_t *key_valid, float *row_kl, int want_grad, int symmetric, int nthreads) {
    if (symmetric && rows != L) symmetric = 0; /* the caller checks; never transpose a partial block */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_mat * rows; i++) {
            const int64_t m = i / rows, q = row0 + i % rows;
            const uint8_t *kv = key_valid ? key_valid + (m / heads) * L : NULL;
            float *ar = a + i * L, *sr = s + i * L;
            if (kv && !kv[q]) { /* padded query row: no loss, no gradient */
                row_kl[i] = 0.0f;
                if (want_grad) memset(sr, 0, (size_t)L * sizeof(float));
                continue;
            }
            float st, ss;
            row_kl[i] = relkl_row(ar, sr, L, kv, &st, &ss);
            if (want_grad) relkl_row_grad(sr, ar, L, st, ss);
        }
        if (want_grad && symmetric) { /* g <- g + g^T, per matrix, in 16 x 16 tiles */
#pragma omp for schedule(static)
            for (int64_t m = 0; m < n_mat; m++) {
                float *g = s + m * L * L;
                const int64_t T = 16;
                for (int64_t ib = 0; ib < L; ib += T)
                    for (int64_t jb = ib; jb < L; jb += T)
                        for (int64_t r = ib; r < ib + T && r < L; r++)
                            for (int64_t c = (jb == ib ? r : jb); c < jb + T && c < L; c++) {
                                float v = g[r * L + c] + g[c * L + r];
                                g[r * L + c] = v;
                                g[c * L + r] = v;
                            }
            }
        }
    }
}
