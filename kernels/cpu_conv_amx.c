/* Direct convolution of float activations on AMX tiles, at 16-bit fixed point (the "int16" way
   of a frozen convolution: kernels/cpu_conv.py's Int16Conv), compiled into the same library as
   cpu_linear.c.

   Why: a ternary or int8-weight convolution with float activations otherwise runs oneDNN's fp32
   convolution on its dequantized weight. With 16 channels, as in a small ResNet's first stage,
   that reaches about 50 G multiply-adds a second on the development machine (ad hoc, batch 64),
   a few percent of what AMX's int8 tiles do; the layer is then bound by its arithmetic, not by
   its 4 MiB of activations. im2col with the matmul kernel would write each input nine times.

   Arithmetic (the reference twin is cpu_conv.int16_conv_reference): per image n, t = max|x| /
   32767 and xi = clamp(rint(x / t), -32767, 32767) (0 where t is 0), so a value is off by at
   most t / 2, as the linear kernel's float-activation mode (there per token). xi = 256 hi + lo
   with hi = xi >> 8 (s8) and lo = xi & 255 (u8); the int32 sums of hi x w (tdpbssd) and lo x w
   (tdpbusd) recombine exactly in int64, so the integer result is exact for K <= 65536
   (255 * 127 * 65536 < 2^31). Then y = float(sum) * m + bias with m = t * w_scale[o] in fp32,
   max(0, y) with relu. An image holding NaN or +-Inf makes the call return 1 with nothing
   written: the caller answers with the fp32 convolution, which propagates it as fp32 does.

   Layout. The halves are written into two zero-padded channels-last planes [b, hp, wp, c4]
   (c4: channels to a multiple of 4). A tile row is one output pixel: 64 consecutive bytes of a
   tap row of its receptive field, loaded straight from the plane (the row stride is the conv's
   horizontal stride times c4); with dilation 1 the kw taps of a kernel row are one run of
   kw * c4 bytes, else each tap is its own run. Runs are cut into chunks of 64 bytes; bytes past
   a run (the next pixel's channels) meet zero weights. The weight, packed by cpu_conv.pack_amx,
   is for each block of 16 output channels and chunk one 1 KiB right-hand tile: row r holds the
   codes of chunk bytes 4r..4r+3 for the 16 channels side by side. Pixels past a row's end and
   chunk bytes past the buffer read into a zeroed tail; their sums are never stored. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__linux__) /* as cpu_amx.c's AMX_BUILT, plus int64 -> fp32 */
#include <immintrin.h>
#define CONV_AMX 1
#endif

#define XI_MAX 32767.0f

#ifdef CONV_AMX
/* The byte offsets of the chunks of one output pixel's receptive field, from its top-left tap,
   in the order cpu_conv.pack_amx packs them; returns their count (off may be NULL). */
static int64_t conv_chunks(int64_t kh, int64_t kw, int64_t c4, int64_t wp, int64_t dh,
                           int64_t dw, int64_t *off) {
    int64_t n = 0;
    const int64_t runs = dw == 1 ? 1 : kw, len = dw == 1 ? kw * c4 : c4;
    for (int64_t ky = 0; ky < kh; ky++)
        for (int64_t r = 0; r < runs; r++)
            for (int64_t j = 0; j < len; j += 64) {
                if (off)
                    off[n] = (ky * dh * wp + r * dw) * c4 + j;
                n++;
            }
    return n;
}

int amx_permitted(void);
void amx_begin(void);
void amx_end(void);

