//! The Llama-family transformer forward pass on CPU.
//!
//! `forward` takes a batch of sequence chunks (each with its own positions and KV block
//! table) and runs them together: every weight matrix is multiplied once for all the
//! batch's tokens, while attention runs per sequence over its own cache blocks.

use std::path::Path;
use std::sync::Arc;

use crate::backends::cpu::kernels::{self, KernelSet, OutMatrix, QuantizedActs};
use crate::backends::cpu::kv_cache::KvCache;
use crate::backends::cpu::thread_pool::ThreadPool;
use crate::backends::cpu::weights::{ModelWeights, QMatrix};
use crate::backends::{Numerics, SeqChunk};
use crate::block_allocator::BLOCK_SIZE;
use crate::config::{FfnActivation, ModelConfig, RopeStyle};
use crate::error::ModelError;
use crate::gguf::GgufFile;

/// Reusable buffers for `forward`, so steady-state steps do not allocate.
#[derive(Default)]
pub struct ForwardScratch {
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: QuantizedActs,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// The local (sliding-window) layers' tables, when their RoPE base differs.
    rope_cos_local: Vec<f32>,
    rope_sin_local: Vec<f32>,
    tok_pos: Vec<usize>,
    tok_seq: Vec<usize>,
    attn_items: Vec<AttnItem>,
    /// Tokens per attention tile when set (tests compare tile sizes); else `ATTN_TILE`.
    #[cfg(test)]
    attn_tile: Option<usize>,
    logits: Vec<f32>,
}

/// A loaded model ready to run.
pub struct Model {
    pub cfg: ModelConfig,
    pub file: Arc<GgufFile>,
    weights: ModelWeights,
    /// The process's compute pool, shared with every other model's engine loop.
    pool: Arc<ThreadPool>,
    kernels: KernelSet,
    numerics: Numerics,
}

impl Model {
    /// Loads the GGUF at `path` and checks it is a model we can run; its forward passes
    /// run on `pool`.
    pub fn load(path: &Path, pool: Arc<ThreadPool>) -> Result<Self, ModelError> {
        let file = Arc::new(GgufFile::open(path)?);
        Self::from_gguf(file, pool)
    }

