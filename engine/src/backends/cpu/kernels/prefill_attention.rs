//! Attention of prefill queries as blocked ("flash") attention, with the arithmetic of
//! llama.cpp's CPU path for multi-token batches (`ggml_compute_forward_flash_attn_ext_tiled`,
//! taken for batches of at least 64 tokens).
//!
//! The one-query path ([`super::attend`]) folds cache rows into the online softmax one at
//! a time: per row a dot product reduced across lanes, a branch on the running maximum,
//! a libm `exp` and a rescale of the accumulator. That mirrors llama.cpp's one-token path
//! and stays for decode and short chunks, but it left a long prompt's prefill bound by
//! those per-row steps (at 4,096 tokens, three quarters of the time went to attention).
//! Here a tile of queries meets a tile of [`KV_TILE`] cache rows at a time, as llama.cpp
//! does, with the same operations in the same order:
//!
//! 1. scores: a small matrix product, queries × rows, K transposed so that rows lie in
//!    vector lanes; each score one chain of FMAs over the head, then times the scale;
//! 2. per query: the tile's maximum; when it rose, one libm `exp` rescales the
//!    accumulator and the sum; the weights are ggml's vector `exp` (`ggml_v_expf`,
//!    within about 2 ulp) of score minus maximum, summed per vector in f32 and across vectors
//!    in f64 (`ggml_vec_soft_max_f32`), in the 8-lane or 16-lane form of llama.cpp's
//!    AVX2 or AVX-512 build ([`Lanes`]);
//! 3. the weighted sum of V: another small matrix product into the accumulators, one
//!    chain of FMAs per element in row order.
//!
//! Every query's result depends only on its own position, window and the cache: tiles of
//! rows start at multiples of [`KV_TILE`], rows outside a query's range weigh exactly 0
//! (a no-op in the sums), so results do not change with the batch, the chunking or how
//! queries are grouped; and the portable form below gives the same bits as the AVX2 one
//! (tested).

use super::attention::{CacheRows, TileQueries};

/// Cache rows per tile: the scores of one query over a tile fill 8 vectors of 8 lanes.
pub(super) const KV_TILE: usize = 64;

/// Which of llama.cpp's builds the softmax step follows: its vector `exp` and its sums
/// differ between the AVX2 and the AVX-512 code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lanes {
    /// 8 lanes: `ggml_v_expf`'s AVX2 form, each vector of 8 weights summed on its own.
    Eight,
    /// 16 lanes: the AVX-512 form (its polynomial adds the 1 inside an FMA, `scalef`
    /// scales), and pairs of 8-lane vectors summed together.
    Sixteen,
}

/// Reusable buffers for [`attend_prefill`].
#[derive(Default)]
pub struct PrefillScratch {
    /// K of the tile, transposed: row `r`, element `d` at `kt[d * KV_TILE + r]`.
    kt: Vec<f32>,
    /// V of the tile, row after row.
    v: Vec<f32>,
    /// Per query of the group of 3 in hand: its scores over the tile, then its weights.
    p: Vec<f32>,
    /// Per query of the tile: running maximum and sum of weights.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// The queries that see rows of the current tile, with their rows `lo..hi` in it.
    active: Vec<(usize, usize, usize)>,
}

/// Attention of the queries `sel` of `t` (prefill queries: f32 throughout) over their
/// positions, normalised, into their rows of `out` (`head_dim` floats per query of `t`).
/// `simd` picks the AVX2 kernels (the caller checked the CPU); the results are the same.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_prefill<'c, F>(
    t: &TileQueries,
    sel: &[usize],
    hd: usize,
    scale_by: f32,
    cache: &CacheRows<F>,
    s: &mut PrefillScratch,
    out: &mut [f32],
    lanes: Lanes,
    simd: bool,
) where
    F: Fn(usize, usize) -> (&'c [u16], &'c [u16]),
{
    let nq = t.pos.len();
    assert!(hd > 0 && hd.is_multiple_of(8) && t.q.len() == nq * hd && out.len() == nq * hd);
    assert!(cache.block > 0 && cache.stride >= hd);
    assert!(sel.iter().all(|&j| j < nq));
    let first = |j: usize| match t.window {
        Some(w) => t.pos[j] + 1 - w.clamp(1, t.pos[j] + 1),
        None => 0,
    };
    let (Some(start), Some(end)) = (
        sel.iter().map(|&j| first(j)).min(),
        sel.iter().map(|&j| t.pos[j] + 1).max(),
    ) else {
        return;
    };
    s.kt.resize(hd * KV_TILE, 0.0);
    s.v.resize(KV_TILE * hd, 0.0);
    s.p.resize(3 * KV_TILE, 0.0);
    s.max.clear();
    s.max.resize(nq, f32::NEG_INFINITY);
    s.sum.clear();
    s.sum.resize(nq, 0.0);
    for &j in sel {
        out[j * hd..(j + 1) * hd].fill(0.0);
    }
    let mut p0 = start / KV_TILE * KV_TILE;
    while p0 < end {
        let p1 = (p0 + KV_TILE).min(end);
        s.active.clear();
        for &j in sel {
            let (lo, hi) = (first(j).max(p0), (t.pos[j] + 1).min(p1));
            if lo < hi {
                s.active.push((j, lo - p0, hi - p0));
            }
        }
        if !s.active.is_empty() {
            gather(cache, p0, p1 - p0, hd, s, simd);
            tile(t, hd, scale_by, s, out, lanes, simd);
        }
        p0 += KV_TILE;
    }
    for &j in sel {
        let inv = 1.0 / s.sum[j];
        out[j * hd..(j + 1) * hd].iter_mut().for_each(|o| *o *= inv);
    }
}

