/* crystal.c: run a GPT-2 stored in a .crystal file (clso/export/runtime/FORMAT.md).
 *
 *   crystal info     MODEL                 header and tensor table
 *   crystal check    [--no-crc] MODEL...   validate files; exit 0 when all are valid
 *   crystal logits   MODEL ID...           one line of logits per position (tokenizer vocab;
 *                                          pruned ids print -inf)
 *   crystal encode   MODEL TEXT            the token ids of TEXT
 *   crystal generate MODEL [-p PROMPT] [-n TOKENS] [-t TEMPERATURE] [-k TOP_K] [-s SEED] [--stats]
 *
 * The file is mmapped and every field is validated before use: a truncated, corrupt or hostile
 * file ends in a one-line error and exit status 1, never in a read outside the mapping.
 * Matrices are used in place (f32, int16, int8, with per-tensor and per-row scales); only
 * packed values (5 trits or 2 int4 per byte) are unpacked to int8 once, at load.
 * Build: cc -O3 -o crystal crystal.c -lm
 * Fuzz (clang): clang -g -O1 -fsanitize=fuzzer,address -DCRYSTAL_LIBFUZZER crystal.c -lm
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEADER_BYTES 256
#define ENTRY_BYTES 128
#define ALIGNMENT 64
#define NAME_BYTES 64
#define MAX_PARTS 256
#define NO_TOKEN 0xFFFFFFFFu
#define VERSION 2 /* the newest known; version 1 files (GPT-2 only) are read too */
enum { F32, I16, I8, I32, TRIT5, I4, U8, N_DTYPES };
enum { FLAG_TIED = 1, FLAG_PRUNED = 2, FLAG_CRYSTALLINE = 4 };
static const char *MODES[] = {"f32", "int16", "int8", "mixed16", "mixed8"};
static const char *DTYPES[] = {"f32", "i16", "i8", "i32", "trit5", "i4", "u8"};
static const char *BUCKETS[] = {"c_attn", "attn_proj", "c_fc", "mlp_proj"};
static const char *ARCHITECTURES[] = {"gpt2", "field", "flat_field"};
enum { ARCH_GPT2, ARCH_FIELD, ARCH_FLAT_FIELD }; /* flat_field: a field and no attention */
#define DIST_FLOOR 1e-6f       /* under the root of a neuron's squared distance (clso/field/model.py) */
#define TEMPERATURE_FLOOR 0.1f /* the journal's |tau| + 0.1 */

/* ---------------------------------------------------------------- errors and memory */
typedef struct {
    jmp_buf jump;
    char message[256];
    void **owned;
    size_t n_owned, cap_owned;
} Ctx;

static void bad(Ctx *ctx, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->message, sizeof ctx->message, fmt, ap);
    va_end(ap);
    longjmp(ctx->jump, 1);
}

static void *own(Ctx *ctx, size_t bytes) {
    if (ctx->n_owned == ctx->cap_owned) {
        size_t cap = ctx->cap_owned ? 2 * ctx->cap_owned : 64;
        void **grown = realloc(ctx->owned, cap * sizeof *grown);
        if (!grown) bad(ctx, "out of memory");
        ctx->owned = grown, ctx->cap_owned = cap;
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) bad(ctx, "out of memory (%zu bytes)", bytes);
    return ctx->owned[ctx->n_owned++] = p;
}

static void free_owned(Ctx *ctx) {
    for (size_t i = 0; i < ctx->n_owned; i++) free(ctx->owned[i]);
    free(ctx->owned);
    ctx->owned = NULL, ctx->n_owned = ctx->cap_owned = 0;
}

static uint32_t u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static float f32(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }

