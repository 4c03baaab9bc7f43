/* e^x for x <= 0, for the compiled CPU kernels (relation_row.h). toolkit/cpu/compiled.py's build
 * puts this directory on the include path and hashes this header into every kernel's cache key. */
#ifndef TOOLKIT_EXP_NONPOS_H
#define TOOLKIT_EXP_NONPOS_H

#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (the logits are centred on their row maximum). Cody-Waite reduction
 * x = n ln2 + r, |r| <= ln2/2, and a degree-7 Taylor polynomial for e^r (truncation error
 * < 6e-9 relative, below fp32 rounding). Exactly 0 below -87, where e^x would be subnormal:
 * padded keys (-FLT_MAX) and negligible probabilities. */
static inline float exp_nonpos(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = __builtin_roundf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693145751953125f; /* ln2 high part: n * hi is exact */
    r = r - n * 1.42860682030941723e-06f;   /* ln2 low part */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

#endif
