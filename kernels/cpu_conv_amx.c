/* Direct convolutions on AMX int8 tiles, compiled into the same library as cpu_linear.c: of
float activations at 16-bit fixed point (tdsl_int16_conv, the "int16" way of a frozen
convolution: kernels/cpu_int16_conv.py), and of uint8 codes (qconv_amx, for cpu_qconv.c's int8
convolution of static int8 activations).

   Why: a ternary or int8-weight convolution with float activations otherwise runs oneDNN's fp32
   convolution on its dequantized weight. With 16 channels, as in a small ResNet's first stage,
   that reaches about 50 G multiply-adds a second on the development machine (ad hoc, batch 64),
   a few percent of what AMX's int8 tiles do; the layer is then bound by its arithmetic, not by
   its 4 MiB of activations. im2col with the matmul kernel would write each input nine times.

   Arithmetic of the int16 way (its reference twin is cpu_int16_conv.int16_conv_reference): per
   image n, m = max|x|, xi = clamp(rint(x * 32767 / m), -32767, 32767) (0 where m < 2^-100), so
   a value is off by at most t / 2 with t = m / 32767: the 16-bit step of the linear kernel's
   float-activation mode, set here by the image's max rather than each token's. xi = 256 hi + lo
   with hi = xi >> 8 (s8) and lo = xi & 255 (u8); the int32 sums of hi x w (tdpbssd) and lo x w
   (tdpbusd) recombine exactly (finish_int16), so the integer result is exact for K <= 65536
   (255 * 128 * 65536 < 2^31). Then y = float(sum) * (t * w_scale[o]) + bias in fp32, max(0, y)
   with relu. An image holding NaN or +-Inf makes the call return 1 with nothing written: the
   caller answers with the fp32 convolution, which propagates it as fp32 does. uint8 codes sum
   in one plane (tdpbusd) and cpu_qconv.c's epilogue (qconv_finish) finishes them.

   Layout. The input is a padded channels-last plane [b, hp, wp, c4] (c4: channels to a
   multiple of 4; the int16 way writes two, hi and lo). A tile row is one output pixel: 64
   consecutive bytes of a kernel row of its receptive field, loaded straight from the plane (the
   row stride is the conv's horizontal stride times c4); with dilation 1 the kw taps of a kernel
   row are one run of kw * c4 bytes, else each tap is its own run. Runs are cut into chunks of
   64 bytes; bytes past a run (the next pixel's channels) meet zero weights. The weight, packed
   by cpu_int16_conv.pack_amx, is for each block of 16 output channels and chunk one 1 KiB
   right-hand tile: row r holds the codes of chunk bytes 4r..4r+3 for the 16 channels side by
   side. Pixels past a row's end and chunk bytes past the plane read into its tail (amx_tail in
   cpu_common.h); their sums are never stored. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"
#ifdef TDSL_AMX
#include <immintrin.h>
#endif

#define XI_MAX 32767.0f

#ifdef TDSL_AMX
/* The byte offsets of the chunks of one output pixel's receptive field, from its top-left tap,
   in the order cpu_int16_conv.pack_amx packs them; returns their count (off may be NULL). */
static int64_t conv_chunks(const conv_dims *d, int64_t *off) {
    int64_t n = 0;
    const int64_t runs = d->dw == 1 ? 1 : d->kw, len = d->dw == 1 ? d->kw * d->c4 : d->c4;
    for (int64_t ky = 0; ky < d->kh; ky++)
        for (int64_t r = 0; r < runs; r++)
            for (int64_t j = 0; j < len; j += 64) {
                if (off)
                    off[n] = (ky * d->dh * d->wp + r * d->dw) * d->c4 + j;
                n++;
            }
    return n;
}

/* A convolution's sizes and its chunks' offsets (off: malloc'd, NULL without memory) */
typedef struct {
    conv_dims d;
    int64_t chunks, pstep, *off;
} conv_plan;