    /// Builds the model from an already parsed file.
    pub fn from_gguf(file: Arc<GgufFile>, pool: Arc<ThreadPool>) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        let weights = ModelWeights::load(&file, &cfg)?;
        Ok(Model {
            cfg,
            file,
            weights,
            pool,
            kernels: kernels::detected(),
            numerics: Numerics::default(),
        })
    }

    /// Sets the arithmetic of the forward pass (see [`Numerics`]).
    pub fn set_numerics(&mut self, numerics: Numerics) {
        self.numerics = numerics;
    }

    /// The arithmetic of the forward pass.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// The kernels in use, for logs (e.g. `avx2+avx512-vnni`).
    pub fn kernel_name(&self) -> &'static str {
        kernels::describe()
    }

    /// Threads used by the forward pass.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The compute pool the forward pass runs on.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Runs the batch and returns, row after row, the logits of each chunk that asked
    /// for them (in batch order). It holds the compute pool's lease throughout.
    ///
    /// Within each layer every token's K/V is written to the cache before any attention
    /// of that layer runs. The scheduler relies on this: a chunk may attend to cache
    /// blocks that an earlier chunk of the same batch fills (identical prompts admitted
    /// together compute their shared blocks once), so attention must never be fused
    /// with the K/V writes of other chunks in a way that reads a block before it is written.
    pub fn forward<'s>(
        &self,
        batch: &[SeqChunk],
        kv: &mut KvCache,
        s: &'s mut ForwardScratch,
    ) -> &'s [f32] {
        let _lease = self.pool.lease();
        let cfg = &self.cfg;
        let (dim, kv_dim, hd) = (cfg.dim, cfg.kv_dim(), cfg.head_dim);
        let q_dim = cfg.q_dim();
        let n: usize = batch.iter().map(|c| c.tokens.len()).sum();
        s.tok_pos.clear();
        s.tok_seq.clear();
        for (si, c) in batch.iter().enumerate() {
            for i in 0..c.tokens.len() {
                s.tok_pos.push(c.start_pos + i);
                s.tok_seq.push(si);
            }
        }

        s.x.resize(n * dim, 0.0);
        let mut t = 0;
        for c in batch {
            for &tok in c.tokens {
                self.weights
                    .token_embd
                    .row(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
                t += 1;
            }
        }
        if let Some(e) = cfg.embedding_scale {
            // ggml_scale: one f32 multiply per element.
            s.x.iter_mut().for_each(|x| *x *= e);
        }
        let (base, pos_scale) = (cfg.rope_theta, cfg.rope_freq_scale);
        fill_rope_table(
            &s.tok_pos,
            hd,
            base,
            pos_scale,
            self.weights.rope_freqs.as_deref(),
            &mut s.rope_cos,
            &mut s.rope_sin,
        );
        if let Some(sw) = cfg.sliding_window {
            fill_rope_table(
                &s.tok_pos,
                hd,
                sw.rope_theta,
                1.0,
                None,
                &mut s.rope_cos_local,
                &mut s.rope_sin_local,
            );
        }

        s.xb.resize(n * dim, 0.0);
        s.q.resize(n * q_dim, 0.0);
        s.k.resize(n * kv_dim, 0.0);
        s.v.resize(n * kv_dim, 0.0);
        s.att.resize(n * q_dim.max(dim), 0.0);
        s.gate.resize(n * cfg.ffn_dim, 0.0);
        s.up.resize(n * cfg.ffn_dim, 0.0);

        for (l, w) in self.weights.layers.iter().enumerate() {
            rms_norm(&s.x, &w.attn_norm, cfg.rms_eps, &mut s.xb);
            self.matmul(
                &mut [(&w.wq, &mut s.q), (&w.wk, &mut s.k), (&w.wv, &mut s.v)],
                &s.xb,
                n,
                &mut s.acts,
            );
            for (bias, out) in [(&w.bq, &mut s.q), (&w.bk, &mut s.k), (&w.bv, &mut s.v)] {
                if let Some(b) = bias {
                    out.chunks_exact_mut(b.len())
                        .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
                }
            }
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                // Per-head RMSNorm (rows of head_dim) before RoPE.
                rms_norm_in_place(&mut s.q[..n * q_dim], qn, cfg.rms_eps);
                rms_norm_in_place(&mut s.k[..n * kv_dim], kn, cfg.rms_eps);
            }
            let half = hd / 2;
            let local = cfg.layer_window(l).is_some();
            let (cos_t, sin_t) = if local {
                (&s.rope_cos_local, &s.rope_sin_local)
            } else {
                (&s.rope_cos, &s.rope_sin)
            };
            for t in 0..n {
                let (cos, sin) = (
                    &cos_t[t * half..(t + 1) * half],
                    &sin_t[t * half..(t + 1) * half],
                );
                for head in s.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                    rope(head, cos, sin, cfg.rope_style);
                }
                for head in s.k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(hd) {
                    rope(head, cos, sin, cfg.rope_style);
                }
                let c = &batch[s.tok_seq[t]];
                kv.write(
                    l,
                    c.block_table,
                    s.tok_pos[t],
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            #[cfg(test)]
            let tile = s.attn_tile.unwrap_or(ATTN_TILE);
            #[cfg(not(test))]
            let tile = ATTN_TILE;
            self.attention(l, batch, kv, s, n, tile);
            self.matmul(&mut [(&w.wo, &mut s.xb)], &s.att, n, &mut s.acts);
            if let Some(pn) = &w.post_attn_norm {
                rms_norm_in_place(&mut s.xb[..n * dim], pn, cfg.rms_eps);
            }
            add_in_place(&mut s.x, &s.xb);

            rms_norm(&s.x, &w.ffn_norm, cfg.rms_eps, &mut s.xb);
            self.matmul(
                &mut [(&w.w_gate, &mut s.gate), (&w.w_up, &mut s.up)],
                &s.xb,
                n,
                &mut s.acts,
            );
            let (gate, up) = (&mut s.gate[..n * cfg.ffn_dim], &s.up[..n * cfg.ffn_dim]);
            match cfg.ffn_activation {
                FfnActivation::SwiGlu => kernels::swiglu(gate, up),
                FfnActivation::GeGlu => kernels::geglu(gate, up),
            }
            self.matmul(&mut [(&w.w_down, &mut s.xb)], &s.gate, n, &mut s.acts);
            if let Some(pn) = &w.post_ffn_norm {
                rms_norm_in_place(&mut s.xb[..n * dim], pn, cfg.rms_eps);
            }
            add_in_place(&mut s.x, &s.xb);
        }

        // Only the rows whose logits are wanted go through the (large) LM head.
        let picked: Vec<usize> = {
            let mut end = 0;
            batch
                .iter()
                .filter_map(|c| {
                    end += c.tokens.len();
                    c.want_logits.then_some(end - 1)
                })
                .collect()
        };
        let m = picked.len();
        for (i, &t) in picked.iter().enumerate() {
            s.att[i * dim..(i + 1) * dim].copy_from_slice(&s.x[t * dim..(t + 1) * dim]);
        }
        rms_norm(
            &s.att[..m * dim],
            &self.weights.output_norm,
            cfg.rms_eps,
            &mut s.xb[..m * dim],
        );
        s.logits.resize(m * cfg.vocab_size, 0.0);
        self.matmul(
            &mut [(&self.weights.output, &mut s.logits)],
            &s.xb,
            m,
            &mut s.acts,
        );
        if let Some(cap) = cfg.final_logit_softcap {
            s.logits
                .iter_mut()
                .for_each(|l| *l = (*l * (1.0 / cap)).tanh() * cap);
        }
        &s.logits
    }

    /// Multiplies the same input by several matrices in one parallel dispatch.
    fn matmul(
        &self,
        jobs: &mut [(&QMatrix, &mut Vec<f32>)],
        x: &[f32],
        n_tok: usize,
        acts: &mut QuantizedActs,
    ) {
        let k = jobs[0].0.cols;
        debug_assert!(jobs.iter().all(|(w, _)| w.cols == k));
        if n_tok == 0 {
            return;
        }
        let x = &x[..n_tok * k];
        let f32_acts = self.numerics == Numerics::F32;
        if !f32_acts
            && jobs
                .iter()
                .any(|(w, _)| kernels::wants_quantized_acts(w.ty))
        {
            acts.quantize(x, n_tok, k);
        }
        let targets: Vec<(&QMatrix, OutMatrix)> = jobs
            .iter_mut()
            .map(|(w, out)| {
                let out = &mut out[..n_tok * w.rows];
                (&**w, OutMatrix::new(out, w.rows))
            })
            .collect();
        let total: usize = targets.iter().map(|(w, _)| w.rows).sum();
        let acts = &*acts;
        let set = self.kernels;
        self.pool.for_chunks(total, 16, &|range| {
            // Map the global row range onto each matrix it overlaps.
            let mut base = 0;
            for (w, out) in &targets {
                let (lo, hi) = (range.start.max(base), range.end.min(base + w.rows));
                if lo < hi {
                    let rows = lo - base..hi - base;
                    match &w.packed {
                        // SAFETY: `for_chunks` hands out disjoint ranges.
                        _ if f32_acts => unsafe {
                            kernels::gemm_f32_acts(set, w.ty, w.bytes(), k, rows, x, *out)
                        },
                        Some(p) => {
                            // Rounding both ends up to whole groups keeps the chunks a
                            // partition of the matrix's rows, whatever the chunk size.
                            let up = |r: usize| r.next_multiple_of(kernels::PACK_ROWS).min(w.rows);
                            let rows = up(rows.start)..up(rows.end);
                            if !rows.is_empty() {
                                // SAFETY: `for_chunks` hands out disjoint ranges, and
                                // rounding both ends up keeps them disjoint.
                                unsafe { kernels::gemm_packed(p, rows, acts, *out) };
                            }
                        }
                        // SAFETY: `for_chunks` hands out disjoint ranges.
                        None => unsafe {
                            kernels::gemm(set, w.ty, w.bytes(), k, rows, acts, x, *out)
                        },
                    }
                }
                base += w.rows;
            }
        });
    }

    /// Causal grouped-query attention of every batch token over its sequence's cache,
    /// in tiles of up to `tile` tokens of one sequence times the query heads of one KV
    /// head (see `kernels::attend_tile`): each tile reads its cache rows once.
    fn attention(
        &self,
        layer: usize,
        batch: &[SeqChunk],
        kv: &KvCache,
        s: &mut ForwardScratch,
        n: usize,
        tile: usize,
    ) {
        let cfg = &self.cfg;
        let (dim, hd, kv_dim) = (cfg.q_dim(), cfg.head_dim, cfg.kv_dim());
        let window = cfg.layer_window(layer);
        let group = cfg.n_heads / cfg.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let tile = tile.max(1);
        // llama.cpp's f16 decode attention (below) is part of its arithmetic, not ours
        // to keep when activations stay f32.
        let f16_decode = self.numerics == Numerics::Int8;

        // Work items: a run of one sequence's tokens and a run of heads sharing a KV head.
        let items = &mut s.attn_items;
        items.clear();
        let mut t = 0;
        for (si, c) in batch.iter().enumerate() {
            let len = c.tokens.len();
            for a in (0..len).step_by(tile) {
                for kvh in 0..cfg.n_kv_heads {
                    items.push(AttnItem {
                        seq: si,
                        tokens: t + a..t + (a + tile).min(len),
                        heads: kvh * group..(kvh + 1) * group,
                    });
                }
            }
            t += len;
        }
        // Too few items to keep every thread busy (one sequence decoding): one query head
        // per item, which reads the cache once per head as the untiled path did.
        // (In place, as everything here: steady-state steps do not allocate.)
        if items.len() < 2 * self.pool.threads() && group > 1 {
            let whole = items.len();
            for i in 0..whole {
                for h in items[i].heads.clone() {
                    let it = AttnItem {
                        heads: h..h + 1,
                        ..items[i].clone()
                    };
                    items.push(it);
                }
            }
            items.drain(..whole);
        }
        // Longest first (later tokens attend over more positions), so the last items
        // handed out are short ones and threads finish together.
        let tok_pos = &s.tok_pos;
        items.sort_unstable_by_key(|it| std::cmp::Reverse(tok_pos[it.tokens.end - 1]));

        let att = OutMatrix::new(&mut s.att[..n * dim], dim);
        let (q, tok_seq, items) = (&s.q, &s.tok_seq, &s.attn_items);
        self.pool.for_chunks(items.len(), 1, &|range| {
            ATTN_SCRATCH.with(|cell| {
                let a = &mut *cell.borrow_mut();
                for it in &items[range] {
                    let c = &batch[it.seq];
                    let kvh = it.heads.start / group;
                    a.q.clear();
                    a.pos.clear();
                    a.round.clear();
                    a.blocked.clear();
                    // llama.cpp's CPU flash attention takes different paths, and
                    // following them keeps greedy output on llama.cpp's through a small
                    // model's near-ties: single tokens (decode) multiply an f16 copy of
                    // q and accumulate V in f16; prompt tokens stay f32, one cache row
                    // at a time in short chunks, blocked in chunks of at least its
                    // query tile (llama.cpp counts its ubatch; we count the chunk, so a
                    // sequence's results do not depend on what else is in the step).
                    let many = c.tokens.len() >= BLOCKED_MIN_TOKENS;
                    for t in it.tokens.clone() {
                        let decode = f16_decode && tok_pos[t] >= c.decode_from;
                        for h in it.heads.clone() {
                            let src = &q[t * dim + h * hd..t * dim + (h + 1) * hd];
                            let at = a.q.len();
                            a.q.extend_from_slice(src);
                            if decode {
                                kernels::round_f16(&mut a.q[at..], src);
                            }
                            a.pos.push(tok_pos[t]);
                            a.round.push(decode);
                            a.blocked.push(many);
                        }
                        debug_assert_eq!(tok_seq[t], it.seq);
                    }
                    a.out.resize(a.q.len(), 0.0);
                    let cache = kernels::CacheRows {
                        block: BLOCK_SIZE,
                        stride: kv_dim,
                        rows: |p: usize, run: usize| {
                            (
                                &kv.k_rows(layer, c.block_table, p, run)[kvh * hd..],
                                &kv.v_rows(layer, c.block_table, p, run)[kvh * hd..],
                            )
                        },
                    };
                    let queries = kernels::TileQueries {
                        q: &a.q,
                        pos: &a.pos,
                        round: &a.round,
                        window,
                        blocked: &a.blocked,
                    };
                    kernels::attend_tile(&queries, hd, scale, &cache, &mut a.tile, &mut a.out);
                    let width = it.heads.len() * hd;
                    for (i, t) in it.tokens.clone().enumerate() {
                        // SAFETY: items cover disjoint (token, head) cells of `att`, and
                        // each item is handed to one thread.
                        unsafe {
                            att.write(t, it.heads.start * hd, &a.out[i * width..(i + 1) * width])
                        };
                    }
                }
            })
        });
    }
}

