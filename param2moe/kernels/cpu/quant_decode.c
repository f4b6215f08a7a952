/* Weight-only quantized matrix products on the CPU (param2moe/quant/formats.py's int8 and int4 layouts): a linear
 * layer (p2m_quant_linear) and the routed experts of one MoE layer (p2m_quant_moe) in one call each.
 *
 * Weights, as stored (never expanded in memory):
 *   int8  q int8 [N, K], scale fp32 [N]                      w[n, k] = q[n, k] * scale[n]
 *   int4  q uint8 [N, K / 2] (column 2j in the low nibble of byte j, 2j+1 in the high one, each q + 8),
 *         scale fp32 [N, K / G], G the group size (32, 64 or a multiple of 128)   w[n, k] = (nibble - 8) *
 *         scale[n, k / G]
 *
 * Activations are quantized per row to int8 in blocks of 128 columns (QB), symmetric round-to-nearest-even:
 *   sa = max|x| / 127 over the block,  qa = rint(x * (127 / max|x|))   (all-zero block: qa = 0)
 * as llama.cpp does for its Q8_0 / Q4_0 products (blocks of 32 there). Then each weight row . activation row is
 *   sum over blocks b of  sa_b * sum_{k in b} q_w[k] * qa[k]        (int8: times scale[n] at the end;
 *                                                                     int4: each block times scale[n, b / (G/128)])
 * with the inner sums exact in int32. The only rounding against the float product on dequantized weights is the
 * activations' (relative error of an element <= 1 / 254 of its block's max) and the order of the float sums.
 *
 * The inner sums use AVX512-VNNI `vpdpbusd` (unsigned bytes times signed bytes, 64 products an instruction) where
 * the compiler targets it (-march=native): the weight bytes go in unsigned (int8: q xor 0x80 = q + 128; int4: the
 * stored nibble = q + 8) and the activations signed; the offset is taken back by starting each block's sum at
 * -offset * sum(qa over the block), computed once per activation row. For int4 the activation block is stored in
 * the nibbles' order (its 64 even columns, then its 64 odd ones), so that the low nibbles of 64 weight bytes meet
 * the first half and the high nibbles the second: unpacking a row is an and, a shift and an and.
 * Tiles of 4 weight rows x up to 4 activation rows (16 float accumulators, one transposed reduction at the end);
 * a weight tile's bytes are unpacked once for its activation rows. Elsewhere a plain C path computes the same
 * integer sums.
 *
 * From 8 activation rows on (more tokens, or an expert's rows at prefill) AMX tiles take over where the CPU has them
 * (Sapphire Rapids on): 16 weight rows x 16 activation rows x 64 columns an instruction, signed bytes both sides
 * (int4 unpacked per 16 rows into a small buffer), the int32 tile scaled into float accumulators per block; the
 * rows left over (fewer than 16) go the VNNI way. Each weight tile is read from memory once per thread and reused
 * from the cache for every group of 16 tokens: prefill never writes out dequantized weights.
 * Measured (one core of a Xeon with AMX, shared machine, K = N = 2048, process CPU time): T = 1: int4 0.10 ms,
 * int8 0.19, oneDNN bf16 0.39; T = 16: 0.29 / 0.25 / 0.41; T = 256: 3.1 / 2.7 / 2.2 (AMX bf16 on 2x the bytes).
 *
 * The MoE call: pairs grouped by expert (counting sort, stable, as moe_decode.c); per expert, threads split gate /
 * up by intermediate columns, the SiLU * up is computed and quantized (by the thread that computed the columns
 * when every thread owns whole blocks of 128, else after a barrier), then down by output columns, weighted into an
 * fp32 [T, H] sum (a token's terms by ascending expert). bf16 activations: the bf16 roundings of
 * kernels/moe.py's moe_experts (gate, up, silu, the product, each down result) are kept.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(P2M_NO_VNNI)
#define P2M_VNNI 1
#include <immintrin.h>
#endif

#define QB 128 /* activation block (columns) */

/* One quantized activation row: q [KP] (KP = K rounded up to QB, zero padded), per block its scale and its
 * correction (-offset * sum of the block's q). */
typedef struct {
    const int8_t *q;
    const float *s;
    const int32_t *c;
} arow;

/* Quantize x[0..k) (fp32) into q (kp bytes), s and c (one per block); nib: int4 order within blocks; off: the
 * weights' offset (128 for int8, 8 for int4). */
static void quantize_row(const float *x, int k, int nib, int off, int8_t *q, float *s, int32_t *c) {
    int nb = (k + QB - 1) / QB;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (int64_t)b * QB;
        int n = k - b * QB < QB ? k - b * QB : QB;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < n; i++) {
            float v = fabsf(xb[i]);
            amax = v > amax ? v : amax;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t tmp[QB];
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < QB; i++) {
            int v = i < n ? (int)nearbyintf(xb[i < n ? i : 0] * inv) : 0;
            tmp[i] = (int8_t)v;
            sum += v;
        }
        int8_t *qb = q + (int64_t)b * QB;
        if (nib)
            for (int j = 0; j < QB / 2; j++) qb[j] = tmp[2 * j], qb[QB / 2 + j] = tmp[2 * j + 1];
        else
            memcpy(qb, tmp, QB);
        s[b] = amax / 127.0f;
        c[b] = -off * sum;
    }
}

