/* Dropout keep masks on CPUs (toolkit/kernels/cpu_dropout.py builds this file with the system C
 * compiler and loads it with ctypes).
 *
 * torch's CPU random_() runs one MT19937 stream on one thread; a dropout mask from it cost ~2 ms
 * per [32, 128, 384] site here. This is a counter-based generator instead: word w of a mask is
 * the splitmix64 output mix64(seed + (w + 1) * golden), as the splitmix64 sequence started at
 * `seed` would give it, so any thread can make any word and the loop vectorises. Each 64-bit
 * word gives four 15-bit uniforms (bits 0-14, 16-30, 32-46, 48-62); an element is kept when its
 * uniform is >= threshold, the keep rule of toolkit/models/dropout.py. The seed is drawn from
 * torch's generator by the caller, so torch.manual_seed and saved RNG states reproduce masks.
 *
 * drop_masked_scale applies a mask, forward and backward: x * scale where kept, x * 0 where
 * dropped (so a NaN stays NaN, as in torch's x * mask * scale), in one pass on every thread.
 * torch's native_dropout_backward converts the bool mask to floats, multiplies, then scales:
 * ~1.1 ms per [32, 128, 384] site here, ten per distillation step at seq 128 batch 32.
 */
#include <stdint.h>

int drop_abi_version(void) { return 2; }

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* For the self-check: the first n words of the sequence. */
void drop_words(uint64_t *out, int64_t n, uint64_t seed) {
    for (int64_t w = 0; w < n; w++) out[w] = mix64(seed + (uint64_t)(w + 1) * 0x9e3779b97f4a7c15ULL);
}

/* keep[i] = uniform_i >= threshold for i < n (bytes 0/1, a torch bool tensor's storage). */
void drop_keep_mask(uint8_t *keep, int64_t n, uint64_t seed, int32_t threshold, int nthreads) {
    const int64_t full = n / 4;
    const uint32_t k = (uint32_t)threshold;
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t w = 0; w < full; w++) {
        const uint64_t z = mix64(seed + (uint64_t)(w + 1) * 0x9e3779b97f4a7c15ULL);
        uint8_t *dst = keep + 4 * w;
        dst[0] = (uint32_t)(z & 0x7fff) >= k;
        dst[1] = (uint32_t)((z >> 16) & 0x7fff) >= k;
        dst[2] = (uint32_t)((z >> 32) & 0x7fff) >= k;
        dst[3] = (uint32_t)((z >> 48) & 0x7fff) >= k;
    }
    if (n % 4) {
        const uint64_t z = mix64(seed + (uint64_t)(full + 1) * 0x9e3779b97f4a7c15ULL);
        for (int64_t t = 0; t < n % 4; t++) keep[4 * full + t] = (uint32_t)((z >> (16 * t)) & 0x7fff) >= k;
    }
}

/* out[i] = x[i] * (keep[i] ? scale : 0) for i < n (out may be x). */
void drop_masked_scale(const float *x, const uint8_t *keep, float *out, int64_t n, float scale, int nthreads) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * (keep[i] ? scale : 0.0f);
}
