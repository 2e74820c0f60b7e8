//! AVX2 + FMA + F16C kernels for Q4_0, Q4_1 and Q8_0 weights.
//!
//! Work is tiled as R weight rows × C activation rows: each weight block is loaded and
//! unpacked once and multiplied with every activation row of the tile, so a batch of
//! tokens costs far less than one pass over the weights per token.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::{OutMatrix, QuantizedActs, QK8};
use crate::quant::GgmlType;

/// How one weight format unpacks a block of 32 into bytes.
trait Block {
    const BYTES: usize;
    /// The weights are signed (use the sign trick for `maddubs`) rather than 0..15.
    const SIGNED: bool;
    /// Q4_1 carries a per-block offset `m` multiplied by the activations' sum.
    const HAS_MIN: bool;
    /// Unpacks the 32 weights (element j in byte j) and returns (quants, d, m).
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
}

#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

struct Q4_0;
impl Block for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, _) = f16_pair(p);
        (
            _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
            d,
            0.0,
        )
    }
}

struct Q4_1;
impl Block for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16_pair(p);
        (nibbles(p.add(4)), d, m)
    }
}

struct Q8_0;
impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, _) = f16_pair(p);
        (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0)
    }
}

/// Eight i32 partial sums of w·a as floats.
#[inline(always)]
unsafe fn mul_sum<B: Block>(w: __m256i, a: __m256i) -> __m256 {
    let p16 = if B::SIGNED {
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
    } else {
        _mm256_maddubs_epi16(w, a)
    };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One R×C tile: rows `r0..r0+R` of the weights, tokens `t0..t0+C`.
#[inline(always)]
unsafe fn tile<B: Block, const R: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    acts: &QuantizedActs,
    r0: usize,
    t0: usize,
    out: OutMatrix,
) {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut mins = [[0f32; C]; R];
    let qa = acts.qs.as_ptr();
    let k = nb * QK8;
    for b in 0..nb {
        let mut wq = [_mm256_setzero_si256(); R];
        let mut wd = [0f32; R];
        let mut wm = [0f32; R];
        if t0 == 0 {
            // Fetch the next row group with the non-temporal hint: these weights are used
            // once per step, and without the hint streaming them (the LM head is a third of
            // the model's bytes) evicts the layer weights that otherwise stay in L3.
            // Measured on a 32 MiB-L3 EPYC: single-stream decode 204 → 290 tok/s.
            // A hint never faults, so reading past the last row is harmless.
            for r in 0..R {
                let ahead = w.wrapping_add((r0 + R + r) * row_bytes + b * B::BYTES);
                _mm_prefetch::<_MM_HINT_NTA>(ahead as *const i8);
            }
        }
        for r in 0..R {
            let (q, d, m) = B::load(w.add((r0 + r) * row_bytes + b * B::BYTES));
            wq[r] = q;
            wd[r] = d;
            wm[r] = m;
        }
        for c in 0..C {
            let t = t0 + c;
            let a = _mm256_loadu_si256(qa.add(t * k + b * QK8) as *const __m256i);
            let da = *acts.d.get_unchecked(t * nb + b);
            for r in 0..R {
                let p = mul_sum::<B>(wq[r], a);
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(wd[r] * da), p, acc[r][c]);
                if B::HAS_MIN {
                    mins[r][c] += wm[r] * *acts.s.get_unchecked(t * nb + b);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out.set(t0 + c, r0 + r, hsum(acc[r][c]) + mins[r][c]);
        }
    }
}

/// Runs tiles over `rows` × all tokens, with smaller tiles on the remainders.
#[inline(always)]
unsafe fn gemm_typed<B: Block>(
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    let nb = k / QK8;
    let row_bytes = nb * B::BYTES;
    assert!(w.len() >= rows.end * row_bytes);
    assert!(acts.qs.len() >= acts.n_rows * k && acts.row_len == k);
    let wp = w.as_ptr();
    let n_tok = acts.n_rows;
    let mut r = rows.start;
    while r + 4 <= rows.end {
        let mut t = 0;
        while t + 3 <= n_tok {
            tile::<B, 4, 3>(wp, row_bytes, nb, acts, r, t, out);
            t += 3;
        }
        while t < n_tok {
            tile::<B, 4, 1>(wp, row_bytes, nb, acts, r, t, out);
            t += 1;
        }
        r += 4;
    }
    while r < rows.end {
        let mut t = 0;
        while t + 4 <= n_tok {
            tile::<B, 1, 4>(wp, row_bytes, nb, acts, r, t, out);
            t += 4;
        }
        while t < n_tok {
            tile::<B, 1, 1>(wp, row_bytes, nb, acts, r, t, out);
            t += 1;
        }
        r += 1;
    }
}

/// Entry point for the AVX2 kernels.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    match ty {
        GgmlType::Q4_0 => gemm_typed::<Q4_0>(w, k, rows, acts, out),
        GgmlType::Q4_1 => gemm_typed::<Q4_1>(w, k, rows, acts, out),
        GgmlType::Q8_0 => gemm_typed::<Q8_0>(w, k, rows, acts, out),
        other => unreachable!("no AVX2 kernel for {}", other.name()),
    }
}

