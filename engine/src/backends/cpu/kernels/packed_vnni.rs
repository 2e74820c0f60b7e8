//! The x8 GEMM tiles of `packed.rs` on CPUs with VNNI (`vpdpbusd`).
//!
//! One `vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes per 32-bit lane and adds
//! the four products to the lane: the `maddubs` + `add` (+ the later `madd` widening) of
//! the AVX2 tiles in one instruction, so the integer work of prefill and batched decode
//! takes about half the instructions. The integer sums are the same exact numbers as the
//! AVX2 tiles' (neither can overflow), and the float steps after them are unchanged, so
//! the output is bit-identical and greedy text does not depend on which tiles ran.
//!
//! Two encodings exist: AVX-512 VNNI with AVX-512 VL (EVEX, e.g. Ice Lake, Zen 4) and
//! AVX-VNNI (VEX, e.g. Alder Lake). The same tiles are compiled once for each.

#![cfg(target_arch = "x86_64")]

use std::ops::Range;
use std::sync::OnceLock;

use super::packed::{for_each_tile, PackedMatrix};
use super::{OutMatrix, QuantizedActs};

/// Which VNNI encoding this CPU has, if any (detected once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vnni {
    Avx512,
    Avx,
}

/// The VNNI encoding the packed kernels use here; `None` when the CPU has neither or
/// `SLUICE_NO_VNNI` is set (to compare against the AVX2 tiles); without AVX-512 allowed
/// (`kernels::avx512_allowed`) only AVX-VNNI is considered.
pub fn detected_vnni() -> Option<Vnni> {
    static VNNI: OnceLock<Option<Vnni>> = OnceLock::new();
    *VNNI.get_or_init(|| {
        if std::env::var_os("SLUICE_NO_VNNI").is_some() {
            return None;
        }
        let avx512 = super::avx512_allowed();
        if avx512 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
        {
            Some(Vnni::Avx512)
        } else if is_x86_feature_detected!("avxvnni") {
            Some(Vnni::Avx)
        } else {
            None
        }
    })
}

/// Runs the VNNI x8 kernel of `w` over `rows` (multiples of 8) and every token.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C and the `vnni` encoding.
pub(super) unsafe fn gemm_packed_vnni(
    vnni: Vnni,
    w: &PackedMatrix,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    match w {
        PackedMatrix::Q5(p) => super::packed_q5::gemm_vnni(vnni, p, rows, acts, out),
        PackedMatrix::K(p) => super::packed_k::gemm_vnni(vnni, p, rows, acts, out),
        _ => match vnni {
            Vnni::Avx512 => evex::gemm(w, rows, acts, out),
            Vnni::Avx => vex::gemm(w, rows, acts, out),
        },
    }
}

