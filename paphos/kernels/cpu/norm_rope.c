/* RMSNorm (plain and fused with the residual add) and rotary embedding for x86-64 CPUs, called from
 * Python via ctypes; rows are fp32 or bf16 bits.
 *
 * Invariant: each element is computed as paphos.ops.rms_norm / paphos.ops.rotary do it (fp32 math,
 * one rounding per reference rounding, no fused multiply-adds), so only the order of the
 * sum of squares may differ from torch. Rows run in parallel only when there are many of them.
 */
#include <math.h>
#include <omp.h>

#include "simd_base.c"

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

#define MAX_WIDTH 16384      /* the widest row (hidden or heads * head_size) taken */
#define MIN_PARALLEL_ROWS 16 /* below this many rows one thread is faster than waking others */
#define LANES 8
#define LEVELS 4 /* cascade levels of torch's sum */

static inline float load(const void *base, int is_bf16, int64_t i) {
    if (is_bf16) return bf16_to_float(((const uint16_t *)base)[i]);
    return ((const float *)base)[i];
}

/* Stores `value` rounded to the row dtype and returns the stored value widened back to fp32. */
static inline float store(void *base, int is_bf16, int64_t i, float value) {
    if (!is_bf16) {
        ((float *)base)[i] = value;
        return value;
    }
    uint16_t bits = float_to_bf16(value);
    ((uint16_t *)base)[i] = bits;
    return bf16_to_float(bits);
}

static int64_t ceil_log2(int64_t x) {
    int64_t bits = 0;
    if (x <= 2) return 1;
    for (x -= 1; x > 0; x >>= 1) bits++;
    return bits;
}

/* Adds 8-lane vector `v` into `acc`: each lane is one fp32 add, as torch's Vectorized adds. */
static inline void add8(float *acc, const float *v) {
    for (int lane = 0; lane < LANES; lane++) acc[lane] += v[lane];
}

/* sum(row[i]^2) in the order of torch's CPU sum (AVX2, fp32): 8-lane vectors in 4 interleaved
 * accumulators, cascaded over 4 levels of 2^level_power groups; then the leftover vectors, the
 * accumulators, the scalar tail and the 8 lanes. Matching it keeps fp32 results bitwise. */
static float sum_squares(const float *row, int64_t n, float *squares) {
    for (int64_t i = 0; i < n; i++) squares[i] = row[i] * row[i];
    int64_t vectors = n / LANES, groups = vectors / 4;
    int64_t power = ceil_log2(groups) / LEVELS > 4 ? ceil_log2(groups) / LEVELS : 4;
    int64_t step = (int64_t)1 << power, mask = step - 1, g = 0;
    float acc[LEVELS][4][LANES] = {{{0}}};
    while (g + step <= groups) {
        for (int64_t j = 0; j < step; j++, g++)
            for (int k = 0; k < 4; k++) add8(acc[0][k], squares + (g * 4 + k) * LANES);
        for (int level = 1; level < LEVELS; level++) {
            for (int k = 0; k < 4; k++) {
                add8(acc[level][k], acc[level - 1][k]);
                memset(acc[level - 1][k], 0, sizeof(acc[level - 1][k]));
            }
            if (g & (mask << (level * power))) break;
        }
    }
    for (; g < groups; g++)
        for (int k = 0; k < 4; k++) add8(acc[0][k], squares + (g * 4 + k) * LANES);
    for (int level = 1; level < LEVELS; level++)
        for (int k = 0; k < 4; k++) add8(acc[0][k], acc[level][k]);
    for (int64_t v = groups * 4; v < vectors; v++) add8(acc[0][0], squares + v * LANES);
    for (int k = 1; k < 4; k++) add8(acc[0][0], acc[0][k]);
    float sum = 0.0f;
    for (int64_t i = vectors * LANES; i < n; i++) sum += squares[i];
    for (int lane = 0; lane < LANES; lane++) sum += acc[0][0][lane];
    return sum;
}

/* One row: sum (x + residual rounded, when residual is given, and written to residual_out), then
 * out = round(round(x * rsqrt(mean(x^2) + eps)) * weight). `row` and `squares` are scratch.
 * Not inlined (nor rope_token): they keep this file's fp-contract=off inside other files. */
static __attribute__((noinline)) void norm_row(const void *x, const void *residual,
                                               void *residual_out, const void *weight, void *out,
                                               int is_bf16, int64_t hidden, float eps, float *row,
                                               float *squares) {
    for (int64_t i = 0; i < hidden; i++) {
        float v = load(x, is_bf16, i);
        if (residual != NULL) v = store(residual_out, is_bf16, i, v + load(residual, is_bf16, i));
        row[i] = v;
    }
    float sum = sum_squares(row, hidden, squares);
    float inv_rms = 1.0f / sqrtf(sum / (float)hidden + eps);
    for (int64_t i = 0; i < hidden; i++) {
        float normed = row[i] * inv_rms;
        if (is_bf16) normed = bf16_to_float(float_to_bf16(normed));
        store(out, is_bf16, i, normed * load(weight, is_bf16, i));
    }
}

