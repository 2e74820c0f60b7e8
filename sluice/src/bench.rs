//! `sluice bench`: prefill and decode speed of the engine on one model, and of
//! llama.cpp's `llama-bench` on the same file when it is installed, as ratios.
//!
//! Both sides report the same statistic: the median of N repetitions, with the minimum
//! and maximum (llama-bench's JSON output carries every repetition in `samples_ts`).
//! Prompts are processed as `sluice serve` processes them: in chunks of
//! `max_num_batched_tokens`, each attending over the cache the chunks before it wrote.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use sluice_engine::backends::cpu::kv_cache::KvCache;
use sluice_engine::backends::cpu::model::{ForwardScratch, Model};
use sluice_engine::backends::cpu::thread_pool::ThreadPool;
use sluice_engine::backends::device::DeviceChoice;
use sluice_engine::backends::{self, Numerics, SeqChunk};
use sluice_engine::block_allocator::BLOCK_SIZE;
use sluice_engine::sampling::{argmax, Sampler, SamplingParams};
use sluice_engine::EngineConfig;

use crate::bench_device::{self, DeviceBenchOptions};
use crate::model::resolve_model;

/// `sluice bench` options.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// GGUF model file (default: the default model, fetched when absent).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads, on both sides (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt sizes for the prefill rows, comma-separated (llama-bench's `-p`).
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096,8192")]
    prompt: Vec<usize>,
    /// Prefill chunk, as the server's --max-num-batched-tokens (default: its default).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Tokens generated for the decode rows (llama-bench's `-n`; 0 skips them).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions of each test; figures are the median, with min and max.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Sequences decoded together for the batched figure (0 skips it).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Prompt length of each batched sequence (a short chat prompt).
    #[arg(long, default_value_t = 32)]
    batch_prompt_tokens: usize,
    /// Skip llama.cpp even when installed.
    #[arg(long)]
    no_llama_cpp: bool,
    /// Also write the output, with llama-bench's raw JSON, to this file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Measure through the backend seam on this device (cpu or cuda) instead: prefill
    /// rows for --prompt, decode rows for --streams; no llama.cpp.
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// With --device: the decode rows' concurrencies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    streams: Vec<usize>,
    /// With --device: also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The CPU backend's arithmetic: int8 (8-bit activations, as llama.cpp) or f32.
    #[arg(long, default_value = "int8")]
    numerics: Numerics,
}

/// Loads the model and runs the benchmark (see [`run`]); `--save` also writes it to a file.
pub fn run_cli(args: BenchArgs) -> Result<()> {
    if let Some(device) = args.device {
        return run_device_cli(device, args);
    }
    let path = resolve_model(args.model)?;
    let threads = args.threads.unwrap_or_else(crate::serve::default_threads);
    let pool = Arc::new(ThreadPool::new(threads).context("starting the compute threads")?);
    let mut model = Model::load(&path, pool)?;
    model.set_numerics(args.numerics);
    let opts = BenchOptions {
        threads,
        prompts: args.prompt,
        gen: args.gen_tokens,
        reps: args.reps,
        chunk: args
            .max_num_batched_tokens
            .unwrap_or(EngineConfig::default().max_num_batched_tokens),
        batch: args.batch,
        batch_prompt: args.batch_prompt_tokens,
        llama_cpp: !args.no_llama_cpp,
    };
    let text = run(&model, &path, &opts);
    if let Some(p) = args.save {
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        println!("saved to {}", p.display());
    }
    Ok(())
}