/// Defines module `$m` with the tiles compiled for `$features`, multiplying with `$dp`.
macro_rules! vnni_tiles {
    ($m:ident, $features:literal, $dp:ident) => {
        mod $m {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::super::packed::run_tiles;
            use super::super::packed::{
                PackedQ4_1x8, PackedQ8_0x8, GROUP_BLOCK_BYTES, PACK_ROWS, Q8_GROUP_BLOCK_BYTES,
            };
            use super::{for_each_tile, PackedMatrix};
            use crate::backends::cpu::kernels::{OutMatrix, QuantizedActs, QK8};

            /// The VNNI x8 kernel of `w` over `rows` (multiples of 8) and every token.
            ///
            /// # Safety
            /// The CPU must support `$features`; no other thread may access the cells of
            /// `out` in `rows` meanwhile.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm(
                w: &PackedMatrix,
                rows: Range<usize>,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                match w {
                    PackedMatrix::Q4_1(p) => run_tiles!(tile_q4_1, p, rows, acts, out),
                    PackedMatrix::Q8_0(p) => run_tiles!(tile_q8_0, p, rows, acts, out),
                    // Dispatched to their own VNNI tiles above.
                    PackedMatrix::Q5(_) | PackedMatrix::K(_) => {
                        unreachable!("Q5 and k-quant tiles live beside their AVX2 ones")
                    }
                }
            }

            /// Q4_1 rows `8g..8g+8` against tokens `t0..t0+C` (the AVX2 tile's float
            /// steps, with each `maddubs`/`add` pair fused into one `vpdpbusd`).
            ///
            /// # Safety
            /// The CPU must support this module's features; `g` is a row group of `w`
            /// and `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out`
            /// (`for_each_tile` checks these); no other thread may access `out`'s cells
            /// in rows `8g..8g + 8`. Compiled for the features itself (not
            /// `inline(always)`): it is called from a closure, which does not inherit
            /// them (see `packed::avx2::tile`).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q4_1<const C: usize>(
                w: &PackedQ4_1x8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                let k = w.shape().1;
                let nb = k / QK8;
                let mask = _mm256_set1_epi8(0x0F);
                let qa = acts.qs.as_ptr() as *const u8;
                let mut acc = [_mm256_setzero_ps(); C];
                let group = w.bytes().as_ptr().add(g * nb * GROUP_BLOCK_BYTES);
                for b in 0..nb {
                    let blk = group.add(b * GROUP_BLOCK_BYTES);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                    let mut isum = [_mm256_setzero_si256(); C];
                    for j in 0..4 {
                        let raw = _mm256_loadu_si256(blk.add(32 + 32 * j) as *const __m256i);
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
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
                        let sums = _mm256_cvtepi32_ps(isum[c]);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*acts.d.get_unchecked(ti)));
                        acc[c] = _mm256_fmadd_ps(scale, sums, acc[c]);
                        acc[c] =
                            _mm256_fmadd_ps(m, _mm256_set1_ps(*acts.s.get_unchecked(ti)), acc[c]);
                    }
                }
                for (c, v) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.cells(t0 + c, g * PACK_ROWS, PACK_ROWS), *v);
                }
            }

            /// Q8_0 rows `8g..8g+8` against tokens `t0..t0+C`, with the AVX2 tile's sign
            /// trick (`|w|` unsigned times `a` carrying `w`'s sign).
            ///
            /// # Safety
            /// The CPU must support this module's features; `g` is a row group of `w`
            /// and `t0..t0 + C` tokens of `acts`, whose shape matches `w` and `out`
            /// (`for_each_tile` checks these); no other thread may access `out`'s cells
            /// in rows `8g..8g + 8`. Compiled for the features itself, as `tile_q4_1`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q8_0<const C: usize>(
                w: &PackedQ8_0x8,
                g: usize,
                t0: usize,
                acts: &QuantizedActs,
                out: OutMatrix,
            ) {
                let k = w.shape().1;
                let nb = k / QK8;
                let qa = acts.qs.as_ptr() as *const u8;
                let mut acc = [_mm256_setzero_ps(); C];
                let group = w.bytes().as_ptr().add(g * nb * Q8_GROUP_BLOCK_BYTES);
                let next_group = group.wrapping_add(nb * Q8_GROUP_BLOCK_BYTES);
                for b in 0..nb {
                    let blk = group.add(b * Q8_GROUP_BLOCK_BYTES);
                    if t0 == 0 {
                        // As in the AVX2 tile: stream the LM head past the caches.
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
                            *s = $dp(*s, aq, _mm256_sign_epi8(av, q));
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
    };
}

vnni_tiles!(
    evex,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);
vnni_tiles!(vex, "avx2,fma,f16c,avxvnni", _mm256_dpbusd_avx_epi32);

/// Every VNNI encoding this CPU supports, whatever the environment asks (for tests).
#[cfg(test)]
pub(super) fn encodings_on_this_cpu() -> Vec<Vnni> {
    let mut v = Vec::new();
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        v.push(Vnni::Avx512);
    }
    if is_x86_feature_detected!("avxvnni") {
        v.push(Vnni::Avx);
    }
    v
}
