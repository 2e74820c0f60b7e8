// Attention over the paged f16 KV cache (ABI.md): decode (one query per sequence) and
// prefill (a chunk of one sequence's queries, causal). f32 scores and accumulation,
// online softmax (running max and sum, rescaled as larger scores appear), so every key
// is read once and no score matrix is materialized.
//
// Cache rows: position p of a sequence lives in row block_table[p / 16] * 16 + p % 16
// of the layer's K (V) cache, a row being n_kv_heads * head_dim halves; head h reads
// KV head h / (n_heads / n_kv_heads).
//
// Head layout within a warp: lane owns the half2 pairs w = lane + 32 * j (j < 4) of a
// head, i.e. elements 2w and 2w + 1, so a warp reads a 256-element head as four
// coalesced 128-byte rows. head_dim must be even and at most 256.
#include "common.cuh"

namespace sluice {

constexpr int ATT_THREADS = 128;
constexpr int ATT_WARPS = ATT_THREADS / 32;
constexpr int HD_MAX = 256;
constexpr int HD2_MAX = HD_MAX / 2;
constexpr int J = HD2_MAX / 32;  // half2 pairs per lane at most
constexpr int BLOCK = 16;        // cache positions per page

__device__ __forceinline__ int cache_row(const int* table, int p) {
    return table[p / BLOCK] * BLOCK + p % BLOCK;
}

__device__ __forceinline__ float2 h2f(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

__device__ __forceinline__ float apply_softcap(float s, float cap) {
    return cap != 0.0f ? cap * tanhf(s / cap) : s;
}

// Decode: block (head h, sequence s), 4 warps splitting the context's positions in
// runs of DEC_KEYS, each warp with its own online softmax; the four partial results
// are merged through shared memory at the end. A key's score is a warp-wide dot
// product (each lane its pairs, then a butterfly sum); DEC_KEYS keys are scored
// together so that their loads and shuffles overlap.
constexpr int DEC_KEYS = 4;

__device__ __forceinline__ void attention_decode(
    const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
    float* __restrict__ out, const int* __restrict__ block_tables, const int* __restrict__ ctx_lens,
    int max_blocks, int n_heads, int n_kv_heads, int head_dim, float scale, int window, float cap) {
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][HD_MAX];

    const int h = blockIdx.x, s = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (n_heads / n_kv_heads);
    const int kv_dim = n_kv_heads * head_dim, hd2 = head_dim >> 1;
    const int ctx = ctx_lens[s];
    const int lo = window > 0 ? max(0, ctx - window) : 0;
    const int* table = block_tables + (size_t)s * max_blocks;
    const uint32_t* kbase = reinterpret_cast<const uint32_t*>(kc + kvh * head_dim);
    const uint32_t* vbase = reinterpret_cast<const uint32_t*>(vc + kvh * head_dim);
    const int row_words = kv_dim >> 1;

    // The query, pre-scaled, in registers.
    const float2* q2 = reinterpret_cast<const float2*>(q + ((size_t)s * n_heads + h) * head_dim);
    float2 qv[J], acc[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int w = lane + 32 * j;
        const float2 t = w < hd2 ? q2[w] : make_float2(0.0f, 0.0f);
        qv[j] = make_float2(t.x * scale, t.y * scale);
        acc[j] = make_float2(0.0f, 0.0f);
    }
    float m = -SLUICE_INF, l = 0.0f;  // uniform across the warp

    for (int base = lo + warp * DEC_KEYS; base < ctx; base += ATT_WARPS * DEC_KEYS) {
        int row[DEC_KEYS];
        float sc[DEC_KEYS];
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            const int p = base + u;
            row[u] = p < ctx ? cache_row(table, p) : -1;
            float d = 0.0f;
            if (row[u] >= 0) {
                const uint32_t* kr = kbase + (size_t)row[u] * row_words;
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    const int w = lane + 32 * j;
                    if (w < hd2) {
                        const float2 k = h2f(kr[w]);
                        d = fmaf(qv[j].x, k.x, fmaf(qv[j].y, k.y, d));
                    }
                }
            }
            sc[u] = d;
        }
        // Interleaved butterflies: the DEC_KEYS reductions are independent.
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < DEC_KEYS; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);

        float mx = -SLUICE_INF;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            sc[u] = row[u] >= 0 ? apply_softcap(sc[u], cap) : -SLUICE_INF;
            mx = fmaxf(mx, sc[u]);
        }
        // base < ctx, so at least one key is real and m_new is finite.
        const float m_new = fmaxf(m, mx);
        const float corr = expf(m - m_new);  // 0 on the first run (m = -inf)
        l *= corr;
#pragma unroll
        for (int j = 0; j < J; ++j) acc[j] = make_float2(acc[j].x * corr, acc[j].y * corr);
