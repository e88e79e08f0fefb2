/* One decoding step (one token, batch 1) of a frozen transformer's attention layer or
   feed-forward block, each as one call. Compiled into the same library as cpu_linear.c.

   Why: at batch 1 the packed projections take about half of a step; the rest was some thirty
   small tensor ops and module calls per block (rotary, the cache write, scaled_dot_product
   attention, the activation, splits), each a few microseconds of fixed cost against
   nanoseconds of arithmetic. Here they are loops over a few thousand floats between the
   tdsl_linear calls that read the weights.

   Each step computes what runtime/transformer.py computes with torch, in the same order:
   rotary as x cos + roll(x) sin (bit-identical: no contraction into FMA, see FLAGS), keys and
   values rounded to the cache type as torch rounds (bf16, fp16: to nearest even), softmax over
   q . k / sqrt(head_dim) with the max subtracted. The attention itself accumulates in fp32,
   also over a 16-bit cache (torch's would run in bf16 or fp16), so it matches torch to float
   rounding,
   not bit for bit; tests compare it with a pure-PyTorch twin (runtime/decode_step.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* from cpu_linear.c */
int tdsl_linear(int kind, const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                int64_t n, const float *w_scale, const int32_t *w_sum, const float *bias,
                int mode, float *y, int threads);
int tdsl_rmsnorm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *w, float eps,
                 float *y, int threads);

/* A packed linear layer as tdsl_linear takes it (decode_step.py's Lin mirrors this). */
typedef struct {
    int kind, mode; /* weight kind; 0 = per-token int8 activations, 1 = float activations */
    int64_t n, k;
    const uint8_t *w;
    const float *scale;
    const int32_t *w_sum; /* int8 kind only */
    const float *bias;    /* or NULL */
} tdsl_lin;

/* A sub-norm (RMSNorm before a projection), or none. */
typedef struct {
    int on;
    float eps;
    const float *w; /* or NULL: no affine weight */
} tdsl_norm;

enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_F16 = 2 };

/* fp16 caches need the compiler's _Float16 (IEEE conversions, rounding to nearest even as
   torch does); without it decode_step.py leaves them to torch */
#if defined(__FLT16_MAX__)
#define HAVE_F16 1
#else
#define HAVE_F16 0
#endif
int tdsl_decode_fp16(void) { return HAVE_F16; }
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_RELU = 2 };

static int run_linear(const tdsl_lin *l, const float *x, float *y, int threads) {
    return tdsl_linear(l->kind, x, 1, l->k, l->k, l->w, l->n, l->scale, l->w_sum, l->bias,
                       l->mode, y, threads);
}

/* fp32 -> bf16 as torch rounds: to nearest even, NaN to a quiet NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7fc0;
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if HAVE_F16
static inline uint16_t to_f16(float f) { /* to nearest even; a NaN as torch's: 0x7e00, signed */
    if (f != f) {
        uint32_t u;
        memcpy(&u, &f, 4);
        return (uint16_t)(((u >> 16) & 0x8000) | 0x7e00);
    }
    const _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static inline float from_f16(uint16_t u) {
    _Float16 h;
    memcpy(&h, &u, 2);
    return (float)h;
}
#else
static inline uint16_t to_f16(float f) { (void)f; return 0; }  /* not reached: refused */
static inline float from_f16(uint16_t u) { (void)u; return 0.0f; }
#endif

/* one value to a 16-bit cache type */
static inline uint16_t to_half(int type, float f) {
    return type == CACHE_F16 ? to_f16(f) : to_bf16(f);
}

/* x [d] rotated in place: x cos + roll(x, d / 2) sin, sin's first half negated by the caller */
static void rotate(float *x, int64_t d, const float *cos, const float *sin, float *tmp) {
    const int64_t half = d / 2;
    memcpy(tmp, x, sizeof(float) * (size_t)d);
    for (int64_t i = 0; i < d; i++) {
        const float a = tmp[i] * cos[i];
        const float b = tmp[i < half ? i + half : i - half] * sin[i];
        x[i] = a + b;
    }
}