/// One attention work item: tokens (batch indices) of one sequence, and query heads
/// that share one KV head.
#[derive(Clone)]
struct AttnItem {
    seq: usize,
    tokens: std::ops::Range<usize>,
    heads: std::ops::Range<usize>,
}

/// Per-thread attention buffers: the compute threads live as long as the model, so
/// steady-state steps do not allocate.
#[derive(Default)]
struct AttnScratch {
    q: Vec<f32>,
    pos: Vec<usize>,
    round: Vec<bool>,
    blocked: Vec<bool>,
    out: Vec<f32>,
    tile: kernels::TileScratch,
}

thread_local! {
    static ATTN_SCRATCH: std::cell::RefCell<AttnScratch> = std::cell::RefCell::default();
}

/// Tokens per attention tile: each cache block is read once per tile, and a prompt
/// chunk of 512 tokens still makes 16 tiles per KV head to share among threads.
const ATTN_TILE: usize = 32;

/// Chunks of at least this many tokens take blocked attention, as llama.cpp's CPU flash
/// attention does for batches of at least its query tile (`GGML_FA_TILE_Q`); shorter
/// ones take the one-query path, as there.
const BLOCKED_MIN_TOKENS: usize = 64;

/// RMSNorm of each row of `x` (row length = `w.len()`), summing squares in f64 in
/// element order as ggml does.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    // Each row's sum is one long chain of dependent f64 adds; running four rows side by
    // side lets the CPU overlap their latencies without changing any row's order.
    const ROWS: usize = 4;
    let mut ss = [0f64; ROWS];
    for (xs, os) in x.chunks(ROWS * d).zip(out.chunks_mut(ROWS * d)) {
        let rows = xs.len() / d;
        ss.iter_mut().for_each(|s| *s = 0.0);
        if rows == ROWS {
            for i in 0..d {
                for (r, s) in ss.iter_mut().enumerate() {
                    let v = xs[r * d + i];
                    *s += (v * v) as f64;
                }
            }
        } else {
            for (r, s) in ss.iter_mut().enumerate().take(rows) {
                *s = xs[r * d..(r + 1) * d].iter().map(|&v| (v * v) as f64).sum();
            }
        }
        for (r, (xr, or)) in xs.chunks_exact(d).zip(os.chunks_exact_mut(d)).enumerate() {
            let scale = 1.0 / ((ss[r] / d as f64) as f32 + eps).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
                *o = v * scale * g;
            }
        }
    }
}