static uint32_t crc32(const uint8_t *p, size_t n, uint32_t crc) {
    static uint32_t table[256];
    if (!table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ---------------------------------------------------------------- the file */
typedef struct {
    char name[NAME_BYTES];
    uint32_t dtype, ndim, shape[4];
    uint64_t offset, nbytes, count;
    float scale;
    int32_t row_scales;
} Entry;

typedef struct {
    uint32_t version, n_tensors, mode, flags, vocab_rows, tok_vocab, n_layer, n_embd, n_head, block_size,
        n_inner, tok_kind, eot, unk, architecture;
    float eps;
} Header;

typedef struct {            /* a matrix used in place: value(r, c) = q[r*cols + c] * scale * row_scale[r] */
    int dtype;              /* F32, I16 or I8 (packed values are unpacked to I8) */
    const void *q;
    int rows, cols;
    float scale;
    const float *row_scales; /* NULL: none */
} Mat;

typedef struct {            /* y[out] += M x[in], M = w or v·u */
    Mat w, u, v;
    int lowrank;
    const int32_t *in, *out; /* NULL: all */
    int k_in, k_out;
} Part;

typedef struct {
    Part *parts;
    int n_parts, d_in, d_out;
    const float *bias;
    float gain;
} Linear;

typedef struct {            /* the neuron field of a block: out = sum_i w_i val_i (FORMAT.md) */
    const float *ln_w, *ln_b, *temp;
    Mat pos, val;
    float *pos_sq;          /* |pos_i|^2 of the values as stored (dequantized), computed at load */
    int n;                  /* neurons; 0: the block has no field */
} Field;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    Linear lin[4];          /* c_attn, attn_proj (absent in a flat field), c_fc, mlp_proj */
    int attention;
    Field field;
} Block;

typedef struct {
    Ctx ctx;
    const uint8_t *data;
    size_t size;
    Header h;
    Entry *entries;
    Mat wte, wpe, head;
    const float *lnf_w, *lnf_b;
    Block *blocks;
    const int32_t *vocab_ids; /* NULL unless pruned */
    int32_t *row_of;          /* tokenizer id -> row of wte, -1 when pruned */
    const uint8_t *tok_bytes;
    const int32_t *tok_offsets, *merges;
    int n_merges;
} Model;

static const Entry *find(Model *m, const char *name) {
    for (uint32_t i = 0; i < m->h.n_tensors; i++)
        if (strcmp(m->entries[i].name, name) == 0) return &m->entries[i];
    return NULL;
}

static const Entry *need(Model *m, const char *name, int ndim, const uint32_t *shape) {
    const Entry *e = find(m, name);
    if (!e) bad(&m->ctx, "tensor %s is missing", name);
    if (ndim && (e->ndim != (uint32_t)ndim)) bad(&m->ctx, "tensor %s has rank %u, expected %d", name, e->ndim, ndim);
    for (int k = 0; k < ndim && shape; k++)
        if (shape[k] && e->shape[k] != shape[k])
            bad(&m->ctx, "tensor %s dimension %d is %u, expected %u", name, k, e->shape[k], shape[k]);
    return e;
}

static const float *vector(Model *m, const char *name, uint32_t n) {
    const Entry *e = need(m, name, 1, &n);
    if (e->dtype != F32) bad(&m->ctx, "tensor %s must be f32", name);
    return (const float *)(m->data + e->offset);
}

static uint64_t packed_bytes(uint32_t dtype, uint64_t count) {
    switch (dtype) {
    case TRIT5: return (count + 4) / 5;
    case I4: return (count + 1) / 2;
    case F32: case I32: return count * 4;
    case I16: return count * 2;
    default: return count;
    }
}

static void check_finite(Model *m, const Entry *e) {
    for (uint64_t i = 0; i < e->count; i++)
        if (!isfinite(f32(m->data + e->offset + 4 * i))) bad(&m->ctx, "tensor %s holds non-finite values", e->name);
}

static void read_header(Model *m, int verify_crc) {
    Ctx *ctx = &m->ctx;
    const uint8_t *d = m->data;
    if (m->size < HEADER_BYTES) bad(ctx, "file of %zu bytes is shorter than the %d-byte header", m->size, HEADER_BYTES);
    if (memcmp(d, "CRYSTAL\0", 8) != 0) bad(ctx, "not a .crystal file (bad magic)");
    uint32_t f[17];
    for (int i = 0; i < 17; i++) f[i] = u32(d + 8 + 4 * i);
    Header *h = &m->h;
    h->version = f[0];
    if (h->version < 1 || h->version > VERSION) bad(ctx, "format version %u, this runtime knows 1..%d", h->version, VERSION);
    if (verify_crc) {
        uint8_t head[HEADER_BYTES];
        memcpy(head, d, HEADER_BYTES);
        memset(head + 108, 0, 4);
        if (crc32(head, HEADER_BYTES, 0) != u32(d + 108)) bad(ctx, "header checksum mismatch (corrupt file)");
    }
    if (f[1] != HEADER_BYTES || f[2] != ENTRY_BYTES || f[16] != ALIGNMENT)
        bad(ctx, "header, entry or alignment size differs from the spec");
    if (u64(d + 96) != m->size) bad(ctx, "file is %zu bytes, header says %llu (truncated?)", m->size, (unsigned long long)u64(d + 96));
    if (verify_crc && crc32(d + HEADER_BYTES, m->size - HEADER_BYTES, 0) != u32(d + 104))
        bad(ctx, "payload checksum mismatch (corrupt file)");
    h->n_tensors = f[3], h->mode = f[4], h->flags = f[5], h->vocab_rows = f[6], h->tok_vocab = f[7];
    h->n_layer = f[8], h->n_embd = f[9], h->n_head = f[10], h->block_size = f[11], h->n_inner = f[12];
    h->tok_kind = f[13], h->eot = f[14], h->unk = f[15], h->eps = f32(d + 76), h->architecture = u32(d + 112);
    if (h->architecture > ARCH_FLAT_FIELD || (h->version == 1 && h->architecture))
        bad(ctx, "unknown architecture %u for format version %u", h->architecture, h->version);
    if (h->mode > 4 || (h->flags & ~7u)) bad(ctx, "unknown mode %u or flags %#x", h->mode, h->flags);
    struct { const char *name; uint32_t value, top; } limits[] = {
        {"n_layer", h->n_layer, 256}, {"n_embd", h->n_embd, 65536}, {"n_head", h->n_head, 1024},
        {"block_size", h->block_size, 1u << 20}, {"vocab_rows", h->vocab_rows, 1u << 24},
        {"tokenizer_vocab", h->tok_vocab, 1u << 24}, {"n_tensors", h->n_tensors, 1u << 20}};
    for (size_t i = 0; i < sizeof limits / sizeof *limits; i++)
        if (limits[i].value < 1 || limits[i].value > limits[i].top)
            bad(ctx, "header %s = %u outside 1..%u", limits[i].name, limits[i].value, limits[i].top);
    if (h->n_embd % h->n_head || h->n_inner != 4 * h->n_embd || h->vocab_rows > h->tok_vocab)
        bad(ctx, "header n_embd/n_head/n_inner/vocab sizes disagree");
    if (h->tok_kind > 2 || !(isfinite(h->eps) && h->eps > 0 && h->eps < 1))
        bad(ctx, "header tokenizer kind or layer-norm epsilon out of range");
    if ((h->eot != NO_TOKEN && h->eot >= h->tok_vocab) || (h->unk != NO_TOKEN && h->unk >= h->tok_vocab))
        bad(ctx, "header eot_token or unk_token outside the vocabulary");
    uint64_t table = u64(d + 80), data_offset = u64(d + 88);
    if (table != HEADER_BYTES || data_offset < HEADER_BYTES + (uint64_t)h->n_tensors * ENTRY_BYTES ||
        data_offset > m->size || data_offset % ALIGNMENT)
        bad(ctx, "tensor table or data offset out of place");

    m->entries = own(ctx, h->n_tensors * sizeof(Entry));
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        const uint8_t *p = d + HEADER_BYTES + (size_t)i * ENTRY_BYTES;
        Entry *e = &m->entries[i];
        if (!memchr(p, 0, NAME_BYTES)) bad(ctx, "tensor %u: name not terminated", i);
        memcpy(e->name, p, NAME_BYTES);
        if (!e->name[0]) bad(ctx, "tensor %u: empty name", i);
        for (const char *c = e->name; *c; c++)
            if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7E) bad(ctx, "tensor %u: name is not printable ASCII", i);
        e->dtype = u32(p + 64), e->ndim = u32(p + 68);
        if (e->dtype >= N_DTYPES || e->ndim < 1 || e->ndim > 4) bad(ctx, "tensor %s: unknown dtype %u or rank %u", e->name, e->dtype, e->ndim);
        e->count = 1;
        for (int k = 0; k < 4; k++) {
            e->shape[k] = u32(p + 72 + 4 * k);
            if ((uint32_t)k < e->ndim ? e->shape[k] == 0 : e->shape[k] != 0) bad(ctx, "tensor %s: bad shape", e->name);
            if ((uint32_t)k < e->ndim) {
                if (e->shape[k] > (uint64_t)m->size * 5 / e->count) bad(ctx, "tensor %s: bad shape", e->name);
                e->count *= e->shape[k];
            }
        }
        e->offset = u64(p + 88), e->nbytes = u64(p + 96), e->scale = f32(p + 104);
        memcpy(&e->row_scales, p + 108, 4);
        if (e->nbytes != packed_bytes(e->dtype, e->count) || e->offset % ALIGNMENT || e->offset < data_offset ||
            e->offset > m->size || e->nbytes > m->size - e->offset)
            bad(ctx, "tensor %s: %llu bytes at %llu do not fit the file or its shape", e->name,
                (unsigned long long)e->nbytes, (unsigned long long)e->offset);
        if (!isfinite(e->scale) || e->row_scales < -1 || e->row_scales >= (int32_t)h->n_tensors || e->row_scales == (int32_t)i)
            bad(ctx, "tensor %s: bad scale or row-scale index", e->name);
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(m->entries[j].name, e->name) == 0) bad(ctx, "tensor %u: repeated name %s", i, e->name);
    }
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        const Entry *e = &m->entries[i];
        if (e->dtype == F32) check_finite(m, e);
        for (uint64_t b = 0; e->dtype == TRIT5 && b < e->nbytes; b++)
            if (m->data[e->offset + b] > 242) bad(ctx, "tensor %s: a trit5 byte above 242", e->name);
        if (e->row_scales >= 0) {
            const Entry *s = &m->entries[e->row_scales];
            if (e->dtype == I32 || e->dtype == U8 || s->dtype != F32 || s->ndim != 1 || s->shape[0] != e->shape[0])
                bad(ctx, "tensor %s: its row scales %s are not f32 of %u", e->name, s->name, e->shape[0]);
        }
    }
}

