/* Routed experts on the CPU at decode sizes, in one call per MoE layer (see param2moe/kernels/moe.py
 * moe_experts, whose roundings it reproduces).
 *
 * x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], all contiguous, fp32 or bf16 (x and the
 * weights of one dtype); or, where the weights stay in the checkpoint's files as separate tensors
 * (param2moe/mapped.py), tables of their addresses: w13_parts [2E] (expert e's gate [I, H] at 2e, its up at
 * 2e + 1) and w2_parts [E] (its down [H, I]), w13 / w2 then unused. weights [T, K] fp32, ids [T, K] int64 (-1: no
 * expert). out [T, H] in x's dtype:
 *   out[t] = sum_k weights[t, k] * down_e(silu(gate_e . x[t]) * (up_e . x[t])),  e = ids[t, k]
 * with, for bf16, gate and up rounded to bf16, silu(gate) rounded, the product rounded, each down result
 * rounded, then the weighted sum in fp32 (a token's terms by ascending expert, as the oracle's index_add over
 * pairs sorted by expert) and a final rounding.
 *
 * The pairs are grouped by expert (counting sort, stable). Per expert, its n rows go through gate/up together
 * (each weight row read once for all of them: tiles of 4 weight rows x up to 4 token rows, the products summed
 * over H in 16 vector accumulators, reduced together by one transposed reduction; the weight rows two tiles on
 * prefetched), the SiLU * up, then down, whose results are weighted into an fp32 [T, H]
 * buffer. OpenMP threads split gate/up by intermediate columns (a thread computes gate j and up j for its j,
 * then their activation) and down by output columns h (so a thread alone adds into y[:, h] for its h): one
 * barrier between gate/up and down, none after down (the activation buffer is double-buffered by expert
 * parity, so the next expert's gate/up may start while another thread still reads this one's activation).
 *
 * Plain C with OpenMP; AVX-512 intrinsics for the tiles where the compiler targets them (-march=native; bf16
 * with AVX512-BF16 dot products where there, else widened to fp32), else plain C loops.
 * Measured (two Zen 5 cores, H 512, I 256, 16 experts, top 4, batch 64, weights from DRAM): 1.0 ms a layer in
 * fp32 and 0.6-0.7 in bf16 against 1.5-1.6 / 1.1-1.3 for the torch path (oneDNN per expert); the prefetch
 * (distance 2 against 1: -7% bf16; none: +25-55%) and the matmuls per token count (no product of a repeated
 * row: -20% fp32) mattered.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Matrix products in tiles: acc[r][c] = W row r . X row c over k, for 4 weight rows (w + r * ldw) and 4
 * activation rows xr[c] (callers with fewer repeat the last). Modes: MODE_F32 (weights and activations fp32),
 * MODE_W16 (bf16 weights widened to fp32 by a shift, fp32 activations), MODE_DP16 (bf16 weights and bf16
 * activations, AVX512-BF16 dot products: pairs of products summed in fp32, 32 elements an instruction). */
enum { MODE_F32 = 0, MODE_W16 = 1, MODE_DP16 = 2 };

#ifndef P2M_PF
#define P2M_PF 2 /* prefetch distance, in tiles of 4 weight rows */
#endif
#ifndef P2M_PF_ALL
#define P2M_PF_ALL 1 /* prefetch in every token tile of a row tile (0: the first only; 1 measured ~3% faster) */
#endif

#if defined(__AVX512F__)
#define P2M_ACC(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) \
                   X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)

