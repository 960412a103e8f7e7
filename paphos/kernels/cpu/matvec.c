/* Small-batch matrix-vector product for x86-64 CPUs, called from Python via ctypes; built once per
 * ISA level (AVX2+FMA; AVX-512 F/BW/VL/DQ; + BF16, where bf16 weights meet bf16 inputs in
 * `vdpbf16ps`, 32 products per instruction and no widening).
 *
 * y[b, o] = sum_i x[b, i] * W[o, i] (+ bias[o]) for b < rows <= 4, W [out, in] in bf16 or fp32,
 * x [rows, in] and y [rows, out] in fp32 or bf16. Invariant: every output is one vector
 * accumulator over `in` in the same order, so results do not depend on rows, block or thread
 * count (they do depend on the ISA level: the vector width sets the order of the sums).
 */
#include <omp.h>
#include <stdlib.h>

#include "simd_base.c"

#define MAX_ROWS 4
#define MAX_BLOCK 4 /* output rows computed together: they share each load of x */
#ifdef __AVX512F__
#define STEP 32 /* elements per step: one 64-byte load of bf16 weights */
#else
#define STEP 16 /* elements per step: one 32-byte load of bf16 weights */
#endif
#ifdef __AVX512BF16__
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif
/* Prefetch the weights about this many bytes ahead (whole blocks): the out-of-order window alone
 * keeps too few cache lines in flight to reach the core's memory bandwidth. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
/* Below this many weight bytes per thread, waking another thread costs more than it saves. */
#define MIN_BYTES_PER_THREAD (64 * 1024)

/* How the inputs are laid out for the product (see prepare_range). */
typedef enum {
    X_FP32,          /* fp32 in order */
    X_FP32_PERMUTED, /* fp32, each STEP group in load_weights16's order (AVX2, bf16 weights) */
    X_BF16,          /* bf16 in order, multiplied in bf16 pairs (BF16 ISA, bf16 x and weights) */
} InputLayout;

typedef struct {
    const void *weight; /* [out, in], bf16 bits or fp32 */
    int weight_is_bf16;
    InputLayout layout;
    int64_t in;
    int64_t in_steps;        /* in rounded down to a multiple of STEP */
    int64_t prefetch_blocks; /* how many blocks ahead to prefetch */
} Matrix;

static inline const char *weight_address(const Matrix *m, int64_t row, int64_t i) {
    int64_t element_bytes = m->weight_is_bf16 ? 2 : 4;
    return (const char *)m->weight + (row * m->in + i) * element_bytes;
}

static inline float load_weight1(const Matrix *m, int64_t row, int64_t i) {
    if (m->weight_is_bf16) return bf16_to_float(((const uint16_t *)m->weight)[row * m->in + i]);
    return ((const float *)m->weight)[row * m->in + i];
}

/* Element i of prepared input row b, as fp32 (the scalar tails). */
static inline float input1(const Matrix *m, const void *x, int64_t b, int64_t i) {
    if (m->layout == X_BF16) return bf16_to_float(((const uint16_t *)x)[b * m->in + i]);
    return ((const float *)x)[b * m->in + i];
}

#ifdef __AVX512F__
typedef __m512 Acc;
#define ACC_ZERO() _mm512_setzero_ps()
#define ACC_SUM(v) _mm512_reduce_add_ps(v)

