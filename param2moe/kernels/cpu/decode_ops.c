/* The small steps between a layer's matrix products, on the CPU, each one call for all the tokens: the residual
 * add + RMSNorm (kernels/norm.py add_rms_norm, rms_norm) and the router (kernels/routing.py gate_route: fp32
 * logits, sigmoid or softmax scores, expert bias, grouped choice, top-k, normalised and scaled weights).
 * In torch each is 6-15 small ops of a few microseconds each, most of a batch-1 decode step on a small model.
 *
 * Numerics as the torch oracles: the add in the activation dtype (bf16: rounded), the norm in fp32
 * (x * 1/sqrt(mean(x^2) + eps), times the weight, rounded to the activation dtype); router logits in fp32 from
 * the normed rows read as fp32, summed in another order than torch's matmul (an expert choice at a near tie can
 * differ); top-k by descending choice score, the first index first among equals.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_common.h"

static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* One row: res_out = x + res (if res), normed = rms_norm(that). Rows of h elements in dtype bf16 / fp32. */
static void add_norm_row(const void *x, const void *res, const void *w, int w_bf16, float eps, void *normed,
                         void *res_out, int64_t row, int h, int bf16, float *tmp) {
    const int64_t o = row * h;
    for (int i = 0; i < h; i++) {
        float v = ld(x, o + i, bf16);
        if (res) {
            v += ld(res, o + i, bf16);
            if (bf16) v = round_bf16(v);
        }
        tmp[i] = v;
    }
    if (res_out)
        for (int i = 0; i < h; i++) st(res_out, o + i, tmp[i], bf16);
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < h; i++) ss += tmp[i] * tmp[i];
    const float r = 1.0f / sqrtf(ss / (float)h + eps);
    for (int i = 0; i < h; i++) st(normed, o + i, tmp[i] * r * ld(w, i, w_bf16), bf16);
}

/* normed [T, H] = rms_norm(x + res) and res_out = x + res (res, res_out may be NULL: a plain norm). */
int p2m_add_rms_norm(const void *x, const void *res, const void *w, int w_bf16, float eps, void *normed,
                     void *res_out, int T, int H, int bf16, int nthreads) {
    int err = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) if (nthreads > 1 && T > 1)
    {
        float *tmp = malloc((size_t)H * sizeof(float));
        if (!tmp) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            if (tmp) add_norm_row(x, res, w, w_bf16, eps, normed, res_out, t, H, bf16, tmp);
        free(tmp);
    }
    return err;
}

/* The k largest of v[0..n) (skipping -inf only when fewer finite ones remain is not needed: -inf sorts last),
 * by descending value, the lower index first among equals: idx[0..k). */
static void top_k(const float *v, int n, int k, int *idx) {
    for (int j = 0; j < k; j++) idx[j] = -1;
    for (int i = 0; i < n; i++) {
        int j = k;
        while (j > 0 && (idx[j - 1] < 0 || v[i] > v[idx[j - 1]])) j--;
        if (j >= k) continue;
        for (int m = k - 1; m > j; m--) idx[m] = idx[m - 1];
        idx[j] = i;
    }
}

/* One token's routing from its normed row xr (fp32, H). scratch: 3 * E floats + E ints. */
static void route_row(const float *xr, const float *gw, const float *bias, int H, int E, int K, int softmax,
                      int n_group, int topk_group, int norm_topk, float scale, float *wout, int64_t *iout,
                      float *scratch, int *iscratch) {
    float *s = scratch, *c = scratch + E, *gsc = scratch + 2 * E;
    for (int e = 0; e < E; e++) {
        const float *g = gw + (int64_t)e * H;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < H; i++) acc += xr[i] * g[i];
        s[e] = acc;
    }
    if (softmax) {
        float m = -INFINITY, sum = 0.0f;
        for (int e = 0; e < E; e++) m = s[e] > m ? s[e] : m;
        for (int e = 0; e < E; e++) sum += (s[e] = expf(s[e] - m));
        for (int e = 0; e < E; e++) s[e] /= sum;
    } else {
        for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
    }
    for (int e = 0; e < E; e++) c[e] = bias ? s[e] + bias[e] : s[e];
    if (n_group > 1 && topk_group > 0) {
        const int per = E / n_group, top2 = per < 2 ? per : 2;
        int best[2];
        for (int g = 0; g < n_group; g++) { /* a group's score: the sum of its two best choice scores */
            top_k(c + g * per, per, top2, best);
            gsc[g] = c[g * per + best[0]] + (top2 > 1 ? c[g * per + best[1]] : 0.0f);
        }
        top_k(gsc, n_group, topk_group, iscratch);
        for (int g = 0; g < n_group; g++) {
            int kept = 0;
            for (int j = 0; j < topk_group; j++) kept |= iscratch[j] == g;
            if (!kept)
                for (int e = g * per; e < (g + 1) * per; e++) c[e] = -INFINITY;
        }
    }
    top_k(c, E, K, iscratch);
    float sum = 0.0f;
    for (int j = 0; j < K; j++) sum += s[iscratch[j]];
    for (int j = 0; j < K; j++) {
        float w = s[iscratch[j]];
        if (norm_topk) w = w / sum;
        wout[j] = w * scale;
        iout[j] = iscratch[j];
    }
}

/* weights and ids (rows of ldo >= K; the first K columns written) fp32 / int64 from the normed rows x [T, H] (bf16
 * / fp32), gate weight [E, H] fp32, bias [E] fp32 or NULL. */
int p2m_gate_route(const void *x, int bf16, const float *gw, const float *bias, int T, int H, int E, int K,
                   int softmax, int n_group, int topk_group, int norm_topk, float scale, float *weights,
                   int64_t *ids, int ldo, int nthreads) {
    int err = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) if (nthreads > 1 && T > 1)
    {
        float *buf = malloc(((size_t)H + 3 * (size_t)E) * sizeof(float));
        int *ibuf = malloc((size_t)E * sizeof(int));
        if (!buf || !ibuf) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            if (!buf || !ibuf) continue;
            for (int i = 0; i < H; i++) buf[i] = ld(x, (int64_t)t * H + i, bf16);
            route_row(buf, gw, bias, H, E, K, softmax, n_group, topk_group, norm_topk, scale,
                      weights + (int64_t)t * ldo, ids + (int64_t)t * ldo, buf + H, ibuf);
        }
        free(buf);
        free(ibuf);
    }
    return err;
}
