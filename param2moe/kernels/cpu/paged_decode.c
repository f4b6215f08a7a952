/* Paged decode attention on the CPU: one query token per sequence, read straight from the paged KV cache.
 *
 * Layout (as param2moe/kernels/attention.py): k_cache, v_cache [num_blocks, block_size, nkv, D], contiguous;
 * sequence b's token j lives in block block_tables[b, j / block_size] at offset j % block_size. Query head
 * j uses KV head j / G (G = nh / nkv). q [B, nh, D] fp32 or bf16 (any token / head strides, D contiguous);
 * the caches fp32 or bf16; math in fp32; out [B, nh, D] contiguous, in q's dtype.
 *
 * Work: tasks of one sequence (its KV heads in turn) or, with few sequences, of one (sequence, KV head), spread
 * over OpenMP threads. A KV head's walk goes over the sequence's blocks once, scoring each block's keys against
 * its G query heads, then folding the block's values in with an online softmax (running max and sum per head,
 * rescaled as the max grows), so K and V are each read once; the next block's rows are prefetched. Optionally the
 * step's new k, v [B, nkv, D] are first stored at their slots (all of them before any read), and before that q and
 * k go through the per-head RMSNorm and the RoPE of kernels/rope.py qk_norm_rope, with its roundings (norm in fp32,
 * rounded to the activation dtype; rotation in fp32, rounded again): the attention step is then one call.
 *
 * Plain C with OpenMP; built with -O3 -march=native -fopenmp -DP2M_G=<G> -DP2M_D=<D> by
 * param2moe/kernels/cpu/__init__.py. With AVX-512 and D a multiple of 16, the walk for that G and D runs in
 * intrinsics (attend_avx512); otherwise in plain C the compiler vectorises (attend_one).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

static inline void load_row(float *restrict dst, const void *src, int64_t off, int d, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + off;
#pragma omp simd
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + off, (size_t)d * sizeof(float));
    }
}

static inline float dot(const float *restrict a, const float *restrict b, int d) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int d) {
#pragma omp simd
    for (int i = 0; i < d; i++) y[i] += a * x[i];
}

/* One (sequence, KV head). Scratch: qf [G*D], acc [G*D], row [D], s [G*bs], m [G], l [G]. Returns 0, or 1 for a
 * block id outside [0, num_blocks) (the output is then zeros). */
static inline int attend_one(int G, int D, int bs, int ctx, const int32_t *table, int64_t num_blocks,
                             const void *kc, const void *vc, int kv_bf16, int64_t head_off, int64_t row_stride,
                             float *restrict qf, float *restrict acc, float *restrict row, float *restrict s,
                             float *restrict m, float *restrict l) {
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    memset(acc, 0, (size_t)G * D * sizeof(float));
    int nblk = (ctx + bs - 1) / bs;
    for (int bi = 0; bi < nblk; bi++) {
        int64_t blk = table[bi];
        if (blk < 0 || blk >= num_blocks) return 1;
        int n = ctx - bi * bs < bs ? ctx - bi * bs : bs;
        int64_t base = blk * bs * row_stride + head_off;
        for (int t = 0; t < n; t++) {  /* scores of this block's keys */
            const float *kr;
            if (kv_bf16) {
                load_row(row, kc, base + t * row_stride, D, 1);
                kr = row;
            } else {
                kr = (const float *)kc + base + t * row_stride;
            }
            for (int g = 0; g < G; g++) s[g * bs + t] = dot(qf + g * D, kr, D);
        }
        for (int g = 0; g < G; g++) {  /* online softmax: new max, rescale what was summed */
            float *sg = s + g * bs;
            float mx = m[g];
            for (int t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
            if (mx > m[g]) {
                float c = m[g] == -INFINITY ? 0.0f : exp_approx(m[g] - mx);
                l[g] *= c;
                float *ag = acc + g * D;
#pragma omp simd
                for (int i = 0; i < D; i++) ag[i] *= c;
                m[g] = mx;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                float p = exp_approx(sg[t] - mx);
                sg[t] = p;
                sum += p;
            }
            l[g] += sum;
        }
        for (int t = 0; t < n; t++) {  /* values, weighted */
            const float *vr;
            if (kv_bf16) {
                load_row(row, vc, base + t * row_stride, D, 1);
                vr = row;
            } else {
                vr = (const float *)vc + base + t * row_stride;
            }
            for (int g = 0; g < G; g++) axpy(acc + g * D, s[g * bs + t], vr, D);
        }
    }
    return 0;
}

#if defined(__AVX512F__)
/* The same walk with AVX-512 for head sizes that are a multiple of 16 (ND = D / 16 vectors a row): keys and values
 * in 16-token chunks (a block's tokens, at most 16 at a time); a chunk's G x 16 scores sit in one vector per query
 * head for the softmax; the G x D accumulators stay in registers where G * ND allows (G and ND are constants in
 * the instance built: P2M_G and P2M_D, the model's, are defined on the compiler's command line). */
#include <immintrin.h>

static inline __attribute__((always_inline)) __m512 ld16(const void *base, int64_t off, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off))), 16));
    return _mm512_loadu_ps((const float *)base + off);
}