/// Rows `p0..p0 + n` of the cache, widened to f32: K transposed into `s.kt` (columns
/// past `n` zeroed, so no stale value can be a NaN), V into `s.v`.
fn gather<'c, F>(
    cache: &CacheRows<F>,
    p0: usize,
    n: usize,
    hd: usize,
    s: &mut PrefillScratch,
    simd: bool,
) where
    F: Fn(usize, usize) -> (&'c [u16], &'c [u16]),
{
    let mut p = p0;
    while p < p0 + n {
        let run = (cache.block - p % cache.block).min(p0 + n - p);
        let (k, v) = (cache.rows)(p, run);
        assert!(super::rows_fit(k.len(), run, cache.stride, hd));
        assert!(super::rows_fit(v.len(), run, cache.stride, hd));
        let r0 = p - p0;
        super::widen_rows(&mut s.v[r0 * hd..], v, cache.stride, run, hd);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` only when the CPU has AVX2, FMA and F16C; bounds asserted.
            unsafe { x86::transpose_rows(&mut s.kt, k, cache.stride, r0, run, hd) };
            p += run;
            continue;
        }
        let _ = simd;
        for r in 0..run {
            for d in 0..hd {
                let x = half::f16::from_bits(k[r * cache.stride + d]).to_f32();
                s.kt[d * KV_TILE + r0 + r] = x;
            }
        }
        p += run;
    }
    if n < KV_TILE {
        for d in 0..hd {
            s.kt[d * KV_TILE + n..(d + 1) * KV_TILE].fill(0.0);
        }
    }
}

/// The three steps for every active query over the gathered tile, 3 queries at a time
/// (the register tiles below hold 3 × 4 vectors).
fn tile(
    t: &TileQueries,
    hd: usize,
    scale_by: f32,
    s: &mut PrefillScratch,
    out: &mut [f32],
    lanes: Lanes,
    simd: bool,
) {
    let PrefillScratch {
        kt,
        v,
        p,
        max,
        sum,
        active,
    } = s;
    for group in active.chunks(3) {
        let empty: &[f32] = &[];
        let mut q = [empty; 3];
        for (x, a) in q.iter_mut().zip(group) {
            *x = &t.q[a.0 * hd..(a.0 + 1) * hd];
        }
        let lo = group.iter().map(|a| a.1).min().unwrap_or(0);
        let hi = group.iter().map(|a| a.2).max().unwrap_or(0);
        // Whole 16-lane vectors for the AVX-512 sums (the extra lanes weigh 0).
        let vectors = match lanes {
            Lanes::Eight => hi.div_ceil(8),
            Lanes::Sixteen => hi.div_ceil(16) * 2,
        };
        scores(&q[..group.len()], kt, hd, vectors, scale_by, p, simd);
        for (i, &(j, lo, hi)) in group.iter().enumerate() {
            let row = &mut p[i * KV_TILE..(i + 1) * KV_TILE];
            let acc = &mut out[j * hd..(j + 1) * hd];
            weights(
                row,
                vectors,
                lo,
                hi,
                &mut max[j],
                &mut sum[j],
                acc,
                lanes,
                simd,
            );
        }
        accumulate(group, p, v, hd, lo, hi, out, simd);
    }
}

/// `p[i][r] = (q_i · k_r) * scale_by` for the tile's first `8 * vectors` rows.
fn scores(
    q: &[&[f32]],
    kt: &[f32],
    hd: usize,
    vectors: usize,
    scale_by: f32,
    p: &mut [f32],
    simd: bool,
) {
    assert!(q.len() <= 3 && vectors <= KV_TILE / 8 && kt.len() >= hd * KV_TILE);
    assert!(p.len() >= q.len() * KV_TILE && q.iter().all(|r| r.len() == hd));
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` only when the CPU has AVX2 and FMA; lengths asserted above.
        unsafe { x86::scores(q, kt, hd, vectors, scale_by, p) };
        return;
    }
    let _ = simd;
    for (i, qi) in q.iter().enumerate() {
        for r in 0..vectors * 8 {
            let mut acc = 0f32;
            for (d, &x) in qi.iter().enumerate() {
                acc = x.mul_add(kt[d * KV_TILE + r], acc);
            }
            p[i * KV_TILE + r] = acc * scale_by;
        }
    }
}

