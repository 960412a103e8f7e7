/* GGUF (llama.cpp) block formats on x86-64 CPUs with AVX2 + FMA, called from Python via ctypes.
 *
 * A weight W [out, in] is kept as stored: each row is in / block_elements blocks of type_bytes.
 * paphos_gguf_dequantize widens rows to fp32 (the batched path multiplies such tiles with torch);
 * paphos_gguf_matvec computes y[b, o] = sum_i x[b, i] * W[o, i] from the blocks directly, x rows in
 * groups of up to 4 per pass over a few weight rows (the later groups read them from L1),
 * activations in fp32 (not quantized). Built per ISA level like every kernel here (the floor: AVX2,
 * FMA, F16C); the AVX-512 twin of the affine products is compiled in every build (target pragma)
 * and chosen by the caller. Invariant: every dequantized value equals the
 * `gguf` package's dequantizer bit for bit (same fp32 operations, no contraction into FMAs); every
 * output of the product is summed in one fixed order per row, whatever the thread count.
 */
#include <omp.h>
#include <stdlib.h>

#include "simd_base.c"

#define GGUF_MAX_ROWS 4          /* x rows per pass */
#define ROWS_PER_CHUNK 8    /* weight rows shared by the passes over all x rows */
#define QK 32    /* elements per block of the 32-element formats */
#define QK_K 256 /* elements per super-block of the K-quants and IQ4_XS */
#define GGUF_MIN_BYTES_PER_THREAD (64 * 1024)

/* ggml type ids (GGMLQuantizationType). */
enum {
    T_Q4_0 = 2,
    T_Q4_1 = 3,
    T_Q5_0 = 6,
    T_Q5_1 = 7,
    T_Q8_0 = 8,
    T_Q2_K = 10,
    T_Q3_K = 11,
    T_Q4_K = 12,
    T_Q5_K = 13,
    T_Q6_K = 14,
    T_IQ4_NL = 20,
    T_IQ4_XS = 23,
};

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

/* IEEE half (little-endian bytes) -> float, exact (F16C). */
PAPHOS_INLINE float half_to_float(const uint8_t *at) {
    uint16_t h;
    memcpy(&h, at, sizeof(h));
    return _cvtsh_ss(h);
}


/* (elements, bytes) of one block; 0 elements for a type this file does not know. */
static void block_geometry(int type, int *elements, int *bytes) {
    *elements = QK;
    switch (type) {
    case T_Q4_0: *bytes = 18; return;
    case T_Q4_1: *bytes = 20; return;
    case T_Q5_0: *bytes = 22; return;
    case T_Q5_1: *bytes = 24; return;
    case T_Q8_0: *bytes = 34; return;
    case T_IQ4_NL: *bytes = 18; return;
    }
    *elements = QK_K;
    switch (type) {
    case T_Q2_K: *bytes = 84; return;
    case T_Q3_K: *bytes = 110; return;
    case T_Q4_K: *bytes = 144; return;
    case T_Q5_K: *bytes = 176; return;
    case T_Q6_K: *bytes = 210; return;
    case T_IQ4_XS: *bytes = 136; return;
    }
    *elements = 0;
    *bytes = 0;
}

/* ---- one block -> fp32, in the gguf package's operation order ----------------------------- */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

static void dequant_q4_0(const uint8_t *b, float *out) {
    float d = half_to_float(b);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((b[2 + j] & 0x0f) - 8);
        out[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void dequant_q4_1(const uint8_t *b, float *out) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)(b[4 + j] & 0x0f) + m;
        out[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

static inline uint32_t load_u32(const uint8_t *at) {
    uint32_t v;
    memcpy(&v, at, sizeof(v));
    return v;
}

static void dequant_q5_0(const uint8_t *b, float *out) {
    float d = half_to_float(b);
    uint32_t qh = load_u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        out[j] = d * (float)(lo - 16);
        out[j + 16] = d * (float)(hi - 16);
    }
}

static void dequant_q5_1(const uint8_t *b, float *out) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    uint32_t qh = load_u32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        out[j] = d * (float)lo + m;
        out[j + 16] = d * (float)hi + m;
    }
}

static void dequant_q8_0(const uint8_t *b, float *out) {
    float d = half_to_float(b);
    for (int j = 0; j < 32; j++) out[j] = (float)(int8_t)b[2 + j] * d;
}