/* a 2-D tensor of values as a Mat; packed values are unpacked to int8 here */
static Mat matrix(Model *m, const char *name, uint32_t rows, uint32_t cols) {
    uint32_t shape[2] = {rows, cols};
    const Entry *e = need(m, name, 2, shape);
    Mat a = {0};
    a.rows = e->shape[0], a.cols = e->shape[1], a.scale = e->scale;
    a.row_scales = e->row_scales >= 0 ? (const float *)(m->data + m->entries[e->row_scales].offset) : NULL;
    const uint8_t *src = m->data + e->offset;
    if (e->dtype == F32 || e->dtype == I16 || e->dtype == I8) {
        a.dtype = e->dtype, a.q = src;
    } else if (e->dtype == TRIT5 || e->dtype == I4) {
        int8_t *q = own(&m->ctx, e->count);
        for (uint64_t i = 0; i < e->count; i++) {
            if (e->dtype == TRIT5) {
                uint8_t byte = src[i / 5]; /* <= 242: checked with the table */
                static const int pow3[5] = {1, 3, 9, 27, 81};
                q[i] = (int8_t)((byte / pow3[i % 5]) % 3 - 1);
            } else {
                int nib = i % 2 ? src[i / 2] >> 4 : src[i / 2] & 0xF;
                q[i] = (int8_t)(nib > 7 ? nib - 16 : nib);
            }
        }
        a.dtype = I8, a.q = q;
    } else {
        bad(&m->ctx, "tensor %s: dtype %s is not a matrix type", name, DTYPES[e->dtype]);
    }
    return a;
}

static const int32_t *indices(Model *m, const char *name, uint32_t bound, int *count) {
    const Entry *e = find(m, name);
    if (!e) return NULL;
    if (e->dtype != I32 || e->ndim != 1) bad(&m->ctx, "tensor %s must be a 1-D i32 index list", name);
    if (e->shape[0] > bound) bad(&m->ctx, "tensor %s: %u indices for %u places", name, e->shape[0], bound);
    const int32_t *idx = (const int32_t *)(m->data + e->offset);
    for (uint32_t i = 0; i < e->shape[0]; i++)
        if (idx[i] < 0 || (uint32_t)idx[i] >= bound) bad(&m->ctx, "tensor %s: index %d outside 0..%u", name, idx[i], bound - 1);
    *count = (int)e->shape[0];
    return idx;
}

static Linear linear(Model *m, int layer, int bucket, int d_in, int d_out) {
    char name[NAME_BYTES + 16], base[NAME_BYTES];
    snprintf(base, sizeof base, "h.%d.%s", layer, BUCKETS[bucket]);
    Linear L = {0};
    L.d_in = d_in, L.d_out = d_out;
    snprintf(name, sizeof name, "%s.bias", base);
    L.bias = vector(m, name, d_out);
    snprintf(name, sizeof name, "%s.gain", base);
    L.gain = find(m, name) ? vector(m, name, 1)[0] : 1.0f;
    int n = 0;
    for (;; n++) {
        char w[NAME_BYTES + 16], u[NAME_BYTES + 16];
        snprintf(w, sizeof w, "%s.p%d.w", base, n);
        snprintf(u, sizeof u, "%s.p%d.u", base, n);
        if (!find(m, w) && !find(m, u)) break;
        if (n == MAX_PARTS) bad(&m->ctx, "layer %s has more than %d parts", base, MAX_PARTS);
    }
    if (!n) bad(&m->ctx, "layer %s has no parts", base);
    L.parts = own(&m->ctx, n * sizeof(Part));
    L.n_parts = n;
    for (int k = 0; k < n; k++) {
        Part *p = &L.parts[k];
        p->k_in = d_in, p->k_out = d_out;
        snprintf(name, sizeof name, "%s.p%d.in", base, k);
        p->in = indices(m, name, d_in, &p->k_in);
        snprintf(name, sizeof name, "%s.p%d.out", base, k);
        p->out = indices(m, name, d_out, &p->k_out);
        snprintf(name, sizeof name, "%s.p%d.w", base, k);
        if (find(m, name)) {
            p->w = matrix(m, name, p->k_out, p->k_in);
        } else {
            snprintf(name, sizeof name, "%s.p%d.u", base, k);
            const Entry *eu = need(m, name, 2, NULL);
            p->u = matrix(m, name, eu->shape[0], p->k_in);
            snprintf(name, sizeof name, "%s.p%d.v", base, k);
            p->v = matrix(m, name, p->k_out, p->u.rows);
            p->lowrank = 1;
        }
    }
    return L;
}

static float mat_at(const Mat *a, int r, int c);

