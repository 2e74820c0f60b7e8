// Matrix products with GGML-format weights: y[b*N + n] = sum_k W[n, k] * x[b*K + k].
// See ABI.md for the launch geometry, quant.cuh for the weight formats.
//
// Weights are dequantized to f32 in registers and multiplied with the f32 activations
// (no quantization of x, so results track the f32 reference closely), accumulating in
// f32.
//   mmv_<t>: decode and small batches (B <= 8). Memory bound: the whole weight matrix
//            is streamed once per call, one warp per output row, every lane reading a
//            different 8-element slice of the row so that a warp's loads cover whole
//            blocks. The B activation rows are re-read per weight slice from L1/L2.
//   mm_<t>:  any B. A 64 x 64 output tile per block of 256 threads (4 x 4 outputs per
//            thread), over k-steps of 32: each step dequantizes a 64 x 32 weight tile
//            and loads a 64 x 32 activation tile into shared memory, while the next
//            step's global loads are already in flight in registers.
//   mm_tc_<t>: mm_<t> on the tensor cores, in TF32 (see below).
#include <mma.h>

#include "quant.cuh"

namespace sluice {

constexpr int MMV_WARPS = 4;   // rows per block: one per warp
constexpr int MMV_MAX_B = 8;   // batch rows handled by mmv (larger B: mm)

// acc[b] += dot(v, x[b*K + 0..8]) for the B batch rows; unrolled to MMV_MAX_B with a
// uniform guard so that acc stays in registers.
__device__ __forceinline__ void mmv_accumulate(float (&acc)[MMV_MAX_B], const float (&v)[8],
                                               const float* __restrict__ xp, int K, int B) {
#pragma unroll
    for (int b = 0; b < MMV_MAX_B; ++b) {
        if (b < B) {
            const float4 a0 = *reinterpret_cast<const float4*>(xp + (size_t)b * K);
            const float4 a1 = *reinterpret_cast<const float4*>(xp + (size_t)b * K + 4);
            float s = acc[b];
            s = fmaf(v[0], a0.x, s); s = fmaf(v[1], a0.y, s);
            s = fmaf(v[2], a0.z, s); s = fmaf(v[3], a0.w, s);
            s = fmaf(v[4], a1.x, s); s = fmaf(v[5], a1.y, s);
            s = fmaf(v[6], a1.z, s); s = fmaf(v[7], a1.w, s);
            acc[b] = s;
        }
    }
}

template <class T>
__device__ __forceinline__ void mmv(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                    float* __restrict__ y, int K, int N, int B) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * MMV_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;  // whole warps leave: no barrier or shuffle below spans warps
    const uint8_t* wr = w + row * row_bytes<T>(K);

    float acc[MMV_MAX_B];
#pragma unroll
    for (int b = 0; b < MMV_MAX_B; ++b) acc[b] = 0.0f;

    if (vec8_ok<T>(K)) {
        const int n8 = K >> 3;
        int c = lane;
        // Two slices per iteration, both loaded before any arithmetic: twice the bytes
        // in flight per lane, which a bandwidth-bound kernel needs to approach peak.
        for (; c + 32 < n8; c += 64) {
            float v0[8], v1[8];
            T::load8(wr, c << 3, v0);
            T::load8(wr, (c + 32) << 3, v1);
            mmv_accumulate(acc, v0, x + (c << 3), K, B);
            mmv_accumulate(acc, v1, x + ((c + 32) << 3), K, B);
        }
        if (c < n8) {
            float v[8];
            T::load8(wr, c << 3, v);
            mmv_accumulate(acc, v, x + (c << 3), K, B);
        }
    } else if constexpr (T::QK == 1) {
        // f16/f32 rows whose length is not a multiple of 8: element by element.
        for (int k = lane; k < K; k += 32) {
            const float v = T::load1(wr, k);
#pragma unroll
            for (int b = 0; b < MMV_MAX_B; ++b)
                if (b < B) acc[b] = fmaf(v, x[(size_t)b * K + k], acc[b]);
        }
    }

#pragma unroll
    for (int b = 0; b < MMV_MAX_B; ++b) {
        if (b < B) {
            const float s = warp_sum(acc[b]);
            if (lane == 0) y[(size_t)b * N + row] = s;
        }
    }
}

constexpr int MM_BN = 64;   // weight rows (outputs n) per tile
constexpr int MM_BB = 64;   // batch rows per tile
constexpr int MM_BK = 32;   // k per step
constexpr int MM_THREADS = 256;

