//! The engine on the real model, in-process: batching, preemption, prefix reuse,
//! cancellation and seeded sampling, observed through its public API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::backends::cpu::thread_pool::ThreadPool;
use sluice_engine::backends::{self, RuntimeOptions};
use sluice_engine::gguf::GgufFile;
use sluice_engine::sampling::SamplingParams;
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::{Engine, EngineConfig, Event, FinishReason, GenerationRequest, RequestStream};

use crate::support::model_path;

/// An engine on the default model, built as `sluice serve` builds it, with K/V for
/// `kv_cache_tokens` tokens.
fn engine(kv_cache_tokens: usize) -> (Engine, Arc<Tokenizer>) {
    let path = model_path();
    let file = Arc::new(GgufFile::open(&path).expect("model"));
    let tokenizer = Arc::new(Tokenizer::load(&file, Some(&path)).expect("tokenizer"));
    let opts = RuntimeOptions {
        pool: Arc::new(ThreadPool::new(2).expect("compute threads")),
        kv_cache_tokens,
        numerics: Default::default(),
    };
    let runtime = backends::load(file, &opts).expect("model");
    let e =
        Engine::start(runtime, tokenizer.clone(), EngineConfig::default()).expect("engine starts");
    (e, tokenizer)
}

const DEFAULT_KV: usize = RuntimeOptions::DEFAULT_KV_CACHE_TOKENS;

fn request(
    tok: &Tokenizer,
    text: &str,
    max_tokens: usize,
    sampling: SamplingParams,
) -> GenerationRequest {
    GenerationRequest {
        prompt: tok.encode(text, true).expect("encode"),
        max_tokens,
        sampling,
        ignore_eos: true,
        ..Default::default()
    }
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

/// Token ids until `Done`, and the finish reason.
fn collect(s: &mut RequestStream) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_recv() {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Done { reason, .. } => return (ids, reason),
        }
    }
    panic!("stream ended without Done");
}

const PROMPTS: [&str; 4] = [
    "The history of the printing press begins",
    "def quicksort(xs):",
    "Once upon a time, in a kingdom by the sea,",
    "The three laws of thermodynamics are",
];

fn wait_until(e: &Engine, what: &str, ok: impl Fn(&sluice_engine::EngineStats) -> bool) {
    let t = Instant::now();
    while !ok(&e.stats()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}",
            e.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn batching_does_not_change_greedy_output() {
    let (e, tok) = engine(DEFAULT_KV);
    let alone: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| collect(&mut e.submit(request(&tok, p, 24, greedy())).unwrap()).0)
        .collect();
    let mut streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| e.submit(request(&tok, p, 24, greedy())).unwrap())
        .collect();
    let batched: Vec<Vec<u32>> = streams.iter_mut().map(|s| collect(s).0).collect();
    assert_eq!(alone, batched);
}

#[test]
fn preempted_requests_finish_with_the_same_greedy_text() {
    let (big, tok) = engine(DEFAULT_KV);
    let want: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| collect(&mut big.submit(request(&tok, p, 40, greedy())).unwrap()).0)
        .collect();
    drop(big);
    // 8 blocks = 128 tokens; four requests of ~10 + 40 tokens need ~16 blocks together.
    let (small, tok) = engine(128);
    let mut streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| small.submit(request(&tok, p, 40, greedy())).unwrap())
        .collect();
    let got: Vec<(Vec<u32>, FinishReason)> = streams.iter_mut().map(collect).collect();
    for (i, (ids, reason)) in got.iter().enumerate() {
        assert_eq!(*reason, FinishReason::Length);
        assert_eq!(ids, &want[i], "prompt {i}");
    }
    let st = small.stats();
    assert!(
        st.preemptions > 0,
        "the cache was too small to avoid preemption: {st:?}"
    );
    wait_until(&small, "blocks freed", |s| s.kv_blocks_in_use == 0);
}

