/* Paged attention for x86-64 CPUs with AVX2 + FMA, reading K/V in place from the paged cache.
 *
 * Semantics of paphos/ops/paged_attention.py: query token i of sequence b (q_len tokens, context
 * seq_len) sits at position seq_len - q_len + i and attends to context positions <= its own;
 * query head h reads kv head h / (num_heads / num_kv_heads). One pass over the keys with an online
 * softmax in fp32. Invariant: each output row is computed by one thread in one fixed order over its
 * keys, so results do not depend on the rest of the batch or on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "simd_base.c"

#define SPAN 256     /* keys per online-softmax step at most (a multiple of 8) */
#define ROWS 8       /* query rows of one prefill sequence per work item */
#define CHUNK 64     /* head dims accumulated in registers at once (8 ymm) */
#define MAX_HEAD 512 /* largest head_size accepted */
/* Below this many (query head, key) pairs per thread, waking another thread costs more than it
 * saves. */
#ifndef MIN_WORK_PER_THREAD
#define MIN_WORK_PER_THREAD 4096
#endif
#define DECODES_PER_THREAD 4 /* decodes per thread from which one item takes all kv heads */
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

typedef struct {
    const char *base; /* K half of [2, num_blocks, block_size, num_kv_heads, head_size] */
    int bf16;
    int64_t elem;         /* bytes per element */
    int64_t key_stride;   /* bytes between consecutive positions: num_kv_heads * head_size */
    int64_t block_bytes;  /* block_size * key_stride */
    int64_t value_offset; /* bytes from a key to its value: num_blocks * block_bytes */
    int64_t num_blocks, block_size, head_size;
    const int64_t *block_tables; /* [num_seqs, table_stride] */
    int64_t table_stride;
} Cache;

typedef struct {
    const char *query; /* [num_tokens, num_heads, head_size], tokens token_stride elements apart */
    char *out;         /* [num_tokens, num_heads, head_size] contiguous, the query's dtype */
    int bf16;
    int64_t token_stride, num_heads, group;
    float scale_log2; /* softmax scale times log2(e): scores live in base 2 */
} Queries;

typedef struct {
    int64_t seq, token0, num_rows, first_pos, kv_head, num_kv;
} Item; /* num_rows query rows of one sequence (positions first_pos...) against num_kv kv heads
         * from kv_head; its queries are indexed row * (num_kv * group) + head - kv_head * group */

typedef struct {
    float *q, *acc, *scores, *m, *l; /* [n, head], [n, head], [n, SPAN], [n], [n]; n = ROWS*heads */
} Scratch;

/* 16 cache elements widened to fp32. bf16 widens with one load and two unpacks, which yields
 * elements {0-3, 8-11} and {4-7, 12-15}: queries and accumulators of a bf16 cache are kept in that
 * order (see swap_quads); fp32 comes in order. */
static inline __attribute__((always_inline)) void load16(const char *at, int bf16, __m256 *lo,
                                                         __m256 *hi) {
    if (bf16) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)at);
        __m256i zero = _mm256_setzero_si256();
        *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
        *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
    } else {
        *lo = _mm256_loadu_ps((const float *)at);
        *hi = _mm256_loadu_ps((const float *)at + 8);
    }
}

/* Swap elements 4-7 and 8-11 of every 16: maps natural order to load16's bf16 order and back. */
static void swap_quads(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        float tmp[4];
        memcpy(tmp, x + i + 4, sizeof(tmp));
        memcpy(x + i + 4, x + i + 8, sizeof(tmp));
        memcpy(x + i + 8, tmp, sizeof(tmp));
    }
}

static inline float horizontal_max(__m256 v) {
    __m128 max4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 max2 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
    return _mm_cvtss_f32(_mm_max_ss(max2, _mm_movehdup_ps(max2)));
}

/* [sum(a[0]), ..., sum(a[7])]: the eight horizontal sums in one vector. */
static inline __m256 sum8(const __m256 a[8]) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* u0: [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], u1 the same for a4..a7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* 2^x for x <= 0, exactly 0 below -126 (and for -inf). Taylor series of e^f to f^7/7! with
 * |f| <= ln2/2: relative error below 1e-8 before the final roundings. */
static inline __m256 exp2_nonpositive(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(LN2));
    static const float inverse_factorials[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                                1.0f / 6,    0.5f,       1.0f,       1.0f};
    __m256 p = _mm256_set1_ps(inverse_factorials[0]);
    for (int k = 1; k < 8; k++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(inverse_factorials[k]));
    __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23));
    return _mm256_and_ps(_mm256_mul_ps(p, two_n), keep);
}

