// Shared definitions for Sluice's CUDA kernels (see ABI.md beside this file).
//
// The sources are compiled by NVRTC (scripts/build_ptx.py), which offers no system
// headers: the fixed-width integer types are declared here, in our own namespace so
// that they cannot clash with anything cuda_fp16.h declares.
#pragma once

#include <cuda_fp16.h>

namespace sluice {

typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;

#define SLUICE_INF __int_as_float(0x7f800000)

// Butterfly reductions: every lane ends with the result, so no broadcast is needed.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds
// 32 floats; the result is returned to every thread. Ends with a barrier, so `scratch`
// may be reused right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

}  // namespace sluice
