//! A step's host-side plan: where each chunk's tokens go on the device, their K/V
//! slots and block tables, all packed into one `int` array uploaded in one copy.
//!
//! Single-token chunks (decoding sequences) take the first device rows, in batch order,
//! so one `paged_attention_decode` launch covers them all; each longer chunk (a prompt
//! piece) follows as a run of rows for its own `paged_attention_prefill` launch. The
//! rows whose logits are wanted are listed in batch order, so the LM head's output is
//! already in the order `sample` expects.

use crate::backends::SeqChunk;
use crate::block_allocator::BLOCK_SIZE;
use crate::error::ModelError;

/// A token's K/V row in a layer's cache: `block_table[pos / 16] * 16 + pos % 16`, as
/// the CPU `KvCache` addresses it and ABI.md's `kv_store` expects.
pub fn slot(block_table: &[u32], pos: usize) -> usize {
    block_table[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
}

/// How a step is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As the batch needs: no padding, tables as wide as the longest needs.
    Eager,
    /// A decode batch padded to `bucket` rows, tables `max_blocks` wide, so that every
    /// offset and size matches the bucket's captured graph.
    Graph {
        /// Rows (sequences) including the dummy ones.
        bucket: usize,
        /// Table width of every graph step.
        max_blocks: usize,
    },
}

/// One prompt chunk's attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillRun {
    /// Its first device row.
    pub row: usize,
    /// Its tokens.
    pub n_q: usize,
    /// Position of its first token.
    pub start_pos: usize,
    /// Index of its block table among the step's tables.
    pub table: usize,
}

/// Offsets (in `int`s) of each array in [`StepPlan::ints`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    /// Token ids, one per device row.
    pub tokens: usize,
    /// Positions, one per row.
    pub pos: usize,
    /// Cache slots, one per row.
    pub slots: usize,
    /// Context lengths (position + 1) of the decode rows.
    pub ctx_lens: usize,
    /// Block tables, `max_blocks` each: decode rows first, then prefill chunks.
    pub tables: usize,
    /// Device rows whose logits are wanted, in batch order.
    pub picked: usize,
}

/// A step's layout and its packed device inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Device rows (tokens), dummy rows included.
    pub n_rows: usize,
    /// Leading rows that decode (one token per sequence), dummy rows included.
    pub n_decode: usize,
    /// The prompt chunks after them.
    pub prefill: Vec<PrefillRun>,
    /// Width of each block table.
    pub max_blocks: usize,
    /// Device rows whose logits are wanted, in batch order.
    pub picked: Vec<usize>,
    /// Every array, packed for one upload.
    pub ints: Vec<i32>,
    /// Where each array starts in `ints`.
    pub offsets: Offsets,
}

/// Checked `usize` → `int` for a value the kernels read.
fn int(v: usize, what: &str) -> Result<i32, ModelError> {
    i32::try_from(v).map_err(|_| ModelError::Runtime(format!("{what} {v} does not fit a CUDA int")))
}

