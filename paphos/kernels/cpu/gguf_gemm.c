/* Batched products over GGUF blocks with 8-bit activations (included at the end of gguf_matvec.c).
 *
 * y[b, o] = sum_k xq[b, k] * W[o, k], where xq is x quantized per 32-element block as llama.cpp
 * quantizes activations for its integer dot products (Q8_0-like: scale d = max|x| / 127 in fp32,
 * q = round-half-even(x / d) in [-127, 127]; xq = q * d) and W is the file's blocks. Every ggml type
 * is unpacked, 16 output rows at a time, into one layout: unsigned 8-bit values u with a scale s and
 * a minimum m per 16 elements (W = s * u + m, exact), interleaved so that one 64-byte vector holds
 * 4 consecutive values of each of the 16 rows. The dot of a block is then integer (u8 x s8 into
 * int32: AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd), scaled once per block:
 *   y += s * d * sum(u * q) + m * d * sum(q).
 * Invariant: each output is summed in one fixed order (blocks in k order) whatever the number of
 * rows or threads, and equals dequantize(W) @ xq up to fp32 rounding of the per-block terms.
 */

#define Q8_TILE 16            /* output rows per unpacked tile (one zmm of int32 lanes) */
#define Q8_KB_BYTES 768       /* per 32 columns of a tile: 8 x 64 bytes of u, then s0 s1 m0 m1 */
#define Q8_X_ROWS 8           /* activation rows per register block */
#define Q8_CHUNK_BYTES (256 * 1024) /* quantized activation rows passed over by every tile */

/* Quantized activations of one call: q [rows, in], d [rows, in / 32], sums of d * q per 16 and
 * per 32 elements, and -offset * sum(q) per 16 and 32 (the integer start of each block's dot
 * for the types whose minimum is an offset, u = w + offset). */
typedef struct {
    int8_t *q;
    float *d, *s16, *s32;
    int32_t *c16, *c32;
    int64_t in;
} Q8Rows;

