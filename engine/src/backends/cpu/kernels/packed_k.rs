//! Q4_K, Q5_K and Q6_K weights regrouped eight rows at a time, for the AVX2 GEMM.
//!
//! The x8 scheme of `packed.rs` applied to the k-quants' 256-element super-blocks: one
//! 32-byte load holds 4 quant bytes of each of 8 rows, multiplied against 4 broadcast
//! activation bytes, so 8 rows' partial sums build up in 8 lanes with no horizontal
//! sums. The activations are the usual 8-bit blocks of 32 (`QuantizedActs`): each
//! 32-element sub-block of a super-block meets one activation block, so its integer sum
//! is scaled once by the sub-block's scale and the block's `d` (and, for Q4_K, its min
//! by the block's `s`), exactly the products the scalar kernel forms.
//!
//! Q4_K layout, per group of 8 rows and super-block (1,184 bytes; the file's 1,152 plus
//! the 6-bit scales and mins unpacked to bytes, so the kernel reads them directly):
//! `d[8]`, `dmin[8]` (f16), `sc[s][r]` and `m[s][r]` (u8, sub-block `s` of row `r`),
//! then for pair `g` in 0..4 and run `j` in 0..8 the file's quant bytes
//! `32g + 4j..32g + 4j + 4` of rows 0..8 side by side (low nibbles: sub-block `2g`,
//! high: `2g + 1`, elements `4j..4j + 4`).
//!
//! Q5_K layout: Q4_K's (1,440 bytes), followed by the file's `qh` bytes in 4-byte runs
//! (run `j`: bytes `4j..4j + 4` of rows 0..8 side by side; bit `s` of a byte is the fifth
//! bit of sub-block `s`'s element).
//!
//! Q6_K layout, per group of 8 rows and super-block (1,680 bytes, as the file's):
//! `d[8]` (f16), `sc[q][r]` (i8, 16-element part `q` of row `r`), then the file's `ql`
//! bytes in 4-byte runs (run `i`: bytes `4i..4i + 4` of rows 0..8 side by side), then its
//! `qh` bytes likewise.

use std::ops::Range;

use super::packed::PACK_ROWS;
use super::{OutMatrix, QuantizedActs, QK8};
use crate::gguf::quant::{k_scale_min, GgmlType, QK_K};

/// Bytes per group of 8 rows and super-block, Q4_K.
const Q4K_GROUP_BYTES: usize = 32 + 128 + 8 * 128;
/// Bytes per group of 8 rows and super-block, Q5_K.
const Q5K_GROUP_BYTES: usize = Q4K_GROUP_BYTES + 8 * 32;
/// Bytes per group of 8 rows and super-block, Q6_K.
const Q6K_GROUP_BYTES: usize = 8 * 210;