#if defined(__AVX512F__)
/* e^x for 16 floats, about an ulp from expf: 2^n e^r with n = round(x log2 e), r in
   [-ln2/2, ln2/2] by a degree-6 Taylor polynomial; scalef gives inf, 0 and NaN where expf
   does. (glibc's expf is a call per float: 5632 of them a feed-forward step.) */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln 2, high part */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);       /* and the rest */
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* GELU, 0.5 g (1 + erf(g / sqrt 2)), 16 at a time: erf by Abramowitz and Stegun 7.1.26
   (absolute error below 1.5e-7) on |z| capped at 10, where erf is 1 in fp32, instead of libm's
   erff one value at a time; NaN stays NaN (the cap keeps it: min returns its second operand) */
static inline __m512 gelu16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 z = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_min_ps(_mm512_set1_ps(10.0f), _mm512_abs_ps(z));
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = _mm512_fnmadd_ps(p, exp16(_mm512_sub_ps(_mm512_setzero_ps(),
                                                              _mm512_mul_ps(a, a))), one);
    const __m512 erf = _mm512_mask_sub_ps(e, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(),
                                                                _CMP_LT_OQ),
                                          _mm512_setzero_ps(), e);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, erf));
}

/* 16 cache values as fp32 (bf16 is fp32's top half: widen and shift; fp16: vcvtph2ps) */
static inline __m512 load16(const void *c, int type, int64_t i) {
    if (type == CACHE_F32) return _mm512_loadu_ps((const float *)c + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i));
    if (type == CACHE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

static inline float load1(const void *c, int type, int64_t i) {
    if (type == CACHE_F32) return ((const float *)c)[i];
    const uint16_t u = ((const uint16_t *)c)[i];
    return type == CACHE_F16 ? from_f16(u) : from_bf16(u);
}

/* q . row i of the cache (d values from c + i d) */
static inline float dot_row(const float *q, const void *c, int type, int64_t at, int64_t d) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(c, type, at + i), acc);
    s = _mm512_reduce_add_ps(acc);
#else
    float lane[16] = {0}; /* 16 independent sums: vectorized without reassociating */
    for (; i + 16 <= d; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += q[i + l] * load1(c, type, at + i + l);
    for (int l = 0; l < 16; l++) s += lane[l];
#endif
    for (; i < d; i++) s += q[i] * load1(c, type, at + i);
    return s;
}

/* q . rows at, at + d, at + 2d, at + 3d of the cache, into s[0..3]: four independent chains
   of FMAs, where one row's chain would wait on each FMA's latency */
static inline void dot4(const float *q, const void *c, int type, int64_t at, int64_t d,
                        float *s) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < d; i += 16) {
            const __m512 qv = _mm512_loadu_ps(q + i);
            a0 = _mm512_fmadd_ps(qv, load16(c, type, at + i), a0);
            a1 = _mm512_fmadd_ps(qv, load16(c, type, at + d + i), a1);
            a2 = _mm512_fmadd_ps(qv, load16(c, type, at + 2 * d + i), a2);
            a3 = _mm512_fmadd_ps(qv, load16(c, type, at + 3 * d + i), a3);
        }
        s[0] = _mm512_reduce_add_ps(a0);
        s[1] = _mm512_reduce_add_ps(a1);
        s[2] = _mm512_reduce_add_ps(a2);
        s[3] = _mm512_reduce_add_ps(a3);
        return;
    }
#endif
    for (int r = 0; r < 4; r++) s[r] = dot_row(q, c, type, at + r * d, d);
}

/* Cache rows a loop asks for this many rows ahead: each head streams its rows once, and with
   the hardware prefetcher alone attention over 512 cold keys read at about 13 GB/s (19 with
   this, on the 2-core Xeon; 8, 16 and 32 rows ahead measured alike). */
#ifndef ROWS_AHEAD
#define ROWS_AHEAD 8
#endif

static inline void prefetch_rows(const void *c, int type, int64_t at, int64_t rows, int64_t d) {
#if defined(__AVX512F__)
    const char *p = (const char *)c + at * (type == CACHE_F32 ? 4 : 2);
    const int64_t bytes = rows * d * (type == CACHE_F32 ? 4 : 2);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
#else
    (void)c, (void)type, (void)at, (void)rows, (void)d;
#endif
}

/* out += p * row i of the cache */
static inline void add_row(float *out, float p, const void *c, int type, int64_t at, int64_t d) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= d; i += 16)
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, load16(c, type, at + i),
                                                  _mm512_loadu_ps(out + i)));
#endif
    for (; i < d; i++) out[i] += p * load1(c, type, at + i);
}