/* Rows of x (fp32 or bf16) -> Q8Rows, rows [begin, end). */
static void q8_quantize_rows(const void *x, int x_is_bf16, int offset, const Q8Rows *a,
                             int64_t begin, int64_t end) {
    int64_t in = a->in, nb = in / QK;
    for (int64_t r = begin; r < end; r++) {
        for (int64_t kb = 0; kb < nb; kb++) {
            __m256 v[4];
            const char *src = (const char *)x + (r * in + kb * QK) * (x_is_bf16 ? 2 : 4);
            __m256 amax = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
            for (int g = 0; g < 4; g++) {
                v[g] = load8(src + g * 8 * (x_is_bf16 ? 2 : 4), x_is_bf16);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[g]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float d = _mm_cvtss_f32(m4) / 127.0f;
            int8_t *q = a->q + r * in + kb * QK;
            int sums[2] = {0, 0};
            if (d == 0.0f) {
                memset(q, 0, QK);
            } else {
                __m256 dv = _mm256_set1_ps(d);
                for (int g = 0; g < 4; g++) {
                    __m256i qi = _mm256_cvtps_epi32(_mm256_div_ps(v[g], dv)); /* nearest even */
                    int32_t lanes[8];
                    _mm256_storeu_si256((__m256i *)lanes, qi);
                    for (int l = 0; l < 8; l++) {
                        q[g * 8 + l] = (int8_t)lanes[l];
                        sums[g / 2] += lanes[l];
                    }
                }
            }
            a->d[r * nb + kb] = d;
            a->s16[r * 2 * nb + 2 * kb] = d * (float)sums[0];
            a->s16[r * 2 * nb + 2 * kb + 1] = d * (float)sums[1];
            a->s32[r * nb + kb] = d * (float)(sums[0] + sums[1]);
            a->c16[r * 2 * nb + 2 * kb] = -offset * sums[0];
            a->c16[r * 2 * nb + 2 * kb + 1] = -offset * sums[1];
            a->c32[r * nb + kb] = -offset * (sums[0] + sums[1]);
        }
    }
}

/* ---- unpacking one block into (u, s, m) per 16 elements ------------------------------------ */

/* Is the type's u above 63 (a signed 8-bit value + 128)? The AVX2 product then multiplies
 * |u - 128| by sign-adjusted activations (vpmaddubsw would saturate on u * q). */
static int q8_signed_values(int type) {
    return type == T_Q8_0 || type == T_IQ4_NL || type == T_IQ4_XS;
}

/* IQ4_VALUES + 128: the unsigned values of the IQ4 types. */
static const uint8_t IQ4_U8[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

PAPHOS_INLINE __m256i q8_set1(int byte) { return _mm256_set1_epi8((char)byte); }

/* The offset of u = w + offset for the types without a minimum of their own (0: a real minimum):
 * their dots start at -offset * sum(q) and skip the minimum term. */
static int q8_offset(int type) {
    switch (type) {
    case T_Q4_0: return 8;
    case T_Q5_0: return 16;
    case T_Q3_K: return 4;
    case T_Q6_K: return 32;
    case T_Q8_0: case T_IQ4_NL: case T_IQ4_XS: return 128;
    }
    return 0;
}

/* Sub-blocks of 16 elements: the scale changes every 16 values (else every 32). */
static int q8_sub16(int type) { return type == T_Q2_K || type == T_Q3_K || type == T_Q6_K; }

/* 16 bytes of packed nibbles -> 32 values: low nibbles are elements 0-15, high 16-31. */
PAPHOS_INLINE void q8_nibbles(const uint8_t *qs, uint8_t *u) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0f);
    _mm_storeu_si128((__m128i *)u, _mm_and_si128(v, mask));
    _mm_storeu_si128((__m128i *)(u + 16), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
}

/* The fifth bits of a Q5_0/Q5_1 block (bit e of qh is element e's) added as 16. */
static void q8_fifth_bits(uint32_t qh, uint8_t *u) {
    for (int e = 0; e < 32; e++) u[e] |= (uint8_t)(((qh >> e) & 1) << 4);
}

/* One block of `type` -> u[block_elements], s and m per 16 elements (s[i], m[i] for elements
 * 16 i .. 16 i + 15). W = s * u + m equals the gguf package's value (up to its fp32 rounding). */
static void q8_unpack_block(int type, const uint8_t *b, uint8_t *u, float *s, float *m) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_IQ4_NL: {
        float d = half_to_float(b), mn;
        if (type == T_Q8_0) {
            for (int e = 0; e < 32; e++) u[e] = (uint8_t)(b[2 + e] ^ 0x80);
            mn = -128.0f * d;
        } else if (type == T_IQ4_NL) {
            for (int j = 0; j < 16; j++) {
                u[j] = (uint8_t)(IQ4_VALUES[b[2 + j] & 0x0f] + 128);
                u[j + 16] = (uint8_t)(IQ4_VALUES[b[2 + j] >> 4] + 128);
            }
            mn = -128.0f * d;
        } else if (type == T_Q4_0) {
            q8_nibbles(b + 2, u);
            mn = -8.0f * d;
        } else if (type == T_Q4_1) {
            q8_nibbles(b + 4, u);
            mn = half_to_float(b + 2);
        } else {
            int has_min = type == T_Q5_1;
            q8_nibbles(b + 6 + 2 * has_min, u);
            q8_fifth_bits(load_u32(b + 2 + 2 * has_min), u);
            mn = has_min ? half_to_float(b + 2) : -16.0f * d;
        }
        s[0] = s[1] = d;
        m[0] = m[1] = mn;
        return;
    }
    case T_Q2_K: {
        const uint8_t *scales = b, *qs = b + 16;
        float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
        for (int i = 0; i < 16; i++) { /* sub-block i: elements 16 i .. 16 i + 15 */
            s[i] = d * (float)(scales[i] & 0x0f);
            m[i] = -(dmin * (float)(scales[i] >> 4));
        }
        /* element half * 128 + shift * 32 + l: (qs[half * 32 + l] >> 2 shift) & 3 */
        for (int half = 0; half < 2; half++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + half * 32));
            for (int shift = 0; shift < 4; shift++)
                _mm256_storeu_si256((__m256i *)(u + half * 128 + shift * 32),
                                    _mm256_and_si256(_mm256_srli_epi16(q, 2 * shift), q8_set1(3)));
        }
        return;
    }
    case T_Q3_K: {
        const uint8_t *hmask = b, *qs = b + 32, *packed = b + 96;
        float d = half_to_float(b + 108);
        for (int i = 0; i < 16; i++) {
            int low = (i < 8 ? packed[i] : packed[i - 8] >> 4) & 0x0f;
            int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
            s[i] = d * (float)((low | (high << 4)) - 32);
            m[i] = -4.0f * s[i];
        }
        /* element half * 128 + shift * 32 + l: value + 4 = low + 4 * (hmask bit half * 4 + shift) */
        __m256i h = _mm256_loadu_si256((const __m256i *)hmask);
        for (int half = 0; half < 2; half++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + half * 32));
            for (int shift = 0; shift < 4; shift++) {
                __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, 2 * shift), q8_set1(3));
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(h, half * 4 + shift), q8_set1(1));
                _mm256_storeu_si256((__m256i *)(u + half * 128 + shift * 32),
                                    _mm256_or_si256(low, _mm256_slli_epi16(high, 2)));
            }
        }
        return;
    }
    case T_Q4_K: case T_Q5_K: {
        float d = half_to_float(b), dmin = half_to_float(b + 2);
        int sc[8], mn[8];
        k_scale_min(b + 4, sc, mn);
        int five = type == T_Q5_K;
        const uint8_t *qs = b + (five ? 48 : 16);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)); /* Q5_K only */
        for (int sb = 0; sb < 8; sb++) {
            s[2 * sb] = s[2 * sb + 1] = d * (float)sc[sb];
            m[2 * sb] = m[2 * sb + 1] = -(dmin * (float)mn[sb]);
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + (sb / 2) * 32));
            __m256i v = _mm256_and_si256(_mm256_srli_epi16(q, 4 * (sb % 2)), q8_set1(0x0f));
            if (five) {
                __m256i bit = _mm256_and_si256(_mm256_srli_epi16(qh, sb), q8_set1(1));
                v = _mm256_or_si256(v, _mm256_slli_epi16(bit, 4));
            }
            _mm256_storeu_si256((__m256i *)(u + sb * 32), v);
        }
        return;
    }
    case T_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        float d = half_to_float(b + 208);
        for (int i = 0; i < 16; i++) {
            s[i] = d * (float)scales[i];
            m[i] = -32.0f * s[i];
        }
        /* element half * 128 + quarter * 32 + l: low 4 bits from ql[half * 64 + (quarter % 2) * 32
         * + l] (nibble quarter / 2), high 2 bits from qh[half * 32 + l] (pair quarter) */
        for (int half = 0; half < 2; half++) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(qh + half * 32));
            for (int quarter = 0; quarter < 4; quarter++) {
                __m256i l = _mm256_loadu_si256((const __m256i *)(ql + half * 64 + (quarter % 2) * 32));
                __m256i low = _mm256_and_si256(_mm256_srli_epi16(l, 4 * (quarter / 2)), q8_set1(0x0f));
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(h, 2 * quarter), q8_set1(3));
                _mm256_storeu_si256((__m256i *)(u + half * 128 + quarter * 32),
                                    _mm256_or_si256(low, _mm256_slli_epi16(high, 4)));
            }
        }
        return;
    }
    case T_IQ4_XS: {
        float d = half_to_float(b);
        int scales_h = b[2] | (b[3] << 8);
        const uint8_t *scales_l = b + 4, *qs = b + 8;
        const __m128i table = _mm_loadu_si128((const __m128i *)IQ4_U8), mask = _mm_set1_epi8(0x0f);
        for (int ib = 0; ib < 8; ib++) {
            int low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f, high = (scales_h >> (2 * ib)) & 3;
            float dl = d * (float)((low | (high << 4)) - 32);
            s[2 * ib] = s[2 * ib + 1] = dl;
            m[2 * ib] = m[2 * ib + 1] = -128.0f * dl;
            __m128i v = _mm_loadu_si128((const __m128i *)(qs + ib * 16));
            _mm_storeu_si128((__m128i *)(u + ib * 32), _mm_shuffle_epi8(table, _mm_and_si128(v, mask)));
            _mm_storeu_si128((__m128i *)(u + ib * 32 + 16),
                             _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(v, 4), mask)));
        }
        return;
    }
    }
}