/* Where position pos of a sequence (block table `table`) keeps its key for kv head `kv_head`; its
 * value is value_offset bytes further. */
static inline const char *key_address(const Cache *c, const int64_t *table, int64_t pos,
                                      int64_t kv_head) {
    return c->base + table[pos / c->block_size] * c->block_bytes +
           (pos % c->block_size) * c->key_stride + kv_head * c->head_size * c->elem;
}

/* Keys left in pos's block, capped at n. */
static inline int64_t run_in_block(const Cache *c, int64_t pos, int64_t n) {
    int64_t left = c->block_size - pos % c->block_size;
    return left < n ? left : n;
}

/* scores[t] = q . key t for n keys from `keys` (key_stride bytes apart), eight keys at a time. */
static inline __attribute__((always_inline)) void dot_keys(const float *q, const char *keys,
                                                           int64_t key_stride, int64_t n,
                                                           int64_t head, int bf16, float *scores) {
    int64_t elem = bf16 ? 2 : 4, t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < head; d += 16) {
            __m256 q_lo = _mm256_loadu_ps(q + d), q_hi = _mm256_loadu_ps(q + d + 8);
            for (int j = 0; j < 8; j++) {
                __m256 k_lo, k_hi;
                load16(keys + (t + j) * key_stride + d * elem, bf16, &k_lo, &k_hi);
                acc[j] = _mm256_fmadd_ps(k_lo, q_lo, acc[j]);
                acc[j] = _mm256_fmadd_ps(k_hi, q_hi, acc[j]);
            }
        }
        _mm256_storeu_ps(scores + t, sum8(acc));
    }
    for (; t < n; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < head; d += 16) {
            __m256 k_lo, k_hi;
            load16(keys + t * key_stride + d * elem, bf16, &k_lo, &k_hi);
            acc = _mm256_fmadd_ps(k_lo, _mm256_loadu_ps(q + d), acc);
            acc = _mm256_fmadd_ps(k_hi, _mm256_loadu_ps(q + d + 8), acc);
        }
        scores[t] = horizontal_sum(acc);
    }
}

#ifdef __AVX512BF16__
#define KEYS_BY_DPBF16 1
/* [sum(a[0]), ..., sum(a[15])]: sixteen horizontal sums in one vector. */
static inline __m512 sum16(const __m512 a[16]) {
    __m256 halves[16];
    for (int j = 0; j < 16; j++)
        halves[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm512_extractf32x8_ps(a[j], 1));
    __m256 lo = sum8(halves), hi = sum8(halves + 8);
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

/* dot_keys for bf16 queries and keys (AVX-512 BF16): q [head] bf16 in natural order, unscaled;
 * 32 products per `vdpbf16ps` (exact, summed in fp32), 16 keys at a time, then scaled. */
static inline __attribute__((always_inline)) void dot_keys_dpbf16(
    const uint16_t *q, const char *keys, int64_t key_stride, int64_t n, int64_t head, float scale,
    float *scores) {
    int64_t full = head - head % 32, t = 0;
    __mmask32 tail = (__mmask32)((1u << (head % 32)) - 1); /* head % 32 is 0 or 16 */
    for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < full; d += 32) {
            __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d);
            for (int j = 0; j < 16; j++) {
                const char *at = keys + (t + j) * key_stride + d * 2;
                acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(at), qv);
            }
        }
        if (tail) {
            __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(tail, q + full);
            for (int j = 0; j < 16; j++) {
                const char *at = keys + (t + j) * key_stride + full * 2;
                __m512bh k = (__m512bh)_mm512_maskz_loadu_epi16(tail, at);
                acc[j] = _mm512_dpbf16_ps(acc[j], k, qv);
            }
        }
        _mm512_storeu_ps(scores + t, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
    for (; t < n; t++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < head; d += 32) {
            __mmask32 mask = head - d >= 32 ? (__mmask32)0xffffffffu : tail;
            __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(mask, q + d);
            __m512bh k = (__m512bh)_mm512_maskz_loadu_epi16(mask, keys + t * key_stride + d * 2);
            acc = _mm512_dpbf16_ps(acc, k, qv);
        }
        scores[t] = _mm512_reduce_add_ps(acc) * scale;
    }
}
#else
#define KEYS_BY_DPBF16 0
#endif

