/* Low-bit linear layers for the CPU, compiled on first use by kernels/native.py.

   Why native code: at small batch a linear layer is bound by reading its weight. torch's int8
   GEMMs read 8 bits per ternary weight; this kernel reads the 2-bit codes and unpacks them in
   registers, so a 4096 x 4096 layer streams 4 MiB instead of 16 MiB. Int8 weights run through
   the same tiles without the unpack, with per-token activation scales done in the kernel.

   Ternary weight layout ("K-blocked"): a row is KB = ceil(K / 64) blocks of 16 bytes; bits
   2s..2s+1 of byte j in block b hold the code c = w + 1 (in 0..2) of input k = 64 b + 16 s + j.
   One broadcast, one shift per 128-bit lane and one mask turn a block into 64 codes in the
   order of 64 consecutive activations. Int8 weight layout: blocks of 64 codes. Rows are stored
   in tiles of NB (see WADDR), N padded to a multiple of NB. K padding is zero weights (the
   shifted int8 activations of padding are 128, so its weights must be 0; ternary ones are
   arbitrary since its activations are 0).

   Arithmetic, exact in integers: activations are quantized per token to int8 q. The int32 sums
   of u8 x s8 products run over spans of at most SPAN blocks (255 * 127 * 65536 < 2^31) and the
   spans add up in int64, so any K is exact; the int32 per-row code sums (rsum, w_sum) bound K
   to 2^24, which native.py enforces.
   ternary: u8 codes c = w + 1 times s8 q (VNNI dpbusd, or AVX2 maddubs, which cannot saturate
            because c <= 2): sum q w = sum q c - sum q.
   int8:    u8 q + 128 times s8 w (dpbusd): sum q w = sum (q + 128) w - 128 sum w.
   mode 0 (W1.58A8, W8A8): q = rint(x / s), s = max|x| / 127; y = float(acc) * w_scale * s
            (+ bias): the reference twins' operations in their order, so results are bit-exact.
   mode 1 (float activations): x is written as 16-bit fixed point xi = rint(x / t), t = max|x| /
            32639, split into 8-bit halves xi = 256 hi + lo; both halves run through the same
            tiles and recombine exactly in int64. Error: half a step per element, t / 2.
   A token holding NaN or +-Inf gets a NaN scale (its codes are zeros), so its whole output row is
   NaN, as the reference twins define; other rows are untouched.
   Where the CPU has AMX, calls with many 8-bit rows run on its tiles instead (cpu_amx.c): the
   same int32 sums and the same epilogue, so the same floats. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <omp.h>

#include "cpu_common.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TDSL_ISA 2
#elif defined(__AVX2__)
#define TDSL_ISA 1
#else
#define TDSL_ISA 0
#endif

/* row tile, column tile, column block, K chunk (in blocks of 64) */
#ifndef MB
#if TDSL_ISA == 2
#define MB 6
#else
#define MB 2 /* AVX2 has 16 registers */
#endif
#endif
#ifndef NB
#define NB 4
#endif
#ifndef NC
#define NC 32
#endif
#ifndef KCB
#define KCB 128 /* many rows: partial sums are reduced once per chunk */
#endif
#ifndef KCB_FEW
#define KCB_FEW 32 /* few rows: a chunk of a weight tile and of the rows fit in L1 together */
#endif
#if NC % NB
#error "NC must be a multiple of NB"
#endif
#if MB > 6 || NB > 4
#error "the tiles spell out at most 6 rows and 4 columns"
#endif
#ifndef LINEAR_THREADED
/* multiply-adds from which the threads share a layer's work: below it, waking a thread costs
   more than it saves (ad hoc, a 512x512 ternary layer at M=1: 13.4 against 14.7-16.1 us) */
#define LINEAR_THREADED (1 << 20)
#endif
#ifndef KSPLIT
#define KSPLIT 1 /* one or two rows: odd K blocks into a second set of sums (tile_body) */
#endif
#ifndef PF_DIST
#define PF_DIST 8 /* chunks ahead */
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1 /* to L2: L1 holds the chunks being multiplied */
#endif
#ifndef SPAN
#define SPAN 1024 /* blocks of 64 inputs whose u8 x s8 products int32 sums hold (see above) */
#endif
#ifndef AMX_ROWS
#define AMX_ROWS 16 /* 8-bit activation rows from which AMX tiles run the layer (cpu_amx.c): ad hoc,
                       16 rows ran about 5% faster than on VNNI, at N = K = 2048 to 8192 */
#endif
#ifndef AMX_GROUP
#define AMX_GROUP (1 << 20) /* bytes of activation rows that share an unpacked weight panel */
#endif
#ifndef SMALL_ROWS
#define SMALL_ROWS 48 /* up to this many 8-bit activation rows, loop over weight tiles outside */
#endif


enum { TERNARY = 0, INT8 = 1 }; /* weight kinds */

/* The ABI version: native.py's SIGNATURES table declares this file's exported functions; bump
   both together when a signature or a layout changes, so a stale cached library is refused. */
#define TDSL_ABI 9
int tdsl_abi(void) { return TDSL_ABI; }
int tdsl_isa(void) { return TDSL_ISA; }
int tdsl_tile_rows(void) { return NB; } /* the weight layout's rows per tile */

/* Weight tiles: NB rows interleaved block by block, so a tile is one contiguous stream (the
   hardware prefetcher follows it across pages). Row j's block b of a tile starting at w: */
#define WADDR(j, b) (w + ((b) * NB + (j)) * (kind == INT8 ? 64 : 16))

static inline __attribute__((always_inline)) void tile_portable(
    const int kind, const uint8_t *w, const uint8_t *x, int64_t ldx, int64_t kb0, int64_t kb1,
    int mb, int nb, int32_t *acc, int64_t ldc) {
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            int32_t s = 0;
            for (int64_t k = kb0 * 64; k < kb1 * 64; k++)
                s += kind == INT8 ? x[i * ldx + k] * (int8_t)WADDR(j, k >> 6)[k & 63]
                                  : ((WADDR(j, k >> 6)[k & 15] >> (2 * ((k >> 4) & 3))) & 3) *
                                        (int8_t)x[i * ldx + k];
            acc[i * ldc + j] += s;
        }
}

#if TDSL_ISA == 2
/* The sums of four vectors' 16 lanes, [sum a0, sum a1, sum a2, sum a3]: about 3.5 instructions
   a sum instead of 9 one at a time, which matters when each output is one tile's only result. */