/* 8 rows x 8 dwords in r[0..8) -> t[j] = dword j of the 8 rows (in row order). */
PAPHOS_INLINE void q8_transpose8x8(const __m256i r[8], __m256i t[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        b[i] = _mm256_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm256_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm256_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm256_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    /* b[0..3]: dwords (0, 4), (1, 5), (2, 6), (3, 7) of rows 0-3 in the two 128-bit lanes;
     * b[4..7]: the same of rows 4-7 */
    for (int j = 0; j < 4; j++) {
        t[j] = _mm256_permute2x128_si256(b[j], b[j + 4], 0x20);
        t[j + 4] = _mm256_permute2x128_si256(b[j], b[j + 4], 0x31);
    }
}

/* The tile's u of 32 columns kb, rows 8 h .. 8 h + 7, from 8 rows of 32 values (stride apart). */
PAPHOS_INLINE void q8_store_u(const uint8_t *src, int64_t stride, uint8_t *tile_kb, int h) {
    __m256i r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(src + i * stride));
    q8_transpose8x8(r, t);
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(tile_kb + j * 64 + 32 * h), t[j]);
}

/* Any type: each of the 16 rows' blocks of one column decoded by q8_unpack_block into
 * buf [16][block_elements], scales straight into the tile, then transposed. */
