/* One Llama-style decoder layer for a pure-decode batch (1..4 sequences, one token each) in one
 * call and one OpenMP parallel region, built from the routines of matvec.c, gguf_matvec.c,
 * attention.c, norm_rope.c and activation.c (one translation unit). A projection's weight is
 * dense rows in the layer dtype or GGUF blocks of one type (products from the blocks, fp32
 * sums, then + bias and one rounding, as GGUFLinearMethod.apply). Invariant: every value is
 * computed and rounded where the unfused layer computes and rounds it (with those same routines,
 * which the op registry and the linear methods pick for it on the CPU), so the results equal the
 * unfused layer's bit for bit at the same ISA level.
 */
#include "matvec.c"
#include "gguf_matvec.c"
#include "attention.c"
#include "norm_rope.c"
#include "activation.c"

#define MAX_TOKENS MAX_ROWS /* the matvec kernel's row limit */
#define ALIGN 64            /* bytes: workspace parts start on their own cache lines */

typedef struct {
    const void *input_norm, *post_norm;   /* [hidden] */
    const void *qkv, *o, *gate_up, *down; /* [out, in] weights */
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* [out] fp32, or NULL */
    const void *cos_sin;                                       /* [max_position, head_size] */
    int64_t cos_sin_bf16, max_position, is_neox;
    int64_t hidden, num_heads, num_kv_heads, head_size, intermediate;
    int64_t is_bf16; /* activations, dense weights, norms and cache: bf16 (else fp32) */
    float input_eps, post_eps, scale, unused;
    /* ggml type of each projection's blocks ([out, row_bytes] uint8), or -1: dense rows */
    int64_t qkv_type, o_type, gate_up_type, down_type;
    int64_t gguf_isa; /* paphos_gguf_matvec's isa for the block products */
} LayerSpec;

typedef struct {
    int64_t num_tokens;                            /* = sequences, 1..MAX_TOKENS */
    const int64_t *positions, *slot_mapping;       /* [num_tokens] */
    const int64_t *query_start_loc, *seq_lens;     /* [num_tokens + 1], [num_tokens] */
    const int64_t *block_tables;                   /* [num_tokens, table_stride] */
    int64_t table_stride, max_blocks, num_blocks, block_size; /* tables and every layer's cache */
    int64_t num_threads;
    void *hidden, *residual; /* [MAX_TOKENS, hidden] each: outputs (residual also input) */
    void *workspace;
    int64_t workspace_bytes;
    int64_t bad_seq; /* out: the sequence an error code names, else -1 */
} DecodeStep;

typedef struct {
    float *x_fp32;             /* [MAX_TOKENS, widest input] the next matvec's prepared input */
    char *qkv, *attn, *normed; /* [MAX_TOKENS, q + 2 kv], [.., q], [.., hidden] */
    char *gate_up, *act;       /* [MAX_TOKENS, 2 * intermediate], [.., intermediate] */
    Item *items;               /* attention work items */
    float *norm_scratch;       /* [threads, 2 * hidden] */
    float *attention_pool;     /* [threads, scratch_floats] */
    float *y_fp32;             /* [MAX_TOKENS, widest output] block products before rounding */
    float *xsum;               /* [threads, MAX_TOKENS * widest input / QK] their inputs' sums */
} Workspace;

static int64_t item_capacity(const LayerSpec *L) {
    return L->num_kv_heads * (MAX_TOKENS / ROWS + MAX_TOKENS + 1);
}

/* Carves `base` into w (when base is not NULL); returns the bytes the layout needs. */
static int64_t layout(const LayerSpec *L, int64_t threads, char *base, Workspace *w) {
    int64_t elem = L->is_bf16 ? 2 : 4, q = L->num_heads * L->head_size;
    int64_t qkv_width = q + 2 * L->num_kv_heads * L->head_size;
    int64_t widest = L->hidden > q ? L->hidden : q;
    widest = widest > L->intermediate ? widest : L->intermediate;
    int64_t widest_out = qkv_width > 2 * L->intermediate ? qkv_width : 2 * L->intermediate;
    widest_out = widest_out > L->hidden ? widest_out : L->hidden;
    int64_t sizes[10] = {
        MAX_TOKENS * widest * 4,
        MAX_TOKENS * qkv_width * elem,
        MAX_TOKENS * q * elem,
        MAX_TOKENS * L->hidden * elem,
        MAX_TOKENS * 2 * L->intermediate * elem,
        MAX_TOKENS * L->intermediate * elem,
        item_capacity(L) * (int64_t)sizeof(Item),
        threads * (2 * L->hidden + scratch_floats(L->num_heads, L->head_size)) * 4,
        MAX_TOKENS * widest_out * 4,
        threads * MAX_TOKENS * (widest / QK + 1) * 4,
    };
    char *parts[10];
    int64_t total = 0;
    for (int k = 0; k < 10; k++) {
        parts[k] = base ? base + total : NULL;
        total += (sizes[k] + ALIGN - 1) / ALIGN * ALIGN;
    }
    if (base) {
        *w = (Workspace){(float *)parts[0], parts[1], parts[2], parts[3], parts[4], parts[5],
                         (Item *)parts[6], (float *)parts[7],
                         (float *)parts[7] + threads * 2 * L->hidden, (float *)parts[8],
                         (float *)parts[9]};
    }
    return total + ALIGN; /* room to align the base */
}