/// One query's online-softmax step over its scores `row` (rows `lo..hi` of the tile
/// count, `lo < hi`): updates the running maximum and sum, rescales the accumulator
/// `acc` when the maximum rose, and turns `row` into weights (0 outside `lo..hi`).
#[allow(clippy::too_many_arguments)]
fn weights(
    row: &mut [f32],
    vectors: usize,
    lo: usize,
    hi: usize,
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
    lanes: Lanes,
    simd: bool,
) {
    let width = vectors * 8;
    assert!(row.len() == KV_TILE && width <= KV_TILE && lo < hi && hi <= width);
    assert!(lanes == Lanes::Eight || vectors.is_multiple_of(2));
    row[..lo].fill(f32::NEG_INFINITY);
    row[hi..width].fill(f32::NEG_INFINITY);
    // The maximum is exact whatever the order (the masked scores are minus infinity).
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `simd` only when the CPU has AVX2; lengths asserted above.
    let tile_max = simd.then(|| unsafe { x86::max(row, vectors) });
    #[cfg(not(target_arch = "x86_64"))]
    let tile_max = None;
    let tile_max = tile_max.unwrap_or_else(|| {
        row[..width]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    });
    let new_max = max.max(tile_max);
    if new_max > *max {
        // libm's `exp`, as llama.cpp rescales.
        let ms = (*max - new_max).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
        *sum *= ms;
        *max = new_max;
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` only when the CPU has AVX2 and FMA; lengths asserted above.
        let total = unsafe { x86::exp_and_sum(row, vectors, new_max, lanes) };
        *sum = (*sum as f64 + total) as f32;
        return;
    }
    let _ = simd;
    let mut total = 0f64;
    let mut pending = [0f32; 8];
    for (c, chunk) in row.chunks_exact_mut(8).take(vectors).enumerate() {
        let mut v = [0f32; 8];
        for (x, y) in chunk.iter_mut().zip(v.iter_mut()) {
            *x = v_expf(*x - new_max, lanes);
            *y = *x;
        }
        match lanes {
            Lanes::Eight => total += hsum(v) as f64,
            Lanes::Sixteen if c % 2 == 0 => pending = v,
            Lanes::Sixteen => {
                let pair: [f32; 8] = std::array::from_fn(|i| pending[i] + v[i]);
                total += hsum(pair) as f64;
            }
        }
    }
    *sum = (*sum as f64 + total) as f32;
}

/// `acc_j += Σ_r p_j[r] v_r` over rows `lo..hi`, for the group's queries (their
/// accumulators are their rows of `out`).
#[allow(clippy::too_many_arguments)]
fn accumulate(
    group: &[(usize, usize, usize)],
    p: &[f32],
    v: &[f32],
    hd: usize,
    lo: usize,
    hi: usize,
    out: &mut [f32],
    simd: bool,
) {
    assert!(group.len() <= 3 && p.len() >= group.len() * KV_TILE && hi <= KV_TILE);
    assert!(v.len() >= KV_TILE * hd && group.iter().all(|a| (a.0 + 1) * hd <= out.len()));
    let mut seen = [usize::MAX; 3];
    for (i, a) in group.iter().enumerate() {
        assert!(!seen.contains(&a.0), "a query twice in one group");
        seen[i] = a.0;
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` only when the CPU has AVX2 and FMA; lengths asserted above, and
        // the group's queries are distinct, so their output rows are disjoint.
        unsafe { x86::accumulate(group, p, v, hd, lo, hi, out) };
        return;
    }
    let _ = simd;
    for (i, &(j, _, _)) in group.iter().enumerate() {
        let acc = &mut out[j * hd..(j + 1) * hd];
        for r in lo..hi {
            let w = p[i * KV_TILE + r];
            for (a, &x) in acc.iter_mut().zip(&v[r * hd..(r + 1) * hd]) {
                *a = w.mul_add(x, *a);
            }
        }
    }
}

