/* One decoder layer of a CPU decode step (one new token per sequence) in one call, built into one library with
 * the kernels it strings together (decode_ops.c, quant_decode.c, moe_decode.c, paged_decode.c): the model's
 * per-op forward is about a dozen Python-level calls a layer (each 10-30 us of wrapper, argument checks and
 * allocation around a few microseconds of work at batch 1 on a small model); this is one.
 *
 *   x, r1   = add_rms_norm(h, residual)            (first layer: rms_norm(h), r1 = h)
 *   qkv     = x . Wqkv^T
 *   a       = paged attention (QK-norm, RoPE, the new k and v into the cache first)
 *   x2, r2  = add_rms_norm(a . Wo^T, r1)
 *   y       = dense layer: mlp(x2); MoE layer: experts(x2, route(x2)) + shared(x2)
 *   returns (y, r2) as DecoderLayer.forward does.
 *
 * The same C functions as the per-op path in the same order, so the same numbers: a weight matrix is fp32 or bf16
 * (p2m_dense_linear; MLPs as one expert of weight 1 through p2m_moe_decode, as Kernels.mlp runs them) or int8 /
 * int4 (p2m_quant_linear, p2m_quant_moe). The caller (kernels/cpu/layer.py) checks that the layer and the step
 * are ones this takes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

int p2m_add_rms_norm(const void *x, const void *res, const void *w, int w_bf16, float eps, void *normed,
                     void *res_out, int T, int H, int bf16, int nthreads);
int p2m_gate_route(const void *x, int bf16, const float *gw, const float *bias, int T, int H, int E, int K,
                   int softmax, int n_group, int topk_group, int norm_topk, float scale, float *weights,
                   int64_t *ids, int ldo, int nthreads);
int p2m_dense_linear(const void *x, const void *w, const void *bias, void *out, int bf16, int obf16, int T, int K,
                     int N, int nthreads, int generic);
int p2m_moe_decode(const void *x, int act_bf16, const void *w13, const void *w2, const int64_t *w13_parts,
                   const int64_t *w2_parts, int wbf16, const float *weights, const int64_t *ids, void *out, int T,
                   int K, int H, int I, int E, int nthreads, int generic);
int p2m_quant_linear(const void *x, int xbf16, int obf16, int T, int K, const uint8_t *qw, const float *ws, int int4,
                     int group, int N, const float *bias, void *out, int nthreads, int generic);
int p2m_quant_moe(const void *x, int xbf16, const uint8_t *w13, const float *s13, const uint8_t *w2,
                  const float *s2, int int4, int group, const float *weights, const int64_t *ids, void *out, int T,
                  int K, int H, int I, int E, int nthreads, int generic);
int p2m_paged_decode(const void *q, int64_t q_stok, int64_t q_shead, int q_bf16, const void *k_cache,
                     const void *v_cache, int kv_bf16, int64_t num_blocks, const int32_t *block_tables,
                     int64_t bt_stride, const int32_t *context_lens, void *out, int B, int nh, int nkv, int D, int bs,
                     float scale, const void *k_new, int64_t kn_stok, int64_t kn_shead, const void *v_new,
                     int64_t vn_stok, int64_t vn_shead, const int64_t *slots, const void *q_w, const void *k_w,
                     int w_bf16, const float *cos, const float *sin, int half, float eps, int nthreads, int generic);

enum { MAT_F32 = 0, MAT_BF16 = 1, MAT_INT8 = 2, MAT_INT4 = 3 };

/* A weight matrix [N, K], or [E, N, K] for the experts: the tensor (fp32 / bf16), or int8 / int4 codes and
 * scales (param2moe/quant/formats.py). q NULL: absent. parts: an fp32 / bf16 gated MLP's or experts' matrices
 * left in the checkpoint's files, the addresses of their pieces (moe_decode.c), q then unused but not NULL. */
typedef struct {
    int kind;
    const void *q;
    const float *scale;
    int n, k, group;
    const int64_t *parts;
} p2m_mat;

typedef struct {
    int H, nh, nkv, D, half;  /* hidden, heads, KV heads, head size, RoPE pairs */
    int bf16, norm_bf16;      /* activations bf16 (else fp32); the norms' weights bf16 */
    float eps, qk_eps, attn_scale;
    const void *in_norm, *post_norm, *q_norm, *k_norm; /* q_norm NULL: no QK-norm */
    p2m_mat qkv, dense;
    p2m_mat mlp_gate_up, mlp_down; /* the dense layer's MLP, or the MoE layer's shared experts (q NULL: none) */
    int moe, E, top_k, softmax, n_group, topk_group, norm_topk;
    float routed_scale;
    const float *router, *router_bias; /* [E, H] fp32, [E] fp32 or NULL */
    p2m_mat w13, w2;                   /* [E, 2I, H], [E, H, I] */
} p2m_layer;

typedef struct {
    int T;
    const void *h, *residual; /* [T, H]; residual NULL: the first layer */
    void *h_out, *res_out;    /* [T, H] */
    const float *cos, *sin;   /* [T, half] */
    void *k_cache, *v_cache;
    int kv_bf16, block_size;
    int64_t num_blocks, bt_stride;
    const int32_t *block_tables, *context_lens;
    const int64_t *slots;
    int threads, generic;
} p2m_step;