static inline __m128i reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_shuffle_i64x2(a0, a1, 0x44),
                                        _mm512_shuffle_i64x2(a0, a1, 0xee));
    const __m512i t1 = _mm512_add_epi32(_mm512_shuffle_i64x2(a2, a3, 0x44),
                                        _mm512_shuffle_i64x2(a2, a3, 0xee));
    /* 128-bit lane j now holds four partial sums of a_j */
    __m512i u = _mm512_add_epi32(_mm512_shuffle_i64x2(t0, t1, 0x88),
                                 _mm512_shuffle_i64x2(t0, t1, 0xdd));
    u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, (_MM_PERM_ENUM)0x4e));
    u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, (_MM_PERM_ENUM)0xb1));
    const __m512i pick = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(pick, u));
}
#endif

#if TDSL_ISA == 2
/* byte masks of the four 2-bit fields, one per 128-bit lane (see tile_body) */
#define FIELDS _mm512_set_epi32(0xC0C0C0C0, 0xC0C0C0C0, 0xC0C0C0C0, 0xC0C0C0C0, 0x30303030, \
    0x30303030, 0x30303030, 0x30303030, 0x0C0C0C0C, 0x0C0C0C0C, 0x0C0C0C0C, 0x0C0C0C0C, \
    0x03030303, 0x03030303, 0x03030303, 0x03030303)

/* A ternary sum vector's lanes back to their true values (field l counted 4^l times) */
static inline __m512i unscale(int kind, __m512i a) {
    if (kind == INT8) return a;
    return _mm512_srav_epi32(a, _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0));
}
#endif

/* acc[i * ldc + j] += sum over blocks kb0..kb1 of x row i . weight row j, for a mb x nb tile.
   x holds s8 activations (ternary) or u8 shifted ones (int8). With AVX-512 and va != NULL the
   sums stay vectors of 16 partial sums, va[(i * NB + j) * 16 ...], carried from K chunk to K
   chunk and reduced once at the end (see flush): a reduction per chunk would cost more. */
static inline __attribute__((always_inline)) void tile_body(
    const int kind, const uint8_t *w, const uint8_t *x, int64_t ldx, int64_t kb0,
    int64_t kb1, const int mb, const int nb, int32_t *acc, int64_t ldc, const uint8_t *pf,
    int32_t *va) {
#if TDSL_ISA == 2
    /* Named accumulators, not an array: GCC 12 shuffles and spills an array of __m512i. With mb
       and nb constant, the conditions fold away. */
    /* Ternary codes stay where they are in their byte: 128-bit lane l of the broadcast block
       keeps field l (mask 3 << 2l), worth 4^l times the code. One AND a vector instead of a
       shift and an AND; each int32 lane of a sum then holds 4^l times its true value, an exact
       multiple that unscale() shifts back (at most 128 * 128 * 4 a block, far inside int32
       over a SPAN). */
    const __m512i mask = kind == INT8 ? _mm512_set1_epi8(3) : FIELDS;
#define VA(i, j) ((void *)(va + ((i) * NB + (j)) * 16))
#define START(i, j) (va && mb > i && nb > j ? _mm512_load_si512(VA(i, j)) : _mm512_setzero_si512())
#define ROW_VARS(i) __m512i a##i##0 = START(i, 0), a##i##1 = START(i, 1), \
    a##i##2 = START(i, 2), a##i##3 = START(i, 3);
    ROW_VARS(0) ROW_VARS(1) ROW_VARS(2) ROW_VARS(3) ROW_VARS(4) ROW_VARS(5)
#define CODES(j) (nb <= j ? mask : kind == INT8 ? \
    _mm512_loadu_si512((const void *)WADDR(j, b)) : \
    _mm512_and_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)WADDR(j, b))), \
                     mask))
#define DOT(a, c, xv) (kind == INT8 ? _mm512_dpbusd_epi32(a, xv, c) : _mm512_dpbusd_epi32(a, c, xv))
#define ROW_INTO(i, s) if (mb > i) { \
        __m512i xv = _mm512_loadu_si512((const void *)(x + i * ldx + b * 64)); \
        __asm__("" : "+v"(xv)); /* one load, not one folded into each dpbusd */ \
        s##i##0 = DOT(s##i##0, c0, xv); \
        if (nb > 1) s##i##1 = DOT(s##i##1, c1, xv); \
        if (nb > 2) s##i##2 = DOT(s##i##2, c2, xv); \
        if (nb > 3) s##i##3 = DOT(s##i##3, c3, xv); }
#define ROW_STEP(i) ROW_INTO(i, a)
#define PREFETCH() if (pf) /* the weight stream ahead (see tdsl_linear) */ \
        for (int l = 0; l < (kind == INT8 ? NB : (NB + 3) / 4); l++) /* 64-byte lines */ \
            _mm_prefetch((const char *)(pf + b * NB * (kind == INT8 ? 64 : 16) + l * 64), \
                         PF_HINT);
    int64_t b = kb0;
#if KSPLIT
    if (mb <= 2) {
        /* One or two rows (M = 1; float activations are two): 4 or 8 chains of dpbusd, each
           waiting for the one before (5 cycles), would set the pace of a 2-bit weight stream.
           Odd blocks go to a second set of sums, added at the end. */
        __m512i e00 = _mm512_setzero_si512(), e01 = e00, e02 = e00, e03 = e00, e10 = e00,
                e11 = e00, e12 = e00, e13 = e00;
#define KBLOCK(s) { /* block b into sums s */ \
            PREFETCH() \
            const __m512i c0 = CODES(0), c1 = CODES(1), c2 = CODES(2), c3 = CODES(3); \
            ROW_INTO(0, s) ROW_INTO(1, s) }
        for (; b + 2 <= kb1; b++) { /* block b, then b + 1 */
            KBLOCK(a)
            b++;
            KBLOCK(e)
        }
#define JOIN(i, j) a##i##j = _mm512_add_epi32(a##i##j, e##i##j);
        JOIN(0, 0) JOIN(0, 1) JOIN(0, 2) JOIN(0, 3) JOIN(1, 0) JOIN(1, 1) JOIN(1, 2) JOIN(1, 3)
    }