/// `sluice bench --device`: the seam benchmark (see `bench_device`) on one device.
fn run_device_cli(device: DeviceChoice, args: BenchArgs) -> Result<()> {
    // Before loading anything: a device that cannot run here is one line.
    let (device, _) = backends::device::resolve(
        device,
        sluice_gateway::config::EngineSection::default().gpu_memory_fraction,
    )?;
    let path = resolve_model(args.model)?;
    let threads = args.threads.unwrap_or_else(crate::serve::default_threads);
    let o = DeviceBenchOptions {
        prompts: args.prompt.into_iter().filter(|&p| p > 0).collect(),
        chunk: args
            .max_num_batched_tokens
            .unwrap_or(EngineConfig::default().max_num_batched_tokens),
        streams: args.streams.into_iter().filter(|&n| n > 0).collect(),
        stream_prompt: args.batch_prompt_tokens,
        gen: args.gen_tokens.max(1),
        reps: args.reps,
    };
    // The CPU's KV cache is sized to the largest row (on a GPU, from its free memory).
    let longest_prompt = o.prompts.iter().copied().max().unwrap_or(0);
    let per_stream = (o.stream_prompt + o.gen).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let decode_tokens = o.streams.iter().copied().max().unwrap_or(0) * per_stream;
    let opts = backends::RuntimeOptions {
        pool: Arc::new(ThreadPool::new(threads).context("starting the compute threads")?),
        kv_cache_tokens: longest_prompt.max(decode_tokens).max(BLOCK_SIZE),
        numerics: args.numerics,
    };
    let file = Arc::new(
        sluice_engine::gguf::GgufFile::open(&path)
            .with_context(|| format!("loading {}", path.display()))?,
    );
    let mut runtime = backends::load_on(&device, file, &opts)
        .with_context(|| format!("loading {}", path.display()))?;
    let report = bench_device::run(runtime.as_mut(), &path.display().to_string(), &o);
    if let Some(p) = args.json {
        std::fs::write(&p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("saved to {}", p.display());
    }
    Ok(())
}

/// Median, minimum and maximum of a set of repetitions (tokens per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median of the samples.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of repetitions.
    pub n: usize,
}

impl Stats {
    /// Statistics of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `median [min–max]`, one decimal.
    pub fn show(&self) -> String {
        format!("{:.1} [{:.1}-{:.1}]", self.median, self.min, self.max)
    }
}

/// Token ids spread over the vocabulary (llama-bench uses random ones).
fn prompt_tokens(model: &Model, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % model.cfg.vocab_size) as u32)
        .collect()
}

/// Prefill of a cold `prompt`-token prompt as the server runs it: forward passes of at
/// most `chunk` tokens, each after the previous one's KV is written. Tokens per second
/// of the whole prompt, one sample per repetition.
pub fn bench_prefill(model: &Model, prompt: usize, chunk: usize, reps: usize) -> Stats {
    let blocks = prompt.div_ceil(BLOCK_SIZE).max(1);
    let mut kv = KvCache::new(&model.cfg, blocks);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut scratch = ForwardScratch::default();
    let tokens = prompt_tokens(model, prompt, 0);
    let chunk = chunk.max(1);
    let mut samples = Vec::new();
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let start_pos = i * chunk;
            let logits = model.forward(
                &[SeqChunk {
                    tokens: c,
                    start_pos,
                    block_table: &table,
                    want_logits: start_pos + c.len() == prompt,
                    decode_from: prompt,
                    device_greedy: false,
                }],
                &mut kv,
                &mut scratch,
            );
            std::hint::black_box(logits);
        }
        samples.push(prompt as f64 / t0.elapsed().as_secs_f64());
    }
    Stats::of(&samples).expect("at least one repetition")
}