/* A row of n elements, fp32 or bf16, widened into dst (fp32). */
static inline const float *as_f32(const void *src, int bf16, int n, float *dst) {
    if (!bf16) return (const float *)src;
    const uint16_t *h = (const uint16_t *)src;
#pragma omp simd
    for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
    return dst;
}

/* acc[r * 4 + c] = weight row r (w + r * ldw bytes) . activation row a[c], for 4 rows and nc <= 4 activation
 * rows, without the int8 per-row scale; int4 scales at ws + r * ldws (group gpb blocks). Generic C. */
static void tile_generic(int int4, const uint8_t *w, int64_t ldw, const float *ws, int64_t ldws, int gpb,
                         int spb, const arow *a, int nc, int nb, int k, float acc[16]) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nc; c++) {
            const uint8_t *wr = w + r * ldw;
            float f = 0.0f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = a[c].q + (int64_t)b * QB;
                int32_t s = a[c].c[b];
                if (int4 && spb > 1) { /* groups shorter than a block: a sum per group, its nibbles' offset apart */
                    const uint8_t *p = wr + (int64_t)b * (QB / 2);
                    const int gb = QB / 2 / spb, nbytes = (k - b * QB < QB ? k - b * QB : QB) / 2;
                    for (int g = 0; g * gb < nbytes; g++) {
                        int32_t sg = 0;
                        for (int j = g * gb; j < (g + 1) * gb; j++)
                            sg += ((p[j] & 15) - 8) * q[j] + ((p[j] >> 4) - 8) * q[QB / 2 + j];
                        f += (float)sg * a[c].s[b] * ws[r * ldws + b * spb + g];
                    }
                } else if (int4) {
                    const uint8_t *p = wr + (int64_t)b * (QB / 2);
#pragma omp simd reduction(+ : s)
                    for (int j = 0; j < QB / 2; j++) s += (p[j] & 15) * q[j] + (p[j] >> 4) * q[QB / 2 + j];
                    f += (float)s * a[c].s[b] * ws[r * ldws + b / gpb];
                } else {
                    const uint8_t *p = wr + (int64_t)b * QB;
                    int n = k - b * QB < QB ? k - b * QB : QB;
#pragma omp simd reduction(+ : s)
                    for (int j = 0; j < n; j++) s += (uint8_t)(p[j] ^ 0x80) * q[j];
                    f += (float)s * a[c].s[b];
                }
            }
            acc[r * 4 + c] = f;
        }
}

#if defined(P2M_VNNI)
#define P2M_ACC(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) \
                   X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)
#define P2M_DECL(r, c) __m512 a##r##c = _mm512_setzero_ps();

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
/* Lane j of the result: the sum of the lanes of v[j]. */
static inline __m512 reduce16(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6,
                              __m512 v7, __m512 v8, __m512 v9, __m512 v10, __m512 v11, __m512 v12, __m512 v13,
                              __m512 v14, __m512 v15) {
    __m512 y0 = quad_sum(pair_sum(v0, v1), pair_sum(v2, v3)), y1 = quad_sum(pair_sum(v4, v5), pair_sum(v6, v7));
    __m512 y2 = quad_sum(pair_sum(v8, v9), pair_sum(v10, v11));
    __m512 y3 = quad_sum(pair_sum(v12, v13), pair_sum(v14, v15));
    return lane_sum(lane_sum(y0, y1), lane_sum(y2, y3));
}

static inline __mmask64 bytes_mask(int n) { return n >= 64 ? ~0ull : n <= 0 ? 0ull : (1ull << n) - 1ull; }