#[inline(always)]
unsafe fn round_f16x8(v: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
}

/// Float dot product (lengths a multiple of 8).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    debug_assert_eq!(n % 8, 0);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    hsum(acc)
}

/// Fused online-softmax attention over `n` cache rows (see `kernels::attend`): the same
/// operations, in the same order and rounding, as `dot`, `scale` and `axpy` one row at a
/// time, but scheduled for the CPU. For each run of up to 16 rows the scores come first,
/// then the softmax coefficients (the `exp` calls no longer wait on the accumulator),
/// then the accumulation, with the output held in registers for the common head sizes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q.len()` is a multiple of 8 and the slices
/// hold `n` rows at `stride`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    scale_by: f32,
    round: bool,
    state: &mut super::OnlineSoftmax,
    out: &mut [f32],
) {
    match q.len() {
        64 => attend_in_registers::<8>(q, k, v, stride, n, scale_by, round, state, out),
        128 => attend_in_registers::<16>(q, k, v, stride, n, scale_by, round, state, out),
        _ => attend_rows(q, k, v, stride, n, scale_by, round, state, out),
    }
}

const RUN: usize = 16;

/// Scores and softmax coefficients of rows `i..i + m`: for each row, the factor the
/// accumulator is rescaled by (`None` when the maximum did not move) and the row's weight.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn coefficients(
    q: &[f32],
    k: &[f32],
    stride: usize,
    i: usize,
    m: usize,
    scale_by: f32,
    state: &mut super::OnlineSoftmax,
    rescale: &mut [Option<f32>; RUN],
    weight: &mut [f32; RUN],
) {
    let hd = q.len();
    let mut scores = [0f32; RUN];
    for (j, sc) in scores.iter_mut().enumerate().take(m) {
        let r = (i + j) * stride;
        *sc = dot(q, &k[r..r + hd]) * scale_by;
    }
    // The running maximum decides each row's `exp` argument; the `exp`s then run four at
    // a time (bit-identical to one libm call each), and the sum is folded in row order.
    let mut args = [0f32; RUN];
    let mut raised = [false; RUN];
    for j in 0..m {
        let sc = scores[j];
        if sc > state.max {
            args[j] = state.max - sc;
            raised[j] = true;
            state.max = sc;
        } else {
            args[j] = sc - state.max;
            raised[j] = false;
        }
    }
    let mut e = [0f32; RUN];
    super::exp_many(&args[..m], &mut e[..m]);
    for j in 0..m {
        if raised[j] {
            rescale[j] = Some(e[j]);
            weight[j] = 1.0;
            state.sum = state.sum * e[j] + 1.0;
        } else {
            rescale[j] = None;
            weight[j] = e[j];
            state.sum = state.sum * 1.0 + e[j];
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn attend_in_registers<const NV: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    scale_by: f32,
    round: bool,
    state: &mut super::OnlineSoftmax,
    out: &mut [f32],
) {
    let op = out.as_mut_ptr();
    let mut acc: [__m256; NV] = std::array::from_fn(|x| _mm256_loadu_ps(op.add(8 * x)));
    let mut rescale = [None; RUN];
    let mut weight = [0f32; RUN];
    let mut i = 0;
    while i < n {
        let m = (n - i).min(RUN);
        coefficients(
            q,
            k,
            stride,
            i,
            m,
            scale_by,
            state,
            &mut rescale,
            &mut weight,
        );
        for j in 0..m {
            if let Some(ms) = rescale[j] {
                let s = _mm256_set1_ps(ms);
                for a in acc.iter_mut() {
                    let o = _mm256_mul_ps(*a, s);
                    *a = if round { round_f16x8(o) } else { o };
                }
            }
            let w = _mm256_set1_ps(weight[j]);
            let vp = v.as_ptr().add((i + j) * stride);
            for (x, a) in acc.iter_mut().enumerate() {
                let o = _mm256_fmadd_ps(_mm256_loadu_ps(vp.add(8 * x)), w, *a);
                *a = if round { round_f16x8(o) } else { o };
            }
        }
        i += m;
    }
    for (x, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(op.add(8 * x), *a);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn attend_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    scale_by: f32,
    round: bool,
    state: &mut super::OnlineSoftmax,
    out: &mut [f32],
) {
    let hd = q.len();
    let mut rescale = [None; RUN];
    let mut weight = [0f32; RUN];
    let mut i = 0;
    while i < n {
        let m = (n - i).min(RUN);
        coefficients(
            q,
            k,
            stride,
            i,
            m,
            scale_by,
            state,
            &mut rescale,
            &mut weight,
        );
        for j in 0..m {
            if let Some(ms) = rescale[j] {
                scale(out, ms, round);
            }
            let r = (i + j) * stride;
            axpy(out, &v[r..r + hd], weight[j], round);
        }
        i += m;
    }
}

/// `out = x * s + out`, optionally rounded to f16 precision after each update.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(out: &mut [f32], x: &[f32], s: f32, round: bool) {
    let n = out.len().min(x.len());
    debug_assert_eq!(n % 8, 0);
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        let o = _mm256_fmadd_ps(
            _mm256_loadu_ps(x.as_ptr().add(i)),
            sv,
            _mm256_loadu_ps(out.as_ptr().add(i)),
        );
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            if round { round_f16x8(o) } else { o },
        );
        i += 8;
    }
}

