// GGML weight block layouts and their dequantization, for the matrix and embedding
// kernels. The reference is engine/src/gguf/quant.rs (`dequantize_row`); the layouts
// are ggml's, byte for byte, since the weights are uploaded unchanged.
//
// Every type provides the same small interface, so that one kernel template serves
// all ten:
//   QK                    elements per block (1 for f16/f32),
//   BYTES                 bytes per block,
//   load8(row, k, v)      the 8 consecutive weights k .. k+7 of a row (k a multiple
//                         of 8), as f32,
//   load1(row, k)         (f16/f32 only) one weight, for rows whose length is not a
//                         multiple of 8.
// Eight consecutive values always share one scale (and min) in every format, and 8
// quantized values fit in one or two 32-bit words, so `load8` is a handful of loads
// plus integer unpacking. Callers give consecutive lanes consecutive `k`, so a warp
// reads whole blocks: loads are coalesced even though each lane reads few bytes.
//
// Alignment: blocks are read with the widest loads their size allows (a row starts at
// `n * row_bytes`, so a block is aligned to the largest power of two dividing its
// size, given a weight pointer aligned to 16 bytes, as cudaMalloc's are). 18-, 22-,
// 34- and 210-byte blocks are only 2-byte aligned and are read in 16-bit pieces.
#pragma once

#include "common.cuh"

namespace sluice {

__device__ __forceinline__ float ld_f16(const uint8_t* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(p)));
}

// 32 bits from an address that is only 2-byte aligned.
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
    return uint32_t(q[0]) | (uint32_t(q[1]) << 16);
}

__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// Byte `i` (0..3) of a word, as an int.
__device__ __forceinline__ int byte_of(uint32_t w, int i) { return int((w >> (8 * i)) & 0xffu); }

// Nibbles of two words holding 8 packed 4-bit codes at bit offset `shift` (0: low
// nibbles, 4: high nibbles) of each byte: element e of the result is byte e's nibble.
__device__ __forceinline__ int nib(uint32_t lo, uint32_t hi, int e, int shift) {
    const uint32_t w = e < 4 ? lo : hi;
    return int((w >> (8 * (e & 3) + shift)) & 0xfu);
}

// Scale and min of sub-block j (0..7) of a Q4_K/Q5_K block from its 12 packed 6-bit
// values (`k_scale_min` in quant.rs).
__device__ __forceinline__ void k_scale_min(int j, const uint8_t* s, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// q4_0: f16 d, 16 bytes of nibbles; byte j holds element j (low) and j + 16 (high).
// value = (q - 8) * d
struct BlockQ4_0 {
    enum { QK = 32, BYTES = 18 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 5) * BYTES;
        const int o = k & 31;
        const float d = ld_f16(b);
        const uint8_t* qs = b + 2 + (o & 15);
        const uint32_t lo = ld_u32_a2(qs), hi = ld_u32_a2(qs + 4);
        const int shift = o & 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = float(nib(lo, hi, e, shift) - 8) * d;
    }
};

// q4_1: f16 d, f16 m, 16 bytes of nibbles (as q4_0). value = q * d + m
struct BlockQ4_1 {
    enum { QK = 32, BYTES = 20 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 5) * BYTES;
        const int o = k & 31;
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const uint8_t* qs = b + 4 + (o & 15);
        const uint32_t lo = ld_u32(qs), hi = ld_u32(qs + 4);
        const int shift = o & 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = float(nib(lo, hi, e, shift)) * d + m;
    }
};

// q5_0: f16 d, 32-bit qh (bit j: fifth bit of element j), 16 bytes of low nibbles (as
// q4_0). value = (q - 16) * d
struct BlockQ5_0 {
    enum { QK = 32, BYTES = 22 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 5) * BYTES;
        const int o = k & 31;
        const float d = ld_f16(b);
        const uint32_t qh = ld_u32_a2(b + 2) >> o;
        const uint8_t* qs = b + 6 + (o & 15);
        const uint32_t lo = ld_u32_a2(qs), hi = ld_u32_a2(qs + 4);
        const int shift = o & 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int q = nib(lo, hi, e, shift) | int((qh >> e) & 1u) << 4;
            v[e] = float(q - 16) * d;
        }
    }
};

// q5_1: f16 d, f16 m, qh, low nibbles (as q5_0). value = q * d + m
struct BlockQ5_1 {
    enum { QK = 32, BYTES = 24 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 5) * BYTES;
        const int o = k & 31;
        const float d = ld_f16(b), m = ld_f16(b + 2);
        const uint32_t qh = ld_u32(b + 4) >> o;
        const uint8_t* qs = b + 8 + (o & 15);
        const uint32_t lo = ld_u32(qs), hi = ld_u32(qs + 4);
        const int shift = o & 16 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int q = nib(lo, hi, e, shift) | int((qh >> e) & 1u) << 4;
            v[e] = float(q) * d + m;
        }
    }
};

// q8_0: f16 d, 32 signed bytes. value = q * d
struct BlockQ8_0 {
    enum { QK = 32, BYTES = 34 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 5) * BYTES;
        const float d = ld_f16(b);
        const uint8_t* qs = b + 2 + (k & 31);
        const uint32_t lo = ld_u32_a2(qs), hi = ld_u32_a2(qs + 4);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const uint32_t w = e < 4 ? lo : hi;
            v[e] = float(int(int8_t((w >> (8 * (e & 3))) & 0xffu))) * d;
        }
    }
};

