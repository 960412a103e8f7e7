/* What every CPU kernel file shares: bf16 <-> fp32 conversion, an 8-lane horizontal sum and the
 * exported check that the CPU has every feature the build was compiled for (paphos.kernels.cpu.isa
 * picks the level: AVX2+FMA, AVX-512 F/BW/VL/DQ, + VNNI/BF16). Included (not compiled alone) by
 * matvec.c, attention.c, norm_rope.c and decoder_layer.c; the guard keeps one copy when several of
 * them form one translation unit.
 */
#ifndef PAPHOS_SIMD_BASE
#define PAPHOS_SIMD_BASE

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* always_inline: the helpers stay inlined into code built under other optimize pragmas. */
#define PAPHOS_INLINE static inline __attribute__((always_inline))

PAPHOS_INLINE float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof(value));
    return value;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a quiet NaN. */
PAPHOS_INLINE uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

PAPHOS_INLINE float horizontal_sum(__m256 v) {
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    __m128 sum1 = _mm_add_ss(sum2, _mm_movehdup_ps(sum2));
    return _mm_cvtss_f32(sum1);
}

int paphos_cpu_supported(void) {
    __builtin_cpu_init();
    int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef __AVX512F__
    ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#ifdef __AVX512BF16__
    ok = ok && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
#endif
    return ok;
}

#endif
