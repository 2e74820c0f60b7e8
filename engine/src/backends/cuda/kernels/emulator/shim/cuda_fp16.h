// Host emulation of the CUDA features the kernels use: one std::thread per CUDA
// thread, std::barrier for __syncthreads and warp shuffles.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <thread>
#include <vector>
#include <functional>
#include <algorithm>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };
inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; __half r; memcpy(&r.bits, &h, 2); return r; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
using std::min; using std::max;
#include <math.h>

namespace emu {
inline thread_local std::barrier<>* block_bar;
inline thread_local std::barrier<>* warp_bar;
inline thread_local uint32_t* warp_slots;
}
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_bar->arrive_and_wait(); }
template <class V>
inline V __shfl_xor_sync(unsigned, V v, int o) {
    static_assert(sizeof(V) == 4);
    const int lane = threadIdx.x & 31;
    uint32_t u; memcpy(&u, &v, 4);
    emu::warp_slots[lane] = u;
    emu::warp_bar->arrive_and_wait();
    u = emu::warp_slots[lane ^ o];
    emu::warp_bar->arrive_and_wait();
    memcpy(&v, &u, 4);
    return v;
}

namespace emu {
// Runs kernel(args...) over the grid, one block at a time.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    const unsigned nt = block.x * block.y * block.z;
    const unsigned nw = (nt + 31) / 32;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bb(nt);
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        std::vector<std::vector<uint32_t>> slots(nw, std::vector<uint32_t>(32));
        for (unsigned w = 0; w < nw; ++w) wb.emplace_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < nt; ++t) {
            ts.emplace_back([&, t] {
                threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                blockIdx = {bx, by, bz};
                blockDim = block; gridDim = grid;
                block_bar = &bb; warp_bar = wb[t / 32].get(); warp_slots = slots[t / 32].data();
                kernel();
                // An exited thread no longer takes part in barriers.
                warp_bar->arrive_and_drop();
                block_bar->arrive_and_drop();
            });
        }
        for (auto& t : ts) t.join();
    }
}
}
