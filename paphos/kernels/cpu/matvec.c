/* Small-batch matrix-vector product for x86-64 CPUs with AVX2 + FMA, called from Python via ctypes.
 *
 * y[b, o] = sum_i x[b, i] * W[o, i] (+ bias[o]) for b < rows <= 4, W [out, in] in bf16 or fp32,
 * x [rows, in] and y [rows, out] in fp32 or bf16. Invariant: every output is one 8-lane fp32
 * accumulator over `in` in the same order, so results do not depend on rows, block or thread count.
 */
#include <omp.h>
#include <stdlib.h>

#include "avx2_base.c"

#define MAX_ROWS 4
#define MAX_BLOCK 4 /* output rows computed together: they share each load of x */
#define STEP 16     /* elements per step: one 32-byte load of bf16 weights */
/* Prefetch the weights about this many bytes ahead (whole blocks): the out-of-order window alone
 * keeps too few cache lines in flight to reach the core's memory bandwidth. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
/* Below this many weight bytes per thread, waking another thread costs more than it saves. */
#define MIN_BYTES_PER_THREAD (64 * 1024)

typedef struct {
    const void *weight; /* [out, in], bf16 bits or fp32 */
    int weight_is_bf16;
    int64_t in;
    int64_t in_steps;        /* in rounded down to a multiple of STEP */
    int64_t prefetch_blocks; /* how many blocks ahead to prefetch */
} Matrix;

static inline const char *weight_address(const Matrix *m, int64_t row, int64_t i) {
    int64_t element_bytes = m->weight_is_bf16 ? 2 : 4;
    return (const char *)m->weight + (row * m->in + i) * element_bytes;
}

/* 16 weights of `row` from element i, widened to fp32 as two vectors. bf16 widens with one load
 * and two unpacks, which yields elements {0-3, 8-11} and {4-7, 12-15}: x is stored permuted to
 * match (see permute_inputs). fp32 weights come in order. */
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

static inline float load_weight1(const Matrix *m, int64_t row, int64_t i) {
    if (m->weight_is_bf16) return bf16_to_float(((const uint16_t *)m->weight)[row * m->in + i]);
    return ((const float *)m->weight)[row * m->in + i];
}

/* dots[r][b] = W[row0 + r] . x[b] for r < height, b < rows; height and rows are constants after
 * inlining, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_block(
    const Matrix *m, const float *x, int64_t row0, int height, int rows,
    float dots[MAX_BLOCK][MAX_ROWS]) {
    __m256 acc[MAX_BLOCK][MAX_ROWS];
    for (int r = 0; r < height; r++)
        for (int b = 0; b < rows; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t ahead = m->prefetch_blocks * height; /* rows */
    for (int64_t i = 0; i < m->in_steps; i += STEP) {
        __m256 x_lo[MAX_ROWS], x_hi[MAX_ROWS];
        for (int b = 0; b < rows; b++) {
            x_lo[b] = _mm256_loadu_ps(x + b * m->in + i);
            x_hi[b] = _mm256_loadu_ps(x + b * m->in + i + 8);
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
    for (int r = 0; r < height; r++) {
        for (int b = 0; b < rows; b++) {
            float dot = horizontal_sum(acc[r][b]);
            for (int64_t i = m->in_steps; i < m->in; i++)
                dot += load_weight1(m, row0 + r, i) * x[b * m->in + i];
            dots[r][b] = dot;
        }
    }
}

/* One block of output rows, with its height and the row count as compile-time constants. */
static void dot_block_dispatch(const Matrix *m, const float *x, int64_t row0, int height,
                               int rows, float dots[MAX_BLOCK][MAX_ROWS]) {
#define CASE(H, B) \
    if (height == H && rows == B) return dot_block(m, x, row0, H, B, dots);
    CASE(4, 1) CASE(4, 2) CASE(2, 3) CASE(2, 4)
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#undef CASE
}

/* Accumulators (height * rows) plus x and weight vectors must fit in 16 ymm registers. */
static inline int block_height(int rows) { return rows <= 2 ? 4 : 2; }

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
static void matvec_range(const Matrix *m, const float *x, int rows, int64_t begin, int64_t end,
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

/* Elements [begin, end) of x's row b (x [rows, in]) as fp32 into x_fp32 [rows, in]; for bf16
 * weights each whole STEP group is stored as quads {0, 2, 1, 3} to match load_weights16's element
 * order, so a range of whole STEP groups lands within itself. */
static void permute_range(const void *x, int x_is_bf16, const Matrix *m, int64_t b, int64_t begin,
                          int64_t end, float *x_fp32) {
    for (int64_t i = begin; i < end; i++) {
        int64_t at = b * m->in + i, to = at;
        if (m->weight_is_bf16 && i < m->in_steps) {
            int64_t quad = (i % STEP) / 4, swapped = quad == 1 ? 2 : quad == 2 ? 1 : quad;
            to = b * m->in + i - i % STEP + swapped * 4 + i % 4;
        }
        x_fp32[to] = x_is_bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
    }
}

/* x [rows, in] as fp32 into x_fp32 [rows, in], in load_weights16's order (see permute_range). */
static void permute_inputs(const void *x, int x_is_bf16, const Matrix *m, int64_t rows,
                           float *x_fp32) {
    for (int64_t b = 0; b < rows; b++) permute_range(x, x_is_bf16, m, b, 0, m->in, x_fp32);
}

static int threads_for(int64_t weight_bytes, int num_threads) {
    int64_t useful = weight_bytes / MIN_BYTES_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* The matrix of a product with `rows` inputs: the prefetch distance depends on the block height. */
static Matrix matrix_for(const void *weight, int weight_is_bf16, int64_t in, int rows) {
    int64_t block_bytes = block_height(rows) * in * (weight_is_bf16 ? 2 : 4);
    Matrix m = {weight, weight_is_bf16, in, in - in % STEP, 1 + PREFETCH_BYTES / block_bytes};
    return m;
}

/* Thread t's share (of n) of the output rows: whole blocks, so the split never changes a result.
 * x_fp32 comes from permute_inputs. Not inlined: it keeps this file's floating-point flags in
 * translation units that include it. */
static __attribute__((noinline)) void matvec_share(const Matrix *m, const float *x_fp32, int rows,
                                                   int64_t out, const float *bias, void *y,
                                                   int y_is_bf16, int t, int n) {
    int height = block_height(rows);
    int64_t num_blocks = (out + height - 1) / height;
    int64_t begin = num_blocks * t / n * height, end = num_blocks * (t + 1) / n * height;
    if (end > out) end = out;
    if (begin < end) matvec_range(m, x_fp32, rows, begin, end, out, bias, y, y_is_bf16);
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
    Matrix m = matrix_for(weight, weight_is_bf16, in, (int)rows);
    float *x_fp32 = (float *)malloc((size_t)(rows * in) * sizeof(float)); /* [rows, in] */
    if (!x_fp32) return -6;
    permute_inputs(x, x_is_bf16, &m, rows, x_fp32);
    int threads = threads_for(out * in * (weight_is_bf16 ? 2 : 4), num_threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    matvec_share(&m, x_fp32, (int)rows, out, bias, y, y_is_bf16, omp_get_thread_num(),
                 omp_get_num_threads());
    free(x_fp32);
    return 0;
}
