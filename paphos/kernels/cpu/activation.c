/* SiLU-and-mul of an MLP's [gate | up] rows for x86-64 CPUs (fp32 or bf16 bits), called from
 * Python via ctypes and included by decoder_layer.c. Invariant: silu(gate) is rounded to the row
 * dtype, then the product rounded, as torch's F.silu(gate) * up; on a torch built for AVX2 the
 * results are torch's bit for bit, elsewhere within one rounding (another exp past a row's
 * vector part).
 */
#include <math.h>
#include <omp.h>

#include "simd_base.c"

/* torch's vectorized CPU loops take 2 vectors per step and leave the rest of a row to the scalar
 * loop: 32 bf16 or 16 fp32 elements (AVX2), so SiLU uses Sleef's exp up to there, libm's after.
 * (From rows * intermediate >= 32768, torch's grain size, torch may split a row between threads
 * and move that boundary: a few elements may then differ by the two exps' last-bit difference.) */
#define SILU_STEP_BF16 32
#define SILU_STEP_FP32 16
#define MIN_PARALLEL_SILU_ROWS 16 /* below this many rows one thread is faster */

static inline float load_elem(const char *base, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* 2^n * exp(r) as Sleef's expf_u10 for AVX2 computes e^d (the exp behind torch's vectorized
 * SiLU): n = round(d / ln2), a two-part ln2 reduction, a degree-6 polynomial, two-step scaling. */
static inline __m256 sleef_exp(__m256 d) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407f)));
    __m256 qf = _mm256_cvtepi32_ps(q);
    __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
    s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
    static const float poly[6] = {0.000198527617612853646278381f, 0.00139304355252534151077271f,
                                  0.00833336077630519866943359f,  0.0416664853692054748535156f,
                                  0.166666671633720397949219f,    0.5f};
    __m256 u = _mm256_set1_ps(poly[0]);
    for (int k = 1; k < 6; k++) u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(poly[k]));
    u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
    __m256i half = _mm256_srai_epi32(q, 1), bias = _mm256_set1_epi32(127);
    __m256 scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    __m256i rest = _mm256_add_epi32(_mm256_sub_epi32(q, half), bias);
    u = _mm256_mul_ps(_mm256_mul_ps(u, scale1), _mm256_castsi256_ps(_mm256_slli_epi32(rest, 23)));
    u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
    __m256 overflow = _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ);
    return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), overflow);
}

/* act = silu(gate) * up for one row of gate_up [gate | up] (width 2 * n), as torch's
 * F.silu(gate) * up: silu rounded to the dtype, then the product rounded. Eight elements per
 * vector step up to where torch's vectorized loop ends; the rest one at a time with libm's exp. */
static void silu_and_mul_row(const char *gate_up, int64_t n, int bf16, char *act) {
    int64_t elem = bf16 ? 2 : 4;
    const char *up = gate_up + n * elem;
    int64_t vectorized = n - n % (bf16 ? SILU_STEP_BF16 : SILU_STEP_FP32), i = 0;
    for (; i < vectorized; i += 8) {
        __m256 x = load8(gate_up + i * elem, bf16);
        __m256 e = sleef_exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
        __m256 silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        if (bf16) silu = round_bf16x8(silu);
        store8(act + i * elem, bf16, _mm256_mul_ps(silu, load8(up + i * elem, bf16)));
    }
    for (; i < n; i++) {
        float x = load_elem(gate_up, bf16, i), silu = x / (1.0f + expf(-x));
        if (bf16) silu = bf16_to_float(float_to_bf16(silu));
        float value = silu * load_elem(up, bf16, i);
        if (bf16) ((uint16_t *)act)[i] = float_to_bf16(value);
        else ((float *)act)[i] = value;
    }
}

/* act [rows, n] = silu(gate) * up for gate_up [rows, 2 * n]; 0, or -1 (a size), -2 (threads),
 * -3 (a null pointer). Rows are independent: results do not depend on the thread count. */
int paphos_silu_and_mul(const void *gate_up, void *act, int64_t rows, int64_t n, int bf16,
                        int num_threads) {
    if (rows < 1 || n < 1) return -1;
    if (num_threads < 1) return -2;
    if (!gate_up || !act) return -3;
    int64_t elem = bf16 ? 2 : 4;
    int threads = rows >= MIN_PARALLEL_SILU_ROWS ? num_threads : 1;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        silu_and_mul_row((const char *)gate_up + r * 2 * n * elem, n, bf16,
                         (char *)act + r * n * elem);
    return 0;
}