/* Lane j of the result: the sum of the lanes of v[j] (16 vectors: one transposed reduction). */
static inline __m512 pair_sum(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad_sum(__m512 a, __m512 b) {
    __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 lane_sum(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}
static inline __m512 reduce16(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6,
                              __m512 v7, __m512 v8, __m512 v9, __m512 v10, __m512 v11, __m512 v12, __m512 v13,
                              __m512 v14, __m512 v15) {
    __m512 y0 = quad_sum(pair_sum(v0, v1), pair_sum(v2, v3)), y1 = quad_sum(pair_sum(v4, v5), pair_sum(v6, v7));
    __m512 y2 = quad_sum(pair_sum(v8, v9), pair_sum(v10, v11));
    __m512 y3 = quad_sum(pair_sum(v12, v13), pair_sum(v14, v15));
    return lane_sum(lane_sum(y0, y1), lane_sum(y2, y3));
}

static inline __m512 load_w(const void *w, int64_t off, int wbf16, __mmask16 m, int full) {
    if (wbf16) {
        __m256i h = full ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + off))
                         : _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return full ? _mm512_loadu_ps((const float *)w + off) : _mm512_maskz_loadu_ps(m, (const float *)w + off);
}

#define P2M_FMA_ROWS(OP)                                                                                   \
    OP(a00, w0, v0, 0) OP(a01, w0, v1, 1) OP(a02, w0, v2, 2) OP(a03, w0, v3, 3)                          \
    OP(a10, w1, v0, 0) OP(a11, w1, v1, 1) OP(a12, w1, v2, 2) OP(a13, w1, v3, 3)                          \
    OP(a20, w2, v0, 0) OP(a21, w2, v1, 1) OP(a22, w2, v2, 2) OP(a23, w2, v3, 3)                          \
    OP(a30, w3, v0, 0) OP(a31, w3, v1, 1) OP(a32, w3, v2, 2) OP(a33, w3, v3, 3)
/* NC (activation rows used, a constant after inlining): the products of the other columns are skipped. */
#define P2M_FMA(acc, w, v, c) if (c < NC) acc = _mm512_fmadd_ps(w, v, acc);
#define P2M_DPBF(acc, w, v, c) if (c < NC) acc = _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)v);
#define P2M_DECL(r, c) __m512 a##r##c = _mm512_setzero_ps();

/* pf: the next tile's weight rows, prefetched as this one streams (or NULL). */
static inline __attribute__((always_inline)) void tile_avx512(const int NC, const int WBF16, const void *w, int64_t ldw,
                                                              const void *const *xr, int k, const void *pf,
                                                              float acc[16]) {
    P2M_ACC(P2M_DECL)
    const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    int i = 0;
#define P2M_STEP(FULL, M)                                                                                   \
    do {                                                                                                    \
        __m512 v0 = FULL ? _mm512_loadu_ps(x0 + i) : _mm512_maskz_loadu_ps(M, x0 + i);                      \
        __m512 v1 = NC <= 1 ? _mm512_setzero_ps() : FULL ? _mm512_loadu_ps(x1 + i) : _mm512_maskz_loadu_ps(M, x1 + i);                      \
        __m512 v2 = NC <= 2 ? _mm512_setzero_ps() : FULL ? _mm512_loadu_ps(x2 + i) : _mm512_maskz_loadu_ps(M, x2 + i);                      \
        __m512 v3 = NC <= 3 ? _mm512_setzero_ps() : FULL ? _mm512_loadu_ps(x3 + i) : _mm512_maskz_loadu_ps(M, x3 + i);                      \
        __m512 w0 = load_w(w, i, WBF16, M, FULL), w1 = load_w(w, ldw + i, WBF16, M, FULL);                  \
        __m512 w2 = load_w(w, 2 * ldw + i, WBF16, M, FULL), w3 = load_w(w, 3 * ldw + i, WBF16, M, FULL);    \
        P2M_FMA_ROWS(P2M_FMA)                                                                               \
    } while (0)
    for (; i + 16 <= k; i += 16) {
        if (pf && (!WBF16 || !(i & 16))) {
            const char *p = WBF16 ? (const char *)((const uint16_t *)pf + i) : (const char *)((const float *)pf + i);
            int64_t rb = WBF16 ? ldw * 2 : ldw * 4;
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + rb, _MM_HINT_T0);
            _mm_prefetch(p + 2 * rb, _MM_HINT_T0);
            _mm_prefetch(p + 3 * rb, _MM_HINT_T0);
        }
        P2M_STEP(1, 0xffff);
    }
    if (i < k) {
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
        P2M_STEP(0, m);
    }
#undef P2M_STEP
    _mm512_storeu_ps(acc, reduce16(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33));
}