static void q8_unpack_tile_generic(const Blocks *mb, const uint8_t *const row[Q8_TILE],
                                   uint8_t *buf, uint8_t *tile) {
    int e = mb->block_elements, sub = e / 16;
    for (int64_t c = 0; c < mb->blocks_per_row; c++) {
        int64_t kb0 = c * e / QK;
        for (int r = 0; r < Q8_TILE; r++) {
            float s[16], m[16];
            q8_unpack_block(mb->type, row[r] + c * mb->block_bytes, buf + r * e, s, m);
            for (int i = 0; i < sub; i++) {
                float *f = (float *)(tile + (kb0 + i / 2) * Q8_KB_BYTES + 512);
                f[16 * (i % 2) + r] = s[i];
                f[32 + 16 * (i % 2) + r] = m[i];
            }
        }
        for (int kb = 0; kb < e / QK; kb++)
            for (int h = 0; h < 2; h++)
                q8_store_u(buf + 8 * h * e + kb * QK, e, tile + (kb0 + kb) * Q8_KB_BYTES, h);
    }
}

/* 8 fp16 at row[i] + offset (i < 8) -> fp32 lanes. */
PAPHOS_INLINE __m256 q8_halves8(const uint8_t *const row[8], int64_t offset) {
    uint16_t h[8];
    for (int i = 0; i < 8; i++) memcpy(&h[i], row[i] + offset, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

/* The 32-element types, 8 rows and two blocks (columns kb, kb + 1) at a time: one 8 x 8 dword
 * transpose of the rows' packed values, then the nibbles (and fifth bits, or IQ4 values) split
 * with vector ops. */
static void q8_unpack_pair32(const Blocks *mb, const uint8_t *const row[8], int64_t kb,
                             uint8_t *tile, int h) {
    int type = mb->type, bb = mb->block_bytes;
    int has_min = type == T_Q4_1 || type == T_Q5_1, five = type == T_Q5_0 || type == T_Q5_1;
    int qs_at = 2 + 2 * has_min + 4 * five;
    __m256i r[8], t[8];
    for (int i = 0; i < 8; i++)
        r[i] = _mm256_loadu2_m128i((const __m128i *)(row[i] + (kb + 1) * bb + qs_at),
                                   (const __m128i *)(row[i] + kb * bb + qs_at));
    q8_transpose8x8(r, t);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_U8));
    for (int c = 0; c < 2; c++) {
        uint8_t *dst = tile + (kb + c) * Q8_KB_BYTES;
        __m256i qh = _mm256_setzero_si256();
        if (five) {
            uint32_t bits[8];
            for (int i = 0; i < 8; i++) bits[i] = load_u32(row[i] + (kb + c) * bb + 2 + 2 * has_min);
            qh = _mm256_loadu_si256((const __m256i *)bits);
        }
        for (int j = 0; j < 4; j++) {
            __m256i v = t[4 * c + j];
            __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            if (type == T_IQ4_NL) {
                lo = _mm256_shuffle_epi8(table, lo);
                hi = _mm256_shuffle_epi8(table, hi);
            }
            if (five) { /* bits 4 j .. 4 j + 3 (and 16 + those) of qh, one per byte, as 16 */
                const __m256i spread = _mm256_set1_epi32(0x00204081), one = _mm256_set1_epi32(0x01010101);
                __m256i b_lo = _mm256_and_si256(_mm256_srli_epi32(qh, 4 * j), _mm256_set1_epi32(0x0f));
                __m256i b_hi = _mm256_and_si256(_mm256_srli_epi32(qh, 16 + 4 * j), _mm256_set1_epi32(0x0f));
                b_lo = _mm256_and_si256(_mm256_mullo_epi32(b_lo, spread), one);
                b_hi = _mm256_and_si256(_mm256_mullo_epi32(b_hi, spread), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi32(b_lo, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi32(b_hi, 4));
            }
            _mm256_storeu_si256((__m256i *)(dst + j * 64 + 32 * h), lo);
            _mm256_storeu_si256((__m256i *)(dst + (j + 4) * 64 + 32 * h), hi);
        }
        __m256 d = q8_halves8(row, (kb + c) * bb), mn;
        if (has_min) mn = q8_halves8(row, (kb + c) * bb + 2);
        else mn = _mm256_mul_ps(d, _mm256_set1_ps(type == T_IQ4_NL ? -128.0f : five ? -16.0f : -8.0f));
        float *f = (float *)(dst + 512) + 8 * h;
        _mm256_storeu_ps(f, d);
        _mm256_storeu_ps(f + 16, d);
        _mm256_storeu_ps(f + 32, mn);
        _mm256_storeu_ps(f + 48, mn);
    }
}

/* Q8_0, 8 rows of one block: the values + 128, transposed. */
static void q8_unpack_q8_0(const uint8_t *const row[8], int64_t kb, uint8_t *tile, int h) {
    __m256i r[8], t[8];
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int i = 0; i < 8; i++)
        r[i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row[i] + kb * 34 + 2)), flip);
    q8_transpose8x8(r, t);
    uint8_t *dst = tile + kb * Q8_KB_BYTES;
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(dst + j * 64 + 32 * h), t[j]);
    __m256 d = q8_halves8(row, kb * 34), mn = _mm256_mul_ps(d, _mm256_set1_ps(-128.0f));
    float *f = (float *)(dst + 512) + 8 * h;
    _mm256_storeu_ps(f, d);
    _mm256_storeu_ps(f + 16, d);
    _mm256_storeu_ps(f + 32, mn);
    _mm256_storeu_ps(f + 48, mn);
}