// Global -> register stage of one k-step. Thread t loads weight row (t % 64) and batch
// row (t % 64), 8 values of each at k0 + 8 * (t / 64): four threads cover a row's 32
// values of the step. Out-of-range rows and (for f16/f32 rows not a multiple of 32
// long) columns read as zero, so the compute loop needs no guards.
template <class T>
__device__ __forceinline__ void mm_fetch(const uint8_t* wr, bool w_ok, const float* xr, bool x_ok,
                                         int k, int K, bool vec, float (&wv)[8], float (&xv)[8]) {
    if (vec && k + 8 <= K) {
        if (w_ok) {
            T::load8(wr, k, wv);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) wv[e] = 0.0f;
        }
        if (x_ok) {
            const float4 a0 = *reinterpret_cast<const float4*>(xr + k);
            const float4 a1 = *reinterpret_cast<const float4*>(xr + k + 4);
            xv[0] = a0.x; xv[1] = a0.y; xv[2] = a0.z; xv[3] = a0.w;
            xv[4] = a1.x; xv[5] = a1.y; xv[6] = a1.z; xv[7] = a1.w;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) xv[e] = 0.0f;
        }
        return;
    }
    // Only f16/f32 get here (block formats have K a multiple of 32): the ragged tail
    // of a row, or rows too short for 16-byte alignment.
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const bool in = k + e < K;
        if constexpr (T::QK == 1) {
            wv[e] = w_ok && in ? T::load1(wr, k + e) : 0.0f;
        } else {
            wv[e] = 0.0f;
        }
        xv[e] = x_ok && in ? xr[k + e] : 0.0f;
    }
}

template <class T>
__device__ __forceinline__ void mm(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                   float* __restrict__ y, int K, int N, int B) {
    // k-major tiles: the compute loop reads 4 consecutive n (or b) as one float4.
    // The register -> shared stores write 32 consecutive rows per warp: no conflicts.
    __shared__ __align__(16) float ws[MM_BK][MM_BN];
    __shared__ __align__(16) float xs[MM_BK][MM_BB];

    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * MM_BN, b0 = blockIdx.y * MM_BB;

    // Loading role (see mm_fetch).
    const int lr = tid & 63, lq = tid >> 6;
    const bool w_ok = n0 + lr < N, x_ok = b0 + lr < B;
    const uint8_t* wr = w + (w_ok ? (size_t)(n0 + lr) : 0) * row_bytes<T>(K);
    const float* xr = x + (x_ok ? (size_t)(b0 + lr) : 0) * K;
    const bool vec = vec8_ok<T>(K);

    // Compute role: outputs n0 + 4*tx .. +3 (so a warp's stores of one batch row are
    // 16 x float4 contiguous) times batch rows b0 + 4*ty .. +3.
    const int tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    float wv[8], xv[8];
    mm_fetch<T>(wr, w_ok, xr, x_ok, 8 * lq, K, vec, wv, xv);
    for (int k0 = 0; k0 < K; k0 += MM_BK) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            ws[8 * lq + e][lr] = wv[e];
            xs[8 * lq + e][lr] = xv[e];
        }
        __syncthreads();
        // Next step's loads overlap this step's arithmetic.
        if (k0 + MM_BK < K) mm_fetch<T>(wr, w_ok, xr, x_ok, k0 + MM_BK + 8 * lq, K, vec, wv, xv);
#pragma unroll
        for (int kk = 0; kk < MM_BK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&ws[kk][4 * tx]);
            const float4 c = *reinterpret_cast<const float4*>(&xs[kk][4 * ty]);
            const float av[4] = {a.x, a.y, a.z, a.w}, cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], cv[j], acc[i][j]);
        }
        __syncthreads();
    }

    const int n = n0 + 4 * tx;
    const bool n_vec = (N & 3) == 0 && n + 3 < N;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int b = b0 + 4 * ty + j;
        if (b >= B) break;
        float* yr = y + (size_t)b * N;
        if (n_vec) {
            *reinterpret_cast<float4*>(yr + n) = make_float4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (n + i < N) yr[n + i] = acc[i][j];
        }
    }
}

// mm_tc_<t>: as mm_<t> (same tile, block and grid), with the product on the tensor cores
// in TF32 (sm_80+): weights and activations are rounded to TF32 (10-bit mantissa, f32
// range) when staged into shared memory, and products accumulate in f32. The dense
// TF32 tensor rate is several times the f32 FMA rate (H100: ~7x; this kernel is not
// yet measured on a GPU), at a relative error of ~1e-3 per product, well below what
// the weight quantization already costs. f16/bf16 inputs would be faster still, but
// activations can overflow f16 and bf16 keeps only 8 mantissa bits.
//
// The block's 64 (batch) x 64 (outputs) tile is C = X * W^T, 4 x 4 fragments of
// 16 x 16; warp w computes fragments (w / 2, 2 * (w % 2) .. +1), loading one X fragment
// and two W fragments per k-step of 8. Staging: the same register-prefetched loads as
// mm_<t>, stored row-major ([row][k], rows padded to 36 floats: the 16-byte stores of
// 8 consecutive rows hit distinct banks, and fragment pointers stay 32-byte aligned).
// After the k loop the same shared memory stages C so that the global stores are
// coalesced rows of y.
constexpr int TC_LD = MM_BK + 4;
constexpr int TC_CLD = MM_BN + 4;

