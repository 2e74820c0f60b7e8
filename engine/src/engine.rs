//! The engine handle: submit a request, get a stream of events, drop it to cancel.
//!
//! The model loop runs on its own thread (`engine_loop`), never on the async runtime,
//! and computes its steps on a `ModelRuntime` (see `backends`), whatever runs it.
//! Queues and their bounds:
//! - waiting: at most `max_waiting_requests` accepted requests wait for a place in the
//!   running batch; `submit` beyond that fails at once with `EngineError::QueueFull`
//!   (the gateway answers 503 + Retry-After). Preempted requests go back to the queue
//!   without counting against the bound: they were already accepted.
//! - events: each request's stream has room for every event it can produce (one per
//!   generated token plus the final one), so the engine never blocks on a slow reader
//!   and never drops an event.
//! - cancellation: dropping a `RequestStream` closes its channel; the loop checks before
//!   every step and frees the request's KV blocks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc as tmpsc;

use crate::backends::{KvStorage, ModelRuntime, RuntimeInfo};
use crate::engine_loop::{Command, EngineLoop, Submission};
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::request::{EngineStats, GenerationRequest, RequestStream};
use crate::scheduler::SchedulerConfig;
use crate::supervisor::{supervise, EngineHealth};
use crate::synthetic::SyntheticLoop;
use crate::text::tokenizer::Tokenizer;

/// Limits of one engine, and the name it reports under.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The served model's name: the `model` label of the engine's metrics and its logs.
    pub name: String,
    pub max_running_requests: usize,
    pub max_waiting_requests: usize,
    /// Tokens one forward step may process (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            name: "default".into(),
            max_running_requests: 32,
            max_waiting_requests: 256,
            max_num_batched_tokens: 512,
        }
    }
}

/// What `submit` checks requests against.
struct EngineLimits {
    context_length: usize,
    vocab_size: usize,
    kv_capacity_tokens: usize,
    max_waiting: usize,
    kv_blocks: usize,
    runtime: RuntimeInfo,
    /// Whether requests may carry a structured-output constraint.
    structured_outputs: bool,
}

/// Handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineShared>,
}