/* tile_generic with VNNI (NC, INT4 constants after inlining). pf: the weight rows of a later tile (or NULL). */
static inline __attribute__((always_inline)) void tile_vnni(const int NC, const int INT4, const uint8_t *w,
                                                            int64_t ldw, const float *ws, int64_t ldws, int gpb,
                                                            int spb, const arow *a, int nb, int k,
                                                            const uint8_t *pf, float acc[16]) {
    P2M_ACC(P2M_DECL)
    const __m512i lo4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8((char)0x80);
    /* spb > 1 (int4 groups shorter than a block): lane i of a block's sums holds weight bytes 4i..4i+3, columns
     * 8i..8i+7, so group i * spb / 16 of the block; each lane takes its own offset correction and scale. */
    const __m512i eights = _mm512_set1_epi8(8);
    const __m512i gidx = _mm512_srli_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                                               5, 4, 3, 2, 1, 0),
                                                              _mm512_set1_epi32(spb)), 4);
    const int8_t *q0 = a[0].q, *q1 = a[NC > 1 ? 1 : 0].q, *q2 = a[NC > 2 ? 2 : 0].q, *q3 = a[NC > 3 ? 3 : 0].q;
    for (int b = 0; b < nb; b++) {
        __m512i l0, h0, l1, h1, l2, h2, l3, h3;
        if (INT4) {
            const uint8_t *p = w + (int64_t)b * (QB / 2);
            /* a short last block (K not a multiple of 128: groups under 128 only): masked loads, the activations'
             * zero padding meets zero bytes */
            __m512i v0, v1, v2, v3;
            if (k - b * QB >= QB) {
                v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + ldw);
                v2 = _mm512_loadu_si512(p + 2 * ldw), v3 = _mm512_loadu_si512(p + 3 * ldw);
            } else {
                const __mmask64 mk = bytes_mask((k - b * QB) / 2);
                v0 = _mm512_maskz_loadu_epi8(mk, p), v1 = _mm512_maskz_loadu_epi8(mk, p + ldw);
                v2 = _mm512_maskz_loadu_epi8(mk, p + 2 * ldw), v3 = _mm512_maskz_loadu_epi8(mk, p + 3 * ldw);
            }
            l0 = _mm512_and_si512(v0, lo4), h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), lo4);
            l1 = _mm512_and_si512(v1, lo4), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), lo4);
            l2 = _mm512_and_si512(v2, lo4), h2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), lo4);
            l3 = _mm512_and_si512(v3, lo4), h3 = _mm512_and_si512(_mm512_srli_epi16(v3, 4), lo4);
            if (pf) {
                _mm_prefetch((const char *)pf + b * (QB / 2), _MM_HINT_T0);
                _mm_prefetch((const char *)pf + ldw + b * (QB / 2), _MM_HINT_T0);
                _mm_prefetch((const char *)pf + 2 * ldw + b * (QB / 2), _MM_HINT_T0);
                _mm_prefetch((const char *)pf + 3 * ldw + b * (QB / 2), _MM_HINT_T0);
            }
        } else {
            const uint8_t *p = w + (int64_t)b * QB;
            int n = k - b * QB;
            if (n >= QB) {
#define P2M_LD8(r) l##r = _mm512_xor_si512(_mm512_loadu_si512(p + r * ldw), flip); \
                   h##r = _mm512_xor_si512(_mm512_loadu_si512(p + r * ldw + 64), flip);
                P2M_LD8(0) P2M_LD8(1) P2M_LD8(2) P2M_LD8(3)
#undef P2M_LD8
            } else { /* the last block, short: masked loads (0 ^ 0x80 = 128, times the activations' zero padding) */
                __mmask64 m0 = bytes_mask(n), m1 = bytes_mask(n - 64);
#define P2M_LD8(r) l##r = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m0, p + r * ldw), flip); \
                   h##r = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m1, p + r * ldw + 64), flip);
                P2M_LD8(0) P2M_LD8(1) P2M_LD8(2) P2M_LD8(3)
#undef P2M_LD8
            }
            if (pf) {
                for (int r = 0; r < 4; r++) {
                    _mm_prefetch((const char *)pf + r * ldw + b * QB, _MM_HINT_T0);
                    _mm_prefetch((const char *)pf + r * ldw + b * QB + 64, _MM_HINT_T0);
                }
            }
        }
#define P2M_QC(C) q##C + (int64_t)b * QB
        /* each activation row's offset correction, -8 * its values summed per lane (spb > 1), else the block's
         * own (a[C].c[b], in lane 0): once per block, for the 4 weight rows */
        __m512i c0_ = _mm512_setzero_si512(), c1_ = c0_, c2_ = c0_, c3_ = c0_;
#define P2M_CORR(C)                                                                                          \
    if (C < NC) {                                                                                            \
        if (INT4 && spb > 1)                                                                                 \
            c##C##_ = _mm512_sub_epi32(c##C##_, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(                   \
                _mm512_setzero_si512(), eights, _mm512_loadu_si512(P2M_QC(C))), eights,                       \
                _mm512_loadu_si512(P2M_QC(C) + 64)));                                                        \
        else                                                                                                 \
            c##C##_ = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a[C].c[b]));                                  \
    }
        P2M_CORR(0) P2M_CORR(1) P2M_CORR(2) P2M_CORR(3)
#undef P2M_CORR
#define P2M_DOT(R, C)                                                                                        \
    if (C < NC) {                                                                                            \
        __m512i s_ = _mm512_dpbusd_epi32(c##C##_, l##R, _mm512_loadu_si512(P2M_QC(C)));                     \
        s_ = _mm512_dpbusd_epi32(s_, h##R, _mm512_loadu_si512(P2M_QC(C) + 64));                              \
        __m512 f_ = _mm512_mul_ps(_mm512_cvtepi32_ps(s_), _mm512_set1_ps(a[C].s[b]));                        \
        if (INT4 && spb > 1) {                                                                               \
            const int ng_ = ((k - b * QB < QB ? k - b * QB : QB) * spb + QB - 1) / QB;                       \
            __m512 sg_ = _mm512_maskz_loadu_ps((__mmask16)((1u << ng_) - 1u), ws + R * ldws + b * spb);       \
            a##R##C = _mm512_fmadd_ps(f_, _mm512_permutexvar_ps(gidx, sg_), a##R##C);                        \
        } else if (INT4)                                                                                     \
            a##R##C = _mm512_fmadd_ps(f_, _mm512_set1_ps(ws[R * ldws + b / gpb]), a##R##C);                  \
        else                                                                                                 \
            a##R##C = _mm512_add_ps(f_, a##R##C);                                                            \
    }
        P2M_ACC(P2M_DOT)
#undef P2M_DOT
#undef P2M_QC
    }
    _mm512_storeu_ps(acc, reduce16(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33));
}
#endif

static inline void tile(int int4, int nc, const uint8_t *w, int64_t ldw, const float *ws, int64_t ldws, int gpb,
                        int spb, const arow *a, int nb, int k, const uint8_t *pf, float acc[16], int generic) {
#if defined(P2M_VNNI)
    if (generic != 1) {
#define P2M_CASE(N)                                                                                    \
    case N:                                                                                            \
        if (int4) tile_vnni(N, 1, w, ldw, ws, ldws, gpb, spb, a, nb, k, pf, acc);                      \
        else tile_vnni(N, 0, w, ldw, ws, ldws, gpb, spb, a, nb, k, pf, acc);                           \
        return;
        switch (nc) {
            P2M_CASE(1) P2M_CASE(2) P2M_CASE(3) P2M_CASE(4)
        }
#undef P2M_CASE
    }
#endif
    (void)pf;
    (void)generic;
    tile_generic(int4, w, ldw, ws, ldws, gpb, spb, a, nc, nb, k, acc);
}