/// A Q4_K, Q5_K or Q6_K matrix in the x8 layout (owned memory).
pub struct PackedKx8 {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Copies the `n_runs` 4-byte runs at `src` (one row) to run slots `4r` of `dst` (runs
/// 32 bytes apart): row `r`'s part of the interleaving.
fn scatter_runs(dst: &mut [u8], src: &[u8], r: usize, n_runs: usize) {
    for i in 0..n_runs {
        dst[32 * i + 4 * r..][..4].copy_from_slice(&src[4 * i..4 * i + 4]);
    }
}

impl PackedKx8 {
    /// Repacks `src` (`rows` rows of `cols`) when it is Q4_K, Q5_K or Q6_K in whole groups of 8
    /// rows (`cols` is always whole super-blocks); `None` otherwise.
    pub fn pack(ty: GgmlType, src: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let group_bytes = match ty {
            GgmlType::Q4K => Q4K_GROUP_BYTES,
            GgmlType::Q5K => Q5K_GROUP_BYTES,
            GgmlType::Q6K => Q6K_GROUP_BYTES,
            _ => return None,
        };
        if rows == 0
            || !rows.is_multiple_of(PACK_ROWS)
            || !cols.is_multiple_of(QK_K)
            || src.len() != ty.row_bytes(cols) * rows
        {
            return None;
        }
        let (bb, nsb) = (ty.block_bytes(), cols / QK_K);
        let mut data = vec![0u8; rows / PACK_ROWS * nsb * group_bytes];
        for g in 0..rows / PACK_ROWS {
            for sb in 0..nsb {
                let dst = &mut data[(g * nsb + sb) * group_bytes..][..group_bytes];
                for r in 0..PACK_ROWS {
                    let blk = &src[((g * PACK_ROWS + r) * nsb + sb) * bb..][..bb];
                    if ty != GgmlType::Q6K {
                        dst[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
                        dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                        for s in 0..8 {
                            let (sc, m) = k_scale_min(s, &blk[4..16]);
                            dst[32 + 8 * s + r] = sc;
                            dst[96 + 8 * s + r] = m;
                        }
                        if ty == GgmlType::Q4K {
                            scatter_runs(&mut dst[160..], &blk[16..144], r, 32);
                        } else {
                            scatter_runs(&mut dst[160..], &blk[48..176], r, 32);
                            scatter_runs(&mut dst[160 + 1024..], &blk[16..48], r, 8);
                        }
                    } else {
                        dst[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
                        for q in 0..16 {
                            dst[16 + 8 * q + r] = blk[192 + q];
                        }
                        scatter_runs(&mut dst[144..], &blk[0..128], r, 32);
                        scatter_runs(&mut dst[144 + 1024..], &blk[128..192], r, 16);
                    }
                }
            }
        }
        Some(PackedKx8 {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// (rows, columns).
    pub(super) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// Runs the x8 k-quant kernel over `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_avx2(
    w: &PackedKx8,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    use super::packed::{for_each_tile, run_tiles};
    assert!(acts.s.len() >= acts.n_rows * (w.cols / QK8));
    match w.ty {
        GgmlType::Q4K => run_tiles!(avx2::tile_q4_k, w, rows, acts, out),
        GgmlType::Q5K => run_tiles!(avx2::tile_q5_k, w, rows, acts, out),
        _ => run_tiles!(avx2::tile_q6_k, w, rows, acts, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PackedKx8, PACK_ROWS, Q4K_GROUP_BYTES, Q5K_GROUP_BYTES, Q6K_GROUP_BYTES};
    use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};
    use crate::gguf::quant::QK_K;

    /// The 8 bytes at `p` (one per row), widened to 8 floats.
    ///
    /// # Safety
    /// The CPU must support AVX2; `p` points to 8 readable bytes.
    #[inline(always)]
    pub(super) unsafe fn u8x8_ps(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// Q4_K (`FIVE` false) or Q5_K rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `g` is a row group of `w` and
    /// `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out` (`for_each_tile`
    /// checks these); no other thread may access `out`'s cells in rows `8g..8g + 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_q45_k<const FIVE: bool, const C: usize>(
        w: &PackedKx8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        let k = w.cols;
        let (nb, nsb) = (k / QK8, k / QK_K);
        let group_bytes = if FIVE {
            Q5K_GROUP_BYTES
        } else {
            Q4K_GROUP_BYTES
        };
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let qa = acts.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); C];
        let group = w.data.as_ptr().add(g * nsb * group_bytes);
        for sb in 0..nsb {
            let blk = group.add(sb * group_bytes);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            for s in 0..8 {
                // Sub-block s: the low (s even) or high nibbles of pair s / 2.
                let quants = blk.add(160 + 256 * (s / 2));
                // Q4_K: eight `maddubs` of at most 2·15·127 per i16 lane (30,480 <
                // 32,767) before widening; Q5_K (codes to 31): four.
                let mut p16 = [_mm256_setzero_si256(); C];
                let mut isum = [_mm256_setzero_si256(); C];
                for j in 0..8 {
                    let raw = _mm256_loadu_si256(quants.add(32 * j) as *const __m256i);
                    let mut q = if s % 2 == 0 {
                        _mm256_and_si256(raw, mask)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask)
                    };
                    if FIVE {
                        let qh = _mm256_loadu_si256(blk.add(160 + 1024 + 32 * j) as *const __m256i);
                        q = _mm256_or_si256(q, fifth_bits(qh, s));
                    }
                    for (c, v) in p16.iter_mut().enumerate() {
                        let a = qa.add((t0 + c) * k + sb * QK_K + 32 * s + 4 * j);
                        let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
                        *v = _mm256_add_epi16(*v, _mm256_maddubs_epi16(q, av));
                    }
                    if j == 7 || (FIVE && j == 3) {
                        for (i, v) in isum.iter_mut().zip(p16.iter_mut()) {
                            *i = _mm256_add_epi32(*i, _mm256_madd_epi16(*v, ones));
                            *v = _mm256_setzero_si256();
                        }
                    }
                }
                let scale = _mm256_mul_ps(d, u8x8_ps(blk.add(32 + 8 * s)));
                let min = _mm256_mul_ps(dmin, u8x8_ps(blk.add(96 + 8 * s)));
                for (c, v) in isum.iter().enumerate() {
                    let ti = (t0 + c) * nb + sb * 8 + s;
                    let sums = _mm256_cvtepi32_ps(*v);
                    let sa = _mm256_mul_ps(scale, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                    acc[c] = _mm256_fmadd_ps(sa, sums, acc[c]);
                    acc[c] =
                        _mm256_fnmadd_ps(min, _mm256_set1_ps(*acts.s.get_unchecked(ti)), acc[c]);
                }
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
        }
    }

    /// Bit `s` of each byte of `qh` moved to bit 4 (the rest cleared).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    pub(super) unsafe fn fifth_bits(qh: __m256i, s: usize) -> __m256i {
        // 16-bit shifts carry bits across bytes, but only bit 4 of each byte is kept and
        // that one comes from bit `s` of the same byte.
        let v = match s {
            0 => _mm256_slli_epi16::<4>(qh),
            1 => _mm256_slli_epi16::<3>(qh),
            2 => _mm256_slli_epi16::<2>(qh),
            3 => _mm256_slli_epi16::<1>(qh),
            4 => qh,
            5 => _mm256_srli_epi16::<1>(qh),
            6 => _mm256_srli_epi16::<2>(qh),
            _ => _mm256_srli_epi16::<3>(qh),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(0x10))
    }

    /// Q4_K rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// As [`tile_q45_k`]. Compiled for the features itself: it is called from a closure
    /// (see `packed::avx2::tile`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q4_k<const C: usize>(
        w: &PackedKx8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        tile_q45_k::<false, C>(w, g, t0, acts, out)
    }

    /// Q5_K rows `8g..8g+8` against tokens `t0..t0+C`.
    ///
    /// # Safety
    /// As [`tile_q45_k`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q5_k<const C: usize>(
        w: &PackedKx8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        tile_q45_k::<true, C>(w, g, t0, acts, out)
    }

    /// The 6-bit codes less 32 of quarter `kq` (0..4) of a half, run `j` (0..8), 8 rows.
    ///
    /// # Safety
    /// The CPU must support AVX2; `ql` and `qh` point to the half's runs.
    #[inline(always)]
    pub(super) unsafe fn q6_codes(ql: *const u8, qh: *const u8, kq: usize, j: usize) -> __m256i {
        let mask = _mm256_set1_epi8(0x0F);
        let lo_run = _mm256_loadu_si256(ql.add(32 * (j + 8 * (kq % 2))) as *const __m256i);
        let lo = if kq < 2 {
            _mm256_and_si256(lo_run, mask)
        } else {
            _mm256_and_si256(_mm256_srli_epi16::<4>(lo_run), mask)
        };
        let hr = _mm256_loadu_si256(qh.add(32 * j) as *const __m256i);
        // Bits 2kq..2kq+2 of each qh byte, moved to bits 4..6.
        let hi = match kq {
            0 => _mm256_slli_epi16::<4>(hr),
            1 => _mm256_slli_epi16::<2>(hr),
            2 => hr,
            _ => _mm256_srli_epi16::<2>(hr),
        };
        let hi = _mm256_and_si256(hi, _mm256_set1_epi8(0x30));
        _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32))
    }

    /// The i8 scales of 16-element part `q` of 8 rows as i16 pairs (row `r` in lanes
    /// `2r` and `2r + 1`), to weight `maddubs` outputs with one `madd`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `p` points to 8 readable bytes.
    #[inline(always)]
    unsafe fn scale_pairs(p: *const u8) -> __m256i {
        let x = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
        _mm256_or_si256(
            _mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)),
            _mm256_slli_epi32::<16>(x),
        )
    }

    /// Q6_K rows `8g..8g+8` against tokens `t0..t0+C`. The codes less 32 are signed, so
    /// they go through the sign trick (`|w|` times `a` carrying `w`'s sign).
    ///
    /// # Safety
    /// As [`tile_q4_k`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q6_k<const C: usize>(
        w: &PackedKx8,
        g: usize,
        t0: usize,
        acts: &QuantizedActs,
        out: OutMatrix,
    ) {
        let k = w.cols;
        let (nb, nsb) = (k / QK8, k / QK_K);
        let qa = acts.qs.as_ptr() as *const u8;
        let mut acc = [_mm256_setzero_ps(); C];
        let group = w.data.as_ptr().add(g * nsb * Q6K_GROUP_BYTES);
        for sb in 0..nsb {
            let blk = group.add(sb * Q6K_GROUP_BYTES);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            for blk32 in 0..8 {
                let (h, kq) = (blk32 / 4, blk32 % 4);
                let ql = blk.add(144 + 32 * 16 * h);
                let qh = blk.add(144 + 1024 + 32 * 8 * h);
                for part in 0..2 {
                    // Four `maddubs` of at most 2·32·127 per i16 lane: 32,512 < 32,767.
                    let mut p16 = [_mm256_setzero_si256(); C];
                    for j in 4 * part..4 * part + 4 {
                        let q = q6_codes(ql, qh, kq, j);
                        let aq = _mm256_sign_epi8(q, q);
                        for (c, v) in p16.iter_mut().enumerate() {
                            let a = qa.add((t0 + c) * k + sb * QK_K + 32 * blk32 + 4 * j);
                            let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
                            let p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(av, q));
                            *v = _mm256_add_epi16(*v, p);
                        }
                    }
                    // Each part straight into the float sums: carrying an i32 sum per
                    // token across both parts costs more in spilled registers.
                    let sc = scale_pairs(blk.add(16 + 8 * (8 * h + 2 * kq + part)));
                    for (c, p) in p16.iter().enumerate() {
                        let ti = (t0 + c) * nb + sb * 8 + blk32;
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(*p, sc));
                        acc[c] = _mm256_fmadd_ps(scale, sums, acc[c]);
                    }
                }
            }
        }
        for (c, v) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
        }
    }
}

