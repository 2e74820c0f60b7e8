//! Products with f32 activations (`Numerics::F32`): each weight row is dequantized to f32
//! and multiplied with every token's activations in f32, eight rows at a time so that a
//! token's activations are read once per eight rows.
//!
//! The dequantized values are the reference dequantization's, bit for bit (the AVX2
//! forms of Q4_1 and Q8_0 round exactly as `dequantize_row`); only the order of the f32
//! additions in the dot products depends on the kernel set. Within a kernel set every
//! (row, token) product is summed in the same order (the AVX2 `dot`'s: one 8-lane FMA
//! chain, then its horizontal sum), whether the token comes alone or beside others, so a
//! sequence's results do not depend on the batch it runs in.

use std::ops::Range;

use super::{KernelSet, OutMatrix};
use crate::gguf::quant::{dequantize_row, GgmlType};

/// Rows dequantized and multiplied together.
const GROUP: usize = 8;

/// `out[t][r] = dequantize(w row r) · x[t]` for `r` in `rows`, all in f32: activations
/// are not rounded to 8 bits (`Numerics::F32`).
///
/// # Safety
/// No other thread may touch the cells (t, r) for `r` in `rows` while this runs.
pub unsafe fn gemm(
    set: KernelSet,
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    x: &[f32],
    out: OutMatrix,
) {
    let n_tok = x.len() / k;
    let rb = ty.row_bytes(k);
    let mut buf = vec![0f32; GROUP * k];
    let simd = cfg!(target_arch = "x86_64") && set == KernelSet::Avx2 && k.is_multiple_of(8);
    let xt = |t: usize| &x[t * k..(t + 1) * k];
    let mut r = rows.start;
    while r < rows.end {
        let g = (rows.end - r).min(GROUP);
        for (i, row) in buf.chunks_exact_mut(k).take(g).enumerate() {
            // SAFETY: `simd` only on the AVX2 kernel set, which is detected from the CPU.
            unsafe { dequantize(simd, ty, &w[(r + i) * rb..(r + i + 1) * rb], row) };
        }
        let mut t = 0;
        while t < n_tok {
            let mut d = [[0f32; GROUP]; 2];
            let next = (t + 1 < n_tok).then(|| xt(t + 1));
            // How many tokens this pass did: two through the AVX2 tiles where they apply.
            let took = match () {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `simd` only on the AVX2 kernel set, detected from the CPU; `buf`
                // holds GROUP rows of k floats and k is a multiple of 8.
                _ if simd && g == GROUP => unsafe { avx2::dot_group(&buf, xt(t), next, &mut d) },
                _ => {
                    for (di, row) in d[0].iter_mut().zip(buf.chunks_exact(k)).take(g) {
                        *di = super::dot(row, xt(t));
                    }
                    1
                }
            };
            for (j, dj) in d.iter().take(took).enumerate() {
                for (i, &v) in dj.iter().take(g).enumerate() {
                    // SAFETY: the cells of `rows` are ours (the caller's contract).
                    unsafe { out.set(t + j, r + i, v) };
                }
            }
            t += took;
        }
        r += g;
    }
}