#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void tile_dp16(const int NC, const uint16_t *w, int64_t ldw, const void *const *xr, int k, const uint16_t *pf,
                             float acc[16]) {
    P2M_ACC(P2M_DECL)
    const uint16_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    int i = 0;
#define P2M_STEP(FULL, M)                                                                                   \
    do {                                                                                                    \
        __m512i v0 = FULL ? _mm512_loadu_si512(x0 + i) : _mm512_maskz_loadu_epi16(M, x0 + i);               \
        __m512i v1 = NC <= 1 ? _mm512_setzero_si512() : FULL ? _mm512_loadu_si512(x1 + i) : _mm512_maskz_loadu_epi16(M, x1 + i);               \
        __m512i v2 = NC <= 2 ? _mm512_setzero_si512() : FULL ? _mm512_loadu_si512(x2 + i) : _mm512_maskz_loadu_epi16(M, x2 + i);               \
        __m512i v3 = NC <= 3 ? _mm512_setzero_si512() : FULL ? _mm512_loadu_si512(x3 + i) : _mm512_maskz_loadu_epi16(M, x3 + i);               \
        __m512i w0 = FULL ? _mm512_loadu_si512(w + i) : _mm512_maskz_loadu_epi16(M, w + i);                 \
        __m512i w1 = FULL ? _mm512_loadu_si512(w + ldw + i) : _mm512_maskz_loadu_epi16(M, w + ldw + i);     \
        __m512i w2 = FULL ? _mm512_loadu_si512(w + 2 * ldw + i) : _mm512_maskz_loadu_epi16(M, w + 2 * ldw + i); \
        __m512i w3 = FULL ? _mm512_loadu_si512(w + 3 * ldw + i) : _mm512_maskz_loadu_epi16(M, w + 3 * ldw + i); \
        P2M_FMA_ROWS(P2M_DPBF)                                                                              \
    } while (0)
    for (; i + 32 <= k; i += 32) {
        if (pf) {
            _mm_prefetch((const char *)(pf + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + ldw + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + 2 * ldw + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + 3 * ldw + i), _MM_HINT_T0);
        }
        P2M_STEP(1, 0xffffffffu);
    }
    if (i < k) {
        __mmask32 m = (__mmask32)((1ull << (k - i)) - 1u);
        P2M_STEP(0, m);
    }
#undef P2M_STEP
    _mm512_storeu_ps(acc, reduce16(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33));
}
#endif
#endif

static inline void tile_generic(int mode, const void *w, int64_t ldw, const void *const *xr, int k, float acc[16]) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) {
            float s = 0.0f;
            if (mode == MODE_DP16) {
                const uint16_t *wr = (const uint16_t *)w + r * ldw, *xc = xr[c];
#pragma omp simd reduction(+ : s)
                for (int i = 0; i < k; i++) s += bf16_to_f32(wr[i]) * bf16_to_f32(xc[i]);
            } else if (mode == MODE_W16) {
                const uint16_t *wr = (const uint16_t *)w + r * ldw;
                const float *xc = xr[c];
#pragma omp simd reduction(+ : s)
                for (int i = 0; i < k; i++) s += bf16_to_f32(wr[i]) * xc[i];
            } else {
                const float *wr = (const float *)w + r * ldw, *xc = xr[c];
#pragma omp simd reduction(+ : s)
                for (int i = 0; i < k; i++) s += wr[i] * xc[i];
            }
            acc[r * 4 + c] = s;
        }
}

#define P2M_BY_NC(CALL) \
    switch (nc) {          \
        case 1: CALL(1); break; \
        case 2: CALL(2); break; \
        case 3: CALL(3); break; \
        default: CALL(4); break; \
    }

static inline void tile(int mode, int nc, const void *w, int64_t ldw, const void *const *xr, int k, const void *pf,
                        float acc[16], int generic) {
    (void)pf;
#if defined(__AVX512F__)
    if (!generic) {
#if defined(__AVX512BF16__)
        if (mode == MODE_DP16) {
#define P2M_CALL(N) tile_dp16(N, w, ldw, xr, k, pf, acc)
            P2M_BY_NC(P2M_CALL)
#undef P2M_CALL
            return;
        }
#endif
        if (mode == MODE_W16) {
#define P2M_CALL(N) tile_avx512(N, 1, w, ldw, xr, k, pf, acc)
            P2M_BY_NC(P2M_CALL)
#undef P2M_CALL
            return;
        }
        if (mode == MODE_F32) {
#define P2M_CALL(N) tile_avx512(N, 0, w, ldw, xr, k, pf, acc)
            P2M_BY_NC(P2M_CALL)
#undef P2M_CALL
            return;
        }
    }
#endif
    (void)nc;
    tile_generic(mode, w, ldw, xr, k, acc);
}