static void dequant_iq4_nl(const uint8_t *b, float *out) {
    float d = half_to_float(b);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)IQ4_VALUES[b[2 + j] & 0x0f];
        out[j + 16] = d * (float)IQ4_VALUES[b[2 + j] >> 4];
    }
}

/* Element e = half * 128 + shift * 32 + l of a Q2_K block: (qs[half * 32 + l] >> 2 shift) & 3. */
static void dequant_q2_k(const uint8_t *b, float *out) {
    const uint8_t *scales = b, *qs = b + 16;
    float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
    for (int half = 0; half < 2; half++)
        for (int shift = 0; shift < 4; shift++)
            for (int g = 0; g < 2; g++) { /* 16 elements sharing one scale */
                uint8_t sc = scales[half * 8 + shift * 2 + g];
                float dl = d * (float)(sc & 0x0f), ml = dmin * (float)(sc >> 4);
                const uint8_t *q = qs + half * 32 + g * 16;
                float *o = out + half * 128 + shift * 32 + g * 16;
                for (int l = 0; l < 16; l++) o[l] = dl * (float)((q[l] >> (2 * shift)) & 3) - ml;
            }
}

/* Q3_K: 16 signed 6-bit scales packed in 12 bytes; the high bit of each value is stored
 * inverted in hmask (bit set: no offset of -4). */
static void dequant_q3_k(const uint8_t *b, float *out) {
    const uint8_t *hmask = b, *qs = b + 32, *packed = b + 96;
    float d = half_to_float(b + 108);
    float dl[16];
    for (int i = 0; i < 16; i++) {
        int low = (i < 8 ? packed[i] : packed[i - 8] >> 4) & 0x0f;
        int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        dl[i] = d * (float)((low | (high << 4)) - 32);
    }
    for (int half = 0; half < 2; half++)
        for (int shift = 0; shift < 4; shift++)
            for (int g = 0; g < 2; g++) { /* e = half * 128 + shift * 32 + g * 16 + l */
                int bit = half * 4 + shift; /* e / 32: the hmask bit of these elements */
                float scale = dl[half * 8 + shift * 2 + g];
                const uint8_t *q = qs + half * 32 + g * 16, *h = hmask + g * 16;
                float *o = out + half * 128 + shift * 32 + g * 16;
                for (int l = 0; l < 16; l++) {
                    int low = (q[l] >> (2 * shift)) & 3, high = (h[l] >> bit) & 1;
                    o[l] = scale * (float)(low - ((high ^ 1) << 2));
                }
            }
}

/* The 8 (scale, min) pairs of Q4_K/Q5_K, 6 bits each in 12 bytes. */
static void k_scale_min(const uint8_t *s, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 0x3f;
        mn[j] = s[4 + j] & 0x3f;
        sc[4 + j] = (s[8 + j] & 0x0f) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
}

static void dequant_q4_k(const uint8_t *b, float *out) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    int sc[8], mn[8];
    k_scale_min(b + 4, sc, mn);
    const uint8_t *qs = b + 16;
    for (int sb = 0; sb < 8; sb++) {
        float dl = d * (float)sc[sb], ml = dmin * (float)mn[sb];
        const uint8_t *q = qs + (sb / 2) * 32;
        int shift = 4 * (sb % 2);
        for (int l = 0; l < 32; l++) out[sb * 32 + l] = dl * (float)((q[l] >> shift) & 0x0f) - ml;
    }
}

static void dequant_q5_k(const uint8_t *b, float *out) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    int sc[8], mn[8];
    k_scale_min(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int sb = 0; sb < 8; sb++) {
        float dl = d * (float)sc[sb], ml = dmin * (float)mn[sb];
        const uint8_t *q = qs + (sb / 2) * 32;
        int shift = 4 * (sb % 2);
        for (int l = 0; l < 32; l++) {
            int value = ((q[l] >> shift) & 0x0f) | (((qh[l] >> sb) & 1) << 4);
            out[sb * 32 + l] = dl * (float)value - ml;
        }
    }
}

/* Q6_K: element e = half * 128 + r: low 4 bits from ql[half * 64 + r % 64] (nibble r / 64),
 * high 2 bits from qh[half * 32 + r % 32] (pair r / 32); 16 int8 scales of 16 elements. */