/* Whether scores are bf16 queries times bf16 keys by vdpbf16ps (the queries then stay bf16). */
static inline int scores_by_dpbf16(const Cache *c, const Queries *qs) {
    return KEYS_BY_DPBF16 && c->bf16 && qs->bf16;
}

/* Online softmax over one span of n scores (base 2): turns scores[0..n) into weights
 * 2^(s - max), updates the running max *m and sum *l, and rescales acc [head] to the new max. */
static void softmax_step(float *scores, int64_t n, float *m, float *l, float *acc, int64_t head) {
    int64_t padded = (n + 7) & ~(int64_t)7;
    for (int64_t t = n; t < padded; t++) scores[t] = -INFINITY;
    __m256 highest = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8)
        highest = _mm256_max_ps(highest, _mm256_loadu_ps(scores + t));
    float span_max = horizontal_max(highest), new_max = span_max > *m ? span_max : *m;
    __m256 shift = _mm256_set1_ps(new_max);
    for (int64_t t = 0; t < padded; t += 8) {
        __m256 p = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift));
        _mm256_storeu_ps(scores + t, p);
        total = _mm256_add_ps(total, p);
    }
    float correction = exp2f(*m - new_max); /* 0 on the first span (*m is -inf) */
    if (correction != 1.0f) {
        __m256 factor = _mm256_set1_ps(correction);
        for (int64_t d = 0; d < head; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), factor));
    }
    *l = *l * correction + horizontal_sum(total);
    *m = new_max;
}

/* acc[0 .. 16*groups) += sum_t p[t] * value t, for n values `stride` bytes apart from `values`,
 * with the accumulators held in registers. */
static inline __attribute__((always_inline)) void add_values_chunk(float *acc, const float *p,
                                                                   const char *values,
                                                                   int64_t stride, int64_t n,
                                                                   int groups, int bf16) {
    __m256 a[CHUNK / 8];
    for (int j = 0; j < 2 * groups; j++) a[j] = _mm256_loadu_ps(acc + 8 * j);
    for (int64_t t = 0; t < n; t++) {
        __m256 weight = _mm256_set1_ps(p[t]);
        for (int j = 0; j < groups; j++) {
            __m256 v_lo, v_hi;
            load16(values + t * stride + j * 16 * (bf16 ? 2 : 4), bf16, &v_lo, &v_hi);
            a[2 * j] = _mm256_fmadd_ps(weight, v_lo, a[2 * j]);
            a[2 * j + 1] = _mm256_fmadd_ps(weight, v_hi, a[2 * j + 1]);
        }
    }
    for (int j = 0; j < 2 * groups; j++) _mm256_storeu_ps(acc + 8 * j, a[j]);
}

/* acc [head] += sum_t p[t] * value t, CHUNK dims at a time. */
static void add_values(float *acc, const float *p, const char *values, int64_t stride, int64_t n,
                       int64_t head, int bf16) {
    for (int64_t d = 0; d < head; d += CHUNK) {
        int groups = (int)((head - d < CHUNK ? head - d : CHUNK) / 16);
        const char *at = values + d * (bf16 ? 2 : 4);
#define CASE(G, B) \
    if (groups == G && bf16 == B) add_values_chunk(acc + d, p, at, stride, n, G, B);
        CASE(4, 1) CASE(4, 0) CASE(3, 1) CASE(3, 0) CASE(2, 1) CASE(2, 0) CASE(1, 1) CASE(1, 0)
#undef CASE
    }
}

/* The item's queries as fp32, scaled to base-2 scores, in the cache's element order; or (dpbf16)
 * their bf16 bits unscaled, in natural order. */
static void load_queries(const Queries *qs, const Item *it, int64_t head, int cache_bf16,
                         int dpbf16, Scratch *s) {
    int64_t heads = it->num_kv * qs->group;
    for (int64_t r = 0; r < it->num_rows; r++) {
        for (int64_t g = 0; g < heads; g++) {
            int64_t at = (it->token0 + r) * qs->token_stride +
                         (it->kv_head * qs->group + g) * head;
            float *q = s->q + (r * heads + g) * head;
            if (dpbf16) { /* bf16 bits as they are, in the first half of the query's room */
                memcpy(q, (const uint16_t *)qs->query + at, (size_t)head * 2);
                continue;
            }
            for (int64_t d = 0; d < head; d++) {
                float x = qs->bf16 ? bf16_to_float(((const uint16_t *)qs->query)[at + d])
                                   : ((const float *)qs->query)[at + d];
                q[d] = x * qs->scale_log2;
            }
            if (cache_bf16) swap_quads(q, head);
        }
    }
}

