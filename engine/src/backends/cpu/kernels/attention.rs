//! Causal attention over the paged f16 KV cache, a tile of queries at a time.
//!
//! Attending one query at a time reads the sequence's whole cache once per query token
//! and head: at a 5,800-token context that is ~270 MB per token, so a long prompt's
//! prefill ran at memory speed. A tile is a set of queries that read the same cache
//! rows (the tokens of one chunk, times the query heads sharing one KV head): each
//! cache block is read and widened from f16 once per tile, into a small f32 buffer
//! that stays in L1, and every query of the tile folds it in from there.
//!
//! Prefill queries (f32 throughout, as llama.cpp's multi-token path) go through blocked
//! attention ([`super::prefill_attention`]). Decode queries (llama.cpp's one-token path,
//! f16 accumulator) run exactly the operations of the one-query path, in the same order
//! ([`attend`] block after block, then the division by the softmax sum), so their tiled
//! result equals the untiled one bit for bit (see the test below).

use super::prefill_attention::{attend_prefill, Lanes, PrefillScratch};
use super::{attend, scale, widen_rows, KernelSet, OnlineSoftmax};

/// Rows the 512-bit kernels take per call (one cache block).
const RUN: usize = 16;

/// The queries of one tile: all attend over the same sequence and KV head.
pub struct TileQueries<'a> {
    /// `pos.len()` query vectors of `head_dim` floats, back to back (decode queries
    /// already rounded to f16, as llama.cpp's decode path does).
    pub q: &'a [f32],
    /// Each query's position: it attends over cache positions `0..=pos` (or the last
    /// `window` of them).
    pub pos: &'a [usize],
    /// Sliding-window attention (Gemma 3's local layers): a query at `pos` sees only
    /// positions `pos + 1 - window ..= pos`, as llama.cpp's standard SWA mask.
    pub window: Option<usize>,
    /// Each query's path: `true` for llama.cpp's decode path (f16 accumulator), `false`
    /// for its f32 prefill path.
    pub round: &'a [bool],
    /// For the f32 prefill queries: `true` when they take llama.cpp's path for batches
    /// of many tokens (blocked attention, [`super::prefill_attention`]), `false` for the
    /// one-query path.
    pub blocked: &'a [bool],
}

/// Reusable buffers for [`attend_tile`].
#[derive(Default)]
pub struct TileScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    state: Vec<OnlineSoftmax>,
    /// The prefill queries of the tile, and which queries take the one-query path.
    prefill: Vec<usize>,
    one_query: Vec<bool>,
    blocked: PrefillScratch,
}

/// Where the tile's cache rows are.
pub struct CacheRows<F> {
    /// Positions per cache block: a run of rows handed out never crosses a block.
    pub block: usize,
    /// Distance between consecutive rows (all KV heads of one token).
    pub stride: usize,
    /// `rows(p, n)`: K and V (f16 bits) of positions `p..p + n`, all in one block, each
    /// slice starting at this tile's KV head in the first row.
    pub rows: F,
}

/// Attention of every query of `t` over its positions `0..=pos`, normalised, into `out`
/// (`head_dim` floats per query, in the queries' order).
pub fn attend_tile<'c, F>(
    t: &TileQueries,
    head_dim: usize,
    scale_by: f32,
    cache: &CacheRows<F>,
    s: &mut TileScratch,
    out: &mut [f32],
) where
    F: Fn(usize, usize) -> (&'c [u16], &'c [u16]),
{
    #[cfg(target_arch = "x86_64")]
    let wide = super::avx512::detected();
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    // Blocked attention follows llama.cpp's AVX-512 build where our AVX-512 kernels run.
    let lanes = if wide { Lanes::Sixteen } else { Lanes::Eight };
    attend_tile_with(t, head_dim, scale_by, cache, s, out, wide, lanes);
}

