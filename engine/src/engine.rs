//! The engine: a dedicated thread that owns the model and KV cache and serves requests
//! submitted from async code through a small typed API.
//!
//! Queues and their bounds:
//! - submissions: at most `max_waiting` requests wait for a slot; `submit` beyond that
//!   fails at once with `EngineError::QueueFull` (the gateway answers 503).
//! - events: each request's stream has room for every event it can produce
//!   (`max_tokens` tokens plus the final one), so the engine never blocks on a slow
//!   reader and never drops an event.
//! - cancellation: dropping a `RequestStream` closes its channel; the engine checks
//!   before every step and frees the request's KV blocks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc as tmpsc;

use crate::detokenizer::IncrementalDetokenizer;
use crate::error::EngineError;
use crate::kv_cache::{KvCache, BLOCK_SIZE};
use crate::model::{ForwardScratch, Model, SeqChunk};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_running_requests: usize,
    pub max_waiting_requests: usize,
    /// Tokens one forward step may process (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// KV cache capacity in tokens.
    pub kv_cache_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running_requests: 16,
            max_waiting_requests: 256,
            max_num_batched_tokens: 512,
            kv_cache_tokens: 65536,
        }
    }
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a request's stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it completes (may be empty mid-character).
    Token { id: u32, text: String },
    /// The last event of every request.
    Done {
        reason: FinishReason,
        usage: Usage,
        error: Option<String>,
    },
}

/// The receiving end of one request. Drop it to cancel the request.
pub struct RequestStream {
    rx: tmpsc::Receiver<Event>,
}

impl RequestStream {
    /// The next event; `None` after `Done`.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Blocking variant for non-async callers (benchmarks, tests).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

struct Submission {
    req: GenerationRequest,
    tx: tmpsc::Sender<Event>,
}

/// Handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineShared>,
}

struct EngineShared {
    tx: std::sync::Mutex<Option<Sender<Submission>>>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    context_length: usize,
    vocab_size: usize,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the model loop on its own thread.
    pub fn start(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let context_length = model.cfg.context_length;
        let vocab_size = model.cfg.vocab_size;
        let n_blocks = cfg.kv_cache_tokens.div_ceil(BLOCK_SIZE).max(1);
        let max_waiting = cfg.max_waiting_requests;
        let w = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || {
                let kv = KvCache::new(&model.cfg, n_blocks);
                EngineLoop::new(model, tokenizer, cfg, kv, rx, w).run()
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            inner: Arc::new(EngineShared {
                tx: std::sync::Mutex::new(Some(tx)),
                waiting,
                max_waiting,
                context_length,
                vocab_size,
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    /// Queues a request. Fails at once when the waiting queue is full or the request
    /// cannot fit the context.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream, EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&bad) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.inner.vocab_size)
        {
            return Err(EngineError::InvalidToken(bad));
        }
        let max = self.inner.context_length;
        if req.prompt.len() + req.max_tokens > max {
            return Err(EngineError::ContextLengthExceeded {
                max,
                requested: req.prompt.len() + req.max_tokens,
                prompt: req.prompt.len(),
                completion: req.max_tokens,
            });
        }
        let w = &self.inner.waiting;
        if w.fetch_add(1, Ordering::AcqRel) >= self.inner.max_waiting {
            w.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(self.inner.max_waiting));
        }
        let (tx, rx) = tmpsc::channel(req.max_tokens + 1);
        let sent = self
            .inner
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|s| s.send(Submission { req, tx }).is_ok()));
        if sent != Some(true) {
            w.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream { rx })
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }

    /// Stops accepting requests and waits for the loop to finish the ones it has.
    pub fn shutdown(&self) {
        if let Ok(mut g) = self.inner.tx.lock() {
            g.take();
        }
        if let Some(t) = self.inner.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }
}

/// A request inside the loop.
struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    tx: tmpsc::Sender<Event>,
}

struct EngineLoop {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    kv: KvCache,
    free_blocks: Vec<u32>,
    rx: Receiver<Submission>,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    scratch: ForwardScratch,
}