#pragma unroll
        for (int u = 0; u < DEC_KEYS; ++u) {
            if (row[u] < 0) continue;
            const float pw = expf(sc[u] - m_new);
            l += pw;
            const uint32_t* vr = vbase + (size_t)row[u] * row_words;
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const int w = lane + 32 * j;
                if (w < hd2) {
                    const float2 v = h2f(vr[w]);
                    acc[j].x = fmaf(pw, v.x, acc[j].x);
                    acc[j].y = fmaf(pw, v.y, acc[j].y);
                }
            }
        }
        m = m_new;
    }

    // Merge the warps: out = sum_w acc_w * e^(m_w - M) / sum_w l_w * e^(m_w - M).
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int w = lane + 32 * j;
        if (w < hd2) {
            s_acc[warp][2 * w] = acc[j].x;
            s_acc[warp][2 * w + 1] = acc[j].y;
        }
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
    __syncthreads();
    float M = -SLUICE_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, s_m[w]);
    float f[ATT_WARPS], L = 0.0f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) {
        f[w] = s_m[w] == -SLUICE_INF ? 0.0f : expf(s_m[w] - M);  // idle warps weigh 0
        L = fmaf(s_l[w], f[w], L);
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // empty context: zeros
    float* o = out + ((size_t)s * n_heads + h) * head_dim;
    for (int e = threadIdx.x; e < head_dim; e += ATT_THREADS) {
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) a = fmaf(s_acc[w][e], f[w], a);
        o[e] = a * inv;
    }
}

// Prefill: block (16 queries, head h). Warp w owns queries 4w .. 4w+3 of the block.
// Keys go through shared memory in tiles of 32 positions, K then V in the same buffer:
//   scores: lane i computes the full dot products of key i of the tile with the warp's
//           4 queries (queries broadcast from shared memory), so no shuffles are
//           needed per score; a row stride of head_dim/2 + 1 words makes the 32 lanes'
//           reads of 32 different rows hit 32 different banks;
//   softmax: one warp max per query and tile; probabilities go to shared memory;
//   values: lane owns its half2 pairs of the output, as in decode.
constexpr int PF_Q = 16;                  // queries per block
constexpr int PF_QW = PF_Q / ATT_WARPS;   // queries per warp
constexpr int PF_T = 32;                  // keys per tile (one per lane)
constexpr int PF_ROW = HD2_MAX + 1;       // padded tile row, in half2 words

__device__ __forceinline__ void load_tile(uint32_t (*tile)[PF_ROW], const __half* cache,
                                          const int* table, int t0, int hi, int kvh,
                                          int head_dim, int kv_dim) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, hd2 = head_dim >> 1;
    for (int r = warp; r < PF_T; r += ATT_WARPS) {
        const int p = t0 + r;
        if (p <= hi) {
            const uint32_t* src = reinterpret_cast<const uint32_t*>(
                cache + (size_t)cache_row(table, p) * kv_dim + kvh * head_dim);
            for (int c = lane; c < hd2; c += 32) tile[r][c] = src[c];
        } else {
            // Zeros, not stale data: a masked key's probability is 0, and 0 * NaN
            // would still poison the sum.
            for (int c = lane; c < hd2; c += 32) tile[r][c] = 0u;
        }
    }
}