static conv_plan plan_of(const int64_t *geo) {
    conv_plan p = {conv_dims_of(geo), 0, 0, NULL};
    p.chunks = conv_chunks(&p.d, NULL);
    p.pstep = p.d.sw * p.d.c4;
    p.off = (int64_t *)malloc((size_t)p.chunks * sizeof(int64_t));
    if (p.off)
        conv_chunks(&p.d, p.off);
    return p;
}

/* How a row's sums become y: the int16 way (lo: the low halves' plane; t: each image's step;
   scale: w_scale; narrow: see finish_int16), or uint8 codes (lo NULL; scale: x_scale w_scale;
   wsum, xzp, out_*: qconv_finish's) */
typedef struct {
    const uint8_t *lo;
    const float *t, *scale, *bias;
    const int32_t *wsum;
    int xzp, relu, narrow, out_u8, out_zp;
    float out_scale;
} conv_out;

/* max |x| over one image (strides xs: n, c, h, w in floats), or +Inf where it holds a NaN */
static float image_max(const float *x, const int64_t *xs, int64_t h, int64_t w, int64_t c) {
    const int cl = xs[1] == 1 && xs[3] == c; /* channels-last: an image row is one run */
    const int64_t runs = cl ? h : xs[3] == 1 ? h * c : 0, len = cl ? w * c : w;
    uint32_t top = 0;
    for (int64_t r = 0; r < runs; r++) { /* rows, or (channel, row) runs of w floats */
        const uint32_t u = abs_max_bits(x + (cl ? r * xs[2] : r / h * xs[1] + r % h * xs[2]),
                                        len);
        top = u > top ? u : top;
    }
    if (!runs)
        for (int64_t yy = 0; yy < h; yy++)
            for (int64_t p = 0; p < w; p++)
                for (int64_t ch = 0; ch < c; ch++) {
                    const uint32_t u = abs_max_bits(x + yy * xs[2] + p * xs[3] + ch * xs[1], 1);
                    top = u > top ? u : top;
                }
    float m;
    memcpy(&m, &top, 4);
    return top >= 0x7f800000u ? INFINITY : m;
}

/* 16 floats to 16 codes clamp(rint(x r)): hi = xi >> 8, lo = xi & 255 */
static inline void halves16(__m512 v, __m512 rv, __m128i *hi, __m128i *lo) {
    const __m512 top = _mm512_set1_ps(XI_MAX);
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(v, rv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), top)), top);
    const __m512i i = _mm512_cvtps_epi32(q);
    *hi = _mm512_cvtepi32_epi8(_mm512_srai_epi32(i, 8));
    *lo = _mm512_cvtepi32_epi8(_mm512_and_si512(i, _mm512_set1_epi32(255)));
}

static inline int32_t code(float v, float r) {
    float q = nearbyintf(v * r);
    return (int32_t)(q < -XI_MAX ? -XI_MAX : q > XI_MAX ? XI_MAX : q);
}

/* One image into its planes (hi, lo: its first inner pixel; rows wp * c4 bytes apart), with
   zeros in the channels past c; r = 0 writes zeros. The border stays as the caller zeroed it. */