/* 16 bf16 from `at` widened to fp32, in order. */
static inline __m512 widen16(const char *at) {
    __m256i bits = _mm256_loadu_si256((const __m256i *)at);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* acc[r][b] += W[row0 + r, i : i + STEP] . x[b, i : i + STEP] for one step. */
static inline __attribute__((always_inline)) void dot_step(
    const Matrix *m, const void *x, int64_t row0, int64_t i, int64_t ahead, int height, int rows,
    Acc acc[MAX_BLOCK][MAX_ROWS]) {
#if HAVE_DPBF16
    if (m->layout == X_BF16) {
        __m512bh xs[MAX_ROWS];
        for (int b = 0; b < rows; b++)
            xs[b] = (__m512bh)_mm512_loadu_si512((const uint16_t *)x + b * m->in + i);
        for (int r = 0; r < height; r++) {
            _mm_prefetch(weight_address(m, row0 + r + ahead, i), _MM_HINT_T0);
            __m512bh w = (__m512bh)_mm512_loadu_si512(weight_address(m, row0 + r, i));
            for (int b = 0; b < rows; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w, xs[b]);
        }
        return;
    }
#endif
    __m512 x_lo[MAX_ROWS], x_hi[MAX_ROWS];
    for (int b = 0; b < rows; b++) {
        x_lo[b] = _mm512_loadu_ps((const float *)x + b * m->in + i);
        x_hi[b] = _mm512_loadu_ps((const float *)x + b * m->in + i + 16);
    }
    for (int r = 0; r < height; r++) {
        /* Past the last row this names memory we never read: prefetches do not fault. */
        _mm_prefetch(weight_address(m, row0 + r + ahead, i), _MM_HINT_T0);
        const char *at = weight_address(m, row0 + r, i);
        __m512 w_lo, w_hi;
        if (m->weight_is_bf16) {
            w_lo = widen16(at);
            w_hi = widen16(at + 32);
        } else {
            _mm_prefetch(weight_address(m, row0 + r + ahead, i + 16), _MM_HINT_T0);
            w_lo = _mm512_loadu_ps((const float *)at);
            w_hi = _mm512_loadu_ps((const float *)at + 16);
        }
        for (int b = 0; b < rows; b++) {
            acc[r][b] = _mm512_fmadd_ps(w_lo, x_lo[b], acc[r][b]);
            acc[r][b] = _mm512_fmadd_ps(w_hi, x_hi[b], acc[r][b]);
        }
    }
}
#else
typedef __m256 Acc;
#define ACC_ZERO() _mm256_setzero_ps()
#define ACC_SUM(v) horizontal_sum(v)

/* 16 weights of `row` from element i, widened to fp32 as two vectors. bf16 widens with one load
 * and two unpacks, which yields elements {0-3, 8-11} and {4-7, 12-15}: x is stored permuted to
 * match (X_FP32_PERMUTED). fp32 weights come in order. */
static inline void load_weights16(const Matrix *m, int64_t row, int64_t i, __m256 *lo,
                                  __m256 *hi) {
    const char *at = weight_address(m, row, i);
    if (m->weight_is_bf16) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)at);
        __m256i zero = _mm256_setzero_si256();
        *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
        *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
    } else {
        *lo = _mm256_loadu_ps((const float *)at);
        *hi = _mm256_loadu_ps((const float *)at + 8);
    }
}

static inline __attribute__((always_inline)) void dot_step(
    const Matrix *m, const void *x, int64_t row0, int64_t i, int64_t ahead, int height, int rows,
    Acc acc[MAX_BLOCK][MAX_ROWS]) {
    __m256 x_lo[MAX_ROWS], x_hi[MAX_ROWS];
    for (int b = 0; b < rows; b++) {
        x_lo[b] = _mm256_loadu_ps((const float *)x + b * m->in + i);
        x_hi[b] = _mm256_loadu_ps((const float *)x + b * m->in + i + 8);
    }
    for (int r = 0; r < height; r++) {
        /* Past the last row this names memory we never read: prefetches do not fault. */
        _mm_prefetch(weight_address(m, row0 + r + ahead, i), _MM_HINT_T0);
        __m256 w_lo, w_hi;
        load_weights16(m, row0 + r, i, &w_lo, &w_hi);
        for (int b = 0; b < rows; b++) {
            acc[r][b] = _mm256_fmadd_ps(w_lo, x_lo[b], acc[r][b]);
            acc[r][b] = _mm256_fmadd_ps(w_hi, x_hi[b], acc[r][b]);
        }
    }
}
#endif