static void store_attention_outputs(const Queries *qs, const Item *it, int64_t head, int cache_bf16,
                          Scratch *s) {
    int64_t heads = it->num_kv * qs->group;
    for (int64_t r = 0; r < it->num_rows; r++) {
        for (int64_t g = 0; g < heads; g++) {
            int64_t i = r * heads + g;
            float *acc = s->acc + i * head, inverse = 1.0f / s->l[i];
            if (cache_bf16) swap_quads(acc, head);
            int64_t at = ((it->token0 + r) * qs->num_heads + it->kv_head * qs->group + g) * head;
            for (int64_t d = 0; d < head; d++) {
                float value = acc[d] * inverse;
                if (qs->bf16) ((uint16_t *)qs->out)[at + d] = float_to_bf16(value);
                else ((float *)qs->out)[at + d] = value;
            }
        }
    }
}

/* Keys of row r visible among the n_max positions from pos on (0 when none). */
static inline int64_t visible(const Item *it, int64_t r, int64_t pos, int64_t n_max) {
    int64_t n = it->first_pos + r + 1 - pos;
    return n <= 0 ? 0 : n < n_max ? n : n_max;
}

/* Phase 1 of a span: every query's scores, one block run of keys at a time, so that each run
 * is read from memory once and reused from L1 by all the item's queries. */
static void score_span(const Cache *c, const Queries *qs, const Item *it, const int64_t *table,
                       int64_t pos, int64_t n_max, Scratch *s) {
    int64_t heads = it->num_kv * qs->group, head_bytes = c->head_size * c->elem;
    int dpbf16 = scores_by_dpbf16(c, qs);
    for (int64_t t = 0, m; t < n_max; t += m) {
        m = run_in_block(c, pos + t, n_max - t);
        const char *keys = key_address(c, table, pos + t, it->kv_head);
        for (int64_t r = 0; r < it->num_rows; r++) {
            int64_t n = visible(it, r, pos + t, m);
            for (int64_t g = 0; g < heads && n > 0; g++) {
                int64_t i = r * heads + g;
                const float *q = s->q + i * c->head_size;
                const char *at = keys + g / qs->group * head_bytes;
                float *scores = s->scores + i * SPAN + t;
#if KEYS_BY_DPBF16
                if (dpbf16) {
                    dot_keys_dpbf16((const uint16_t *)q, at, c->key_stride, n, c->head_size,
                                    qs->scale_log2, scores);
                    continue;
                }
#endif
                if (c->bf16) dot_keys(q, at, c->key_stride, n, c->head_size, 1, scores);
                else dot_keys(q, at, c->key_stride, n, c->head_size, 0, scores);
            }
        }
    }
}

/* Phase 3 of a span: every query's weighted values, one block run at a time (as phase 1). */
static void add_span_values(const Cache *c, const Queries *qs, const Item *it,
                            const int64_t *table, int64_t pos, int64_t n_max, Scratch *s) {
    int64_t heads = it->num_kv * qs->group, head_bytes = c->head_size * c->elem;
    for (int64_t t = 0, m; t < n_max; t += m) {
        m = run_in_block(c, pos + t, n_max - t);
        const char *values = key_address(c, table, pos + t, it->kv_head) + c->value_offset;
        for (int64_t r = 0; r < it->num_rows; r++) {
            int64_t n = visible(it, r, pos + t, m);
            for (int64_t g = 0; g < heads && n > 0; g++) {
                int64_t i = r * heads + g;
                add_values(s->acc + i * c->head_size, s->scores + i * SPAN + t,
                           values + g / qs->group * head_bytes, c->key_stride, n, c->head_size,
                           c->bf16);
            }
        }
    }
}

/* One work item: every query head of the group and every row, one pass over positions 0..last
 * row's position in spans of up to SPAN keys (scores, softmax step, values); each row stops at
 * its own position. */