#endif
    for (; b < kb1; b++) {
        PREFETCH()
        const __m512i c0 = CODES(0), c1 = CODES(1), c2 = CODES(2), c3 = CODES(3);
        ROW_STEP(0) ROW_STEP(1) ROW_STEP(2) ROW_STEP(3)
        ROW_STEP(4) ROW_STEP(5)
    }
#define OUT(i, j, a) if (mb > i && nb > j) { \
        if (va) _mm512_store_si512(VA(i, j), a); \
        else acc[i * ldc + j] += _mm512_reduce_add_epi32(unscale(kind, a)); }
#define ROW_OUT(i) if (mb > i && nb == 4 && !va) { \
        __m128i *dst = (__m128i *)(acc + i * ldc); \
        _mm_storeu_si128(dst, _mm_add_epi32(_mm_loadu_si128(dst), reduce4( \
            unscale(kind, a##i##0), unscale(kind, a##i##1), unscale(kind, a##i##2), \
            unscale(kind, a##i##3)))); \
    } else { OUT(i, 0, a##i##0) OUT(i, 1, a##i##1) OUT(i, 2, a##i##2) OUT(i, 3, a##i##3) }
    ROW_OUT(0) ROW_OUT(1) ROW_OUT(2) ROW_OUT(3) ROW_OUT(4) ROW_OUT(5)
#elif TDSL_ISA == 1
    (void)pf;
    (void)va;
    if (kind == INT8) { /* maddubs would saturate u8 x s8 pairs; the portable loop is exact */
        tile_portable(kind, w, x, ldx, kb0, kb1, mb, nb, acc, ldc);
        return;
    }
    /* Sixteen registers: two rows at a time, each block in two halves of 32 codes, named
       accumulators (as above). maddubs pairs cannot saturate: codes are at most 2. */
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < mb; r += 2) {
        const int two = mb - r > 1;
        const uint8_t *x0 = x + r * ldx, *x1 = x0 + ldx;
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00,
                a11 = a00, a12 = a00, a13 = a00;
#define CODES2(j, sh) (nb > j ? _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256( \
    _mm_loadu_si128((const __m128i *)WADDR(j, b))), sh), three) : three)
#define DOT2(a, c, xv) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones))
#define COL2(j, sh, a0, a1) if (nb > j) { \
                const __m256i c = CODES2(j, sh); \
                DOT2(a0, c, xa); \
                if (two) DOT2(a1, c, xb); }
#define HALF(h, sh) { /* one code vector live at a time: 8 sums + 2 rows + 1 codes fit */ \
            const __m256i xa = _mm256_loadu_si256((const __m256i *)(x0 + b * 64 + 32 * h)); \
            const __m256i xb = two ? _mm256_loadu_si256( \
                (const __m256i *)(x1 + b * 64 + 32 * h)) : xa; \
            COL2(0, sh, a00, a10) COL2(1, sh, a01, a11) COL2(2, sh, a02, a12) \
            COL2(3, sh, a03, a13) }
        for (int64_t b = kb0; b < kb1; b++) {
            HALF(0, _mm256_set_epi64x(2, 2, 0, 0))
            HALF(1, _mm256_set_epi64x(6, 6, 4, 4))
        }
        const __m256i out[2][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}};
        for (int i = 0; i < 1 + two; i++)
            for (int j = 0; j < nb; j++) {
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(out[i][j]),
                                          _mm256_extracti128_si256(out[i][j], 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
                acc[(r + i) * ldc + j] += _mm_cvtsi128_si32(t);
            }
    }
#else
    (void)pf;
    (void)va;
    tile_portable(kind, w, x, ldx, kb0, kb1, mb, nb, acc, ldc);
#endif
}

/* acc[i * ldc + j] += the sum of va's 16 partial sums, for rows i < mb and columns j < nb */
static void flush(int kind, const int32_t *va, int64_t mb, int nb, int32_t *acc, int64_t ldc) {
    for (int64_t i = 0; i < mb; i++) {
#if TDSL_ISA == 2
        const __m512i *v = (const __m512i *)(va + i * NB * 16);
        if (nb == 4) {
            __m128i *dst = (__m128i *)(acc + i * ldc);
            _mm_storeu_si128(dst, _mm_add_epi32(_mm_loadu_si128(dst), reduce4(
                unscale(kind, v[0]), unscale(kind, v[1]), unscale(kind, v[2]),
                unscale(kind, v[3]))));
            continue;
        }
        for (int j = 0; j < nb; j++)
            acc[i * ldc + j] += _mm512_reduce_add_epi32(unscale(kind, v[j]));
#else
        (void)kind;
        for (int j = 0; j < nb; j++) {
            int32_t s = 0;
            for (int l = 0; l < 16; l++) s += va[(i * NB + j) * 16 + l];
            acc[i * ldc + j] += s;
        }
#endif
    }
}

/* tile_body with kind, mb and nb as compile-time constants, so the accumulators live in
   registers */
#define TILE(K, I, J) static void tile_##K##_##I##_##J(const uint8_t *w, \
    const uint8_t *x, int64_t ldx, int64_t kb0, int64_t kb1, int32_t *acc, int64_t ldc, \
    const uint8_t *pf, int32_t *va) { \
    tile_body(K, w, x, ldx, kb0, kb1, I, J, acc, ldc, pf, va); }
#define TILE_ROW(K, I) TILE(K, I, 1) TILE(K, I, 2) TILE(K, I, 3) TILE(K, I, 4)
#define TILE_KIND(K) TILE_ROW(K, 1) TILE_ROW(K, 2) TILE_ROW(K, 3) TILE_ROW(K, 4) \
    TILE_ROW(K, 5) TILE_ROW(K, 6)
TILE_KIND(0) TILE_KIND(1)
typedef void (*tile_fn)(const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, int32_t *,
                        int64_t, const uint8_t *, int32_t *);
#define TILE_FNS(K, I) {tile_##K##_##I##_1, tile_##K##_##I##_2, tile_##K##_##I##_3, \
    tile_##K##_##I##_4}
#define TILE_TABLE(K) {TILE_FNS(K, 1), TILE_FNS(K, 2), TILE_FNS(K, 3), TILE_FNS(K, 4), \
    TILE_FNS(K, 5), TILE_FNS(K, 6)}
static const tile_fn TILES[2][6][4] = {TILE_TABLE(0), TILE_TABLE(1)};