/// [`attend_tile`], with the AVX-512 kernels when `wide` (and they apply), and blocked
/// attention in the form of llama.cpp's build for `lanes`.
#[allow(clippy::too_many_arguments)]
fn attend_tile_with<'c, F>(
    t: &TileQueries,
    head_dim: usize,
    scale_by: f32,
    cache: &CacheRows<F>,
    s: &mut TileScratch,
    out: &mut [f32],
    wide: bool,
    lanes: Lanes,
) where
    F: Fn(usize, usize) -> (&'c [u16], &'c [u16]),
{
    let (nq, hd) = (t.pos.len(), head_dim);
    let tile_len = nq.checked_mul(hd).expect("tile size overflows");
    assert!(t.q.len() == tile_len && t.round.len() == nq && out.len() == tile_len);
    assert!(t.blocked.len() == nq);
    assert!(cache.block.max(RUN).checked_mul(hd).is_some());
    assert!(cache.block > 0 && cache.stride >= hd);
    // Prefill queries: blocked attention (every head size the kernels take).
    s.prefill.clear();
    s.one_query.clear();
    let kernel_fits = hd.is_multiple_of(8);
    for j in 0..nq {
        let prefill = kernel_fits && t.blocked[j] && !t.round[j];
        if prefill {
            s.prefill.push(j);
        }
        s.one_query.push(!prefill);
    }
    if !s.prefill.is_empty() {
        let simd = super::detected() == KernelSet::Avx2;
        let (sel, scratch) = (&s.prefill, &mut s.blocked);
        attend_prefill(t, sel, hd, scale_by, cache, scratch, out, lanes, simd);
        if s.prefill.len() == nq {
            return;
        }
    }
    // The 512-bit kernels take the common head sizes and blocks of up to 16 rows, and
    // whole-prefix attention.
    let wide = wide && matches!(hd, 64 | 128) && cache.block <= RUN && t.window.is_none();
    let one_query = std::mem::take(&mut s.one_query);
    let Some(last) = (0..nq).filter(|&j| one_query[j]).map(|j| t.pos[j]).max() else {
        s.one_query = one_query;
        return;
    };
    let end = last + 1;
    // First position query `j` sees.
    let first = |j: usize| match t.window {
        Some(w) => t.pos[j] + 1 - w.clamp(1, t.pos[j] + 1),
        None => 0,
    };
    let start = (0..nq)
        .filter(|&j| one_query[j])
        .map(first)
        .min()
        .unwrap_or(0);
    s.k.resize(cache.block.max(RUN) * hd, 0.0);
    s.v.resize(cache.block * hd, 0.0);
    s.state.clear();
    s.state.resize(nq, OnlineSoftmax::default());
    for (j, o) in out.chunks_exact_mut(hd).enumerate() {
        if one_query[j] {
            o.fill(0.0);
        }
    }
    // The rows of the block from `p`, up to the end of its cache block.
    let block_at = |p: usize| {
        let run = (cache.block - p % cache.block).min(end - p);
        (run, (cache.rows)(p, run))
    };
    let mut p = start;
    // The block prefetched by the previous iteration (looked up once).
    let mut ahead = None;
    while p < end {
        let (run, (k, v)) = ahead.take().unwrap_or_else(|| block_at(p));
        assert!(
            super::rows_fit(k.len(), run, cache.stride, hd)
                && super::rows_fit(v.len(), run, cache.stride, hd)
        );
        // The next block's rows come from memory while this one is folded in: a decode
        // step reads every sequence's cache once, more than the caches hold.
        if p + run < end {
            let next = block_at(p + run);
            prefetch_rows(next.1 .0, cache.stride, hd);
            prefetch_rows(next.1 .1, cache.stride, hd);
            ahead = Some(next);
        }
        widen_rows(&mut s.v, v, cache.stride, run, hd);
        if !wide {
            widen_rows(&mut s.k, k, cache.stride, run, hd);
        }
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `wide` only when `avx512::detected()` (or, in tests, `cpu_has()`).
            unsafe { super::avx512::widen_k_pairs(&mut s.k, k, cache.stride, run, hd) };
        }
        #[cfg(target_arch = "x86_64")]
        if wide {
            wide_queries(t, &one_query, hd, p, run, scale_by, s, out);
            p += run;
            continue;
        }
        for (j, &pos) in t.pos.iter().enumerate() {
            if !one_query[j] {
                continue;
            }
            let lo = first(j).max(p);
            let hi = (p + run).min(pos + 1);
            if lo >= hi {
                continue;
            }
            // The query's own run: the rows of this block within its window.
            let off = (lo - p) * hd;
            let (q, o) = (&t.q[j * hd..(j + 1) * hd], &mut out[j * hd..(j + 1) * hd]);
            attend(
                q,
                &s.k[off..],
                &s.v[off..],
                hd,
                hi - lo,
                scale_by,
                t.round[j],
                &mut s.state[j],
                o,
            );
        }
        p += run;
    }
    for (j, o) in out.chunks_exact_mut(hd).enumerate() {
        if one_query[j] {
            scale(o, 1.0 / s.state[j].sum, false);
        }
    }
    s.one_query = one_query;
}