static void image_halves(const float *x, const int64_t *xs, int64_t h, int64_t w, int64_t c,
                         int64_t c4, int64_t wp, float r, int8_t *hi, uint8_t *lo) {
    const __m512 rv = _mm512_set1_ps(r);
    for (int64_t yy = 0; yy < h; yy++) {
        int8_t *hr = hi + yy * wp * c4;
        uint8_t *lr = lo + yy * wp * c4;
        const float *xr = x + yy * xs[2];
        if (r == 0.0f || c4 != c) {
            memset(hr, 0, (size_t)(w * c4));
            memset(lr, 0, (size_t)(w * c4));
            if (r == 0.0f)
                continue;
        }
        if (xs[1] == 1 && xs[3] == c && c4 == c) { /* channels-last: one run */
            int64_t i = 0;
            for (; i + 16 <= w * c; i += 16)
                halves16(_mm512_loadu_ps(xr + i), rv, (__m128i *)(hr + i), (__m128i *)(lr + i));
            for (; i < w * c; i++) {
                const int32_t q = code(xr[i], r);
                hr[i] = (int8_t)(q >> 8);
                lr[i] = (uint8_t)(q & 255);
            }
        } else if (xs[3] == 1) { /* channel planes (NCHW): 16 pixels of a channel at a time */
            for (int64_t ch = 0; ch < c; ch++) {
                const float *xc = xr + ch * xs[1];
                int64_t p = 0;
                for (; p + 16 <= w; p += 16) {
                    int8_t hb[16];
                    uint8_t lb[16];
                    halves16(_mm512_loadu_ps(xc + p), rv, (__m128i *)hb, (__m128i *)lb);
                    for (int j = 0; j < 16; j++) {
                        hr[(p + j) * c4 + ch] = hb[j];
                        lr[(p + j) * c4 + ch] = lb[j];
                    }
                }
                for (; p < w; p++) {
                    const int32_t q = code(xc[p], r);
                    hr[p * c4 + ch] = (int8_t)(q >> 8);
                    lr[p * c4 + ch] = (uint8_t)(q & 255);
                }
            }
        } else {
            for (int64_t p = 0; p < w; p++)
                for (int64_t ch = 0; ch < c; ch++) {
                    const int32_t q = code(xr[p * xs[3] + ch * xs[1]], r);
                    hr[p * c4 + ch] = (int8_t)(q >> 8);
                    lr[p * c4 + ch] = (uint8_t)(q & 255);
                }
        }
    }
}

/* y for up to 16 pixels of one block of 16 channels from the hi and lo sums. narrow: the
   recombined sum fits int32 (32767 max|w| K < 2^31), so it is formed there (256 hi wraps past
   2^31 only where the exact sum lies back in range) and converted once; else in int64. Both
   round the exact integer once, to nearest even. */
static void finish_int16(const int32_t *acc, int np, int lanes, int64_t pstride, __m512 mv,
                         __m512 bv, int relu, int narrow, float *y) {
    const __mmask16 mask = (__mmask16)((1u << lanes) - 1);
    for (int p = 0; p < np; p++) {
        const __m512i h = _mm512_loadu_si512((const void *)(acc + 16 * p));
        const __m512i l = _mm512_loadu_si512((const void *)(acc + 256 + 16 * p));
        __m512 f;
        if (narrow) {
            f = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), l));
        } else {
            const __m512i s0 = _mm512_add_epi64(
                _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(h)), 8),
                _mm512_cvtepi32_epi64(_mm512_castsi512_si256(l)));
            const __m512i s1 = _mm512_add_epi64(
                _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(h, 1)), 8),
                _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(l, 1)));
            f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(s0)),
                                   _mm512_cvtepi64_ps(s1), 1);
        }
        __m512 v = _mm512_add_ps(_mm512_mul_ps(f, mv), bv);
        if (relu)
            v = _mm512_max_ps(v, _mm512_setzero_ps());
        _mm512_mask_storeu_ps(y + p * pstride, mask, v);
    }
}

/* One output row for one or two blocks of 16 channels (w1 NULL: one): 16 pixels a tile. The
   A tiles (2: the codes or hi halves, 3: lo halves) serve both blocks; block 0 sums in tile 0
   (and 1: lo) with its weight in 4, block 1 in 5 (and 6) with its weight in 7. y: the row's
   first pixel; mv: the int16 way's t * w_scale of each block. */