static void dequant_q6_k(const uint8_t *b, float *out) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = half_to_float(b + 208);
    for (int half = 0; half < 2; half++)
        for (int quarter = 0; quarter < 4; quarter++) /* r = quarter * 32 + l of this half */
            for (int g = 0; g < 2; g++) {
                float dl = d * (float)scales[half * 8 + quarter * 2 + g];
                const uint8_t *low_bytes = ql + half * 64 + (quarter % 2) * 32 + g * 16;
                const uint8_t *high_bytes = qh + half * 32 + g * 16;
                int low_shift = 4 * (quarter / 2), high_shift = 2 * quarter;
                float *o = out + half * 128 + quarter * 32 + g * 16;
                for (int l = 0; l < 16; l++) {
                    int low = (low_bytes[l] >> low_shift) & 0x0f;
                    int high = (high_bytes[l] >> high_shift) & 3;
                    o[l] = dl * (float)((low | (high << 4)) - 32);
                }
            }
}

static void dequant_iq4_xs(const uint8_t *b, float *out) {
    float d = half_to_float(b);
    int scales_h = b[2] | (b[3] << 8);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++) {
        int low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f, high = (scales_h >> (2 * ib)) & 3;
        float dl = d * (float)((low | (high << 4)) - 32);
        for (int l = 0; l < 16; l++) {
            out[ib * 32 + l] = dl * (float)IQ4_VALUES[qs[ib * 16 + l] & 0x0f];
            out[ib * 32 + 16 + l] = dl * (float)IQ4_VALUES[qs[ib * 16 + l] >> 4];
        }
    }
}

#pragma GCC pop_options

typedef void (*DequantBlock)(const uint8_t *block, float *out);

static DequantBlock dequant_for(int type) {
    switch (type) {
    case T_Q4_0: return dequant_q4_0;
    case T_Q4_1: return dequant_q4_1;
    case T_Q5_0: return dequant_q5_0;
    case T_Q5_1: return dequant_q5_1;
    case T_Q8_0: return dequant_q8_0;
    case T_Q2_K: return dequant_q2_k;
    case T_Q3_K: return dequant_q3_k;
    case T_Q4_K: return dequant_q4_k;
    case T_Q5_K: return dequant_q5_k;
    case T_Q6_K: return dequant_q6_k;
    case T_IQ4_NL: return dequant_iq4_nl;
    case T_IQ4_XS: return dequant_iq4_xs;
    }
    return NULL;
}

static int gguf_threads_for(int64_t bytes, int num_threads) {
    int64_t useful = bytes / GGUF_MIN_BYTES_PER_THREAD;
    if (useful < 1) return 1;
    return useful < num_threads ? (int)useful : num_threads;
}

/* Shape of one matrix of blocks. */
typedef struct {
    int type;
    int block_elements, block_bytes;
    int64_t in, blocks_per_row, row_bytes;
} Blocks;

static int blocks_for(int type, int64_t in, Blocks *m) {
    m->type = type;
    block_geometry(type, &m->block_elements, &m->block_bytes);
    if (m->block_elements == 0) return -1;
    if (in < 1 || in % m->block_elements) return -2;
    m->in = in;
    m->blocks_per_row = in / m->block_elements;
    m->row_bytes = m->blocks_per_row * m->block_bytes;
    return 0;
}

/* ---- products from the blocks (decode) ---------------------------------------------------- */

/* 8 unsigned bytes as fp32 lanes. */
PAPHOS_INLINE __m256 widen_u8(__m128i bytes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

PAPHOS_INLINE __m256 widen_i8(__m128i bytes) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

/* acc[b] += q[0..32) . x[b][0..32) for the 32 values of one block given as 4 vectors. */
PAPHOS_INLINE void dot32(const __m256 q[4], const float *x, int64_t x_stride, int rows,
                         __m256 acc[GGUF_MAX_ROWS]) {
    for (int b = 0; b < rows; b++) {
        const float *xb = x + b * x_stride;
        __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), s);
        s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s);
        acc[b] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s);
    }
}