/* A quantized weight matrix: rows of k columns (int8: k bytes a row, scale [rows]; int4: k / 2 bytes a row,
 * scale [rows, k / group]). */
typedef struct {
    const uint8_t *q;
    const float *s;
    int int4, k, group;
} qmat;

/* out[c * ldo + r] = row r of m . activation row a[c], for rows [r0, r1) and c < n. */
static void rows_times(const qmat *m, int r0, int r1, const arow *a, int n, float *out, int64_t ldo, int generic) {
    /* int4 scales: gpb blocks a group, or (groups under a block) spb groups a block */
    const int nb = (m->k + QB - 1) / QB, gpb = m->int4 && m->group >= QB ? m->group / QB : 1;
    const int spb = m->int4 && m->group < QB ? QB / m->group : 1;
    const int64_t ldw = m->int4 ? m->k / 2 : m->k, ldws = m->int4 ? m->k / m->group : 1;
    float acc[16];
    for (int r = r0; r < r1; r += 4) {
        int nr = r1 - r < 4 ? r1 - r : 4;
        const uint8_t *wr = m->q + (int64_t)r * ldw;
        const float *sr = m->s + (int64_t)r * ldws;
        const uint8_t *pf = r + 12 <= r1 ? wr + 8 * ldw : NULL; /* two tiles on */
        for (int c = 0; c < n; c += 4) {
            int nc = n - c < 4 ? n - c : 4;
            for (int q = 0; q < nr; q++) {
                /* full tiles at once; an edge of fewer than 4 rows row by row (the tile on one row, stride 0) */
                if (nr == 4 && q == 0)
                    tile(m->int4, nc, wr, ldw, sr, ldws, gpb, spb, a + c, nb, m->k, pf, acc, generic);
                else if (nr < 4)
                    tile(m->int4, nc, wr + q * ldw, 0, sr + q * ldws, 0, gpb, spb, a + c, nb, m->k, NULL, acc,
                         generic);
                for (int cc = 0; cc < nc; cc++) {
                    float v = acc[(nr == 4 ? q : 0) * 4 + cc];
                    out[(int64_t)(c + cc) * ldo + r + q] = m->int4 ? v : v * m->s[r + q];
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- AMX (Sapphire Rapids and later): 16 rows at once
 * C[16 weight rows][16 activation rows] += A[16][64] . B[64][16] in one tile instruction (tdpbssd: signed bytes on
 * both sides, so neither offset is needed here: int4 weights are unpacked to signed bytes). A: 16 weight rows
 * straight from memory (int8) or unpacked per tile of rows into a buffer (int4, in the blocks' nibble order);
 * B: the activation rows rearranged once per call into tiles (bt[j][c][i][4t + r] = row 16j + t's byte 64c + 4i
 * + r). Per block of 128 the int32 tile is stored and added, times the block's scales, into 16 float vectors. */
#ifndef P2M_AMX_MIN_ROWS
#define P2M_AMX_MIN_ROWS 8 /* activation rows from which the AMX tiles are used */
#endif
#if defined(P2M_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && !defined(P2M_NO_AMX)
#define P2M_AMX 1
#include <sys/syscall.h>
#include <unistd.h>


typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tilecfg;

static int amx_allowed = -1;

/* Whether the kernel lets this process use the tile data (Linux asks each process to request it once). */
static int amx_ready(void) {
    if (amx_allowed < 0) amx_allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_allowed;
}

/* Tiles 0 and 5 (C), 1-4 (A, B): 16 rows of 64 bytes. Per thread; _tile_release() when done. */
static void amx_config(void) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 6; i++) c.rows[i] = 16, c.colsb[i] = 64;
    _tile_loadconfig(&c);
}
#endif

/* Activation rows as AMX B tiles: bt [ntiles][kp / 64][16][64] bytes, st [ntiles][kp / QB][16] scales. */
typedef struct {
    int8_t *bt;
    float *st;
    int n, kp;
} btiles;

static int btiles_alloc(btiles *b, int n, int k) {
    b->kp = (k + QB - 1) / QB * QB;
    b->n = n;
    size_t nt = (size_t)(n > 0 ? n + 15 : 16) / 16;
    b->bt = aligned_alloc(64, nt * b->kp * 16);
    b->st = malloc(nt * (b->kp / QB) * 16 * sizeof(float));
    return b->bt && b->st;
}

static void btiles_free(btiles *b) {
    free(b->bt);
    free(b->st);
}

/* Tiles [j0, j1) of b from the quantized rows a[0..n) (rows past n: zero). */
static void btiles_fill(btiles *b, const arow *a, int n, int j0, int j1) {
    const int nc = b->kp / 64, nb = b->kp / QB;
    b->n = n;
    for (int j = j0; j < j1; j++) {
        int8_t *bj = b->bt + (size_t)j * nc * 1024;
        float *sj = b->st + (size_t)j * nb * 16;
        for (int t = 0; t < 16; t++) {
            int row = j * 16 + t;
            for (int c = 0; c < nc; c++)
                for (int i = 0; i < 16; i++) {
                    int32_t v = 0;
                    if (row < n) memcpy(&v, a[row].q + c * 64 + i * 4, 4);
                    memcpy(bj + (size_t)c * 1024 + i * 64 + t * 4, &v, 4);
                }
            for (int q = 0; q < nb; q++) sj[q * 16 + t] = row < n ? a[row].s[q] : 0.0f;
        }
    }
}

#if defined(P2M_AMX)
/* out[c * ldo + r] = row r of m . activation row c, for rows [r0, r1) (whole tiles of 16) and the b->n rows of b.
 * ubuf: 16 * b->kp bytes (int4's unpacked rows). */
static void rows_times_amx(const qmat *m, int r0, int r1, const btiles *b, int8_t *ubuf, float *out, int64_t ldo) {
    const int nb = b->kp / QB, nc = b->kp / 64, ntt = (b->n + 15) / 16;
    const int gpb = m->int4 ? m->group / QB : 1;
    const int64_t ldws = m->int4 ? m->k / m->group : 1;
    int32_t ct[256] __attribute__((aligned(64)));
    float ot[256] __attribute__((aligned(64)));
    const __m512i lo4 = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    for (int r = r0; r + 16 <= r1; r += 16) {
        const int8_t *A = (const int8_t *)m->q + (int64_t)r * m->k;
        int64_t lda = m->k;
        if (m->int4) {
            for (int q = 0; q < 16; q++) {
                const uint8_t *p = m->q + (int64_t)(r + q) * (m->k / 2);
                for (int c = 0; c < nb; c++) {
                    __m512i v = _mm512_loadu_si512(p + c * 64);
                    __m512i l = _mm512_sub_epi8(_mm512_and_si512(v, lo4), eight);
                    __m512i h = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), lo4), eight);
                    _mm512_storeu_si512(ubuf + (size_t)q * b->kp + c * QB, l);
                    _mm512_storeu_si512(ubuf + (size_t)q * b->kp + c * QB + 64, h);
                }
            }
            A = ubuf;
            lda = b->kp;
        }
        const float *sw = m->s + (int64_t)r * ldws;
        for (int j = 0; j < ntt; j++) {
            const int8_t *bj = b->bt + (size_t)j * nc * 1024;
            const float *sj = b->st + (size_t)j * nb * 16;
            __m512 acc[16];
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();
            /* two blocks at a time, into tiles 0 and 5: the second block's products run while the first's are
             * scaled */
            for (int c = 0; c < nb; c += 2) {
                const int two = c + 1 < nb;
                _tile_zero(0);
                _tile_loadd(1, A + c * QB, lda);
                _tile_loadd(2, bj + (size_t)(2 * c) * 1024, 64);
                _tile_loadd(3, A + c * QB + 64, lda);
                _tile_loadd(4, bj + (size_t)(2 * c + 1) * 1024, 64);
                _tile_dpbssd(0, 1, 2);
                _tile_dpbssd(0, 3, 4);
                _tile_stored(0, ct, 64);
                if (two) {
                    _tile_zero(5);
                    _tile_loadd(1, A + (c + 1) * QB, lda);
                    _tile_loadd(2, bj + (size_t)(2 * c + 2) * 1024, 64);
                    _tile_loadd(3, A + (c + 1) * QB + 64, lda);
                    _tile_loadd(4, bj + (size_t)(2 * c + 3) * 1024, 64);
                    _tile_dpbssd(5, 1, 2);
                    _tile_dpbssd(5, 3, 4);
                }
                for (int h = 0; h <= two; h++) {
                    if (h) _tile_stored(5, ct, 64);
                    __m512 sv = _mm512_loadu_ps(sj + (c + h) * 16);
#pragma GCC unroll 16
                    for (int q = 0; q < 16; q++) {
                        __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(ct + q * 16));
                        __m512 sc = m->int4 ? _mm512_mul_ps(sv, _mm512_set1_ps(sw[q * ldws + (c + h) / gpb])) : sv;
                        acc[q] = _mm512_fmadd_ps(f, sc, acc[q]);
                    }
                }
            }
#pragma GCC unroll 16
            for (int q = 0; q < 16; q++)
                _mm512_store_ps(ot + q * 16, m->int4 ? acc[q] : _mm512_mul_ps(acc[q], _mm512_set1_ps(m->s[r + q])));
            int nt = b->n - 16 * j < 16 ? b->n - 16 * j : 16;
            for (int t = 0; t < nt; t++)
                for (int q = 0; q < 16; q++) out[(int64_t)(16 * j + t) * ldo + r + q] = ot[q * 16 + t];
        }
    }
}
#endif

