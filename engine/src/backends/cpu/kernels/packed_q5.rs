//! Q5_0 and Q5_1 weights regrouped eight rows at a time, for the AVX2 GEMM.
//!
//! The same x8 scheme as `packed.rs` (one 32-byte load holds 4 quant bytes of each of 8
//! rows, multiplied against 4 broadcast activation bytes), with the fifth bits moved at
//! load time to where one shift and one mask put them in place: in the file, bit `e` of a
//! row's `qh` is the fifth bit of element `e`, which would need a byte shuffle and a
//! compare per vector to spread. The codes are multiplied unsigned (0..31, `maddubs`'s
//! unsigned operand); Q5_0's centre of 16 is taken off afterwards with the activations'
//! exact integer sum, which costs one subtraction per block instead of a sign per vector.
//!
//! Layout, per group of 8 rows and per block of 32 (8 file blocks' bytes, 176 or 192):
//! `d[8]` (f16), for Q5_1 `m[8]` (f16), `qh[8]` (u32, rearranged), then for `j` in 0..4
//! and row `r` in 0..8 the file's nibble bytes `4j..4j+4` of row `r` (low nibbles:
//! elements `4j..4j+4`, high: `16+4j..16+4j+4`). In the rearranged `qh`, bit `8i + p`
//! is the fifth bit of byte `i` of run `j = p / 2`'s low (`p` even) or high (`p` odd)
//! nibbles: shifting it left by `4 - p` (right by `p - 4`) lands it on bit 4 of byte `i`.

use std::ops::Range;

use super::{OutMatrix, QuantizedActs, QK8};
use crate::gguf::quant::GgmlType;

use super::packed::PACK_ROWS;

/// A Q5_0 or Q5_1 matrix in the x8 layout (owned memory, same size as the file's).
pub struct PackedQ5x8 {
    rows: usize,
    cols: usize,
    /// Q5_1 (scale and offset) rather than Q5_0 (scale, centred on 16).
    with_min: bool,
    data: Vec<u8>,
}

/// The file's `qh` (bit `e`: fifth bit of element `e`) in the rearranged order.
fn rearrange_qh(qh: u32) -> u32 {
    let mut out = 0u32;
    for i in 0..4 {
        for p in 0..8 {
            let (j, half) = (p / 2, p % 2);
            let e = 16 * half + 4 * j + i;
            out |= ((qh >> e) & 1) << (8 * i + p);
        }
    }
    out
}

impl PackedQ5x8 {
    /// Repacks `src` (`rows` Q5_0 or Q5_1 rows of `cols`), or `None` for another type or
    /// a shape that does not divide into groups of 8 rows and blocks of 32.
    pub fn pack(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1)
            || rows == 0
            || !rows.is_multiple_of(PACK_ROWS)
            || !cols.is_multiple_of(QK8)
            || src.len() != ty.row_bytes(cols) * rows
        {
            return None;
        }
        let with_min = ty == GgmlType::Q5_1;
        let (bb, nb) = (ty.block_bytes(), cols / QK8);
        let halves = if with_min { 2 } else { 1 };
        let group_block = PACK_ROWS * bb;
        let qh_at = 16 * halves;
        let mut data = vec![0u8; src.len()];
        for g in 0..rows / PACK_ROWS {
            for b in 0..nb {
                let dst = &mut data[(g * nb + b) * group_block..][..group_block];
                for r in 0..PACK_ROWS {
                    let blk = &src[((g * PACK_ROWS + r) * nb + b) * bb..][..bb];
                    for h in 0..halves {
                        dst[16 * h + 2 * r..][..2].copy_from_slice(&blk[2 * h..2 * h + 2]);
                    }
                    let h = 2 * halves;
                    let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
                    dst[qh_at + 4 * r..][..4].copy_from_slice(&rearrange_qh(qh).to_le_bytes());
                    for j in 0..4 {
                        let at = qh_at + 32 + 32 * j + 4 * r;
                        dst[at..at + 4].copy_from_slice(&blk[h + 4 + 4 * j..h + 8 + 4 * j]);
                    }
                }
            }
        }
        Some(PackedQ5x8 {
            rows,
            cols,
            with_min,
            data,
        })
    }

    /// (rows, columns).
    pub(super) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes per group of 8 rows and block of 32.
    fn group_block_bytes(&self) -> usize {
        PACK_ROWS * if self.with_min { 24 } else { 22 }
    }
}