/* Rows [r0, r1) of a matrix of rows of k (w, stride ldw) against n activation rows xr: out[c * ldo + r]. */
static void rows_times(int mode, const void *w, int64_t ldw, int r0, int r1, const void *const *xr, int n, int k,
                       float *out, int64_t ldo, int generic) {
    float acc[16];
    size_t es = mode == MODE_F32 ? 4 : 2;
    const void *x4[4];
    for (int r = r0; r < r1; r += 4) {
        int nr = r1 - r < 4 ? r1 - r : 4;
        const char *wr = (const char *)w + (size_t)r * ldw * es;
        const void *pf = r + 4 * P2M_PF + 4 <= r1 ? wr + 4 * P2M_PF * ldw * es : NULL;
        for (int c = 0; c < n; c += 4) {
            int nc = n - c < 4 ? n - c : 4;
            for (int q = 0; q < 4; q++) x4[q] = xr[c + (q < nc ? q : nc - 1)];
            if (nr == 4) {
                tile(mode, nc, wr, ldw, x4, k, c == 0 || P2M_PF_ALL ? pf : NULL, acc, generic);
                for (int cc = 0; cc < nc; cc++)
                    for (int q = 0; q < 4; q++) out[(int64_t)(c + cc) * ldo + r + q] = acc[q * 4 + cc];
            } else {  /* an edge of fewer than 4 rows: row by row (the tile on one row repeated, stride 0) */
                for (int q = 0; q < nr; q++) {
                    tile(mode, nc, wr + q * ldw * es, 0, x4, k, NULL, acc, generic);
                    for (int cc = 0; cc < nc; cc++) out[(int64_t)(c + cc) * ldo + r + q] = acc[cc];
                }
            }
        }
    }
}