template <class T>
__device__ __forceinline__ void mm_tc(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                      float* __restrict__ y, int K, int N, int B) {
    using namespace nvcuda;
    // Operand tiles during the loop, the output tile after it.
    __shared__ __align__(32) float smem[2 * MM_BN * TC_LD];
    static_assert(MM_BB * TC_CLD <= 2 * MM_BN * TC_LD, "C staging must fit the operand tiles");
    float(*ws)[TC_LD] = reinterpret_cast<float(*)[TC_LD]>(smem);
    float(*xs)[TC_LD] = reinterpret_cast<float(*)[TC_LD]>(smem + MM_BN * TC_LD);
    float(*cs)[TC_CLD] = reinterpret_cast<float(*)[TC_CLD]>(smem);

    const int tid = threadIdx.x, warp = tid >> 5;
    const int n0 = blockIdx.x * MM_BN, b0 = blockIdx.y * MM_BB;
    const int lr = tid & 63, lq = tid >> 6;
    const bool w_ok = n0 + lr < N, x_ok = b0 + lr < B;
    const uint8_t* wr = w + (w_ok ? (size_t)(n0 + lr) : 0) * row_bytes<T>(K);
    const float* xr = x + (x_ok ? (size_t)(b0 + lr) : 0) * K;
    const bool vec = vec8_ok<T>(K);

    const int fb = warp >> 1, fn = 2 * (warp & 1);
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);

    float wv[8], xv[8];
    mm_fetch<T>(wr, w_ok, xr, x_ok, 8 * lq, K, vec, wv, xv);
    for (int k0 = 0; k0 < K; k0 += MM_BK) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            wv[e] = wmma::__float_to_tf32(wv[e]);
            xv[e] = wmma::__float_to_tf32(xv[e]);
        }
        *reinterpret_cast<float4*>(&ws[lr][8 * lq]) = make_float4(wv[0], wv[1], wv[2], wv[3]);
        *reinterpret_cast<float4*>(&ws[lr][8 * lq + 4]) = make_float4(wv[4], wv[5], wv[6], wv[7]);
        *reinterpret_cast<float4*>(&xs[lr][8 * lq]) = make_float4(xv[0], xv[1], xv[2], xv[3]);
        *reinterpret_cast<float4*>(&xs[lr][8 * lq + 4]) = make_float4(xv[4], xv[5], xv[6], xv[7]);
        __syncthreads();
        if (k0 + MM_BK < K) mm_fetch<T>(wr, w_ok, xr, x_ok, k0 + MM_BK + 8 * lq, K, vec, wv, xv);
#pragma unroll
        for (int kk = 0; kk < MM_BK; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
            wmma::load_matrix_sync(a, &xs[16 * fb][kk], TC_LD);
#pragma unroll
            for (int f = 0; f < 2; ++f) {
                // W^T as a column-major K x N operand is W's rows as stored.
                wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> bw;
                wmma::load_matrix_sync(bw, &ws[16 * (fn + f)][kk], TC_LD);
                wmma::mma_sync(acc[f], a, bw, acc[f]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int f = 0; f < 2; ++f)
        wmma::store_matrix_sync(&cs[16 * fb][16 * (fn + f)], acc[f], TC_CLD, wmma::mem_row_major);
    __syncthreads();
    // 64 rows of 16 float4: a warp stores two whole 256-byte rows of y per instruction.
    for (int i = tid; i < MM_BB * (MM_BN / 4); i += MM_THREADS) {
        const int bl = i >> 4, nl = 4 * (i & 15);
        const int b = b0 + bl, n = n0 + nl;
        if (b >= B || n >= N) continue;
        const float4 c = *reinterpret_cast<const float4*>(&cs[bl][nl]);
        float* yr = y + (size_t)b * N;
        if ((N & 3) == 0 && n + 3 < N) {
            *reinterpret_cast<float4*>(yr + n) = c;
        } else {
            const float cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (n + e < N) yr[n + e] = cv[e];
        }
    }
}

}  // namespace sluice

using namespace sluice;

#define SLUICE_MATMUL(suffix, Block)                                                          \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32)                              \
        mmv_##suffix(const unsigned char* w, const float* x, float* y, int K, int N, int B) { \
        mmv<Block>(w, x, y, K, N, B);                                                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(MM_THREADS)                                  \
        mm_##suffix(const unsigned char* w, const float* x, float* y, int K, int N, int B) {  \
        mm<Block>(w, x, y, K, N, B);                                                          \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(MM_THREADS)                                  \
        mm_tc_##suffix(const unsigned char* w, const float* x, float* y, int K, int N, int B) { \
        mm_tc<Block>(w, x, y, K, N, B);                                                       \
    }

SLUICE_FOR_EACH_TYPE(SLUICE_MATMUL)
