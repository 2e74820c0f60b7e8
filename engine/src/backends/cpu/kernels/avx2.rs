//! AVX2 + FMA + F16C kernels for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights.
//!
//! Work is tiled as R weight rows × C activation rows: each weight block is loaded and
//! unpacked once and multiplied with every activation row of the tile, so a batch of
//! tokens costs far less than one pass over the weights per token.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::{OutMatrix, QuantizedActs, QK8};
use crate::gguf::quant::GgmlType;

/// How one weight format unpacks a block of 32 into bytes.
trait Block {
    const BYTES: usize;
    /// The weights are signed (use the sign trick for `maddubs`) rather than 0..15.
    const SIGNED: bool;
    /// Q4_1 carries a per-block offset `m` multiplied by the activations' sum.
    const HAS_MIN: bool;
    /// Unpacks the 32 weights (element j in byte j) and returns (quants, d, m).
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C, and `p` must point to `BYTES` readable bytes.
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
}

/// The two f16 values at `p`, as f32.
///
/// # Safety
/// The CPU must support F16C, and `p` must point to 4 readable bytes.
#[inline(always)]
pub(super) unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// The 16 bytes at `p` split into their low nibbles (bytes 0..16) and high nibbles
/// (bytes 16..32).
///
/// # Safety
/// The CPU must support AVX2, and `p` must point to 16 readable bytes.
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
    /// # Safety
    /// As [`Block::load`].
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
    /// # Safety
    /// As [`Block::load`].
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16_pair(p);
        (nibbles(p.add(4)), d, m)
    }
}

/// Byte j is 0xFF where bit j of `bits` is set, else 0 (as ggml's `bytes_from_bits_32`).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn bit_bytes(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    // Byte j takes byte j / 8 of `bits` (each 128-bit half sees all four).
    let spread = _mm256_shuffle_epi8(
        v,
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

struct Q5_0;
impl Block for Q5_0 {
    const BYTES: usize = 22;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    /// # Safety
    /// As [`Block::load`].
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, _) = f16_pair(p);
        let qh = (p.add(2) as *const u32).read_unaligned();
        // q - 16 as a signed byte: the nibble where the fifth bit is set, else the
        // nibble with 0xF0 added (two's complement of nibble - 16).
        let high = _mm256_andnot_si256(bit_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
        (_mm256_or_si256(nibbles(p.add(6)), high), d, 0.0)
    }
}

struct Q5_1;
impl Block for Q5_1 {
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    const HAS_MIN: bool = true;
    /// # Safety
    /// As [`Block::load`].
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16_pair(p);
        let qh = (p.add(4) as *const u32).read_unaligned();
        let high = _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10));
        (_mm256_or_si256(nibbles(p.add(8)), high), d, m)
    }
}

struct Q8_0;
impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const HAS_MIN: bool = false;
    /// # Safety
    /// As [`Block::load`].
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, _) = f16_pair(p);
        (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0)
    }
}

/// Eight i32 partial sums of w·a as floats.
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
unsafe fn mul_sum<B: Block>(w: __m256i, a: __m256i) -> __m256 {
    let p16 = if B::SIGNED {
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
    } else {
        _mm256_maddubs_epi16(w, a)
    };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// The sum of the eight lanes, in a fixed order (the attention kernels depend on it).
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One R×C tile: rows `r0..r0+R` of the weights, tokens `t0..t0+C`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold rows `r0..r0 + R` of
/// `row_bytes` (`nb` blocks of `B::BYTES`), `acts` tokens `t0..t0 + C` of `nb` blocks;
/// no other thread may access the cells (`t0..t0 + C`, `r0..r0 + R`) of `out` meanwhile.
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
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may access the cells of
/// `out` in `rows` meanwhile (shapes are checked here).
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
        GgmlType::Q5_0 => gemm_typed::<Q5_0>(w, k, rows, acts, out),
        GgmlType::Q5_1 => gemm_typed::<Q5_1>(w, k, rows, acts, out),
        GgmlType::Q8_0 => gemm_typed::<Q8_0>(w, k, rows, acts, out),
        other => unreachable!("no AVX2 kernel for {}", other.name()),
    }
}

/// Each lane rounded to f16 precision (nearest even), kept as f32.
///
/// # Safety
/// The CPU must support AVX and F16C.
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