static void run_item(const Cache *c, const Queries *qs, const Item *it, Scratch *s) {
    int64_t head = c->head_size, heads = it->num_kv * qs->group, n_queries = it->num_rows * heads;
    load_queries(qs, it, head, c->bf16, scores_by_dpbf16(c, qs), s);
    memset(s->acc, 0, (size_t)(n_queries * head) * sizeof(float));
    for (int64_t i = 0; i < n_queries; i++) s->m[i] = -INFINITY, s->l[i] = 0.0f;
    const int64_t *table = c->block_tables + it->seq * c->table_stride;
    int64_t end = it->first_pos + it->num_rows; /* positions [0, end) */
    for (int64_t pos = 0; pos < end; pos += SPAN) {
        int64_t n_max = end - pos < SPAN ? end - pos : SPAN;
        score_span(c, qs, it, table, pos, n_max, s);
        for (int64_t i = 0; i < n_queries; i++) {
            int64_t n = visible(it, i / heads, pos, n_max);
            if (n > 0)
                softmax_step(s->scores + i * SPAN, n, s->m + i, s->l + i, s->acc + i * head, head);
        }
        add_span_values(c, qs, it, table, pos, n_max, s);
    }
    store_attention_outputs(qs, it, head, c->bf16, s);
}

/* Checks sequence b's bounds and blocks; returns 0 or the error code (see paphos_paged_attention).
 */
static int check_sequence(const Cache *c, const int64_t *query_start_loc, const int64_t *seq_lens,
                          int64_t b, int64_t num_tokens, int64_t max_blocks) {
    int64_t start = query_start_loc[b], q_len = query_start_loc[b + 1] - start;
    if (start < 0 || q_len < 0 || query_start_loc[b + 1] > num_tokens) return -5;
    if (q_len > seq_lens[b]) return -6;
    int64_t used = (seq_lens[b] + c->block_size - 1) / c->block_size;
    if (used > max_blocks) return -7;
    for (int64_t j = 0; j < used; j++) {
        int64_t block = c->block_tables[b * c->table_stride + j];
        if (block < 0 || block >= c->num_blocks) return -8;
    }
    return 0;
}

/* Appends sequence b's items (its row chunks, last chunk first: the costliest go out first),
 * each over num_kv of the num_kv_heads kv heads. */
static int64_t add_items(Item *items, int64_t count, int64_t b, int64_t start, int64_t q_len,
                         int64_t seq_len, int64_t num_kv_heads, int64_t num_kv) {
    for (int64_t r0 = (q_len - 1) / ROWS * ROWS; r0 >= 0 && q_len > 0; r0 -= ROWS) {
        int64_t rows = q_len - r0 < ROWS ? q_len - r0 : ROWS;
        for (int64_t h = 0; h < num_kv_heads; h += num_kv)
            items[count++] = (Item){b, start + r0, rows, seq_len - q_len + r0, h, num_kv};
    }
    return count;
}

/* Scratch floats one thread needs for items of up to ROWS rows of num_heads query heads. */
static int64_t scratch_floats(int64_t num_heads, int64_t head_size) {
    int64_t n = ROWS * num_heads;
    return 2 * n * head_size + n * SPAN + 2 * n;
}

/* Thread t's scratch inside `pool` (threads x scratch_floats). */
static Scratch scratch_at(float *pool, int64_t num_heads, int64_t head_size, int t) {
    int64_t n = ROWS * num_heads;
    float *base = pool + scratch_floats(num_heads, head_size) * t;
    Scratch s = {base, base + n * head_size, base + 2 * n * head_size,
                 base + 2 * n * head_size + n * SPAN, base + 2 * n * head_size + n * SPAN + n};
    return s;
}

/* Not inlined: it keeps this file's floating-point flags in translation units that include it. */
static __attribute__((noinline)) void run_item_at(const Cache *c, const Queries *qs,
                                                  const Item *it, Scratch *s) {
    run_item(c, qs, it, s);
}

static int run_items(const Cache *c, const Queries *qs, const Item *items, int64_t num_items,
                     int threads) {
    int64_t per_thread = scratch_floats(qs->num_heads, c->head_size);
    float *pool = (float *)malloc((size_t)(per_thread * threads) * sizeof(float));
    if (!pool) return -4;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch s = scratch_at(pool, qs->num_heads, c->head_size, omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < num_items; i++) run_item_at(c, qs, &items[i], &s);
    }
    free(pool);
    return 0;
}

/* Work items of the whole batch, prefill sequences first; *work gets the (query head, key) pairs.
 * A prefill chunk's item covers one kv head; a decode's covers all of them when there are enough
 * decodes to keep the threads busy (a thread then reads whole cache blocks, a stream the hardware
 * prefetcher follows, instead of one head's rows of each). Returns the item count, or an error
 * code with *bad_seq naming the sequence. */
