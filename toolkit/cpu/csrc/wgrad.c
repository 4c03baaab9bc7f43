/* The weight gradient of a linear layer on CPUs: dW = dY^T X and db = sum over tokens of dY
 * (toolkit/kernels/cpu_wgrad.py builds this file with the system C compiler and loads it with
 * ctypes; see docs/KERNELS.md).
 *
 * dY is [K, M] (tokens x output features), X is [K, N] (tokens x input features), both with
 * unit column stride, dW is [M, N]. The product reduces over the tokens, the long dimension
 * (4096 at batch 32 x seq 128), and both operands are already in the layout a GEMM packs into:
 * for each token, M consecutive values of dY and N consecutive values of X. Per block of KC
 * tokens the kernel copies a panel of X's columns into contiguous 32-column slivers and runs a
 * register-blocked micro-kernel, 8 rows of dW x 32 columns in 16 vector accumulators,
 * broadcasting 8 values of dY per token (rank-1 updates) from a packed [KC][8] sliver that stays
 * in L1. The bias gradient is summed from the same packed slivers, so it costs no pass of its own.
 *
 * dY and X are cold in a backward pass (X was saved in the forward): while one row block
 * computes, the kernel prefetches dY's lines two row blocks on and a share of the next token
 * block's X panel. Threads: OpenMP, as many as torch uses, each over its own range of tokens
 * (each reads its own part of dY and X once; a split over columns made every thread read all of
 * dY), into its own partial dW; the partials are then summed, rows split among the threads.
 *
 * Summation order: per block of KC tokens in the accumulators, then added into the thread's dW
 * (and db), then the threads' partials: the blocked order a GEMM library uses.
 *
 * Portable C: GNU vector extensions (microkernel.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "microkernel.h"

#define MR RB   /* rows of dW per micro-kernel (microkernel.h) */
#define NR CB   /* columns of dW per micro-kernel */
#define KC 256 /* tokens per block */
#define PFD 2  /* row blocks ahead for dY's prefetches */
#define NCT 16 /* column slivers per packed panel of X: 16 x 32 columns x KC tokens = 512 KiB */

int wg_abi_version(void) { return 1; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* c[r][0..31] (= when first, else +=) sum_{k < kc} a[k][r] b[k][0..31], r < 8: a packed [kc][8],
 * b packed [kc][32] (64-byte aligned); c rows at stride ldc, any alignment. */
static inline void tile_8x32(const float *a, const float *b, int64_t kc, float *c, int64_t ldc, int first) {
    vf acc[MR][2];
    mk_8x32(a, 1, MR, b, NR, kc, acc);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        float *o = c + r * ldc;
        if (!first) {
            vf t0, t1;
            memcpy(&t0, o, 64);
            memcpy(&t1, o + 16, 64);
            acc[r][0] += t0;
            acc[r][1] += t1;
        }
        memcpy(o, &acc[r][0], 64);
        memcpy(o + 16, &acc[r][1], 64);
    }
}

/* dw[m * ldw + n] = sum_k dy[k * ldy + m] x[k * ldx + n] for m < M, n < N; when db is not NULL,
 * db[m] = sum_k dy[k * ldy + m]. Returns 0, or -1 when a buffer could not be allocated (dw and db
 * are then undefined). */