int64_t paphos_decoder_workspace_bytes(const LayerSpec *L, int64_t num_threads) {
    return layout(L, num_threads, NULL, NULL);
}

/* One projection: dense rows (`dense`) or GGUF blocks (`blocks` of `data`, when quantized); its
 * inputs are prepared for `dense`'s layout, which is plain fp32 for blocks. */
typedef struct {
    Matrix dense;
    Blocks blocks;
    const uint8_t *data;
    int quantized;
} Proj;

typedef struct {
    const LayerSpec *L;
    const DecodeStep *S;
    Workspace w;
    Proj qkv, o, gate_up, down; /* each with this step's row count */
    Cache cache;
    Queries queries;
    const char *x; /* [num_tokens, hidden] layer input */
    int add_residual, rows, bf16;
    int64_t elem, q_size, kv_size, qkv_width, num_items;
} Layer;

/* Row r of the first norm: residual := x (first layer) or round(x + residual); normed :=
 * RMSNorm(residual), widened into the qkv matvec's input. */
static void input_norm_row(const Layer *y, int64_t r, float *scratch) {
    const LayerSpec *L = y->L;
    int64_t at = r * L->hidden * y->elem;
    char *residual = (char *)y->S->residual + at, *normed = y->w.normed + at;
    if (y->add_residual) {
        norm_row(y->x + at, residual, residual, L->input_norm, normed, y->bf16, L->hidden,
                 L->input_eps, scratch, scratch + L->hidden);
    } else {
        memcpy(residual, y->x + at, (size_t)(L->hidden * y->elem));
        norm_row(y->x + at, NULL, NULL, L->input_norm, normed, y->bf16, L->hidden, L->input_eps,
                 scratch, scratch + L->hidden);
    }
    prepare_range(y->w.normed, y->bf16, &y->qkv.dense, r, 0, L->hidden, y->w.x_fp32);
}

/* Row r of the second norm: residual := round(attention out + residual), normed := RMSNorm. */
static void post_norm_row(const Layer *y, int64_t r, float *scratch) {
    const LayerSpec *L = y->L;
    int64_t at = r * L->hidden * y->elem;
    char *residual = (char *)y->S->residual + at;
    norm_row((char *)y->S->hidden + at, residual, residual, L->post_norm, y->w.normed + at,
             y->bf16, L->hidden, L->post_eps, scratch, scratch + L->hidden);
    prepare_range(y->w.normed, y->bf16, &y->gate_up.dense, r, 0, L->hidden, y->w.x_fp32);
}

/* Token r: rotary on its q and k heads in place, then its k and v into the cache at its slot. */
static void rope_and_write_kv(const Layer *y, int64_t r) {
    const LayerSpec *L = y->L;
    int64_t head = L->head_size, pos = y->S->positions[r], kv_bytes = y->kv_size * y->elem;
    float cos_sin[MAX_HEAD];
    for (int64_t j = 0; j < head; j++)
        cos_sin[j] = load(L->cos_sin, (int)L->cos_sin_bf16, pos * head + j);
    Rope p = {head, head, head / 2, (int)L->is_neox, y->bf16};
    char *q = y->w.qkv + r * y->qkv_width * y->elem, *k = q + y->q_size * y->elem;
    rope_token(&p, q, q, L->num_heads, cos_sin, cos_sin + head / 2);
    rope_token(&p, k, k, L->num_kv_heads, cos_sin, cos_sin + head / 2);
    char *key_slot = (char *)y->cache.base + y->S->slot_mapping[r] * kv_bytes;
    memcpy(key_slot, k, (size_t)kv_bytes);
    memcpy(key_slot + y->cache.value_offset, k + kv_bytes, (size_t)kv_bytes);
}

/* One attention item, then its output heads widened into the o_proj matvec's input. */
static void attend_item(const Layer *y, const Item *it, Scratch *s) {
    run_item_at(&y->cache, &y->queries, it, s);
    int64_t group = y->queries.group, head = y->L->head_size;
    int64_t begin = it->kv_head * group * head, end = (it->kv_head + it->num_kv) * group * head;
    for (int64_t r = 0; r < it->num_rows; r++)
        prepare_range(y->w.attn, y->bf16, &y->o.dense, it->token0 + r, begin, end, y->w.x_fp32);
}