/* max |x| over x [n], as the bits of an fp32: for floats without sign, integer order is float
   order and NaN and Inf sort above every finite value, so one integer max (which vectorizes; a
   float max does not without -ffast-math) finds both the max and a non-finite value (the
   result is then >= 0x7f800000). Also cpu_conv_amx.c's. */
uint32_t abs_max_bits(const float *x, int64_t n) {
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        u &= 0x7fffffffu;
        top = u > top ? u : top;
    }
    return top;
}

/* Quantize one token x [k] into kp-byte row(s) of q, zero-padded (int8 kind: shifted by 128);
   rsum gets each row's sum of signed codes (used by the ternary correction). Returns the scale:
   NaN for a token holding NaN or +-Inf, whose codes are then zeros (rounding NaN to an integer
   is undefined behaviour in C). */
static float quantize_row(const float *x, int64_t k, int64_t kp, int kind, int mode, uint8_t *q,
                          int32_t *rsum) {
    const int shift = kind == INT8 ? 128 : 0;
    const uint32_t top = abs_max_bits(x, k);
    float amax;
    memcpy(&amax, &top, 4);
    if (top >= 0x7f800000u) { /* NaN or +-Inf */
        memset(q, shift, (size_t)kp);
        if (mode != 0) memset(q + kp, 0, (size_t)kp);
        rsum[0] = 0;
        if (mode != 0) rsum[1] = 0;
        return NAN;
    }
    if (mode == 0) {
        float s = amax > 0.0f ? amax / 127.0f : 1.0f;
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++) {
            float r = rintf(x[i] / s);
            int v = r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r;
            q[i] = (uint8_t)(v + shift);
            sum += v;
        }
        memset(q + k, shift, (size_t)(kp - k));
        rsum[0] = sum;
        return s;
    }
    /* ternary: hi, lo both s8 with lo in [-128, 127]; int8: hi + 128 and lo in [0, 255], u8 */
    float t = amax > 0.0f ? amax / 32639.0f : 1.0f;
    uint8_t *hi = q, *lo = q + kp;
    int32_t shi = 0, slo = 0;
    for (int64_t i = 0; i < k; i++) {
        float r = rintf(x[i] / t);
        int xi = r > 32639.0f ? 32639 : r < -32639.0f ? -32639 : (int)r;
        int l = kind == INT8 ? (xi & 255) : ((xi + 128) & 255) - 128;
        int h = (xi - l) / 256; /* exact: xi - l is a multiple of 256 */
        hi[i] = (uint8_t)(h + shift);
        lo[i] = (uint8_t)l;
        shi += h;
        slo += l;
    }
    memset(hi + k, shift, (size_t)(kp - k));
    memset(lo + k, 0, (size_t)(kp - k));
    rsum[0] = shi;
    rsum[1] = slo;
    return t;
}

/* The outputs of tokens i0..i1 and columns n0..n0 + nc from their integer sums: those of
   8-bit row r (counted from token i0's first) and column j at acc[r * rs + j * cs] (or acc64,
   when K took several spans), per 8-bit rows a token. */
static inline __attribute__((always_inline)) void finish(
    int kind, int per, int64_t i0, int64_t i1, int64_t n0, int64_t nc, const int32_t *acc,
    const int64_t *acc64, int64_t rs, int64_t cs, const int32_t *w_sum, const int32_t *rsum,
    const float *w_scale, const float *xs, const float *bias, float *y, int64_t n) {
#define SUM(r) (acc64 ? acc64[r] : (int64_t)acc[r])
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = 0; j < nc; j++) {
            const int64_t r = (i - i0) * per * rs + j * cs;
            /* undo the offsets: ternary codes are w + 1, int8 activations (and the high half)
               are q + 128 */
            int64_t v = kind == INT8 ? SUM(r) - 128 * (int64_t)w_sum[n0 + j]
                                     : SUM(r) - rsum[i * per];
            if (per == 2) v = 256 * v + SUM(r + rs) - (kind == INT8 ? 0 : rsum[i * per + 1]);
            float o = (float)v * w_scale[n0 + j] * xs[i];
            y[i * n + n0 + j] = bias ? o + bias[n0 + j] : o;
        }
#undef SUM
}

#if defined(TDSL_AMX) && NC == 32 /* its tiles are 32 columns */
#define AMX_ON 1
#endif

/* 1 when AMX tiles run this library's many-row layers: built in, and granted by Linux (asked
   on the first call) */
int tdsl_amx(void) {
#ifdef AMX_ON
    return amx_permitted();
#else
    return 0;
#endif
}

#ifdef AMX_ON
/* Activation rows a group of the AMX paths holds: AMX_GROUP bytes of them (so they stay in L2
   while every block of columns reads them), whole pairs of row tiles, at most all `padded`. */
static int64_t amx_group_rows(int64_t kp, int64_t padded) {
    const int64_t rows = AMX_GROUP / kp / 32 * 32;
    return rows < 32 ? 32 : rows > padded ? padded : rows;
}

/* The many-row path on AMX tiles (cpu_amx.c): rows in groups whose activations stay in L2
   (AMX_GROUP bytes), and for each group, per block of 32 columns, the weight unpacked once into
   A tiles that every row tile of the group reuses. Every thread's scratch is allocated before
   the threads start, so none can fail inside. Returns 0, or -1 without scratch memory. */