static int linear(const p2m_mat *m, const void *x, void *out, int T, int bf16, int nt, int generic) {
    if (m->kind <= MAT_BF16)
        return p2m_dense_linear(x, m->q, NULL, out, bf16, bf16, T, m->k, m->n, nt, generic);
    return p2m_quant_linear(x, bf16, bf16, T, m->k, m->q, m->scale, m->kind == MAT_INT4, m->group, m->n, NULL, out,
                            nt, generic);
}

/* Experts w13 [E, 2I, H] / w2 [E, H, I] of one kind on the pairs (weights, ids [T, K]). */
static int experts(const p2m_mat *w13, const p2m_mat *w2, const void *x, const float *weights, const int64_t *ids,
                   void *out, int T, int K, int H, int E, int bf16, int nt, int generic) {
    const int I = w2->k;
    if (w13->kind <= MAT_BF16)
        return p2m_moe_decode(x, bf16, w13->q, w2->q, w13->parts, w2->parts, w13->kind == MAT_BF16, weights, ids, out,
                              T, K, H, I, E, nt, generic);
    return p2m_quant_moe(x, bf16, w13->q, w13->scale, w2->q, w2->scale, w13->kind == MAT_INT4, w13->group, weights,
                         ids, out, T, K, H, I, E, nt, generic);
}

/* Returns 0, 1 (an id or block out of range), 2 (no memory). */
int p2m_decode_layer(const p2m_layer *L, const p2m_step *S) {
    const int T = S->T, H = L->H, bf16 = L->bf16, nt = S->threads, g = S->generic;
    const size_t es = bf16 ? 2 : 4, th = (size_t)T * H * es, nq = (size_t)(L->nh + 2 * L->nkv) * L->D;
    char *x = malloc(th), *r1 = malloc(th), *o = malloc(th), *x2 = malloc(th), *sh = malloc(th);
    char *qkv = malloc((size_t)T * nq * es), *att = malloc((size_t)T * L->nh * L->D * es);
    const int K = L->moe ? L->top_k : 1;
    float *wts = malloc((size_t)T * K * sizeof(float));
    int64_t *ids = malloc((size_t)T * K * sizeof(int64_t));
    int err = !x || !r1 || !o || !x2 || !sh || !qkv || !att || !wts || !ids ? 2 : 0;
    const void *res1 = S->residual ? (const void *)r1 : S->h;
    if (!err)
        err = p2m_add_rms_norm(S->h, S->residual, L->in_norm, L->norm_bf16, L->eps, x, S->residual ? r1 : NULL, T, H,
                               bf16, nt);
    if (!err) err = linear(&L->qkv, x, qkv, T, bf16, nt, g);
    if (!err) {
        const int64_t stok = (int64_t)nq, D = L->D;
        err = p2m_paged_decode(qkv, stok, D, bf16, S->k_cache, S->v_cache, S->kv_bf16, S->num_blocks, S->block_tables,
                               S->bt_stride, S->context_lens, att, T, L->nh, L->nkv, L->D, S->block_size,
                               L->attn_scale, qkv + (size_t)L->nh * D * es, stok, D,
                               qkv + (size_t)(L->nh + L->nkv) * D * es, stok, D, S->slots, L->q_norm, L->k_norm,
                               L->norm_bf16, S->cos, S->sin, L->half, L->qk_eps, nt, g);
    }
    if (!err) err = linear(&L->dense, att, o, T, bf16, nt, g);
    if (!err) err = p2m_add_rms_norm(o, res1, L->post_norm, L->norm_bf16, L->eps, x2, S->res_out, T, H, bf16, nt);
    if (!err && L->moe) {
        err = p2m_gate_route(x2, bf16, L->router, L->router_bias, T, H, L->E, L->top_k, L->softmax, L->n_group,
                             L->topk_group, L->norm_topk, L->routed_scale, wts, ids, L->top_k, nt);
        if (!err) err = experts(&L->w13, &L->w2, x2, wts, ids, S->h_out, T, K, H, L->E, bf16, nt, g);
    }
    if (!err && L->mlp_gate_up.q) { /* the dense layer's MLP, or the shared experts: one expert of weight 1 */
        p2m_mat gu = L->mlp_gate_up, dn = L->mlp_down;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < K; j++) wts[t * K + j] = j ? 0.0f : 1.0f, ids[t * K + j] = j ? -1 : 0;
        void *dst = L->moe ? (void *)sh : S->h_out;
        err = experts(&gu, &dn, x2, wts, ids, dst, T, K, H, 1, bf16, nt, g);
        if (!err && L->moe) { /* y = experts + shared, in the activation dtype (a bf16 add rounds once) */
            const size_t n = (size_t)T * H;
            if (bf16) {
                uint16_t *y = S->h_out;
                const uint16_t *s = (const uint16_t *)sh;
                for (size_t i = 0; i < n; i++) y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(s[i]));
            } else {
                float *y = S->h_out;
                const float *s = (const float *)sh;
                for (size_t i = 0; i < n; i++) y[i] += s[i];
            }
        }
    }
    free(x); free(r1); free(o); free(x2); free(sh); free(qkv); free(att); free(wts); free(ids);
    return err;
}
