//! The attention tile's inner loops with 512-bit vectors, bit-identical to the AVX2 ones.
//!
//! Accumulating V is element-wise, so any vector width gives the same numbers: 16 lanes
//! halve its instructions. A score is a dot product whose rounding depends on its
//! 8-lane order (`avx2::dot`), so here each 512-bit register holds two cache rows side
//! by side, each in `dot`'s 8 lanes: the K rows of a block are widened from f16 into
//! that pair-interleaved layout once per tile, and every query of the tile then does
//! half the FMAs. The lanes are summed with `avx2::reduce8`, exactly as before.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::avx2::{fold_scores, reduce8, RUN};
use super::OnlineSoftmax;

/// Whether these kernels run here: the AVX2 set is in use, the CPU has AVX-512 F, DQ and
/// VL, and `SLUICE_NO_AVX512` is not set (detected once).
pub(super) fn detected() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| super::avx512_allowed() && cpu_has())
}

/// Whether the CPU can run these kernels, whatever the environment asks (for tests).
pub(super) fn cpu_has() -> bool {
    super::detected() == super::KernelSet::Avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
}

/// Widens `n <= RUN` rows of K (f16 bits, row `i` at `src[i * stride..][..hd]`) into the
/// pair-interleaved layout [`attend_block`] reads: rows `2p` and `2p + 1` share the
/// `2 * hd` floats at `2 * p * hd`, where their 8-float chunks `x` sit side by side at
/// `16 * x` (row `2p` first).
///
/// # Safety
/// The CPU must support AVX-512F (see [`detected`]). `hd` is a multiple of 8, `dst`
/// holds `RUN * hd` floats and `src` `n` rows at `stride` (checked).
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn widen_k_pairs(
    dst: &mut [f32],
    src: &[u16],
    stride: usize,
    n: usize,
    hd: usize,
) {
    assert!(hd.is_multiple_of(8) && n <= RUN && dst.len() >= RUN * hd);
    assert!(super::rows_fit(src.len(), n, stride, hd));
    for i in 0..n {
        let (row, at) = (src.as_ptr().add(i * stride), (i / 2) * 2 * hd + (i % 2) * 8);
        for x in 0..hd / 8 {
            let h = _mm_loadu_si128(row.add(8 * x) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(at + 16 * x), _mm256_cvtph_ps(h));
        }
    }
}

/// Folds cache rows `0..n` (`n <= RUN`) of one block into the online-softmax attention
/// of `Q` queries, exactly as `kernels::attend` does for each: `q` holds the queries
/// (`8 * NV` floats each, back to back), `state` and `out` theirs likewise; `kp` is K in
/// [`widen_k_pairs`]'s layout (`RUN` rows' room: all are read, rows past `n` ignored),
/// `v` holds V rows of `8 * NV` floats back to back. `NV = 2 * NZ` (the 8- and 16-lane
/// vectors per row). Several queries at once keep independent FMA chains in flight: one
/// query's V accumulation is a chain per register, bound by the FMA latency.
///
/// # Safety
/// The CPU must support AVX-512 F, DQ and VL, AVX2, FMA and F16C (see [`detected`]).
/// Lengths are checked.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn attend_block<const NV: usize, const NZ: usize, const Q: usize>(
    q: &[f32],
    kp: &[f32],
    v: &[f32],
    n: usize,
    scale_by: f32,
    round: bool,
    state: &mut [OnlineSoftmax],
    out: &mut [f32],
) {
    let hd = 8 * NV;
    assert!(NV == 2 * NZ && (1..=RUN).contains(&n));
    assert!(q.len() == Q * hd && out.len() == Q * hd && state.len() == Q);
    assert!(kp.len() >= RUN * hd && v.len() >= n * hd);
    let sc = _mm256_set1_ps(scale_by);
    let mut scores = [[0f32; RUN]; Q];
    for (i, scores) in scores.iter_mut().enumerate() {
        // The query's chunks, each in both halves of a register. (Loops, not closures,
        // here and below: a closure does not inherit the target features, so the
        // intrinsics in it would be calls.)
        let mut qd = [_mm512_setzero_ps(); NV];
        for (x, d) in qd.iter_mut().enumerate() {
            let h = _mm256_loadu_ps(q.as_ptr().add(i * hd + 8 * x));
            *d = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(h), h);
        }
        // All 16 rows: eight independent chains, even when fewer rows count.
        let [a, b] = scores_of::<NV, 8, 2>(&qd, kp.as_ptr());
        _mm256_storeu_ps(scores.as_mut_ptr(), _mm256_mul_ps(a, sc));
        _mm256_storeu_ps(scores.as_mut_ptr().add(8), _mm256_mul_ps(b, sc));
    }
    let mut rescale = [[None; RUN]; Q];
    let mut weight = [[0f32; RUN]; Q];
    let rescales = fold_scores::<Q>(
        &scores,
        n,
        state,
        &mut rescale,
        &mut weight,
        super::expf::exp_many_wide,
    );
    match (round, rescales) {
        (true, true) => accumulate::<NZ, Q, true, true>(v, n, hd, &rescale, &weight, out),
        (true, false) => accumulate::<NZ, Q, true, false>(v, n, hd, &rescale, &weight, out),
        (false, true) => accumulate::<NZ, Q, false, true>(v, n, hd, &rescale, &weight, out),
        (false, false) => accumulate::<NZ, Q, false, false>(v, n, hd, &rescale, &weight, out),
    }
}

