/* AMX int8 tiles for linear layers with many rows, compiled into the same library as
   cpu_linear.c, whose linear() and grouped kernel call them (linear_amx, grouped_amx there).

   Why: from a few dozen rows on, a layer is bound by multiply-adds, not by reading its weight.
   AVX-512 VNNI does 64 u8 x s8 products an instruction; one AMX tdpbusd does 16 x 16 x 64.
   Measured on the development machine (ad hoc, one thread, operands in L1): 1.7-1.9 T
   multiply-adds a second, against about 0.17 T for torch's bf16 matmul at M = 256. The sums
   are the same integers VNNI computes (u8 x s8 products summed in int32), so every result is
   bit-identical to the VNNI path's.

   Roles are swapped against the textbook GEMM: the tile multiplication's left operand A
   (16 rows x 64 bytes, row-major) is the weight, 16 output columns by 64 inputs, the natural
   form of a weight row; its right operand B (16 rows of 16 x 4 bytes, "VNNI" form) is the
   activations, 16 rows by 64 inputs, transposed four bytes at a time. So only the activations,
   quantized once per call, need the awkward transposition (amx_activations); a weight block is
   unpacked once per 32 columns and row group (amx_panel) and then serves every row tile. The
   result tile C[column][row] is transposed on the way out.

   Ternary: A = codes c = w + 1 (u8), B = s8 activations: tdpbusd. Int8: A = s8 weights,
   B = u8 shifted activations: tdpbsud. Both as in cpu_linear.c, whose epilogue undoes the
   offsets.

   Linux hands out AMX's 8 KiB register state only to a process that asks (arch_prctl
   ARCH_REQ_XCOMP_PERM); amx_permitted() asks once, on the first call that would run AMX tiles
   (a layer with enough rows, a convolution: cpu_conv_amx.c) or when native.Library.amx is read
   (native.describe() reads it), so a process that never runs one never holds the larger signal
   frames the state brings. Every caller takes its VNNI path when the answer is no (an older
   kernel, a CPU without AMX, a build without -mamx-int8). */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_common.h"
#ifdef TDSL_AMX
#include <immintrin.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when Linux grants this process the tile state (asked once, where AMX tiles are built in,
   by the first caller that would run them) */
int amx_permitted(void) {
#ifdef TDSL_AMX
    static int state; /* 0 not asked yet, 1 granted, -1 refused */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s > 0;
#else
    return 0;
#endif
}

#ifdef TDSL_AMX
/* The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes. A constant in
   memory: GCC 12 deletes the stores that fill such a struct on the stack, as if ldtilecfg did
   not read them, and the CPU then faults on the half-written configuration. */
static const struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) TILES_16X64 = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

void amx_begin(void) { _tile_loadconfig(&TILES_16X64); } /* per thread */

void amx_end(void) { _tile_release(); }

/* q [rows, kp] (8-bit activation rows, kp = 64 kb) into B tiles, two row tiles side by side
   (the pair amx_sums multiplies together): tile h of pair p for block b is the 1 KiB at
   ((p kb + b) 2 + h) KiB, its row r holding bytes 4r..4r+3 of block b of the tile's 16 rows
   side by side. Rows past the last are zero; qv holds `padded` rows (a multiple of 32). */
void amx_activations(const uint8_t *q, int64_t rows, int64_t padded, int64_t kp, uint8_t *qv,
                     int threads) {
    const int64_t kb = kp / 64, tiles = padded / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * kp >= (1 << 20))
    for (int64_t rt = 0; rt < tiles; rt++)
        for (int64_t b = 0; b < kb; b++) {
            uint32_t *dst = (uint32_t *)(qv + ((rt / 2 * kb + b) * 2 + rt % 2) * 1024);
            for (int t = 0; t < 16; t++) {
                const int64_t row = rt * 16 + t;
                if (row >= rows) {
                    for (int r = 0; r < 16; r++) dst[r * 16 + t] = 0;
                    continue;
                }
                const uint32_t *src = (const uint32_t *)(q + row * kp + b * 64);
                for (int r = 0; r < 16; r++) dst[r * 16 + t] = src[r];
            }
        }
}

/* The A tiles of 32 weight columns n0.. (two tiles of 16): panel[b][ct] is 1 KiB, row c the 64
   codes of column n0 + 16 ct + c for inputs 64 b.. (ternary: c = w + 1 as u8; int8: s8).
   w is in cpu_linear.c's layout: tiles of nb rows, tile_bytes each, row j's block b at
   (b * nb + j) * (16 or 64) bytes; columns from n on are zeros. */