/// RMSNorm of each row of `x` in place (row length = `w.len()`), as [`rms_norm`].
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ss: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// Cos/sin of every (token, frequency) pair for RoPE base `base`, computed as ggml does
/// (iterated powers, f32) so positions far into the context round the same way;
/// `pos_scale` is linear scaling's position multiplier, `freqs` Llama 3.1's divisors.
pub(crate) fn fill_rope_table(
    tok_pos: &[usize],
    head_dim: usize,
    base: f32,
    pos_scale: f32,
    freqs: Option<&[f32]>,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let half = head_dim / 2;
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    cos.resize(tok_pos.len() * half, 0.0);
    sin.resize(tok_pos.len() * half, 0.0);
    for (t, &pos) in tok_pos.iter().enumerate() {
        let mut theta = pos as f32;
        for i in 0..half {
            let th = match freqs {
                Some(f) => theta / f[i],
                None => theta,
            } * pos_scale;
            cos[t * half + i] = th.cos();
            sin[t * half + i] = th.sin();
            theta *= theta_scale;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotates one head in place by `cos`/`sin` (one per pair): pairs `(2i, 2i+1)` or
/// `(i, i + half)` as `style` says.
pub(crate) fn rope(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Halves => (i, i + half),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos[i] - x1 * sin[i];
        head[b] = x0 * sin[i] + x1 * cos[i];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block_allocator::BLOCK_SIZE;
    // Re-exported: other modules' tests import it from here.
    pub(crate) use crate::gguf::tiny::tiny_model;

    /// A 2-layer llama GGUF with random weights in several quant types.
    pub(crate) fn tiny_llama(arch: &str, skip: Option<&str>) -> Vec<u8> {
        tiny_model(arch, skip, 2, None)
    }

    fn load(bytes: Vec<u8>) -> Result<Model, ModelError> {
        Model::from_gguf(
            Arc::new(GgufFile::from_bytes(bytes)?),
            Arc::new(ThreadPool::new(2).unwrap()),
        )
    }

    #[test]
    fn tiny_model_decodes_token_by_token_like_one_prefill() {
        decode_matches_prefill(tiny_llama("llama", None));
    }

    /// Every supported architecture: Qwen2's halves RoPE, Qwen3's Q/K norms and head
    /// size, Gemma 3's six-layer local/global pattern (window 5 < the 18 tokens), GeGLU,
    /// post norms and embedding scale.
    #[test]
    fn every_architecture_decodes_like_its_prefill() {
        for (arch, layers, window) in [
            ("qwen2", 2, None),
            ("qwen3", 2, None),
            ("gemma3", 6, Some(5)),
        ] {
            let model = decode_matches_prefill(tiny_model(arch, None, layers, window));
            assert_eq!(model.cfg.architecture, arch);
        }
        let g = load(tiny_model("gemma3", None, 6, Some(5))).unwrap();
        assert_eq!(g.cfg.q_dim(), 512);
        assert_eq!(g.cfg.layer_window(0), Some(5));
        assert_eq!(g.cfg.layer_window(5), None);
        assert_eq!(g.cfg.layer_rope(0), (10_000.0, 1.0));
        assert_eq!(g.cfg.embedding_scale, Some(16.0));
    }

    /// A Gemma 3 local layer attends over its window only: with one (local) layer, the
    /// last token's logits do not depend on tokens before its window, and do on those in it.
    #[test]
    fn gemma_local_layers_see_only_their_window() {
        let model = load(tiny_model("gemma3", None, 1, Some(4))).unwrap();
        assert_eq!(model.cfg.layer_window(0), Some(4));
        let last = |tokens: &[u32]| -> Vec<f32> {
            let mut kv = KvCache::new(&model.cfg, 2);
            let mut s = ForwardScratch::default();
            model
                .forward(
                    &[SeqChunk {
                        tokens,
                        start_pos: 0,
                        block_table: &[0, 1],
                        want_logits: true,
                        decode_from: usize::MAX,
                        device_greedy: false,
                    }],
                    &mut kv,
                    &mut s,
                )
                .to_vec()
        };
        let base: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 48).collect();
        let mut old = base.clone();
        old[15] = (old[15] + 1) % 48; // position 15 < 19 - 4 + 1: outside the window
        let mut inside = base.clone();
        inside[16] = (inside[16] + 1) % 48; // the window's first position
        let want = last(&base);
        assert_eq!(last(&old), want);
        assert_ne!(last(&inside), want);
    }

    /// Runs `bytes`'s model over 18 tokens as one prefill, in 3-token chunks through a
    /// reordered block table, and one token at a time, and compares the logits.
    fn decode_matches_prefill(bytes: Vec<u8>) -> Model {
        let model = load(bytes).unwrap();
        let arch = model.cfg.architecture.clone();
        let tokens: Vec<u32> = vec![
            3, 17, 5, 40, 22, 9, 11, 30, 1, 2, 44, 8, 6, 19, 27, 33, 12, 7,
        ];
        let table: Vec<u32> = (0..(tokens.len().div_ceil(BLOCK_SIZE)) as u32).collect();
        let mut kv = KvCache::new(&model.cfg, table.len());
        let mut s = ForwardScratch::default();
        let whole = model
            .forward(
                &[SeqChunk {
                    tokens: &tokens,
                    start_pos: 0,
                    block_table: &table,
                    want_logits: true,
                    decode_from: usize::MAX,
                    device_greedy: false,
                }],
                &mut kv,
                &mut s,
            )
            .to_vec();
        assert_eq!(whole.len(), model.cfg.vocab_size);
        assert!(whole.iter().all(|x| x.is_finite()));

        // Same sequence in 3-token chunks (the same f32 attention path) through a cache
        // whose blocks are in another order: paging and positions must be exact.
        let table2: Vec<u32> = table.iter().rev().cloned().collect();
        let mut kv3 = KvCache::new(&model.cfg, table.len());
        let mut chunked = Vec::new();
        for (i, c) in tokens.chunks(3).enumerate() {
            chunked = model
                .forward(
                    &[SeqChunk {
                        tokens: c,
                        start_pos: i * 3,
                        block_table: &table2,
                        want_logits: true,
                        decode_from: usize::MAX,
                        device_greedy: false,
                    }],
                    &mut kv3,
                    &mut s,
                )
                .to_vec();
        }
        let chunk_diff = whole
            .iter()
            .zip(&chunked)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            chunk_diff < 1e-3,
            "{arch}: chunked prefill differs by {chunk_diff}"
        );

        // One token per step: the decode path.
        let mut kv2 = KvCache::new(&model.cfg, table.len());
        let mut last = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let chunk = [*t];
            last = model
                .forward(
                    &[SeqChunk {
                        tokens: &chunk,
                        start_pos: i,
                        block_table: &table2,
                        want_logits: true,
                        decode_from: 0,
                        device_greedy: false,
                    }],
                    &mut kv2,
                    &mut s,
                )
                .to_vec();
        }
        let max_diff = whole
            .iter()
            .zip(&last)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = whole.iter().fold(0f32, |m, a| m.max(a.abs()));
        // Decode differs only by its f16 q and accumulator, which a random network
        // amplifies to a few percent of the logit range.
        assert!(
            max_diff <= 0.05 * scale.max(1.0),
            "{arch}: max diff {max_diff} (logit scale {scale})"
        );
        assert_eq!(
            crate::sampling::argmax(&whole),
            crate::sampling::argmax(&last),
            "{arch}"
        );
        model
    }

    /// With f32 numerics nothing is rounded to 8 bits or to f16 in flight (the KV cache
    /// still stores f16, alike on both paths): decoding token by token gives the
    /// one-prefill logits to float rounding, where the int8 arithmetic moves them by
    /// about 1% of the logit range (`decode_matches_prefill`; 0.12 of 10 for llama).
    #[test]
    fn with_f32_numerics_decode_equals_prefill_to_float_rounding() {
        for (arch, layers, window) in [
            ("llama", 2, None),
            ("qwen3", 2, None),
            ("gemma3", 6, Some(5)),
        ] {
            let mut model = load(tiny_model(arch, None, layers, window)).unwrap();
            model.set_numerics(Numerics::F32);
            let tokens: Vec<u32> = (0..18).map(|i| (i * 11 + 5) % 48).collect();
            let table: Vec<u32> = (0..(tokens.len().div_ceil(BLOCK_SIZE)) as u32).collect();
            let mut s = ForwardScratch::default();
            fn chunk<'a>(
                tokens: &'a [u32],
                table: &'a [u32],
                start_pos: usize,
                decode_from: usize,
            ) -> SeqChunk<'a> {
                SeqChunk {
                    tokens,
                    start_pos,
                    block_table: table,
                    want_logits: true,
                    decode_from,
                    device_greedy: false,
                }
            }
            let mut kv = KvCache::new(&model.cfg, table.len());
            let whole = model
                .forward(&[chunk(&tokens, &table, 0, usize::MAX)], &mut kv, &mut s)
                .to_vec();
            let mut kv2 = KvCache::new(&model.cfg, table.len());
            let mut last = Vec::new();
            for (i, t) in tokens.iter().enumerate() {
                last = model
                    .forward(
                        &[chunk(std::slice::from_ref(t), &table, i, 0)],
                        &mut kv2,
                        &mut s,
                    )
                    .to_vec();
            }
            let scale = whole.iter().fold(0f32, |m, a| m.max(a.abs())).max(1.0);
            let diff = whole
                .iter()
                .zip(&last)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-4 * scale, "{arch}: {diff} (scale {scale})");
        }
    }

    /// Attention tiles (any number of tokens, whole GQA groups or single heads) change
    /// which cache reads are shared, never the arithmetic: the logits are identical bit
    /// for bit, for prefill chunks and for decode steps batched with them.
    #[test]
    fn attention_tile_size_does_not_change_a_bit() {
        let model = load(tiny_llama("llama", None)).unwrap();
        let prompt: Vec<u32> = (0..45).map(|i| (i * 7 + 3) % 48).collect();
        let other: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 48).collect();
        let run = |tile: usize| -> Vec<u32> {
            let mut kv = KvCache::new(&model.cfg, 8);
            let mut s = ForwardScratch {
                attn_tile: Some(tile),
                ..Default::default()
            };
            let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..4).collect(), (4..8).collect());
            let mut bits = Vec::new();
            // A prompt in chunks of 20 across block edges, then decode steps of both
            // sequences together, the second still prefilling.
            for (i, c) in prompt.chunks(20).enumerate() {
                let l = model.forward(
                    &[SeqChunk {
                        tokens: c,
                        start_pos: i * 20,
                        block_table: &ta,
                        want_logits: true,
                        decode_from: prompt.len(),
                        device_greedy: false,
                    }],
                    &mut kv,
                    &mut s,
                );
                bits.extend(l.iter().map(|x| x.to_bits()));
            }
            for step in 0..3 {
                let tok = [(step * 11 + 2) as u32];
                let l = model.forward(
                    &[
                        SeqChunk {
                            tokens: &tok,
                            start_pos: prompt.len() + step,
                            block_table: &ta,
                            want_logits: true,
                            decode_from: prompt.len(),
                            device_greedy: false,
                        },
                        SeqChunk {
                            tokens: &other[step * 3..step * 3 + 3],
                            start_pos: step * 3,
                            block_table: &tb,
                            want_logits: true,
                            decode_from: 6,
                            device_greedy: false,
                        },
                    ],
                    &mut kv,
                    &mut s,
                );
                bits.extend(l.iter().map(|x| x.to_bits()));
            }
            bits
        };
        let want = run(1);
        assert_eq!(want.len(), (3 + 3 * 2) * model.cfg.vocab_size);
        for tile in [2, 7, 16, 32, 64] {
            assert!(run(tile) == want, "tile {tile} changed the logits");
        }
    }

    #[test]
    fn a_sequence_batched_with_another_gets_the_same_logits() {
        let model = load(tiny_llama("llama", None)).unwrap();
        let a: Vec<u32> = vec![3, 17, 5, 40, 22];
        let b: Vec<u32> = vec![9, 9, 1, 2, 44, 8, 6];
        let (ta, tb) = (vec![0u32], vec![1u32]);
        let mut kv = KvCache::new(&model.cfg, 2);
        let mut s = ForwardScratch::default();
        let alone = model
            .forward(
                &[SeqChunk {
                    tokens: &a,
                    start_pos: 0,
                    block_table: &ta,
                    want_logits: true,
                    decode_from: usize::MAX,
                    device_greedy: false,
                }],
                &mut kv,
                &mut s,
            )
            .to_vec();
        let both = model
            .forward(
                &[
                    SeqChunk {
                        tokens: &b,
                        start_pos: 0,
                        block_table: &tb,
                        want_logits: true,
                        decode_from: usize::MAX,
                        device_greedy: false,
                    },
                    SeqChunk {
                        tokens: &a,
                        start_pos: 0,
                        block_table: &ta,
                        want_logits: true,
                        decode_from: usize::MAX,
                        device_greedy: false,
                    },
                ],
                &mut kv,
                &mut s,
            )
            .to_vec();
        assert_eq!(&both[model.cfg.vocab_size..], &alone[..]);
    }

    #[test]
    fn missing_tensors_and_unknown_architectures_are_named() {
        let e = load(tiny_llama("llama", Some("blk.1.ffn_up.weight")))
            .err()
            .unwrap();
        assert!(e.to_string().contains("blk.1.ffn_up.weight"), "{e}");
        let e = load(tiny_llama("gpt-neox", None)).err().unwrap();
        assert!(e.to_string().contains("gpt-neox"), "{e}");
        assert!(e.to_string().contains("gemma3"), "{e}");
        // Architecture-specific tensors are required, not silently skipped.
        for (arch, layers, window, missing) in [
            ("qwen3", 2, None, "blk.1.attn_k_norm.weight"),
            ("gemma3", 6, Some(5), "blk.3.post_ffw_norm.weight"),
        ] {
            let e = load(tiny_model(arch, Some(missing), layers, window))
                .err()
                .unwrap();
            assert!(e.to_string().contains(missing), "{e}");
        }
        let e = load(tiny_model("gemma3", None, 6, None)).err().unwrap();
        assert!(e.to_string().contains("sliding_window"), "{e}");
    }
}
