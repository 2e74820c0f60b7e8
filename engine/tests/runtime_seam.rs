//! The engine loop on a runtime that is not the CPU model: a fake written outside the
//! crate against the public seam only (`sluice_engine::backends`), with deterministic
//! logits (after token `t` comes `t + 1`, after `z` the end token), driven end to end
//! through `Engine::submit` and the request streams. What the loop hands the runtime is
//! recorded and checked: chunked prefills, decode positions, block tables, prefix
//! sharing by declared capability, and the KV capacity the runtime declares.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_engine::backends::{
    Capabilities, KvCapacity, KvStorage, ModelRuntime, RowRunner, RuntimeInfo, SeqChunk, SerialRows,
};
use sluice_engine::block_allocator::BLOCK_SIZE;
use sluice_engine::gguf::{writer, GgufFile, MetaValue};
use sluice_engine::text::tokenizer::Tokenizer;
use sluice_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, GenerationRequest, RequestStream,
    SamplingParams, Usage,
};

/// Byte-valued tokens 0..128, then the end token.
const END: u32 = 128;
const VOCAB: usize = 129;

/// The fake model: what follows token `t`.
fn next(t: u32) -> u32 {
    if t == u32::from(b'z') {
        END
    } else {
        t + 1
    }
}

/// A chunk as the runtime received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: Vec<u32>,
    want_logits: bool,
    decode_from: usize,
}

/// What the fake records, shared with the test.
#[derive(Default)]
struct Record {
    /// Every step's batch.
    steps: Mutex<Vec<Vec<Seen>>>,
    /// Sampling jobs run through the fake's `RowRunner`.
    rows: AtomicUsize,
    resets: AtomicUsize,
    /// First blocks of the sequences the engine said ended.
    released: Mutex<Vec<u32>>,
    /// Held by a test to keep the loop inside a step while it submits more.
    gate: Mutex<()>,
}

struct FakeRuntime {
    kv: KvStorage,
    blocks: usize,
    record: Arc<Record>,
}

/// Counts the jobs, then runs them in turn.
struct CountingRows<'a>(&'a AtomicUsize);

impl RowRunner for CountingRows<'_> {
    fn run_rows(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
        self.0.fetch_add(jobs.len(), Ordering::AcqRel);
        SerialRows.run_rows(jobs);
    }
}

impl ModelRuntime for FakeRuntime {
    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            backend: "fake",
            device: "a test".into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kv: self.kv,
            device_sampling: false,
            token_mask: false,
        }
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn context_length(&self) -> usize {
        1024
    }

    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            blocks: self.blocks,
            bytes_per_token: 64,
        }
    }

    fn step(&mut self, batch: &[SeqChunk<'_>], sample: &mut dyn FnMut(&[f32], &dyn RowRunner)) {
        let seen: Vec<Seen> = batch
            .iter()
            .map(|c| Seen {
                tokens: c.tokens.to_vec(),
                start_pos: c.start_pos,
                block_table: c.block_table.to_vec(),
                want_logits: c.want_logits,
                decode_from: c.decode_from,
            })
            .collect();
        for c in &seen {
            assert!(
                c.block_table.len() * BLOCK_SIZE >= c.start_pos + c.tokens.len(),
                "the block table covers the chunk: {c:?}"
            );
        }
        self.record.steps.lock().unwrap().push(seen);
        drop(self.record.gate.lock().unwrap());
        let mut logits = Vec::new();
        for c in batch.iter().filter(|c| c.want_logits) {
            let mut row = vec![0.0f32; VOCAB];
            row[next(*c.tokens.last().unwrap()) as usize] = 10.0;
            logits.extend(row);
        }
        sample(&logits, &CountingRows(&self.record.rows));
    }

    fn reset(&mut self) {
        self.record.resets.fetch_add(1, Ordering::AcqRel);
    }

    fn release(&mut self, first_block: u32) {
        self.record.released.lock().unwrap().push(first_block);
    }
}

