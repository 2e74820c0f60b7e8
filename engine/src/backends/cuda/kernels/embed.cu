// Embedding lookup: out[i*K + k] = W[ids[i], k] * scale (scale: Gemma's sqrt(d_model),
// 1 elsewhere). One block per id; a block's threads stride over the row in 8-element
// slices, so consecutive threads read consecutive parts of the row's blocks.
#include "quant.cuh"

namespace sluice {

template <class T>
__device__ __forceinline__ void get_rows(const uint8_t* __restrict__ w, const int* __restrict__ ids,
                                         float* __restrict__ out, int K, float scale) {
    const int i = blockIdx.x;
    const uint8_t* wr = w + (size_t)ids[i] * row_bytes<T>(K);
    float* o = out + (size_t)i * K;
    if (vec8_ok<T>(K)) {
        for (int c = threadIdx.x; c < (K >> 3); c += blockDim.x) {
            float v[8];
            T::load8(wr, c << 3, v);
            float4* op = reinterpret_cast<float4*>(o + (c << 3));
            op[0] = make_float4(v[0] * scale, v[1] * scale, v[2] * scale, v[3] * scale);
            op[1] = make_float4(v[4] * scale, v[5] * scale, v[6] * scale, v[7] * scale);
        }
    } else if constexpr (T::QK == 1) {
        for (int k = threadIdx.x; k < K; k += blockDim.x) o[k] = T::load1(wr, k) * scale;
    }
}

}  // namespace sluice

using namespace sluice;

#define SLUICE_GET_ROWS(suffix, Block)                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                       \
        get_rows_##suffix(const unsigned char* w, const int* ids, float* out, int K,        \
                          int n_ids, float scale) {                                         \
        if ((int)blockIdx.x < n_ids) get_rows<Block>(w, ids, out, K, scale);               \
    }

SLUICE_FOR_EACH_TYPE(SLUICE_GET_ROWS)
