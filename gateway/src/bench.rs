//! `sluice bench`: prefill and decode speed of the engine on one model, and of
//! llama.cpp's `llama-bench` on the same file when it is installed, as ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sluice_engine::kv_cache::{KvCache, BLOCK_SIZE};
use sluice_engine::model::{ForwardScratch, Model, SeqChunk};
use sluice_engine::sampling::{argmax, Sampler, SamplingParams};

/// Tokens per second for prompt processing and generation.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// Runs our engine: a `prompt`-token prefill and a `gen`-token greedy decode, best of `reps`.
pub fn bench_engine(model: &Model, prompt: usize, gen: usize, reps: usize) -> Speed {
    let total = prompt + gen;
    let mut kv = KvCache::new(&model.cfg, total.div_ceil(BLOCK_SIZE));
    let table: Vec<u32> = (0..total.div_ceil(BLOCK_SIZE) as u32).collect();
    let mut scratch = ForwardScratch::default();
    // Token ids spread over the vocabulary, as llama-bench uses random ones.
    let tokens: Vec<u32> = (0..prompt)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab_size) as u32)
        .collect();
    let (mut best_pp, mut best_tg) = (f64::MAX, f64::MAX);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let logits = model.forward(
            &[SeqChunk {
                tokens: &tokens,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
                decode_from: prompt,
            }],
            &mut kv,
            &mut scratch,
        );
        let mut next = argmax(logits);
        best_pp = best_pp.min(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        for i in 0..gen {
            let tok = [next];
            let logits = model.forward(
                &[SeqChunk {
                    tokens: &tok,
                    start_pos: prompt + i,
                    block_table: &table,
                    want_logits: true,
                    decode_from: prompt,
                }],
                &mut kv,
                &mut scratch,
            );
            next = argmax(logits);
        }
        best_tg = best_tg.min(t1.elapsed().as_secs_f64());
    }
    Speed {
        prefill_tok_s: prompt as f64 / best_pp,
        decode_tok_s: gen as f64 / best_tg,
    }
}