/* dots[r][b] = W[row0 + r] . x[b] for r < height, b < rows; height and rows are constants after
 * inlining, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const Matrix *m, const void *x, int64_t row0, int height, int rows,
    float dots[MAX_BLOCK][MAX_ROWS]) {
    Acc acc[MAX_BLOCK][MAX_ROWS];
    for (int r = 0; r < height; r++)
        for (int b = 0; b < rows; b++) acc[r][b] = ACC_ZERO();
    int64_t ahead = m->prefetch_blocks * height; /* rows */
    for (int64_t i = 0; i < m->in_steps; i += STEP)
        dot_step(m, x, row0, i, ahead, height, rows, acc);
    for (int r = 0; r < height; r++) {
        for (int b = 0; b < rows; b++) {
            float dot = ACC_SUM(acc[r][b]);
            for (int64_t i = m->in_steps; i < m->in; i++)
                dot += load_weight1(m, row0 + r, i) * input1(m, x, b, i);
            dots[r][b] = dot;
        }
    }
}

/* One block of output rows, with its height and the row count as compile-time constants. */
static void dot_block_dispatch(const Matrix *m, const void *x, int64_t row0, int height,
                               int rows, float dots[MAX_BLOCK][MAX_ROWS]) {
#define CASE(H, B) \
    if (height == H && rows == B) return dot_block(m, x, row0, H, B, dots);
    CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) CASE(2, 3) CASE(2, 4)
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#undef CASE
}

/* Accumulators (height * rows) plus x and weight vectors must fit in the vector registers: 16 ymm
 * (AVX2) or 32 zmm (AVX-512). */
static inline int block_height(int rows) {
#ifdef __AVX512F__
    (void)rows;
    return 4;
#else
    return rows <= 2 ? 4 : 2;
#endif
}

static void store_matvec_outputs(float dots[MAX_BLOCK][MAX_ROWS], int64_t row0, int height,
                                 int rows, int64_t out, const float *bias, void *y,
                                 int y_is_bf16) {
    for (int r = 0; r < height; r++) {
        for (int b = 0; b < rows; b++) {
            float value = dots[r][b] + (bias ? bias[row0 + r] : 0.0f);
            int64_t at = b * out + row0 + r;
            if (y_is_bf16) ((uint16_t *)y)[at] = float_to_bf16(value);
            else ((float *)y)[at] = value;
        }
    }
}

/* Output rows [begin, end): whole blocks first, then single rows. */
static void matvec_range(const Matrix *m, const void *x, int rows, int64_t begin, int64_t end,
                         int64_t out, const float *bias, void *y, int y_is_bf16) {
    float dots[MAX_BLOCK][MAX_ROWS];
    int height = block_height(rows);
    int64_t row = begin;
    for (; row + height <= end; row += height) {
        dot_block_dispatch(m, x, row, height, rows, dots);
        store_matvec_outputs(dots, row, height, rows, out, bias, y, y_is_bf16);
    }
    for (; row < end; row++) {
        dot_block_dispatch(m, x, row, 1, rows, dots);
        store_matvec_outputs(dots, row, 1, rows, out, bias, y, y_is_bf16);
    }
}

/* Elements [begin, end) of x's row b (x [rows, in]) into `prepared` [rows, in] in the matrix's
 * input layout: fp32 or bf16 in order, or (X_FP32_PERMUTED) each whole STEP group stored as
 * quads {0, 2, 1, 3} to match load_weights16's element order, so a range of whole STEP groups
 * lands within itself. */
static void prepare_range(const void *x, int x_is_bf16, const Matrix *m, int64_t b, int64_t begin,
                          int64_t end, void *prepared) {
    if (m->layout == X_BF16) { /* x is bf16 too: copied as it is */
        memcpy((uint16_t *)prepared + b * m->in + begin, (const uint16_t *)x + b * m->in + begin,
               (size_t)(end - begin) * 2);
        return;
    }
    float *x_fp32 = (float *)prepared;
    for (int64_t i = begin; i < end; i++) {
        int64_t at = b * m->in + i, to = at;
        if (m->layout == X_FP32_PERMUTED && i < m->in_steps) {
            int64_t quad = (i % STEP) / 4, swapped = quad == 1 ? 2 : quad == 2 ? 1 : quad;
            to = b * m->in + i - i % STEP + swapped * 4 + i % 4;
        }
        x_fp32[to] = x_is_bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
    }
}

