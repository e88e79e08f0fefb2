/* One decoding step (one token, batch 1) of a frozen transformer's attention layer or
   feed-forward block, each as one call. Compiled into the same library as cpu_linear.c.

   Why: at batch 1 the packed projections take about half of a step; the rest was some thirty
   small tensor ops and module calls per block (rotary, the cache write, scaled_dot_product
   attention, the activation, splits), each a few microseconds of fixed cost against
   nanoseconds of arithmetic. Here they are loops over a few thousand floats between the
   tdsl_linear calls that read the weights.

   Each step computes what runtime/transformer.py computes with torch, in the same order:
   rotary as x cos + roll(x) sin (bit-identical: no contraction into FMA, see FLAGS), keys and
   values rounded to the cache type as torch rounds (bf16: to nearest even), softmax over
   q . k / sqrt(head_dim) with the max subtracted. The attention itself accumulates in fp32,
   also over a bf16 cache (torch's would run in bf16), so it matches torch to float rounding,
   not bit for bit; tests compare it with a pure-PyTorch twin (runtime/decode_step.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

enum { CACHE_F32 = 0, CACHE_BF16 = 1 };
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

/* one row of the cache as fp32: a view of it, or converted into buf */
static inline const float *cache_row(const void *c, int type, int64_t at, int64_t d, float *buf) {
    if (type == CACHE_F32) return (const float *)c + at * d;
    const uint16_t *h = (const uint16_t *)c + at * d;
    for (int64_t i = 0; i < d; i++) buf[i] = from_bf16(h[i]);
    return buf;
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float lane[16] = {0}; /* 16 independent sums: vectorized without reassociating */
    int64_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += lane[l];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* y [dim] = o(norm(attention of x's token over the cache)), x [dim] already normed.
   qkv is the joined q, k, v projection (heads, kv_heads, kv_heads rows of head_dim); the new
   key (rotated) and value are written to row pos of the caches kc, vc [kv_heads, max_len,
   head_dim], and the token attends to rows 0..pos. cos, sin [head_dim] are the position's
   rotary factors, or NULL for none. Returns 0, or -1 when scratch memory cannot be had. */
int tdsl_attention_step(const float *x, const tdsl_lin *qkv, const tdsl_lin *o, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, const float *cos, const float *sin,
                        void *kc, void *vc, int cache_type, int64_t max_len, int64_t pos,
                        const tdsl_norm *norm, float *y, int threads) {
    const int64_t d = head_dim, dim = heads * d, ctx = pos + 1, group = heads / kv_heads;
    float *buf = malloc(sizeof(float) * (size_t)(qkv->n + 2 * dim + d));
    float *scores = malloc(sizeof(float) * (size_t)(heads * (ctx + 2 * d)));
    if (!buf || !scores || run_linear(qkv, x, buf, threads)) {
        free(buf);
        free(scores);
        return -1;
    }
    float *q = buf, *k = buf + dim, *v = k + kv_heads * d, *att = buf + qkv->n;
    float *normed = att + dim, *tmp = normed + dim;
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
                ((uint16_t *)kc)[at + i] = to_bf16(k[g * d + i]);
                ((uint16_t *)vc)[at + i] = to_bf16(v[g * d + i]);
            }
        }
    }
    const float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for num_threads(threads) schedule(static) if (ctx * dim >= (1 << 17))
    for (int64_t h = 0; h < heads; h++) {
        const int64_t g = h / group;
        float *s = scores + h * (ctx + 2 * d), *row = s + ctx, *out = row + d;
        const float *qh = q + h * d;
        float mx = -INFINITY;
        for (int64_t j = 0; j < ctx; j++) {
            s[j] = dot(qh, cache_row(kc, cache_type, g * max_len + j, d, row), d) * scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < ctx; j++) {
            s[j] = expf(s[j] - mx); /* a NaN anywhere makes mx or s[j], and so the row, NaN */
            sum += s[j];
        }
        for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
        for (int64_t j = 0; j < ctx; j++) {
            const float *vr = cache_row(vc, cache_type, g * max_len + j, d, row);
            const float p = s[j];
            for (int64_t i = 0; i < d; i++) out[i] += p * vr[i];
        }
        for (int64_t i = 0; i < d; i++) att[h * d + i] = out[i] / sum;
    }
    const float *in = att;
    if (norm->on) {
        tdsl_rmsnorm(att, 1, dim, dim, norm->w, norm->eps, normed, 1);
        in = normed;
    }
    const int rc = run_linear(o, in, y, threads);
    free(buf);
    free(scores);
    return rc;
}

static inline float act(int kind, float g) {
    if (kind == ACT_SILU) return g / (1.0f + expf(-g));
    if (kind == ACT_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    return g < 0.0f ? 0.0f : g; /* relu; NaN stays NaN */
}

/* y [dim] = down(norm(act(gate x) * up x)), or down(norm(act(up x))) when not gated; up is the
   joined gate and up projection (gate's rows first) when gated. Returns 0, or -1 when scratch
   memory cannot be had. */
int tdsl_mlp_step(const float *x, const tdsl_lin *up, int gated, int activation,
                  const tdsl_norm *norm, const tdsl_lin *down, float *y, int threads) {
    const int64_t hidden = down->k;
    float *h = malloc(sizeof(float) * (size_t)(up->n + hidden));
    if (!h || run_linear(up, x, h, threads)) {
        free(h);
        return -1;
    }
    const float *u = gated ? h + hidden : h;
    for (int64_t i = 0; i < hidden; i++)
        h[i] = gated ? act(activation, h[i]) * u[i] : act(activation, h[i]);
    const float *in = h;
    if (norm->on) {
        tdsl_rmsnorm(h, 1, hidden, hidden, norm->w, norm->eps, h + up->n, 1);
        in = h + up->n;
    }
    const int rc = run_linear(down, in, y, threads);
    free(h);
    return rc;
}
