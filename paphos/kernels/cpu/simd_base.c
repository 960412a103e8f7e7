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

/* 8 bf16 at `src` widened to fp32, in order. */
PAPHOS_INLINE __m256 load_bf16x8(const uint16_t *src) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* The bf16 bits of 8 floats, one per 32-bit lane, rounded to nearest even as float_to_bf16 (NaN
 * stays quiet). */
PAPHOS_INLINE __m256i bf16_bits8(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
}

/* 8 floats rounded to bf16 and widened back: bf16_to_float(float_to_bf16(x)) per lane. */
PAPHOS_INLINE __m256 round_bf16x8(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}

/* 8 floats -> 8 bf16 at `dst`, rounded as float_to_bf16. */
PAPHOS_INLINE void store_bf16x8(uint16_t *dst, __m256 v) {
    __m256i high = bf16_bits8(v);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0x08);
    _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(packed));
}

/* 8 elements (fp32, or bf16 bits when bf16) from `at`, as fp32. */
PAPHOS_INLINE __m256 load8(const char *at, int bf16) {
    return bf16 ? load_bf16x8((const uint16_t *)at) : _mm256_loadu_ps((const float *)at);
}

/* Stores 8 floats at `at` in the row dtype (bf16: rounded as float_to_bf16) and returns the
 * stored values widened back to fp32. */
PAPHOS_INLINE __m256 store8(char *at, int bf16, __m256 v) {
    if (!bf16) {
        _mm256_storeu_ps((float *)at, v);
        return v;
    }
    store_bf16x8((uint16_t *)at, v);
    return round_bf16x8(v);
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