static inline __attribute__((always_inline)) __m512 exp16(__m512 x) { /* exp_approx, 16 lanes */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Lane t of the result: the sum of v[t]'s 16 lanes (a 16 x 16 transpose folded into the adds). */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++) { /* 128-bit lanes: v[2i] (two partial quads), v[2i+1] (two) */
        __m512 a = v[2 * i], b = v[2 * i + 1];
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    }
    for (int i = 0; i < 4; i++) { /* 128-bit lane k: a quad of partial sums of v[4i + k] */
        __m512 a = w[2 * i], b = w[2 * i + 1];
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
    }
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    /* 128-bit lane k of z: the sums of v[k], v[8 + k], v[4 + k], v[12 + k] */
    __m512 z = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15), z);
}

static inline __attribute__((always_inline)) int attend_avx512(
    const int G, const int ND, int bs, int ctx, const int32_t *table, int64_t num_blocks, const void *kc,
    const void *vc, int kv_bf16, int64_t head_off, int64_t row_stride, int64_t pf_off, int64_t pf_span,
    const float *qf, float *restrict out_acc, float *restrict l_out) {
    __m512 acc[G * ND], q[G * ND];
    float m[G], l[G];
    for (int i = 0; i < G * ND; i++) {
        acc[i] = _mm512_setzero_ps();
        q[i] = _mm512_loadu_ps(qf + 16 * i);
    }
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    int nblk = (ctx + bs - 1) / bs;
    for (int bi = 0; bi < nblk; bi++) {
        int64_t blk = table[bi];
        if (blk < 0 || blk >= num_blocks) return 1;
        int nb = ctx - bi * bs < bs ? ctx - bi * bs : bs;
        int64_t base = blk * bs * row_stride + head_off;
        if (bi + 1 < nblk) { /* the next block's rows: blocks lie anywhere, the hardware sees no stride */
            int64_t nxt = table[bi + 1];
            if (nxt >= 0 && nxt < num_blocks) {
                int nn = ctx - (bi + 1) * bs < bs ? ctx - (bi + 1) * bs : bs;
                int esz = kv_bf16 ? 2 : 4;
                for (int t = 0; t < nn; t++) {
                    const char *kr = (const char *)kc + (nxt * bs * row_stride + pf_off + t * row_stride) * esz;
                    const char *vr = (const char *)vc + (nxt * bs * row_stride + pf_off + t * row_stride) * esz;
                    for (int64_t c = 0; c < pf_span; c += 64) {
                        _mm_prefetch(kr + c, _MM_HINT_T0);
                        _mm_prefetch(vr + c, _MM_HINT_T0);
                    }
                }
            }
        }
        for (int t0 = 0; t0 < nb; t0 += 16) {
            int n = nb - t0 < 16 ? nb - t0 : 16;
            __mmask16 live = (__mmask16)((1u << n) - 1u);
            __m512 part[G][16];
            for (int t = 0; t < 16; t++) {
                if (t < n) {
                    int64_t off = base + (t0 + t) * row_stride;
                    __m512 a[G];
                    for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();
                    for (int c = 0; c < ND; c++) {
                        __m512 k = ld16(kc, off + 16 * c, kv_bf16);
                        for (int g = 0; g < G; g++) a[g] = _mm512_fmadd_ps(q[g * ND + c], k, a[g]);
                    }
                    for (int g = 0; g < G; g++) part[g][t] = a[g];
                } else {
                    for (int g = 0; g < G; g++) part[g][t] = _mm512_setzero_ps();
                }
            }
            float p[G][16];
            for (int g = 0; g < G; g++) {
                __m512 sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), hsum16(part[g]));
                float mx = _mm512_reduce_max_ps(sc);
                if (mx > m[g]) {
                    float c = m[g] == -INFINITY ? 0.0f : exp_approx(m[g] - mx);
                    __m512 cv = _mm512_set1_ps(c);
                    l[g] *= c;
                    for (int i = 0; i < ND; i++) acc[g * ND + i] = _mm512_mul_ps(acc[g * ND + i], cv);
                    m[g] = mx;
                }
                __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m[g]))));
                l[g] += _mm512_reduce_add_ps(e);
                _mm512_storeu_ps(p[g], e);
            }
            for (int t = 0; t < n; t++) {
                int64_t off = base + (t0 + t) * row_stride;
                for (int c = 0; c < ND; c++) {
                    __m512 v = ld16(vc, off + 16 * c, kv_bf16);
                    for (int g = 0; g < G; g++)
                        acc[g * ND + c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g][t]), v, acc[g * ND + c]);
                }
            }
        }
    }
    for (int i = 0; i < G * ND; i++) _mm512_storeu_ps(out_acc + 16 * i, acc[i]);
    for (int g = 0; g < G; g++) l_out[g] = l[g];
    return 0;
}
#endif