/* [lo, hi) of n items for thread `tid` of `nt`, in multiples of `align` (the last thread takes the rest). */
static inline void split(int n, int align, int tid, int nt, int *lo, int *hi) {
    int blocks = (n + align - 1) / align;
    int b0 = (int)((int64_t)blocks * tid / nt), b1 = (int)((int64_t)blocks * (tid + 1) / nt);
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

/* Returns 0, 1 for an expert id >= E, 2 for no memory. */
int p2m_moe_decode(const void *x, int act_bf16, const void *w13, const void *w2, const int64_t *w13_parts,
                   const int64_t *w2_parts, int wbf16, const float *weights, const int64_t *ids, void *out, int T,
                   int K, int H, int I, int E, int nthreads, int generic) {
    int P = T * K;
    int *counts = calloc((size_t)E + 1, sizeof(int));
    int *pair_tok = malloc((size_t)(P > 0 ? P : 1) * sizeof(int));
    float *pair_w = malloc((size_t)(P > 0 ? P : 1) * sizeof(float));
    if (!counts || !pair_tok || !pair_w) {
        free(counts); free(pair_tok); free(pair_w);
        return 2;
    }
    for (int p = 0; p < P; p++) {
        int64_t e = ids[p];
        if (e >= E) {
            free(counts); free(pair_tok); free(pair_w);
            return 1;
        }
        if (e >= 0) counts[e + 1]++;
    }
    int maxn = 0;
    for (int e = 0; e < E; e++) {
        maxn = counts[e + 1] > maxn ? counts[e + 1] : maxn;
        counts[e + 1] += counts[e];
    }
    {
        int *pos = malloc((size_t)E * sizeof(int) + 1);
        if (!pos) {
            free(counts); free(pair_tok); free(pair_w);
            return 2;
        }
        memcpy(pos, counts, (size_t)E * sizeof(int));
        for (int p = 0; p < P; p++) {
            int64_t e = ids[p];
            if (e < 0) continue;
            int s = pos[e]++;
            pair_tok[s] = p / K;
            pair_w[s] = weights[p];
        }
        free(pos);
    }
    (void)act_bf16; /* activations and weights share a dtype (checked by the caller) */
#if defined(__AVX512BF16__) && !defined(P2M_NO_DP16) /* P2M_NO_DP16: the widening path (tests) */
    const int mode = wbf16 ? MODE_DP16 : MODE_F32;
#else
    const int mode = wbf16 ? MODE_W16 : MODE_F32;
#endif
    const size_t aes = mode == MODE_DP16 ? 2 : 4; /* bytes of an activation element */
    int out_f32 = !wbf16;
    size_t th = (size_t)T * H;
    float *xf = mode == MODE_W16 ? malloc(th * sizeof(float)) : NULL;
    float *y = out_f32 ? (float *)out : malloc(th * sizeof(float));
    size_t mi = (size_t)(maxn > 0 ? maxn : 1) * I;
    float *gu = malloc(2 * mi * sizeof(float));          /* gate [n, I], up [n, I] of the current expert */
    char *act = malloc(2 * mi * aes);                    /* two buffers, by expert parity */
    float *dn = malloc((size_t)(maxn > 0 ? maxn : 1) * H * sizeof(float)); /* down results [n, H] */
    if ((mode == MODE_W16 && !xf) || !y || !gu || !act || !dn) {
        free(counts); free(pair_tok); free(pair_w); free(xf);
        if (!out_f32) free(y);
        free(gu); free(act); free(dn);
        return 2;
    }
    int nt = nthreads > 0 ? nthreads : 1;
    const int64_t w13s = (int64_t)2 * I * H, w2s = (int64_t)H * I;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int lo, hi;
        split((int)th, 64, tid, nth, &lo, &hi);
        for (int i = lo; i < hi; i++) y[i] = 0.0f;
        if (mode == MODE_W16) {
            const uint16_t *xb = (const uint16_t *)x;
#pragma omp simd
            for (int i = lo; i < hi; i++) xf[i] = bf16_to_f32(xb[i]);
        }
        int jlo, jhi, hlo, hhi;
        split(I, 16, tid, nth, &jlo, &jhi);
        split(H, 16, tid, nth, &hlo, &hhi);
        const char *xbase = mode == MODE_W16 ? (const char *)xf : (const char *)x;
        const size_t xes = mode == MODE_F32 || mode == MODE_W16 ? 4 : 2;
        const void *xp[maxn > 0 ? maxn : 1], *ap[maxn > 0 ? maxn : 1];
#pragma omp barrier
        int parity = 0;
        for (int e = 0; e < E; e++) {
            int s0 = counts[e], n = counts[e + 1] - s0;
            if (n == 0) continue;
            char *a = act + parity * mi * aes;
            parity ^= 1;
            /* each thread its own row pointers */
            for (int r = 0; r < n; r++) xp[r] = xbase + (size_t)pair_tok[s0 + r] * H * xes;
            const size_t es = wbf16 ? 2 : 4;
            const char *we = w13_parts ? (const char *)(intptr_t)w13_parts[2 * e] : (const char *)w13 + e * w13s * es;
            const char *wu = w13_parts ? (const char *)(intptr_t)w13_parts[2 * e + 1] : we + (int64_t)I * H * es;
            rows_times(mode, we, H, jlo, jhi, xp, n, H, gu, I, generic);
            rows_times(mode, wu, H, jlo, jhi, xp, n, H, gu + mi, I, generic);
            for (int r = 0; r < n; r++) {
                const float *g = gu + (int64_t)r * I, *u = gu + mi + (int64_t)r * I;
                float *ar_ = (float *)a + (int64_t)r * I;
                if (mode == MODE_DP16) {
                    uint16_t *ab = (uint16_t *)a + (int64_t)r * I;
#pragma omp simd
                    for (int j = jlo; j < jhi; j++) {
                        float gv = round_bf16(g[j]), uv = round_bf16(u[j]);
                        float sv = round_bf16(gv / (1.0f + exp_approx(-gv)));
                        ab[j] = f32_to_bf16(sv * uv);
                    }
                } else if (mode == MODE_W16) {
#pragma omp simd
                    for (int j = jlo; j < jhi; j++) {
                        float gv = round_bf16(g[j]), uv = round_bf16(u[j]);
                        float sv = round_bf16(gv / (1.0f + exp_approx(-gv)));
                        ar_[j] = round_bf16(sv * uv);
                    }
                } else {
#pragma omp simd
                    for (int j = jlo; j < jhi; j++) ar_[j] = g[j] / (1.0f + exp_approx(-g[j])) * u[j];
                }
            }
#pragma omp barrier
            for (int r = 0; r < n; r++) ap[r] = a + (size_t)r * I * aes;
            const char *wd = w2_parts ? (const char *)(intptr_t)w2_parts[e] : (const char *)w2 + e * w2s * es;
            rows_times(mode, wd, I, hlo, hhi, ap, n, I, dn, H, generic);
            for (int r = 0; r < n; r++) {
                float wt = pair_w[s0 + r];
                float *yr = y + (int64_t)pair_tok[s0 + r] * H;
                const float *d = dn + (int64_t)r * H;
                if (wbf16) {
#pragma omp simd
                    for (int h = hlo; h < hhi; h++) {
                        float v = round_bf16(d[h]) * wt;
                        yr[h] = yr[h] + v;
                    }
                } else {
#pragma omp simd
                    for (int h = hlo; h < hhi; h++) {
                        float v = d[h] * wt;
                        yr[h] = yr[h] + v;
                    }
                }
            }
            /* No barrier here: the next expert's gate/up writes only this thread's columns of gu and the other
             * activation buffer; this one is written again two experts on, after the next barrier. */
        }
#pragma omp barrier
        if (!out_f32) {
            uint16_t *ob = (uint16_t *)out;
            for (int i = lo; i < hi; i++) ob[i] = f32_to_bf16(y[i]);
        }
    }
    free(counts); free(pair_tok); free(pair_w); free(xf);
    if (!out_f32) free(y);
    free(gu); free(act); free(dn);
    return 0;
}