#[test]
fn a_repeated_prefix_is_served_from_the_cache() {
    let (e, tok) = engine(DEFAULT_KV);
    let system = "You are a careful assistant who answers questions about astronomy, physics and \
                  the history of science in short, precise sentences.";
    let first = format!("{system} Question: why is the sky blue?");
    let second = format!("{system} Question: what is a light year?");
    let mut s = e.submit(request(&tok, &first, 4, greedy())).unwrap();
    let usage = |s: &mut RequestStream| loop {
        if let Some(Event::Done { usage, .. }) = s.blocking_recv() {
            return usage;
        }
    };
    assert_eq!(usage(&mut s).cached_tokens, 0);
    let mut s = e.submit(request(&tok, &second, 4, greedy())).unwrap();
    let u = usage(&mut s);
    let shared = tok
        .encode(&first, true)
        .unwrap()
        .iter()
        .zip(tok.encode(&second, true).unwrap())
        .take_while(|(a, b)| **a == *b)
        .count();
    assert!(shared >= 16, "the prompts share {shared} tokens");
    assert_eq!(
        u.cached_tokens,
        shared / 16 * 16,
        "every full shared block is reused"
    );
    assert_eq!(e.stats().prompt_tokens_cached, u.cached_tokens as u64);
}

#[test]
fn dropping_a_stream_cancels_the_request_and_frees_its_blocks() {
    let (e, tok) = engine(DEFAULT_KV);
    let mut s = e.submit(request(&tok, PROMPTS[0], 2000, greedy())).unwrap();
    for _ in 0..3 {
        assert!(matches!(s.blocking_recv(), Some(Event::Token { .. })));
    }
    assert!(e.stats().kv_blocks_in_use > 0);
    drop(s);
    wait_until(&e, "the cancelled request to leave", |s| {
        s.running == 0 && s.kv_blocks_in_use == 0
    });
    // The engine goes on serving.
    let (ids, reason) = collect(&mut e.submit(request(&tok, PROMPTS[1], 3, greedy())).unwrap());
    assert_eq!((ids.len(), reason), (3, FinishReason::Length));
}

#[test]
fn a_seed_gives_the_same_sample_alone_or_batched() {
    let (e, tok) = engine(DEFAULT_KV);
    let seeded = |seed| SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ..Default::default()
    };
    let alone = collect(&mut e.submit(request(&tok, PROMPTS[2], 32, seeded(11))).unwrap()).0;
    let mut others: Vec<_> = PROMPTS
        .iter()
        .map(|p| e.submit(request(&tok, p, 32, seeded(5))).unwrap())
        .collect();
    let again = collect(&mut e.submit(request(&tok, PROMPTS[2], 32, seeded(11))).unwrap()).0;
    others.iter_mut().for_each(|s| {
        collect(s);
    });
    assert_eq!(alone, again);
    let other_seed = collect(&mut e.submit(request(&tok, PROMPTS[2], 32, seeded(12))).unwrap()).0;
    assert_ne!(
        alone, other_seed,
        "a different seed should sample differently"
    );
}

/// A prompt of about `n` tokens (a longer one, cut to exactly `n`).
fn long_prompt(tok: &Tokenizer, n: usize) -> Vec<u32> {
    let text = "The committee met on a grey morning to weigh the harbour plans, the budget for \
                the new sea wall, and the complaints of the fishermen about the silted channel. "
        .repeat(40);
    let mut ids = tok.encode(&text, true).expect("encode");
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids.truncate(n);
    ids
}