/* x, residual (may be NULL), residual_out, out: [rows, hidden] contiguous; weight: [hidden]. */
int paphos_rms_norm(const void *x, const void *residual, void *residual_out, const void *weight,
                    void *out, int is_bf16, int64_t rows, int64_t hidden, float eps,
                    int num_threads) {
    if (rows < 0 || hidden <= 0 || hidden > MAX_WIDTH) return -1;
    if (num_threads < 1) return -2;
    if (x == NULL || weight == NULL || out == NULL) return -3;
    if (residual != NULL && residual_out == NULL) return -3;
    int64_t elem = is_bf16 ? 2 : 4;
    int threads = rows >= MIN_PARALLEL_ROWS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float row[MAX_WIDTH], squares[MAX_WIDTH];
        int64_t at = r * hidden * elem;
        norm_row((const char *)x + at, residual ? (const char *)residual + at : NULL,
                 residual ? (char *)residual_out + at : NULL, weight, (char *)out + at, is_bf16,
                 hidden, eps, row, squares);
    }
    return 0;
}

typedef struct {
    int64_t head_size, rot_dim, half;
    int is_neox, is_bf16;
} Rope;

/* One head: rotate its first rot_dim dims by (cos, sin), copy the rest. The neox layout's halves
 * are contiguous: eight pairs per vector step there, one at a time elsewhere. */
static void rope_head(const Rope *p, const void *in, void *out, const float *cos,
                      const float *sin) {
    int64_t elem = p->is_bf16 ? 2 : 4, j = 0;
    if (p->is_neox) {
        const char *in1 = in, *in2 = (const char *)in + p->half * elem;
        char *out1 = out, *out2 = (char *)out + p->half * elem;
        for (; j + LANES <= p->half; j += LANES) {
            __m256 x1 = load8(in1 + j * elem, p->is_bf16), x2 = load8(in2 + j * elem, p->is_bf16);
            __m256 c = _mm256_loadu_ps(cos + j), s = _mm256_loadu_ps(sin + j);
            store8(out1 + j * elem, p->is_bf16,
                   _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
            store8(out2 + j * elem, p->is_bf16,
                   _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
        }
    }
    for (; j < p->half; j++) {
        int64_t i1 = p->is_neox ? j : 2 * j, i2 = p->is_neox ? j + p->half : 2 * j + 1;
        float x1 = load(in, p->is_bf16, i1), x2 = load(in, p->is_bf16, i2);
        float a = x1 * cos[j], b = x2 * sin[j], c = x2 * cos[j], d = x1 * sin[j];
        store(out, p->is_bf16, i1, a - b);
        store(out, p->is_bf16, i2, c + d);
    }
    int64_t rest = p->head_size - p->rot_dim;
    if (rest > 0)
        memcpy((char *)out + p->rot_dim * elem, (const char *)in + p->rot_dim * elem,
               (size_t)(rest * elem));
}

/* One token: all heads of one tensor (query or key), row `in` (strided source), `out`
 * contiguous. */
static __attribute__((noinline)) void rope_token(const Rope *p, const void *in, void *out,
                                                 int64_t heads, const float *cos,
                                                 const float *sin) {
    int64_t step = p->head_size * (p->is_bf16 ? 2 : 4);
    for (int64_t h = 0; h < heads; h++)
        rope_head(p, (const char *)in + h * step, (char *)out + h * step, cos, sin);
}

/* query [tokens, q_heads * head] at row stride q_stride (elements), key likewise; outputs
 * contiguous. cache [max_position, rot_dim] (cos | sin), fp32 or bf16. */
int paphos_rotary(const int64_t *positions, const void *query, int64_t q_stride, int64_t q_heads,
                  const void *key, int64_t k_stride, int64_t k_heads, const void *cache,
                  int cache_is_bf16, int64_t max_position, void *q_out, void *k_out,
                  int is_bf16, int64_t tokens, int64_t head_size, int64_t rot_dim, int is_neox,
                  int num_threads) {
    if (tokens < 0 || head_size <= 0 || rot_dim <= 0 || rot_dim % 2 || rot_dim > head_size ||
        rot_dim > MAX_WIDTH || q_heads < 0 || k_heads < 0)
        return -1;
    if (num_threads < 1) return -2;
    if (positions == NULL || query == NULL || key == NULL || cache == NULL) return -3;
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_position) return -4;
    Rope p = {head_size, rot_dim, rot_dim / 2, is_neox, is_bf16};
    int64_t elem = is_bf16 ? 2 : 4;
    int threads = tokens >= MIN_PARALLEL_ROWS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t t = 0; t < tokens; t++) {
        float cs[MAX_WIDTH];
        for (int64_t j = 0; j < rot_dim; j++)
            cs[j] = load(cache, cache_is_bf16, positions[t] * rot_dim + j);
        rope_token(&p, (const char *)query + t * q_stride * elem,
                   (char *)q_out + t * q_heads * head_size * elem, q_heads, cs, cs + p.half);
        rope_token(&p, (const char *)key + t * k_stride * elem,
                   (char *)k_out + t * k_heads * head_size * elem, k_heads, cs, cs + p.half);
    }
    return 0;
}

#pragma GCC pop_options