/* Rows [o, o + n) (n <= Q8_TILE; the missing rows repeat row o + n - 1, their outputs are never
 * stored) of the weight -> the tile layout: per 32 columns kb, tile + kb * Q8_KB_BYTES holds u as
 * [8][16 rows][4] bytes, then s0, s1, m0, m1 (16 floats each: the scale/minimum of elements 0-15
 * and 16-31 of the 32). `buf` holds Q8_TILE * 256 bytes. */
static void q8_unpack_tile(const Blocks *mb, const uint8_t *weight, int64_t o, int n,
                           uint8_t *buf, uint8_t *tile) {
    const uint8_t *row[Q8_TILE];
    for (int r = 0; r < Q8_TILE; r++) row[r] = weight + (o + (r < n ? r : n - 1)) * mb->row_bytes;
    int type = mb->type;
    int64_t nb = mb->in / QK, kb = 0;
    if (type == T_Q8_0) {
        for (; kb < nb; kb++)
            for (int h = 0; h < 2; h++) q8_unpack_q8_0(row + 8 * h, kb, tile, h);
        return;
    }
    if (!is_affine32(type) && type != T_IQ4_NL) {
        q8_unpack_tile_generic(mb, row, buf, tile);
        return;
    }
    for (; kb + 1 < nb; kb += 2)
        for (int h = 0; h < 2; h++) q8_unpack_pair32(mb, row + 8 * h, kb, tile, h);
    if (kb < nb) { /* an odd last block */
        const uint8_t *last[Q8_TILE];
        for (int r = 0; r < Q8_TILE; r++) last[r] = row[r] + kb * mb->block_bytes;
        Blocks one = *mb;
        one.blocks_per_row = 1;
        q8_unpack_tile_generic(&one, last, buf, tile + kb * Q8_KB_BYTES);
    }
}

/* ---- AVX2 product of a tile: two halves of 8 rows, activations in register blocks of 4 ------ */

#define Q8_AVX2_ROWS 4

PAPHOS_INLINE __m256i q8_bcast4(const int8_t *at) {
    int32_t v;
    memcpy(&v, at, sizeof(v));
    return _mm256_set1_epi32(v);
}

/* y[i, 0..8) (+= nothing: stored) for activation rows [i0, i0 + nr), one 8-row half h. */
PAPHOS_INLINE __attribute__((always_inline)) void q8_tile_avx2_rows(
    const uint8_t *tile, const Q8Rows *a, int64_t i0, int nr, int h, int sub16, int signed8,
    int ofs, float f_out[Q8_AVX2_ROWS][8]) {
    int64_t nb = a->in / QK;
    __m256 f[Q8_AVX2_ROWS];
    for (int i = 0; i < nr; i++) f[i] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t kb = 0; kb < nb; kb++) {
        const uint8_t *w = tile + kb * Q8_KB_BYTES + 32 * h;
        const float *sm = (const float *)(tile + kb * Q8_KB_BYTES + 512) + 8 * h;
        for (int half = 0; half < 2; half++) {
            if (!sub16 && half) break;
            int j0 = sub16 ? 4 * half : 0, j1 = sub16 ? j0 + 4 : 8;
            __m256i acc[Q8_AVX2_ROWS];
            for (int i = 0; i < nr; i++) {
                int64_t r = i0 + i;
                int32_t c = sub16 ? a->c16[r * 2 * nb + 2 * kb + half] : a->c32[r * nb + kb];
                acc[i] = ofs && !signed8 ? _mm256_set1_epi32(c) : _mm256_setzero_si256();
            }
            if (signed8) { /* |u - 128| times the activations with the sign of u - 128 */
                for (int j = j0; j < j1; j++) {
                    __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + j * 64)), flip);
                    __m256i wa = _mm256_abs_epi8(ws);
                    for (int i = 0; i < nr; i++) {
                        __m256i xb = q8_bcast4(a->q + (i0 + i) * a->in + kb * QK + 4 * j);
                        __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, ws));
                        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
                    }
                }
            } else { /* u <= 63: two products summed in 16 bits stay below 2^15 */
                for (int j = j0; j < j1; j += 2) {
                    __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + j * 64));
                    __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + (j + 1) * 64));
                    for (int i = 0; i < nr; i++) {
                        const int8_t *xq = a->q + (i0 + i) * a->in + kb * QK + 4 * j;
                        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, q8_bcast4(xq)),
                                                     _mm256_maddubs_epi16(w1, q8_bcast4(xq + 4)));
                        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            int part = sub16 ? half : 0;
            __m256 sv = _mm256_loadu_ps(sm + 16 * part), mv = _mm256_loadu_ps(sm + 32 + 16 * part);
            for (int i = 0; i < nr; i++) {
                int64_t r = i0 + i;
                __m256 scale = _mm256_mul_ps(sv, _mm256_set1_ps(a->d[r * nb + kb]));
                f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), scale, f[i]);
                if (signed8 || ofs) continue; /* u - offset was multiplied: no minimum term */
                float xs = sub16 ? a->s16[r * 2 * nb + 2 * kb + half] : a->s32[r * nb + kb];
                f[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs), f[i]);
            }
        }
    }
    for (int i = 0; i < nr; i++) _mm256_storeu_ps(f_out[i], f[i]);
}