/* The 32 4-bit values of a Q4_0/Q4_1 block (qs: 16 bytes; low nibbles are elements 0-15). */
PAPHOS_INLINE void nibbles32(const uint8_t *qs, __m256 q[4]) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    q[0] = widen_u8(lo);
    q[1] = widen_u8(_mm_srli_si128(lo, 8));
    q[2] = widen_u8(hi);
    q[3] = widen_u8(_mm_srli_si128(hi, 8));
}

/* Q5: the fifth bit of elements j..j+8 from qh, added as 16. */
PAPHOS_INLINE __m256 fifth_bits(uint32_t qh, int j) {
    __m256i shifts = _mm256_setr_epi32(j, j + 1, j + 2, j + 3, j + 4, j + 5, j + 6, j + 7);
    __m256i bits = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)qh), shifts),
                                    _mm256_set1_epi32(1));
    return _mm256_cvtepi32_ps(_mm256_slli_epi32(bits, 4));
}

/* dots[b] = W[row] . x[b], for the 32-element formats whose values are d * q + m per block
 * (Q4_0: m = -8 d, Q5_0: m = -16 d, Q8_0: m = 0): d * (q . x) + m * sum(x), where xsum holds the
 * per-block sums of x. */
PAPHOS_INLINE __attribute__((always_inline)) void row_dot_affine32(
    const Blocks *m, const uint8_t *row, const float *x, const float *xsum, int rows,
    float dots[GGUF_MAX_ROWS]) {
    __m256 total[GGUF_MAX_ROWS];
    float offset[GGUF_MAX_ROWS];
    for (int b = 0; b < rows; b++) {
        total[b] = _mm256_setzero_ps();
        offset[b] = 0.0f;
    }
    for (int64_t k = 0; k < m->blocks_per_row; k++) {
        const uint8_t *blk = row + k * m->block_bytes;
        __m256 q[4], acc[GGUF_MAX_ROWS];
        float d = half_to_float(blk), mn = 0.0f;
        switch (m->type) {
        case T_Q4_0: nibbles32(blk + 2, q); mn = -8.0f * d; break;
        case T_Q4_1: nibbles32(blk + 4, q); mn = half_to_float(blk + 2); break;
        case T_Q8_0:
            for (int g = 0; g < 4; g++)
                q[g] = widen_i8(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * g)));
            break;
        default: { /* Q5_0 / Q5_1 */
            int has_min = m->type == T_Q5_1;
            uint32_t qh = load_u32(blk + 2 + 2 * has_min);
            nibbles32(blk + 6 + 2 * has_min, q);
            q[0] = _mm256_add_ps(q[0], fifth_bits(qh, 0));
            q[1] = _mm256_add_ps(q[1], fifth_bits(qh, 8));
            q[2] = _mm256_add_ps(q[2], fifth_bits(qh, 16));
            q[3] = _mm256_add_ps(q[3], fifth_bits(qh, 24));
            mn = has_min ? half_to_float(blk + 2) : -16.0f * d;
        }
        }
        dot32(q, x + k * QK, m->in, rows, acc);
        __m256 dv = _mm256_set1_ps(d);
        for (int b = 0; b < rows; b++) {
            total[b] = _mm256_fmadd_ps(dv, acc[b], total[b]);
            offset[b] += mn * xsum[b * m->blocks_per_row + k];
        }
    }
    for (int b = 0; b < rows; b++) dots[b] = horizontal_sum(total[b]) + offset[b];
}

/* Any format: each block dequantized into an L1 buffer, then multiplied in fp32. */
PAPHOS_INLINE __attribute__((always_inline)) void row_dot_generic(
    const Blocks *m, DequantBlock dequant, const uint8_t *row, const float *x, int rows,
    float dots[GGUF_MAX_ROWS]) {
    float buf[QK_K] __attribute__((aligned(32)));
    __m256 acc[GGUF_MAX_ROWS];
    for (int b = 0; b < rows; b++) acc[b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < m->blocks_per_row; k++) {
        dequant(row + k * m->block_bytes, buf);
        const float *xk = x + k * m->block_elements;
        for (int i = 0; i < m->block_elements; i += 8) {
            __m256 w = _mm256_load_ps(buf + i);
            for (int b = 0; b < rows; b++)
                acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + b * m->in + i), acc[b]);
        }
    }
    for (int b = 0; b < rows; b++) dots[b] = horizontal_sum(acc[b]);
}

static int is_affine32(int type) {
    return type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1 ||
           type == T_Q8_0;
}