/// Runs the x8 k-quant kernel with VNNI (`vpdpbusd`) over `rows` (multiples of 8) and
/// every token: the AVX2 tiles' steps with the `maddubs`/`add`/`madd` runs fused (Q6_K's
/// per-16 scales applied to the i32 sums by a multiply), so the integer sums, and the
/// output, are the AVX2 tiles' bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C and the `vnni` encoding; no other thread may
/// access the cells of `out` in `rows` meanwhile.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm_vnni(
    vnni: super::Vnni,
    w: &PackedKx8,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    assert!(acts.s.len() >= acts.n_rows * (w.cols / QK8));
    match vnni {
        super::Vnni::Avx512 => evex::gemm(w, rows, acts, out),
        super::Vnni::Avx => vex::gemm(w, rows, acts, out),
    }
}

/// Defines module `$m` with the k-quant VNNI tiles compiled for `$features`, using `$dp`.
#[cfg(target_arch = "x86_64")]
macro_rules! k_vnni_tiles {
    ($m:ident, $features:literal, $dp:ident) => {
        mod $m {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::super::packed::{for_each_tile, run_tiles};
            use super::avx2::{fifth_bits, q6_codes, u8x8_ps};
            use super::{PackedKx8, PACK_ROWS, Q4K_GROUP_BYTES, Q5K_GROUP_BYTES, Q6K_GROUP_BYTES};
            use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};
            use crate::gguf::quant::{GgmlType, QK_K};

            /// The VNNI k-quant kernel over `rows` (multiples of 8) and every token.
            ///
            /// # Safety
            /// The CPU must support `$features`; no other thread may access the cells of
            /// `out` in `rows` meanwhile.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm(
                w: &PackedKx8,
                rows: Range<usize>,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                match w.ty {
                    GgmlType::Q4K => run_tiles!(tile_q4_k, w, rows, acts, out),
                    GgmlType::Q5K => run_tiles!(tile_q5_k, w, rows, acts, out),
                    _ => run_tiles!(tile_q6_k, w, rows, acts, out),
                }
            }

            /// Q4_K (`FIVE` false) or Q5_K rows `8g..8g+8` against tokens `t0..t0+C`.
            ///
            /// # Safety
            /// As `avx2::tile_q45_k`, with this module's features.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q45_k<const FIVE: bool, const C: usize>(
                w: &PackedKx8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                let k = w.cols;
                let (nb, nsb) = (k / QK8, k / QK_K);
                let group_bytes = if FIVE {
                    Q5K_GROUP_BYTES
                } else {
                    Q4K_GROUP_BYTES
                };
                let mask = _mm256_set1_epi8(0x0F);
                let qa = acts.qs.as_ptr() as *const u8;
                let mut acc = [_mm256_setzero_ps(); C];
                let group = w.data.as_ptr().add(g * nsb * group_bytes);
                for sb in 0..nsb {
                    let blk = group.add(sb * group_bytes);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                    for s in 0..8 {
                        let quants = blk.add(160 + 256 * (s / 2));
                        let mut isum = [_mm256_setzero_si256(); C];
                        for j in 0..8 {
                            let raw = _mm256_loadu_si256(quants.add(32 * j) as *const __m256i);
                            let mut q = if s % 2 == 0 {
                                _mm256_and_si256(raw, mask)
                            } else {
                                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask)
                            };
                            if FIVE {
                                let at = blk.add(160 + 1024 + 32 * j);
                                let qh = _mm256_loadu_si256(at as *const __m256i);
                                q = _mm256_or_si256(q, fifth_bits(qh, s));
                            }
                            for (c, v) in isum.iter_mut().enumerate() {
                                let a = qa.add((t0 + c) * k + sb * QK_K + 32 * s + 4 * j);
                                let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
                                *v = $dp(*v, q, av);
                            }
                        }
                        let scale = _mm256_mul_ps(d, u8x8_ps(blk.add(32 + 8 * s)));
                        let min = _mm256_mul_ps(dmin, u8x8_ps(blk.add(96 + 8 * s)));
                        for (c, v) in isum.iter().enumerate() {
                            let ti = (t0 + c) * nb + sb * 8 + s;
                            let sums = _mm256_cvtepi32_ps(*v);
                            let da = _mm256_set1_ps(*acts.d.get_unchecked(ti));
                            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(scale, da), sums, acc[c]);
                            let sa = _mm256_set1_ps(*acts.s.get_unchecked(ti));
                            acc[c] = _mm256_fnmadd_ps(min, sa, acc[c]);
                        }
                    }
                }
                for (c, v) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
                }
            }

            /// Q4_K rows `8g..8g+8` against tokens `t0..t0+C`.
            ///
            /// # Safety
            /// As [`tile_q45_k`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q4_k<const C: usize>(
                w: &PackedKx8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                tile_q45_k::<false, C>(w, g, t0, acts, out)
            }

            /// Q5_K rows `8g..8g+8` against tokens `t0..t0+C`.
            ///
            /// # Safety
            /// As [`tile_q45_k`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q5_k<const C: usize>(
                w: &PackedKx8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                tile_q45_k::<true, C>(w, g, t0, acts, out)
            }

            /// Q6_K rows `8g..8g+8` against tokens `t0..t0+C`, with the sign trick.
            ///
            /// # Safety
            /// As `avx2::tile_q6_k`, with this module's features.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q6_k<const C: usize>(
                w: &PackedKx8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                let k = w.cols;
                let (nb, nsb) = (k / QK8, k / QK_K);
                let qa = acts.qs.as_ptr() as *const u8;
                let mut acc = [_mm256_setzero_ps(); C];
                let group = w.data.as_ptr().add(g * nsb * Q6K_GROUP_BYTES);
                for sb in 0..nsb {
                    let blk = group.add(sb * Q6K_GROUP_BYTES);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    for blk32 in 0..8 {
                        let (h, kq) = (blk32 / 4, blk32 % 4);
                        let ql = blk.add(144 + 32 * 16 * h);
                        let qh = blk.add(144 + 1024 + 32 * 8 * h);
                        for part in 0..2 {
                            let mut isum = [_mm256_setzero_si256(); C];
                            for j in 4 * part..4 * part + 4 {
                                let q = q6_codes(ql, qh, kq, j);
                                let aq = _mm256_sign_epi8(q, q);
                                for (c, v) in isum.iter_mut().enumerate() {
                                    let a = qa.add((t0 + c) * k + sb * QK_K + 32 * blk32 + 4 * j);
                                    let av = _mm256_set1_epi32((a as *const i32).read_unaligned());
                                    *v = $dp(*v, aq, _mm256_sign_epi8(av, q));
                                }
                            }
                            let at = blk.add(16 + 8 * (8 * h + 2 * kq + part));
                            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(at as *const __m128i));
                            for (c, v) in isum.iter().enumerate() {
                                let ti = (t0 + c) * nb + sb * 8 + blk32;
                                let da = _mm256_set1_ps(*acts.d.get_unchecked(ti));
                                let sums = _mm256_cvtepi32_ps(_mm256_mullo_epi32(*v, sc));
                                acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, da), sums, acc[c]);
                            }
                        }
                    }
                }
                for (c, v) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
k_vnni_tiles!(
    evex,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);
#[cfg(target_arch = "x86_64")]
k_vnni_tiles!(vex, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32);