// q4_k: 256 elements in 4 groups of 64. f16 d, f16 dmin, 12 bytes of packed 6-bit
// scales/mins for the 8 sub-blocks of 32, then 128 bytes: byte g*32 + l holds element
// g*64 + l (low nibble, sub-block 2g) and g*64 + 32 + l (high, sub-block 2g + 1).
// value = d * sc * q - dmin * m
struct BlockQ4_K {
    enum { QK = 256, BYTES = 144 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 8) * BYTES;
        const int o = k & 255, g = o >> 6, p = o & 63, l = p & 31, hi = p >> 5;
        int sc, m;
        k_scale_min(2 * g + hi, b + 4, sc, m);
        const float dl = ld_f16(b) * float(sc), ml = ld_f16(b + 2) * float(m);
        const uint8_t* qs = b + 16 + g * 32 + l;  // 8-byte aligned
        const uint32_t w0 = ld_u32(qs), w1 = ld_u32(qs + 4);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = dl * float(nib(w0, w1, e, 4 * hi)) - ml;
    }
};

// q5_k: as q4_k plus 32 bytes of fifth bits after the scales: bit 2g of byte l is the
// fifth bit of element g*64 + l, bit 2g + 1 that of element g*64 + 32 + l.
struct BlockQ5_K {
    enum { QK = 256, BYTES = 176 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 8) * BYTES;
        const int o = k & 255, g = o >> 6, p = o & 63, l = p & 31, hi = p >> 5;
        int sc, m;
        k_scale_min(2 * g + hi, b + 4, sc, m);
        const float dl = ld_f16(b) * float(sc), ml = ld_f16(b + 2) * float(m);
        const int bit = 2 * g + hi;
        const uint32_t h0 = ld_u32(b + 16 + l), h1 = ld_u32(b + 20 + l);
        const uint8_t* qs = b + 48 + g * 32 + l;
        const uint32_t w0 = ld_u32(qs), w1 = ld_u32(qs + 4);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const uint32_t h = e < 4 ? h0 : h1;
            const int q = nib(w0, w1, e, 4 * hi) | int((h >> (8 * (e & 3) + bit)) & 1u) << 4;
            v[e] = dl * float(q) - ml;
        }
    }
};

// q6_k: 256 elements in 2 halves of 128, each of 4 quarters of 32. 128 bytes of low
// nibbles (ql), 64 bytes of high 2-bit pairs (qh), 16 signed 8-bit scales (one per 16
// elements), f16 d last. In half h, quarter k4 (0..3), position l (0..31): low nibble
// from ql[h*64 + l + 32*(k4 & 1)] (high nibble of that byte when k4 >= 2), high bits
// from qh[h*32 + l] >> 2*k4, scale sc[h*8 + l/16 + 2*k4]. value = d * sc * (q - 32)
struct BlockQ6_K {
    enum { QK = 256, BYTES = 210 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint8_t* b = row + (k >> 8) * BYTES;
        const int o = k & 255, h = o >> 7, k4 = (o >> 5) & 3, l = o & 31;
        const float dl = ld_f16(b + 208) * float(int8_t(b[192 + h * 8 + (l >> 4) + 2 * k4]));
        const uint8_t* ql = b + h * 64 + l + 32 * (k4 & 1);
        const uint8_t* qh = b + 128 + h * 32 + l;
        const uint32_t l0 = ld_u32_a2(ql), l1 = ld_u32_a2(ql + 4);
        const uint32_t h0 = ld_u32_a2(qh), h1 = ld_u32_a2(qh + 4);
        const int shift = k4 >= 2 ? 4 : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const uint32_t hw = e < 4 ? h0 : h1;
            const int q = nib(l0, l1, e, shift) | int((hw >> (8 * (e & 3) + 2 * k4)) & 3u) << 4;
            v[e] = dl * float(q - 32);
        }
    }
};

// f16 / f32: plain rows. `load8` needs rows that are a multiple of 8 long (16-byte
// aligned rows); other rows go through `load1`.
struct BlockF16 {
    enum { QK = 1, BYTES = 2 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const uint4 u = *reinterpret_cast<const uint4*>(row + 2 * k);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    }
    static __device__ __forceinline__ float load1(const uint8_t* row, int k) {
        return ld_f16(row + 2 * k);
    }
};

struct BlockF32 {
    enum { QK = 1, BYTES = 4 };
    static __device__ __forceinline__ void load8(const uint8_t* row, int k, float (&v)[8]) {
        const float4 a = *reinterpret_cast<const float4*>(row + 4 * k);
        const float4 c = *reinterpret_cast<const float4*>(row + 4 * k + 16);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = c.x; v[5] = c.y; v[6] = c.z; v[7] = c.w;
    }
    static __device__ __forceinline__ float load1(const uint8_t* row, int k) {
        return reinterpret_cast<const float*>(row)[k];
    }
};

template <class T>
__device__ __forceinline__ unsigned long long row_bytes(int K) {
    return (unsigned long long)(K / T::QK) * T::BYTES;
}

// Whether rows of length K can go through `load8` (and activations through float4
// loads): always for the block formats, whose K is a multiple of 32.
template <class T>
__device__ __forceinline__ bool vec8_ok(int K) {
    return T::QK > 1 || (K & 7) == 0;
}

// Expands `X(suffix, BlockType)` once per weight type: one place lists the ten types
// for every kernel family's extern "C" wrappers.
#define SLUICE_FOR_EACH_TYPE(X) \
    X(q4_0, BlockQ4_0)          \
    X(q4_1, BlockQ4_1)          \
    X(q5_0, BlockQ5_0)          \
    X(q5_1, BlockQ5_1)          \
    X(q8_0, BlockQ8_0)          \
    X(q4_k, BlockQ4_K)          \
    X(q5_k, BlockQ5_K)          \
    X(q6_k, BlockQ6_K)          \
    X(f16, BlockF16)            \
    X(f32, BlockF32)

}  // namespace sluice