static int linear_amx(int kind, const uint8_t *q, int64_t m, int per, int64_t kb,
                      const uint8_t *w, int64_t n, int64_t tile_bytes, const float *w_scale,
                      const int32_t *w_sum, const int32_t *rsum, const float *xs,
                      const float *bias, float *y, int threads) {
    const int64_t kp = kb * 64, rows = m * per, padded = (rows + 31) / 32 * 32;
    const int64_t rows_g = amx_group_rows(kp, padded), blocks = (n + NC - 1) / NC;
    const size_t acc_bytes = sizeof(int32_t) * (size_t)(rows_g * NC), panel_bytes = NC * kp;
    uint8_t *qv = aligned_alloc(64, (size_t)(padded * kp));
    uint8_t *scratch = aligned_alloc(64, (size_t)threads * (acc_bytes + panel_bytes));
    if (!qv || !scratch) {
        free(qv);
        free(scratch);
        return -1;
    }
    amx_activations(q, rows, padded, kp, qv, threads);
#pragma omp parallel num_threads(threads) if (rows * n * kp >= LINEAR_THREADED)
    {
        uint8_t *mine = scratch + (size_t)omp_get_thread_num() * (acc_bytes + panel_bytes);
        int32_t *acc = (int32_t *)mine;
        uint8_t *panel = mine + acc_bytes;
        amx_begin();
        for (int64_t g0 = 0; g0 < padded; g0 += rows_g) {
            const int64_t g1 = g0 + rows_g < padded ? g0 + rows_g : padded;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++) {
                const int64_t n0 = blk * NC, nc = n - n0 < NC ? n - n0 : NC;
                amx_panel(kind == TERNARY, w, NB, tile_bytes, n, n0, kb, panel);
                amx_sums(kind == TERNARY, panel, qv + g0 * kp, (g1 - g0) / 32, kb, acc, NC);
                const int64_t t1 = g1 / per < m ? g1 / per : m;
                finish(kind, per, g0 / per, t1, n0, nc, acc, NULL, NC, 1, w_sum, rsum, w_scale,
                       xs, bias, y, n);
            }
        }
        amx_end();
    }
    free(qv);
    free(scratch);
    return 0;
}
#endif

/* y [M, N] = x [M, K] (row stride ldx) times the weight [N, ...] in kind's layout, scaled per
   output channel (w_scale), + bias (may be NULL). w_sum: the int8 kind's per-row code sums.
   Returns 0, or -1 when scratch memory cannot be allocated. */
static int linear(int kind, const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                  int64_t n, const float *w_scale, const int32_t *w_sum, const float *bias,
                  int mode, float *y, int threads) {
    const int64_t kb = (k + 63) / 64, kp = kb * 64;
    const int64_t stride = NB * (kind == INT8 ? 64 : 16); /* bytes per block of a tile */
    const int64_t tile_bytes = kb * stride, w_bytes = (n + NB - 1) / NB * tile_bytes;
    const int per = mode == 0 ? 1 : 2; /* 8-bit rows per token */
    const int64_t rows = m * per;
    uint8_t *q = aligned_alloc(64, (size_t)(rows * kp));
    int32_t *rsum = malloc(sizeof(int32_t) * (size_t)rows);
    float *xs = malloc(sizeof(float) * (size_t)m);
    int failed = !q || !rsum || !xs;
    if (!failed) {
#pragma omp parallel for num_threads(threads) schedule(static) if (m >= 16)
        for (int64_t i = 0; i < m; i++)
            xs[i] = quantize_row(x + i * ldx, k, kp, kind, mode, q + i * per * kp,
                                 rsum + i * per);

#ifdef AMX_ON
        if (rows >= AMX_ROWS && kb <= SPAN && tdsl_amx()) {
            const int rc = linear_amx(kind, q, m, per, kb, w, n, tile_bytes, w_scale, w_sum,
                                      rsum, xs, bias, y, threads);
            free(q);
            free(rsum);
            free(xs);
            return rc;
        }
#endif
        const int64_t blocks = (n + NC - 1) / NC;
#pragma omp parallel num_threads(threads) if (rows * n * kp >= LINEAR_THREADED)
        {
            int32_t *acc = malloc(sizeof(int32_t) * (size_t)(rows * NC));
            /* K longer than one span: each span's int32 sums are added up here */
            int64_t *acc64 = kb > SPAN ? malloc(sizeof(int64_t) * (size_t)(rows * NC)) : NULL;
            /* vector partial sums for one weight tile (few rows, AVX-512) */
            const int vector = TDSL_ISA == 2 && rows <= SMALL_ROWS;
            int32_t *va = vector ? aligned_alloc(64, (size_t)(rows * NB * 64)) : NULL;
            const int ok = acc && (!vector || va) && (kb <= SPAN || acc64);
            if (!ok) {
#pragma omp atomic write
                failed = 1;
            }
            {
                /* every thread meets the loop, also one without scratch (the call fails then) */
#pragma omp for schedule(static)
                for (int64_t nbk = 0; nbk < blocks; nbk++) {
                    if (!ok) continue;
                    const int64_t n0 = nbk * NC, nc = n - n0 < NC ? n - n0 : NC;
                    if (acc64) memset(acc64, 0, sizeof(int64_t) * (size_t)(rows * NC));
                    for (int64_t s0 = 0; s0 < kb; s0 += SPAN) {
                        const int64_t s1 = kb - s0 < SPAN ? kb : s0 + SPAN;
                        memset(acc, 0, sizeof(int32_t) * (size_t)(rows * NC));
                        if (rows <= SMALL_ROWS) {
                            /* few rows: a K chunk of a weight tile is read from memory once and
                               reused from L1 by every row tile; meanwhile the next chunk (the
                               weight is one contiguous stream) is prefetched */
                            for (int64_t j0 = 0; j0 < nc; j0 += NB) {
                                const uint8_t *wt = w + (n0 + j0) / NB * tile_bytes;
                                const int cols = nc - j0 < NB ? (int)(nc - j0) : NB;
                                if (va) memset(va, 0, (size_t)(rows * NB * 64));
                                for (int64_t k0 = s0; k0 < s1; k0 += KCB_FEW) {
                                    const int64_t k1 = k0 + KCB_FEW < s1 ? k0 + KCB_FEW : s1;
                                    /* block b of the chunk prefetches pf + b * stride, which must
                                       stay inside the weight */
                                    const int more = (wt - w) + (PF_DIST * KCB_FEW + k1) *
                                                     stride <= w_bytes;
                                    const uint8_t *pf = more ?
                                        wt + PF_DIST * KCB_FEW * stride : NULL;
                                    for (int64_t i0 = 0; i0 < rows; i0 += MB)
                                        TILES[kind][(rows - i0 < MB ? rows - i0 : MB) - 1]
                                             [cols - 1](
                                            wt, q + i0 * kp, kp, k0, k1, acc + i0 * NC + j0, NC,
                                            pf, va ? va + i0 * NB * 16 : NULL);
                                }
                                if (va) flush(kind, va, rows, cols, acc + j0, NC);
                            }
                        } else {
                            /* many rows: an activation tile stays in L1 across the column tiles,
                               the column block's weights in L2 across the row tiles; the second
                               row tile prefetches the next column block */
                            for (int64_t k0 = s0; k0 < s1; k0 += KCB) {
                                const int64_t k1 = k0 + KCB < s1 ? k0 + KCB : s1;
                                for (int64_t i0 = 0; i0 < rows; i0 += MB)
                                    for (int64_t j0 = 0; j0 < nc; j0 += NB) {
                                        const uint8_t *wt = w + (n0 + j0) / NB * tile_bytes;
                                        const int fetch = i0 == MB && n0 + NC + j0 < n;
                                        TILES[kind][(rows - i0 < MB ? rows - i0 : MB) - 1]
                                             [(nc - j0 < NB ? nc - j0 : NB) - 1](
                                            wt, q + i0 * kp, kp, k0, k1, acc + i0 * NC + j0, NC,
                                            fetch ? wt + NC / NB * tile_bytes : NULL, NULL);
                                    }
                            }
                        }
                        if (acc64)
                            for (int64_t r = 0; r < rows * NC; r++) acc64[r] += acc[r];
                    }
                    finish(kind, per, 0, m, n0, nc, acc, acc64, NC, 1, w_sum, rsum, w_scale, xs,
                           bias, y, n);
                }
            }
            free(acc);
            free(acc64);
            free(va);
        }
    }
    free(q);
    free(rsum);
    free(xs);
    return failed ? -1 : 0;
}