void amx_panel(int ternary, const uint8_t *w, int nb, int64_t tile_bytes, int64_t n, int64_t n0,
               int64_t kb, uint8_t *panel) {
    const int64_t width = ternary ? 16 : 64;
    const __m512i three = _mm512_set1_epi8(3);
    const __m512i shifts = _mm512_set_epi16(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4,
                                            2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const uint8_t *src[32];
    for (int c = 0; c < 32; c++) {
        const int64_t col = n0 + c;
        src[c] = col < n ? w + col / nb * tile_bytes + (col % nb) * width : NULL;
    }
    /* block by block, so the panel is written in order */
    for (int64_t b = 0; b < kb; b++)
        for (int c = 0; c < 32; c++) {
            __m512i v = _mm512_setzero_si512();
            const uint8_t *s = src[c] ? src[c] + b * nb * width : NULL;
            if (s && ternary) /* 128-bit lane l: the codes in bits 2l, 2l + 1 of the 16 bytes */
                v = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(
                        _mm_loadu_si128((const __m128i *)s)), shifts), three);
            else if (s)
                v = _mm512_loadu_si512((const void *)s);
            _mm512_store_si512((void *)(panel + b * 2048 + c * 64), v);
        }
}

/* dst[j * ld + i] = src[i * 16 + j] for a 16 x 16 block of int32: four rounds of shuffles
   (pairs of lanes, then of 64-bit, of 128-bit and of 256-bit parts) */
static void transpose16(const int32_t *src, int32_t *dst, int64_t ld) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const void *)(src + 16 * i));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int j = 0; j < 2; j++) {
            r[i + j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
            r[i + j + 2] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
        }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
    /* r[k] holds column order[k] (the 64-bit round swapped the middle pair of each four) */
    static const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    for (int k = 0; k < 16; k++) _mm512_storeu_si512((void *)(dst + order[k] * ld), r[k]);
}

#ifndef AMX_PF
#define AMX_PF 2 /* blocks ahead: a pair's next B tiles are fetched into L1 while these multiply */
#endif

/* acc[r * ldc + j] = the int32 sums of activation row r times column j, for the rows of
   `pairs` pairs of row tiles and the panel's 32 columns. The four result tiles of a pair stay
   in registers over all kb blocks (8 tiles: 2 A, 2 B, 4 C); loads are spread between the
   multiplications, whose four chains overlap. (Ad hoc, one thread, M = 256, N = K = 4096:
   splitting K into chunks whose A tiles stay in L1 did not help; the prefetch did, about 10%.)
   */
void amx_sums(int ternary, const uint8_t *panel, const uint8_t *qv, int64_t pairs, int64_t kb,
              int32_t *acc, int64_t ldc) {
    int32_t cbuf[256] __attribute__((aligned(64)));
    for (int64_t p = 0; p < pairs; p++) {
        const uint8_t *bq = qv + p * kb * 2048;
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        /* prefetching past the end of qv is harmless: prefetches do not fault */
#define AMX_LOOP(DP) for (int64_t b = 0; b < kb; b++) { \
            for (int l = 0; l < 32; l++) \
                _mm_prefetch((const char *)(bq + (b + AMX_PF) * 2048 + l * 64), _MM_HINT_T0); \
            _tile_loadd(0, panel + b * 2048, 64); \
            _tile_loadd(2, bq + b * 2048, 64); \
            DP(4, 0, 2); \
            _tile_loadd(3, bq + b * 2048 + 1024, 64); \
            DP(5, 0, 3); \
            _tile_loadd(1, panel + b * 2048 + 1024, 64); \
            DP(6, 1, 2); \
            DP(7, 1, 3); }
        if (ternary)
            AMX_LOOP(_tile_dpbusd)
        else
            AMX_LOOP(_tile_dpbsud)
        /* tile 4 + 2 ct + h holds C[column 16 ct + c][row 32 p + 16 h + t] */
#define AMX_OUT(T, CT, H) _tile_stored(T, cbuf, 64); \
        transpose16(cbuf, acc + (32 * p + 16 * H) * ldc + 16 * CT, ldc);
        AMX_OUT(4, 0, 0) AMX_OUT(5, 0, 1) AMX_OUT(6, 1, 0) AMX_OUT(7, 1, 1)
    }
#undef AMX_LOOP
#undef AMX_OUT
}
/* ---- Grouped int8 weights (per-group scales: W8A16, W4A16; cpu_linear.c's grouped kernel) ---
   Here the textbook roles hold: the grouped layout stores 16 columns by 4 inputs in 64 bytes,
   which is a B tile's row, so 16 quads in a row are a B tile as they lie; the activation rows
   (u8: a token's high half + 128, then its low half) are A tiles read in place. Each group's
   sums are scaled on their own, so the result tiles go to memory after every group. */