/// A tokenizer whose tokens are the bytes 0..128 (printable ones as themselves) and an
/// end token.
fn vocabulary() -> Arc<Tokenizer> {
    let mut tokens: Vec<MetaValue> = (0..128u8)
        .map(|b| {
            MetaValue::Str(if b.is_ascii_graphic() {
                char::from(b).to_string()
            } else {
                format!("<0x{b:02X}>")
            })
        })
        .collect();
    let mut types = vec![MetaValue::I32(1); tokens.len()];
    tokens.push(MetaValue::Str("<|im_end|>".into()));
    types.push(MetaValue::I32(3)); // control
    let meta = [
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", MetaValue::Array(tokens)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types)),
        ("tokenizer.ggml.merges", MetaValue::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(END)),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let file = GgufFile::from_bytes(writer::write(&meta, &[])).expect("vocabulary");
    Arc::new(Tokenizer::load(&file, None).expect("tokenizer"))
}

/// An engine on a fake runtime with `blocks` KV blocks, and what the fake records.
fn engine(kv: KvStorage, blocks: usize, max_num_batched_tokens: usize) -> (Engine, Arc<Record>) {
    let record = Arc::new(Record::default());
    let runtime = FakeRuntime {
        kv,
        blocks,
        record: record.clone(),
    };
    let cfg = EngineConfig {
        name: "fake".into(),
        max_num_batched_tokens,
        ..EngineConfig::default()
    };
    let e = Engine::start(Box::new(runtime), vocabulary(), cfg).expect("engine starts");
    (e, record)
}

fn tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The streamed text, the token ids, and the final event's reason and usage.
fn collect(s: &mut RequestStream) -> (String, Vec<u32>, FinishReason, Usage) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    loop {
        match s.blocking_recv().expect("a Done event ends every stream") {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done { reason, usage, .. } => return (text, ids, reason, usage),
        }
    }
}

#[test]
fn the_engine_loop_serves_requests_on_a_runtime_that_is_not_the_cpu_model() {
    let (e, record) = engine(KvStorage::Paged, 64, 8);
    assert_eq!(e.runtime().backend, "fake");
    assert_eq!(e.runtime().device, "a test");
    assert_eq!(e.context_length(), 1024);
    let mut s = e.submit(greedy(tokens("abcdefghijk"), 4)).unwrap();
    let (text, ids, reason, usage) = collect(&mut s);
    assert_eq!(text, "lmno");
    assert_eq!(ids, tokens("lmno"));
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 11,
            completion_tokens: 4,
            cached_tokens: 0
        }
    );

    // The prompt in chunks of the step budget, then one token per step, every chunk
    // with its block table and the prompt's length as where decoding starts.
    let steps = record.steps.lock().unwrap().clone();
    let table = steps[0][0].block_table.clone();
    let seen = |t: &str, start_pos: usize, want_logits: bool| {
        vec![Seen {
            tokens: tokens(t),
            start_pos,
            block_table: table.clone(),
            want_logits,
            decode_from: 11,
        }]
    };
    assert_eq!(table.len(), 1);
    assert_eq!(steps[0], seen("abcdefgh", 0, false));
    assert_eq!(steps[1], seen("ijk", 8, true));
    assert_eq!(steps[2], seen("l", 11, true));
    assert_eq!(steps[3], seen("m", 12, true));
    assert_eq!(steps[4], seen("n", 13, true));
    assert_eq!(steps.len(), 5);
    // Every sampled row went through the runtime's runner.
    assert_eq!(record.rows.load(Ordering::Acquire), 4);
    e.shutdown();
}

#[test]
fn end_tokens_and_stop_strings_apply_whatever_computes_the_logits() {
    let (e, _) = engine(KvStorage::Paged, 64, 512);
    // After `z` the fake gives the vocabulary's end token: the request stops there, and
    // the end token counts in the usage but is not streamed.
    let (text, ids, reason, usage) = collect(&mut e.submit(greedy(tokens("wx"), 10)).unwrap());
    assert_eq!((text.as_str(), reason), ("yz", FinishReason::Stop));
    assert_eq!(ids, tokens("yz"));
    assert_eq!(usage.completion_tokens, 3);
    // A stop string ends the text before it.
    let mut req = greedy(tokens("pq"), 10);
    req.stop = vec!["t".into()];
    let (text, _, reason, _) = collect(&mut e.submit(req).unwrap());
    assert_eq!((text.as_str(), reason), ("rs", FinishReason::Stop));
    e.shutdown();
}