static Field field(Model *m, uint32_t layer) {
    char name[64];
    uint32_t d = m->h.n_embd;
    Field f = {0};
    snprintf(name, sizeof name, "h.%u.field.pos", layer);
    uint32_t shape[2] = {0, d};
    const Entry *e = need(m, name, 2, shape);
    uint32_t n = e->shape[0];
    f.pos = matrix(m, name, n, d);
    snprintf(name, sizeof name, "h.%u.field.val", layer), f.val = matrix(m, name, n, d);
    snprintf(name, sizeof name, "h.%u.field.temp", layer), f.temp = vector(m, name, n);
    snprintf(name, sizeof name, "h.%u.field.ln.w", layer), f.ln_w = vector(m, name, d);
    snprintf(name, sizeof name, "h.%u.field.ln.b", layer), f.ln_b = vector(m, name, d);
    f.pos_sq = own(&m->ctx, n * sizeof(float));
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = 0; c < d; c++) f.pos_sq[i] += mat_at(&f.pos, i, c) * mat_at(&f.pos, i, c);
    f.n = (int)n;
    return f;
}

static void load_model(Model *m) {
    Header *h = &m->h;
    uint32_t d = h->n_embd;
    m->wte = matrix(m, "wte", h->vocab_rows, d);
    m->wpe = matrix(m, "wpe", h->block_size, d);
    m->head = h->flags & FLAG_TIED ? m->wte : matrix(m, "head", h->vocab_rows, d);
    m->lnf_w = vector(m, "ln_f.w", d), m->lnf_b = vector(m, "ln_f.b", d);
    m->blocks = own(&m->ctx, h->n_layer * sizeof(Block));
    int shapes[4][2] = {{d, 3 * d}, {d, d}, {d, h->n_inner}, {h->n_inner, d}};
    for (uint32_t l = 0; l < h->n_layer; l++) {
        char name[64];
        Block *b = &m->blocks[l];
        b->attention = h->architecture != ARCH_FLAT_FIELD;
        if (b->attention) {
            snprintf(name, sizeof name, "h.%u.ln_1.w", l), b->ln1_w = vector(m, name, d);
            snprintf(name, sizeof name, "h.%u.ln_1.b", l), b->ln1_b = vector(m, name, d);
        }
        snprintf(name, sizeof name, "h.%u.ln_2.w", l), b->ln2_w = vector(m, name, d);
        snprintf(name, sizeof name, "h.%u.ln_2.b", l), b->ln2_b = vector(m, name, d);
        for (int k = b->attention ? 0 : 2; k < 4; k++) b->lin[k] = linear(m, l, k, shapes[k][0], shapes[k][1]);
        if (h->architecture != ARCH_GPT2) b->field = field(m, l);
    }
    m->row_of = own(&m->ctx, h->tok_vocab * sizeof(int32_t));
    for (uint32_t i = 0; i < h->tok_vocab; i++) m->row_of[i] = h->flags & FLAG_PRUNED ? -1 : (int32_t)i;
    if (h->flags & FLAG_PRUNED) {
        int n;
        m->vocab_ids = indices(m, "vocab.ids", h->tok_vocab, &n);
        if (!m->vocab_ids || (uint32_t)n != h->vocab_rows) bad(&m->ctx, "vocab.ids must list the %u kept ids", h->vocab_rows);
        for (int i = 0; i < n; i++) {
            if (i && m->vocab_ids[i] <= m->vocab_ids[i - 1]) bad(&m->ctx, "vocab.ids must be sorted and distinct");
            m->row_of[m->vocab_ids[i]] = i;
        }
    } else if (h->vocab_rows != h->tok_vocab) {
        bad(&m->ctx, "an unpruned file must keep the whole vocabulary");
    }
    if (h->tok_kind) {
        uint32_t n = h->tok_vocab + 1;
        const Entry *eo = need(m, "tok.offsets", 1, &n);
        if (eo->dtype != I32) bad(&m->ctx, "tok.offsets must be i32");
        m->tok_offsets = (const int32_t *)(m->data + eo->offset);
        const Entry *eb = find(m, "tok.bytes");
        if (eb && (eb->dtype != U8 || eb->ndim != 1)) bad(&m->ctx, "tok.bytes must be u8");
        uint64_t blob = eb ? eb->shape[0] : 0;
        m->tok_bytes = eb ? m->data + eb->offset : NULL;
        if (m->tok_offsets[0] != 0 || (uint64_t)m->tok_offsets[h->tok_vocab] != blob)
            bad(&m->ctx, "tok.offsets do not index tok.bytes");
        for (uint32_t i = 0; i < h->tok_vocab; i++)
            if (m->tok_offsets[i + 1] < m->tok_offsets[i]) bad(&m->ctx, "tok.offsets do not index tok.bytes");
        const Entry *em = find(m, "tok.merges");
        if (em) {
            if (em->dtype != I32 || em->ndim != 2 || em->shape[1] != 3) bad(&m->ctx, "tok.merges must be (n, 3) i32");
            m->merges = (const int32_t *)(m->data + em->offset);
            m->n_merges = (int)em->shape[0];
            for (uint64_t i = 0; i < em->count; i++)
                if (m->merges[i] < 0 || (uint32_t)m->merges[i] >= h->tok_vocab) bad(&m->ctx, "tok.merges must be (n, 3) token ids");
        }
    }
}

/* Validate and index a file already in memory. 0 on success; on failure the message is in m->ctx. */
static int model_open(Model *m, const uint8_t *data, size_t size, int verify_crc) {
    memset(m, 0, sizeof *m);
    m->data = data, m->size = size;
    if (setjmp(m->ctx.jump)) {
        free_owned(&m->ctx);
        return 1;
    }
    read_header(m, verify_crc);
    load_model(m);
    return 0;
}

/* ---------------------------------------------------------------- the forward pass */
static float mat_at(const Mat *a, int r, int c) {
    size_t i = (size_t)r * a->cols + c;
    float q = a->dtype == F32 ? ((const float *)a->q)[i] : a->dtype == I16 ? ((const int16_t *)a->q)[i] : ((const int8_t *)a->q)[i];
    return q * a->scale * (a->row_scales ? a->row_scales[r] : 1.0f);
}

static void mat_row(const Mat *a, int r, float *out) {
    for (int c = 0; c < a->cols; c++) out[c] = mat_at(a, r, c);
}

/* out[r] = Σ_c value(r, c) x[c]. Eight independent partial sums per row: without -ffast-math the
   compiler may not reorder one running sum, but it vectorises eight lanes. */