/// Scores (unscaled) of the first `8 * G` rows of `kp` (`P = 4 * G` row pairs): per row,
/// `avx2::dot`'s lanes and operations, two rows per register.
///
/// # Safety
/// As [`attend_block`]; `kp` holds `2 * P` rows in the pair layout.
#[inline(always)]
unsafe fn scores_of<const NV: usize, const P: usize, const G: usize>(
    qd: &[__m512; NV],
    kp: *const f32,
) -> [__m256; G] {
    let mut acc = [_mm512_setzero_ps(); P];
    for (x, q) in qd.iter().enumerate() {
        for (p, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(*q, _mm512_loadu_ps(kp.add(p * 16 * NV + 16 * x)), *a);
        }
    }
    let mut sums = [_mm256_setzero_ps(); G];
    for (g, s) in sums.iter_mut().enumerate() {
        let mut rows = [_mm256_setzero_ps(); 8];
        for (i, pair) in rows.chunks_exact_mut(2).enumerate() {
            let a = acc[4 * g + i];
            pair[0] = _mm512_castps512_ps256(a);
            pair[1] = _mm512_extractf32x8_ps::<1>(a);
        }
        *s = reduce8(&rows);
    }
    sums
}

/// Each lane rounded to f16 precision (nearest even), kept as f32.
///
/// # Safety
/// The CPU must support AVX-512F.
#[inline(always)]
unsafe fn round_f16x16(v: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
}

/// For each query, `out = out * rescale + v_j * weight`, row after row, in `NZ`
/// registers of 16 lanes: the AVX2 accumulation's element-wise operations (rounded to
/// f16 after each when `ROUND`). Without `RESCALES` no row rescales (`rescale` is all
/// `None`), so the checks are left out.
///
/// # Safety
/// As [`attend_block`]: `out` holds `Q` outputs of `16 * NZ == hd` floats and `v` `n`
/// rows of `hd`.
#[inline(always)]
unsafe fn accumulate<const NZ: usize, const Q: usize, const ROUND: bool, const RESCALES: bool>(
    v: &[f32],
    n: usize,
    hd: usize,
    rescale: &[[Option<f32>; RUN]; Q],
    weight: &[[f32; RUN]; Q],
    out: &mut [f32],
) {
    let op = out.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); NZ]; Q];
    for (i, qa) in acc.iter_mut().enumerate() {
        for (z, a) in qa.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(op.add(i * hd + 16 * z));
        }
    }
    for j in 0..n {
        let vp = v.as_ptr().add(j * hd);
        let mut vz = [_mm512_setzero_ps(); NZ];
        for (z, x) in vz.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(vp.add(16 * z));
        }
        for (i, qa) in acc.iter_mut().enumerate() {
            if let (true, Some(ms)) = (RESCALES, rescale[i][j]) {
                let s = _mm512_set1_ps(ms);
                for a in qa.iter_mut() {
                    let o = _mm512_mul_ps(*a, s);
                    *a = if ROUND { round_f16x16(o) } else { o };
                }
            }
            let w = _mm512_set1_ps(weight[i][j]);
            for (a, x) in qa.iter_mut().zip(&vz) {
                let o = _mm512_fmadd_ps(*x, w, *a);
                *a = if ROUND { round_f16x16(o) } else { o };
            }
        }
    }
    for (i, qa) in acc.iter().enumerate() {
        for (z, a) in qa.iter().enumerate() {
            _mm512_storeu_ps(op.add(i * hd + 16 * z), *a);
        }
    }
}