/* max |x| over one image (strides xs: n, c, h, w in floats), or +Inf where it holds a NaN */
static float image_max(const float *x, const int64_t *xs, int64_t h, int64_t w, int64_t c) {
    const int cl = xs[1] == 1 && xs[3] == c; /* channels-last: an image row is one run */
    const int64_t runs = cl ? h : xs[3] == 1 ? h * c : 0, len = cl ? w * c : w;
    __m512 mv = _mm512_setzero_ps();
    __mmask16 nan = 0; /* max_ps drops a NaN, so they are looked for apart */
    float m = 0.0f;
    for (int64_t r = 0; r < runs; r++) { /* rows, or (channel, row) runs of w floats */
        const float *p = x + (cl ? r * xs[2] : r / h * xs[1] + r % h * xs[2]);
        int64_t i = 0;
        for (; i + 16 <= len; i += 16) {
            const __m512 v = _mm512_loadu_ps(p + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            mv = _mm512_max_ps(mv, _mm512_abs_ps(v));
        }
        for (; i < len; i++) {
            nan |= p[i] != p[i];
            m = fabsf(p[i]) > m ? fabsf(p[i]) : m;
        }
    }
    if (!runs)
        for (int64_t yy = 0; yy < h; yy++)
            for (int64_t p = 0; p < w; p++)
                for (int64_t ch = 0; ch < c; ch++) {
                    const float v = x[yy * xs[2] + p * xs[3] + ch * xs[1]];
                    nan |= v != v;
                    m = fabsf(v) > m ? fabsf(v) : m;
                }
    m = _mm512_reduce_max_ps(mv) > m ? _mm512_reduce_max_ps(mv) : m;
    return nan ? INFINITY : m;
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
static void finish(const int32_t *acc, int np, int lanes, int64_t pstride, __m512 mv,
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

typedef struct {
    const int64_t *off;
    int64_t chunks, pstep, wo, oc;
    int relu, narrow;
} conv_geo;

/* One output row for one or two blocks of 16 channels (w1 NULL: one): 16 pixels a tile. The
   A tiles (2: hi, 3: lo) serve both blocks; block 0 sums in tiles 0 (hi) and 1 (lo) with its
   weight in 4, block 1 in 5 and 6 with its weight in 7. */
static void conv_row(const conv_geo *g, const int8_t *hi, const uint8_t *lo, const int8_t *w0,
                     const int8_t *w1, const __m512 *mv, const __m512 *bv, int lanes1,
                     float *y) {
    int32_t acc[512] __attribute__((aligned(64)));
    for (int64_t ox0 = 0; ox0 < g->wo; ox0 += 16) {
        const int np = g->wo - ox0 < 16 ? (int)(g->wo - ox0) : 16;
        _tile_zero(0);
        _tile_zero(1);
        if (w1) {
            _tile_zero(5);
            _tile_zero(6);
        }
        for (int64_t j = 0; j < g->chunks; j++) {
            const int64_t at = ox0 * g->pstep + g->off[j];
            _tile_loadd(2, hi + at, g->pstep);
            _tile_loadd(3, lo + at, g->pstep);
            _tile_loadd(4, w0 + j * 1024, 64);
            _tile_dpbssd(0, 2, 4);
            _tile_dpbusd(1, 3, 4);
            if (w1) {
                _tile_loadd(7, w1 + j * 1024, 64);
                _tile_dpbssd(5, 2, 7);
                _tile_dpbusd(6, 3, 7);
            }
        }
        _tile_stored(0, acc, 64);
        _tile_stored(1, acc + 256, 64);
        finish(acc, np, w1 ? 16 : lanes1, g->oc, mv[0], bv[0], g->relu, g->narrow,
               y + ox0 * g->oc);
        if (w1) {
            _tile_stored(5, acc, 64);
            _tile_stored(6, acc + 256, 64);
            finish(acc, np, lanes1, g->oc, mv[1], bv[1], g->relu, g->narrow,
                   y + ox0 * g->oc + 16);
        }
    }
}

void qconv_finish(const int32_t *sums, int np, int lanes, int64_t oc, int xzp,
                  const int32_t *wsum, const float *mult, const float *bias, int relu,
                  int out_u8, float out_scale, int out_zp, void *y, int64_t at);

/* One output row of uint8 codes for one or two blocks (w1 NULL: one), as conv_row: sums of
   block 0 in tile 0 (weight in 4), of block 1 in 5 (weight in 7), the codes in 2; cpu_qconv.c's
   epilogue finishes them. */
static void codes_row(const conv_geo *g, const uint8_t *xq, const int8_t *w0, const int8_t *w1,
                      int64_t oc16, int lanes1, const int32_t *wsum, const float *mult,
                      const float *bias, int xzp, int out_u8, float out_scale, int out_zp,
                      void *y) {
    int32_t acc[256] __attribute__((aligned(64)));
    for (int64_t ox0 = 0; ox0 < g->wo; ox0 += 16) {
        const int np = g->wo - ox0 < 16 ? (int)(g->wo - ox0) : 16;
        _tile_zero(0);
        if (w1)
            _tile_zero(5);
        for (int64_t j = 0; j < g->chunks; j++) {
            _tile_loadd(2, xq + ox0 * g->pstep + g->off[j], g->pstep);
            _tile_loadd(4, w0 + j * 1024, 64);
            _tile_dpbusd(0, 2, 4);
            if (w1) {
                _tile_loadd(7, w1 + j * 1024, 64);
                _tile_dpbusd(5, 2, 7);
            }
        }
        for (int k = 0; k <= (w1 != NULL); k++) {
            if (k)
                _tile_stored(5, acc, 64);
            else
                _tile_stored(0, acc, 64);
            const int64_t o = oc16 + 16 * k;
            qconv_finish(acc, np, w1 && !k ? 16 : lanes1, g->oc, xzp, wsum + o, mult + o,
                         bias + o, g->relu, out_u8, out_scale, out_zp, y, ox0 * g->oc + o);
        }
    }
}
#endif

/* tdsl_qconv's convolution on AMX tiles: xp holds the zero-point-padded codes [b, hp, wp, c4]
   and past them the tail cpu_int16_conv's planes have (16 sw c4 + 128 bytes); wt is
   pack_amx's; the rest as tdsl_qconv's. Returns -2 where AMX tiles cannot run, -1 without
   memory, else 0. */
int qconv_amx(const uint8_t *xp, const int64_t *geo, const int8_t *wt, int xzp,
              const int32_t *wsum, const float *mult, const float *bias, int relu, int out_u8,
              float out_scale, int out_zp, void *y, int threads) {
#ifdef CONV_AMX
    if (!amx_permitted())
        return -2;
    const int64_t b = geo[0], h = geo[1], w = geo[2], c = geo[3], oc = geo[4], kh = geo[5],
                  kw = geo[6], sh = geo[7], sw = geo[8], ph = geo[9], pw = geo[10],
                  dh = geo[11], dw = geo[12];
    const int64_t c4 = (c + 3) / 4 * 4, hp = h + 2 * ph, wp = w + 2 * pw;
    const int64_t ho = (hp - dh * (kh - 1) - 1) / sh + 1, wo = (wp - dw * (kw - 1) - 1) / sw + 1;
    const int64_t blocks = (oc + 15) / 16, pairs = (blocks + 1) / 2;
    const int64_t chunks = conv_chunks(kh, kw, c4, wp, dh, dw, NULL);
    int64_t *off = (int64_t *)malloc((size_t)chunks * sizeof(int64_t));
    if (!off)
        return -1;
    conv_chunks(kh, kw, c4, wp, dh, dw, off);
    const conv_geo g = {off, chunks, sw * c4, wo, oc, relu, 0};
    const size_t esize = out_u8 ? 1 : 4;
#pragma omp parallel num_threads(threads) if (b * ho * wo * chunks * blocks >= 4096)
    {
        amx_begin();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < b * ho * pairs; item++) {
            const int64_t ob = item % pairs * 2, row = item / pairs, n = row / ho, oy = row % ho;
            const int two = ob + 1 < blocks;
            const int64_t last = oc - 16 * (ob + two);
            codes_row(&g, xp + (n * hp + oy * sh) * wp * c4, wt + ob * chunks * 1024,
                      two ? wt + (ob + 1) * chunks * 1024 : NULL, 16 * ob,
                      last < 16 ? (int)last : 16, wsum, mult, bias, xzp, out_u8, out_scale,
                      out_zp, (uint8_t *)y + (size_t)(row * wo * oc) * esize);
        }
        amx_end();
    }
    free(off);
    return 0;
#else
    (void)xp, (void)geo, (void)wt, (void)xzp, (void)wsum, (void)mult, (void)bias, (void)relu;
    (void)out_u8, (void)out_scale, (void)out_zp, (void)y, (void)threads;
    return -2;
#endif
}

/* geo: b, h, w, c, oc, kh, kw, sh, sw, ph, pw, dh, dw, then x's strides n, c, h, w in floats,
   then max |w| of the codes. wt: cpu_conv.pack_amx's tiles; w_scale and bias hold
   16 * ceil(oc / 16) floats; y is [b, ho, wo, oc] fp32. Returns -2 where AMX tiles cannot run
   (not built, or Linux refused), -1 when the planes cannot be allocated, 1 when x holds a NaN
   or an infinity (y untouched), else 0. */
int tdsl_int16_conv(const float *x, const int64_t *geo, const int8_t *wt, const float *w_scale,
                    const float *bias, int relu, float *y, int threads) {
#ifdef CONV_AMX
    if (!amx_permitted())
        return -2;
    const int64_t b = geo[0], h = geo[1], w = geo[2], c = geo[3], oc = geo[4], kh = geo[5],
                  kw = geo[6], sh = geo[7], sw = geo[8], ph = geo[9], pw = geo[10],
                  dh = geo[11], dw = geo[12], wmax = geo[17];
    const int64_t *xs = geo + 13;
    const int64_t c4 = (c + 3) / 4 * 4, hp = h + 2 * ph, wp = w + 2 * pw;
    const int64_t ho = (hp - dh * (kh - 1) - 1) / sh + 1, wo = (wp - dw * (kw - 1) - 1) / sw + 1;
    const int64_t blocks = (oc + 15) / 16, pairs = (blocks + 1) / 2;
    const int64_t chunks = conv_chunks(kh, kw, c4, wp, dh, dw, NULL);
    /* the planes, then a zeroed tail for the reads past the last pixel and chunk */
    const int64_t image = hp * wp * c4, plane = b * image, span = plane + 16 * sw * c4 + 128;
    int8_t *hi = (int8_t *)malloc((size_t)(2 * span));
    float *t = (float *)malloc((size_t)b * sizeof(float));
    int64_t *off = (int64_t *)malloc((size_t)chunks * sizeof(int64_t));
    if (!hi || !t || !off) {
        free(hi);
        free(t);
        free(off);
        return -1;
    }
    uint8_t *lo = (uint8_t *)(hi + span);
    conv_chunks(kh, kw, c4, wp, dh, dw, off);
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
    if (bad) {
        free(hi);
        free(t);
        free(off);
        return 1;
    }
    const conv_geo g = {off, chunks, sw * c4, wo, oc, relu,
                        (double)XI_MAX * (double)wmax * (double)(kh * kw * c) < 2147483648.0};
    /* threads share (image, output row, pair of channel blocks) items; each loads the tile
       shapes for itself */
#pragma omp parallel num_threads(threads) if (b * ho * wo * chunks * blocks >= 4096)
    {
        amx_begin();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < b * ho * pairs; item++) {
            const int64_t ob = item % pairs * 2, row = item / pairs, n = row / ho, oy = row % ho;
            const int64_t at = (n * hp + oy * sh) * wp * c4;
            const int two = ob + 1 < blocks;
            __m512 mv[2], bv[2];
            for (int k = 0; k <= two; k++) {
                mv[k] = _mm512_mul_ps(_mm512_set1_ps(t[n]), _mm512_loadu_ps(w_scale + 16 * (ob + k)));
                bv[k] = _mm512_loadu_ps(bias + 16 * (ob + k));
            }
            const int64_t last = oc - 16 * (ob + two);
            conv_row(&g, hi + at, lo + at, wt + ob * chunks * 1024,
                     two ? wt + (ob + 1) * chunks * 1024 : NULL, mv, bv,
                     last < 16 ? (int)last : 16, y + row * wo * oc + 16 * ob);
        }
        amx_end();
    }
    free(hi);
    free(t);
    free(off);
    return 0;
#else
    (void)x, (void)geo, (void)wt, (void)w_scale, (void)bias, (void)relu, (void)y, (void)threads;
    return -2;
#endif
}