static int64_t build_items(const Cache *c, const Queries *qs, const int64_t *query_start_loc,
                           const int64_t *seq_lens, int64_t num_seqs, int64_t num_tokens,
                           int64_t max_blocks, int num_threads, Item *items, int64_t *work,
                           int64_t *bad_seq) {
    int64_t count = 0, num_kv_heads = qs->num_heads / qs->group, num_decodes = 0;
    *work = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t b = 0; b < num_seqs; b++) {
            int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
            if (pass == 0) {
                int code = check_sequence(c, query_start_loc, seq_lens, b, num_tokens, max_blocks);
                if (code != 0) {
                    *bad_seq = b;
                    return code;
                }
                *work += qs->num_heads * q_len * (seq_lens[b] - (q_len - 1) / 2);
                num_decodes += q_len == 1;
            }
            int64_t num_kv = pass == 1 && num_decodes >= DECODES_PER_THREAD * num_threads
                                 ? num_kv_heads
                                 : 1;
            if ((q_len > 1) == (pass == 0))
                count = add_items(items, count, b, query_start_loc[b], q_len, seq_lens[b],
                                  num_kv_heads, num_kv);
        }
    }
    return count;
}

/* The cache [2, num_blocks, block_size, num_kv_heads, head_size] read through block_tables. */
static Cache cache_for(const void *kv_cache, int cache_bf16, int64_t num_blocks,
                       int64_t block_size, int64_t num_kv_heads, int64_t head_size,
                       const int64_t *block_tables, int64_t table_stride) {
    int64_t elem = cache_bf16 ? 2 : 4, key_stride = num_kv_heads * head_size * elem;
    Cache c = {(const char *)kv_cache, cache_bf16, elem, key_stride, block_size * key_stride,
               num_blocks * block_size * key_stride, num_blocks, block_size, head_size,
               block_tables, table_stride};
    return c;
}

/* out = attention of query over the paged cache (see the file comment). Returns 0 on success, a
 * negative code naming the first bad argument otherwise: -1 a size (head_size must be a multiple
 * of 16 up to MAX_HEAD, num_heads a multiple of num_kv_heads), -2 num_threads, -3 a null pointer,
 * -4 out of memory, -5 query_start_loc, -6 a query longer than its context, -7 a context longer
 * than its block table, -8 a block id outside the cache; for -5..-8 *bad_seq is the sequence. */
int paphos_paged_attention(const void *query, int query_bf16, int64_t query_token_stride,
                           void *out, const void *kv_cache, int cache_bf16, int64_t num_blocks,
                           int64_t block_size, int64_t num_kv_heads, int64_t head_size,
                           int64_t num_heads, int64_t num_tokens, const int64_t *query_start_loc,
                           const int64_t *seq_lens, int64_t num_seqs, const int64_t *block_tables,
                           int64_t table_stride, int64_t max_blocks, float scale, int num_threads,
                           int64_t *bad_seq) {
    if (head_size < 16 || head_size % 16 || head_size > MAX_HEAD || num_kv_heads < 1 ||
        num_heads % num_kv_heads || block_size < 1 || num_blocks < 0 || num_seqs < 0)
        return -1;
    if (num_threads < 1) return -2;
    if (!query || !out || !kv_cache || !query_start_loc || !seq_lens || !block_tables || !bad_seq)
        return -3;
    Cache c = cache_for(kv_cache, cache_bf16, num_blocks, block_size, num_kv_heads, head_size,
                        block_tables, table_stride);
    Queries qs = {(const char *)query, (char *)out, query_bf16, query_token_stride, num_heads,
                  num_heads / num_kv_heads, scale * LOG2E};
    int64_t capacity = num_kv_heads * (num_tokens / ROWS + num_seqs + 1), work;
    Item *items = (Item *)malloc((size_t)capacity * sizeof(Item));
    if (!items) return -4;
    int64_t count = build_items(&c, &qs, query_start_loc, seq_lens, num_seqs, num_tokens,
                                max_blocks, num_threads, items, &work, bad_seq);
    int code = count < 0 ? (int)count : 0;
    if (code == 0 && count > 0) {
        int64_t useful = work / MIN_WORK_PER_THREAD + 1;
        useful = useful < count ? useful : count;
        code = run_items(&c, &qs, items, count, useful < num_threads ? (int)useful : num_threads);
    }
    free(items);
    return code;
}