impl EngineLoop {
    fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        kv: KvCache,
        rx: Receiver<Submission>,
        waiting_count: Arc<AtomicUsize>,
    ) -> Self {
        let free_blocks = (0..kv.n_blocks() as u32).rev().collect();
        EngineLoop {
            model,
            tokenizer,
            cfg,
            kv,
            free_blocks,
            rx,
            waiting_count,
            waiting: VecDeque::new(),
            running: Vec::new(),
            scratch: ForwardScratch::default(),
        }
    }

    fn run(mut self) {
        loop {
            // Idle: block until work arrives (or every handle is gone).
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.tx.is_closed());
        self.waiting_count
            .fetch_sub(before - self.waiting.len(), Ordering::AcqRel);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let seq = self.running.swap_remove(i);
                self.free_blocks.extend(seq.blocks);
            } else {
                i += 1;
            }
        }
    }

    /// Moves waiting requests into the batch while slots and KV blocks allow. A request
    /// reserves blocks for its whole prompt and completion up front, so it can never
    /// run out mid-generation.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running_requests {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = (front.req.prompt.len() + front.req.max_tokens).div_ceil(BLOCK_SIZE);
            let fits_ever = need <= self.kv.n_blocks();
            if fits_ever && need > self.free_blocks.len() {
                break; // wait for running requests to free blocks
            }
            let Some(s) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            if !fits_ever {
                let _ = s.tx.try_send(Event::Done {
                    reason: FinishReason::Error,
                    usage: Usage {
                        prompt_tokens: s.req.prompt.len(),
                        completion_tokens: 0,
                    },
                    error: Some(format!(
                        "request needs {need} KV blocks but the cache has {}",
                        self.kv.n_blocks()
                    )),
                });
                continue;
            }
            let blocks = self.free_blocks.split_off(self.free_blocks.len() - need);
            let prompt_len = s.req.prompt.len();
            self.running.push(Sequence {
                tokens: s.req.prompt,
                prompt_len,
                computed: 0,
                blocks,
                max_tokens: s.req.max_tokens,
                ignore_eos: s.req.ignore_eos,
                sampler: Sampler::new(s.req.sampling),
                detok: IncrementalDetokenizer::default(),
                tx: s.tx,
            });
        }
    }

    /// One forward step: every decoding sequence advances one token, and prompts are
    /// prefilled in chunks within the step's token budget.
    fn step(&mut self) {
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        // (index into running, chunk length)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            let todo = seq.tokens.len() - seq.computed;
            if todo == 1 && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            let todo = seq.tokens.len() - seq.computed;
            if todo > 1 && budget > 0 {
                let n = todo.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                SeqChunk {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start_pos: s.computed,
                    block_table: &s.blocks,
                    want_logits: s.computed + n == s.tokens.len(),
                }
            })
            .collect();
        let logits = self.model.forward(&chunks, &mut self.kv, &mut self.scratch);
        let vocab = self.model.cfg.vocab_size;
        let mut row = 0;
        let mut finished = Vec::new();
        for &(i, n) in &plan {
            let seq = &mut self.running[i];
            seq.computed += n;
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let l = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let id = seq.sampler.sample(l);
            seq.tokens.push(id);
            let generated = seq.tokens.len() - seq.prompt_len;
            let is_stop = !seq.ignore_eos && self.tokenizer.stop_tokens.contains(&id);
            let mut text = if is_stop {
                String::new()
            } else {
                seq.detok.push(&self.tokenizer, id)
            };
            let reason = if is_stop {
                Some(FinishReason::Stop)
            } else if generated >= seq.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if reason.is_some() {
                text.push_str(&seq.detok.finish());
            }
            // A stop token is not part of the completion, as in OpenAI's API.
            if !is_stop {
                let _ = seq.tx.try_send(Event::Token { id, text });
            }
            if let Some(reason) = reason {
                // The stop token counts, as llama-server and vLLM count it.
                let completion_tokens = generated;
                let _ = seq.tx.try_send(Event::Done {
                    reason,
                    usage: Usage {
                        prompt_tokens: seq.prompt_len,
                        completion_tokens,
                    },
                    error: None,
                });
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let seq = self.running.swap_remove(i);
            self.free_blocks.extend(seq.blocks);
        }
    }
}