/// `dot(q, row r)` for the 8 rows at `k + r * stride`, in one vector (row r in lane r),
/// with exactly `dot`'s operations for each row: per lane, FMAs over the 8-float chunks
/// in order from zero, then `hsum`'s additions ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `q.len()` is a multiple of 8, and `k` points to
/// 8 rows of at least `q.len()` floats, `stride` apart.
#[inline(always)]
unsafe fn dot8(q: &[f32], k: *const f32, stride: usize) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 8];
    for x in (0..q.len()).step_by(8) {
        let qx = _mm256_loadu_ps(q.as_ptr().add(x));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qx, _mm256_loadu_ps(k.add(r * stride + x)), *a);
        }
    }
    reduce8(&acc)
}

/// `hsum` of each of 8 vectors, in one vector (that of `acc[r]` in lane r), with
/// `hsum`'s additions: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
pub(super) unsafe fn reduce8(acc: &[__m256; 8]) -> __m256 {
    // Lanes i and i+4 of each row: s = [a.s | b.s] for the row pairs (0,1), (2,3), ...
    let p01 = fold_halves(acc[0], acc[1]);
    let p23 = fold_halves(acc[2], acc[3]);
    let p45 = fold_halves(acc[4], acc[5]);
    let p67 = fold_halves(acc[6], acc[7]);
    // Then t = (s0+s2, s1+s3): [r0.t r2.t | r1.t r3.t] and [r4.t r6.t | r5.t r7.t].
    let q0123 = _mm256_add_ps(
        _mm256_shuffle_ps::<0b01_00_01_00>(p01, p23),
        _mm256_shuffle_ps::<0b11_10_11_10>(p01, p23),
    );
    let q4567 = _mm256_add_ps(
        _mm256_shuffle_ps::<0b01_00_01_00>(p45, p67),
        _mm256_shuffle_ps::<0b11_10_11_10>(p45, p67),
    );
    // Then t0+t1: [r0 r2 r4 r6 | r1 r3 r5 r7], put back in row order.
    let sums = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(q0123, q4567),
        _mm256_shuffle_ps::<0b11_01_11_01>(q0123, q4567),
    );
    _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// `[a.lo + a.hi | b.lo + b.hi]`: the first step of `hsum` for two vectors at once.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
unsafe fn fold_halves(a: __m256, b: __m256) -> __m256 {
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(a, b),
        _mm256_permute2f128_ps::<0x31>(a, b),
    )
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

/// Cache rows scored together (a cache block).
pub(super) const RUN: usize = 16;

/// Scores and softmax coefficients of rows `i..i + m`: for each row, the factor the
/// accumulator is rescaled by (`None` when the maximum did not move) and the row's weight.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q.len()` is a multiple of 8, `m <= RUN`,
/// and `k` holds rows `i..i + m` at `stride` (bounds are checked by slicing).
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
    let mut j = 0;
    // Whole groups of 8 rows: eight dot products side by side (`dot` is one chain of
    // dependent FMAs, so one row at a time waits on its latency), then one transposed
    // reduction. Each row's lanes and additions are `dot`'s, so the scores are the same.
    while j + 8 <= m {
        let r = (i + j) * stride;
        assert!(k.len() >= r + 7 * stride + hd);
        let s8 = dot8(q, k.as_ptr().add(r), stride);
        _mm256_storeu_ps(
            scores.as_mut_ptr().add(j),
            _mm256_mul_ps(s8, _mm256_set1_ps(scale_by)),
        );
        j += 8;
    }
    for (j, sc) in scores.iter_mut().enumerate().take(m).skip(j) {
        let r = (i + j) * stride;
        *sc = dot(q, &k[r..r + hd]) * scale_by;
    }
    fold_scores::<1>(
        &[scores],
        m,
        std::slice::from_mut(state),
        std::array::from_mut(rescale),
        std::array::from_mut(weight),
        super::exp_many,
    );
}

