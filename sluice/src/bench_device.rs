//! `sluice bench --device cpu|cuda`: prefill and decode speed through the engine's
//! backend seam (`ModelRuntime::step`), the same calls the serving loop makes, so one
//! benchmark measures every runtime. Decode is measured at several concurrencies (each
//! step one new token for every sequence, greedy on the host), prefill for cold prompts
//! in chunks as the server runs them. Every figure is the median of N repetitions with
//! the minimum and maximum.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use sluice_engine::backends::{ModelRuntime, SeqChunk};
use sluice_engine::block_allocator::BLOCK_SIZE;
use sluice_engine::sampling::argmax;

use crate::bench::Stats;

/// What the device benchmark runs.
pub struct DeviceBenchOptions {
    /// Prompt sizes of the prefill rows.
    pub prompts: Vec<usize>,
    /// Prefill chunk: the server's `max_num_batched_tokens`.
    pub chunk: usize,
    /// Concurrencies of the decode rows.
    pub streams: Vec<usize>,
    /// Prompt tokens of each decoding sequence.
    pub stream_prompt: usize,
    /// Tokens decoded per sequence per repetition.
    pub gen: usize,
    /// Repetitions of every row.
    pub reps: usize,
}

/// Token ids spread over the vocabulary, different per `salt`.
fn tokens(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32)
        .collect()
}

/// Block tables for `seqs` sequences of up to `len` tokens each, from one pool of
/// `blocks` blocks; `None` when the pool is too small.
pub fn block_tables(seqs: usize, len: usize, blocks: usize) -> Option<Vec<Vec<u32>>> {
    let per = len.div_ceil(BLOCK_SIZE).max(1);
    if per.checked_mul(seqs)? > blocks {
        return None;
    }
    Some(
        (0..seqs)
            .map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect())
            .collect(),
    )
}

/// Prefills `prompts[i]` into `tables[i]` in steps of at most `chunk` tokens (several
/// sequences per step, as the scheduler packs them); returns each sequence's greedy
/// next token.
fn prefill(
    rt: &mut dyn ModelRuntime,
    prompts: &[Vec<u32>],
    tables: &[Vec<u32>],
    chunk: usize,
) -> Vec<u32> {
    let vocab = rt.vocab_size();
    let mut done = vec![0usize; prompts.len()];
    let mut next = vec![0u32; prompts.len()];
    while done.iter().zip(prompts).any(|(d, p)| d < &p.len()) {
        let mut budget = chunk.max(1);
        let mut batch = Vec::new();
        let mut owners = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if budget == 0 || done[i] == p.len() {
                continue;
            }
            let n = budget.min(p.len() - done[i]);
            let end = done[i] + n;
            batch.push(SeqChunk {
                tokens: &p[done[i]..end],
                start_pos: done[i],
                block_table: &tables[i],
                want_logits: end == p.len(),
                decode_from: p.len(),
                device_greedy: false,
            });
            if end == p.len() {
                owners.push(i);
            }
            done[i] = end;
            budget -= n;
        }
        rt.step(&batch, &mut |logits, _| {
            for (row, &i) in logits.chunks_exact(vocab).zip(&owners) {
                next[i] = argmax(row);
            }
        });
    }
    next
}

/// Tokens per second of cold prefills of `len` tokens.
fn bench_prefill(rt: &mut dyn ModelRuntime, len: usize, o: &DeviceBenchOptions) -> Result<Stats> {
    let vocab = rt.vocab_size();
    let Some(tables) = block_tables(1, len, rt.kv_capacity().blocks) else {
        bail!("the KV cache holds fewer than {len} tokens");
    };
    let mut samples = Vec::new();
    // One untimed run first: a runtime's first step allocates and (CUDA) loads kernels.
    for rep in 0..=o.reps.max(1) {
        let prompt = vec![tokens(vocab, len, rep)];
        let t = Instant::now();
        prefill(rt, &prompt, &tables, o.chunk);
        if rep > 0 {
            samples.push(len as f64 / t.elapsed().as_secs_f64());
        }
    }
    Stats::of(&samples).ok_or_else(|| anyhow::anyhow!("no samples"))
}