/* A dense linear layer at decode sizes with the same tiles: out [T, N] = x [T, K] . w [N, K]^T (+ bias [N]), x,
 * w and bias of one dtype (fp32, or bf16: summed in fp32, plus the bias in fp32), out in it (obf16: one rounding,
 * as oneDNN) or fp32 (the head's logits). Threads split the rows of w (each weight row read once for all T rows
 * of x). Returns 0, or 2 for no memory. */
int p2m_dense_linear(const void *x, const void *w, const void *bias, void *out, int bf16, int obf16, int T, int K,
                     int N, int nthreads, int generic) {
#if defined(__AVX512BF16__) && !defined(P2M_NO_DP16)
    const int mode = bf16 ? MODE_DP16 : MODE_F32;
#else
    const int mode = bf16 ? MODE_W16 : MODE_F32;
#endif
    const size_t tk = (size_t)T * K;
    float *xf = mode == MODE_W16 ? malloc(tk * sizeof(float)) : NULL;
    float *y = obf16 ? malloc((size_t)T * N * sizeof(float)) : (float *)out;
    const void **xr = malloc((size_t)(T > 0 ? T : 1) * sizeof(void *));
    if ((mode == MODE_W16 && !xf) || !y || !xr) {
        free(xf);
        if (obf16) free(y);
        free(xr);
        return 2;
    }
    if (mode == MODE_W16)
        for (size_t i = 0; i < tk; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    const size_t xes = mode == MODE_DP16 ? 2 : 4;
    const char *xb = mode == MODE_W16 ? (const char *)xf : (const char *)x;
    for (int t = 0; t < T; t++) xr[t] = xb + (size_t)t * K * xes;
    int nt = nthreads > 0 ? nthreads : 1;
#pragma omp parallel num_threads(nt) if (nt > 1 && (int64_t)N * K > 65536)
    {
        int lo, hi;
        split(N, 16, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        rows_times(mode, w, K, lo, hi, xr, T, K, y, N, generic);
        for (int t = 0; t < T; t++) {
            float *yr = y + (size_t)t * N;
            if (bias)
                for (int n = lo; n < hi; n++)
                    yr[n] += bf16 ? bf16_to_f32(((const uint16_t *)bias)[n]) : ((const float *)bias)[n];
            if (obf16)
                for (int n = lo; n < hi; n++) ((uint16_t *)out)[(size_t)t * N + n] = f32_to_bf16(yr[n]);
        }
    }
    free(xf);
    if (obf16) free(y);
    free(xr);
    return 0;
}