/// The online-softmax step of `Q` queries for `m` scaled scores each, in row order: for
/// each row, the factor the accumulator is rescaled by (`None` when the maximum did not
/// move) and the row's weight, as llama.cpp's CPU flash attention computes them. The
/// queries are independent; interleaving them keeps several of the running sums' chains
/// of dependent additions in flight. `exp` is `exp_many` or a wider form equal to it.
/// Returns whether any row rescales.
#[inline(always)]
pub(super) fn fold_scores<const Q: usize>(
    scores: &[[f32; RUN]; Q],
    m: usize,
    state: &mut [super::OnlineSoftmax],
    rescale: &mut [[Option<f32>; RUN]; Q],
    weight: &mut [[f32; RUN]; Q],
    exp: fn(&[f32], &mut [f32]),
) -> bool {
    assert!(m <= RUN && state.len() == Q);
    // The running maximum decides each row's `exp` argument; the `exp`s then run several
    // at a time (bit-identical to one libm call each), and the sum is folded in row order.
    let mut args = [[0f32; RUN]; Q];
    let mut raised = [[false; RUN]; Q];
    // Past the first blocks the maximum seldom moves: when no score of a query exceeds
    // it, every row takes the `else` branch below against the same maximum, which runs
    // as whole vectors here (the same subtraction per row, so the same numbers).
    let mut steady = [false; Q];
    for (i, st) in state.iter_mut().enumerate() {
        let max = st.max;
        steady[i] = !scores[i][..m].iter().fold(false, |up, &sc| up | (sc > max));
        if steady[i] {
            for (a, &sc) in args[i].iter_mut().zip(&scores[i]).take(m) {
                *a = sc - max;
            }
        }
    }
    for j in 0..m {
        for (i, st) in state.iter_mut().enumerate() {
            if steady[i] {
                continue;
            }
            let sc = scores[i][j];
            if sc > st.max {
                args[i][j] = st.max - sc;
                raised[i][j] = true;
                st.max = sc;
            } else {
                args[i][j] = sc - st.max;
                raised[i][j] = false;
            }
        }
    }
    let mut e = [[0f32; RUN]; Q];
    // Rows past `m` (arguments 0) are computed and ignored: whole rows vectorise.
    exp(args.as_flattened(), e.as_flattened_mut());
    for i in 0..Q {
        if steady[i] {
            rescale[i] = [None; RUN];
            weight[i] = e[i];
        }
    }
    for j in 0..m {
        for (i, st) in state.iter_mut().enumerate() {
            if steady[i] {
                st.sum = st.sum * 1.0 + e[i][j];
            } else if raised[i][j] {
                rescale[i][j] = Some(e[i][j]);
                weight[i][j] = 1.0;
                st.sum = st.sum * e[i][j] + 1.0;
            } else {
                rescale[i][j] = None;
                weight[i][j] = e[i][j];
                st.sum = st.sum * 1.0 + e[i][j];
            }
        }
    }
    !steady.iter().all(|&s| s)
}

/// [`attend`] with the output held in `NV` registers (`q.len() == out.len() == 8 * NV`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q.len() == out.len() == 8 * NV`, and `k`
/// and `v` hold `n` rows at `stride`.
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
    let mut acc = [_mm256_setzero_ps(); NV];
    for (x, a) in acc.iter_mut().enumerate() {
        *a = _mm256_loadu_ps(op.add(8 * x));
    }
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

/// [`attend`] for any head size that is a multiple of 8, the output in memory.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q.len() == out.len()` is a multiple of 8.
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

/// `dst[i]` = f16 bits of `src[i]` (nearest even), 8 at a time; returns how many it did.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f32_to_f16(dst: &mut [u16], src: &[f32]) -> usize {
    let n = dst.len().min(src.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
    }
    n
}

/// Rows `0..n` of `hd` f16 values (row `i` at `src[i * stride..]`) widened into `dst`,
/// back to back. `hd` is a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_rows(dst: &mut [f32], src: &[u16], stride: usize, n: usize, hd: usize) {
    assert!(hd.is_multiple_of(8) && super::rows_fit(dst.len(), n, hd, hd));
    assert!(super::rows_fit(src.len(), n, stride, hd));
    for i in 0..n {
        let (s, d) = (src.as_ptr().add(i * stride), dst.as_mut_ptr().add(i * hd));
        for x in (0..hd).step_by(8) {
            let h = _mm_loadu_si128(s.add(x) as *const __m128i);
            _mm256_storeu_ps(d.add(x), _mm256_cvtph_ps(h));
        }
    }
}