/* x [rows, in] into `prepared` [rows, in] in the matrix's input layout (see prepare_range). */
static void prepare_inputs(const void *x, int x_is_bf16, const Matrix *m, int64_t rows,
                           void *prepared) {
    for (int64_t b = 0; b < rows; b++) prepare_range(x, x_is_bf16, m, b, 0, m->in, prepared);
}

static int threads_for(int64_t weight_bytes, int num_threads) {
    int64_t useful = weight_bytes / MIN_BYTES_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* The matrix of a product with `rows` inputs in bf16 or fp32: the input layout follows the ISA
 * and both dtypes, the prefetch distance the block height. */
static Matrix matrix_for(const void *weight, int weight_is_bf16, int64_t in, int rows,
                         int x_is_bf16) {
    int64_t block_bytes = block_height(rows) * in * (weight_is_bf16 ? 2 : 4);
    InputLayout layout = X_FP32;
    if (weight_is_bf16 && x_is_bf16 && HAVE_DPBF16) layout = X_BF16;
#ifndef __AVX512F__
    if (weight_is_bf16) layout = X_FP32_PERMUTED;
#endif
    Matrix m = {weight, weight_is_bf16, layout, in, in - in % STEP,
                1 + PREFETCH_BYTES / block_bytes};
    return m;
}

/* Thread t's share (of n) of the output rows: whole blocks, so the split never changes a result.
 * `prepared` comes from prepare_inputs. Not inlined: it keeps this file's floating-point flags in
 * translation units that include it. */
static __attribute__((noinline)) void matvec_share(const Matrix *m, const void *prepared, int rows,
                                                   int64_t out, const float *bias, void *y,
                                                   int y_is_bf16, int t, int n) {
    int height = block_height(rows);
    int64_t num_blocks = (out + height - 1) / height;
    int64_t begin = num_blocks * t / n * height, end = num_blocks * (t + 1) / n * height;
    if (end > out) end = out;
    if (begin < end) matvec_range(m, prepared, rows, begin, end, out, bias, y, y_is_bf16);
}

/* Returns 0 on success, a negative code naming the first bad argument otherwise:
 * -1 rows, -2 in, -3 out, -4 num_threads, -5 a null pointer, -6 out of memory. */
int paphos_matvec(const void *x, int x_is_bf16, const void *weight, int weight_is_bf16,
                  const float *bias, void *y, int y_is_bf16, int64_t rows, int64_t in,
                  int64_t out, int num_threads) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    if (in < 1) return -2;
    if (out < 1) return -3;
    if (num_threads < 1) return -4;
    if (!x || !weight || !y) return -5;
    Matrix m = matrix_for(weight, weight_is_bf16, in, (int)rows, x_is_bf16);
    void *prepared = malloc((size_t)(rows * in) * sizeof(float)); /* [rows, in] */
    if (!prepared) return -6;
    prepare_inputs(x, x_is_bf16, &m, rows, prepared);
    int threads = threads_for(out * in * (weight_is_bf16 ? 2 : 4), num_threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    matvec_share(&m, prepared, (int)rows, out, bias, y, y_is_bf16, omp_get_thread_num(),
                 omp_get_num_threads());
    free(prepared);
    return 0;
}

/* ---- Batched product over weights packed in bf16 pairs (AVX-512 BF16 builds only) -------------
 *
 * For more than MAX_ROWS rows, `vdpbf16ps` wants the weights of 16 output columns side by side
 * with two consecutive inputs each: a copy of W [out, in] packed once into panels of PANEL_COLS
 * columns, [num_panels][in_pairs][PANEL_COLS][2] (out rounded up to 16 with zero columns, in
 * rounded up to even with a zero input). A panel is streamed once per row block, from L2 after the
 * first block, while each row's input pair is broadcast from L1: no horizontal sums, no widening.
 * Every output is one fp32 accumulator over the input pairs in order, so it does not depend on the
 * row count, the blocking or the thread count.
 */
#define PANEL_VECTORS 3                      /* zmm of 16 output columns per panel */
#define PANEL_COLS (16 * PANEL_VECTORS)      /* 48: divides 576, 960, 1536, 3072, 49152 */
#define GEMM_ROW_BLOCK 8                     /* rows per block: 8 x 3 accumulators + 3 weights */

static inline int64_t packed_cols(int64_t out) { return (out + 15) / 16 * 16; }
static inline int64_t packed_pairs(int64_t in) { return (in + 1) / 2; }

/* Elements of the packed copy of a [out, in] matrix (what paphos_pack_bf16_pairs fills). */
int64_t paphos_packed_numel(int64_t out, int64_t in) {
    return packed_cols(out) * packed_pairs(in) * 2;
}

/* w [out, in] bf16 -> packed [num_panels][in_pairs][panel columns][2] (the last panel may be
 * narrower: 16 or 32 columns); -1 bad sizes, -5 null pointer. */
int paphos_pack_bf16_pairs(const uint16_t *w, int64_t out, int64_t in, uint16_t *packed) {
    if (out < 1 || in < 1) return -1;
    if (!w || !packed) return -5;
    int64_t cols = packed_cols(out), pairs = packed_pairs(in);
    for (int64_t c0 = 0; c0 < cols; c0 += PANEL_COLS) {
        int64_t width = cols - c0 < PANEL_COLS ? cols - c0 : PANEL_COLS;
        uint16_t *panel = packed + c0 * pairs * 2;
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t j = 0; j < width; j++)
                for (int64_t e = 0; e < 2; e++) {
                    int64_t col = c0 + j, i = 2 * p + e;
                    panel[(p * width + j) * 2 + e] = col < out && i < in ? w[col * in + i] : 0;
                }
    }
    return 0;
}