/* Nanoseconds spent in tdsl_linear since the library loaded (two clock reads a call): the
   decode benchmark's account of a step, weights against the rest, also where the calls come
   from native code (cpu_decode.c). */
static int64_t linear_ns;

static int64_t now_ns(void) {
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int tdsl_linear(int kind, const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                int64_t n, const float *w_scale, const int32_t *w_sum, const float *bias,
                int mode, float *y, int threads) {
    const int64_t t0 = now_ns();
    const int rc = linear(kind, x, m, k, ldx, w, n, w_scale, w_sum, bias, mode, y, threads);
    __atomic_fetch_add(&linear_ns, now_ns() - t0, __ATOMIC_RELAXED);
    return rc;
}

int tdsl_linear_clock(int64_t *ns) {
    *ns = __atomic_load_n(&linear_ns, __ATOMIC_RELAXED);
    return 0;
}

/* ---- Grouped int8 weights (per-group scales: W8A16, W4A16) ----------------------------------
   Per-group scales must be applied to each group's integer sum, so here the columns, not K, run
   along the vector: a register holds 16 columns, and one dpbusd adds four inputs of a token
   (broadcast) times four codes of each of 16 columns. Layout: tiles of 16 columns, for each
   group of four inputs (a "quad") 64 bytes, byte 4 c + r = w[16 t + c, 4 quad + r]. Float
   activations only (16-bit fixed point, as above); per group the exact int32 sum
   256 (sum hi w) + sum lo w is scaled and added in fp32. int32 holds it for groups <= 256.
   Codes in [-8, 7] (4-bit weights) may instead be stored as nibbles, 32 bytes a quad: byte j
   holds codes j and j + 32 of the 64, each plus 8, in its low and high half. */
#define GT 2  /* tokens per tile (the macros below spell out two) */
#define GNV 4 /* 16-column vectors per tile (likewise four) */

static inline __attribute__((always_inline)) void gtile_body(
    const int nib, const uint8_t *w, int64_t vstride, const uint8_t *q, int64_t kp,
    const int tokens, const int nv, int64_t kq, int64_t group_q, const float *scale,
    const int32_t *wsum, int64_t np, float *out) {
#if TDSL_ISA == 2
#define GV(t) __m512 f##t##0 = _mm512_setzero_ps(), f##t##1 = f##t##0, f##t##2 = f##t##0, \
    f##t##3 = f##t##0;
    GV(0) GV(1)
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi8(8);
#define G_NIBBLES(p) _mm512_sub_epi8(_mm512_inserti64x4(_mm512_castsi256_si512( \
        _mm256_and_si256(p, low4)), _mm256_and_si256(_mm256_srli_epi16(p, 4), low4), 1), eight)
#define G_LOAD(v) (nv <= v ? _mm512_setzero_si512() : nib ? \
    G_NIBBLES(_mm256_loadu_si256((const __m256i *)(w + v * vstride + qq * 32))) : \
    _mm512_loadu_si512((const void *)(w + v * vstride + qq * 64)))