/// Single-stream greedy decode of `gen` tokens from an empty context (as llama-bench's
/// `tg` test): one forward pass per token. One sample per repetition.
pub fn bench_decode(model: &Model, gen: usize, reps: usize) -> Stats {
    let blocks = gen.div_ceil(BLOCK_SIZE).max(1);
    let mut kv = KvCache::new(&model.cfg, blocks);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut scratch = ForwardScratch::default();
    let mut samples = Vec::new();
    for _ in 0..reps.max(1) {
        let mut next = prompt_tokens(model, 1, 1)[0];
        let t0 = Instant::now();
        for pos in 0..gen {
            let tok = [next];
            let logits = model.forward(
                &[SeqChunk {
                    tokens: &tok,
                    start_pos: pos,
                    block_table: &table,
                    want_logits: true,
                    decode_from: 0,
                    device_greedy: false,
                }],
                &mut kv,
                &mut scratch,
            );
            next = argmax(logits);
        }
        samples.push(gen as f64 / t0.elapsed().as_secs_f64());
    }
    Stats::of(&samples).expect("at least one repetition")
}

/// Batched decode: `batch` sequences, each prefilled with its own `prompt`-token prompt,
/// then decoded together for `gen` steps (one forward pass per step for all of them, as
/// the scheduler runs them). Output tokens per second of the decode, one sample per
/// repetition.
pub fn bench_batched_decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> Stats {
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
        .map(|b| prompt_tokens(model, prompt, b))
        .collect();
    let mut scratch = ForwardScratch::default();
    let mut samples = Vec::new();
    for _ in 0..reps.max(1) {
        let mut next = vec![0u32; batch];
        for (b, p) in prompts.iter().enumerate() {
            let chunk = SeqChunk {
                tokens: p,
                start_pos: 0,
                block_table: &tables[b],
                want_logits: true,
                decode_from: prompt,
                device_greedy: false,
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
                    device_greedy: false,
                })
                .collect();
            let logits = model.forward(&chunks, &mut kv, &mut scratch);
            let vocab = model.cfg.vocab_size;
            for (b, row) in logits.chunks_exact(vocab).enumerate() {
                next[b] = argmax(row);
            }
        }
        samples.push((batch * gen) as f64 / t0.elapsed().as_secs_f64());
    }
    Stats::of(&samples).expect("at least one repetition")
}

/// What sampling costs in batched decode (`bench_batched_sampled_decode`).
#[derive(Debug, Clone, Copy)]
pub struct SampledDecode {
    /// Output tokens per second sampling with OpenAI's defaults.
    pub tok_s: f64,
    /// Mean milliseconds per step of the forward pass.
    pub forward_ms: f64,
    /// Mean milliseconds per step picking every row's most likely token.
    pub greedy_ms: f64,
    /// Mean milliseconds per step sampling every row with OpenAI's defaults.
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
/// comes from the same steps and a noisy machine slows both alike. The repetition with
/// the median throughput of `reps`.
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
    let mut runs: Vec<SampledDecode> = Vec::new();
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
                device_greedy: false,
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
                    device_greedy: false,
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
        runs.push(run);
    }
    runs.sort_by(|a, b| a.tok_s.total_cmp(&b.tok_s));
    runs[runs.len() / 2]
}

/// Microseconds one thread takes to draw a token from one row of the model's logits (a
/// real next-token distribution, after a 32-token prompt), median of `reps` x 100 draws,
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
        device_greedy: false,
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
            let times: Vec<f64> = (0..reps.max(1) * 100)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(s.sample(&logits, &[]));
                    t.elapsed().as_secs_f64()
                })
                .collect();
            (
                name,
                Stats::of(&times).map_or(f64::NAN, |st| st.median) * 1e6,
            )
        })
        .collect()
}

/// Where `llama-bench` is: `$LLAMA_BENCH`, else the builds `scripts/install-llama-cpp`
/// makes, the one that matches the kernels we run first: with `SLUICE_NO_AVX512` set, the
/// AVX2-only build (`--avx2`); else the native one.
pub fn find_llama_bench() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLAMA_BENCH") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    // The peer must use the instruction sets our kernels use: the AVX2-only build when
    // AVX-512 is switched off here; on a CPU without AVX-512 the native build is one too.
    let builds: &[&str] = if std::env::var_os("SLUICE_NO_AVX512").is_some() {
        &["llamacpp-avx2"]
    } else if !cpu_has_flag("avx512f") {
        &["llamacpp", "llamacpp-avx2"]
    } else {
        &["llamacpp"]
    };
    builds
        .iter()
        .map(|b| {
            Path::new(&home)
                .join(".cache")
                .join(b)
                .join("bin-dir/llama-bench")
        })
        .find(|p| p.is_file())
}