int wg_gemm(const float *dy, int64_t ldy, const float *x, int64_t ldx, int64_t K, int64_t M, int64_t N,
            float *dw, int64_t ldw, float *db, int nthreads) {
    const int64_t mblocks = (M + MR - 1) / MR, ntiles = (N + NR - 1) / NR;
    if (nthreads < 1) nthreads = 1;
    if (M <= 0) return 0;
    if (K <= 0 || N <= 0) {
        if (db) {
            memset(db, 0, (size_t)M * sizeof(float));
            for (int64_t k = 0; k < K; k++)
                for (int64_t m = 0; m < M; m++) db[m] += dy[k * ldy + m];
        }
        if (N <= 0) return 0;
        for (int64_t m = 0; m < M; m++) memset(dw + m * ldw, 0, (size_t)N * sizeof(float));
        return 0;
    }
    /* At least 64 tokens per thread: below that the partial sums cost more than they save. */
    int nth = K / 64 < nthreads ? (int)(K / 64) : nthreads;
    if (nth < 1) nth = 1;
    const int64_t part_n = M * N + M;   /* a partial dW and db per thread past the first */
    const size_t scratch_bytes = ((size_t)(nth - 1) * part_n * sizeof(float) + 63) / 64 * 64;
    float *scratch = nth > 1 ? aligned_alloc(64, scratch_bytes) : NULL;
    if (nth > 1 && !scratch) nth = 1;
    int failed = 0;
#pragma omp parallel num_threads(nth) reduction(| : failed)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t k_lo = K * t / nt, k_hi = K * (t + 1) / nt;   /* this thread's tokens */
        float *c = t == 0 ? dw : scratch + (t - 1) * part_n;
        const int64_t ldc = t == 0 ? ldw : N;
        float *bs = !db ? NULL : t == 0 ? db : c + M * N;
        float *bp = aligned_alloc(64, (size_t)KC * NR * NCT * sizeof(float));
        float *ap = aligned_alloc(64, (size_t)KC * MR * sizeof(float));
        float tile[MR * NR] __attribute__((aligned(64)));
        if (!bp || !ap) {
            failed = 1;
        } else {
            for (int64_t jc = 0; jc < ntiles; jc += NCT) {
                const int64_t jc_hi = min64(ntiles, jc + NCT);
                const int64_t pn0 = jc * NR, pn1 = min64(N, jc_hi * NR);
                for (int64_t k0 = k_lo; k0 < k_hi; k0 += KC) {
                    const int64_t kc = min64(KC, k_hi - k0);
                    const int first = k0 == k_lo;
                    /* X's columns of this panel, a [kc][32] sliver per 32 columns (zeros past N),
                     * token by token (sequential reads). */
                    for (int64_t k = 0; k < kc; k++) {
                        const float *xr = x + (k0 + k) * ldx;
                        for (int64_t j = jc; j < jc_hi; j++) {
                            float *dst = bp + (j - jc) * KC * NR + k * NR;
                            const int64_t n0 = j * NR, nn = min64(NR, N - n0);
                            memcpy(dst, xr + n0, (size_t)nn * sizeof(float));
                            if (nn < NR) memset(dst + nn, 0, (size_t)(NR - nn) * sizeof(float));
                        }
                    }
                    /* The next token block, prefetched while this one computes. */
                    const int64_t k1 = k0 + KC, kn = k1 < k_hi ? min64(KC, k_hi - k1) : 0;
                    for (int64_t i = 0; i < mblocks; i++) {
                        const int64_t m0 = i * MR, mm = min64(MR, M - m0);
                        {   /* dY's lines PFD row blocks on (the next token block's first ones near
                             * the end), and this row block's share of the next X panel. */
                            const int64_t ip = i + PFD;
                            const int64_t kbp = ip < mblocks ? k0 : k1, kk = ip < mblocks ? kc : kn;
                            const int64_t mp = (ip < mblocks ? ip : ip - mblocks) * MR;
                            if (mp < M && ((mp * 4) & 63) == 0)
                                for (int64_t k = 0; k < kk; k++) __builtin_prefetch(dy + (kbp + k) * ldy + mp, 0, 2);
                            if (kn) {
                                const int64_t r0 = kn * i / mblocks, r1 = kn * (i + 1) / mblocks;
                                for (int64_t k = r0; k < r1; k++) {
                                    const char *xr = (const char *)(x + (k1 + k) * ldx + pn0);
                                    for (int64_t o = 0; o < (pn1 - pn0) * 4; o += 64) __builtin_prefetch(xr + o, 0, 2);
                                }
                            }
                        }
                        /* dY's 8 rows of dW, [kc][8] (zeros past M), and their bias-gradient sums. */
                        for (int64_t k = 0; k < kc; k++) {
                            const float *src = dy + (k0 + k) * ldy + m0;
                            float *dst = ap + k * MR;
                            for (int64_t r = 0; r < mm; r++) dst[r] = src[r];
                            for (int64_t r = mm; r < MR; r++) dst[r] = 0.0f;
                        }
                        if (bs && jc == 0) {
                            float part[MR] = {0};
                            for (int64_t k = 0; k < kc; k++)
#pragma GCC unroll 8
                                for (int r = 0; r < MR; r++) part[r] += ap[k * MR + r];
                            for (int64_t r = 0; r < mm; r++) bs[m0 + r] = first ? part[r] : bs[m0 + r] + part[r];
                        }
                        for (int64_t j = jc; j < jc_hi; j++) {
                            const int64_t n0 = j * NR, nn = min64(NR, N - n0);
                            float *cc = c + m0 * ldc + n0;
                            if (mm == MR && nn == NR) {
                                tile_8x32(ap, bp + (j - jc) * KC * NR, kc, cc, ldc, first);
                            } else {   /* a partial tile: computed whole, the valid part kept */
                                tile_8x32(ap, bp + (j - jc) * KC * NR, kc, tile, NR, 1);
                                for (int64_t r = 0; r < mm; r++)
                                    for (int64_t n = 0; n < nn; n++)
                                        cc[r * ldc + n] = first ? tile[r * NR + n] : cc[r * ldc + n] + tile[r * NR + n];
                            }
                        }
                    }
                }
            }
        }
        free(bp);
        free(ap);
#pragma omp barrier
        /* The other threads' partial sums into dw (and db), rows split among the threads. */
        for (int64_t m = M * t / nt; m < M * (t + 1) / nt; m++) {
            float *o = dw + m * ldw;
            for (int s = 1; s < nt; s++) {
                const float *p = scratch + (s - 1) * part_n + m * N;
#pragma omp simd
                for (int64_t n = 0; n < N; n++) o[n] += p[n];
                if (db) db[m] += scratch[(s - 1) * part_n + M * N + m];
            }
        }
    }
    free(scratch);
    return failed ? -1 : 0;
}