#if HAVE_DPBF16
/* Input pair p of row m of x [rows, in] as one 32-bit lane (a zero past an odd `in`). */
static inline int32_t input_pair(const uint16_t *x, int64_t in, int64_t m, int64_t p) {
    const uint16_t *at = x + m * in + 2 * p;
    uint32_t lo = at[0], hi = 2 * p + 1 < in ? at[1] : 0;
    return (int32_t)(lo | hi << 16);
}

/* 16 floats rounded to bf16 as float_to_bf16 (nearest even; NaN stays quiet; denormals kept). */
static inline __m256i bf16_bits16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
    __m512i chosen = _mm512_mask_blend_epi32(nan, rounded, quiet);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(chosen, 16));
}

/* acc[m][v] = rows m < height of x times the panel's columns 16v..16v+15, v < vectors; height and
 * vectors are constants after inlining, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void gemm_block(
    const uint16_t *x, int64_t in, int64_t pairs, const uint16_t *panel, int height, int vectors,
    __m512 acc[GEMM_ROW_BLOCK][PANEL_VECTORS]) {
    for (int m = 0; m < height; m++)
        for (int v = 0; v < vectors; v++) acc[m][v] = _mm512_setzero_ps();
    int64_t full = in / 2; /* pairs with both inputs inside the row */
    for (int64_t p = 0; p < pairs; p++) {
        const uint16_t *at = panel + p * vectors * 32;
        _mm_prefetch((const char *)at + 4096, _MM_HINT_T0);
        __m512bh w[PANEL_VECTORS];
        for (int v = 0; v < vectors; v++) w[v] = (__m512bh)_mm512_loadu_si512(at + v * 32);
        for (int m = 0; m < height; m++) {
            int32_t pair;
            if (p < full) memcpy(&pair, x + m * in + 2 * p, 4);
            else pair = input_pair(x, in, m, p);
            __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < vectors; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xs, w[v]);
        }
    }
}