/* Output rows [begin, end) with `rows` (a constant after inlining) inputs. */
PAPHOS_INLINE __attribute__((always_inline)) void gguf_matvec_rows(
    const Blocks *m, const uint8_t *weight, const float *x, const float *xsum, int rows,
    int64_t begin, int64_t end, float *y, int64_t y_stride) {
    DequantBlock dequant = dequant_for(m->type);
    int affine = is_affine32(m->type);
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *row = weight + o * m->row_bytes;
        float dots[GGUF_MAX_ROWS];
        if (affine) row_dot_affine32(m, row, x, xsum, rows, dots);
        else row_dot_generic(m, dequant, row, x, rows, dots);
        for (int b = 0; b < rows; b++) y[b * y_stride + o] = dots[b];
    }
}

/* ---- AVX-512 (F/BW/VL/DQ) twin of the affine 32-element path, chosen at run time ---------- */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

#define AVX512_INLINE static inline __attribute__((always_inline))

AVX512_INLINE __m512 fifth_bits16(uint32_t qh, int j) {
    __m512i shifts = _mm512_add_epi32(_mm512_set1_epi32(j),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                        13, 14, 15));
    __m512i bits = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)qh), shifts),
                                    _mm512_set1_epi32(1));
    return _mm512_cvtepi32_ps(_mm512_slli_epi32(bits, 4));
}

/* row_dot_affine32 with 16 lanes: a block is two vectors. */
AVX512_INLINE void row_dot_affine32_512(const Blocks *m, const uint8_t *row, const float *x,
                                        const float *xsum, int rows, float dots[GGUF_MAX_ROWS]) {
    __m512 total[GGUF_MAX_ROWS];
    float offset[GGUF_MAX_ROWS];
    for (int b = 0; b < rows; b++) {
        total[b] = _mm512_setzero_ps();
        offset[b] = 0.0f;
    }
    __m128i mask = _mm_set1_epi8(0x0f);
    for (int64_t k = 0; k < m->blocks_per_row; k++) {
        const uint8_t *blk = row + k * m->block_bytes;
        __m512 q0, q1;
        float d = half_to_float(blk), mn = 0.0f;
        if (m->type == T_Q8_0) {
            q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
            q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        } else {
            int has_min = m->type == T_Q4_1 || m->type == T_Q5_1;
            int five = m->type == T_Q5_0 || m->type == T_Q5_1;
            const uint8_t *qs = blk + 2 + 2 * has_min + 4 * five;
            __m128i v = _mm_loadu_si128((const __m128i *)qs);
            q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, mask)));
            q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
            if (five) {
                uint32_t qh = load_u32(blk + 2 + 2 * has_min);
                q0 = _mm512_add_ps(q0, fifth_bits16(qh, 0));
                q1 = _mm512_add_ps(q1, fifth_bits16(qh, 16));
            }
            mn = has_min ? half_to_float(blk + 2) : (five ? -16.0f : -8.0f) * d;
        }
        __m512 dv = _mm512_set1_ps(d);
        for (int b = 0; b < rows; b++) {
            const float *xb = x + b * m->in + k * QK;
            __m512 acc = _mm512_mul_ps(q0, _mm512_loadu_ps(xb));
            acc = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), acc);
            total[b] = _mm512_fmadd_ps(dv, acc, total[b]);
            offset[b] += mn * xsum[b * m->blocks_per_row + k];
        }
    }
    for (int b = 0; b < rows; b++) dots[b] = _mm512_reduce_add_ps(total[b]) + offset[b];
}

AVX512_INLINE void matvec_rows_512(const Blocks *m, const uint8_t *weight, const float *x,
                                   const float *xsum, int rows, int64_t begin, int64_t end,
                                   float *y, int64_t y_stride) {
    for (int64_t o = begin; o < end; o++) {
        float dots[GGUF_MAX_ROWS];
        row_dot_affine32_512(m, weight + o * m->row_bytes, x, xsum, rows, dots);
        for (int b = 0; b < rows; b++) y[b * y_stride + o] = dots[b];
    }
}