/* The B tiles of two column tiles (tiles: how many exist, 1 or 2; the other is zeros) as s8
   bytes: panel[ct][b] is 1 KiB, the 16 quads of block b. nib: the codes are nibbles (32 bytes a
   quad, byte j: codes j and j + 32, each + 8), else bytes as they lie. */
void amx_group_panel(const uint8_t *w, int nib, int64_t vstride, int tiles, int64_t kb,
                     uint8_t *panel) {
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi8(8);
    for (int ct = 0; ct < 2; ct++)
        for (int64_t qq = 0; qq < kb * 16; qq++) {
            __m512i v = _mm512_setzero_si512();
            if (ct < tiles && nib) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(w + ct * vstride +
                                                                       qq * 32));
                v = _mm512_sub_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(
                        _mm256_and_si256(p, low4)), _mm256_and_si256(_mm256_srli_epi16(p, 4),
                        low4), 1), eight);
            } else if (ct < tiles) {
                v = _mm512_loadu_si512((const void *)(w + ct * vstride + qq * 64));
            }
            _mm512_store_si512((void *)(panel + (ct * kb * 16 + qq) * 64), v);
        }
}

/* f[t * 32 + j] = sum over groups g of float(256 (h - 128 wsum) + l) * scale, for the 16 tokens
   of each pair of row tiles (rows 2t, 2t + 1: a token's halves) and 32 columns: the same
   operations in the same order as cpu_linear.c's gtile_body, so the results are identical.
   q: the activation rows from this pair's first, kp bytes apart; wb: the B tiles, column tile
   ct's block b at wb + ct * bstride + b KiB; scale and wsum [groups, np] from this block's
   first column; gb: blocks of 64 inputs a group; tiles: the column tiles that exist (1 or 2:
   the other's scale and wsum lie past the layer's last column, and are not read). */
void amx_grouped(const uint8_t *q, int64_t kp, int64_t pairs, const uint8_t *wb,
                 int64_t bstride, int64_t kb, int64_t gb, const float *scale,
                 const int32_t *wsum, int64_t np, int tiles, float *f) {
    int32_t cbuf[1024] __attribute__((aligned(64)));
    for (int64_t p = 0; p < pairs; p++) {
        const uint8_t *a0 = q + 32 * p * kp, *a1 = a0 + 16 * kp;
        float *fp = f + p * 16 * 32;
        for (int i = 0; i < 16 * 32; i++) fp[i] = 0.0f;
        for (int64_t g = 0, b0 = 0; b0 < kb; g++, b0 += gb) {
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (int64_t b = b0; b < b0 + gb; b++) {
                _tile_loadd(0, a0 + b * 64, kp);
                _tile_loadd(2, wb + b * 1024, 64);
                _tile_dpbusd(4, 0, 2);
                _tile_loadd(1, a1 + b * 64, kp);
                _tile_dpbusd(5, 1, 2);
                _tile_loadd(3, wb + bstride + b * 1024, 64);
                _tile_dpbusd(6, 0, 3);
                _tile_dpbusd(7, 1, 3);
            }
            /* tile 4 + h + 2 ct: rows 16 h.., columns 16 ct.. */
            _tile_stored(4, cbuf, 64);
            _tile_stored(5, cbuf + 256, 64);
            _tile_stored(6, cbuf + 512, 64);
            _tile_stored(7, cbuf + 768, 64);
            for (int ct = 0; ct < tiles; ct++) {
                const __m512i ws = _mm512_slli_epi32(
                    _mm512_loadu_si512((const void *)(wsum + g * np + 16 * ct)), 7);
                const __m512 sv = _mm512_loadu_ps(scale + g * np + 16 * ct);
                for (int h = 0; h < 2; h++) {
                    const int32_t *c = cbuf + (2 * ct + h) * 256;
                    for (int t = 0; t < 8; t++) {
                        const __m512i hv = _mm512_load_si512((const void *)(c + 32 * t));
                        const __m512i lv = _mm512_load_si512((const void *)(c + 32 * t + 16));
                        const __m512i iv = _mm512_add_epi32(
                            _mm512_slli_epi32(_mm512_sub_epi32(hv, ws), 8), lv);
                        float *dst = fp + (8 * h + t) * 32 + 16 * ct;
                        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_mul_ps(
                            _mm512_cvtepi32_ps(iv), sv)));
                    }
                }
            }
        }
    }
}
#endif