/// `ggml_v_expf` (llama.cpp's vector `exp`, after Arm's optimized routines) on one lane,
/// in the `lanes` build's form: the same operations as the vector code, so the same bits.
fn v_expf(x: f32, lanes: Lanes) -> f32 {
    let z = x.mul_add(EXP_LOG2E, EXP_SHIFT);
    let n = z - EXP_SHIFT;
    let b = (-n).mul_add(EXP_LN2_LO, (-n).mul_add(EXP_LN2_HI, x));
    let u = b * b;
    let head = EXP_C[0]
        .mul_add(b, EXP_C[1])
        .mul_add(u, EXP_C[2].mul_add(b, EXP_C[3]));
    match lanes {
        Lanes::Eight => {
            let j = head.mul_add(u, EXP_C[4] * b);
            let e = z.to_bits() << 23;
            let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
            if n.abs() <= 126.0 || n.is_nan() {
                return j.mul_add(k, k);
            }
            // Outside 2^±126: the scale in two factors, or its square's limit.
            let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
            let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
            let s2 = f32::from_bits(e.wrapping_sub(g));
            if n.abs() > 192.0 {
                s1 * s1
            } else {
                s2.mul_add(j, s2) * s1
            }
        }
        Lanes::Sixteen => {
            let j = head.mul_add(u, EXP_C[4].mul_add(b, 1.0));
            if n.abs() > 192.0 {
                return if n <= 0.0 { 0.0 } else { f32::INFINITY };
            }
            // `scalef`: j · 2^n rounded once (exact in f64 first).
            (j as f64 * 2f64.powi(n as i32)) as f32
        }
    }
}