#define G_STEP(t) if (tokens > t) { \
        int32_t bh, bl; \
        memcpy(&bh, q + (2 * t) * kp + 4 * qq, 4); \
        memcpy(&bl, q + (2 * t + 1) * kp + 4 * qq, 4); \
        const __m512i xh = _mm512_set1_epi32(bh), xl = _mm512_set1_epi32(bl); \
        h##t##0 = _mm512_dpbusd_epi32(h##t##0, xh, w0); \
        l##t##0 = _mm512_dpbusd_epi32(l##t##0, xl, w0); \
        if (nv > 1) { h##t##1 = _mm512_dpbusd_epi32(h##t##1, xh, w1); \
                      l##t##1 = _mm512_dpbusd_epi32(l##t##1, xl, w1); } \
        if (nv > 2) { h##t##2 = _mm512_dpbusd_epi32(h##t##2, xh, w2); \
                      l##t##2 = _mm512_dpbusd_epi32(l##t##2, xl, w2); } \
        if (nv > 3) { h##t##3 = _mm512_dpbusd_epi32(h##t##3, xh, w3); \
                      l##t##3 = _mm512_dpbusd_epi32(l##t##3, xl, w3); } }
/* undo the high half's +128, recombine the halves, scale, accumulate in fp32 */
#define G_FOLD(t, v) if (tokens > t && nv > v) { \
        const __m512i ws = _mm512_loadu_si512((const void *)(wsum + g * np + v * 16)); \
        const __m512i iv = _mm512_add_epi32(_mm512_slli_epi32( \
            _mm512_sub_epi32(h##t##v, _mm512_slli_epi32(ws, 7)), 8), l##t##v); \
        f##t##v = _mm512_add_ps(f##t##v, _mm512_mul_ps(_mm512_cvtepi32_ps(iv), \
                                _mm512_loadu_ps(scale + g * np + v * 16))); }
    for (int64_t g0 = 0, g = 0; g0 < kq; g0 += group_q, g++) {
        __m512i h00 = _mm512_setzero_si512(), h01 = h00, h02 = h00, h03 = h00, h10 = h00,
                h11 = h00, h12 = h00, h13 = h00, l00 = h00, l01 = h00, l02 = h00, l03 = h00,
                l10 = h00, l11 = h00, l12 = h00, l13 = h00;
        for (int64_t qq = g0; qq < g0 + group_q; qq++) {
            const __m512i w0 = G_LOAD(0), w1 = G_LOAD(1), w2 = G_LOAD(2), w3 = G_LOAD(3);
            G_STEP(0) G_STEP(1)
        }
        G_FOLD(0, 0) G_FOLD(0, 1) G_FOLD(0, 2) G_FOLD(0, 3)
        G_FOLD(1, 0) G_FOLD(1, 1) G_FOLD(1, 2) G_FOLD(1, 3)
    }
#define G_OUT(t, v) if (tokens > t && nv > v) _mm512_storeu_ps(out + t * GNV * 16 + v * 16, f##t##v);
    G_OUT(0, 0) G_OUT(0, 1) G_OUT(0, 2) G_OUT(0, 3) G_OUT(1, 0) G_OUT(1, 1) G_OUT(1, 2) G_OUT(1, 3)
#else
    for (int t = 0; t < tokens; t++)
        for (int c = 0; c < nv * 16; c++) {
            const uint8_t *col = w + (c / 16) * vstride;
            float f = 0.0f;
            for (int64_t g0 = 0, g = 0; g0 < kq; g0 += group_q, g++) {
                int32_t h = 0, l = 0;
                for (int64_t k = 4 * g0; k < 4 * (g0 + group_q); k++) {
                    const int j = (c % 16) * 4 + (int)(k % 4); /* byte of the 64 in a quad */
                    const int code = nib ? ((col[(k / 4) * 32 + j % 32] >> (j / 32 * 4)) & 15) - 8
                                         : (int8_t)col[(k / 4) * 64 + j];
                    h += q[(2 * t) * kp + k] * code;
                    l += q[(2 * t + 1) * kp + k] * code;
                }
                const int32_t iv = 256 * (h - 128 * wsum[g * np + c]) + l;
                f = f + (float)iv * scale[g * np + c];
            }
            out[t * GNV * 16 + c] = f;
        }
#endif
}

#define GTILE(N, T, V) static void gtile_##N##_##T##_##V(const uint8_t *w, int64_t vstride, \
    const uint8_t *q, int64_t kp, int64_t kq, int64_t group_q, const float *scale, \
    const int32_t *wsum, int64_t np, float *out) { \
    gtile_body(N, w, vstride, q, kp, T, V, kq, group_q, scale, wsum, np, out); }
#define GTILE_N(N) GTILE(N, 1, 1) GTILE(N, 1, 2) GTILE(N, 1, 3) GTILE(N, 1, 4) \
    GTILE(N, 2, 1) GTILE(N, 2, 2) GTILE(N, 2, 3) GTILE(N, 2, 4)
GTILE_N(0) GTILE_N(1)
typedef void (*gtile_fn)(const uint8_t *, int64_t, const uint8_t *, int64_t, int64_t, int64_t,
                         const float *, const int32_t *, int64_t, float *);
#define GTILE_TABLE(N) {{gtile_##N##_1_1, gtile_##N##_1_2, gtile_##N##_1_3, gtile_##N##_1_4}, \
                        {gtile_##N##_2_1, gtile_##N##_2_2, gtile_##N##_2_3, gtile_##N##_2_4}}
static const gtile_fn GTILES[2][2][4] = {GTILE_TABLE(0), GTILE_TABLE(1)};

#ifdef AMX_ON
/* The grouped kernel on AMX tiles (cpu_amx.c's amx_grouped), for groups of whole 64-input
   blocks: rows in groups whose activations stay in L2 (AMX_GROUP bytes), and for each, per
   block of 32 columns, the results of every pair of row tiles. q holds `padded` rows (zero past
   2 m). Every thread's scratch is allocated before the threads start. Returns 0, or -1 without
   scratch memory. */
static int grouped_amx(const uint8_t *q, int64_t m, int64_t padded, int64_t kp,
                       const uint8_t *w, int nib, int64_t n, int64_t np, int64_t vstride,
                       int64_t group, const float *scale, const int32_t *wsum, const float *xs,
                       const float *bias, float *y, int threads) {
    const int64_t kb = kp / 64, tiles = np / 16, blocks = (tiles + 1) / 2;
    const int64_t rows_g = amx_group_rows(kp, padded);
    const size_t panel_bytes = (size_t)(kb * 2048);
    const size_t f_bytes = sizeof(float) * (size_t)(rows_g * 16);
    uint8_t *scratch = aligned_alloc(64, (size_t)threads * (panel_bytes + f_bytes));
    if (!scratch)
        return -1;
#pragma omp parallel num_threads(threads) if (2 * m * np * kp >= LINEAR_THREADED)
    {
        uint8_t *panel = scratch + (size_t)omp_get_thread_num() * (panel_bytes + f_bytes);
        float *f = (float *)(panel + panel_bytes);
        amx_begin();
        for (int64_t g0 = 0; g0 < padded; g0 += rows_g) {
            const int64_t g1 = g0 + rows_g < padded ? g0 + rows_g : padded;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++) {
                const int64_t v = 2 * blk;
                const int both = v + 1 < tiles;
                const uint8_t *wb = w + v * vstride;
                int64_t bstride = vstride;
                if (nib || !both) { /* bytes of two whole tiles are B tiles as they lie */
                    amx_group_panel(wb, nib, vstride, both ? 2 : 1, kb, panel);
                    wb = panel;
                    bstride = kb * 1024;
                }
                amx_grouped(q + g0 * kp, kp, (g1 - g0) / 32, wb, bstride, kb, group / 64,
                            scale + v * 16, wsum + v * 16, np, both ? 2 : 1, f);
                for (int64_t t = g0 / 2; t < g1 / 2 && t < m; t++)
                    for (int64_t j = 0; j < 32 && v * 16 + j < n; j++) {
                        const float o = f[(t - g0 / 2) * 32 + j] * xs[t];
                        y[t * n + v * 16 + j] = bias ? o + bias[v * 16 + j] : o;
                    }
            }
        }
        amx_end();
    }
    free(scratch);
    return 0;
}
#endif

/* y [M, N] = x [M, K] times grouped int8 weights (layout above, bytes or nibbles (nib), N
   padded to np = 16 * tiles), scale and wsum [K / group, np] (per-group scales and code sums),
   + bias (may be NULL). Returns 0, or -1 when scratch memory cannot be allocated. */
int tdsl_grouped_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                        int nib, int64_t n, int64_t group, const float *scale,
                        const int32_t *wsum, const float *bias, float *y, int threads) {
    const int64_t kp = (k + 63) / 64 * 64, kq = k / 4, np = (n + 15) / 16 * 16;
    const int64_t vstride = kq * (nib ? 32 : 64), tiles = (np / 16 + GNV - 1) / GNV;
#ifdef AMX_ON
    /* AMX for groups of whole 64-input blocks: its A tiles read 32 rows at a time */
    const int amx = 2 * m >= AMX_ROWS && group % 64 == 0 && kp == k && tdsl_amx();
#else
    const int amx = 0;
#endif
    const int64_t padded = amx ? (2 * m + 31) / 32 * 32 : 2 * m;
    uint8_t *q = aligned_alloc(64, (size_t)(padded * kp));
    int32_t *rsum = malloc(sizeof(int32_t) * (size_t)(2 * m));
    float *xs = malloc(sizeof(float) * (size_t)m);
    int failed = !q || !rsum || !xs;
    if (!failed) {
#pragma omp parallel for num_threads(threads) schedule(static) if (m >= 16)
        for (int64_t i = 0; i < m; i++)
            xs[i] = quantize_row(x + i * ldx, k, kp, INT8, 1, q + 2 * i * kp, rsum + 2 * i);
#ifdef AMX_ON
        if (amx) {
            memset(q + 2 * m * kp, 0, (size_t)((padded - 2 * m) * kp));
            failed = grouped_amx(q, m, padded, kp, w, nib, n, np, vstride, group, scale, wsum,
                                 xs, bias, y, threads) != 0;
            free(q);
            free(rsum);
            free(xs);
            return failed ? -1 : 0;
        }
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ct = 0; ct < tiles; ct++) {
            const int64_t v0 = ct * GNV;
            const int nv = np / 16 - v0 < GNV ? (int)(np / 16 - v0) : GNV;
            float out[GT * GNV * 16];
            for (int64_t t0 = 0; t0 < m; t0 += GT) {
                const int tokens = m - t0 < GT ? (int)(m - t0) : GT;
                GTILES[nib != 0][tokens - 1][nv - 1](w + v0 * vstride, vstride, q + 2 * t0 * kp, kp, kq,
                                           group / 4, scale + v0 * 16, wsum + v0 * 16, np, out);
                for (int t = 0; t < tokens; t++)
                    for (int c = 0; c < nv * 16 && v0 * 16 + c < n; c++) {
                        const float o = out[t * GNV * 16 + c] * xs[t0 + t];
                        y[(t0 + t) * n + v0 * 16 + c] = bias ? o + bias[v0 * 16 + c] : o;
                    }
            }
        }
    }
    free(q);
    free(rsum);
    free(xs);
    return failed ? -1 : 0;
}