#[test]
fn identical_prompts_together_compute_the_prompt_once_with_the_same_greedy_text() {
    // `n = 4` of one request: four identical prompts submitted together.
    let (e, tok) = engine(4096);
    let prompt = long_prompt(&tok, 710);
    let (gen, n) = (8, 4);
    let req = GenerationRequest {
        prompt: prompt.clone(),
        max_tokens: gen,
        sampling: greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let mut streams: Vec<_> = (0..n).map(|_| e.submit(req.clone()).unwrap()).collect();
    let outs: Vec<Vec<u32>> = streams.iter_mut().map(|s| collect(s).0).collect();
    // Stats are published after the step that sent the last token.
    wait_until(&e, "the requests to leave", |s| s.running == 0);
    let st = e.stats();
    // Each choice's first token comes with its prompt; the other gen - 1 are decodes.
    let decodes = (n * (gen - 1)) as u64;
    let prompt_work = st.tokens_computed - decodes;
    assert!(
        prompt_work as f64 <= 1.1 * prompt.len() as f64,
        "computed {prompt_work} prompt tokens for a {}-token prompt ({st:?})",
        prompt.len()
    );
    for o in &outs[1..] {
        assert_eq!(o, &outs[0], "choices of one greedy request differ");
    }
    drop(e);
    // The same prompt alone on a fresh engine, nothing shared: the same text.
    let (alone, _) = engine(4096);
    let want = collect(&mut alone.submit(req).unwrap()).0;
    assert_eq!(outs[0], want, "sharing the prompt changed the greedy text");
    wait_until(&alone, "the request to leave", |s| s.running == 0);
    assert_eq!(
        alone.stats().tokens_computed,
        (prompt.len() + gen - 1) as u64
    );
}

/// A runtime that picks plain-greedy rows' tokens "on its device": the CPU runtime
/// underneath, with those rows taken out of the logits the engine sees and their argmax
/// handed over through `take_device_tokens`, as the CUDA runtime does.
struct DeviceGreedy {
    inner: Box<dyn backends::ModelRuntime>,
    tokens: Vec<u32>,
    /// Rows picked on the "device", over the whole run.
    picked: Arc<std::sync::atomic::AtomicUsize>,
}

impl backends::ModelRuntime for DeviceGreedy {
    fn info(&self) -> backends::RuntimeInfo {
        self.inner.info()
    }
    fn capabilities(&self) -> backends::Capabilities {
        backends::Capabilities {
            device_sampling: true,
            ..self.inner.capabilities()
        }
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.inner.context_length()
    }
    fn kv_capacity(&self) -> backends::KvCapacity {
        self.inner.kv_capacity()
    }
    fn step(
        &mut self,
        batch: &[backends::SeqChunk<'_>],
        sample: &mut dyn FnMut(&[f32], &dyn backends::RowRunner),
    ) {
        let vocab = self.inner.vocab_size();
        let wanted: Vec<bool> = batch
            .iter()
            .filter(|c| c.want_logits)
            .map(|c| c.device_greedy)
            .collect();
        let (tokens, picked) = (&mut self.tokens, &self.picked);
        tokens.clear();
        self.inner.step(batch, &mut |logits, runner| {
            let mut host = Vec::with_capacity(logits.len());
            for (row, &on_device) in logits.chunks_exact(vocab).zip(&wanted) {
                if on_device {
                    tokens.push(sluice_engine::sampling::argmax(row));
                    picked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    host.extend_from_slice(row);
                }
            }
            sample(&host, runner);
        });
    }
    fn take_device_tokens(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.tokens)
    }
}

/// Greedy rows picked where the logits are give the same text as the host's greedy
/// sampler, batched with requests that sample, ask for log-probabilities or ban end
/// tokens (those stay on the host, and their output is unchanged too).
#[test]
fn rows_sampled_on_the_device_give_what_the_host_gives() {
    let path = model_path();
    let file = Arc::new(GgufFile::open(&path).expect("model"));
    let tok = Arc::new(Tokenizer::load(&file, Some(&path)).expect("tokenizer"));
    let opts = RuntimeOptions {
        pool: Arc::new(ThreadPool::new(2).expect("compute threads")),
        kv_cache_tokens: DEFAULT_KV,
        numerics: Default::default(),
    };
    let picked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = |device: bool| {
        let inner = backends::load(file.clone(), &opts).expect("model");
        let runtime: Box<dyn backends::ModelRuntime> = if device {
            Box::new(DeviceGreedy {
                inner,
                tokens: Vec::new(),
                picked: picked.clone(),
            })
        } else {
            inner
        };
        let e = Engine::start(runtime, tok.clone(), EngineConfig::default()).expect("engine");
        let seeded = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let mut reqs = vec![
            request(&tok, PROMPTS[0], 24, greedy()),
            request(&tok, PROMPTS[1], 24, greedy()),
            request(&tok, PROMPTS[2], 24, seeded),
            GenerationRequest {
                logprobs: Some(2),
                ..request(&tok, PROMPTS[3], 24, greedy())
            },
            GenerationRequest {
                min_tokens: 24,
                ignore_eos: false,
                ..request(&tok, PROMPTS[0], 24, greedy())
            },
        ];
        let mut streams: Vec<_> = reqs
            .drain(..)
            .map(|r| e.submit(r).expect("submit"))
            .collect();
        streams.iter_mut().map(|s| collect(s).0).collect::<Vec<_>>()
    };
    let host = run(false);
    let device = run(true);
    assert_eq!(host, device);
    // The two plain-greedy requests (24 tokens each, the first from the prefill) went to
    // the "device"; the others never did.
    assert_eq!(picked.load(std::sync::atomic::Ordering::Relaxed), 48);
}