/// One row's f32 values, with the AVX2 forms (when `simd`) for the default model's types.
///
/// # Safety
/// With `simd`, the CPU must support AVX2, FMA and F16C.
unsafe fn dequantize(simd: bool, ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller's contract.
        match ty {
            GgmlType::Q4_1 => return unsafe { avx2::dequantize_q4_1(bytes, out) },
            GgmlType::Q8_0 => return unsafe { avx2::dequantize_q8_0(bytes, out) },
            _ => {}
        }
    }
    let _ = simd;
    dequantize_row(ty, bytes, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::GROUP;
    use crate::backends::cpu::kernels::avx2::{f16_pair, hsum};

    /// The products of the GROUP rows in `rows` with `x0` and, when given, `x1` (each
    /// row read once for both), into `d[0]` and `d[1]`; returns how many tokens it did.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Lengths are checked.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_group(
        rows: &[f32],
        x0: &[f32],
        x1: Option<&[f32]>,
        d: &mut [[f32; GROUP]; 2],
    ) -> usize {
        let k = x0.len();
        let Some(x1) = x1 else {
            d[0] = dot_rows::<GROUP>(rows, x0);
            return 1;
        };
        for half in 0..2 {
            let part = &rows[half * 4 * k..(half + 1) * 4 * k];
            let (a, b) = dot_rows_pair::<4>(part, x0, x1);
            d[0][half * 4..(half + 1) * 4].copy_from_slice(&a);
            d[1][half * 4..(half + 1) * 4].copy_from_slice(&b);
        }
        2
    }

    /// Q4_1 rows: `q * d + m` per element, a multiply then an add as the reference does.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
        let low = _mm_set1_epi8(0x0F);
        for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
            // SAFETY: F16C is enabled here; the block starts with d and m.
            let (d, m) = unsafe { f16_pair(b.as_ptr()) };
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            // SAFETY: each block is 20 bytes: d, m, then 16 bytes of nibbles.
            let q = unsafe { _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i) };
            let lo = _mm_and_si128(q, low);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
            let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
            for (j, &part) in parts.iter().enumerate() {
                let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                // SAFETY: `y` is 32 floats.
                unsafe {
                    _mm256_storeu_ps(
                        y.as_mut_ptr().add(8 * j),
                        _mm256_add_ps(_mm256_mul_ps(f, d), m),
                    )
                };
            }
        }
    }

    /// Q8_0 rows: `q * d` per element.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
        for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
            // SAFETY: F16C is enabled here; the block starts with d (and 32 more bytes).
            let d = _mm256_set1_ps(unsafe { f16_pair(b.as_ptr()) }.0);
            for j in 0..4 {
                // SAFETY: each block is 34 bytes: d, then 32 signed bytes; `y` is 32 floats.
                unsafe {
                    let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * j) as *const __m128i);
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(y.as_mut_ptr().add(8 * j), _mm256_mul_ps(f, d));
                }
            }
        }
    }

    /// The dot products of `R` rows of `rows` (each `x.len()` floats) with `x`, each as
    /// the AVX2 `dot` sums it (one FMA chain over 8-lane chunks, then `hsum`'s order).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Lengths are checked: `x.len()` a
    /// multiple of 8, `rows` at least `R` rows of `x.len()` floats.)
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows<const R: usize>(rows: &[f32], x: &[f32]) -> [f32; R] {
        let k = x.len();
        assert!(k.is_multiple_of(8) && rows.len() >= R * k);
        let mut acc = [_mm256_setzero_ps(); R];
        let (r, xp) = (rows.as_ptr(), x.as_ptr());
        for i in (0..k).step_by(8) {
            // SAFETY: i + 8 <= k, and row j spans j * k..(j + 1) * k of `rows`.
            unsafe {
                let xv = _mm256_loadu_ps(xp.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(r.add(j * k + i)), xv, *a);
                }
            }
        }
        let mut d = [0f32; R];
        for (dj, a) in d.iter_mut().zip(acc) {
            // SAFETY: this function's own target features.
            *dj = unsafe { hsum(a) };
        }
        d
    }

    /// [`dot_rows`] for two tokens at once (each row read once for both), summed in
    /// exactly `dot_rows`'s order for each.
    ///
    /// # Safety
    /// As [`dot_rows`] (lengths checked too, `x1` as long as `x0`).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_pair<const R: usize>(
        rows: &[f32],
        x0: &[f32],
        x1: &[f32],
    ) -> ([f32; R], [f32; R]) {
        let k = x0.len();
        assert!(k.is_multiple_of(8) && x1.len() == k && rows.len() >= R * k);
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
        let (r, p0, p1) = (rows.as_ptr(), x0.as_ptr(), x1.as_ptr());
        for i in (0..k).step_by(8) {
            // SAFETY: i + 8 <= k, and row j spans j * k..(j + 1) * k of `rows`.
            unsafe {
                let (v0, v1) = (_mm256_loadu_ps(p0.add(i)), _mm256_loadu_ps(p1.add(i)));
                for j in 0..R {
                    let w = _mm256_loadu_ps(r.add(j * k + i));
                    acc0[j] = _mm256_fmadd_ps(w, v0, acc0[j]);
                    acc1[j] = _mm256_fmadd_ps(w, v1, acc1[j]);
                }
            }
        }
        let (mut d0, mut d1) = ([0f32; R], [0f32; R]);
        for j in 0..R {
            // SAFETY: this function's own target features.
            unsafe { (d0[j], d1[j]) = (hsum(acc0[j]), hsum(acc1[j])) };
        }
        (d0, d1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kernels::test_support::{avx2, pseudo, skipped, WEIGHT_TYPES};
    use crate::gguf::quant::quantize::quantize_row;

    /// Every type, both kernel sets: within f32 rounding of an f64 product of the
    /// reference dequantization, the AVX2 dequantization is the reference's exactly, and
    /// a token alone gets the same bits as in a batch (pairs of tokens, single ones).
    #[test]
    fn products_match_the_reference_dequantization_in_f64() {
        // 19 rows: two whole groups of 8 and a partial one; 3 tokens: a pair and one.
        let (k, n_rows, n_tok) = (256, 19, 3);
        let x = pseudo(n_tok * k, 7);
        let mut sets = vec![KernelSet::Scalar];
        match avx2() {
            Ok(()) => sets.push(KernelSet::Avx2),
            Err(why) => skipped("f32-activation products, AVX2 form", &why),
        }
        for ty in WEIGHT_TYPES {
            let src = pseudo(n_rows * k, 3);
            let w: Vec<u8> = src
                .chunks_exact(k)
                .flat_map(|row| quantize_row(ty, row))
                .collect();
            let rb = ty.row_bytes(k);
            let mut reference = vec![0f32; k];
            for set in &sets {
                let mut out = vec![0f32; n_tok * n_rows];
                // SAFETY: one thread, the whole matrix.
                unsafe {
                    gemm(
                        *set,
                        ty,
                        &w,
                        k,
                        0..n_rows,
                        &x,
                        OutMatrix::new(&mut out, n_rows),
                    )
                };
                // Each token alone gives its row of the batched product, bit for bit.
                for t in 0..n_tok {
                    let mut alone = vec![0f32; n_rows];
                    // SAFETY: one thread, the whole matrix.
                    unsafe {
                        gemm(
                            *set,
                            ty,
                            &w,
                            k,
                            0..n_rows,
                            &x[t * k..(t + 1) * k],
                            OutMatrix::new(&mut alone, n_rows),
                        )
                    };
                    assert_eq!(
                        alone,
                        out[t * n_rows..(t + 1) * n_rows],
                        "{ty:?} {set:?} {t}"
                    );
                }
                for r in 0..n_rows {
                    dequantize_row(ty, &w[r * rb..(r + 1) * rb], &mut reference);
                    let mut mine = vec![0f32; k];
                    let simd = *set == KernelSet::Avx2;
                    // SAFETY: Avx2 is in `sets` only when `avx2()` found the CPU has it.
                    unsafe { dequantize(simd, ty, &w[r * rb..(r + 1) * rb], &mut mine) };
                    assert_eq!(mine, reference, "{ty:?} {set:?} row {r}");
                    for t in 0..n_tok {
                        let exact: f64 = reference
                            .iter()
                            .zip(&x[t * k..(t + 1) * k])
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        let mag: f64 = reference
                            .iter()
                            .zip(&x[t * k..(t + 1) * k])
                            .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                            .sum();
                        let got = f64::from(out[t * n_rows + r]);
                        assert!(
                            (got - exact).abs() <= 1e-6 * mag.max(1e-30),
                            "{ty:?} {set:?} ({t}, {r}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