static void conv_row(const conv_plan *p, const conv_out *o, const uint8_t *a, const uint8_t *lo,
                     const int8_t *w0, const int8_t *w1, const __m512 *mv, int64_t oc16,
                     int lanes1, void *y) {
    int32_t acc[512] __attribute__((aligned(64)));
    const int64_t wo = p->d.wo, oc = p->d.oc, pstep = p->pstep;
    for (int64_t ox0 = 0; ox0 < wo; ox0 += 16) {
        const int np = wo - ox0 < 16 ? (int)(wo - ox0) : 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(5);
        _tile_zero(6);
        for (int64_t j = 0; j < p->chunks; j++) {
            const int64_t at = ox0 * pstep + p->off[j];
            _tile_loadd(2, a + at, pstep);
            _tile_loadd(4, w0 + j * 1024, 64);
            if (w1)
                _tile_loadd(7, w1 + j * 1024, 64);
            if (lo) {
                _tile_loadd(3, lo + at, pstep);
                _tile_dpbssd(0, 2, 4);
                _tile_dpbusd(1, 3, 4);
                if (w1) {
                    _tile_dpbssd(5, 2, 7);
                    _tile_dpbusd(6, 3, 7);
                }
            } else {
                _tile_dpbusd(0, 2, 4);
                if (w1)
                    _tile_dpbusd(5, 2, 7);
            }
        }
        for (int k = 0; k <= (w1 != NULL); k++) {
            if (k) {
                _tile_stored(5, acc, 64);
                _tile_stored(6, acc + 256, 64);
            } else {
                _tile_stored(0, acc, 64);
                _tile_stored(1, acc + 256, 64);
            }
            const int64_t c0 = oc16 + 16 * k, at = ox0 * oc + c0;
            const int lanes = w1 && !k ? 16 : lanes1;
            if (lo)
                finish_int16(acc, np, lanes, oc, mv[k], _mm512_loadu_ps(o->bias + c0), o->relu,
                             o->narrow, (float *)y + at);
            else
                qconv_finish(acc, np, lanes, oc, o->xzp, o->wsum + c0, o->scale + c0,
                             o->bias + c0, o->relu, o->out_u8, o->out_scale, o->out_zp, y, at);
        }
    }
}

/* The whole convolution from the plane a (and o->lo) into y [b, ho, wo, oc]: threads share
   (image, output row, pair of channel blocks) items; each loads the tile shapes for itself */
static void conv_items(const conv_plan *p, const conv_out *o, const uint8_t *a,
                       const int8_t *wt, void *y, int threads) {
    const conv_dims *d = &p->d;
    const int64_t blocks = (d->oc + 15) / 16, pairs = (blocks + 1) / 2, tile = p->chunks * 1024;
    const size_t esize = o->out_u8 ? 1 : 4;
#pragma omp parallel num_threads(threads) if (d->b * d->ho * d->wo * p->chunks * blocks >= 4096)
    {
        amx_begin();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < d->b * d->ho * pairs; item++) {
            const int64_t ob = item % pairs * 2, row = item / pairs, n = row / d->ho;
            const int64_t at = (n * d->hp + row % d->ho * d->sh) * d->wp * d->c4;
            const int two = ob + 1 < blocks;
            const int64_t last = d->oc - 16 * (ob + two);
            __m512 mv[2];
            for (int k = 0; o->lo && k <= two; k++)
                mv[k] = _mm512_mul_ps(_mm512_set1_ps(o->t[n]),
                                      _mm512_loadu_ps(o->scale + 16 * (ob + k)));
            conv_row(p, o, a + at, o->lo ? o->lo + at : NULL, wt + ob * tile,
                     two ? wt + (ob + 1) * tile : NULL, mv, 16 * ob, last < 16 ? (int)last : 16,
                     (uint8_t *)y + (size_t)(row * d->wo * d->oc) * esize);
        }
        amx_end();
    }
}
#endif

/* cpu_qconv.c's convolution of uint8 codes on AMX tiles: xp holds the zero-point-padded codes
   [b, hp, wp, c4] and amx_tail bytes past them; wt is pack_amx's; the rest as tdsl_qconv's.
   Returns -2 where AMX tiles cannot run, -1 without memory, else 0. */
int qconv_amx(const uint8_t *xp, const int64_t *geo, const int8_t *wt, int xzp,
              const int32_t *wsum, const float *mult, const float *bias, int relu, int out_u8,
              float out_scale, int out_zp, void *y, int threads) {
#ifdef TDSL_AMX
    if (!amx_permitted())
        return -2;
    const conv_plan p = plan_of(geo);
    if (!p.off)
        return -1;
    const conv_out o = {NULL, NULL, mult, bias, wsum, xzp, relu, 0, out_u8, out_zp, out_scale};
    conv_items(&p, &o, xp, wt, y, threads);
    free(p.off);
    return 0;
#else
    (void)xp, (void)geo, (void)wt, (void)xzp, (void)wsum, (void)mult, (void)bias, (void)relu;
    (void)out_u8, (void)out_scale, (void)out_zp, (void)y, (void)threads;
    return -2;
#endif
}