static void q8_tile_avx2(const uint8_t *tile, const Q8Rows *a, int64_t rows, int n, int type,
                         void *y, int64_t y_stride, int y_bf16) {
    int sub16 = q8_sub16(type), signed8 = q8_signed_values(type), ofs = q8_offset(type) != 0;
    for (int64_t i0 = 0; i0 < rows; i0 += Q8_AVX2_ROWS) {
        int nr = rows - i0 < Q8_AVX2_ROWS ? (int)(rows - i0) : Q8_AVX2_ROWS;
        for (int h = 0; h < 2 && 8 * h < n; h++) {
            float f[Q8_AVX2_ROWS][8];
            switch (nr) {
            case 1: q8_tile_avx2_rows(tile, a, i0, 1, h, sub16, signed8, ofs, f); break;
            case 2: q8_tile_avx2_rows(tile, a, i0, 2, h, sub16, signed8, ofs, f); break;
            case 3: q8_tile_avx2_rows(tile, a, i0, 3, h, sub16, signed8, ofs, f); break;
            default: q8_tile_avx2_rows(tile, a, i0, 4, h, sub16, signed8, ofs, f); break;
            }
            int cols = n - 8 * h < 8 ? n - 8 * h : 8;
            for (int i = 0; i < nr; i++) {
                int64_t at = (i0 + i) * y_stride + 8 * h;
                if (!y_bf16) {
                    memcpy((float *)y + at, f[i], (size_t)cols * sizeof(float));
                } else if (cols == 8) {
                    store_bf16x8((uint16_t *)y + at, _mm256_loadu_ps(f[i]));
                } else {
                    for (int c = 0; c < cols; c++) ((uint16_t *)y)[at + c] = float_to_bf16(f[i][c]);
                }
            }
        }
    }
}

/* ---- AVX512-VNNI product of a tile: 16 rows per vector, activations in blocks of 8 ---------- */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

AVX512_INLINE __m512i q8_bcast4_512(const int8_t *at) {
    int32_t v;
    memcpy(&v, at, sizeof(v));
    return _mm512_set1_epi32(v);
}

/* 16 floats -> bf16 at dst (lanes in `keep`), rounded as float_to_bf16. */
AVX512_INLINE void q8_store_bf16x16(uint16_t *dst, __mmask16 keep, __m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i high = _mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet), 16);
    _mm256_mask_storeu_epi16(dst, keep, _mm512_cvtepi32_epi16(high));
}

AVX512_INLINE void q8_tile_vnni_rows(const uint8_t *tile, const Q8Rows *a, int64_t i0, int nr,
                                     int sub16, int ofs, int n, void *y, int64_t y_stride,
                                     int y_bf16) {
    int64_t nb = a->in / QK;
    __m512 f[Q8_X_ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < nr; i++) f[i] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < nb; kb++) {
        const uint8_t *w = tile + kb * Q8_KB_BYTES;
        const float *sm = (const float *)(w + 512);
        __m512i wv[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) wv[j] = _mm512_loadu_si512((const void *)(w + j * 64));
        if (sub16) { /* two scales per 32: both halves' sums scaled, then times d once */
            __m512 s0 = _mm512_loadu_ps(sm), s1 = _mm512_loadu_ps(sm + 16);
            __m512 m0 = _mm512_loadu_ps(sm + 32), m1 = _mm512_loadu_ps(sm + 48);
#pragma GCC unroll 8
            for (int i = 0; i < nr; i++) {
                int64_t r = i0 + i;
                const int8_t *xq = a->q + r * a->in + kb * QK;
                const int32_t *c = a->c16 + r * 2 * nb + 2 * kb;
                __m512i acc0 = ofs ? _mm512_set1_epi32(c[0]) : _mm512_setzero_si512();
                __m512i acc1 = ofs ? _mm512_set1_epi32(c[1]) : _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    acc0 = _mm512_dpbusd_epi32(acc0, wv[j], q8_bcast4_512(xq + 4 * j));
                    acc1 = _mm512_dpbusd_epi32(acc1, wv[4 + j], q8_bcast4_512(xq + 16 + 4 * j));
                }
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc0), s0);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc1), s1, t);
                f[i] = _mm512_fmadd_ps(t, _mm512_set1_ps(a->d[r * nb + kb]), f[i]);
                if (!ofs) {
                    const float *xs = a->s16 + r * 2 * nb + 2 * kb;
                    f[i] = _mm512_fmadd_ps(m0, _mm512_set1_ps(xs[0]), f[i]);
                    f[i] = _mm512_fmadd_ps(m1, _mm512_set1_ps(xs[1]), f[i]);
                }
            }
            continue;
        }
        __m512 sv = _mm512_loadu_ps(sm), mv = _mm512_loadu_ps(sm + 32);
