/* Row-wise argmax of fp32 logits for x86-64 CPUs, called from Python via ctypes.
 *
 * Same result as torch.argmax(x, dim=-1): the first maximum, or the first NaN where a row has one.
 * Two passes per row: the maximum (and whether a NaN is present) eight lanes at a time, then the
 * first index holding it; a row (a vocabulary of fp32 logits) stays in L2 between the passes.
 * torch's CPU argmax tracks an index per element and is ~10x slower than its max.
 */
#include <math.h>
#include <omp.h>

#include "simd_base.c"

#define MIN_PARALLEL_ELEMENTS 65536 /* below this many logits one thread is faster */

static int64_t argmax_row(const float *row, int64_t n) {
    __m256 highest = _mm256_set1_ps(-INFINITY);
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(row + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        highest = _mm256_max_ps(highest, v);
    }
    float lanes[8], best;
    _mm256_storeu_ps(lanes, highest);
    best = lanes[0];
    for (int j = 1; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    int any_nan = _mm256_movemask_ps(nan) != 0;
    for (; i < n; i++) {
        any_nan |= isnan(row[i]);
        best = row[i] > best ? row[i] : best;
    }
    if (any_nan) {
        for (i = 0; i < n; i++)
            if (isnan(row[i])) return i;
    }
    __m256 target = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), target, _CMP_EQ_OQ));
        if (hits) return i + __builtin_ctz((unsigned)hits);
    }
    for (; i < n; i++)
        if (row[i] == best) return i;
    return 0; /* an empty row cannot reach here (n >= 1); all -inf rows return at the scan */
}

/* out[r] = argmax of row r of x [rows, n] (rows `stride` elements apart); 0, or -1 (a size),
 * -2 (threads), -3 (a null pointer). Rows are independent of the thread count. */
int paphos_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out,
                       int num_threads) {
    if (rows < 0 || n < 1 || stride < n) return -1;
    if (num_threads < 1) return -2;
    if (!x || !out) return -3;
    int threads = rows * n >= MIN_PARALLEL_ELEMENTS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, n);
    return 0;
}