/// Whether the CPU reports AMX tiles.
fn cpu_reports_amx() -> bool {
    cpu_has_flag("amx_tile")
}

/// Whether /proc/cpuinfo lists `flag` for the first CPU.
fn cpu_has_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == flag))
    })
}

/// One test of a llama-bench run (`ppN` when `n_prompt > 0`, else `tgN`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaTest {
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Its logical and physical batch sizes (`-b`, `-ub`).
    pub n_batch: usize,
    pub n_ubatch: usize,
    /// Its settings that matter for the comparison, as llama-bench reports them.
    pub settings: String,
    pub stats: Stats,
}

/// A finished llama-bench run.
pub struct LlamaRun {
    /// The command line, for the report.
    pub command: String,
    /// llama-bench's JSON, as printed.
    pub raw_json: String,
    pub tests: Vec<LlamaTest>,
}

/// Reads llama-bench's `-o json` output: the per-repetition speeds of every test.
pub fn parse_llama_bench(json: &str) -> Result<Vec<LlamaTest>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("llama-bench output: {e}"))?;
    let runs = v
        .as_array()
        .ok_or("llama-bench output: expected a JSON array")?;
    runs.iter()
        .map(|run| {
            let num = |k: &str| run[k].as_u64().unwrap_or(0) as usize;
            let samples: Vec<f64> = run["samples_ts"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            let stats = Stats::of(&samples)
                .ok_or_else(|| format!("llama-bench output: a test without samples_ts: {run}"))?;
            let setting = |k: &str| match &run[k] {
                serde_json::Value::Null => None,
                x => Some(format!("{k}={}", x.to_string().trim_matches('"'))),
            };
            let settings: Vec<String> = ["n_threads", "type_k", "type_v", "flash_attn"]
                .iter()
                .filter_map(|k| setting(k))
                .collect();
            Ok(LlamaTest {
                n_prompt: num("n_prompt"),
                n_gen: num("n_gen"),
                n_batch: num("n_batch"),
                n_ubatch: num("n_ubatch"),
                settings: settings.join(" "),
                stats,
            })
        })
        .collect()
}

