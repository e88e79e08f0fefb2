/* What the native library's C files share: where AMX tiles are built in, and the functions one
   file lends the others. Hashed with the sources (native_build.py), so an edit rebuilds. */
#ifndef TDSL_CPU_COMMON_H
#define TDSL_CPU_COMMON_H
#include <stdint.h>

/* AMX tiles are built where the compiler targets them and Linux can grant the tile state (its
   arch_prctl); their kernels also use AVX-512 BW and DQ, which every CPU with AMX has. One
   condition for every file, so a library either runs all its AMX paths or none. */
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__linux__)
#define TDSL_AMX 1
#endif

/* cpu_linear.c */
uint32_t abs_max_bits(const float *x, int64_t n);
int quantize_u8_span(const float *x, int64_t n, float scale, int zp, int lo, int hi,
                     uint8_t *out);

/* cpu_amx.c */
int amx_permitted(void);
void amx_begin(void);
void amx_end(void);
void amx_activations(const uint8_t *q, int64_t rows, int64_t padded, int64_t kp, uint8_t *qv,
                     int threads);
void amx_panel(int ternary, const uint8_t *w, int nb, int64_t tile_bytes, int64_t n, int64_t n0,
               int64_t kb, uint8_t *panel);
void amx_sums(int ternary, const uint8_t *panel, const uint8_t *qv, int64_t pairs, int64_t kb,
              int32_t *acc, int64_t ldc);
void amx_group_panel(const uint8_t *w, int nib, int64_t vstride, int tiles, int64_t kb,
                     uint8_t *panel);
void amx_grouped(const uint8_t *q, int64_t kp, int64_t pairs, const uint8_t *wb,
                 int64_t bstride, int64_t kb, int64_t gb, const float *scale,
                 const int32_t *wsum, int64_t np, int tiles, float *f);

/* cpu_qconv.c (AVX-512 builds) */
void qconv_finish(const int32_t *sums, int np, int lanes, int64_t oc, int xzp,
                  const int32_t *wsum, const float *mult, const float *bias, int relu,
                  int out_u8, float out_scale, int out_zp, void *y, int64_t at);

/* cpu_conv_amx.c */
int qconv_amx(const uint8_t *xp, const int64_t *geo, const int8_t *wt, int xzp,
              const int32_t *wsum, const float *mult, const float *bias, int relu, int out_u8,
              float out_scale, int out_zp, void *y, int threads);

/* A convolution's sizes from its geometry array (b, h, w, c, oc, kh, kw, sh, sw, ph, pw, dh,
   dw, ...): channels padded to c4, the padded input hp x wp, the output ho x wo. */
typedef struct {
    int64_t b, h, w, c, oc, kh, kw, sh, sw, ph, pw, dh, dw, c4, hp, wp, ho, wo;
} conv_dims;

static inline conv_dims conv_dims_of(const int64_t *geo) {
    conv_dims d = {geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8],
                   geo[9], geo[10], geo[11], geo[12], 0, 0, 0, 0, 0};
    d.c4 = (d.c + 3) / 4 * 4;
    d.hp = d.h + 2 * d.ph;
    d.wp = d.w + 2 * d.pw;
    d.ho = (d.hp - d.dh * (d.kh - 1) - 1) / d.sh + 1;
    d.wo = (d.wp - d.dw * (d.kw - 1) - 1) / d.sw + 1;
    return d;
}

/* Bytes AMX tiles may read past a padded input [b, hp, wp, c4]: the 16 pixels of a row's last
   tile past its end, and a 64-byte chunk past a kernel row's run (cpu_conv_amx.c) */
static inline int64_t amx_tail(const conv_dims *d) { return 16 * d->sw * d->c4 + 128; }
#endif