static __attribute__((noinline)) void gguf_matvec_group_512(const Blocks *m, const uint8_t *weight,
                                                       const float *x, const float *xsum,
                                                       int rows, int64_t begin, int64_t end,
                                                       float *y, int64_t y_stride) {
    switch (rows) {
    case 1: matvec_rows_512(m, weight, x, xsum, 1, begin, end, y, y_stride); break;
    case 2: matvec_rows_512(m, weight, x, xsum, 2, begin, end, y, y_stride); break;
    case 3: matvec_rows_512(m, weight, x, xsum, 3, begin, end, y, y_stride); break;
    default: matvec_rows_512(m, weight, x, xsum, 4, begin, end, y, y_stride); break;
    }
}

#pragma GCC pop_options

/* xsum[k] = the sum of x's elements in block k, for the 32-element affine formats (their
 * products take d * (q . x) + m * sum(x)); nothing for the other formats. */
static void block_sums(const Blocks *m, const float *x, float *xsum) {
    if (!is_affine32(m->type)) return;
    for (int64_t k = 0; k < m->blocks_per_row; k++) {
        float s = 0.0f;
        for (int i = 0; i < QK; i++) s += x[k * QK + i];
        xsum[k] = s;
    }
}

/* 1 when this CPU runs the AVX-512 path (isa = 1 in paphos_gguf_matvec). */
int paphos_gguf_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

/* Output rows [begin, end) for x rows [0, rows): groups of GGUF_MAX_ROWS over chunks of weight rows. */
static void gguf_matvec_range(const Blocks *m, const uint8_t *weight, const float *x,
                         const float *xsum, int64_t rows, int64_t begin, int64_t end, float *y,
                         int64_t y_stride, int isa) {
    int wide = isa == 1 && is_affine32(m->type);
    for (int64_t o = begin; o < end; o += ROWS_PER_CHUNK) {
        int64_t chunk_end = o + ROWS_PER_CHUNK < end ? o + ROWS_PER_CHUNK : end;
        for (int64_t b = 0; b < rows; b += GGUF_MAX_ROWS) {
            const float *xb = x + b * m->in, *sb = xsum + b * m->blocks_per_row;
            float *yb = y + b * y_stride;
            int group = rows - b < GGUF_MAX_ROWS ? (int)(rows - b) : GGUF_MAX_ROWS;
            if (wide) {
                gguf_matvec_group_512(m, weight, xb, sb, group, o, chunk_end, yb, y_stride);
                continue;
            }
            switch (group) {
            case 1: gguf_matvec_rows(m, weight, xb, sb, 1, o, chunk_end, yb, y_stride); break;
            case 2: gguf_matvec_rows(m, weight, xb, sb, 2, o, chunk_end, yb, y_stride); break;
            case 3: gguf_matvec_rows(m, weight, xb, sb, 3, o, chunk_end, yb, y_stride); break;
            default: gguf_matvec_rows(m, weight, xb, sb, 4, o, chunk_end, yb, y_stride); break;
            }
        }
    }
}

static __attribute__((noinline)) void gguf_matvec_share(const Blocks *m, const uint8_t *weight,
                                                   const float *x, const float *xsum,
                                                   int64_t rows, int64_t out, float *y,
                                                   int64_t y_stride, int isa, int t, int n) {
    int64_t begin = out * t / n, end = out * (t + 1) / n;
    if (begin < end) gguf_matvec_range(m, weight, x, xsum, rows, begin, end, y, y_stride, isa);
}

/* y[b, o] (row stride y_stride) = x[b] . W[o] for b < rows, x fp32 [rows, in] contiguous; the
 * sums of each output do not depend on rows or threads.
 * Returns 0, or -1 an unknown type, -2 in, -3 rows, -4 num_threads, -5 a null pointer,
 * -6 out of memory, -7 out, -8 isa. isa: 0 AVX2 (every CPU this library loads on), 1 AVX-512 for
 * the 32-element affine formats (only where paphos_gguf_has_avx512). */
