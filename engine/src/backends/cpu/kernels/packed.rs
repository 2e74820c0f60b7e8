//! Q4_1 weights regrouped eight rows at a time ("x8" packing), for the AVX2 GEMM.
//!
//! In the file layout each 32-weight block of one row is contiguous, so a SIMD dot product
//! spends one `maddubs` + one `madd` + a horizontal reduction per row and block. Packed,
//! one 32-byte load holds 4 quant bytes of each of 8 rows: multiplied against 4 broadcast
//! activation bytes it yields 8 rows' partial sums in 8 lanes at once, so a block of 8 rows
//! costs 8 `maddubs` and a single `madd` per token, with no horizontal sums. That halves
//! the multiply-port work that bounds prefill and batched decode. Decode is bound by
//! memory bandwidth and reads exactly the same number of bytes either way.
//!
//! Layout, per group of 8 rows and per block `b` (160 bytes, like 8 file blocks):
//! `d[8]` (f16), `m[8]` (f16), then for `j` in 0..4 and row `r` in 0..8 the file's quant
//! bytes `4j..4j+4` of row `r` (low nibbles: elements `4j..4j+4`, high: `16+4j..16+4j+4`).

use std::ops::Range;

use super::packed_k::PackedKx8;
use super::packed_q5::PackedQ5x8;
use super::{OutMatrix, QuantizedActs, QK8};
use crate::gguf::quant::GgmlType;

/// Rows per packed group.
pub const PACK_ROWS: usize = 8;
const FILE_BLOCK_BYTES: usize = 20;
pub(super) const GROUP_BLOCK_BYTES: usize = PACK_ROWS * FILE_BLOCK_BYTES;

/// Regroups blocks of 32 (`block_bytes` each: `halves` f16 fields, then the quants) from
/// row-major into groups of 8 rows: per group and block, each f16 field of the 8 rows,
/// then the quants in 4-byte runs, run `j` of rows 0..8 side by side. `None` when the
/// shape does not divide into groups of 8 rows and blocks of 32.
fn interleave_x8(
    src: &[u8],
    rows: usize,
    cols: usize,
    block_bytes: usize,
    halves: usize,
) -> Option<Vec<u8>> {
    if rows == 0
        || !rows.is_multiple_of(PACK_ROWS)
        || !cols.is_multiple_of(QK8)
        || src.len() != rows * cols / QK8 * block_bytes
    {
        return None;
    }
    let (nb, group_block) = (cols / QK8, PACK_ROWS * block_bytes);
    let header = 2 * halves;
    let runs = (block_bytes - header) / 4;
    let mut data = vec![0u8; src.len()];
    for g in 0..rows / PACK_ROWS {
        for b in 0..nb {
            let dst = &mut data[(g * nb + b) * group_block..][..group_block];
            for r in 0..PACK_ROWS {
                let blk = &src[((g * PACK_ROWS + r) * nb + b) * block_bytes..][..block_bytes];
                for h in 0..halves {
                    let at = 16 * h + 2 * r;
                    dst[at..at + 2].copy_from_slice(&blk[2 * h..2 * h + 2]);
                }
                for j in 0..runs {
                    let at = 8 * header + 32 * j + 4 * r;
                    dst[at..at + 4].copy_from_slice(&blk[header + 4 * j..header + 4 * j + 4]);
                }
            }
        }
    }
    Some(data)
}

/// A Q4_1 matrix in the x8 layout (owned memory, same size as the file's).
pub struct PackedQ4_1x8 {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedQ4_1x8 {
    /// Repacks `src` (`rows` Q4_1 rows of `cols`), or `None` when the shape does not
    /// divide into groups of 8 rows and blocks of 32.
    pub fn pack(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if ty != GgmlType::Q4_1 {
            return None;
        }
        let data = interleave_x8(src, rows, cols, FILE_BLOCK_BYTES, 2)?;
        Some(PackedQ4_1x8 { rows, cols, data })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// (rows, columns).
    pub(super) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The packed bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.data
    }
}

const Q8_FILE_BLOCK_BYTES: usize = 34;
pub(super) const Q8_GROUP_BLOCK_BYTES: usize = PACK_ROWS * Q8_FILE_BLOCK_BYTES;

/// A Q8_0 matrix in the x8 layout: per group of 8 rows and block, `d[8]` (f16) then for
/// `j` in 0..8 and row `r` in 0..8 the quants `4j..4j+4` of row `r` (272 bytes).
pub struct PackedQ8_0x8 {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedQ8_0x8 {
    /// Repacks `src` (`rows` Q8_0 rows of `cols`), or `None` when the shape does not
    /// divide into groups of 8 rows and blocks of 32.
    pub fn pack(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if ty != GgmlType::Q8_0 {
            return None;
        }
        let data = interleave_x8(src, rows, cols, Q8_FILE_BLOCK_BYTES, 1)?;
        Some(PackedQ8_0x8 { rows, cols, data })
    }