/// Runs the x8 Q5 kernel over `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_avx2(
    w: &PackedQ5x8,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    use super::packed::{for_each_tile, run_tiles};
    assert!(acts.sum.len() >= acts.n_rows * (w.cols / QK8));
    if w.with_min {
        run_tiles!(avx2::tile_q5_1, w, rows, acts, out);
    } else {
        run_tiles!(avx2::tile_q5_0, w, rows, acts, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PackedQ5x8, PACK_ROWS};
    use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};

    /// Bit 4 of each byte: the fifth bits of run `p / 2`'s low (`p` even) or high
    /// nibbles, from the rearranged `qh` of 8 rows.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    pub(super) unsafe fn fifth_bits(qh: __m256i, p: usize) -> __m256i {
        let v = match p {
            0 => _mm256_slli_epi32::<4>(qh),
            1 => _mm256_slli_epi32::<3>(qh),
            2 => _mm256_slli_epi32::<2>(qh),
            3 => _mm256_slli_epi32::<1>(qh),
            4 => qh,
            5 => _mm256_srli_epi32::<1>(qh),
            6 => _mm256_srli_epi32::<2>(qh),
            _ => _mm256_srli_epi32::<3>(qh),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(0x10))
    }

    /// Rows `8g..8g+8` against tokens `t0..t0+C`; `MIN`: Q5_1 (else Q5_0).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` is a row group of `w` and
    /// `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out` (`for_each_tile`
    /// and `gemm_avx2` check these); no other thread may access `out`'s cells in rows
    /// `8g..8g + 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const MIN: bool, const C: usize>(
        w: &PackedQ5x8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        let k = w.cols;
        let nb = k / QK8;
        let gb = w.group_block_bytes();
        let qh_at = if MIN { 32 } else { 16 };
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let qa = acts.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); C];
        let group = w.data.as_ptr().add(g * nb * gb);
        for b in 0..nb {
            let blk = group.add(b * gb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let qh = _mm256_loadu_si256(blk.add(qh_at) as *const __m256i);
            let mut isum = [_mm256_setzero_si256(); C];
            // Two runs (four `maddubs` of at most 2·31·127 per i16 lane: 31,496 <
            // 32,767) at a time, then widened to i32.
            for jj in 0..2 {
                let mut wq = [_mm256_setzero_si256(); 4];
                for (h, v) in wq.iter_mut().enumerate() {
                    let j = 2 * jj + h / 2;
                    let raw = _mm256_loadu_si256(blk.add(qh_at + 32 + 32 * j) as *const __m256i);
                    let nib = if h % 2 == 0 {
                        _mm256_and_si256(raw, mask)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask)
                    };
                    *v = _mm256_or_si256(nib, fifth_bits(qh, 2 * j + h % 2));
                }
                for (c, s) in isum.iter_mut().enumerate() {
                    let a = qa.add((t0 + c) * k + b * QK8);
                    let mut p16 = _mm256_setzero_si256();
                    for (h, v) in wq.iter().enumerate() {
                        let j = 2 * jj + h / 2;
                        let at = 16 * (h % 2) + 4 * j;
                        let av = _mm256_set1_epi32((a.add(at) as *const i32).read_unaligned());
                        p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(*v, av));
                    }
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p16, ones));
                }
            }
            for c in 0..C {
                let ti = (t0 + c) * nb + b;
                let mut sums = isum[c];
                if !MIN {
                    // Σ (u - 16) a = Σ u a - 16 Σ a, exactly.
                    let centre = _mm256_set1_epi32(16 * *acts.sum.get_unchecked(ti));
                    sums = _mm256_sub_epi32(sums, centre);
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[c]);
                if MIN {
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                    acc[c] = _mm256_fmadd_ps(m, _mm256_set1_ps(*acts.s.get_unchecked(ti)), acc[c]);
                }
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
        }
    }

    /// Q5_0 rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q5_0<const C: usize>(
        w: &PackedQ5x8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        tile::<false, C>(w, g, t0, acts, out)
    }

    /// Q5_1 rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q5_1<const C: usize>(
        w: &PackedQ5x8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        tile::<true, C>(w, g, t0, acts, out)
    }
}

/// Runs the x8 Q5 kernel with VNNI (`vpdpbusd`) over `rows` (multiples of 8) and every
/// token: the AVX2 tile's steps with each `maddubs`/`add`/`madd` run fused into one
/// instruction, so the integer sums, and the output, are the AVX2 tile's bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C and the `vnni` encoding; no other thread may
/// access the cells of `out` in `rows` meanwhile.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm_vnni(
    vnni: super::Vnni,
    w: &PackedQ5x8,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    assert!(acts.sum.len() >= acts.n_rows * (w.cols / QK8));
    match vnni {
        super::Vnni::Avx512 => evex::gemm(w, rows, acts, out),
        super::Vnni::Avx => vex::gemm(w, rows, acts, out),
    }
}

