/* Int8 convolution of uint8 activation codes (static int8 activations: kernels/cpu_conv.py),
   compiled into the same library as cpu_linear.c.

   Why native code: at batch 1 the convolutions of a small CNN are a few million multiply-adds,
   which VNNI does in about 10 us, but torch's wrapper around oneDNN's int8 convolution costs
   about 50 us a call on top of its 10 us primitive (measured on the development machine with
   ONEDNN_VERBOSE). oneDNN stays the way for large batches (its AMX kernels); which of the two
   runs is measured per shape (runtime/tuning.py).

   Layouts. x: codes [b, h, w, c] (channels-last), zero point xzp. Weights, packed by
   cpu_conv.pack_native: for output block ob of 16 channels, tap t = ky * kw + kx and group g of
   4 input channels, 64 bytes wt[ob][t][g][o][j] = weight[16 ob + o][4 g + j][ky][kx] (int8
   codes, zero past the last channel). y: [b, ho, wo, oc] channels-last, fp32, or uint8 codes
   (out_u8).

   Arithmetic: the input is copied into a buffer padded with the zero point (channels to a
   multiple of 4 too), so every tap is in range and sum (q - zp) w = sum q w - zp * wsum[o],
   exactly in int32 for K = kh * kw * c <= 65536 (255 * 127 * 65536 < 2^31; cpu_conv.py refuses
   more). Then y = float(acc) * mult[o] + bias[o], mult = x_scale * w_scale[o]; max(0, y) with
   relu; codes clamp(nearbyint(y / out_scale) + out_zp, 0, 255), rounding half to even after an
   IEEE division as the static quantizer does (tdsl_quantize_u8). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QCONV_VNNI 1
#endif

#ifndef QCONV_THREADED
#define QCONV_THREADED (1 << 18) /* multiply-adds from which the threads share the work */
#endif
#define PX 8 /* output pixels of a row per tile: 8 accumulators, one weight load feeds 8 */

#ifndef QCONV_VNNI /* the portable loop's requantization (the vector one inlines its own) */
static float requant(float v, float out_scale, int out_zp) {
    float r = nearbyintf(v / out_scale) + (float)out_zp;
    return r < 0.0f ? 0.0f : r > 255.0f ? 255.0f : r;
}
#endif

#if defined(__AVX512BW__) /* the VNNI loop's and the AMX tiles' (cpu_conv_amx.c) */
/* The output of np pixels (sums 16 apart) for one block of 16 channels (lanes of them) from
   the int32 sums: float(acc - zp wsum) * mult + bias, max(0, .) with relu, codes at out_scale
   with out_u8; pixel p's channels at y + at + p * oc (elements). Also cpu_conv_amx.c's. */
void qconv_finish(const int32_t *sums, int np, int lanes, int64_t oc, int xzp,
                  const int32_t *wsum, const float *mult, const float *bias, int relu,
                  int out_u8, float out_scale, int out_zp, void *y, int64_t at) {
    const __mmask16 mask = (__mmask16)((1u << lanes) - 1);
    const __m512i zs = _mm512_mullo_epi32(_mm512_set1_epi32(xzp),
                                          _mm512_loadu_si512((const void *)wsum));
    const __m512 mv = _mm512_loadu_ps(mult), bv = _mm512_loadu_ps(bias);
    for (int p = 0; p < np; p++, at += oc) {
        const __m512i acc = _mm512_loadu_si512((const void *)(sums + 16 * p));
        __m512 v = _mm512_add_ps(
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zs)), mv), bv);
        if (relu)
            v = _mm512_max_ps(v, _mm512_setzero_ps());
        if (out_u8) {
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(out_scale)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_add_ps(r, _mm512_set1_ps((float)out_zp));
            r = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
            _mm_mask_storeu_epi8((uint8_t *)y + at, mask,
                                 _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(r)));
        } else {
            _mm512_mask_storeu_ps((float *)y + at, mask, v);
        }
    }
}
#endif

