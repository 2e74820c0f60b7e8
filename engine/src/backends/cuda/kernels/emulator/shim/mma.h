// Host emulation of the WMMA subset used: every lane holds the whole fragment matrix.
#pragma once
#include "cuda_fp16.h"
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32
    uint32_t u; memcpy(&u, &f, 4); u = (u + 0x1000u) & 0xffffe000u; memcpy(&f, &u, 4); return f;
}
template <class Use, int M, int N, int K, class T, class L = void> struct fragment;
template <class L> struct fragment<matrix_a, 16, 16, 8, precision::tf32, L> { float x[16 * 8]; static constexpr int num_elements = 128; };
template <class L> struct fragment<matrix_b, 16, 16, 8, precision::tf32, L> { float x[8 * 16]; static constexpr int num_elements = 128; };
template <> struct fragment<accumulator, 16, 16, 8, float, void> { float x[256]; static constexpr int num_elements = 256; };
inline void fill_fragment(fragment<accumulator, 16, 16, 8, float>& f, float v) { for (auto& e : f.x) e = v; }
// a: element (m, k) at x[m*8 + k]
template <class L> void load_matrix_sync(fragment<matrix_a, 16, 16, 8, precision::tf32, L>& f, const float* p, unsigned ldm) {
    if ((uintptr_t)p % 32) abort();
    for (int m = 0; m < 16; ++m) for (int k = 0; k < 8; ++k)
        f.x[m * 8 + k] = std::is_same_v<L, row_major> ? p[m * ldm + k] : p[k * ldm + m];
}
// b: element (k, n) at x[k*16 + n]
template <class L> void load_matrix_sync(fragment<matrix_b, 16, 16, 8, precision::tf32, L>& f, const float* p, unsigned ldm) {
    if ((uintptr_t)p % 32) abort();
    for (int k = 0; k < 8; ++k) for (int n = 0; n < 16; ++n)
        f.x[k * 16 + n] = std::is_same_v<L, row_major> ? p[k * ldm + n] : p[n * ldm + k];
}
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 8, float>& d, const fragment<matrix_a, 16, 16, 8, precision::tf32, LA>& a,
              const fragment<matrix_b, 16, 16, 8, precision::tf32, LB>& b, const fragment<accumulator, 16, 16, 8, float>& c) {
    float r[256];
    for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) {
        float s = c.x[m * 16 + n];
        for (int k = 0; k < 8; ++k) s += __float_to_tf32(a.x[m * 8 + k]) * __float_to_tf32(b.x[k * 16 + n]);
        r[m * 16 + n] = s;
    }
    memcpy(d.x, r, sizeof r);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& f, unsigned ldm, layout_t l) {
    if ((uintptr_t)p % 32) abort();
    // Lane 0 writes (all lanes hold the same values).
    if ((threadIdx.x & 31) == 0)
        for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n)
            (l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.x[m * 16 + n];
    __syncwarp();
}
}}