/// `out *= s`, optionally rounded to f16 precision.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale(out: &mut [f32], s: f32, round: bool) {
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= out.len() {
        let o = _mm256_mul_ps(_mm256_loadu_ps(out.as_ptr().add(i)), sv);
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            if round { round_f16x8(o) } else { o },
        );
        i += 8;
    }
}

/// `dst[i] = src[i]` rounded to f16 precision, 8 at a time; returns how many it did.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn round_f16(dst: &mut [f32], src: &[f32]) -> usize {
    let n = dst.len().min(src.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        let v = round_f16x8(_mm256_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
    }
    n
}

/// Quantizes one block of 32 floats to i8 with scale 127/amax (ties to even); returns
/// (amax, sum of the quants).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(x.len() >= 32 && q.len() >= 32);
    let sign = _mm256_set1_ps(-0.0);
    let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(8 * j)));
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vj in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vj));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let i: [__m256i; 4] = std::array::from_fn(|j| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v[j], id)))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let s4 = _mm_hadd_epi32(s4, s4);
    let s4 = _mm_hadd_epi32(s4, s4);
    // Pack 32-bit → 16-bit → 8-bit, then undo the lane interleaving of the packs.
    let p16a = _mm256_packs_epi32(i[0], i[1]);
    let p16b = _mm256_packs_epi32(i[2], i[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p8);
    (amax, _mm_cvtsi128_si32(s4))
}