/// `dst[i]` = the f16 with bits `src[i]` as f32, 8 at a time; returns how many it did.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_to_f32(dst: &mut [f32], src: &[u16]) -> usize {
    let n = dst.len().min(src.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
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
    // Loops, not `array::from_fn`: a closure does not inherit the target features, so
    // the intrinsics in it could become calls.
    let mut v = [_mm256_setzero_ps(); 4];
    for (j, vj) in v.iter_mut().enumerate() {
        *vj = _mm256_loadu_ps(x.as_ptr().add(8 * j));
    }
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vj in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vj));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let mut i = [_mm256_setzero_si256(); 4];
    for (ij, vj) in i.iter_mut().zip(&v) {
        *ij = _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(*vj, id)));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kernels::test_support::{avx2, skipped};

    /// `fold_scores` (steady blocks as whole vectors, others row by row, queries
    /// interleaved) equals the plain row-by-row online-softmax step for every query.
    #[test]
    fn fold_scores_equals_the_row_by_row_step() {
        use crate::backends::cpu::kernels::OnlineSoftmax;
        fn plain(scores: &[f32], st: &mut OnlineSoftmax) -> Vec<(Option<u32>, u32)> {
            scores
                .iter()
                .map(|&sc| {
                    if sc > st.max {
                        let e = (st.max - sc).exp();
                        st.max = sc;
                        st.sum = st.sum * e + 1.0;
                        (Some(e.to_bits()), 1f32.to_bits())
                    } else {
                        let e = (sc - st.max).exp();
                        st.sum = st.sum * 1.0 + e;
                        (None, e.to_bits())
                    }
                })
                .collect()
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 22) as f32 - 2.0
        };
        for m in [16, 11, 1] {
            let mut states = [OnlineSoftmax::default(); 3];
            let mut want = states;
            for block in 0..40 {
                let mut scores = [[0f32; RUN]; 3];
                for (i, row) in scores.iter_mut().enumerate() {
                    for s in row.iter_mut() {
                        // Query 1 climbs (its maximum keeps moving), the others settle.
                        *s = next() + if i == 1 { block as f32 * 0.5 } else { 0.0 };
                    }
                }
                let (mut rescale, mut weight) = ([[None; RUN]; 3], [[0f32; RUN]; 3]);
                let any = fold_scores::<3>(
                    &scores,
                    m,
                    &mut states,
                    &mut rescale,
                    &mut weight,
                    crate::backends::cpu::kernels::exp_many,
                );
                let mut moved = false;
                for i in 0..3 {
                    let rows = plain(&scores[i][..m], &mut want[i]);
                    for (j, (r, w)) in rows.iter().enumerate() {
                        assert_eq!(rescale[i][j].map(f32::to_bits), *r, "m={m} block {block}");
                        assert_eq!(weight[i][j].to_bits(), *w, "m={m} block {block}");
                        moved |= r.is_some();
                    }
                    assert_eq!(states[i].max.to_bits(), want[i].max.to_bits());
                    assert_eq!(states[i].sum.to_bits(), want[i].sum.to_bits());
                }
                assert_eq!(any, moved);
            }
        }
    }

    /// Eight dot products side by side give each row's `dot` bit for bit.
    #[test]
    fn dot8_equals_dot_row_by_row() {
        if let Err(why) = avx2() {
            skipped("dot8_equals_dot_row_by_row", &why);
            return;
        }
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Wide magnitudes, so the additions round and their order shows.
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * f32::powi(2.0, (seed % 24) as i32 - 12)
        };
        for hd in [8usize, 40, 64, 128] {
            let stride = hd + 24;
            for _ in 0..200 {
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                let k: Vec<f32> = (0..8 * stride).map(|_| next()).collect();
                // SAFETY: avx2 and fma checked above; `k` holds 8 rows at `stride`.
                let got = unsafe {
                    let mut out = [0f32; 8];
                    _mm256_storeu_ps(out.as_mut_ptr(), dot8(&q, k.as_ptr(), stride));
                    out
                };
                for (r, g) in got.iter().enumerate() {
                    // SAFETY: as above.
                    let want = unsafe { dot(&q, &k[r * stride..r * stride + hd]) };
                    assert_eq!(g.to_bits(), want.to_bits(), "hd={hd} row {r}");
                }
            }
        }
    }
}
