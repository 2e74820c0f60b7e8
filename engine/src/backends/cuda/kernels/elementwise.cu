// Norms, element-wise activations, RoPE, the KV-cache store and argmax (ABI.md).
// All are memory bound: one pass over their data, coalesced, with f32 arithmetic.
// Transcendentals use the accurate library functions (no --use_fast_math): they cost
// nothing measurable here and keep results close to the CPU engine's.
#include "common.cuh"

using namespace sluice;

// y = x / sqrt(mean(x^2) + eps) * w, one block per row. Each thread reads its elements
// once for the sum of squares and again (from L1/L2) for the output; in place is safe
// because every element is read and written by the same thread, after the reduction.
extern "C" __global__ void __launch_bounds__(256)
    rms_norm(const float* x, const float* __restrict__ w, float* y, int n, int rows, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float* yr = y + (size_t)r * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / float(n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

extern "C" __global__ void __launch_bounds__(256) add(float* x, const float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[r*n + i] += bias[i]; grid (ceil(n/256), rows).
extern "C" __global__ void __launch_bounds__(256)
    add_bias(float* x, const float* __restrict__ bias, int rows, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y;
    if (i < n && r < rows) x[(size_t)r * n + i] += bias[i];
}

// silu(gate) * up. expf of a large positive -gate gives inf and gate / inf = -0: the
// limit, without a NaN.
extern "C" __global__ void __launch_bounds__(256)
    swiglu(const float* __restrict__ gate, const float* __restrict__ up, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// gelu_tanh(gate) * up with ggml's constants (the CPU engine's geglu.rs).
extern "C" __global__ void __launch_bounds__(256)
    geglu(const float* __restrict__ gate, const float* __restrict__ up, float* out, int n) {
    const float SQRT_2_OVER_PI = 0.79788456080286535587989211986876f;
    const float GELU_COEF_A = 0.044715f;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        const float t = tanhf(SQRT_2_OVER_PI * g * (1.0f + GELU_COEF_A * g * g));
        out[i] = 0.5f * g * (1.0f + t) * up[i];
    }
}

// x = cap * tanh(x / cap) (Gemma's final logit soft-capping).
extern "C" __global__ void __launch_bounds__(256) softcap(float* x, int n, float cap) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

// Rotary embedding in place on x[n_tokens][n_heads][head_dim]; block (t, h), thread i
// rotates pair i (strided by blockDim.x if rot_dim / 2 exceeds it). The angle is
// computed directly per pair (powf), not by repeated multiplication, and sincosf is the
// accurate, full-range one: positions reach 1e5 radians.
extern "C" __global__ void __launch_bounds__(256)
    rope(float* x, const int* __restrict__ pos, int n_tokens, int n_heads, int head_dim, int rot_dim,
         float theta_base, float freq_scale, const float* __restrict__ freq_factors, int neox) {
    const int t = blockIdx.x, h = blockIdx.y;
    if (t >= n_tokens || h >= n_heads) return;
    float* xh = x + ((size_t)t * n_heads + h) * head_dim;
    const float p = float(pos[t]);
    const int half = rot_dim >> 1;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float theta = p * powf(theta_base, -2.0f * float(i) / float(rot_dim));
        if (freq_factors) theta /= freq_factors[i];
        theta *= freq_scale;
        float s, c;
        sincosf(theta, &s, &c);
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = xh[a], x1 = xh[b];
        xh[a] = x0 * c - x1 * s;
        xh[b] = x0 * s + x1 * c;
    }
}

// Stores K and V rows of n_tokens tokens into the paged f16 caches at their slots
// (round to nearest even). A negative slot (a padding token) stores nothing.
extern "C" __global__ void __launch_bounds__(256)
    kv_store(const float* __restrict__ k, const float* __restrict__ v, __half* kc, __half* vc,
             const int* __restrict__ slots, int n_tokens, int kv_dim) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const int slot = slots[t];
    if (slot < 0) return;
    const float* kr = k + (size_t)t * kv_dim;
    const float* vr = v + (size_t)t * kv_dim;
    __half* kd = kc + (size_t)slot * kv_dim;
    __half* vd = vc + (size_t)slot * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kd[i] = __float2half_rn(kr[i]);
        vd[i] = __float2half_rn(vr[i]);
    }
}

// Whether candidate (v, i) beats (bv, bi) for argmax: larger value, or equal value at
// a smaller index (the first maximum wins). Index -1 marks "no candidate yet"; NaNs
// never win.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
    if (i < 0) return false;
    if (bi < 0) return true;
    return v > bv || (v == bv && i < bi);
}

// First index of the maximum of each row; block (1024), one block per row.
extern "C" __global__ void __launch_bounds__(1024)
    argmax(const float* __restrict__ logits, int* out, int vocab, int rows) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* lr = logits + (size_t)r * vocab;
    float bv = -SLUICE_INF;
    int bi = -1;
    // Each thread scans its indices in increasing order, so ">" keeps its first max.
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = lr[i];
        if (bi < 0 ? !(v != v) : v > bv) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_val[warp] = bv;
        s_idx[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x >> 5;
        bv = lane < n_warps ? s_val[lane] : -SLUICE_INF;
        bi = lane < n_warps ? s_idx[lane] : -1;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (argmax_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        // A row of NaNs (or an empty one) has no maximum: answer 0, a valid token.
        if (lane == 0) out[r] = bi < 0 ? 0 : bi;
    }
}