__device__ __forceinline__ void attention_prefill(
    const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
    float* __restrict__ out, const int* __restrict__ table, int start_pos, int n_q, int n_heads,
    int n_kv_heads, int head_dim, float scale, int window, float cap) {
    __shared__ __align__(16) float s_q[PF_Q][HD_MAX];
    __shared__ uint32_t s_kv[PF_T][PF_ROW];
    __shared__ __align__(16) float s_p[ATT_WARPS][PF_T][PF_QW];

    const int qb = blockIdx.x * PF_Q, h = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (n_heads / n_kv_heads);
    const int kv_dim = n_kv_heads * head_dim, hd2 = head_dim >> 1;

    // The block's queries, pre-scaled; rows past n_q are zeros (and never written).
    for (int i = threadIdx.x; i < PF_Q * head_dim; i += ATT_THREADS) {
        const int qi = i / head_dim, e = i - qi * head_dim;
        s_q[qi][e] = qb + qi < n_q ? q[((size_t)(qb + qi) * n_heads + h) * head_dim + e] * scale : 0.0f;
    }

    const int n_here = min(PF_Q, n_q - qb);
    const int p_first = start_pos + qb, hi = p_first + n_here - 1;
    const int lo = window > 0 ? max(0, p_first - window + 1) : 0;

    // This warp's queries: positions, validity, softmax state (l is per lane: the sum
    // of this lane's keys' weights, rescaled with the warp-uniform max; summed at the
    // end), and output pairs.
    const int q0 = warp * PF_QW;
    int qpos[PF_QW];
    bool qok[PF_QW];
    float m[PF_QW], l[PF_QW];
    float2 acc[PF_QW][J];
#pragma unroll
    for (int u = 0; u < PF_QW; ++u) {
        qpos[u] = p_first + q0 + u;
        qok[u] = qb + q0 + u < n_q;
        m[u] = -SLUICE_INF;
        l[u] = 0.0f;
#pragma unroll
        for (int j = 0; j < J; ++j) acc[u][j] = make_float2(0.0f, 0.0f);
    }

    for (int t0 = lo; t0 <= hi; t0 += PF_T) {
        __syncthreads();  // the previous tile's values (and, first time, s_q) are done
        load_tile(s_kv, kc, table, t0, hi, kvh, head_dim, kv_dim);
        __syncthreads();

        // Scores of key t0 + lane against the warp's queries.
        float sc[PF_QW];
#pragma unroll
        for (int u = 0; u < PF_QW; ++u) sc[u] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < hd2; ++c) {
            const float2 k = h2f(s_kv[lane][c]);
#pragma unroll
            for (int u = 0; u < PF_QW; ++u) {
                const float2 qq = *reinterpret_cast<const float2*>(&s_q[q0 + u][2 * c]);
                sc[u] = fmaf(qq.x, k.x, fmaf(qq.y, k.y, sc[u]));
            }
        }

        const int p = t0 + lane;
        float pw[PF_QW];
#pragma unroll
        for (int u = 0; u < PF_QW; ++u) {
            const bool ok = qok[u] && p <= qpos[u] && (window <= 0 || p > qpos[u] - window);
            const float s = ok ? apply_softcap(sc[u], cap) : -SLUICE_INF;
            const float mx = warp_max(s);
            if (mx == -SLUICE_INF) {
                pw[u] = 0.0f;  // nothing visible to this query in the tile: no update
                continue;
            }
            const float m_new = fmaxf(m[u], mx);
            const float corr = expf(m[u] - m_new);
            pw[u] = expf(s - m_new);
            l[u] = fmaf(l[u], corr, pw[u]);
#pragma unroll
            for (int j = 0; j < J; ++j) acc[u][j] = make_float2(acc[u][j].x * corr, acc[u][j].y * corr);
            m[u] = m_new;
        }
        *reinterpret_cast<float4*>(&s_p[warp][lane][0]) = make_float4(pw[0], pw[1], pw[2], pw[3]);

        __syncthreads();  // all warps are done with the keys
        load_tile(s_kv, vc, table, t0, hi, kvh, head_dim, kv_dim);
        __syncthreads();

        const int rows = min(PF_T, hi - t0 + 1);
        for (int r = 0; r < rows; ++r) {
            const float4 pr = *reinterpret_cast<const float4*>(&s_p[warp][r][0]);
            const float pv[PF_QW] = {pr.x, pr.y, pr.z, pr.w};
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const int w = lane + 32 * j;
                if (w < hd2) {
                    const float2 v = h2f(s_kv[r][w]);
#pragma unroll
                    for (int u = 0; u < PF_QW; ++u) {
                        acc[u][j].x = fmaf(pv[u], v.x, acc[u][j].x);
                        acc[u][j].y = fmaf(pv[u], v.y, acc[u][j].y);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int u = 0; u < PF_QW; ++u) {
        const float L = warp_sum(l[u]);
        if (!qok[u]) continue;
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        float2* o = reinterpret_cast<float2*>(out + ((size_t)(qb + q0 + u) * n_heads + h) * head_dim);
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int w = lane + 32 * j;
            if (w < hd2) o[w] = make_float2(acc[u][j].x * inv, acc[u][j].y * inv);
        }
    }
}

}  // namespace sluice

using namespace sluice;

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    paged_attention_decode(const float* q, const __half* kc, const __half* vc, float* out,
                           const int* block_tables, const int* ctx_lens, int max_blocks, int n_heads,
                           int n_kv_heads, int head_dim, float scale, int window, float softcap) {
    attention_decode(q, kc, vc, out, block_tables, ctx_lens, max_blocks, n_heads, n_kv_heads,
                     head_dim, scale, window, softcap);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    paged_attention_prefill(const float* q, const __half* kc, const __half* vc, float* out,
                            const int* block_table, int start_pos, int n_q, int n_heads,
                            int n_kv_heads, int head_dim, float scale, int window, float softcap) {
    attention_prefill(q, kc, vc, out, block_table, start_pos, n_q, n_heads, n_kv_heads, head_dim,
                      scale, window, softcap);
}