#define LANES 8
#define DOT(T)                                                                    \
    static float dot_##T(const T *w, const float *x, int n) {                     \
        float acc[LANES] = {0};                                                   \
        int c = 0;                                                                \
        for (; c + LANES <= n; c += LANES)                                        \
            for (int j = 0; j < LANES; j++) acc[j] += (float)w[c + j] * x[c + j]; \
        float sum = 0.0f;                                                         \
        for (; c < n; c++) sum += (float)w[c] * x[c];                             \
        for (int j = 0; j < LANES; j++) sum += acc[j];                            \
        return sum;                                                               \
    }
DOT(float)
DOT(int16_t)
DOT(int8_t)

static void matvec(const Mat *a, const float *x, float *out) {
    for (int r = 0; r < a->rows; r++) {
        size_t base = (size_t)r * a->cols;
        float acc = a->dtype == F32 ? dot_float((const float *)a->q + base, x, a->cols)
                  : a->dtype == I16 ? dot_int16_t((const int16_t *)a->q + base, x, a->cols)
                                    : dot_int8_t((const int8_t *)a->q + base, x, a->cols);
        out[r] = acc * a->scale * (a->row_scales ? a->row_scales[r] : 1.0f);
    }
}

typedef struct {
    float *x, *xb, *qkv, *att, *hidden, *gather, *part, *rank, *logits, *key_cache, *value_cache, *weights;
} State;

static void apply_linear(const Linear *L, const float *x, float *y, State *s) {
    for (int o = 0; o < L->d_out; o++) y[o] = 0.0f;
    for (int k = 0; k < L->n_parts; k++) {
        const Part *p = &L->parts[k];
        const float *in = x;
        if (p->in) {
            for (int i = 0; i < p->k_in; i++) s->gather[i] = x[p->in[i]];
            in = s->gather;
        }
        if (p->lowrank) {
            matvec(&p->u, in, s->rank);
            matvec(&p->v, s->rank, s->part);
        } else {
            matvec(&p->w, in, s->part);
        }
        if (p->out)
            for (int o = 0; o < p->k_out; o++) y[p->out[o]] += s->part[o];
        else
            for (int o = 0; o < p->k_out; o++) y[o] += s->part[o];
    }
    for (int o = 0; o < L->d_out; o++) y[o] = y[o] * L->gain + L->bias[o];
}

static void layer_norm(float *out, const float *x, const float *w, const float *b, int n, float eps) {
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf((float)(var / n) + eps);
    for (int i = 0; i < n; i++) out[i] = (float)(x[i] - mean) * inv * w[i] + b[i];
}

static int max_rank(const Model *m) {
    int r = 1;
    for (uint32_t l = 0; l < m->h.n_layer; l++)
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < m->blocks[l].lin[k].n_parts; j++) {
                const Part *p = &m->blocks[l].lin[k].parts[j];
                if (p->lowrank && p->u.rows > r) r = p->u.rows;
            }
    return r;
}

static int max_neurons(const Model *m) {
    int n = 1;
    for (uint32_t l = 0; l < m->h.n_layer; l++)
        if (m->blocks[l].field.n > n) n = m->blocks[l].field.n;
    return n;
}

static int state_alloc(State *s, const Model *m) {
    size_t d = m->h.n_embd, inner = m->h.n_inner, cache = (size_t)m->h.n_layer * m->h.block_size * d;
    float **fields[] = {&s->x, &s->xb, &s->qkv, &s->att, &s->hidden, &s->gather, &s->part, &s->rank, &s->logits,
                        &s->key_cache, &s->value_cache, &s->weights};
    size_t sizes[] = {d, d, 3 * d, m->h.block_size, inner, inner, 3 * d > inner ? 3 * d : inner, max_rank(m),
                      m->h.vocab_rows, cache, cache, max_neurons(m)};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        if (!(*fields[i] = calloc(sizes[i], sizeof(float)))) return 1;
    return 0;
}

static void state_free(State *s) {
    float *all[] = {s->x, s->xb, s->qkv, s->att, s->hidden, s->gather, s->part, s->rank, s->logits, s->key_cache,
                    s->value_cache, s->weights};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

/* x += sum_i w_i val_i over the field's neurons, w_i = exp(-dist_i / (sqrt(d) (|temp_i| + 0.1))) and
   dist_i = sqrt(max(0, |q|^2 - 2 q.pos_i + |pos_i|^2) + 1e-6) for the query q = LayerNorm(x) */
static void apply_field(const Field *f, float *x, State *s, int d, float eps) {
    float *q = s->xb, qq = 0.0f;
    layer_norm(q, x, f->ln_w, f->ln_b, d, eps);
    for (int c = 0; c < d; c++) qq += q[c] * q[c];
    matvec(&f->pos, q, s->weights);
    float unit = sqrtf((float)d);
    for (int i = 0; i < f->n; i++) {
        float square = qq - 2.0f * s->weights[i] + f->pos_sq[i];
        float dist = sqrtf((square > 0.0f ? square : 0.0f) + DIST_FLOOR);
        s->weights[i] = expf(-dist / (unit * (fabsf(f->temp[i]) + TEMPERATURE_FLOOR)));
    }
    for (int i = 0; i < f->n; i++) {
        float w = s->weights[i], row_scale = f->val.scale * (f->val.row_scales ? f->val.row_scales[i] : 1.0f);
        size_t base = (size_t)i * d;
        if (f->val.dtype == F32)
            for (int c = 0; c < d; c++) x[c] += w * ((const float *)f->val.q)[base + c] * row_scale;
        else if (f->val.dtype == I16)
            for (int c = 0; c < d; c++) x[c] += w * ((const int16_t *)f->val.q)[base + c] * row_scale;
        else
            for (int c = 0; c < d; c++) x[c] += w * ((const int8_t *)f->val.q)[base + c] * row_scale;
    }
}

/* logits over the file's rows for `row` (a wte row) at position pos; earlier positions are cached */
static float *forward(const Model *m, State *s, int row, int pos) {
    int d = m->h.n_embd, n_head = m->h.n_head, hs = d / n_head, T = m->h.block_size;
    float *x = s->x;
    mat_row(&m->wte, row, x);
    for (int i = 0; i < d; i++) x[i] += mat_at(&m->wpe, pos, i);
    for (uint32_t l = 0; l < m->h.n_layer; l++) {
        const Block *b = &m->blocks[l];
        if (b->attention) {
            float *kc = s->key_cache + (size_t)l * T * d, *vc = s->value_cache + (size_t)l * T * d;
            layer_norm(s->xb, x, b->ln1_w, b->ln1_b, d, m->h.eps);
            apply_linear(&b->lin[0], s->xb, s->qkv, s);
            memcpy(kc + (size_t)pos * d, s->qkv + d, d * sizeof(float));
            memcpy(vc + (size_t)pos * d, s->qkv + 2 * d, d * sizeof(float));
            for (int h = 0; h < n_head; h++) {
                const float *q = s->qkv + h * hs;
                float top = -INFINITY, sum = 0.0f, *o = s->xb + h * hs;
                for (int t = 0; t <= pos; t++) {
                    const float *k = kc + (size_t)t * d + h * hs;
                    float a = 0.0f;
                    for (int i = 0; i < hs; i++) a += q[i] * k[i];
                    s->att[t] = a / sqrtf((float)hs);
                    if (s->att[t] > top) top = s->att[t];
                }
                for (int t = 0; t <= pos; t++) sum += s->att[t] = expf(s->att[t] - top);
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t = 0; t <= pos; t++) {
                    const float *v = vc + (size_t)t * d + h * hs;
                    float a = s->att[t] / sum;
                    for (int i = 0; i < hs; i++) o[i] += a * v[i];
                }
            }
            apply_linear(&b->lin[1], s->xb, s->qkv, s);
            for (int i = 0; i < d; i++) x[i] += s->qkv[i];
        }
        if (b->field.n) apply_field(&b->field, x, s, d, m->h.eps);
        layer_norm(s->xb, x, b->ln2_w, b->ln2_b, d, m->h.eps);
        apply_linear(&b->lin[2], s->xb, s->hidden, s);
        for (int i = 0; i < (int)m->h.n_inner; i++) { /* GPT-2's tanh GELU */
            float u = s->hidden[i];
            s->hidden[i] = 0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
        }
        apply_linear(&b->lin[3], s->hidden, s->qkv, s);
        for (int i = 0; i < d; i++) x[i] += s->qkv[i];
    }
    layer_norm(s->xb, x, m->lnf_w, m->lnf_b, d, m->h.eps);
    matvec(&m->head, s->xb, s->logits);
    return s->logits;
}