/* One row of output pixels for one block of 16 output channels. */
static void conv_row(const uint8_t *xp, int64_t wp, int64_t c4, const int8_t *wt, int64_t taps,
                     int64_t kw, int64_t sw, int64_t dh, int64_t dw, int64_t wo, int64_t oc16,
                     int64_t oc, int xzp, const int32_t *wsum, const float *mult,
                     const float *bias, int relu, int out_u8, float out_scale, int out_zp,
                     void *y) {
    const int64_t groups = c4 / 4;
    const int lanes = oc - oc16 < 16 ? (int)(oc - oc16) : 16;
    for (int64_t ox0 = 0; ox0 < wo; ox0 += PX) {
        const int np = wo - ox0 < PX ? (int)(wo - ox0) : PX;
#ifdef QCONV_VNNI
        __m512i acc[PX];
        for (int p = 0; p < PX; p++) acc[p] = _mm512_setzero_si512();
        for (int64_t t = 0; t < taps; t++) {
            const uint8_t *row = xp + (t / kw) * dh * wp * c4 + (t % kw) * dw * c4;
            const uint8_t *px[PX];
            for (int p = 0; p < PX; p++)  /* past the row's end: repeat its last pixel */
                px[p] = row + (ox0 + (p < np ? p : np - 1)) * sw * c4;
            const int8_t *wg = wt + t * groups * 64;
            for (int64_t g = 0; g < groups; g++) {
                const __m512i wv = _mm512_loadu_si512((const void *)(wg + g * 64));
                for (int p = 0; p < PX; p++) {
                    int32_t four;
                    memcpy(&four, px[p] + 4 * g, 4);
                    acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_set1_epi32(four), wv);
                }
            }
        }
        int32_t sums[PX * 16] __attribute__((aligned(64)));
        for (int p = 0; p < np; p++)
            _mm512_store_si512((void *)(sums + 16 * p), acc[p]);
        qconv_finish(sums, np, lanes, oc, xzp, wsum + oc16, mult + oc16, bias + oc16, relu,
                     out_u8, out_scale, out_zp, y, ox0 * oc + oc16);
#else
        for (int p = 0; p < np; p++) {
            for (int o = 0; o < lanes; o++) {
                int32_t acc = 0;
                for (int64_t t = 0; t < taps; t++) {
                    const uint8_t *px = xp + (t / kw) * dh * wp * c4 + (t % kw) * dw * c4 +
                                        (ox0 + p) * sw * c4;
                    const int8_t *wg = wt + t * groups * 64 + o * 4;
                    for (int64_t g = 0; g < groups; g++)
                        for (int j = 0; j < 4; j++)
                            acc += (int32_t)px[4 * g + j] * (int32_t)wg[g * 64 + j];
                }
                float v = (float)(acc - xzp * wsum[oc16 + o]) * mult[oc16 + o] + bias[oc16 + o];
                if (relu && !(v > 0.0f))
                    v = 0.0f; /* as _mm512_max_ps(v, 0) */
                const int64_t at = (ox0 + p) * oc + oc16 + o;
                if (out_u8)
                    ((uint8_t *)y)[at] = (uint8_t)requant(v, out_scale, out_zp);
                else
                    ((float *)y)[at] = v;
            }
        }
#endif
    }
}

/* Float activations x quantized into the zero-point-padded buffer as tdsl_quantize_u8 does
   (quantize_u8_span), read through strides xs (n, c, h, w, in floats): one pass instead of a
   quantizing pass and a copy. Returns 1 when x holds a NaN. */
static int quantize_into(uint8_t *pad, const float *x, const int64_t *xs, int64_t b, int64_t h,
                         int64_t w, int64_t c, int64_t c4, int64_t hp, int64_t wp, int64_t ph,
                         int64_t pw, float scale, int zp, int lo, int hi, int threads) {
    int bad = 0;
    const int rows_whole = xs[1] == 1 && xs[3] == c && c4 == c; /* an image row is one run */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) \
    if (b * h * w * c >= 262144)
    for (int64_t r = 0; r < b * h; r++) {
        const int64_t n = r / h, yy = r % h;
        uint8_t *dst = pad + ((n * hp + yy + ph) * wp + pw) * c4;
        const float *src = x + n * xs[0] + yy * xs[2];
        if (rows_whole) {
            bad |= quantize_u8_span(src, w * c, scale, zp, lo, hi, dst);
            continue;
        }
        for (int64_t xx = 0; xx < w; xx++)
            for (int64_t ch = 0; ch < c; ch++) {
                const float v = src[xx * xs[3] + ch * xs[1]] / scale;
                float q = nearbyintf(v) + (float)zp;
                q = q < (float)lo ? (float)lo : q > (float)hi ? (float)hi : q;
                bad |= v != v;
                dst[xx * c4 + ch] = (uint8_t)(v == v ? q : 0.0f);
            }
    }
    return bad;
}