/* geo: b, h, w, c, oc, kh, kw, sh, sw, ph, pw, dh, dw, then x's strides n, c, h, w in floats,
   then max |w| of the codes. wt: pack_amx's tiles; w_scale and bias hold 16 * ceil(oc / 16)
   floats; y is [b, ho, wo, oc] fp32. Returns -2 where AMX tiles cannot run (not built, or Linux
   refused), -1 when the planes cannot be allocated, 1 when x holds a NaN or an infinity (y
   untouched), else 0. */
int tdsl_int16_conv(const float *x, const int64_t *geo, const int8_t *wt, const float *w_scale,
                    const float *bias, int relu, float *y, int threads) {
#ifdef TDSL_AMX
    if (!amx_permitted())
        return -2;
    const conv_plan p = plan_of(geo);
    const conv_dims *d = &p.d;
    const int64_t *xs = geo + 13, wmax = geo[17];
    const int64_t b = d->b, h = d->h, w = d->w, c = d->c, c4 = d->c4, ph = d->ph, pw = d->pw;
    const int64_t wp = d->wp, image = d->hp * wp * c4, plane = b * image;
    const int64_t span = plane + amx_tail(d);
    int8_t *hi = (int8_t *)malloc((size_t)(2 * span));
    float *t = (float *)malloc((size_t)b * sizeof(float));
    if (!hi || !t || !p.off) {
        free(hi);
        free(t);
        free(p.off);
        return -1;
    }
    uint8_t *lo = (uint8_t *)(hi + span);
    memset(hi + plane, 0, (size_t)(span - plane));
    memset(lo + plane, 0, (size_t)(span - plane));
    int bad = 0;
    /* an image at a time, so its second read (quantizing) finds it in cache */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) \
    if (b > 1 && b * h * w * c >= 65536)
    for (int64_t n = 0; n < b; n++) {
        const float *xn = x + n * xs[0];
        const float m = image_max(xn, xs, h, w, c);
        if (!(m < INFINITY)) {
            bad = 1;
            continue;
        }
        const int tiny = m < 0x1p-100f; /* counts as zero: 32767 / m would overflow */
        t[n] = tiny ? 0.0f : m / XI_MAX;
        for (int half = 0; half < 2; half++) { /* the border: rows above and below, sides */
            uint8_t *pl = (uint8_t *)(half ? (int8_t *)lo : hi) + n * image;
            memset(pl, 0, (size_t)(ph * wp * c4));
            memset(pl + (ph + h) * wp * c4, 0, (size_t)(ph * wp * c4));
            for (int64_t yy = ph; yy < ph + h && pw; yy++) {
                memset(pl + yy * wp * c4, 0, (size_t)(pw * c4));
                memset(pl + (yy * wp + pw + w) * c4, 0, (size_t)(pw * c4));
            }
        }
        const int64_t at = n * image + (ph * wp + pw) * c4;
        image_halves(xn, xs, h, w, c, c4, wp, tiny ? 0.0f : XI_MAX / m, hi + at, lo + at);
    }
    if (!bad) {
        const conv_out o = {lo, t, w_scale, bias, NULL, 0, relu,
                            (double)XI_MAX * (double)wmax * (double)(d->kh * d->kw * c) <
                                2147483648.0,
                            0, 0, 0.0f};
        conv_items(&p, &o, (const uint8_t *)hi, wt, y, threads);
    }
    free(hi);
    free(t);
    free(p.off);
    return bad;
#else
    (void)x, (void)geo, (void)wt, (void)w_scale, (void)bias, (void)relu, (void)y, (void)threads;
    return -2;
#endif
}