struct EngineShared {
    tx: Mutex<Option<Sender<Command>>>,
    health: Arc<EngineHealth>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    context_length: usize,
    kv_capacity_tokens: usize,
    vocab_size: usize,
    runtime: RuntimeInfo,
    structured_outputs: bool,
    stats: Arc<Mutex<EngineStats>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the model loop on its own thread, computing on `runtime` (built by
    /// `backends::load` for a model file). The scheduler's KV blocks are the runtime's
    /// declared capacity; a runtime that keeps K/V itself gets no prefix caching.
    pub fn start(
        runtime: Box<dyn ModelRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let kv = runtime.kv_capacity();
        let sched = SchedulerConfig {
            max_running_requests: cfg.max_running_requests.max(1),
            max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
            // Sharing a prefix means two sequences' block tables name the same blocks:
            // meaningful only where the blocks are the runtime's storage.
            prefix_caching: runtime.capabilities().kv == KvStorage::Paged,
        };
        let limits = EngineLimits {
            context_length: runtime.context_length(),
            vocab_size: runtime.vocab_size(),
            kv_capacity_tokens: kv.tokens(),
            max_waiting: cfg.max_waiting_requests,
            kv_blocks: kv.blocks,
            runtime: runtime.info(),
            // The loop masks the host logits itself: every runtime can be constrained.
            structured_outputs: true,
        };
        let metrics = EngineMetrics::new(&cfg.name);
        Self::spawn(
            "sluice-engine",
            limits,
            move |rx, waiting, stats, health| {
                let name = metrics.model().to_string();
                let mut l = EngineLoop::new(
                    runtime,
                    tokenizer,
                    sched,
                    rx,
                    waiting,
                    stats,
                    metrics.clone(),
                );
                supervise(&mut l, &health, &name, &metrics);
            },
        )
    }

    /// Starts a synthetic engine: no model, every request gets `tokens_per_second`
    /// tokens of filler text until its `max_tokens`, through the same API, queue bounds
    /// and cancellation. For testing clients and measuring the gateway itself.
    pub fn start_synthetic(
        context_length: usize,
        vocab_size: usize,
        tokens_per_second: f64,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        if !(tokens_per_second.is_finite() && tokens_per_second > 0.0) {
            return Err(EngineError::Internal(format!(
                "tokens_per_second must be positive, got {tokens_per_second}"
            )));
        }
        let limits = EngineLimits {
            context_length,
            vocab_size,
            kv_capacity_tokens: usize::MAX,
            max_waiting: cfg.max_waiting_requests,
            kv_blocks: 0,
            runtime: RuntimeInfo {
                backend: "synthetic",
                device: "none".into(),
            },
            // Filler text cannot follow a grammar.
            structured_outputs: false,
        };
        let max_running = cfg.max_running_requests.max(1);
        let metrics = EngineMetrics::new(&cfg.name);
        Self::spawn(
            "sluice-synthetic",
            limits,
            move |rx, waiting, stats, health| {
                let name = metrics.model().to_string();
                let mut l = SyntheticLoop::new(
                    rx,
                    waiting,
                    stats,
                    tokens_per_second,
                    max_running,
                    metrics.clone(),
                );
                supervise(&mut l, &health, &name, &metrics);
            },
        )
    }

    fn spawn(
        name: &str,
        l: EngineLimits,
        body: impl FnOnce(Receiver<Command>, Arc<AtomicUsize>, Arc<Mutex<EngineStats>>, Arc<EngineHealth>)
            + Send
            + 'static,
    ) -> Result<Engine, EngineError> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(EngineStats {
            kv_blocks_total: l.kv_blocks,
            ..Default::default()
        }));
        let health = Arc::new(EngineHealth::default());
        let (w, st, h) = (waiting.clone(), stats.clone(), health.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx, w, st, h))
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            inner: Arc::new(EngineShared {
                tx: Mutex::new(Some(tx)),
                health,
                waiting,
                max_waiting: l.max_waiting,
                context_length: l.context_length,
                kv_capacity_tokens: l.kv_capacity_tokens,
                vocab_size: l.vocab_size,
                runtime: l.runtime,
                structured_outputs: l.structured_outputs,
                stats,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Whether requests may carry a structured-output constraint (not on the synthetic
    /// engine).
    pub fn structured_outputs(&self) -> bool {
        self.inner.structured_outputs
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    /// What computes the steps: backend and device, as `/admin/models` shows them.
    pub fn runtime(&self) -> &RuntimeInfo {
        &self.inner.runtime
    }

    /// Queues a request. Fails at once when the waiting queue is full or the request
    /// cannot fit the context or the KV cache.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestStream, EngineError> {
        if !self.inner.health.is_ready() {
            return Err(EngineError::Restarting);
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.constraint.is_some() && !self.inner.structured_outputs {
            return Err(EngineError::StructuredOutputUnsupported(
                self.inner.runtime.backend,
            ));
        }
        let vocab = self.inner.vocab_size;
        if let Some(&bad) = req
            .prompt
            .iter()
            .chain(&req.stop_token_ids)
            .chain(req.sampling.logit_bias.iter().map(|(t, _)| t))
            .find(|&&t| t as usize >= vocab)
        {
            return Err(EngineError::InvalidToken(bad));
        }
        let needed = req.prompt.len() + req.max_tokens;
        let max = self.inner.context_length;
        if needed > max {
            return Err(EngineError::ContextLengthExceeded {
                max,
                requested: needed,
                prompt: req.prompt.len(),
                completion: req.max_tokens,
            });
        }
        if needed > self.inner.kv_capacity_tokens {
            return Err(EngineError::ExceedsKvCache {
                needed,
                capacity: self.inner.kv_capacity_tokens,
            });
        }
        let w = &self.inner.waiting;
        if w.fetch_add(1, Ordering::AcqRel) >= self.inner.max_waiting {
            w.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(self.inner.max_waiting));
        }
        let (tx, rx) = tmpsc::channel(req.max_tokens + 1);
        let sent = self.inner.tx.lock().ok().and_then(|g| {
            g.as_ref().map(|s| {
                s.send(Command::Submit(Box::new(Submission { req, tx })))
                    .is_ok()
            })
        });
        if sent != Some(true) {
            w.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream { rx })
    }

    /// False while the loop restarts after a panic (`submit` refuses meanwhile), and
    /// once it has stopped.
    pub fn is_ready(&self) -> bool {
        self.inner.health.is_ready()
            && self
                .inner
                .thread
                .lock()
                .is_ok_and(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// Restarts after panics so far.
    pub fn restarts(&self) -> u64 {
        self.inner.health.restarts()
    }

    /// Makes the loop panic in its next step, failing what is in flight: for testing
    /// the recovery path end to end. The gateway exposes it only when configured to.
    pub fn inject_panic(&self) -> Result<(), EngineError> {
        let sent = self
            .inner
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|s| s.send(Command::InjectPanic).is_ok()));
        if sent == Some(true) {
            Ok(())
        } else {
            Err(EngineError::Stopped)
        }
    }

    /// Accepted requests not yet admitted to the running batch.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }

    /// The loop's state as of its last iteration.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Whether the loop thread still runs. False once it has exited for good: its
    /// supervisor gave up (the loop could not be reset after a panic), or the engine was
    /// closed and finished its work. Unlike [`Engine::is_ready`], true while it restarts.
    pub fn is_alive(&self) -> bool {
        self.inner
            .thread
            .lock()
            .is_ok_and(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// Stops accepting requests without waiting: the loop finishes the ones it has, then
    /// its thread exits (`submit` says the engine has stopped meanwhile).
    pub fn close(&self) {
        if let Ok(mut g) = self.inner.tx.lock() {
            g.take();
        }
    }

    /// Stops accepting requests and fails the ones it has with `message` at once, instead
    /// of letting them finish: for a shutdown whose grace period is over. Their streams
    /// get an error event and end; then the loop thread exits.
    pub fn abort(&self, message: &str) {
        if let Ok(mut g) = self.inner.tx.lock() {
            if let Some(s) = g.take() {
                let _ = s.send(Command::Abort(message.to_string()));
            }
        }
    }

    /// Stops accepting requests and waits for the loop to finish the ones it has.
    /// Blocks the calling thread until then: from async code, call it through
    /// `tokio::task::spawn_blocking`, never on a runtime worker.
    pub fn shutdown(&self) {
        self.close();
        if let Some(t) = self.inner.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Event, FinishReason};

    #[test]
    fn a_closed_engine_finishes_its_requests_then_is_down_for_good() {
        let e = Engine::start_synthetic(4096, 100, 500.0, EngineConfig::default()).unwrap();
        assert!(e.is_alive() && e.is_ready());
        let mut s = e
            .submit(GenerationRequest {
                prompt: vec![1, 2, 3],
                max_tokens: 5,
                ..Default::default()
            })
            .unwrap();
        e.close();
        let refused = e.submit(GenerationRequest {
            prompt: vec![1],
            max_tokens: 1,
            ..Default::default()
        });
        assert_eq!(refused.err(), Some(EngineError::Stopped));
        // The request accepted before closing still runs to its end.
        let mut tokens = 0;
        while let Some(ev) = s.blocking_recv() {
            if matches!(ev, Event::Token { .. }) {
                tokens += 1;
            }
        }
        assert_eq!(tokens, 5);
        let t = std::time::Instant::now();
        while e.is_alive() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "the loop thread never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!e.is_ready());
        e.shutdown(); // joins an exited thread: returns at once
    }

    #[test]
    fn an_aborted_engine_fails_its_requests_at_once_then_exits() {
        // 10 tokens a second: the request would run for 100 s if let finish.
        let e = Engine::start_synthetic(4096, 100, 10.0, EngineConfig::default()).unwrap();
        let mut s = e
            .submit(GenerationRequest {
                prompt: vec![1, 2, 3],
                max_tokens: 1000,
                ..Default::default()
            })
            .unwrap();
        assert!(matches!(s.blocking_recv(), Some(Event::Token { .. })));
        let t = std::time::Instant::now();
        e.abort("grace period over");
        let mut end = None;
        while let Some(ev) = s.blocking_recv() {
            if let Event::Done { reason, error, .. } = ev {
                end = Some((reason, error));
            }
        }
        assert_eq!(
            end,
            Some((FinishReason::Error, Some("grace period over".to_string())))
        );
        e.shutdown();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "abort took {:?}",
            t.elapsed()
        );
        let refused = e.submit(GenerationRequest {
            prompt: vec![1],
            max_tokens: 1,
            ..Default::default()
        });
        assert_eq!(refused.err(), Some(EngineError::Stopped));
    }
}