/// Batched decode: `batch` sequences, each prefilled with its own `prompt`-token prompt,
/// then decoded together for `gen` steps (one forward pass per step for all of them, as
/// the scheduler runs them). Returns output tokens per second of the decode, best of `reps`.
pub fn bench_batched_decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> f64 {
    let per_seq = (prompt + gen).div_ceil(BLOCK_SIZE);
    let mut kv = KvCache::new(&model.cfg, batch * per_seq);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..per_seq as u32)
                .map(|i| (b * per_seq) as u32 + i)
                .collect()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt)
                .map(|i| ((i * 7919 + b * 104_729 + 13) % model.cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let mut scratch = ForwardScratch::default();
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let mut next = vec![0u32; batch];
        for (b, p) in prompts.iter().enumerate() {
            let chunk = SeqChunk {
                tokens: p,
                start_pos: 0,
                block_table: &tables[b],
                want_logits: true,
                decode_from: prompt,
            };
            next[b] = argmax(model.forward(&[chunk], &mut kv, &mut scratch));
        }
        let t0 = Instant::now();
        for i in 0..gen {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let chunks: Vec<SeqChunk> = (0..batch)
                .map(|b| SeqChunk {
                    tokens: &toks[b],
                    start_pos: prompt + i,
                    block_table: &tables[b],
                    want_logits: true,
                    decode_from: prompt,
                })
                .collect();
            let logits = model.forward(&chunks, &mut kv, &mut scratch);
            let vocab = model.cfg.vocab_size;
            for (b, row) in logits.chunks_exact(vocab).enumerate() {
                next[b] = argmax(row);
            }
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (batch * gen) as f64 / best
}

/// What sampling costs in batched decode (`bench_batched_sampled_decode`).
#[derive(Debug, Clone, Copy)]
pub struct SampledDecode {
    /// Output tokens per second sampling with OpenAI's defaults.
    pub tok_s: f64,
    /// Mean milliseconds per step of the forward pass, of greedy picking and of sampling.
    pub forward_ms: f64,
    pub greedy_ms: f64,
    pub sampled_ms: f64,
}

impl SampledDecode {
    /// Sampled throughput over greedy throughput, from the same steps.
    pub fn vs_greedy(&self) -> f64 {
        (self.forward_ms + self.greedy_ms) / (self.forward_ms + self.sampled_ms)
    }
}

/// Batched decode as `bench_batched_decode`, except that every sequence draws its next
/// token with OpenAI's defaults sent explicitly (`temperature: 1`, `top_p: 1`, no
/// `top_k`: the whole vocabulary), its rows sampled in parallel on the compute pool as
/// the engine loop samples them. Every step also times greedy picking on the same logits
/// (the engine's way too: a greedy sampler per row, in parallel), so the ratio to greedy
/// comes from the same steps and a noisy machine slows both alike. Best of `reps`.
pub fn bench_batched_sampled_decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> SampledDecode {
    let per_seq = (prompt + gen).div_ceil(BLOCK_SIZE);
    let mut kv = KvCache::new(&model.cfg, batch * per_seq);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..per_seq as u32)
                .map(|i| (b * per_seq) as u32 + i)
                .collect()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt)
                .map(|i| ((i * 7919 + b * 104_729 + 13) % model.cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let vocab = model.cfg.vocab_size;
    let samplers = |temperature: f32| -> Vec<Sampler> {
        (0..batch)
            .map(|b| {
                let params = SamplingParams {
                    temperature,
                    top_p: 1.0,
                    seed: Some(b as u64),
                    ..Default::default()
                };
                Sampler::new(params, &prompts[b])
            })
            .collect()
    };
    // Draws every row's token with its sampler, rows spread over the pool.
    let draw = |s: &mut [Sampler], logits: &[f32], out: &mut [u32]| {
        let mut rows: Vec<(&mut Sampler, &[f32], &mut u32)> = s
            .iter_mut()
            .zip(logits.chunks_exact(vocab))
            .zip(out.iter_mut())
            .map(|((s, l), t)| (s, l, t))
            .collect();
        model
            .pool()
            .for_each_mut(&mut rows, &|(s, l, t)| **t = s.sample(l, &[]));
    };
    let mut scratch = ForwardScratch::default();
    let mut best: Option<SampledDecode> = None;
    for _ in 0..reps.max(1) {
        let (mut sampled, mut greedy) = (samplers(1.0), samplers(0.0));
        let mut next = vec![0u32; batch];
        let mut greedy_pick = vec![0u32; batch];
        for (b, p) in prompts.iter().enumerate() {
            let chunk = SeqChunk {
                tokens: p,
                start_pos: 0,
                block_table: &tables[b],
                want_logits: true,
                decode_from: prompt,
            };
            next[b] = sampled[b].sample(model.forward(&[chunk], &mut kv, &mut scratch), &[]);
        }
        let (mut fwd, mut pick, mut samp) = (0f64, 0f64, 0f64);
        for i in 0..gen {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let chunks: Vec<SeqChunk> = (0..batch)
                .map(|b| SeqChunk {
                    tokens: &toks[b],
                    start_pos: prompt + i,
                    block_table: &tables[b],
                    want_logits: true,
                    decode_from: prompt,
                })
                .collect();
            let _lease = model.pool().lease();
            let t0 = Instant::now();
            let logits = model.forward(&chunks, &mut kv, &mut scratch);
            let t1 = Instant::now();
            draw(&mut greedy, logits, &mut greedy_pick);
            let t2 = Instant::now();
            draw(&mut sampled, logits, &mut next);
            let t3 = Instant::now();
            fwd += (t1 - t0).as_secs_f64();
            pick += (t2 - t1).as_secs_f64();
            samp += (t3 - t2).as_secs_f64();
        }
        let ms = |s: f64| 1000.0 * s / gen.max(1) as f64;
        let run = SampledDecode {
            tok_s: (batch * gen) as f64 / (fwd + samp),
            forward_ms: ms(fwd),
            greedy_ms: ms(pick),
            sampled_ms: ms(samp),
        };
        if best.is_none_or(|b| run.tok_s > b.tok_s) {
            best = Some(run);
        }
    }
    best.expect("at least one repetition")
}

/// Microseconds one thread takes to draw a token from one row of the model's logits (a
/// real next-token distribution, after a 32-token prompt), best of `reps` x 100 draws,
/// for OpenAI's defaults, `top_p` 0.9, `top_k` 40 and greedy.
pub fn bench_sampler_row(model: &Model, reps: usize) -> Vec<(&'static str, f64)> {
    let prompt: Vec<u32> = (0..32)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab_size) as u32)
        .collect();
    let mut kv = KvCache::new(&model.cfg, prompt.len().div_ceil(BLOCK_SIZE));
    let table: Vec<u32> = (0..prompt.len().div_ceil(BLOCK_SIZE) as u32).collect();
    let mut scratch = ForwardScratch::default();
    let chunk = SeqChunk {
        tokens: &prompt,
        start_pos: 0,
        block_table: &table,
        want_logits: true,
        decode_from: prompt.len(),
    };
    let logits = model.forward(&[chunk], &mut kv, &mut scratch).to_vec();
    let settings: [(&'static str, SamplingParams); 4] = [
        ("temperature 1, top_p 1", SamplingParams::default()),
        (
            "top_p 0.9",
            SamplingParams {
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_k 40",
            SamplingParams {
                top_k: 40,
                ..Default::default()
            },
        ),
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
        ),
    ];
    settings
        .into_iter()
        .map(|(name, mut params)| {
            params.seed = Some(1);
            let mut s = Sampler::new(params, &prompt);
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) * 100 {
                let t = Instant::now();
                std::hint::black_box(s.sample(&logits, &[]));
                best = best.min(t.elapsed().as_secs_f64());
            }
            (name, best * 1e6)
        })
        .collect()
}

/// Where `llama-bench` is: `$LLAMA_BENCH`, else the cache the benchmark scripts build into.
pub fn find_llama_bench() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLAMA_BENCH") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".cache/llamacpp/bin-dir/llama-bench");
    p.is_file().then_some(p)
}

/// Runs `llama-bench` with the same sizes and threads; `None` if it fails.
pub fn bench_llama_cpp(
    bin: &Path,
    model: &Path,
    threads: usize,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> Result<Speed, String> {
    let dir = bin.parent().unwrap_or(Path::new("."));
    let out = Command::new(bin)
        .env("LD_LIBRARY_PATH", dir)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            &prompt.to_string(),
            "-n",
            &gen.to_string(),
            "-r",
            &reps.to_string(),
            "-o",
            "json",
        ])
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("llama-bench output: {e}"))?;
    let mut speed = Speed {
        prefill_tok_s: 0.0,
        decode_tok_s: 0.0,
    };
    for run in v.as_array().into_iter().flatten() {
        let ts = run["avg_ts"].as_f64().unwrap_or(0.0);
        if run["n_prompt"].as_u64().unwrap_or(0) > 0 {
            speed.prefill_tok_s = ts;
        } else {
            speed.decode_tok_s = ts;
        }
    }
    Ok(speed)
}