static void silu_row(const Layer *y, int64_t r) {
    int64_t n = y->L->intermediate;
    silu_and_mul_row(y->w.gate_up + r * 2 * n * y->elem, n, y->bf16, y->w.act + r * n * y->elem);
    prepare_range(y->w.act, y->bf16, &y->down.dense, r, 0, n, y->w.x_fp32);
}

/* Thread t of n: its share of y [rows, out] (the dtype, row stride out) = the prepared input
 * times the projection's weight, + bias. Blocks: fp32 sums into y_fp32, then + bias and one
 * rounding per output (GGUFLinearMethod.apply's order). */
static void project(const Layer *y, const Proj *p, int64_t out, const float *bias, void *dst,
                    int t, int n) {
    if (!p->quantized) {
        matvec_share(&p->dense, y->w.x_fp32, y->rows, out, bias, dst, y->bf16, t, n);
        return;
    }
    const Blocks *m = &p->blocks;
    float *xsum = y->w.xsum + (int64_t)t * MAX_TOKENS * (m->blocks_per_row + 1);
    for (int r = 0; r < y->rows; r++)
        block_sums(m, y->w.x_fp32 + r * m->in, xsum + r * m->blocks_per_row);
    int64_t begin = out * t / n, end = out * (t + 1) / n;
    if (begin >= end) return;
    gguf_matvec_range(m, p->data, y->w.x_fp32, xsum, y->rows, begin, end, y->w.y_fp32, out,
                      (int)y->L->gguf_isa);
    for (int r = 0; r < y->rows; r++) {
        for (int64_t o = begin; o < end; o++) {
            float v = y->w.y_fp32[r * out + o];
            if (bias) v += bias[o];
            if (y->bf16) ((uint16_t *)dst)[r * out + o] = float_to_bf16(v);
            else ((float *)dst)[r * out + o] = v;
        }
    }
}

/* Thread t of n: the layer's phases, each ending at a barrier (the `omp for` ones implicitly). */
static void run_phases(const Layer *y, int t, int n) {
    const LayerSpec *L = y->L;
    void *hidden = y->S->hidden;
    float *norm_scratch = y->w.norm_scratch + t * 2 * L->hidden;
    Scratch s = scratch_at(y->w.attention_pool, L->num_heads, L->head_size, t);
#pragma omp for schedule(static)
    for (int r = 0; r < y->rows; r++) input_norm_row(y, r, norm_scratch);
    project(y, &y->qkv, y->qkv_width, L->qkv_bias, y->w.qkv, t, n);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int r = 0; r < y->rows; r++) rope_and_write_kv(y, r);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < y->num_items; i++) attend_item(y, &y->w.items[i], &s);
    project(y, &y->o, L->hidden, L->o_bias, hidden, t, n);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int r = 0; r < y->rows; r++) post_norm_row(y, r, norm_scratch);
    int64_t width = 2 * L->intermediate;
    project(y, &y->gate_up, width, L->gate_up_bias, y->w.gate_up, t, n);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int r = 0; r < y->rows; r++) silu_row(y, r);
    project(y, &y->down, L->hidden, L->down_bias, hidden, t, n);
}

/* 0, or the code of the first bad size (-1), thread count (-2), pointer (-3) or workspace (-4). */
static int check_sizes(const LayerSpec *L, const DecodeStep *S, const void *kv_cache,
                       const void *x) {
    if (S->num_tokens < 1 || S->num_tokens > MAX_TOKENS || L->head_size < 16 ||
        L->head_size % 16 || L->head_size > MAX_HEAD || L->num_kv_heads < 1 ||
        L->num_heads % L->num_kv_heads || L->hidden < 1 || L->hidden > MAX_WIDTH ||
        L->intermediate < 1 || S->block_size < 1 || S->num_blocks < 1 || L->max_position < 1)
        return -1;
    int64_t q = L->num_heads * L->head_size;
    int64_t types[4] = {L->qkv_type, L->o_type, L->gate_up_type, L->down_type};
    int64_t ins[4] = {L->hidden, q, L->hidden, L->intermediate};
    for (int k = 0; k < 4; k++) {
        Blocks m;
        if (types[k] >= 0 && (types[k] > 255 || !dequant_for((int)types[k]) ||
                              blocks_for((int)types[k], ins[k], &m) != 0))
            return -1;
    }
    if (L->gguf_isa != 0 && !(L->gguf_isa == 1 && paphos_gguf_has_avx512())) return -1;
    if (S->num_threads < 1) return -2;
    if (!L->input_norm || !L->post_norm || !L->qkv || !L->o || !L->gate_up || !L->down ||
        !L->cos_sin || !S->positions || !S->slot_mapping || !S->query_start_loc ||
        !S->seq_lens || !S->block_tables || !S->hidden || !S->residual || !S->workspace ||
        !kv_cache || !x)
        return -3;
    if (S->workspace_bytes < layout(L, S->num_threads, NULL, NULL)) return -4;
    return 0;
}