#[test]
fn the_scheduler_sizes_itself_from_the_capacity_the_runtime_declares() {
    // Two blocks: 32 tokens.
    let (e, _) = engine(KvStorage::Paged, 2, 512);
    assert_eq!(e.stats().kv_blocks_total, 2);
    let too_big = e.submit(greedy(vec![u32::from(b'a'); 20], 13));
    assert_eq!(
        too_big.err(),
        Some(EngineError::ExceedsKvCache {
            needed: 33,
            capacity: 32
        })
    );
    let (_, ids, reason, _) =
        collect(&mut e.submit(greedy(vec![u32::from(b'a'); 20], 12)).unwrap());
    assert_eq!((ids.len(), reason), (12, FinishReason::Length));
    e.shutdown();
}

/// Two identical 40-token prompts together, then one more after they finished: the
/// cached prompt tokens of the last, and the steps the runtime saw.
fn identical_prompts(kv: KvStorage) -> (usize, Vec<Vec<Seen>>) {
    let (e, record) = engine(kv, 64, 512);
    let prompt: Vec<u32> = (0..40).map(|i| u32::from(b'a') + i % 20).collect();
    // The second arrives while the first is still in its first step: they overlap.
    let gate = record.gate.lock().unwrap();
    let mut a = e.submit(greedy(prompt.clone(), 3)).unwrap();
    let mut b = e.submit(greedy(prompt.clone(), 3)).unwrap();
    drop(gate);
    let (ta, ..) = collect(&mut a);
    let (tb, ..) = collect(&mut b);
    assert_eq!(ta, tb);
    let (.., usage) = collect(&mut e.submit(greedy(prompt, 3)).unwrap());
    e.shutdown();
    let steps = record.steps.lock().unwrap().clone();
    (usage.cached_tokens, steps)
}

/// Whether two chunks of one step name the same block.
fn shares_blocks(step: &[Seen]) -> bool {
    step.iter().enumerate().any(|(i, x)| {
        step[i + 1..]
            .iter()
            .any(|y| x.block_table.iter().any(|b| y.block_table.contains(b)))
    })
}

#[test]
fn prefix_blocks_are_shared_only_where_the_runtime_declares_paged_kv() {
    let (cached, steps) = identical_prompts(KvStorage::Paged);
    assert_eq!(cached, 32, "two full blocks from the cache");
    assert!(steps.iter().any(|s| shares_blocks(s)));

    // A runtime that keeps K/V itself: nothing is shared, so each running sequence's
    // first block identifies it.
    let (cached, steps) = identical_prompts(KvStorage::Internal);
    assert_eq!(cached, 0);
    assert!(steps.iter().all(|s| !shares_blocks(s)));
    assert!(steps.iter().any(|s| s.len() == 2), "both ran together");
}

#[test]
fn after_a_panic_the_runtime_is_reset_and_serves_again() {
    let (e, record) = engine(KvStorage::Paged, 64, 512);
    // The panic comes before the request can finish: at most one step has run.
    let gate = record.gate.lock().unwrap();
    let mut s = e.submit(greedy(tokens("a"), 20)).unwrap();
    e.inject_panic().unwrap();
    drop(gate);
    let (_, _, reason, _) = collect(&mut s);
    assert_eq!(reason, FinishReason::Error);
    let t = Instant::now();
    while !e.is_ready() {
        assert!(t.elapsed() < Duration::from_secs(10), "never restarted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(record.resets.load(Ordering::Acquire), 1);
    let (text, ..) = collect(&mut e.submit(greedy(tokens("a"), 3)).unwrap());
    assert_eq!(text, "bcd");
    e.shutdown();
}

#[test]
fn a_runtime_that_keeps_kv_hears_of_every_sequence_that_ends() {
    let (e, record) = engine(KvStorage::Internal, 64, 512);
    for p in ["ab", "hij"] {
        collect(&mut e.submit(greedy(tokens(p), 3)).unwrap());
    }
    // One cancelled mid-generation: the loop notices before its next step.
    let mut long = e.submit(greedy(tokens("a"), 500)).unwrap();
    assert!(matches!(long.blocking_recv(), Some(Event::Token { .. })));
    drop(long);
    collect(&mut e.submit(greedy(tokens("pq"), 3)).unwrap());
    e.shutdown();
    let started: Vec<u32> = record
        .steps
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .filter(|c| c.start_pos == 0)
        .map(|c| c.block_table[0])
        .collect();
    let mut released = record.released.lock().unwrap().clone();
    assert_eq!(started.len(), 4, "four sequences ran");
    let mut want = started;
    want.sort_unstable();
    released.sort_unstable();
    assert_eq!(
        released, want,
        "each ended sequence released by its first block"
    );
}