/// The lanes summed as llama.cpp's AVX2 code does: halves, then pairs, then the last two.
fn hsum(l: [f32; 8]) -> f32 {
    let t = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// `ggml_v_expf`'s constants (hex floats in the C source, bits here).
const EXP_SHIFT: f32 = 12_582_912.0; // 0x1.8p23: adding it rounds to an integer
const EXP_LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const EXP_LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const EXP_LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const EXP_C: [f32; 5] = [
    f32::from_bits(0x3c07_2010), // 0x1.0e4020p-7
    f32::from_bits(0x3d2b_9f17), // 0x1.573e2ep-5
    f32::from_bits(0x3e2a_af33), // 0x1.555e66p-3
    f32::from_bits(0x3eff_fedb), // 0x1.fffdb6p-2
    f32::from_bits(0x3f7f_fff6), // 0x1.ffffecp-1
];

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, EXP_C, EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_SHIFT, KV_TILE};

    /// Rows `r0..r0 + n` of the tile's K (f16 bits, row `i` at `k[i * stride..]`),
    /// widened and written as columns of `kt`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `k` holds `n` rows of `hd` at `stride`,
    /// `hd` is a multiple of 8, `r0 + n <= KV_TILE` and `kt` holds `hd * KV_TILE`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn transpose_rows(
        kt: &mut [f32],
        k: &[u16],
        stride: usize,
        r0: usize,
        n: usize,
        hd: usize,
    ) {
        assert!(r0 + n <= KV_TILE && kt.len() >= hd * KV_TILE && hd.is_multiple_of(8));
        assert!(super::super::rows_fit(k.len(), n, stride, hd));
        let dst = kt.as_mut_ptr();
        let mut r = 0;
        // Eight rows at a time: an 8 × 8 transpose in registers per 8 elements.
        while r + 8 <= n {
            for d in (0..hd).step_by(8) {
                let row = |i: usize| {
                    let h = _mm_loadu_si128(k.as_ptr().add((r + i) * stride + d) as *const __m128i);
                    _mm256_cvtph_ps(h)
                };
                let t = transpose8([
                    row(0),
                    row(1),
                    row(2),
                    row(3),
                    row(4),
                    row(5),
                    row(6),
                    row(7),
                ]);
                for (e, c) in t.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((d + e) * KV_TILE + r0 + r), *c);
                }
            }
            r += 8;
        }
        while r < n {
            for d in (0..hd).step_by(8) {
                let h = _mm_loadu_si128(k.as_ptr().add(r * stride + d) as *const __m128i);
                let mut x = [0f32; 8];
                _mm256_storeu_ps(x.as_mut_ptr(), _mm256_cvtph_ps(h));
                for (e, &val) in x.iter().enumerate() {
                    *dst.add((d + e) * KV_TILE + r0 + r) = val;
                }
            }
            r += 1;
        }
    }

    /// The 8 × 8 transpose of `m` (row `i` of the result is lane `i` of each input).
    #[inline(always)]
    unsafe fn transpose8(m: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(m[0], m[1]);
        let t1 = _mm256_unpackhi_ps(m[0], m[1]);
        let t2 = _mm256_unpacklo_ps(m[2], m[3]);
        let t3 = _mm256_unpackhi_ps(m[2], m[3]);
        let t4 = _mm256_unpacklo_ps(m[4], m[5]);
        let t5 = _mm256_unpackhi_ps(m[4], m[5]);
        let t6 = _mm256_unpacklo_ps(m[6], m[7]);
        let t7 = _mm256_unpackhi_ps(m[6], m[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// See `super::scores`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the caller checked the lengths.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        q: &[&[f32]],
        kt: &[f32],
        hd: usize,
        vectors: usize,
        scale_by: f32,
        p: &mut [f32],
    ) {
        let mut c = 0;
        while c < vectors {
            let w = (vectors - c).min(4);
            match (q.len(), w) {
                (3, 4) => scores_tile::<3, 4>(q, kt, hd, c, scale_by, p),
                (3, 3) => scores_tile::<3, 3>(q, kt, hd, c, scale_by, p),
                (3, 2) => scores_tile::<3, 2>(q, kt, hd, c, scale_by, p),
                (3, _) => scores_tile::<3, 1>(q, kt, hd, c, scale_by, p),
                (2, 4) => scores_tile::<2, 4>(q, kt, hd, c, scale_by, p),
                (2, 3) => scores_tile::<2, 3>(q, kt, hd, c, scale_by, p),
                (2, 2) => scores_tile::<2, 2>(q, kt, hd, c, scale_by, p),
                (2, _) => scores_tile::<2, 1>(q, kt, hd, c, scale_by, p),
                (_, 4) => scores_tile::<1, 4>(q, kt, hd, c, scale_by, p),
                (_, 3) => scores_tile::<1, 3>(q, kt, hd, c, scale_by, p),
                (_, 2) => scores_tile::<1, 2>(q, kt, hd, c, scale_by, p),
                _ => scores_tile::<1, 1>(q, kt, hd, c, scale_by, p),
            }
            c += w;
        }
    }

    /// Scores of `R` queries over the `8 * C` rows from vector `c0`: `R × C` accumulators,
    /// each one chain of FMAs over the head's elements in order.
    #[inline(always)]
    unsafe fn scores_tile<const R: usize, const C: usize>(
        q: &[&[f32]],
        kt: &[f32],
        hd: usize,
        c0: usize,
        scale_by: f32,
        p: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let kp = kt.as_ptr().add(8 * c0);
        // Per element: R broadcasts held, each row vector loaded once for R FMAs (R × C
        // accumulators + R broadcasts fit the 16 registers).
        for d in 0..hd {
            let mut b = [_mm256_setzero_ps(); R];
            for (i, x) in b.iter_mut().enumerate() {
                *x = _mm256_broadcast_ss(&*q[i].as_ptr().add(d));
            }
            for c in 0..C {
                let k = _mm256_loadu_ps(kp.add(d * KV_TILE + 8 * c));
                for (a, x) in acc.iter_mut().zip(&b) {
                    a[c] = _mm256_fmadd_ps(*x, k, a[c]);
                }
            }
        }
        let sv = _mm256_set1_ps(scale_by);
        for (i, a) in acc.iter().enumerate() {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(
                    p.as_mut_ptr().add(i * KV_TILE + 8 * (c0 + c)),
                    _mm256_mul_ps(*x, sv),
                );
            }
        }
    }

    /// `row[r] = v_expf(row[r] - max)` for the first `8 * vectors` entries, and their sum
    /// as `ggml_vec_soft_max_f32` forms it: per vector (or pair, for 16 lanes) in f32,
    /// then in f64.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `8 * vectors` floats (an even
    /// number of vectors for 16 lanes).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_and_sum(
        row: &mut [f32],
        vectors: usize,
        max: f32,
        lanes: Lanes,
    ) -> f64 {
        assert!(row.len() >= 8 * vectors);
        let m = _mm256_set1_ps(max);
        let mut total = 0f64;
        let mut pending = _mm256_setzero_ps();
        for c in 0..vectors {
            let at = row.as_mut_ptr().add(8 * c);
            let e = v_expf8(_mm256_sub_ps(_mm256_loadu_ps(at), m), lanes);
            _mm256_storeu_ps(at, e);
            match lanes {
                Lanes::Eight => total += hsum8(e) as f64,
                Lanes::Sixteen if c % 2 == 0 => pending = e,
                Lanes::Sixteen => total += hsum8(_mm256_add_ps(pending, e)) as f64,
            }
        }
        total
    }

    /// The largest of the first `8 * vectors` entries of `row`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `row` holds `8 * vectors` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(row: &[f32], vectors: usize) -> f32 {
        assert!(row.len() >= 8 * vectors);
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in 0..vectors {
            m = _mm256_max_ps(m, _mm256_loadu_ps(row.as_ptr().add(8 * c)));
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    /// `super::hsum` of a vector.
    #[inline(always)]
    unsafe fn hsum8(v: __m256) -> f32 {
        let t = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
        let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
        _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)))
    }

    /// `super::v_expf` on eight lanes; lanes beyond 2^±126 (rare: weights under 1e-38)
    /// go through the one-lane form.
    #[inline(always)]
    unsafe fn v_expf8(x: __m256, lanes: Lanes) -> __m256 {
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(EXP_SHIFT));
        let n = _mm256_sub_ps(z, _mm256_set1_ps(EXP_SHIFT));
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(EXP_LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x),
        );
        let c = |i: usize| _mm256_set1_ps(EXP_C[i]);
        let u = _mm256_mul_ps(b, b);
        let head = _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0), b, c(1)),
            u,
            _mm256_fmadd_ps(c(2), b, c(3)),
        );
        // 2^n from z's low bits (valid for |n| <= 126).
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f80_0000)));
        let far = _mm256_cmp_ps::<_CMP_GT_OQ>(
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), n),
            _mm256_set1_ps(126.0),
        );
        if _mm256_movemask_ps(far) != 0 {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), x);
            return _mm256_loadu_ps(v.map(|x| super::v_expf(x, lanes)).as_ptr());
        }
        match lanes {
            Lanes::Eight => {
                let j = _mm256_fmadd_ps(head, u, _mm256_mul_ps(c(4), b));
                _mm256_fmadd_ps(j, k, k)
            }
            Lanes::Sixteen => {
                let j = _mm256_fmadd_ps(head, u, _mm256_fmadd_ps(c(4), b, _mm256_set1_ps(1.0)));
                _mm256_mul_ps(j, k)
            }
        }
    }

    /// See `super::accumulate`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the caller checked the lengths and that the
    /// group's output rows are disjoint.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate(
        group: &[(usize, usize, usize)],
        p: &[f32],
        v: &[f32],
        hd: usize,
        lo: usize,
        hi: usize,
        out: &mut [f32],
    ) {
        let vectors = hd / 8;
        let mut c = 0;
        while c < vectors {
            let w = (vectors - c).min(4);
            match (group.len(), w) {
                (3, 4) => accumulate_tile::<3, 4>(group, p, v, hd, c, lo, hi, out),
                (3, 3) => accumulate_tile::<3, 3>(group, p, v, hd, c, lo, hi, out),
                (3, 2) => accumulate_tile::<3, 2>(group, p, v, hd, c, lo, hi, out),
                (3, _) => accumulate_tile::<3, 1>(group, p, v, hd, c, lo, hi, out),
                (2, 4) => accumulate_tile::<2, 4>(group, p, v, hd, c, lo, hi, out),
                (2, 3) => accumulate_tile::<2, 3>(group, p, v, hd, c, lo, hi, out),
                (2, 2) => accumulate_tile::<2, 2>(group, p, v, hd, c, lo, hi, out),
                (2, _) => accumulate_tile::<2, 1>(group, p, v, hd, c, lo, hi, out),
                (_, 4) => accumulate_tile::<1, 4>(group, p, v, hd, c, lo, hi, out),
                (_, 3) => accumulate_tile::<1, 3>(group, p, v, hd, c, lo, hi, out),
                (_, 2) => accumulate_tile::<1, 2>(group, p, v, hd, c, lo, hi, out),
                _ => accumulate_tile::<1, 1>(group, p, v, hd, c, lo, hi, out),
            }
            c += w;
        }
    }

    /// `R` queries' accumulators, elements `8 * c0..8 * (c0 + C)`, held in registers
    /// while rows `lo..hi` fold in.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn accumulate_tile<const R: usize, const C: usize>(
        group: &[(usize, usize, usize)],
        p: &[f32],
        v: &[f32],
        hd: usize,
        c0: usize,
        lo: usize,
        hi: usize,
        out: &mut [f32],
    ) {
        let op = out.as_mut_ptr();
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for (i, a) in acc.iter_mut().enumerate() {
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(op.add(group[i].0 * hd + 8 * (c0 + c)));
            }
        }
        for r in lo..hi {
            let mut w = [_mm256_setzero_ps(); R];
            for (i, x) in w.iter_mut().enumerate() {
                *x = _mm256_broadcast_ss(&*p.as_ptr().add(i * KV_TILE + r));
            }
            for c in 0..C {
                let y = _mm256_loadu_ps(v.as_ptr().add(r * hd + 8 * (c0 + c)));
                for (a, x) in acc.iter_mut().zip(&w) {
                    a[c] = _mm256_fmadd_ps(*x, y, a[c]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(op.add(group[i].0 * hd + 8 * (c0 + c)), *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kernels::test_support;
    use crate::backends::cpu::kernels::test_support::pseudo;

    /// A cache of `ctx` positions × `kv_heads`, f16, and queries over it.
    struct Case {
        hd: usize,
        stride: usize,
        block: usize,
        k: Vec<u16>,
        v: Vec<u16>,
        q: Vec<f32>,
        pos: Vec<usize>,
    }

    fn case(hd: usize, block: usize, ctx: usize, positions: &[usize], seed: u64) -> Case {
        let kv_heads = 2;
        let stride = kv_heads * hd;
        let to16 = |x: Vec<f32>| {
            let mut h = vec![0u16; x.len()];
            crate::backends::cpu::kernels::f32_to_f16(&mut h, &x);
            h
        };
        // Large K spreads the scores, so the running maximum moves between tiles.
        let k = pseudo(ctx * stride, seed).iter().map(|x| x * 4.0).collect();
        let heads = 3;
        let mut pos = Vec::new();
        for &p in positions {
            pos.extend(std::iter::repeat_n(p, heads));
        }
        Case {
            hd,
            stride,
            block,
            k: to16(k),
            v: to16(pseudo(ctx * stride, seed + 1)),
            q: pseudo(pos.len() * hd, seed + 2),
            pos,
        }
    }

    fn run(c: &Case, window: Option<usize>, sel: &[usize], lanes: Lanes, simd: bool) -> Vec<f32> {
        let kvh = 1;
        let cache = CacheRows {
            block: c.block,
            stride: c.stride,
            rows: |p: usize, n: usize| {
                assert!(p % c.block + n <= c.block, "a run crosses a block");
                let at = p * c.stride + kvh * c.hd;
                let len = n * c.stride - kvh * c.hd;
                (&c.k[at..at + len], &c.v[at..at + len])
            },
        };
        let round = vec![false; c.pos.len()];
        let blocked = vec![true; c.pos.len()];
        let t = TileQueries {
            q: &c.q,
            pos: &c.pos,
            window,
            round: &round,
            blocked: &blocked,
        };
        let mut out = vec![f32::NAN; c.q.len()];
        let mut s = PrefillScratch::default();
        let scale_by = 1.0 / (c.hd as f32).sqrt();
        attend_prefill(
            &t, sel, c.hd, scale_by, &cache, &mut s, &mut out, lanes, simd,
        );
        out
    }

    /// Softmax attention in f64 over the same (f16) cache.
    fn exact(c: &Case, j: usize, window: Option<usize>) -> Vec<f64> {
        let (hd, kvh) = (c.hd, 1);
        let f = |h: u16| half::f16::from_bits(h).to_f64();
        let pos = c.pos[j];
        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let q = &c.q[j * hd..(j + 1) * hd];
        let scores: Vec<f64> = (lo..=pos)
            .map(|p| {
                let k = &c.k[p * c.stride + kvh * hd..][..hd];
                let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * f(b)).sum();
                dot / (hd as f64).sqrt()
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut out = vec![0f64; hd];
        for (i, p) in (lo..=pos).enumerate() {
            let v = &c.v[p * c.stride + kvh * hd..][..hd];
            for (o, &x) in out.iter_mut().zip(v) {
                *o += w[i] / total * f(x);
            }
        }
        out
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|f| f.to_bits()).collect()
    }

    /// Prompts crossing tile and block edges, a chunk starting mid-tile, and windows
    /// shorter and longer than a tile (Gemma 3's local layers).
    fn cases() -> Vec<(Case, Option<usize>)> {
        let mut all = Vec::new();
        for (i, hd) in [64usize, 128, 40, 256].into_iter().enumerate() {
            let seed = 10 * i as u64;
            let chunk: Vec<usize> = (97..140).collect();
            let sparse = vec![0, 1, 15, 16, 63, 64, 65, 127, 128, 200];
            for window in [None, Some(1), Some(5), Some(70), Some(1000)] {
                all.push((case(hd, 16, 210, &chunk, seed), window));
                all.push((case(hd, 16, 210, &sparse, seed + 3), window));
            }
            // Cache blocks that do not divide the tile.
            all.push((case(hd, 24, 210, &chunk, seed + 5), None));
        }
        all
    }

    #[test]
    fn blocked_attention_is_within_float_rounding_of_exact_attention() {
        let simd = test_support::avx2().is_ok();
        for (c, window) in cases() {
            let sel: Vec<usize> = (0..c.pos.len()).collect();
            let out = run(&c, window, &sel, Lanes::Eight, simd);
            let out16 = run(&c, window, &sel, Lanes::Sixteen, simd);
            for (j, out) in (0..c.pos.len()).flat_map(|j| [(j, &out), (j, &out16)]) {
                let want = exact(&c, j, window);
                let got = &out[j * c.hd..(j + 1) * c.hd];
                for (g, w) in got.iter().zip(&want) {
                    let err = (*g as f64 - w).abs();
                    assert!(
                        err <= 2e-6 * (1.0 + w.abs()),
                        "hd {} query {j} at {} window {window:?}: {g} vs {w}",
                        c.hd,
                        c.pos[j]
                    );
                }
            }
        }
    }

    #[test]
    fn avx2_kernels_equal_the_portable_ones_bit_for_bit() {
        if let Err(why) = test_support::avx2() {
            test_support::skipped("avx2_kernels_equal_the_portable_ones_bit_for_bit", &why);
            return;
        }
        for (c, window) in cases() {
            let sel: Vec<usize> = (0..c.pos.len()).collect();
            for lanes in [Lanes::Eight, Lanes::Sixteen] {
                let simd = run(&c, window, &sel, lanes, true);
                let portable = run(&c, window, &sel, lanes, false);
                let what = format!("hd {} window {window:?} {lanes:?}", c.hd);
                assert_eq!(bits(&simd), bits(&portable), "{what}");
            }
        }
    }

    #[test]
    fn a_query_gets_the_same_bits_alone_or_with_others() {
        let simd = test_support::avx2().is_ok();
        for (c, window) in cases().into_iter().step_by(3) {
            let n = c.pos.len();
            let lanes = Lanes::Sixteen;
            let all = run(&c, window, &(0..n).collect::<Vec<_>>(), lanes, simd);
            // Alone, and in a selection that regroups the queries (every other one).
            let odd: Vec<usize> = (0..n).filter(|j| j % 2 == 1).collect();
            let regrouped = run(&c, window, &odd, lanes, simd);
            for j in 0..n {
                let alone = run(&c, window, &[j], lanes, simd);
                let row = j * c.hd..(j + 1) * c.hd;
                assert_eq!(
                    bits(&alone[row.clone()]),
                    bits(&all[row.clone()]),
                    "query {j}"
                );
                if j % 2 == 1 {
                    assert_eq!(bits(&regrouped[row.clone()]), bits(&all[row]), "query {j}");
                }
            }
            // Rows of queries not selected are left alone.
            assert!(regrouped[..c.hd].iter().all(|x| x.is_nan()));
        }
    }

    /// Arguments across `exp`'s range for weights: 0 down to far below 2^-126 (the
    /// two-factor and limit paths), and minus infinity (masked rows).
    fn exp_args() -> Vec<f32> {
        let mut args = vec![
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            -87.0,
            -87.4,
            -88.0,
            -100.0,
            -133.0,
            -140.0,
        ];
        let mut x = -150f32;
        while x < 0.0 {
            args.push(x);
            x = f32::from_bits(x.to_bits() - 4099).max(x + 1e-6);
        }
        args
    }

    #[test]
    fn ggml_exp_is_within_a_few_ulp_of_exact_and_zero_for_masked_rows() {
        for lanes in [Lanes::Eight, Lanes::Sixteen] {
            let mut worst = 0f64;
            for x in exp_args() {
                let (got, want) = (v_expf(x, lanes) as f64, (x as f64).exp());
                if want < 1e-37 {
                    assert!(got < 1e-37, "{lanes:?} exp({x}) = {got}");
                    continue;
                }
                let w = want as f32;
                let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
                worst = worst.max((got - want).abs() / ulp);
            }
            // ggml gives 1.45 + 0.5 ulp for its AVX2 form; the AVX-512 form's rounding
            // of the 1 inside the last FMA measures up to 2.15 ulp here.
            assert!(worst <= 2.25, "{lanes:?}: {worst} ulp off");
            assert_eq!(v_expf(f32::NEG_INFINITY, lanes), 0.0);
            assert_eq!(v_expf(0.0, lanes), 1.0);
        }
    }

    #[test]
    fn vector_exp_and_sums_equal_the_one_lane_form_bit_for_bit() {
        if let Err(why) = test_support::avx2() {
            let name = "vector_exp_and_sums_equal_the_one_lane_form_bit_for_bit";
            test_support::skipped(name, &why);
            return;
        }
        let args = exp_args();
        for lanes in [Lanes::Eight, Lanes::Sixteen] {
            for (i, chunk) in args.chunks(KV_TILE).enumerate() {
                let mut row = [0f32; KV_TILE];
                row[..chunk.len()].copy_from_slice(chunk);
                // A maximum of 0 leaves the arguments as they are.
                let mut simd = row;
                // SAFETY: AVX2 and FMA checked above; 8 vectors of 8.
                let total = unsafe { x86::exp_and_sum(&mut simd, 8, 0.0, lanes) };
                let mut one = [0f32; KV_TILE];
                let mut want = 0f64;
                for c in 0..8 {
                    let v: [f32; 8] = std::array::from_fn(|l| v_expf(row[8 * c + l], lanes));
                    one[8 * c..8 * c + 8].copy_from_slice(&v);
                    want += match lanes {
                        Lanes::Eight => hsum(v) as f64,
                        Lanes::Sixteen if c % 2 == 0 => 0.0,
                        Lanes::Sixteen => {
                            hsum(std::array::from_fn(|l| one[8 * (c - 1) + l] + v[l])) as f64
                        }
                    };
                }
                assert_eq!(bits(&simd), bits(&one), "{lanes:?} chunk {i}");
                assert_eq!(total.to_bits(), want.to_bits(), "{lanes:?} chunk {i}");
            }
        }
    }
}