/// Decode tok/s (all sequences together) and milliseconds per step at `streams`
/// concurrent sequences.
fn bench_decode(
    rt: &mut dyn ModelRuntime,
    streams: usize,
    o: &DeviceBenchOptions,
) -> Result<(Stats, Stats)> {
    let vocab = rt.vocab_size();
    let len = o.stream_prompt + o.gen;
    if len > rt.context_length() {
        bail!("prompt + generated tokens ({len}) exceed the model's context");
    }
    let Some(tables) = block_tables(streams, len, rt.kv_capacity().blocks) else {
        bail!(
            "the KV cache ({} tokens) cannot hold {streams} sequences of {len} tokens",
            rt.kv_capacity().tokens()
        );
    };
    let (mut tps, mut step_ms) = (Vec::new(), Vec::new());
    for rep in 0..=o.reps.max(1) {
        let prompts: Vec<Vec<u32>> = (0..streams)
            .map(|s| tokens(vocab, o.stream_prompt, rep * 1000 + s))
            .collect();
        let mut last = prefill(rt, &prompts, &tables, o.chunk);
        let t = Instant::now();
        for g in 0..o.gen {
            let pos = o.stream_prompt + g;
            let batch: Vec<SeqChunk<'_>> = (0..streams)
                .map(|s| SeqChunk {
                    tokens: std::slice::from_ref(&last[s]),
                    start_pos: pos,
                    block_table: &tables[s],
                    want_logits: true,
                    decode_from: o.stream_prompt,
                    device_greedy: false,
                })
                .collect();
            let mut next = vec![0u32; streams];
            rt.step(&batch, &mut |logits, _| {
                for (row, n) in logits.chunks_exact(vocab).zip(next.iter_mut()) {
                    *n = argmax(row);
                }
            });
            last = next;
        }
        let secs = t.elapsed().as_secs_f64();
        // The first repetition warms up (and a CUDA runtime captures its graphs).
        if rep > 0 {
            tps.push((streams * o.gen) as f64 / secs);
            step_ms.push(secs * 1e3 / o.gen as f64);
        }
    }
    let none = || anyhow::anyhow!("no samples");
    Ok((
        Stats::of(&tps).ok_or_else(none)?,
        Stats::of(&step_ms).ok_or_else(none)?,
    ))
}

/// Runs every row, printing each as it is known; returns the report as JSON.
pub fn run(rt: &mut dyn ModelRuntime, model: &str, o: &DeviceBenchOptions) -> Value {
    let info = rt.info();
    println!(
        "model: {model}; backend {} on {}; KV cache {} tokens",
        info.backend,
        info.device,
        rt.kv_capacity().tokens()
    );
    println!(
        "each figure: median [min-max] of {} repetitions (after one warm-up)",
        o.reps.max(1)
    );
    let mut prefill_rows = Vec::new();
    for &len in &o.prompts {
        match bench_prefill(rt, len, o) {
            Ok(s) => {
                println!("prefill pp{len}: {} tok/s", s.show());
                prefill_rows.push(json!({"prompt": len, "tok_s": stats_json(&s)}));
            }
            Err(e) => {
                println!("prefill pp{len}: skipped ({e})");
                prefill_rows.push(json!({"prompt": len, "skipped": e.to_string()}));
            }
        }
    }
    let mut decode_rows = Vec::new();
    for &n in &o.streams {
        match bench_decode(rt, n, o) {
            Ok((tps, ms)) => {
                println!(
                    "decode at {n} sequences: {} tok/s, {} ms/step",
                    tps.show(),
                    ms.show()
                );
                decode_rows.push(
                    json!({"streams": n, "tok_s": stats_json(&tps), "step_ms": stats_json(&ms)}),
                );
            }
            Err(e) => {
                println!("decode at {n} sequences: skipped ({e})");
                decode_rows.push(json!({"streams": n, "skipped": e.to_string()}));
            }
        }
    }
    json!({
        "model": model,
        "backend": info.backend,
        "device": info.device,
        "reps": o.reps.max(1),
        "gen_tokens": o.gen,
        "stream_prompt_tokens": o.stream_prompt,
        "prefill": prefill_rows,
        "decode": decode_rows,
    })
}

fn stats_json(s: &Stats) -> Value {
    json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tables_are_disjoint_and_cover_each_sequence() {
        let t = block_tables(3, 33, 9).unwrap();
        assert_eq!(t, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
        assert!(block_tables(3, 33, 8).is_none());
        assert_eq!(block_tables(1, 0, 1).unwrap(), vec![vec![0]]);
    }
}