/* 0, or -9 (not one token per sequence), -10 (a slot outside the cache) or -11 (a position
 * outside the rotary table) with S->bad_seq naming the sequence. */
static int check_tokens(DecodeStep *S, int64_t max_position) {
    int64_t num_slots = S->num_blocks * S->block_size;
    for (int64_t b = 0; b < S->num_tokens; b++) {
        S->bad_seq = b;
        if (S->query_start_loc[b] != b || S->query_start_loc[b + 1] != b + 1) return -9;
        if (S->slot_mapping[b] < 0 || S->slot_mapping[b] >= num_slots) return -10;
        if (S->positions[b] < 0 || S->positions[b] >= max_position) return -11;
    }
    S->bad_seq = -1;
    return 0;
}

/* The projection of weight `weight` (dense rows when type < 0, else blocks of ggml `type`) with
 * `in` inputs; its blocks' geometry was checked by check_sizes. */
static Proj proj_for(const void *weight, int64_t type, int bf16, int64_t in, int rows) {
    Proj p;
    memset(&p, 0, sizeof(p));
    p.dense = matrix_for(weight, bf16, in, rows, bf16);
    if (type >= 0) {
        p.quantized = 1;
        p.data = (const uint8_t *)weight;
        blocks_for((int)type, in, &p.blocks);
        p.dense.layout = X_FP32; /* the block products take plain fp32 inputs */
    }
    return p;
}

static void prepare_layer(Layer *y, const LayerSpec *L, const DecodeStep *S, const void *kv_cache,
                          const void *x, int add_residual) {
    int bf16 = (int)L->is_bf16, rows = (int)S->num_tokens;
    int64_t elem = bf16 ? 2 : 4, q_size = L->num_heads * L->head_size;
    int64_t kv_size = L->num_kv_heads * L->head_size, qkv_width = q_size + 2 * kv_size;
    char *base = (char *)(((uintptr_t)S->workspace + ALIGN - 1) / ALIGN * ALIGN);
    memset(y, 0, sizeof(*y));
    y->L = L;
    y->S = S;
    layout(L, S->num_threads, base, &y->w);
    y->qkv = proj_for(L->qkv, L->qkv_type, bf16, L->hidden, rows);
    y->o = proj_for(L->o, L->o_type, bf16, q_size, rows);
    y->gate_up = proj_for(L->gate_up, L->gate_up_type, bf16, L->hidden, rows);
    y->down = proj_for(L->down, L->down_type, bf16, L->intermediate, rows);
    y->cache = cache_for(kv_cache, bf16, S->num_blocks, S->block_size, L->num_kv_heads,
                         L->head_size, S->block_tables, S->table_stride);
    y->queries = (Queries){y->w.qkv, y->w.attn, bf16, qkv_width, L->num_heads,
                           L->num_heads / L->num_kv_heads, L->scale * LOG2E};
    y->x = (const char *)x;
    y->add_residual = add_residual;
    y->rows = rows;
    y->bf16 = bf16;
    y->elem = elem;
    y->q_size = q_size;
    y->kv_size = kv_size;
    y->qkv_width = qkv_width;
}

/* The layer for this step's tokens: S->hidden := the MLP's output, S->residual := the residual
 * stream, from x [num_tokens, hidden] (which may be S->hidden) and, when add_residual, the
 * previous S->residual. Returns 0, or a negative code naming the first bad argument: -1 a size,
 * -2 num_threads, -3 a null pointer, -4 a workspace smaller than paphos_decoder_workspace_bytes,
 * -5..-8 as paphos_paged_attention, -9 not one token per sequence, -10 a slot outside the cache,
 * -11 a position outside the rotary table; S->bad_seq names the sequence of -5..-11. */
int paphos_decoder_layer(const LayerSpec *L, DecodeStep *S, void *kv_cache, const void *x,
                         int add_residual) {
    int code = check_sizes(L, S, kv_cache, x);
    if (code == 0) code = check_tokens(S, L->max_position);
    if (code != 0) return code;
    Layer y;
    prepare_layer(&y, L, S, kv_cache, x, add_residual);
    int64_t work;
    y.num_items = build_items(&y.cache, &y.queries, S->query_start_loc, S->seq_lens,
                              S->num_tokens, S->num_tokens, S->max_blocks, (int)S->num_threads,
                              y.w.items, &work, &S->bad_seq);
    if (y.num_items < 0) return (int)y.num_items;
    int threads = (int)S->num_threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    run_phases(&y, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}