/// Plans `batch` for a cache of `n_blocks` blocks (block `n_blocks` is the runtime's
/// scratch block, which dummy rows and table padding point at) and a vocabulary of
/// `vocab` tokens. `Ok(None)` when a graph layout cannot hold the batch (a sequence
/// needs a wider table, or a chunk has several tokens): run it eagerly instead.
pub fn plan(
    batch: &[SeqChunk<'_>],
    layout: Layout,
    n_blocks: usize,
    vocab: usize,
) -> Result<Option<StepPlan>, ModelError> {
    let scratch = n_blocks;
    // Validate what the kernels would read out of bounds on: token ids, block ids and
    // tables too short for the chunk's positions (the CPU runtime panics on these).
    let mut widest = 1;
    for c in batch {
        if c.tokens.is_empty() {
            return Err(ModelError::Runtime("a step's chunk has no tokens".into()));
        }
        if let Some(&t) = c.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Runtime(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let end = c.start_pos + c.tokens.len();
        let needed = end.div_ceil(BLOCK_SIZE);
        if c.block_table.len() < needed {
            return Err(ModelError::Runtime(format!(
                "a block table of {} blocks does not cover position {}",
                c.block_table.len(),
                end.saturating_sub(1)
            )));
        }
        if let Some(&b) = c.block_table[..needed]
            .iter()
            .find(|&&b| b as usize >= n_blocks)
        {
            return Err(ModelError::Runtime(format!(
                "block {b} is outside the KV cache's {n_blocks} blocks"
            )));
        }
        widest = widest.max(needed);
    }

    let (rows_cap, max_blocks) = match layout {
        Layout::Eager => (None, widest),
        Layout::Graph { bucket, max_blocks } => {
            if batch.len() > bucket
                || widest > max_blocks
                || batch.iter().any(|c| c.tokens.len() != 1)
            {
                return Ok(None);
            }
            (Some(bucket), max_blocks)
        }
    };

    // Device order: single-token chunks first, then the longer ones.
    let mut order: Vec<usize> = (0..batch.len())
        .filter(|&i| batch[i].tokens.len() == 1)
        .collect();
    let n_single = order.len();
    order.extend((0..batch.len()).filter(|&i| batch[i].tokens.len() > 1));

    let real_rows: usize = batch.iter().map(|c| c.tokens.len()).sum();
    let n_dummy = rows_cap.map_or(0, |b| b - batch.len());
    let n_rows = real_rows + n_dummy;
    let n_decode = n_single + n_dummy;
    let n_tables = batch.len() + n_dummy;

    let mut tokens = Vec::with_capacity(n_rows);
    let mut pos = Vec::with_capacity(n_rows);
    let mut slots = Vec::with_capacity(n_rows);
    let mut ctx_lens = Vec::with_capacity(n_decode);
    let mut tables = Vec::with_capacity(n_tables * max_blocks);
    let mut prefill = Vec::new();
    let mut row_of_last = vec![0usize; batch.len()];
    let push_table = |tables: &mut Vec<i32>, table: &[u32], needed: usize| {
        let n = needed.min(max_blocks);
        tables.extend(table[..n].iter().map(|&b| b as i32));
        tables.extend(std::iter::repeat_n(scratch as i32, max_blocks - n));
    };
    for (k, &i) in order.iter().enumerate() {
        let c = &batch[i];
        let row = tokens.len();
        for (j, &t) in c.tokens.iter().enumerate() {
            let p = c.start_pos + j;
            tokens.push(t as i32);
            pos.push(int(p, "position")?);
            slots.push(int(slot(c.block_table, p), "cache slot")?);
        }
        let end = c.start_pos + c.tokens.len();
        push_table(&mut tables, c.block_table, end.div_ceil(BLOCK_SIZE));
        if k < n_single {
            ctx_lens.push(int(end, "context length")?);
        }
        if k >= n_single {
            prefill.push(PrefillRun {
                row,
                n_q: c.tokens.len(),
                start_pos: c.start_pos,
                table: k,
            });
        }
        row_of_last[i] = tokens.len() - 1;
    }
    // Dummy rows (graph layouts only, which hold decode rows only) pad the batch after
    // its real rows.
    pad_dummies(
        n_dummy,
        scratch,
        max_blocks,
        &mut tokens,
        &mut pos,
        &mut slots,
        &mut ctx_lens,
        &mut tables,
    )?;
    let picked: Vec<usize> = (0..batch.len())
        .filter(|&i| batch[i].want_logits)
        .map(|i| row_of_last[i])
        .collect();

    let mut ints = Vec::with_capacity(3 * n_rows + ctx_lens.len() + tables.len() + picked.len());
    let mut offsets = Offsets {
        tokens: 0,
        pos: 0,
        slots: 0,
        ctx_lens: 0,
        tables: 0,
        picked: 0,
    };
    for (off, part) in [
        (&mut offsets.tokens, &tokens),
        (&mut offsets.pos, &pos),
        (&mut offsets.slots, &slots),
        (&mut offsets.ctx_lens, &ctx_lens),
        (&mut offsets.tables, &tables),
    ] {
        *off = ints.len();
        ints.extend_from_slice(part);
    }
    offsets.picked = ints.len();
    for &r in &picked {
        ints.push(int(r, "row")?);
    }
    Ok(Some(StepPlan {
        n_rows,
        n_decode,
        prefill,
        max_blocks,
        picked,
        ints,
        offsets,
    }))
}

/// Appends `n` dummy decode rows: token 0 at position 0, written to and read from the
/// scratch block only.
#[allow(clippy::too_many_arguments)]
fn pad_dummies(
    n: usize,
    scratch: usize,
    max_blocks: usize,
    tokens: &mut Vec<i32>,
    pos: &mut Vec<i32>,
    slots: &mut Vec<i32>,
    ctx_lens: &mut Vec<i32>,
    tables: &mut Vec<i32>,
) -> Result<(), ModelError> {
    let scratch_slot = int(scratch * BLOCK_SIZE, "scratch slot")?;
    for _ in 0..n {
        tokens.push(0);
        pos.push(0);
        slots.push(scratch_slot);
        ctx_lens.push(1);
        tables.extend(std::iter::repeat_n(scratch as i32, max_blocks));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kv_cache::KvCache;
    use crate::config::{FfnActivation, ModelConfig, RopeStyle};

    fn chunk<'a>(
        tokens: &'a [u32],
        start_pos: usize,
        table: &'a [u32],
        want: bool,
    ) -> SeqChunk<'a> {
        SeqChunk {
            tokens,
            start_pos,
            block_table: table,
            want_logits: want,
            decode_from: 0,
            device_greedy: false,
        }
    }

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            n_layers: 1,
            dim: 64,
            ffn_dim: 64,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 32,
            vocab_size: 48,
            context_length: 256,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
            rope_freq_scale: 1.0,
            rope_style: RopeStyle::Interleaved,
            ffn_activation: FfnActivation::SwiGlu,
            sliding_window: None,
            embedding_scale: None,
            qk_norm: false,
            post_norms: false,
            final_logit_softcap: None,
        }
    }

    /// Our slot is the row the CPU cache writes: a row written through a scrambled table
    /// reads back at our slot through the identity table (which addresses slots directly).
    #[test]
    fn slots_match_the_cpu_kv_cache() {
        let cfg = cfg();
        let d = cfg.kv_dim();
        let n_blocks = 5;
        let mut kv = KvCache::new(&cfg, n_blocks);
        let table = [3u32, 0, 4, 1];
        let identity: Vec<u32> = (0..n_blocks as u32).collect();
        for pos in [0usize, 1, 15, 16, 17, 31, 32, 47, 48, 63] {
            let k: Vec<f32> = (0..d).map(|i| (pos * 100 + i) as f32).collect();
            kv.write(0, &table, pos, &k, &k);
            let s = slot(&table, pos);
            let got = kv.k_rows(0, &identity, s, 1);
            let want: Vec<u16> = k
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect();
            assert_eq!(got, &want[..], "pos {pos} slot {s}");
        }
        assert_eq!(slot(&table, 17), 1);
        assert_eq!(slot(&table, 5), 3 * 16 + 5);
    }

    #[test]
    fn decode_rows_come_first_and_logits_stay_in_batch_order() {
        let (ta, tb, tc) = ([0u32, 1], [2u32], [3u32, 4]);
        let prompt: Vec<u32> = (0..20).collect();
        let batch = [
            chunk(&prompt, 0, &tc, true), // prompt: 20 tokens over 2 blocks
            chunk(&[7], 17, &ta, true),   // decode at 17: ctx 18
            chunk(&[9, 10, 11], 3, &tb, false),
            chunk(&[5], 4, &tb, true), // decode
        ];
        let p = plan(&batch, Layout::Eager, 5, 48).unwrap().unwrap();
        assert_eq!((p.n_rows, p.n_decode, p.max_blocks), (25, 2, 2));
        let o = p.offsets;
        assert_eq!(&p.ints[o.tokens..o.tokens + 3], &[7, 5, 0]);
        assert_eq!(&p.ints[o.pos..o.pos + 3], &[17, 4, 0]);
        assert_eq!(&p.ints[o.slots..o.slots + 3], &[16 + 1, 2 * 16 + 4, 3 * 16]);
        assert_eq!(&p.ints[o.ctx_lens..o.tables], &[18, 5]);
        // Tables: decode rows then prompts, each padded with the scratch block (5).
        assert_eq!(&p.ints[o.tables..o.picked], &[0, 1, 2, 5, 3, 4, 2, 5]);
        assert_eq!(
            p.prefill,
            vec![
                PrefillRun {
                    row: 2,
                    n_q: 20,
                    start_pos: 0,
                    table: 2
                },
                PrefillRun {
                    row: 22,
                    n_q: 3,
                    start_pos: 3,
                    table: 3
                },
            ]
        );
        // Wanted: the prompt's last row (21), the first decode row, the second.
        assert_eq!(p.picked, vec![21, 0, 1]);
        assert_eq!(&p.ints[o.picked..], &[21, 0, 1]);
        assert_eq!(p.ints.len(), 3 * 25 + 2 + 8 + 3);
    }

    #[test]
    fn graph_layouts_pad_to_the_bucket_with_scratch_rows() {
        let (ta, tb) = ([0u32, 1], [2u32]);
        let batch = [chunk(&[7], 17, &ta, true), chunk(&[5], 4, &tb, false)];
        let layout = Layout::Graph {
            bucket: 4,
            max_blocks: 3,
        };
        let p = plan(&batch, layout, 3, 48).unwrap().unwrap();
        assert_eq!((p.n_rows, p.n_decode, p.max_blocks), (4, 4, 3));
        let o = p.offsets;
        assert_eq!(&p.ints[o.tokens..o.pos], &[7, 5, 0, 0]);
        assert_eq!(&p.ints[o.slots..o.ctx_lens], &[17, 36, 48, 48]);
        assert_eq!(&p.ints[o.ctx_lens..o.tables], &[18, 5, 1, 1]);
        assert_eq!(
            &p.ints[o.tables..o.picked],
            &[0, 1, 3, 2, 3, 3, 3, 3, 3, 3, 3, 3]
        );
        assert_eq!(p.picked, vec![0]);
        assert!(p.prefill.is_empty());
        // Offsets depend on the bucket only, whatever the batch.
        let one = plan(&batch[..1], layout, 3, 48).unwrap().unwrap();
        assert_eq!(one.offsets.picked, o.picked);
        // A prompt chunk, a too-long table or too many rows fall back to eager.
        let prompt = [chunk(&[1, 2], 0, &tb, true)];
        assert_eq!(plan(&prompt, layout, 3, 48).unwrap(), None);
        let narrow = Layout::Graph {
            bucket: 4,
            max_blocks: 1,
        };
        assert_eq!(plan(&batch, narrow, 3, 48).unwrap(), None);
        let small = Layout::Graph {
            bucket: 1,
            max_blocks: 3,
        };
        assert_eq!(plan(&batch, small, 3, 48).unwrap(), None);
    }

    #[test]
    fn out_of_range_tokens_blocks_and_short_tables_are_refused() {
        let t = [0u32];
        let e = plan(&[chunk(&[48], 0, &t, true)], Layout::Eager, 1, 48).unwrap_err();
        assert!(e.to_string().contains("48"), "{e}");
        let e = plan(&[chunk(&[1], 16, &t, true)], Layout::Eager, 2, 48).unwrap_err();
        assert!(e.to_string().contains("position 16"), "{e}");
        let e = plan(&[chunk(&[1], 0, &[2], true)], Layout::Eager, 2, 48).unwrap_err();
        assert!(e.to_string().contains("block 2"), "{e}");
        let e = plan(&[chunk(&[], 0, &t, true)], Layout::Eager, 2, 48).unwrap_err();
        assert!(e.to_string().contains("no tokens"), "{e}");
        let empty = plan(&[], Layout::Eager, 2, 48).unwrap().unwrap();
        assert_eq!((empty.n_rows, empty.picked.len()), (0, 0));
    }
}
