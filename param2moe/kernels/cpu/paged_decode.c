/* Paged decode attention on the CPU: one query token per sequence, read straight from the paged KV cache.
 *
 * Layout (as param2moe/kernels/attention.py): k_cache, v_cache [num_blocks, block_size, nkv, D], contiguous;
 * sequence b's token j lives in block block_tables[b, j / block_size] at offset j % block_size. Query head
 * j uses KV head j / G (G = nh / nkv). q [B, nh, D] fp32 or bf16 (any token / head strides, D contiguous);
 * the caches fp32 or bf16; math in fp32; out [B, nh, D] contiguous, in q's dtype.
 *
 * Work: one task per (sequence, KV head), spread over OpenMP threads. A task walks the sequence's blocks once,
 * scoring the block's keys against its G query heads, then folding the block's values in with an online
 * softmax (running max and sum per head, rescaled as the max grows), so K and V are each read once.
 * Optionally the step's new k, v [B, nkv, D] are first stored at their slots (all of them before any read).
 *
 * Plain C with OpenMP; built with -O3 -march=native -fopenmp by param2moe/kernels/cpu/__init__.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet (as torch) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * p(r), r = x - n ln2, |r| <= ln2/2,
 * Cephes' degree-6 polynomial (about 1 ulp). Below -87 it returns ~2^-125 instead of underflowing. */
#pragma omp declare simd notinbranch
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

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
                float c = m[g] == -INFINITY ? 0.0f : exp_neg(m[g] - mx);
                l[g] *= c;
                float *ag = acc + g * D;
#pragma omp simd
                for (int i = 0; i < D; i++) ag[i] *= c;
                m[g] = mx;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                float p = exp_neg(sg[t] - mx);
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

/* Returns 0; 1 if a block id was out of range (those outputs are zeros); 2 if scratch memory ran out. */
int p2m_paged_decode(const void *q, int64_t q_stok, int64_t q_shead, int q_bf16,
                     const void *k_cache, const void *v_cache, int kv_bf16, int64_t num_blocks,
                     const int32_t *block_tables, int64_t bt_stride, const int32_t *context_lens,
                     void *out, int B, int nh, int nkv, int D, int bs, float scale,
                     const void *k_new, int64_t kn_stok, int64_t kn_shead,
                     const void *v_new, int64_t vn_stok, int64_t vn_shead, const int64_t *slots,
                     int nthreads) {
    const int G = nh / nkv;
    const int64_t row_stride = (int64_t)nkv * D;  /* elements from one token's row to the next */
    const size_t esz = kv_bf16 ? 2 : 4;
    int err = 0;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && B * nkv > 1)
    {
        if (slots) {  /* the new tokens' k and v to the cache, all before any read */
#pragma omp for schedule(static)
            for (int i = 0; i < B * nkv; i++) {
                int b = i / nkv, h = i % nkv;
                int64_t dst = slots[b] * row_stride + (int64_t)h * D;
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
        for (int task = 0; task < B * nkv; task++) {
            if (!scratch) continue;
            int b = task / nkv, h = task % nkv;
            for (int g = 0; g < G; g++) {  /* the G query rows, scaled, in fp32 */
                int64_t off = b * q_stok + (int64_t)(h * G + g) * q_shead;
                float *qg = qf + g * D;
                load_row(qg, q, off, D, q_bf16);
#pragma omp simd
                for (int i = 0; i < D; i++) qg[i] *= scale;
            }
            int ctx = context_lens[b];
            int bad = attend_one(G, D, bs, ctx, block_tables + b * bt_stride, num_blocks, k_cache, v_cache, kv_bf16,
                                 (int64_t)h * D, row_stride, qf, acc, row, s, m, l);
            if (bad) {
#pragma omp atomic write
                err = 1;
            }
            for (int g = 0; g < G; g++) {
                float inv = (!bad && l[g] > 0.0f) ? 1.0f / l[g] : 0.0f;
                const float *ag = acc + g * D;
                int64_t off = ((int64_t)b * nh + h * G + g) * D;
                if (q_bf16) {
                    uint16_t *od = (uint16_t *)out + off;
                    for (int i = 0; i < D; i++) od[i] = f32_to_bf16(ag[i] * inv);
                } else {
                    float *od = (float *)out + off;
#pragma omp simd
                    for (int i = 0; i < D; i++) od[i] = ag[i] * inv;
                }
            }
        }
        free(scratch);
    }
    return err;
}