    /// (rows, columns).
    pub(super) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The packed bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// A weight matrix regrouped for the x8 kernels.
pub enum PackedMatrix {
    Q4_1(PackedQ4_1x8),
    Q8_0(PackedQ8_0x8),
    /// Q5_0 or Q5_1.
    Q5(PackedQ5x8),
    /// Q4_K, Q5_K or Q6_K.
    K(PackedKx8),
}

impl PackedMatrix {
    /// Packs `src` when its type and shape have an x8 kernel.
    pub fn pack(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<Self> {
        match ty {
            GgmlType::Q4_1 => PackedQ4_1x8::pack(ty, src, rows, cols).map(PackedMatrix::Q4_1),
            GgmlType::Q8_0 => PackedQ8_0x8::pack(ty, src, rows, cols).map(PackedMatrix::Q8_0),
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                PackedQ5x8::pack(ty, src, rows, cols).map(PackedMatrix::Q5)
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                PackedKx8::pack(ty, src, rows, cols).map(PackedMatrix::K)
            }
            _ => None,
        }
    }
}

/// Runs the x8 kernel of `w` over `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_packed_avx2(
    w: &PackedMatrix,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    match w {
        PackedMatrix::Q4_1(p) => gemm_avx2(p, rows, acts, out),
        PackedMatrix::Q8_0(p) => gemm_q8_avx2(p, rows, acts, out),
        PackedMatrix::Q5(p) => super::packed_q5::gemm_avx2(p, rows, acts, out),
        PackedMatrix::K(p) => super::packed_k::gemm_avx2(p, rows, acts, out),
    }
}

/// Checks the shapes, then calls `tile(g, t0, width)` over every row group and token
/// tile: 8 tokens wide while they last, then 4, then the rest.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn for_each_tile(
    (w_rows, w_cols): (usize, usize),
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: &OutMatrix,
    mut tile: impl FnMut(usize, usize, usize),
) {
    assert!(rows.start.is_multiple_of(PACK_ROWS) && rows.end.is_multiple_of(PACK_ROWS));
    assert!(rows.end <= w_rows && acts.row_len == w_cols);
    assert!(acts.qs.len() >= acts.n_rows * w_cols && acts.d.len() >= acts.n_rows * (w_cols / QK8));
    assert!(out.stride == w_rows && out.len >= acts.n_rows * w_rows);
    let n = acts.n_rows;
    for g in rows.start / PACK_ROWS..rows.end / PACK_ROWS {
        let mut t = 0;
        while t < n {
            let width = match n - t {
                r if r >= 8 => 8,
                r if r >= 4 => 4,
                r => r,
            };
            tile(g, t, width);
            t += width;
        }
    }
}

/// `for_each_tile` over `w`, calling `tile::<C>(w, g, t0, acts, out)` with the tile's
/// width `C` as a constant (8, 4, 3, 2 or 1), so each width gets its own unrolled code.
#[cfg(target_arch = "x86_64")]
macro_rules! run_tiles {
    ($($tile:ident)::+, $w:expr, $rows:expr, $acts:expr, $out:expr) => {{
        let (w, acts, out) = ($w, $acts, $out);
        for_each_tile(w.shape(), $rows, acts, &out, |g, t, width| match width {
            8 => $($tile)::+::<8>(w, g, t, acts, out),
            4 => $($tile)::+::<4>(w, g, t, acts, out),
            3 => $($tile)::+::<3>(w, g, t, acts, out),
            2 => $($tile)::+::<2>(w, g, t, acts, out),
            _ => $($tile)::+::<1>(w, g, t, acts, out),
        })
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use run_tiles;

/// The Q8_0 x8 kernel over `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gemm_q8_avx2(w: &PackedQ8_0x8, rows: Range<usize>, acts: &QuantizedActs, out: OutMatrix) {
    run_tiles!(avx2::tile_q8, w, rows, acts, out);
}

/// `out[t][r] = dot(row r, activation t)` for `r` in `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_avx2(
    w: &PackedQ4_1x8,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    run_tiles!(avx2::tile, w, rows, acts, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PackedQ4_1x8, PackedQ8_0x8, GROUP_BLOCK_BYTES, PACK_ROWS, Q8_GROUP_BLOCK_BYTES};
    use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};

    /// Rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` is a row group of `w` and
    /// `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out` (`for_each_tile`
    /// checks these); no other thread may access `out`'s cells in rows `8g..8g + 8`.
    // Compiled for the features itself rather than `inline(always)`: it is called from
    // the closure `run_tiles!` hands to `for_each_tile`, and a closure does not inherit
    // target features; if that closure were not inlined, every intrinsic here would
    // become a call (a 10x slower GEMM, seen when the closure's shape changed).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const C: usize>(
        w: &PackedQ4_1x8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        let k = w.cols;
        let nb = k / QK8;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let qa = acts.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); C];
        let group = w.data.as_ptr().add(g * nb * GROUP_BLOCK_BYTES);
        for b in 0..nb {
            let blk = group.add(b * GROUP_BLOCK_BYTES);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            // Eight products of at most 15·127·2 each fit an i16 lane (30,480 < 32,767).
            let mut isum = [_mm256_setzero_si256(); C];
            for j in 0..4 {
                let raw = _mm256_loadu_si256(blk.add(32 + 32 * j) as *const __m256i);
                let lo = _mm256_and_si256(raw, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                for (c, s) in isum.iter_mut().enumerate() {
                    let a = qa.add((t0 + c) * k + b * QK8);
                    let alo = _mm256_set1_epi32((a.add(4 * j) as *const i32).read_unaligned());
                    let ahi = _mm256_set1_epi32((a.add(16 + 4 * j) as *const i32).read_unaligned());
                    *s = _mm256_add_epi16(*s, _mm256_maddubs_epi16(lo, alo));
                    *s = _mm256_add_epi16(*s, _mm256_maddubs_epi16(hi, ahi));
                }
            }
            for c in 0..C {
                let ti = (t0 + c) * nb + b;
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(isum[c], ones));
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                acc[c] = _mm256_fmadd_ps(scale, sums, acc[c]);
                acc[c] = _mm256_fmadd_ps(m, _mm256_set1_ps(*acts.s.get_unchecked(ti)), acc[c]);
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
        }
    }

    /// Q8_0 rows `8g..8g+8` against tokens `t0..t0+C`. Signed weights use the sign
    /// trick (`|w|` times `a` carrying `w`'s sign); each product pair fills an i16, so
    /// every `maddubs` is widened to i32 at once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` is a row group of `w` and
    /// `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out` (`for_each_tile`
    /// checks these); no other thread may access `out`'s cells in rows `8g..8g + 8`.
    /// (Compiled for the features itself, as `tile`.)
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q8<const C: usize>(
        w: &PackedQ8_0x8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        let k = w.cols;
        let nb = k / QK8;
        let ones = _mm256_set1_epi16(1);
        let qa = acts.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); C];
        let group = w.data.as_ptr().add(g * nb * Q8_GROUP_BLOCK_BYTES);
        let next_group = group.wrapping_add(nb * Q8_GROUP_BLOCK_BYTES);
        for b in 0..nb {
            let blk = group.add(b * Q8_GROUP_BLOCK_BYTES);
            if t0 == 0 {
                // As in the row-major kernel: the LM head is streamed once per step, and
                // the non-temporal hint keeps it from evicting the layers from L3.
                let ahead = next_group.wrapping_add(b * Q8_GROUP_BLOCK_BYTES);
                for line in (0..Q8_GROUP_BLOCK_BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_NTA>(ahead.wrapping_add(line) as *const i8);
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let mut isum = [_mm256_setzero_si256(); C];
            for j in 0..8 {
                let q = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                let aq = _mm256_sign_epi8(q, q);
                for (c, s) in isum.iter_mut().enumerate() {
                    let a = qa.add((t0 + c) * k + b * QK8 + 4 * j);
                    let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
                    let p16 = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(av, q));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p16, ones));
                }
            }
            for c in 0..C {
                let ti = (t0 + c) * nb + b;
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[c]), acc[c]);
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kernels::test_support;
    use crate::backends::cpu::kernels::test_support::pseudo;
    use crate::backends::cpu::kernels::{gemm, KernelSet, Vnni};
    use crate::gguf::quant::quantize::quantize_row;
    use crate::gguf::quant::{dequantize_row, QK_K};

    #[test]
    fn only_q4_1_in_whole_groups_is_packed() {
        let w: Vec<u8> = pseudo(16 * 64, 1)
            .chunks_exact(64)
            .flat_map(|r| quantize_row(GgmlType::Q4_1, r))
            .collect();
        assert!(PackedQ4_1x8::pack(GgmlType::Q4_1, &w, 16, 64).is_some());
        assert!(PackedQ4_1x8::pack(GgmlType::Q4_0, &w, 16, 64).is_none());
        let short = &w[..w.len() - 20 * 2 * 4];
        assert!(PackedQ4_1x8::pack(GgmlType::Q4_1, short, 12, 64).is_none());
    }

    /// Sets every code of `w` (rows of `ty`) to its extreme: the largest unsigned code,
    /// or for Q6_K the most negative signed one, so the integer sums in the tiles reach
    /// the bounds their comments claim (i16 lanes that must not wrap).
    fn extreme_codes(ty: GgmlType, w: &mut [u8]) {
        for b in w.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                GgmlType::Q4_1 => b[4..].fill(0xFF),
                GgmlType::Q8_0 => b[2..].fill(0x81), // -127
                GgmlType::Q5_0 => b[2..].fill(0xFF),
                GgmlType::Q5_1 => b[4..].fill(0xFF),
                GgmlType::Q4K => b[16..].fill(0xFF),
                GgmlType::Q5K => b[16..].fill(0xFF),
                GgmlType::Q6K => b[..192].fill(0), // code 0: -32
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn packed_tiles_do_not_overflow_on_extreme_codes() {
        const NAME: &str = "packed_tiles_do_not_overflow_on_extreme_codes";
        if let Err(why) = test_support::avx2() {
            test_support::skipped(NAME, &format!("no packed kernels here: {why}"));
            return;
        }
        let (rows, k, n_tok) = (16usize, 2 * QK_K, 3usize);
        // Activations at +127, at -127, and alternating.
        let x: Vec<f32> = (0..n_tok * k)
            .map(|i| match i / k {
                0 => 1.0,
                1 => -1.0,
                _ => [1.0, -1.0][i % 2],
            })
            .collect();
        let mut q = QuantizedActs::default();
        q.quantize(&x, n_tok, k);
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let mut w: Vec<u8> = pseudo(rows * k, 5)
                .chunks_exact(k)
                .flat_map(|r| quantize_row(ty, r))
                .collect();
            extreme_codes(ty, &mut w);
            let mut want = vec![0f32; n_tok * rows];
            // SAFETY: one thread.
            unsafe {
                let om = OutMatrix::new(&mut want, rows);
                gemm(KernelSet::Scalar, ty, &w, k, 0..rows, &q, &x, om);
            }
            let packed = PackedMatrix::pack(ty, &w, rows, k).unwrap();
            let mut got = vec![f32::NAN; n_tok * rows];
            // SAFETY: detected above; one thread.
            unsafe { gemm_packed_avx2(&packed, 0..rows, &q, OutMatrix::new(&mut got, rows)) };
            let mut outputs = vec![("avx2", got)];
            for vnni in [Vnni::Avx512, Vnni::Avx] {
                if test_support::vnni(vnni).is_ok() {
                    let mut v = vec![f32::NAN; n_tok * rows];
                    // SAFETY: the encoding was detected; one thread.
                    unsafe {
                        super::super::packed_vnni::gemm_packed_vnni(
                            vnni,
                            &packed,
                            0..rows,
                            &q,
                            OutMatrix::new(&mut v, rows),
                        )
                    };
                    outputs.push((test_support::vnni_name(vnni), v));
                }
            }
            for (set, got) in &outputs {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{set} {} i={i}: {g} vs {w}",
                        ty.name()
                    );
                }
            }
        }
    }

    #[test]
    fn packed_gemm_matches_the_scalar_kernel_and_vnni_matches_avx2() {
        const NAME: &str = "packed_gemm_matches_the_scalar_kernel_and_vnni_matches_avx2";
        if let Err(why) = test_support::avx2() {
            // Matrices are only packed where the AVX2 kernels run.
            test_support::skipped(NAME, &format!("no packed kernels here: {why}"));
            return;
        }
        let mut encodings = Vec::new();
        for vnni in [Vnni::Avx512, Vnni::Avx] {
            match test_support::vnni(vnni) {
                Ok(()) => encodings.push(vnni),
                Err(why) => test_support::skipped(&format!("{NAME} ({vnni:?} VNNI part)"), &why),
            }
        }
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            for &(rows, k, n_tok) in &[
                (8usize, 32usize, 1usize),
                (24, 576, 5),
                (16, 1536, 9),
                (16, 576, 15),
                (16, 1536, 16),
                (24, 768, 3),
                (8, 256, 12),
            ] {
                if !k.is_multiple_of(ty.block_size()) {
                    continue;
                }
                let x = pseudo(n_tok * k, 3 + k as u64);
                let w: Vec<u8> = pseudo(rows * k, 11 + rows as u64)
                    .chunks_exact(k)
                    .flat_map(|r| quantize_row(ty, r))
                    .collect();
                let mut q = QuantizedActs::default();
                q.quantize(&x, n_tok, k);
                let mut want = vec![0f32; n_tok * rows];
                let om = OutMatrix::new(&mut want, rows);
                // SAFETY: one thread.
                unsafe { gemm(KernelSet::Scalar, ty, &w, k, 0..rows, &q, &x, om) };
                let packed = PackedMatrix::pack(ty, &w, rows, k).unwrap();
                let mut got = vec![f32::NAN; n_tok * rows];
                let om = OutMatrix::new(&mut got, rows);
                // Two calls, as two threads would split the rows.
                let mid = rows / 16 * 8;
                // SAFETY: detected above; one thread, disjoint row ranges.
                unsafe {
                    gemm_packed_avx2(&packed, 0..mid, &q, om);
                    gemm_packed_avx2(&packed, mid..rows, &q, om);
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{} rows={rows} k={k} n_tok={n_tok} i={i}: {g} vs {w}",
                        ty.name()
                    );
                }
                // And against plain dequantize-then-multiply, within what quantizing the
                // activations to 8 bits costs.
                let mut row = vec![0f32; k];
                for r in 0..rows {
                    let rb = ty.row_bytes(k);
                    dequantize_row(ty, &w[r * rb..(r + 1) * rb], &mut row);
                    for t in 0..n_tok {
                        let truth: f64 = row
                            .iter()
                            .zip(&x[t * k..(t + 1) * k])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let g = got[t * rows + r] as f64;
                        assert!(
                            (g - truth).abs() <= 0.012 * (k as f64).sqrt(),
                            "{} rows={rows} k={k} t={t} r={r}: {g} vs {truth}",
                            ty.name()
                        );
                    }
                }
                // The VNNI tiles give the AVX2 tiles' output bit for bit (the integer sums
                // are exact either way), for every encoding this CPU has.
                for &vnni in &encodings {
                    let mut v = vec![f32::NAN; n_tok * rows];
                    let om = OutMatrix::new(&mut v, rows);
                    // SAFETY: the encoding was detected; one thread, disjoint rows.
                    unsafe {
                        super::super::packed_vnni::gemm_packed_vnni(vnni, &packed, 0..mid, &q, om);
                        super::super::packed_vnni::gemm_packed_vnni(
                            vnni,
                            &packed,
                            mid..rows,
                            &q,
                            om,
                        );
                    }
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&v),
                        bits(&got),
                        "{vnni:?} {} rows={rows} k={k} n_tok={n_tok}",
                        ty.name()
                    );
                }
            }
        }
    }
}