#define P2M_L2_BYTES (512 << 10)

/* qk_norm_rope for one head's row: x (D elements, fp32 or bf16) -> dst (fp32, rounded to bf16 when bf16).
 * w: the norm's weight (fp32 or bf16, D) or NULL; cos, sin: the token's [half] or NULL. */
__attribute__((optimize("fp-contract=off"))) /* separate products and sums, as the torch oracle */
static void norm_rope_row(const void *x, int64_t off, int bf16, const void *w, int w_bf16, float eps,
                          const float *cos, const float *sin, int half, int D, float *restrict dst) {
    load_row(dst, x, off, D, bf16);
    if (w) {
        float ss = 0.0f;
        for (int i = 0; i < D; i++) ss += dst[i] * dst[i];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++) {
            float wi = w_bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
            float y = dst[i] * r * wi;
            dst[i] = bf16 ? round_bf16(y) : y;
        }
    }
    if (cos) {
        for (int i = 0; i < half; i++) {
            float x1 = dst[i], x2 = dst[half + i];
            float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
            dst[i] = bf16 ? round_bf16(a - b) : a - b;
            dst[half + i] = bf16 ? round_bf16(c + d) : c + d;
        }
    }
}

static inline void store_row(void *dst, int64_t off, const float *src, int D, int bf16) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int i = 0; i < D; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + off, src, (size_t)D * sizeof(float));
    }
}

/* Returns 0; 1 if a block id or a slot was out of range (those outputs are zeros; such a slot is not written); 2
 * if scratch memory ran out.
 * q_w, k_w (the QK-norm weights, fp32 or bf16 by w_bf16, or NULL), cos, sin ([B, half] fp32, or NULL), eps:
 * QK-norm and RoPE of q and of the new k first (needs k_new). */