/// Asks the CPU to bring the first `hd` values of each row of `rows` (at `stride`) into
/// its caches; a hint, with no effect on results.
fn prefetch_rows(rows: &[u16], stride: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut at = 0;
        while at < rows.len() {
            let row = &rows[at..rows.len().min(at + hd)];
            // 32 f16 values per 64-byte line.
            for line in row.chunks(32) {
                // SAFETY: a prefetch of an address inside `rows` (it never faults).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
            }
            at += stride;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (rows, stride, hd);
}

/// The queries of `t` marked in `take` over the block of `run` rows from `p` already
/// widened in `s`, with the 512-bit kernels: consecutive queries that fold the same rows
/// the same way (equal run and path) go together, up to 4 (2 for 128-float heads).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn wide_queries(
    t: &TileQueries,
    take: &[bool],
    hd: usize,
    p: usize,
    run: usize,
    scale_by: f32,
    s: &mut TileScratch,
    out: &mut [f32],
) {
    use super::avx512::attend_block;
    let nq = t.pos.len();
    let rows = |j: usize| (take[j] && t.pos[j] >= p).then(|| run.min(t.pos[j] + 1 - p));
    let most = if hd == 64 { 4 } else { 2 };
    let mut j = 0;
    while j < nq {
        let Some(n) = rows(j) else {
            j += 1;
            continue;
        };
        let mut g = 1;
        while g < most && j + g < nq && rows(j + g) == Some(n) && t.round[j + g] == t.round[j] {
            g += 1;
        }
        let (q, o) = (&t.q[j * hd..(j + g) * hd], &mut out[j * hd..(j + g) * hd]);
        let (st, round) = (&mut s.state[j..j + g], t.round[j]);
        let (k, v) = (&s.k[..], &s.v[..]);
        // SAFETY: called only when `avx512::detected()` (or, in tests, `cpu_has()`); the
        // kernel checks the lengths.
        unsafe {
            match (hd, g) {
                (64, 1) => attend_block::<8, 4, 1>(q, k, v, n, scale_by, round, st, o),
                (64, 2) => attend_block::<8, 4, 2>(q, k, v, n, scale_by, round, st, o),
                (64, 3) => attend_block::<8, 4, 3>(q, k, v, n, scale_by, round, st, o),
                (64, _) => attend_block::<8, 4, 4>(q, k, v, n, scale_by, round, st, o),
                (_, 1) => attend_block::<16, 8, 1>(q, k, v, n, scale_by, round, st, o),
                _ => attend_block::<16, 8, 2>(q, k, v, n, scale_by, round, st, o),
            }
        }
        j += g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kernels::round_f16;
    use crate::backends::cpu::kernels::test_support::pseudo;
    use half::f16;

    /// The one-query path the tiles replaced: per query, walk the f32 cache (f16 values)
    /// block by block with `attend`, then divide by the sum.
    #[allow(clippy::too_many_arguments)]
    fn untiled(
        q: &[f32],
        first: usize,
        pos: usize,
        round: bool,
        k32: &[f32],
        v32: &[f32],
        stride: usize,
        block: usize,
        scale_by: f32,
    ) -> Vec<f32> {
        let hd = q.len();
        let mut state = OnlineSoftmax::default();
        let mut out = vec![0f32; hd];
        let mut p = first;
        while p <= pos {
            let run = (block - p % block).min(pos + 1 - p);
            attend(
                q,
                &k32[p * stride..],
                &v32[p * stride..],
                stride,
                run,
                scale_by,
                round,
                &mut state,
                &mut out,
            );
            p += run;
        }
        scale(&mut out, 1.0 / state.sum, false);
        out
    }

    #[test]
    fn tiled_attention_equals_untiled_bit_for_bit_and_prefill_queries_take_the_blocked_kernel() {
        #[cfg(target_arch = "x86_64")]
        let wide = crate::backends::cpu::kernels::avx512::cpu_has();
        #[cfg(not(target_arch = "x86_64"))]
        let wide = false;
        if !wide {
            crate::backends::cpu::kernels::test_support::skipped(
                "tiled_attention_equals_untiled_bit_for_bit_and_prefill_queries_take_the_blocked_kernel (avx512 part)",
                "the CPU lacks AVX-512F/DQ/VL or the AVX2 set",
            );
        }
        // 64 and 128: the in-register kernels; 40: the general one.
        for hd in [64usize, 128, 40] {
            let (block, kv_heads, ctx) = (16, 3, 150);
            let stride = kv_heads * hd;
            // The cache holds f16 values: K and V as the f16 cache and as f32 copies.
            let k32: Vec<f32> = pseudo(ctx * stride, 1 + hd as u64)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            let v32 = pseudo(ctx * stride, 2 + hd as u64);
            let mut k16 = vec![0u16; k32.len()];
            let mut v16 = vec![0u16; v32.len()];
            crate::backends::cpu::kernels::f32_to_f16(&mut k16, &k32);
            crate::backends::cpu::kernels::f32_to_f16(&mut v16, &v32);
            let (mut k32r, mut v32r) = (vec![0f32; k32.len()], vec![0f32; v32.len()]);
            round_f16(&mut k32r, &k32);
            round_f16(&mut v32r, &v32);
            let kvh = 1;
            let cache = CacheRows {
                block,
                stride,
                rows: |p: usize, n: usize| {
                    assert!(p % block + n <= block);
                    let at = p * stride + kvh * hd;
                    (
                        &k16[at..at + n * stride - kvh * hd],
                        &v16[at..at + n * stride - kvh * hd],
                    )
                },
            };
            // A prefill tile (chunk of 21 tokens from position 97, over block edges, as
            // 3 heads), and a tile mixing prefill and decode queries.
            let scale_by = 1.0 / (hd as f32).sqrt();
            for (positions, decode_from) in [
                ((97..118).collect::<Vec<_>>(), usize::MAX),
                (vec![0, 1, 15, 16, 17, 149], 16),
            ] {
                let heads = 3;
                let mut pos = Vec::new();
                let mut round = Vec::new();
                let mut q = Vec::new();
                let qs = pseudo(positions.len() * heads * hd, 7 + hd as u64);
                for (i, &p) in positions.iter().enumerate() {
                    for h in 0..heads {
                        let src = &qs[(i * heads + h) * hd..][..hd];
                        let dec = p >= decode_from;
                        let mut qh = vec![0f32; hd];
                        if dec {
                            round_f16(&mut qh, src);
                        } else {
                            qh.copy_from_slice(src);
                        }
                        q.extend(qh);
                        pos.push(p);
                        round.push(dec);
                    }
                }
                // Whole-prefix attention, and sliding windows shorter and longer than a
                // block and than the context (as Gemma 3's local layers).
                // Prefill queries on the one-query path, then on the blocked one.
                let windows = [None, Some(1), Some(5), Some(16), Some(40), Some(1000)];
                for (window, many) in windows.into_iter().flat_map(|w| [(w, false), (w, true)]) {
                    let blocked_flags = vec![many; pos.len()];
                    let tile = TileQueries {
                        q: &q,
                        pos: &pos,
                        round: &round,
                        window,
                        blocked: &blocked_flags,
                    };
                    let lanes = Lanes::Sixteen;
                    let mut out = vec![f32::NAN; q.len()];
                    let mut s = TileScratch::default();
                    let (c, sc) = (&cache, &mut s);
                    attend_tile_with(&tile, hd, scale_by, c, sc, &mut out, false, lanes);
                    if wide {
                        // The 512-bit kernels give the same bits (sharing the scratch, as a
                        // thread's tiles do).
                        let mut o2 = vec![f32::NAN; q.len()];
                        let (c, sc) = (&cache, &mut s);
                        attend_tile_with(&tile, hd, scale_by, c, sc, &mut o2, true, lanes);
                        let same = out.iter().zip(&o2).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "avx512 differs, hd={hd}");
                    }
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    let simd = crate::backends::cpu::kernels::detected() == KernelSet::Avx2;
                    let mut blocked = PrefillScratch::default();
                    for j in 0..pos.len() {
                        if many && !round[j] && hd % 8 == 0 {
                            // The blocked kernel, this query alone (the same bits whatever
                            // the tile; see `prefill_attention`).
                            let mut alone = vec![f32::NAN; q.len()];
                            let (c, b) = (&cache, &mut blocked);
                            let o = &mut alone;
                            attend_prefill(&tile, &[j], hd, scale_by, c, b, o, lanes, simd);
                            let row = j * hd..(j + 1) * hd;
                            assert_eq!(bits(&out[row.clone()]), bits(&alone[row]), "query {j}");
                            continue;
                        }
                        let first = window.map_or(0, |w| (pos[j] + 1).saturating_sub(w));
                        let want = untiled(
                            &q[j * hd..(j + 1) * hd],
                            first,
                            pos[j],
                            round[j],
                            &k32r[kvh * hd..],
                            &v32r[kvh * hd..],
                            stride,
                            block,
                            scale_by,
                        );
                        let got = &out[j * hd..(j + 1) * hd];
                        assert_eq!(
                            bits(got),
                            bits(&want),
                            "hd={hd} query {j} at {} window {window:?}",
                            pos[j]
                        );
                    }
                    assert!(out.iter().all(|x| x.is_finite()));
                }
            }
            assert_eq!(f16::from_f32(k32[5]).to_bits(), k16[5]);
        }
    }
}