static void gemm_block_dispatch(const uint16_t *x, int64_t in, int64_t pairs,
                                const uint16_t *panel, int height, int vectors,
                                __m512 acc[GEMM_ROW_BLOCK][PANEL_VECTORS]) {
#define CASE(H, V) \
    if (height == H && vectors == V) return gemm_block(x, in, pairs, panel, H, V, acc);
#define HEIGHTS(V) \
    CASE(8, V) CASE(7, V) CASE(6, V) CASE(5, V) CASE(4, V) CASE(3, V) CASE(2, V) CASE(1, V)
    HEIGHTS(3) HEIGHTS(2) HEIGHTS(1)
#undef HEIGHTS
#undef CASE
}

/* Rows [m0, m0 + height) of y for the panel at column c0 (+ bias, rounded once to y's dtype). */
static void store_gemm_block(__m512 acc[GEMM_ROW_BLOCK][PANEL_VECTORS], int height, int vectors,
                             int64_t m0, int64_t c0, int64_t out, const float *bias, void *y,
                             int y_is_bf16) {
    for (int v = 0; v < vectors; v++) {
        int64_t col = c0 + 16 * v;
        if (col >= out) break;
        __mmask16 mask = out - col >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (out - col)) - 1);
        __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
        for (int m = 0; m < height; m++) {
            __m512 value = _mm512_add_ps(acc[m][v], b);
            int64_t at = (m0 + m) * out + col;
            if (!y_is_bf16) {
                _mm512_mask_storeu_ps((float *)y + at, mask, value);
                continue;
            }
            _mm256_mask_storeu_epi16((uint16_t *)y + at, mask, bf16_bits16(value));
        }
    }
}

/* Thread t's share (of n) of the panels, every row block of x against each. */
static void gemm_share(const uint16_t *x, int64_t rows, int64_t in, const uint16_t *packed,
                       int64_t out, const float *bias, void *y, int y_is_bf16, int t, int n) {
    int64_t cols = packed_cols(out), pairs = packed_pairs(in);
    int64_t num_panels = (cols + PANEL_COLS - 1) / PANEL_COLS;
    int64_t begin = num_panels * t / n, end = num_panels * (t + 1) / n;
    __m512 acc[GEMM_ROW_BLOCK][PANEL_VECTORS];
    for (int64_t k = begin; k < end; k++) {
        int64_t c0 = k * PANEL_COLS;
        int vectors = (int)((cols - c0 < PANEL_COLS ? cols - c0 : PANEL_COLS) / 16);
        const uint16_t *panel = packed + c0 * pairs * 2;
        for (int64_t m0 = 0; m0 < rows; m0 += GEMM_ROW_BLOCK) {
            int height = rows - m0 < GEMM_ROW_BLOCK ? (int)(rows - m0) : GEMM_ROW_BLOCK;
            gemm_block_dispatch(x + m0 * in, in, pairs, panel, height, vectors, acc);
            store_gemm_block(acc, height, vectors, m0, c0, out, bias, y, y_is_bf16);
        }
    }
}
#endif

/* y [rows, out] (bf16 or fp32) = x [rows, in] (bf16) times the packed bf16 weights (+ bias fp32);
 * 0 on success, else -1 rows, -2 in, -3 out, -4 num_threads, -5 a null pointer, -7 this build has
 * no AVX-512 BF16 (the caller uses torch). */
int paphos_gemm_packed(const uint16_t *x, const uint16_t *packed, const float *bias, void *y,
                       int y_is_bf16, int64_t rows, int64_t in, int64_t out, int num_threads) {
    if (rows < 1) return -1;
    if (in < 1) return -2;
    if (out < 1) return -3;
    if (num_threads < 1) return -4;
    if (!x || !packed || !y) return -5;
#if HAVE_DPBF16
    int64_t num_panels = (packed_cols(out) + PANEL_COLS - 1) / PANEL_COLS;
    int64_t work = rows * packed_cols(out) * in; /* products: one thread below ~2M */
    int threads = work < (1 << 21) ? 1 : num_threads;
    if (threads > num_panels) threads = (int)num_panels;
#pragma omp parallel num_threads(threads) if (threads > 1)
    gemm_share(x, rows, in, packed, out, bias, y, y_is_bf16, omp_get_thread_num(),
               omp_get_num_threads());
    return 0;
#else
    (void)bias, (void)y_is_bf16;
    return -7;
#endif
}