/* Static int8 activations for the int8 convolution (kernels/cpu_conv.py), in one pass: codes
   clamp(nearbyint(x / scale) + zp, lo, hi) as uint8, x / scale rounded half to even exactly as
   the runtime's static quantizer (torch.round(x / s)) does, so the codes are identical. Returns
   1 when x holds a NaN (no uint8 stands for it: the caller takes its float path), else 0.
   quantize_u8_span is one thread's loop; cpu_qconv.c calls it per image row. */
int quantize_u8_span(const float *x, int64_t n, float scale, int zp, int lo, int hi,
                     uint8_t *out) {
    int bad = 0;
    int64_t i = 0;
#if TDSL_ISA == 2
    /* 16 at a time, the same operations: an IEEE division, rounding half to even, the zero
       point, the clamp; vpmovusdb narrows the clamped values to bytes */
    const __m512 sv = _mm512_set1_ps(scale), zv = _mm512_set1_ps((float)zp);
    const __m512 lov = _mm512_set1_ps((float)lo), hiv = _mm512_set1_ps((float)hi);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), sv);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __m512 r = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT |
                                                         _MM_FROUND_NO_EXC), zv);
        r = _mm512_min_ps(_mm512_max_ps(r, lov), hiv);
        r = _mm512_mask_mov_ps(r, nan, _mm512_setzero_ps()); /* NaN: 0, and said */
        bad |= nan != 0;
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(r)));
    }
#endif
    for (; i < n; i++) {
        const float v = x[i] / scale;
        float r = nearbyintf(v) + (float)zp;
        r = r < (float)lo ? (float)lo : r > (float)hi ? (float)hi : r;
        bad |= v != v;
        out[i] = (uint8_t)(v == v ? r : 0.0f); /* converting NaN is undefined */
    }
    return bad;
}

int tdsl_quantize_u8(const float *x, int64_t n, float scale, int zp, int lo, int hi,
                     uint8_t *out, int threads) {
    int bad = 0;
    /* blocks of 4096: the vector loop runs inside each, the threads share them */
    const int64_t blocks = (n + 4095) / 4096;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (n >= 65536)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t i = b * 4096, end = i + 4096 < n ? i + 4096 : n;
        bad |= quantize_u8_span(x + i, end - i, scale, zp, lo, hi, out + i);
    }
    return bad;
}

/* ---- RMSNorm -------------------------------------------------------------------------------
   y [m, n] = x * (1 / sqrt(mean(x^2) + eps)) * w per row (w may be NULL), in that order, as
   torch computes it in fp32; only the summation order differs (16 lanes, then in order). One
   call instead of the half dozen tensor ops torch's composite rms_norm runs, which at batch 1
   cost more than the arithmetic. Non-finite inputs give what that formula gives in torch (a
   NaN makes its row NaN; an Inf makes itself NaN and the rest of its row 0). */
int tdsl_rmsnorm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *w, float eps,
                 float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (m >= 64)
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * ldx;
        float *yi = y + i * n;
        float lane[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= n; j += 16)
            for (int l = 0; l < 16; l++) lane[l] += xi[j + l] * xi[j + l];
        float ss = 0.0f;
        for (int l = 0; l < 16; l++) ss += lane[l];
        for (; j < n; j++) ss += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
        if (w)
            for (j = 0; j < n; j++) yi[j] = xi[j] * r * w[j];
        else
            for (j = 0; j < n; j++) yi[j] = xi[j] * r;
    }
    return 0;
}