int paphos_gguf_matvec(int type, const float *x, int64_t rows, const uint8_t *weight,
                       int64_t out, int64_t in, float *y, int64_t y_stride, int isa,
                       int num_threads) {
    Blocks m;
    int code = blocks_for(type, in, &m);
    if (code) return code;
    if (rows < 1) return -3;
    if (num_threads < 1) return -4;
    if (!x || !weight || !y) return -5;
    if (out < 1 || y_stride < out) return -7;
    if (isa != 0 && !(isa == 1 && paphos_gguf_has_avx512())) return -8;
    float *xsum = (float *)malloc((size_t)(rows * m.blocks_per_row + 1) * sizeof(float));
    if (!xsum) return -6;
    for (int64_t b = 0; b < rows; b++) block_sums(&m, x + b * in, xsum + b * m.blocks_per_row);
    int threads = gguf_threads_for(out * m.row_bytes * ((rows + GGUF_MAX_ROWS - 1) / GGUF_MAX_ROWS), num_threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    gguf_matvec_share(&m, weight, x, xsum, rows, out, y, y_stride, isa, omp_get_thread_num(),
                 omp_get_num_threads());
    free(xsum);
    return 0;
}

/* ---- vectorized dequantization of the 32-element affine formats (the batched path's tiles) - */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* One block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 -> 32 values at out + at (fp32 or bf16), with the gguf
 * package's operations: Q8_0 q * d, Q4_0/Q5_0 d * (q - offset), Q4_1/Q5_1 d * q + m. */
PAPHOS_INLINE void dequant_affine32(int type, const uint8_t *blk, void *out, int64_t at,
                                    int out_is_bf16) {
    __m256 q[4];
    __m256 d = _mm256_set1_ps(half_to_float(blk));
    int has_min = type == T_Q4_1 || type == T_Q5_1, five = type == T_Q5_0 || type == T_Q5_1;
    if (type == T_Q8_0) {
        for (int g = 0; g < 4; g++)
            q[g] = widen_i8(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * g)));
    } else {
        nibbles32(blk + 2 + 2 * has_min + 4 * five, q);
        if (five) {
            uint32_t qh = load_u32(blk + 2 + 2 * has_min);
            for (int g = 0; g < 4; g++) q[g] = _mm256_add_ps(q[g], fifth_bits(qh, 8 * g));
        }
        if (!has_min) {
            __m256 offset = _mm256_set1_ps(five ? 16.0f : 8.0f);
            for (int g = 0; g < 4; g++) q[g] = _mm256_sub_ps(q[g], offset);
        }
    }
    __m256 mn = _mm256_set1_ps(has_min ? half_to_float(blk + 2) : 0.0f);
    for (int g = 0; g < 4; g++) {
        __m256 v = _mm256_mul_ps(d, q[g]);
        if (has_min) v = _mm256_add_ps(v, mn);
        if (out_is_bf16) store_bf16x8((uint16_t *)out + at + 8 * g, v);
        else _mm256_storeu_ps((float *)out + at + 8 * g, v);
    }
}

#pragma GCC pop_options

/* Rows of blocks -> out [rows, in], fp32 or (out_is_bf16) bf16 rounded to nearest even, as torch's
 * conversion: the tiles of the batched path on CPUs with native bf16 GEMMs.
 * Returns 0, or -1 an unknown type, -2 in not a positive multiple of the block, -3 rows,
 * -4 num_threads, -5 a null pointer. */
int paphos_gguf_dequantize(int type, const uint8_t *weight, int64_t rows, int64_t in, void *out,
                           int out_is_bf16, int num_threads) {
    Blocks m;
    int code = blocks_for(type, in, &m);
    if (code) return code;
    if (rows < 0) return -3;
    if (num_threads < 1) return -4;
    if (!weight || !out) return -5;
    DequantBlock dequant = dequant_for(type);
    int affine = is_affine32(type);
    int threads = gguf_threads_for(rows * m.row_bytes, num_threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float buf[QK_K];
        for (int64_t k = 0; k < m.blocks_per_row; k++) {
            const uint8_t *block = weight + r * m.row_bytes + k * m.block_bytes;
            int64_t at = r * in + k * m.block_elements;
            if (affine) {
                dequant_affine32(type, block, out, at, out_is_bf16);
                continue;
            }
            if (!out_is_bf16) {
                dequant(block, (float *)out + at);
                continue;
            }
            dequant(block, buf);
            uint16_t *dst = (uint16_t *)out + at;
            for (int i = 0; i < m.block_elements; i++) dst[i] = float_to_bf16(buf[i]);
        }
    }
    return 0;
}

/* 1 when this library computes `type`. */
int paphos_gguf_supports(int type) { return dequant_for(type) != NULL; }

/* The batched products with 8-bit activations. */
#include "gguf_gemm.c"