/* geo: b, h, w, c, oc, kh, kw, sh, sw, ph, pw, dh, dw, then for float input (xf != NULL, x
   unused) its strides n, c, h, w in floats and the quantizer's lo, hi; x_scale is the
   quantizer's scale. wsum, mult and bias hold 16 * ceil(oc / 16) values. y holds uint8 codes
   at out_scale (> 0, checked by the caller) and out_zp when out_u8, else fp32. wt_amx: the
   weight as cpu_int16_conv.pack_amx packs it, for AMX tiles (cpu_conv_amx.c's qconv_amx) where
   Linux grants them (wt may then be NULL); NULL: VNNI. Returns -2 when only wt_amx is given and
   AMX tiles cannot run, -1 when the padded copy cannot be allocated, 1 when the float input
   holds a NaN (nothing written to y), else 0. */
int tdsl_qconv(const uint8_t *x, const float *xf, float x_scale, const int64_t *geo, int xzp,
               const int8_t *wt, const int8_t *wt_amx, const int32_t *wsum, const float *mult,
               const float *bias, int relu, int out_u8, float out_scale, int out_zp, void *y,
               int threads) {
    const conv_dims d = conv_dims_of(geo);
    const int64_t b = d.b, h = d.h, w = d.w, c = d.c, oc = d.oc, kh = d.kh, kw = d.kw, sh = d.sh,
                  sw = d.sw, ph = d.ph, pw = d.pw, dh = d.dh, dw = d.dw, c4 = d.c4, hp = d.hp,
                  wp = d.wp, ho = d.ho, wo = d.wo;
    const int64_t blocks = (oc + 15) / 16, taps = kh * kw;
    const size_t esize = out_u8 ? 1 : 4;
    const int64_t macs = b * ho * wo * blocks * 16 * taps * c4;
    const int amx = wt_amx && amx_permitted();
    if (!amx && !wt)
        return -2; /* only the AMX weight was packed, and AMX tiles cannot run */
    /* AMX tiles read past the last pixel and past a kernel row's run: a tail after the copy */
    const int64_t tail = amx ? amx_tail(&d) : 0;
    const uint8_t *xp = x;
    uint8_t *pad = NULL;
    if (xf || ph || pw || c4 != c || amx) {
        pad = (uint8_t *)malloc((size_t)(b * hp * wp * c4 + tail));
        if (!pad)
            return -1;
        memset(pad, xzp, (size_t)(b * hp * wp * c4 + tail));
        xp = pad;
    }
    if (xf) {
        if (quantize_into(pad, xf, geo + 13, b, h, w, c, c4, hp, wp, ph, pw, x_scale, xzp,
                          (int)geo[17], (int)geo[18], threads)) {
            free(pad);
            return 1;
        }
    } else if (pad) {
#pragma omp parallel for num_threads(threads) schedule(static) if (b * h * w * c >= 262144)
        for (int64_t r = 0; r < b * h; r++) {
            const int64_t n = r / h, yy = r % h;
            uint8_t *dst = pad + ((n * hp + yy + ph) * wp + pw) * c4;
            const uint8_t *src = x + r * w * c;
            if (c4 == c)
                memcpy(dst, src, (size_t)(w * c));
            else
                for (int64_t xx = 0; xx < w; xx++)
                    memcpy(dst + xx * c4, src + xx * c, (size_t)c);
        }
    }
    if (amx) {
        const int rc = qconv_amx(xp, geo, wt_amx, xzp, wsum, mult, bias, relu, out_u8,
                                 out_scale, out_zp, y, threads);
        free(pad);
        return rc; /* permitted, so -1 (no memory) or 0 */
    }
    /* threads share (image, output row, channel block) items; small work runs on one thread,
       since waking a sleeping one costs more than it saves */
#pragma omp parallel for num_threads(threads) schedule(static) if (macs >= QCONV_THREADED)
    for (int64_t item = 0; item < b * ho * blocks; item++) {
        const int64_t ob = item % blocks, r = item / blocks, n = r / ho, oy = r % ho;
        conv_row(xp + (n * hp + oy * sh) * wp * c4, wp, c4, wt + ob * taps * (c4 / 4) * 64, taps,
                 kw, sw, dh, dw, wo, ob * 16, oc, xzp, wsum, mult, bias, relu, out_u8, out_scale,
                 out_zp, (uint8_t *)y + (size_t)(r * wo * oc) * esize);
    }
    free(pad);
    return 0;
}