#pragma GCC unroll 8
        for (int i = 0; i < nr; i++) {
            int64_t r = i0 + i;
            const int8_t *xq = a->q + r * a->in + kb * QK;
            __m512i acc = ofs ? _mm512_set1_epi32(a->c32[r * nb + kb]) : _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) acc = _mm512_dpbusd_epi32(acc, wv[j], q8_bcast4_512(xq + 4 * j));
            __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(a->d[r * nb + kb]));
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, f[i]);
            if (!ofs) f[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a->s32[r * nb + kb]), f[i]);
        }
    }
    __mmask16 keep = (__mmask16)((1u << n) - 1u);
    for (int i = 0; i < nr; i++) {
        if (y_bf16) q8_store_bf16x16((uint16_t *)y + (i0 + i) * y_stride, keep, f[i]);
        else _mm512_mask_storeu_ps((float *)y + (i0 + i) * y_stride, keep, f[i]);
    }
}

/* The kernel for one (sub16, ofs) pair: each is a constant inside. */
#define Q8_VNNI_VARIANT(name, SUB16, OFS)                                                        \
    static __attribute__((noinline)) void name(const uint8_t *tile, const Q8Rows *a,          \
                                               int64_t rows, int n, void *y, int64_t y_stride, \
                                               int y_bf16) {                                   \
        for (int64_t i0 = 0; i0 < rows; i0 += Q8_X_ROWS) {                                     \
            int nr = rows - i0 < Q8_X_ROWS ? (int)(rows - i0) : Q8_X_ROWS;                     \
            switch (nr) {                                                                      \
            case 1: q8_tile_vnni_rows(tile, a, i0, 1, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 2: q8_tile_vnni_rows(tile, a, i0, 2, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 3: q8_tile_vnni_rows(tile, a, i0, 3, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 4: q8_tile_vnni_rows(tile, a, i0, 4, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 5: q8_tile_vnni_rows(tile, a, i0, 5, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 6: q8_tile_vnni_rows(tile, a, i0, 6, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            case 7: q8_tile_vnni_rows(tile, a, i0, 7, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            default: q8_tile_vnni_rows(tile, a, i0, 8, SUB16, OFS, n, y, y_stride, y_bf16); break; \
            }                                                                                  \
        }                                                                                      \
    }

Q8_VNNI_VARIANT(q8_tile_vnni_min32, 0, 0)
Q8_VNNI_VARIANT(q8_tile_vnni_ofs32, 0, 1)
Q8_VNNI_VARIANT(q8_tile_vnni_min16, 1, 0)
Q8_VNNI_VARIANT(q8_tile_vnni_ofs16, 1, 1)

static void q8_tile_vnni(const uint8_t *tile, const Q8Rows *a, int64_t rows, int n, int type,
                         void *y, int64_t y_stride, int y_bf16) {
    int sub16 = q8_sub16(type), ofs = q8_offset(type) != 0;
    if (sub16) (ofs ? q8_tile_vnni_ofs16 : q8_tile_vnni_min16)(tile, a, rows, n, y, y_stride, y_bf16);
    else (ofs ? q8_tile_vnni_ofs32 : q8_tile_vnni_min32)(tile, a, rows, n, y, y_stride, y_bf16);
}

#pragma GCC pop_options

/* 1 when this CPU runs the VNNI product (isa = 1 in paphos_gguf_gemm_q8). */
int paphos_gguf_has_vnni(void) {
    __builtin_cpu_init();
    return paphos_gguf_has_avx512() && __builtin_cpu_supports("avx512vnni");
}

/* Activations -> q [rows, in] int8 and d [rows, in / 32] fp32 (the quantization of
 * paphos_gguf_gemm_q8, exported for its tests). Returns 0, or -2 in, -3 rows, -5 a pointer. */
int paphos_gguf_quantize_q8(const void *x, int x_is_bf16, int64_t rows, int64_t in, int8_t *q,
                            float *d) {
    if (in < QK || in % QK) return -2;
    if (rows < 0) return -3;
    if (!x || !q || !d) return -5;
    int64_t nb = in / QK;
    float *sums = (float *)malloc((size_t)(rows * nb * 6 + 1) * sizeof(float));
    if (!sums) return -6;
    int32_t *c = (int32_t *)(sums + rows * nb * 3);
    Q8Rows a = {q, d, sums, sums + rows * nb * 2, c, c + rows * nb * 2, in};
    q8_quantize_rows(x, x_is_bf16, 0, &a, 0, rows);
    free(sums);
    return 0;
}

/* y[b, o] (row stride y_stride; fp32, or bf16 rounded once when y_is_bf16) = xq[b] . W[o] for
 * b < rows, x [rows, in] contiguous fp32 or bf16 (x_is_bf16), xq its 8-bit quantization (file
 * comment). isa: 0 AVX2, 1 AVX512-VNNI (only where paphos_gguf_has_vnni). Returns 0, or -1 an
 * unknown type, -2 in, -3 rows, -4 num_threads, -5 a null pointer, -6 out of memory, -7 out,
 * -8 isa. */
int paphos_gguf_gemm_q8(int type, const void *x, int x_is_bf16, int64_t rows,
                        const uint8_t *weight, int64_t out, int64_t in, void *y, int y_is_bf16,
                        int64_t y_stride, int isa, int num_threads) {
    Blocks mb;
    int code = blocks_for(type, in, &mb);
    if (code) return code;
    if (in % QK) return -2;
    if (rows < 1) return -3;
    if (num_threads < 1) return -4;
    if (!x || !weight || !y) return -5;
    if (out < 1 || y_stride < out) return -7;
    if (isa != 0 && !(isa == 1 && paphos_gguf_has_vnni())) return -8;
    int64_t nb = in / QK, tiles = (out + Q8_TILE - 1) / Q8_TILE;
    int threads = num_threads < tiles ? num_threads : (int)tiles;
    if (rows * out * in < (1 << 20)) threads = 1;
    /* per thread: one column of unpacked blocks, the tile; then the quantized activations */
    size_t per_thread = (size_t)(Q8_TILE * QK_K + nb * Q8_KB_BYTES + 64);
    size_t act = (size_t)(rows * in + rows * nb * 7 * 4 + 64);
    uint8_t *mem = (uint8_t *)aligned_alloc(64, ((per_thread * threads + act) + 63) / 64 * 64);
    if (!mem) return -6;
    uint8_t *act_mem = mem + per_thread * threads;
    float *act_f = (float *)(act_mem + (rows * in + 63) / 64 * 64);
    int32_t *act_c = (int32_t *)(act_f + rows * nb * 4);
    Q8Rows a = {(int8_t *)act_mem, act_f, act_f + rows * nb, act_f + rows * nb * 3,
                act_c, act_c + rows * nb * 2, in};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = omp_get_thread_num(), n_t = omp_get_num_threads();
        q8_quantize_rows(x, x_is_bf16, q8_offset(type), &a, rows * t / n_t, rows * (t + 1) / n_t);
#pragma omp barrier
        uint8_t *base = mem + per_thread * t;
        uint8_t *buf = base, *tile = base + Q8_TILE * QK_K;
        tile = (uint8_t *)(((uintptr_t)tile + 63) & ~(uintptr_t)63);
        /* activation rows in chunks that stay in L2 while every tile of this thread passes over
         * them (each tile is unpacked again per chunk: a few rows' worth of work) */
        int64_t chunk = Q8_CHUNK_BYTES / in;
        chunk = chunk < 32 ? 32 : chunk / 8 * 8;
        for (int64_t c = 0; c < rows; c += chunk) {
            int64_t nc = rows - c < chunk ? rows - c : chunk;
            Q8Rows part = {a.q + c * in,         a.d + c * nb,        a.s16 + c * nb * 2,
                           a.s32 + c * nb,       a.c16 + c * nb * 2, a.c32 + c * nb, in};
            for (int64_t k = tiles * t / n_t; k < tiles * (t + 1) / n_t; k++) {
                int64_t o = k * Q8_TILE;
                int n = out - o < Q8_TILE ? (int)(out - o) : Q8_TILE;
                q8_unpack_tile(&mb, weight, o, n, buf, tile);
                void *yc = (char *)y + (c * y_stride + o) * (y_is_bf16 ? 2 : 4);
                if (isa == 1) q8_tile_vnni(tile, &part, nc, n, type, yc, y_stride, y_is_bf16);
                else q8_tile_avx2(tile, &part, nc, n, type, yc, y_stride, y_is_bf16);
            }
        }
    }
    free(mem);
    return 0;
}