/* x [dim] with pre (the block's RMSNorm before this layer) applied, into buf; or x itself */
static const float *normed(const float *x, int64_t n, const tdsl_norm *pre, float *buf) {
    if (!pre->on) return x;
    tdsl_rmsnorm(x, 1, n, n, pre->w, pre->eps, buf, 1);
    return buf;
}

/* y = x + out when residual, else out */
static void finish(float *y, const float *x, int64_t n, int residual) {
    if (residual)
        for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* y [dim] = o(norm(attention of the token h over the cache)), h = pre(x) [dim], plus x when
   residual (a pre-norm residual block: x + attention(rmsnorm(x))). qkv is the joined q, k, v
   projection (heads, kv_heads, kv_heads rows of head_dim); the new key (rotated) and value are
   written to row pos of the caches kc, vc [kv_heads, max_len, head_dim], and the token attends
   to rows 0..pos. cos, sin [head_dim] are the position's rotary factors, or NULL for none.
   Returns 0, or -1 when scratch memory cannot be had. */
int tdsl_attention_step(const float *x, const tdsl_norm *pre, const tdsl_lin *qkv,
                        const tdsl_lin *o, int64_t heads, int64_t kv_heads, int64_t head_dim,
                        const float *cos, const float *sin, void *kc, void *vc, int cache_type,
                        int64_t max_len, int64_t pos, const tdsl_norm *norm, int residual,
                        float *y, int threads) {
    const int64_t d = head_dim, dim = heads * d, ctx = pos + 1, group = heads / kv_heads;
    float *buf = malloc(sizeof(float) * (size_t)(qkv->n + 2 * dim + d + qkv->k));
    float *scores = malloc(sizeof(float) * (size_t)(heads * ctx));
    if (!buf || !scores ||
        run_linear(qkv, normed(x, qkv->k, pre, buf + qkv->n + 2 * dim + d), buf, threads)) {
        free(buf);
        free(scores);
        return -1;
    }
    float *q = buf, *k = buf + dim, *v = k + kv_heads * d, *att = buf + qkv->n;
    float *tmp = att + 2 * dim;
    if (cos)
        for (int64_t h = 0; h < heads + kv_heads; h++) /* q's heads, then k's */
            rotate(h < heads ? q + h * d : k + (h - heads) * d, d, cos, sin, tmp);
    for (int64_t g = 0; g < kv_heads; g++) {
        const int64_t at = (g * max_len + pos) * d;
        if (cache_type == CACHE_F32) {
            memcpy((float *)kc + at, k + g * d, sizeof(float) * (size_t)d);
            memcpy((float *)vc + at, v + g * d, sizeof(float) * (size_t)d);
        } else {
            for (int64_t i = 0; i < d; i++) {
                ((uint16_t *)kc)[at + i] = to_half(cache_type, k[g * d + i]);
                ((uint16_t *)vc)[at + i] = to_half(cache_type, v[g * d + i]);
            }
        }
    }
    const float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for num_threads(threads) schedule(static) if (ctx * dim >= (1 << 17))
    for (int64_t h = 0; h < heads; h++) {
        const int64_t base = h / group * max_len * d; /* this head's kv head, row 0 */
        float *s = scores + h * ctx, *out = att + h * d;
        const float *qh = q + h * d;
        float mx = -INFINITY;
        int64_t j = 0;
        for (; j + 4 <= ctx; j += 4) {
            if (j + ROWS_AHEAD + 4 <= ctx)
                prefetch_rows(kc, cache_type, base + (j + ROWS_AHEAD) * d, 4, d);
            dot4(qh, kc, cache_type, base + j * d, d, s + j);
        }
        for (; j < ctx; j++) s[j] = dot_row(qh, kc, cache_type, base + j * d, d);
        for (j = 0; j < ctx; j++) {
            s[j] *= scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        float sum = 0.0f; /* a NaN anywhere makes mx or s[j], and so the row, NaN */
        j = 0;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; j + 16 <= ctx; j += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(s + j, e);
            acc = _mm512_add_ps(acc, e);
        }
        sum = _mm512_reduce_add_ps(acc);
#endif
        for (; j < ctx; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
        for (j = 0; j < ctx; j++) {
            if (j + ROWS_AHEAD < ctx)
                prefetch_rows(vc, cache_type, base + (j + ROWS_AHEAD) * d, 1, d);
            add_row(out, s[j] / sum, vc, cache_type, base + j * d, d);
        }
    }
    const int rc = run_linear(o, normed(att, dim, norm, att + dim), y, threads);
    finish(y, x, o->n, residual);
    free(buf);
    free(scores);
    return rc;
}

static inline float act(int kind, float g) {
    if (kind == ACT_SILU) return g / (1.0f + expf(-g));
    if (kind == ACT_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    return g < 0.0f ? 0.0f : g; /* relu; NaN stays NaN */
}

/* y [dim] = down(norm(act(gate h) * up h)), or down(norm(act(up h))) when not gated, with
   h = pre(x) [dim], plus x when residual; up is the joined gate and up projection (gate's rows
   first) when gated. Returns 0, or -1 when scratch memory cannot be had. */
int tdsl_mlp_step(const float *x, const tdsl_norm *pre, const tdsl_lin *up, int gated,
                  int activation, const tdsl_norm *norm, const tdsl_lin *down, int residual,
                  float *y, int threads) {
    const int64_t hidden = down->k;
    float *h = malloc(sizeof(float) * (size_t)(up->n + hidden + up->k));
    if (!h || run_linear(up, normed(x, up->k, pre, h + up->n + hidden), h, threads)) {
        free(h);
        return -1;
    }
    const float *u = gated ? h + hidden : h;
    int64_t i = 0;
#if defined(__AVX512F__)
    /* SiLU, g / (1 + e^-g), and GELU 16 at a time, the last 16 masked: every element takes the
       same formula, wherever it lies */
    if (activation == ACT_SILU || activation == ACT_GELU)
        for (; i < hidden; i += 16) {
            const __mmask16 m = hidden - i >= 16 ? 0xffff : (__mmask16)((1u << (hidden - i)) - 1);
            const __m512 g = _mm512_maskz_loadu_ps(m, h + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 a = activation == ACT_GELU
                           ? gelu16(g)
                           : _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            if (gated) a = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i));
            _mm512_mask_storeu_ps(h + i, m, a);
        }
#endif
    for (; i < hidden; i++)
        h[i] = gated ? act(activation, h[i]) * u[i] : act(activation, h[i]);
    const int rc = run_linear(down, normed(h, hidden, norm, h + up->n), y, threads);
    finish(y, x, down->n, residual);
    free(h);
    return rc;
}

/* One step of a chain: an attention or feed-forward layer with the block's norm before it and
   the residual around it (decode_step.py's Step mirrors this). */
typedef struct {
    int attention;               /* 1: tdsl_attention_step, 0: tdsl_mlp_step */
    int cache_type, gated, activation;
    const tdsl_norm *pre, *norm; /* the block's norm before the layer; the layer's sub-norm */
    const tdsl_lin *a, *b;       /* q, k, v joined and o; or up (gate and up) and down */
    int64_t heads, kv_heads, head_dim, max_len;
    const float *cos, *sin;      /* rotary tables [max_len, head_dim], or NULL */
    void *kc, *vc;               /* this layer's caches [kv_heads, max_len, head_dim] */
} tdsl_step;

/* y [dim] = x [dim] through count pre-norm residual steps in order, the token at position pos:
   a transformer's blocks in one call, so that a decoding step returns to Python once rather
   than twice a block. Returns 0, or -1 when scratch memory cannot be had. */
int tdsl_decode_steps(const float *x, const tdsl_step *steps, int64_t count, int64_t pos,
                      float *y, int threads) {
    const int64_t dim = steps[0].a->k;
    float *buf = malloc(sizeof(float) * (size_t)(2 * dim));
    int rc = buf ? 0 : -1;
    const float *cur = x;
    for (int64_t i = 0; i < count && !rc; i++) {
        const tdsl_step *s = steps + i;
        float *out = i == count - 1 ? y : buf + (i % 2) * dim;
        if (s->attention) {
            const int64_t row = pos * s->head_dim;
            rc = tdsl_attention_step(cur, s->pre, s->a, s->b, s->heads, s->kv_heads,
                                     s->head_dim, s->cos ? s->cos + row : NULL,
                                     s->sin ? s->sin + row : NULL, s->kc, s->vc, s->cache_type,
                                     s->max_len, pos, s->norm, 1, out, threads);
        } else {
            rc = tdsl_mlp_step(cur, s->pre, s->a, s->gated, s->activation, s->norm, s->b, 1,
                               out, threads);
        }
        cur = out;
    }
    free(buf);
    return rc;
}