/// Defines module `$m` with the Q5 VNNI tiles compiled for `$features`, using `$dp`.
#[cfg(target_arch = "x86_64")]
macro_rules! q5_vnni_tiles {
    ($m:ident, $features:literal, $dp:ident) => {
        mod $m {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::super::packed::{for_each_tile, run_tiles};
            use super::avx2::fifth_bits;
            use super::{PackedQ5x8, PACK_ROWS};
            use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};

            /// The VNNI Q5 kernel over `rows` (multiples of 8) and every token.
            ///
            /// # Safety
            /// The CPU must support `$features`; no other thread may access the cells of
            /// `out` in `rows` meanwhile.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm(
                w: &PackedQ5x8,
                rows: Range<usize>,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                if w.with_min {
                    run_tiles!(tile_q5_1, w, rows, acts, out);
                } else {
                    run_tiles!(tile_q5_0, w, rows, acts, out);
                }
            }

            /// Rows `8g..8g+8` against tokens `t0..t0+C`; `MIN`: Q5_1 (else Q5_0).
            ///
            /// # Safety
            /// As `avx2::tile`, with this module's features.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const MIN: bool, const C: usize>(
                w: &PackedQ5x8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                let k = w.cols;
                let nb = k / QK8;
                let gb = w.group_block_bytes();
                let qh_at = if MIN { 32 } else { 16 };
                let mask = _mm256_set1_epi8(0x0F);
                let qa = acts.qs.as_ptr() as *const u8;
                let mut acc = [_mm256_setzero_ps(); C];
                let group = w.data.as_ptr().add(g * nb * gb);
                for b in 0..nb {
                    let blk = group.add(b * gb);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let qh = _mm256_loadu_si256(blk.add(qh_at) as *const __m256i);
                    let mut isum = [_mm256_setzero_si256(); C];
                    for j in 0..4 {
                        let raw =
                            _mm256_loadu_si256(blk.add(qh_at + 32 + 32 * j) as *const __m256i);
                        let lo =
                            _mm256_or_si256(_mm256_and_si256(raw, mask), fifth_bits(qh, 2 * j));
                        let hi = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                            fifth_bits(qh, 2 * j + 1),
                        );
                        for (c, s) in isum.iter_mut().enumerate() {
                            let a = qa.add((t0 + c) * k + b * QK8);
                            let alo =
                                _mm256_set1_epi32((a.add(4 * j) as *const i32).read_unaligned());
                            let ahi = _mm256_set1_epi32(
                                (a.add(16 + 4 * j) as *const i32).read_unaligned(),
                            );
                            *s = $dp(*s, lo, alo);
                            *s = $dp(*s, hi, ahi);
                        }
                    }
                    for c in 0..C {
                        let ti = (t0 + c) * nb + b;
                        let mut sums = isum[c];
                        if !MIN {
                            let centre = _mm256_set1_epi32(16 * *acts.sum.get_unchecked(ti));
                            sums = _mm256_sub_epi32(sums, centre);
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                        acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[c]);
                        if MIN {
                            let m = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                            let s = _mm256_set1_ps(*acts.s.get_unchecked(ti));
                            acc[c] = _mm256_fmadd_ps(m, s, acc[c]);
                        }
                    }
                }
                for (c, v) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
                }
            }

            /// Q5_0 rows `8g..8g+8` against tokens `t0..t0+C`.
            ///
            /// # Safety
            /// As [`tile`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q5_0<const C: usize>(
                w: &PackedQ5x8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                tile::<false, C>(w, g, t0, acts, out)
            }

            /// Q5_1 rows `8g..8g+8` against tokens `t0..t0+C`.
            ///
            /// # Safety
            /// As [`tile`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q5_1<const C: usize>(
                w: &PackedQ5x8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                tile::<true, C>(w, g, t0, acts, out)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
q5_vnni_tiles!(
    evex,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);
#[cfg(target_arch = "x86_64")]
q5_vnni_tiles!(vex, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rearranged_fifth_bits_land_on_bit_four_of_their_byte() {
        for e in 0..32 {
            let r = rearrange_qh(1 << e);
            assert_eq!(r.count_ones(), 1, "element {e}");
            let (half, j, i) = (e / 16, (e % 16) / 4, e % 4);
            let p = 2 * j + half;
            let placed = if p <= 4 { r << (4 - p) } else { r >> (p - 4) };
            assert_eq!(placed & 0x1010_1010, 0x10 << (8 * i), "element {e}");
        }
    }
}