/* ---------------------------------------------------------------- tokenizer */
typedef struct { int32_t left, right, rank, result; } MergeSlot;
typedef struct { MergeSlot *slots; size_t mask; int byte_token[256]; } Encoder;

static size_t slot_of(const Encoder *e, int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a * 0x9E3779B97F4A7C15ull ^ (uint32_t)b * 0xC2B2AE3D27D4EB4Full) & e->mask;
}

static int encoder_init(Encoder *e, const Model *m) {
    size_t cap = 16;
    while (cap < 2 * (size_t)m->n_merges + 1) cap *= 2;
    if (!(e->slots = malloc(cap * sizeof *e->slots))) return 1;
    e->mask = cap - 1;
    for (size_t i = 0; i < cap; i++) e->slots[i].left = -1;
    for (int i = 0; i < m->n_merges; i++) {
        const int32_t *r = m->merges + 3 * i;
        size_t k = slot_of(e, r[0], r[1]);
        while (e->slots[k].left != -1 && !(e->slots[k].left == r[0] && e->slots[k].right == r[1])) k = (k + 1) & e->mask;
        if (e->slots[k].left == -1) e->slots[k] = (MergeSlot){r[0], r[1], i, r[2]};
    }
    for (int b = 0; b < 256; b++) e->byte_token[b] = -1;
    for (uint32_t t = m->h.tok_vocab; t-- > 0;) /* lowest id wins */
        if (m->tok_offsets[t + 1] - m->tok_offsets[t] == 1 && t != m->h.eot && t != m->h.unk)
            e->byte_token[m->tok_bytes[m->tok_offsets[t]]] = (int)t;
    return 0;
}

static const MergeSlot *merge_of(const Encoder *e, int32_t a, int32_t b) {
    for (size_t k = slot_of(e, a, b); e->slots[k].left != -1; k = (k + 1) & e->mask)
        if (e->slots[k].left == a && e->slots[k].right == b) return &e->slots[k];
    return NULL;
}

static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
static int is_letter(unsigned char c) { return (c | 32) >= 'a' && (c | 32) <= 'z' ? 1 : c >= 0x80; }
static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int char_class(unsigned char c) { return is_space(c) ? 0 : is_letter(c) ? 1 : is_digit(c) ? 2 : 3; }

/* GPT-2's pre-tokenizer split, for ASCII text (bytes >= 0x80 count as letters):
   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t next_piece(const char *s, size_t i, size_t n) {
    static const char *contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    if (s[i] == '\'')
        for (int k = 0; k < 7; k++) {
            size_t len = strlen(contractions[k]);
            if (i + len <= n && memcmp(s + i, contractions[k], len) == 0) return i + len;
        }
    size_t j = i;
    if (s[j] == ' ' && j + 1 < n && !is_space(s[j + 1])) j++;
    if (!is_space(s[j])) {
        int cls = char_class(s[j]);
        while (j < n && char_class(s[j]) == cls) j++;
        return j;
    }
    while (j < n && is_space(s[j])) j++;
    if (j < n && j - i > 1) return j - 1; /* leave the last space to the next word */
    return j;
}

static int encode(const Model *m, const Encoder *e, const char *text, int *out, int cap) {
    size_t n = strlen(text);
    int count = 0;
    for (size_t i = 0; i < n;) {
        size_t end = m->h.tok_kind == 1 ? next_piece(text, i, n) : n;
        int start = count;
        if (m->h.tok_kind == 1) {
            for (size_t k = i; k < end && count < cap; k++) {
                int t = e->byte_token[(unsigned char)text[k]];
                if (t < 0) return -1;
                out[count++] = t;
            }
            for (;;) { /* merge the adjacent pair of lowest rank, leftmost first */
                int best = -1, best_rank = 0;
                for (int k = start; k + 1 < count; k++) {
                    const MergeSlot *sl = merge_of(e, out[k], out[k + 1]);
                    if (sl && (best < 0 || sl->rank < best_rank)) best = k, best_rank = sl->rank;
                }
                if (best < 0) break;
                out[best] = merge_of(e, out[best], out[best + 1])->result;
                memmove(out + best + 1, out + best + 2, (count - best - 2) * sizeof *out);
                count--;
            }
        } else { /* characters: the longest token whose bytes start here, else <unk> */
            for (size_t k = i; k < end && count < cap;) {
                int found = -1, len = 0;
                for (uint32_t t = 0; t < m->h.tok_vocab; t++) {
                    int l = m->tok_offsets[t + 1] - m->tok_offsets[t];
                    if (t != m->h.eot && t != m->h.unk && l > len && k + l <= end &&
                        memcmp(text + k, m->tok_bytes + m->tok_offsets[t], l) == 0)
                        found = (int)t, len = l;
                }
                if (found < 0) {
                    if (m->h.unk == NO_TOKEN) return -1;
                    found = (int)m->h.unk, len = 1;
                    while (k + len < end && ((unsigned char)text[k + len] & 0xC0) == 0x80) len++;
                }
                out[count++] = found;
                k += len;
            }
        }
        i = end;
    }
    return count;
}