int p2m_paged_decode(const void *q, int64_t q_stok, int64_t q_shead, int q_bf16,
                     const void *k_cache, const void *v_cache, int kv_bf16, int64_t num_blocks,
                     const int32_t *block_tables, int64_t bt_stride, const int32_t *context_lens,
                     void *out, int B, int nh, int nkv, int D, int bs, float scale,
                     const void *k_new, int64_t kn_stok, int64_t kn_shead,
                     const void *v_new, int64_t vn_stok, int64_t vn_shead, const int64_t *slots,
                     const void *q_w, const void *k_w, int w_bf16, const float *cos, const float *sin, int half,
                     float eps, int nthreads, int generic) {
    const int G = nh / nkv;
    const int64_t row_stride = (int64_t)nkv * D;  /* elements from one token's row to the next */
    const size_t esz = kv_bf16 ? 2 : 4;
    const int out_bf16 = q_bf16, prologue = slots && (q_w || cos);
    float *qn = NULL; /* q after QK-norm / RoPE, [B, nh, D] fp32 (the values of q's dtype) */
    int err = 0;
    (void)generic;
    if (nthreads < 1) nthreads = 1;
    if (prologue) {
        qn = malloc((size_t)B * nh * D * sizeof(float) + 64 * sizeof(float));
        if (!qn) return 2;
    }
    /* A task: a sequence's KV heads one after the other when there are sequences enough to go round the threads,
     * else one KV head of one sequence. */
    const int per_seq = B >= 4 * nthreads && nkv > 1, tasks = per_seq ? B : B * nkv;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tasks > 1)
    {
        if (prologue) {  /* q's heads, then k's: norm and rotation; k straight to the cache */
            float *kt = (float *)malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
            for (int i = 0; i < B * (nh + nkv); i++) {
                int b = i / (nh + nkv), h = i % (nh + nkv);
                const float *cb = cos ? cos + (int64_t)b * half : NULL, *sb = sin ? sin + (int64_t)b * half : NULL;
                if (h < nh) {
                    norm_rope_row(q, b * q_stok + h * q_shead, q_bf16, q_w, w_bf16, eps, cb, sb, half, D,
                                  qn + ((int64_t)b * nh + h) * D);
                } else if (slots[b] < 0 || slots[b] >= num_blocks * bs) {
#pragma omp atomic write
                    err = 1;
                } else if (kt) {
                    h -= nh;
                    norm_rope_row(k_new, b * kn_stok + h * kn_shead, kv_bf16, k_w, w_bf16, eps, cb, sb, half, D, kt);
                    store_row((void *)k_cache, slots[b] * row_stride + (int64_t)h * D, kt, D, kv_bf16);
                } else {
#pragma omp atomic write
                    err = 2;
                }
            }
            free(kt);
        }
        if (slots) {  /* the new tokens' k (unless stored above) and v to the cache, all before any read */
#pragma omp for schedule(static)
            for (int i = 0; i < B * nkv; i++) {
                int b = i / nkv, h = i % nkv;
                if (slots[b] < 0 || slots[b] >= num_blocks * bs) { /* a slot outside the cache: nothing written */
#pragma omp atomic write
                    err = 1;
                    continue;
                }
                int64_t dst = slots[b] * row_stride + (int64_t)h * D;
                if (!prologue)
                    memcpy((char *)k_cache + dst * esz, (const char *)k_new + (b * kn_stok + h * kn_shead) * esz,
                           D * esz);
                memcpy((char *)v_cache + dst * esz, (const char *)v_new + (b * vn_stok + h * vn_shead) * esz,
                       D * esz);
            }
        }
        float *scratch = (float *)malloc(sizeof(float) * ((size_t)3 * G * D + D + (size_t)G * bs + 64));
        float *qf = scratch, *acc = qf + G * D, *row = acc + G * D, *s = row + D, *m = s + G * bs, *l = m + G;
        if (!scratch) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
          const int b = per_seq ? task : task / nkv, h0 = per_seq ? 0 : task % nkv, h1 = per_seq ? nkv : h0 + 1;
          for (int h = h0; h < h1; h++) {
            if (!scratch) continue;
            for (int g = 0; g < G; g++) {  /* the G query rows, scaled, in fp32 */
                float *qg = qf + g * D;
                if (qn)
                    memcpy(qg, qn + ((int64_t)b * nh + h * G + g) * D, (size_t)D * sizeof(float));
                else
                    load_row(qg, q, b * q_stok + (int64_t)(h * G + g) * q_shead, D, q_bf16);
#pragma omp simd
                for (int i = 0; i < D; i++) qg[i] *= scale;
            }
            int ctx = context_lens[b];
            const int32_t *table = block_tables + b * bt_stride;
            int bad = -1;
#if defined(__AVX512F__) && defined(P2M_G) && defined(P2M_D) && P2M_D % 16 == 0
            if (!generic && G == P2M_G && D == P2M_D) {
                /* The first head's walk prefetches the whole rows (the task's heads are contiguous in them) if
                 * the sequence's keys and values fit in L2 (P2M_L2_BYTES): the later heads' walks find them there. */
                int wide = per_seq && h == 0 && (int64_t)ctx * row_stride * esz * 2 <= P2M_L2_BYTES;
                bad = attend_avx512(P2M_G, P2M_D / 16, bs, ctx, table, num_blocks, k_cache, v_cache, kv_bf16,
                                    (int64_t)h * D, row_stride, wide ? 0 : (int64_t)h * D,
                                    (int64_t)(wide ? row_stride : D) * esz, qf, acc, l);
            }
#endif
            if (bad < 0)
                bad = attend_one(G, D, bs, ctx, table, num_blocks, k_cache, v_cache, kv_bf16, (int64_t)h * D,
                                 row_stride, qf, acc, row, s, m, l);
            if (bad) {
#pragma omp atomic write
                err = 1;
            }
            for (int g = 0; g < G; g++) {
                float inv = (!bad && l[g] > 0.0f) ? 1.0f / l[g] : 0.0f;
                const float *ag = acc + g * D;
                int64_t off = ((int64_t)b * nh + h * G + g) * D;
                if (out_bf16) {
                    uint16_t *od = (uint16_t *)out + off;
                    for (int i = 0; i < D; i++) od[i] = f32_to_bf16(ag[i] * inv);
                } else {
                    float *od = (float *)out + off;
#pragma omp simd
                    for (int i = 0; i < D; i++) od[i] = ag[i] * inv;
                }
            }
          }
        }
        free(scratch);
    }
    free(qn);
    return err;
}