/// Runs `llama-bench -p <prompts> -n <gen>` with the same threads and repetitions and
/// its default batch sizes.
pub fn bench_llama_cpp(
    bin: &Path,
    model: &Path,
    threads: usize,
    prompts: &[usize],
    gen: usize,
    reps: usize,
    no_repack: bool,
) -> Result<LlamaRun, String> {
    let dir = bin.parent().unwrap_or(Path::new("."));
    // An empty list would make llama-bench run its default sizes; 0 runs none.
    let list = |v: &[usize]| match v {
        [] => "0".to_string(),
        v => v
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    let mut args = vec![
        "-m".to_string(),
        model.display().to_string(),
        "-t".into(),
        threads.to_string(),
        "-r".into(),
        reps.max(1).to_string(),
        "-o".into(),
        "json".into(),
    ];
    // llama-bench runs its default sizes for a list it is not given, so give both.
    args.extend(["-p".into(), list(prompts)]);
    args.extend(["-n".into(), gen.to_string()]);
    if no_repack {
        args.extend(["--repack".into(), "0".into()]);
    }
    let command = format!("llama-bench {}", args.join(" "));
    let out = Command::new(bin)
        .env("LD_LIBRARY_PATH", dir)
        .args(&args)
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !out.status.success() {
        // A signal (e.g. SIGILL from a build for another CPU) leaves stderr empty.
        return Err(format!(
            "{} ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let raw_json = String::from_utf8_lossy(&out.stdout).into_owned();
    let tests = parse_llama_bench(&raw_json)?;
    Ok(LlamaRun {
        command,
        raw_json,
        tests,
    })
}

/// What `sluice bench` runs.
pub struct BenchOptions {
    /// Compute threads, on both sides.
    pub threads: usize,
    /// Prompt sizes for the prefill rows (`ppN`); 0 entries are skipped.
    pub prompts: Vec<usize>,
    /// Tokens of the single-stream decode row (`tgN`); 0 skips it.
    pub gen: usize,
    /// Repetitions of every test, on both sides.
    pub reps: usize,
    /// Prefill chunk: the server's `max_num_batched_tokens`.
    pub chunk: usize,
    /// Sequences of the batched-decode row; 0 skips it.
    pub batch: usize,
    /// Prompt tokens of each batched sequence.
    pub batch_prompt: usize,
    /// Run llama-bench too, when it is installed.
    pub llama_cpp: bool,
}

/// Runs the benchmark, printing each line as it is known; returns everything printed
/// plus llama-bench's raw JSON (for `--save`).
pub fn run(model: &Model, model_path: &Path, o: &BenchOptions) -> String {
    let mut text = String::new();
    let mut say = |line: String| {
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    };
    say(format!(
        "model: {} ({} layers, dim {}), threads: {}, numerics: {}",
        model_path.display(),
        model.cfg.n_layers,
        model.cfg.dim,
        o.threads,
        model.numerics()
    ));
    say(sluice_engine::backends::cpu::kernels::cpu_summary());
    say(format!(
        "each figure: median [min-max] tok/s of {} repetitions, on both sides",
        o.reps.max(1)
    ));
    say(format!(
        "sluice prefill: cold prompts (no prefix cache) in chunks of {} tokens, as `sluice serve` \
         runs them (--max-num-batched-tokens)",
        o.chunk
    ));
    let prompts: Vec<usize> = o.prompts.iter().copied().filter(|&p| p > 0).collect();

    // llama.cpp first: if it is missing or fails, the reader knows before our rows.
    let theirs = if !o.llama_cpp {
        say("llama.cpp: skipped (--no-llama-cpp)".into());
        None
    } else {
        match find_llama_bench() {
            None => {
                say(
                    "llama.cpp: absent (set LLAMA_BENCH or run scripts/install-llama-cpp, with \
                     --avx2 for SLUICE_NO_AVX512 runs); no comparison"
                        .into(),
                );
                None
            }
            Some(bin) => {
                // The native build's AMX kernels fault where the hypervisor does not enable
                // AMX (our VMs); its weight repacking is what picks them.
                let no_repack = std::env::var_os("SLUICE_NO_AVX512").is_none() && cpu_reports_amx();
                match bench_llama_cpp(
                    &bin, model_path, o.threads, &prompts, o.gen, o.reps, no_repack,
                ) {
                    Ok(run) => {
                        say(format!("llama.cpp: {} ({})", run.command, bin.display()));
                        if let Some(t) = run.tests.first() {
                            say(format!(
                                "llama.cpp settings: -b {} -ub {} (llama-bench's defaults) {}",
                                t.n_batch, t.n_ubatch, t.settings
                            ));
                        }
                        Some(run)
                    }
                    Err(e) => {
                        say(format!("llama.cpp: llama-bench failed: {}", e.trim()));
                        None
                    }
                }
            }
        }
    };
    let llama = |n_prompt: usize, n_gen: usize| {
        theirs.as_ref().and_then(|r| {
            r.tests
                .iter()
                .find(|t| t.n_prompt == n_prompt && t.n_gen == n_gen)
                .map(|t| t.stats)
        })
    };

    say(format!(
        "{:<10} {:>28} {:>28} {:>8}",
        "test", "sluice tok/s", "llama.cpp tok/s", "ratio"
    ));
    let mut row = |name: String, ours: Stats, theirs: Option<Stats>| {
        let (t, ratio) = match theirs {
            Some(t) => (t.show(), format!("{:.2}x", ours.median / t.median)),
            None => ("-".to_string(), "-".to_string()),
        };
        say(format!(
            "{name:<10} {:>28} {:>28} {:>8}",
            ours.show(),
            t,
            ratio
        ));
    };
    for &p in &prompts {
        let ours = bench_prefill(model, p, o.chunk, o.reps);
        row(format!("pp{p}"), ours, llama(p, 0));
    }
    if o.gen > 0 {
        let ours = bench_decode(model, o.gen, o.reps);
        row(format!("tg{}", o.gen), ours, llama(0, o.gen));
    }
    if o.batch > 0 && o.gen > 0 {
        let s = bench_batched_decode(model, o.batch, o.batch_prompt, o.gen, o.reps);
        say(format!(
            "batched decode (sluice only): {} sequences x {} tokens (prompts of {}): {} tok/s, \
             {:.2} ms per step at the median",
            o.batch,
            o.gen,
            o.batch_prompt,
            s.show(),
            1000.0 * o.batch as f64 / s.median
        ));
    }
    if o.batch > 0 && o.gen > 0 {
        let s = bench_batched_sampled_decode(model, o.batch, o.batch_prompt, o.gen, o.reps);
        say(format!(
            "batched decode sampled at temperature 1, top_p 1 (sluice only): {:.1} tok/s; per step \
             {:.2} ms forward + {:.2} ms sampling (greedy picking: {:.2} ms): {:.2}x greedy",
            s.tok_s,
            s.forward_ms,
            s.sampled_ms,
            s.greedy_ms,
            s.vs_greedy()
        ));
        let rows: Vec<String> = bench_sampler_row(model, o.reps)
            .iter()
            .map(|(name, us)| format!("{name} {us:.0} us"))
            .collect();
        say(format!(
            "sampling one row of {} logits, one thread (median of {} draws): {}",
            model.cfg.vocab_size,
            o.reps.max(1) * 100,
            rows.join(", ")
        ));
    }
    if let Some(r) = theirs {
        text.push_str("\nllama-bench raw JSON output:\n");
        text.push_str(&r.raw_json);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stats::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = Stats::of(&[4.0, 1.0, 3.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.5, 1.0, 10.0));
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[f64::NAN, 2.0]).unwrap().median, 2.0);
    }

    /// The shape llama-bench prints with `-o json` (fields trimmed to those we read).
    #[test]
    fn llama_bench_json_gives_per_repetition_statistics() {
        let json = r#"[
          {"n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "type_k": "f16", "type_v": "f16",
           "flash_attn": -1, "n_prompt": 1024, "n_gen": 0, "avg_ts": 500.0,
           "samples_ts": [480.0, 520.0, 500.0, 470.0, 530.0]},
          {"n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "n_prompt": 0, "n_gen": 128,
           "avg_ts": 200.0, "samples_ts": [210.0, 190.0]}
        ]"#;
        let tests = parse_llama_bench(json).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!((tests[0].n_prompt, tests[0].n_gen), (1024, 0));
        assert_eq!((tests[0].n_batch, tests[0].n_ubatch), (2048, 512));
        assert_eq!(tests[0].stats.median, 500.0);
        assert_eq!((tests[0].stats.min, tests[0].stats.max), (470.0, 530.0));
        assert_eq!(
            tests[0].settings,
            "n_threads=2 type_k=f16 type_v=f16 flash_attn=-1"
        );
        assert_eq!((tests[1].n_prompt, tests[1].n_gen), (0, 128));
        assert_eq!(tests[1].stats.median, 200.0);
        assert!(parse_llama_bench(r#"[{"n_prompt": 1}]"#).is_err());
        assert!(parse_llama_bench("not json").is_err());
    }
}