/* ---------------------------------------------------------------- commands */
static int die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("crystal: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

typedef struct { Model m; void *map; size_t size; } Mapped;

static int map_file(Mapped *f, const char *path, int verify_crc) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return die("%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return die("%s: not a regular file", path);
    f->size = (size_t)st.st_size;
    f->map = f->size ? mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (f->size && f->map == MAP_FAILED) return die("%s: cannot mmap (%s)", path, strerror(errno));
    if (model_open(&f->m, f->map, f->size, verify_crc)) {
        fprintf(stderr, "crystal: error: %s: %s; re-create it with `dvc repro -f compile`\n", path, f->m.ctx.message);
        if (f->size) munmap(f->map, f->size);
        return 1;
    }
    return 0;
}

static int token_row(const Model *m, long id) {
    if (id < 0 || id >= (long)m->h.tok_vocab) die("token id %ld outside 0..%u", id, m->h.tok_vocab - 1);
    if (m->row_of[id] < 0) die("token id %ld was pruned from this file's vocabulary", id);
    return m->row_of[id];
}

static int cmd_logits(const char *path, int n, char **ids) {
    Mapped f;
    if (map_file(&f, path, 1)) return 1;
    Model *m = &f.m;
    if (n < 1 || n > (int)m->h.block_size) die("give 1..%u token ids", m->h.block_size);
    State s;
    if (state_alloc(&s, m)) die("out of memory");
    for (int pos = 0; pos < n; pos++) {
        char *end;
        errno = 0;
        long id = strtol(ids[pos], &end, 10);
        if (*ids[pos] == '\0' || *end || errno) die("token id %s is not an integer", ids[pos]);
        const float *logits = forward(m, &s, token_row(m, id), pos);
        for (uint32_t t = 0; t < m->h.tok_vocab; t++) {
            int r = m->row_of[t];
            if (r < 0) fputs("-inf", stdout); else printf("%.9g", logits[r]);
            putchar(t + 1 < m->h.tok_vocab ? ' ' : '\n');
        }
    }
    state_free(&s);
    return 0;
}

static uint64_t rng_state;
static float rng_uniform(void) { /* xorshift64*, top 24 bits */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

typedef struct { float logit; int row; } Candidate;

/* temperature 0: argmax; else a draw from softmax(logits / temperature) over the top_k largest
   logits (all of them when top_k is 0). The top k are kept sorted by insertion: one pass. */
static int sample(const float *logits, int n, float temperature, int top_k, Candidate *c) {
    int best = 0;
    for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    if (temperature <= 0.0f) return best;
    int k = top_k > 0 && top_k < n ? top_k : n, kept = 0;
    if (k == n) {
        for (int i = 0; i < n; i++) c[i] = (Candidate){logits[i], i};
        kept = n;
    } else {
        for (int i = 0; i < n; i++) {
            if (kept == k && logits[i] <= c[k - 1].logit) continue;
            int j = kept < k ? kept++ : k - 1;
            while (j > 0 && c[j - 1].logit < logits[i]) c[j] = c[j - 1], j--;
            c[j] = (Candidate){logits[i], i};
        }
    }
    float sum = 0.0f, top = logits[best];
    for (int i = 0; i < kept; i++) sum += c[i].logit = expf((c[i].logit - top) / temperature);
    float u = rng_uniform() * sum;
    for (int i = 0; i < kept; i++) if ((u -= c[i].logit) <= 0.0f) return c[i].row;
    return c[kept - 1].row;
}

/* Generated bytes go out as UTF-8: a byte-level BPE may emit half a character, so a character is
   held until it is complete, and a byte that cannot start or continue one prints as U+FFFD. */
typedef struct { unsigned char held[4]; int n, need; } Utf8Out;

static void utf8_put(Utf8Out *u, unsigned char c) {
    if (u->n && (c & 0xC0) == 0x80) {
        u->held[u->n++] = c;
        if (u->n == u->need) fwrite(u->held, 1, u->n, stdout), u->n = 0;
        return;
    }
    if (u->n) fputs("\xEF\xBF\xBD", stdout), u->n = 0; /* a character cut short */
    int need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 && c >= 0xC2 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 && c <= 0xF4 ? 4 : 0;
    if (need == 1) putchar(c);
    else if (need == 0) fputs("\xEF\xBF\xBD", stdout);
    else u->held[0] = c, u->n = 1, u->need = need;
}

static void utf8_flush(Utf8Out *u) {
    if (u->n) fputs("\xEF\xBF\xBD", stdout), u->n = 0;
}

static void print_token(const Model *m, Utf8Out *u, int id) {
    if ((uint32_t)id == m->h.eot || !m->tok_bytes) return;
    for (int32_t i = m->tok_offsets[id]; i < m->tok_offsets[id + 1]; i++) utf8_put(u, m->tok_bytes[i]);
}

static int cmd_generate(int argc, char **argv) {
    const char *path = NULL, *prompt = "";
    long n_new = 64, top_k = 40, seed = 0;
    float temperature = 0.8f;
    int stats = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        char *end = NULL;
        if (strcmp(a, "--stats") == 0) stats = 1;
        else if (strcmp(a, "-p") == 0 && has) prompt = argv[++i];
        else if (strcmp(a, "-n") == 0 && has) n_new = strtol(argv[++i], &end, 10);
        else if (strcmp(a, "-k") == 0 && has) top_k = strtol(argv[++i], &end, 10);
        else if (strcmp(a, "-s") == 0 && has) seed = strtol(argv[++i], &end, 10);
        else if (strcmp(a, "-t") == 0 && has) temperature = strtof(argv[++i], &end);
        else if (!path && a[0] != '-') path = a;
        else die("unknown option %s; see `crystal` for usage", a);
        if (end && *end) die("option %s needs a number, got %s", a, argv[i]);
    }
    if (!path) die("generate needs a MODEL file");
    if (n_new < 1 || top_k < 0 || !(temperature >= 0.0f) || seed < 0) die("need -n >= 1, -k >= 0, -t >= 0, -s >= 0");
    Mapped f;
    if (map_file(&f, path, 1)) return 1;
    Model *m = &f.m;
    if (!m->h.tok_kind) die("%s holds no tokenizer; use `crystal logits`", path);
    Encoder e;
    int T = m->h.block_size, *tokens = malloc(sizeof(int) * (strlen(prompt) + T + 1));
    Candidate *cands = malloc(sizeof(Candidate) * m->h.vocab_rows);
    State s;
    if (!tokens || !cands || encoder_init(&e, m) || state_alloc(&s, m)) die("out of memory");
    int n = encode(m, &e, prompt, tokens, (int)strlen(prompt));
    if (n < 0) die("the prompt holds a byte the tokenizer cannot encode");
    if (n == 0) /* start from end-of-text, as after a document */
        tokens[n++] = m->h.eot != NO_TOKEN && m->row_of[m->h.eot] >= 0 ? (int)m->h.eot : m->vocab_ids ? m->vocab_ids[0] : 0;
    if (n >= T) die("the prompt is %d tokens; the context holds %d", n, T);
    rng_state = 0x9E3779B97F4A7C15ull ^ (uint64_t)seed * 0xD1B54A32D192ED03ull;
    if (!rng_state) rng_state = 1;
    Utf8Out utf8 = {{0}, 0, 0};
    fputs(prompt, stdout);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const float *logits = NULL;
    for (int pos = 0; pos < n; pos++) logits = forward(m, &s, token_row(m, tokens[pos]), pos);
    int made = 0;
    while (made < n_new && n < T) {
        int row = sample(logits, m->h.vocab_rows, temperature, (int)top_k, cands);
        int id = m->vocab_ids ? m->vocab_ids[row] : row;
        print_token(m, &utf8, id);
        tokens[n] = id, made++;
        if (++n < T && made < n_new) logits = forward(m, &s, row, n - 1);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    utf8_flush(&utf8);
    putchar('\n');
    if (made < n_new) fprintf(stderr, "crystal: the context of %d tokens is full; stopped after %d new tokens\n", T, made);
    double secs = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    if (stats)
        fprintf(stderr, "{\"new_tokens\": %d, \"forward_passes\": %d, \"seconds\": %.6f, \"tokens_per_s\": %.3f}\n",
                made, n - 1, secs, made / secs);
    free(tokens), free(cands), free(e.slots), state_free(&s);
    return 0;
}

static int cmd_encode(const char *path, const char *text) {
    Mapped f;
    if (map_file(&f, path, 1)) return 1;
    if (!f.m.h.tok_kind) die("%s holds no tokenizer", path);
    Encoder e;
    int *ids = malloc(sizeof(int) * (strlen(text) + 1));
    if (!ids || encoder_init(&e, &f.m)) die("out of memory");
    int n = encode(&f.m, &e, text, ids, (int)strlen(text));
    if (n < 0) die("the text holds a byte the tokenizer cannot encode");
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    putchar('\n');
    free(ids), free(e.slots);
    return 0;
}

static int cmd_info(const char *path) {
    Mapped f;
    if (map_file(&f, path, 1)) return 1;
    const Header *h = &f.m.h;
    printf("%s: version %u, %s, mode %s, %s%s%s, %u layers, n_embd %u, %u heads, context %u, %u of %u tokens, %zu bytes\n",
           path, h->version, ARCHITECTURES[h->architecture], MODES[h->mode], h->flags & FLAG_CRYSTALLINE ? "crystalline" : "dense",
           h->flags & FLAG_TIED ? ", tied head" : "", h->flags & FLAG_PRUNED ? ", pruned vocabulary" : "",
           h->n_layer, h->n_embd, h->n_head, h->block_size, h->vocab_rows, h->tok_vocab, f.size);
    for (uint32_t i = 0; i < h->n_tensors; i++) {
        const Entry *e = &f.m.entries[i];
        printf("  %-28s %-5s [", e->name, DTYPES[e->dtype]);
        for (uint32_t k = 0; k < e->ndim; k++) printf(k ? ", %u" : "%u", e->shape[k]);
        printf("] %llu bytes\n", (unsigned long long)e->nbytes);
    }
    return 0;
}

static int cmd_check(int argc, char **argv) {
    int verify_crc = 1, failures = 0, files = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--no-crc") == 0) { verify_crc = 0; continue; }
        Mapped f;
        files++;
        if (map_file(&f, argv[i], verify_crc)) { failures++; continue; }
        free_owned(&f.m.ctx);
        if (f.size) munmap(f.map, f.size);
    }
    printf("{\"files\": %d, \"valid\": %d, \"rejected\": %d}\n", files, files - failures, failures);
    return failures ? 1 : 0;
}

#ifdef CRYSTAL_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Model m;
    if (model_open(&m, data, size, 0) == 0) free_owned(&m.ctx);
    return 0;
}
#else
/* for in-process fuzzing from Python (ctypes): 0 = valid, 1 = rejected, message in err */
int crystal_validate(const uint8_t *data, size_t size, int verify_crc, char *err, size_t err_size) {
    Model m;
    if (model_open(&m, data, size, verify_crc)) {
        snprintf(err, err_size, "%s", m.ctx.message);
        return 1;
    }
    free_owned(&m.ctx);
    return 0;
}

int main(int argc, char **argv) {
    const char *usage =
        "usage: crystal info MODEL | check [--no-crc] MODEL... | logits MODEL ID... | encode MODEL TEXT |\n"
        "       generate MODEL [-p PROMPT] [-n TOKENS] [-t TEMPERATURE] [-k TOP_K] [-s SEED] [--stats]\n";
    if (argc < 3) { fputs(usage, stderr); return 2; }
    if (strcmp(argv[1], "info") == 0) return cmd_info(argv[2]);
    if (strcmp(argv[1], "check") == 0) return cmd_check(argc - 2, argv + 2);
    if (strcmp(argv[1], "logits") == 0) return cmd_logits(argv[2], argc - 3, argv + 3);
    if (strcmp(argv[1], "encode") == 0 && argc == 4) return cmd_encode(argv[2], argv[3]);
    if (strcmp(argv[1], "generate") == 0) return cmd_generate(argc - 2, argv + 2);
    fputs(usage, stderr);
    return 2;
}
#endif
