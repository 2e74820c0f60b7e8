//! AVX2 + FMA + F16C kernels for float weights (F32, F16) times float activations.
//!
//! Tiled as 4 weight rows × 3 tokens, like the quantized row-major kernels: each 8-float
//! chunk of a weight row is loaded (and, for F16, widened with F16C) once and used by
//! every token of the tile, so the 12 accumulators take one FMA per loaded weight vector
//! and token.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::OutMatrix;
use crate::gguf::quant::GgmlType;

/// How one float format loads 8 weights.
trait Floats {
    const BYTES: usize;
    /// The 8 weights at `p`, as f32.
    ///
    /// # Safety
    /// The CPU must support AVX and F16C; `p` points to `8 * BYTES` readable bytes.
    unsafe fn load8(p: *const u8) -> __m256;
}

struct F32;
impl Floats for F32 {
    const BYTES: usize = 4;
    /// # Safety
    /// As [`Floats::load8`].
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
}

struct F16;
impl Floats for F16 {
    const BYTES: usize = 2;
    /// # Safety
    /// As [`Floats::load8`].
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// The sum of the eight lanes.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Rows `r0..r0+R` against tokens `t0..t0+C`; the tail of `k` past a multiple of 8 is
/// summed plainly.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds rows `r0..r0 + R` of `k` weights
/// and `x` tokens `t0..t0 + C` of `k` floats (the caller checks both); no other thread
/// may access the cells (`t0..t0 + C`, `r0..r0 + R`) of `out` meanwhile.
#[inline(always)]
unsafe fn tile<F: Floats, const R: usize, const C: usize>(
    w: &[u8],
    k: usize,
    x: &[f32],
    r0: usize,
    t0: usize,
    out: OutMatrix,
) {
    let row_bytes = k * F::BYTES;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    let k8 = k / 8 * 8;
    let mut i = 0;
    while i < k8 {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = F::load8(wp.add((r0 + r) * row_bytes + i * F::BYTES));
        }
        for (c, ac) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(xp.add((t0 + c) * k + i));
            for (a, v) in ac.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(*v, xv, *a);
            }
        }
        i += 8;
    }
    for r in 0..R {
        for c in 0..C {
            let mut s = hsum(acc[c][r]);
            for e in k8..k {
                let wr = &w[(r0 + r) * row_bytes + e * F::BYTES..][..F::BYTES];
                let wv = if F::BYTES == 4 {
                    f32::from_le_bytes([wr[0], wr[1], wr[2], wr[3]])
                } else {
                    half::f16::from_le_bytes([wr[0], wr[1]]).to_f32()
                };
                s += wv * x[(t0 + c) * k + e];
            }
            out.set(t0 + c, r0 + r, s);
        }
    }
}

/// Runs tiles over `rows` × all tokens, with smaller tiles on the remainders.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile.
#[inline(always)]
unsafe fn gemm_typed<F: Floats>(w: &[u8], k: usize, rows: Range<usize>, x: &[f32], out: OutMatrix) {
    let n_tok = x.len() / k;
    assert!(w.len() >= rows.end * k * F::BYTES);
    let mut r = rows.start;
    while r + 4 <= rows.end {
        let mut t = 0;
        while t + 3 <= n_tok {
            tile::<F, 4, 3>(w, k, x, r, t, out);
            t += 3;
        }
        while t < n_tok {
            tile::<F, 4, 1>(w, k, x, r, t, out);
            t += 1;
        }
        r += 4;
    }
    while r < rows.end {
        let mut t = 0;
        while t + 4 <= n_tok {
            tile::<F, 1, 4>(w, k, x, r, t, out);
            t += 4;
        }
        while t < n_tok {
            tile::<F, 1, 1>(w, k, x, r, t, out);
            t += 1;
        }
        r += 1;
    }
}

/// Float weights (`ty` F32 or F16, `k` per row) times the float activations `x`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    x: &[f32],
    out: OutMatrix,
) {
    match ty {
        GgmlType::F32 => gemm_typed::<F32>(w, k, rows, x, out),
        GgmlType::F16 => gemm_typed::<F16>(w, k, rows, x, out),
        other => unreachable!("{} is not a float type", other.name()),
    }
}