/* rows_times, through the AMX tiles b for whole tiles of 16 rows where b is given (and AMX is built in). */
static void rows_times_b(const qmat *m, int r0, int r1, const arow *a, int n, const btiles *b, int8_t *ubuf,
                         float *out, int64_t ldo, int generic) {
#if defined(P2M_AMX)
    if (b && !(m->int4 && m->group < QB)) { /* (the tiles' int4 steps take whole blocks of one scale) */
        int r16 = r0 + (r1 - r0) / 16 * 16;
        rows_times_amx(m, r0, r16, b, ubuf, out, ldo);
        r0 = r16;
    }
#else
    (void)b;
    (void)ubuf;
#endif
    rows_times(m, r0, r1, a, n, out, ldo, generic);
}

/* Whether a product with n activation rows goes through the AMX tiles (generic: 1 plain C, 2 no AMX). */
static inline int use_amx(int n, int generic) {
#if defined(P2M_AMX)
    return generic == 0 && n >= P2M_AMX_MIN_ROWS && amx_ready();
#else
    (void)n;
    (void)generic;
    return 0;
#endif
}

/* [lo, hi) of n items for thread `tid` of `nt`, in multiples of `align` (the last thread takes the rest). */
static inline void split(int n, int align, int tid, int nt, int *lo, int *hi) {
    int blocks = (n + align - 1) / align;
    int b0 = (int)((int64_t)blocks * tid / nt), b1 = (int)((int64_t)blocks * (tid + 1) / nt);
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

/* Quantized activations of n rows of k columns (kp = k rounded up to QB). */
typedef struct {
    int8_t *q;
    float *s;
    int32_t *c;
    int kp, nb;
} qbuf;

static int qbuf_alloc(qbuf *b, int n, int k) {
    b->kp = (k + QB - 1) / QB * QB;
    b->nb = b->kp / QB;
    size_t rows = n > 0 ? (size_t)n : 1;
    b->q = calloc(rows * b->kp, 1);
    b->s = malloc(rows * b->nb * sizeof(float));
    b->c = malloc(rows * b->nb * sizeof(int32_t));
    return b->q && b->s && b->c;
}

static void qbuf_free(qbuf *b) {
    free(b->q);
    free(b->s);
    free(b->c);
}

static inline arow qbuf_row(const qbuf *b, int i) {
    arow r = {b->q + (size_t)i * b->kp, b->s + (size_t)i * b->nb, b->c + (size_t)i * b->nb};
    return r;
}

static inline void qbuf_quantize(qbuf *b, int i, const float *x, int k, int int4) {
    quantize_row(x, k, int4, int4 ? 8 : 128, b->q + (size_t)i * b->kp, b->s + (size_t)i * b->nb,
                 b->c + (size_t)i * b->nb);
}

/* out [T, N] (bf16 or fp32) = x [T, K] (fp32 or bf16) times the weight's transpose, plus bias (fp32 [N] or NULL).
 * Returns 0, or 2 for no memory. */
int p2m_quant_linear(const void *x, int xbf16, int obf16, int T, int K, const uint8_t *qw, const float *ws, int int4,
                     int group, int N, const float *bias, void *out, int nthreads, int generic) {
    qbuf xq;
    btiles xb = {0};
    const int amx = use_amx(T, generic) && K % QB == 0, nt = nthreads > 0 ? nthreads : 1;
    float *y = obf16 ? malloc((size_t)(T > 0 ? T : 1) * N * sizeof(float)) : (float *)out;
    float *tmp = xbf16 ? malloc((size_t)nt * K * sizeof(float)) : NULL;
    arow *rows = malloc((size_t)(T > 0 ? T : 1) * sizeof(arow));
    int8_t *ubuf = amx && int4 ? malloc((size_t)nt * 16 * K) : NULL;
    int ok = qbuf_alloc(&xq, T, K) && y && rows && (!xbf16 || tmp) && (!amx || (btiles_alloc(&xb, T, K) &&
                                                                           (!int4 || ubuf)));
    if (ok) {
        qmat m = {qw, ws, int4, K, group};
#pragma omp parallel num_threads(nt) if (nt > 1 && (int64_t)T * N * K > 65536)
        {
            int tid = omp_get_thread_num(), nth = omp_get_num_threads(), lo, hi;
#if defined(P2M_AMX)
            if (amx) amx_config();
#endif
            split(T, 16, tid, nth, &lo, &hi); /* whole tiles of 16 tokens: a thread fills its own B tiles */
            for (int t = lo; t < hi; t++) {
                const float *xr = as_f32((const char *)x + (size_t)t * K * (xbf16 ? 2 : 4), xbf16, K,
                                         tmp ? tmp + (size_t)tid * K : NULL);
                qbuf_quantize(&xq, t, xr, K, int4);
                rows[t] = qbuf_row(&xq, t);
            }
            if (amx && lo < hi) btiles_fill(&xb, rows, T, lo / 16, (hi + 15) / 16);
#pragma omp barrier
            split(N, 16, tid, nth, &lo, &hi);
            rows_times_b(&m, lo, hi, rows, T, amx ? &xb : NULL, ubuf ? ubuf + (size_t)tid * 16 * K : NULL, y, N,
                         generic);
            for (int t = 0; t < T; t++) {
                float *yr = y + (size_t)t * N;
                if (bias)
                    for (int n = lo; n < hi; n++) yr[n] += bias[n];
                if (obf16) {
                    uint16_t *o = (uint16_t *)out + (size_t)t * N;
                    for (int n = lo; n < hi; n++) o[n] = f32_to_bf16(yr[n]);
                }
            }
#if defined(P2M_AMX)
            if (amx) _tile_release();
#endif
        }
    }
    qbuf_free(&xq);
    if (amx) btiles_free(&xb);
    if (obf16) free(y);
    free(tmp);
    free(rows);
    free(ubuf);
    return ok ? 0 : 2;
}

/* Pairs (token, expert) grouped by expert: counts[e]..counts[e + 1] index pair_tok / pair_w. Returns 0, 1 for an
 * expert id >= E. */
static int group_pairs(const int64_t *ids, const float *weights, int P, int K, int E, int *counts, int *pos,
                       int *pair_tok, float *pair_w, int *maxn) {
    for (int p = 0; p < P; p++) {
        if (ids[p] >= E) return 1;
        if (ids[p] >= 0) counts[ids[p] + 1]++;
    }
    *maxn = 0;
    for (int e = 0; e < E; e++) {
        *maxn = counts[e + 1] > *maxn ? counts[e + 1] : *maxn;
        counts[e + 1] += counts[e];
    }
    memcpy(pos, counts, (size_t)E * sizeof(int));
    for (int p = 0; p < P; p++) {
        if (ids[p] < 0) continue;
        int s = pos[ids[p]]++;
        pair_tok[s] = p / K;
        pair_w[s] = weights[p];
    }
    return 0;
}

/* silu(gate) * up for columns [j0, j1) of n rows (gate rows g, up rows u, both of I), with moe_experts' bf16
 * roundings when bf16. */
static void swiglu(const float *g, const float *u, float *act, int n, int I, int j0, int j1, int bf16) {
    for (int r = 0; r < n; r++) {
        const float *gr = g + (size_t)r * I, *ur = u + (size_t)r * I;
        float *ar = act + (size_t)r * I;
        if (bf16) {
#pragma omp simd
            for (int j = j0; j < j1; j++) {
                float gv = round_bf16(gr[j]), uv = round_bf16(ur[j]);
                float sv = round_bf16(gv / (1.0f + exp_approx(-gv)));
                ar[j] = round_bf16(sv * uv);
            }
        } else {
#pragma omp simd
            for (int j = j0; j < j1; j++) ar[j] = gr[j] / (1.0f + exp_approx(-gr[j])) * ur[j];
        }
    }
}

/* Quantize blocks [b0, b1) of row r of act (I columns) into a. */
static inline void quantize_act_blocks(const float *act, int r, int I, int b0, int b1, int int4, qbuf *a) {
    for (int b = b0; b < b1; b++) {
        int k0 = b * QB, kn = I - k0 < QB ? I - k0 : QB;
        quantize_row(act + (size_t)r * I + k0, kn, int4, int4 ? 8 : 128, a->q + (size_t)r * a->kp + k0,
                     a->s + (size_t)r * a->nb + b, a->c + (size_t)r * a->nb + b);
    }
}

/* The routed experts (see the top of the file): x [T, H] (fp32 or bf16), w13 [E, 2I, H] and w2 [E, H, I] in one
 * method, weights [T, K] fp32, ids [T, K] int64 (-1: none); out [T, H] in x's dtype. Returns 0, 1 for an expert
 * id >= E, 2 for no memory. */
int p2m_quant_moe(const void *x, int xbf16, const uint8_t *w13, const float *s13, const uint8_t *w2,
                  const float *s2, int int4, int group, const float *weights, const int64_t *ids, void *out, int T,
                  int K, int H, int I, int E, int nthreads, int generic) {
    const int P = T * K, nt = nthreads > 0 ? nthreads : 1;
    int *counts = calloc((size_t)E + 1, sizeof(int)), *pos = malloc(((size_t)E + 1) * sizeof(int));
    int *pair_tok = malloc((size_t)(P > 0 ? P : 1) * sizeof(int));
    float *pair_w = malloc((size_t)(P > 0 ? P : 1) * sizeof(float));
    int maxn = 0, err = !counts || !pos || !pair_tok || !pair_w ? 2 : 0;
    if (!err) err = group_pairs(ids, weights, P, K, E, counts, pos, pair_tok, pair_w, &maxn);
    const int mn = maxn > 0 ? maxn : 1;
    /* AMX for the experts with enough rows (int8: H and I whole blocks, as its A tiles read 128 bytes a block) */
    const int amx = use_amx(maxn, generic) && H % QB == 0 && I % QB == 0;
    const size_t th = (size_t)T * H, mi = (size_t)mn * I, kmax = (size_t)(H > I ? H : I) + QB;
    qbuf xq = {0}, aq[2] = {{0}, {0}};
    btiles xb = {0}, ab = {0};
    float *y = NULL, *gu = NULL, *act = NULL, *dn = NULL, *tmp = NULL;
    arow *xr = NULL;
    int8_t *ubuf = NULL;
    if (!err) {
        int ok = qbuf_alloc(&xq, T, H) && qbuf_alloc(&aq[0], mn, I) && qbuf_alloc(&aq[1], mn, I);
        ok = ok && (!amx || (btiles_alloc(&xb, mn, H) && btiles_alloc(&ab, mn, I)));
        y = xbf16 ? malloc((th > 0 ? th : 1) * sizeof(float)) : (float *)out;
        gu = malloc(2 * mi * sizeof(float));  /* gate [n, I], up [n, I] of the current expert */
        act = malloc(mi * sizeof(float));     /* silu(gate) * up, before quantization */
        dn = malloc((size_t)mn * H * sizeof(float));
        tmp = malloc((size_t)nt * H * sizeof(float));
        xr = malloc((size_t)mn * 2 * nt * sizeof(arow)); /* per thread: the expert's x rows, its act rows */
        ubuf = amx && int4 ? malloc((size_t)nt * 16 * kmax) : NULL;
        if (!ok || !y || !gu || !act || !dn || !tmp || !xr || (amx && int4 && !ubuf)) err = 2;
    }
    if (!err) {
        const qmat gate0 = {w13, s13, int4, H, group}, down0 = {w2, s2, int4, I, group};
        const int64_t w13b = int4 ? (int64_t)I * H : (int64_t)2 * I * H; /* bytes of an expert's gate and up */
        const int64_t w13sz = int4 ? (int64_t)2 * I * (H / group) : (int64_t)2 * I;
        const int64_t w2b = int4 ? (int64_t)H * I / 2 : (int64_t)H * I, w2sz = int4 ? (int64_t)H * (I / group) : H;
        const int nbi = (I + QB - 1) / QB;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int tid = omp_get_thread_num(), nth = omp_get_num_threads(), lo, hi;
#if defined(P2M_AMX)
            if (amx) amx_config();
#endif
            split(T, 1, tid, nth, &lo, &hi);
            for (int t = lo; t < hi; t++) {
                const float *xf = as_f32((const char *)x + (size_t)t * H * (xbf16 ? 2 : 4), xbf16, H,
                                         tmp + (size_t)tid * H);
                qbuf_quantize(&xq, t, xf, H, int4);
                memset(y + (size_t)t * H, 0, (size_t)H * sizeof(float));
            }
            /* own: each thread's gate/up columns are whole blocks of 128, which it quantizes itself */
            const int own = nbi >= nth;
            int jlo, jhi, hlo, hhi;
            split(I, own ? QB : 16, tid, nth, &jlo, &jhi);
            split(H, 16, tid, nth, &hlo, &hhi);
            arow *xp = xr + (size_t)tid * 2 * mn, *ap = xp + mn;
            int8_t *ub = ubuf ? ubuf + (size_t)tid * 16 * kmax : NULL;
#pragma omp barrier
            int parity = 0;
            for (int e = 0; e < E; e++) {
                int s0 = counts[e], n = counts[e + 1] - s0, tiles = (n + 15) / 16;
                if (n == 0) continue;
                const int ea = amx && n >= P2M_AMX_MIN_ROWS;
                qbuf *a = &aq[parity];
                parity ^= 1;
                for (int r = 0; r < n; r++) xp[r] = qbuf_row(&xq, pair_tok[s0 + r]);
                if (ea) {
                    split(tiles, 1, tid, nth, &lo, &hi);
                    btiles_fill(&xb, xp, n, lo, hi);
#pragma omp barrier
                }
                qmat g = gate0, u = gate0, d = down0;
                g.q = w13 + e * w13b;
                g.s = s13 + e * w13sz;
                u.q = g.q + (int4 ? (int64_t)I * H / 2 : (int64_t)I * H);
                u.s = g.s + (int4 ? (int64_t)I * (H / group) : I);
                d.q = w2 + e * w2b;
                d.s = s2 + e * w2sz;
                rows_times_b(&g, jlo, jhi, xp, n, ea ? &xb : NULL, ub, gu, I, generic);
                rows_times_b(&u, jlo, jhi, xp, n, ea ? &xb : NULL, ub, gu + mi, I, generic);
                swiglu(gu, gu + mi, act, n, I, jlo, jhi, xbf16);
                if (own) {
                    for (int r = 0; r < n; r++) quantize_act_blocks(act, r, I, jlo / QB, (jhi + QB - 1) / QB, int4, a);
                } else {
#pragma omp barrier
                    split(n * nbi, 1, tid, nth, &lo, &hi);
                    for (int p = lo; p < hi; p++) quantize_act_blocks(act, p / nbi, I, p % nbi, p % nbi + 1, int4, a);
                }
#pragma omp barrier
                for (int r = 0; r < n; r++) ap[r] = qbuf_row(a, r);
                if (ea) {
                    split(tiles, 1, tid, nth, &lo, &hi);
                    btiles_fill(&ab, ap, n, lo, hi);
#pragma omp barrier
                }
                rows_times_b(&d, hlo, hhi, ap, n, ea ? &ab : NULL, ub, dn, H, generic);
                for (int r = 0; r < n; r++) {
                    float wt = pair_w[s0 + r];
                    float *yr = y + (size_t)pair_tok[s0 + r] * H;
                    const float *dr = dn + (size_t)r * H;
                    if (xbf16) {
#pragma omp simd
                        for (int h = hlo; h < hhi; h++) yr[h] += round_bf16(dr[h]) * wt;
                    } else {
#pragma omp simd
                        for (int h = hlo; h < hhi; h++) yr[h] += dr[h] * wt;
                    }
                }
                /* No barrier: the next expert writes only this thread's gate/up columns, the act buffer only in
                 * this thread's columns (own) or after a barrier, the other quantized buffer, and the B tiles
                 * after the barrier that follows its gate/up. */
            }
#pragma omp barrier
            if (xbf16) {
                split((int)th, 64, tid, nth, &lo, &hi);
                uint16_t *ob = (uint16_t *)out;
                for (int i = lo; i < hi; i++) ob[i] = f32_to_bf16(y[i]);
            }
#if defined(P2M_AMX)
            if (amx) _tile_release();
#endif
        }
    }
    free(counts); free(pos); free(pair_tok); free(pair_w);
    qbuf_free(&xq); qbuf_free(&aq[0]); qbuf_free(&aq[1]);
    if (amx) btiles_free(&xb), btiles_free(&ab);
    if (xbf16) free(y);
    free(gu); free(act); free(dn); free(tmp); free(xr); free(ubuf);
    return err;
}
