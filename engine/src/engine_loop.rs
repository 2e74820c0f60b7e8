//! The model loop: owns the model runtime and the scheduler, and turns scheduled steps
//! into the runtime's forward passes, sampled tokens and events. It knows the runtime
//! only through `ModelRuntime`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

use crate::backends::{KvCapacity, ModelRuntime, RowRunner, SeqChunk};
use crate::block_allocator::BLOCK_SIZE;
use crate::metrics::EngineMetrics;
use crate::request::{EngineStats, Event, FinishReason, GenerationRequest, Usage};
use crate::sampling::{logprobs, Sampler, TokenLogprobs};
use crate::scheduler::{ScheduledChunk, Scheduler, SchedulerConfig, SeqId, Sequence};
use crate::structured::Constraint;
use crate::supervisor::SupervisedLoop;
use crate::text::detokenizer::IncrementalDetokenizer;
use crate::text::stop::StopMatcher;
use crate::text::tokenizer::Tokenizer;

/// A request on its way from `Engine::submit` to the loop.
pub(crate) struct Submission {
    pub req: GenerationRequest,
    pub tx: tmpsc::Sender<Event>,
}

/// What engine handles send the loop.
pub(crate) enum Command {
    /// Boxed: a request is large next to the other commands.
    Submit(Box<Submission>),
    /// Panic in the next step, with whatever is in flight: exercises the supervisor
    /// (`Engine::inject_panic`, reachable only when fault injection is configured).
    InjectPanic,
    /// Fail everything in flight with this message, now (`Engine::abort`: the server's
    /// shutdown grace period is over).
    Abort(String),
}

/// Per-request state the scheduler does not need: output side and stop conditions.
struct Active {
    tx: tmpsc::Sender<Event>,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    stop_token_ids: Vec<u32>,
    max_tokens: usize,
    min_tokens: usize,
    ignore_eos: bool,
    logprobs: Option<usize>,
    /// Structured output: the mask before each draw, and the end of the output.
    constraint: Option<Constraint>,
    /// The masked logits of the row being sampled (reused: one vocabulary of floats).
    masked: Vec<f32>,
    prompt_len: usize,
    generated: usize,
    accepted: Instant,
}

pub(crate) struct EngineLoop {
    runtime: Box<dyn ModelRuntime>,
    /// The runtime's, read once: the scheduler's block pool and the KV memory metric.
    kv: KvCapacity,
    /// The runtime picks plain-greedy rows' tokens itself (`SeqChunk::device_greedy`).
    device_sampling: bool,
    tokenizer: Arc<Tokenizer>,
    scheduler: Scheduler,
    active: HashMap<SeqId, Active>,
    rx: Receiver<Command>,
    /// Accepted requests not yet admitted; shared with `Engine::submit` for its bound.
    waiting_count: Arc<AtomicUsize>,
    next_id: SeqId,
    /// Published after every iteration for `Engine::stats`.
    stats: Arc<Mutex<EngineStats>>,
    sched_cfg: SchedulerConfig,
    /// Set by `Command::InjectPanic`.
    panic_next_step: bool,
    /// KV blocks touched by schedulers before the last restart (the memory stays).
    kv_touched_before: usize,
    /// Tokens computed by schedulers before the last restart.
    tokens_before: u64,
    metrics: EngineMetrics,
}

/// One sampled row of a step: the request, its logits, and what its sampler drew.
struct SampledRow<'a> {
    row: usize,
    seq: SeqId,
    logits: &'a [f32],
    active: &'a mut Active,
    token: u32,
    logprobs: Option<TokenLogprobs>,
    /// Why the row's constraint could not go on (the request ends with an error).
    failed: Option<String>,
}

impl EngineLoop {
    // The loop's parts, each from a different owner: grouping them would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        runtime: Box<dyn ModelRuntime>,
        tokenizer: Arc<Tokenizer>,
        cfg: SchedulerConfig,
        rx: Receiver<Command>,
        waiting_count: Arc<AtomicUsize>,
        stats: Arc<Mutex<EngineStats>>,
        metrics: EngineMetrics,
    ) -> Self {
        let kv = runtime.kv_capacity();
        let device_sampling = runtime.capabilities().device_sampling;
        let scheduler = Scheduler::new(cfg, kv.blocks);
        EngineLoop {
            runtime,
            kv,
            device_sampling,
            tokenizer,
            scheduler,
            active: HashMap::new(),
            rx,
            waiting_count,
            next_id: 0,
            stats,
            sched_cfg: cfg,
            panic_next_step: false,
            kv_touched_before: 0,
            tokens_before: 0,
            metrics,
        }
    }

    fn publish(&self) {
        let sch = &self.scheduler;
        let st = sch.stats();
        let (in_use, total) = sch.kv_blocks();
        self.metrics
            .state(sch.n_running(), sch.n_waiting(), sch.kv_usage(), &st);
        self.metrics.cache_config(BLOCK_SIZE, total);
        let touched = self.kv_touched_before.max(sch.kv_blocks_touched());
        self.metrics
            .kv_touched(touched * BLOCK_SIZE * self.kv.bytes_per_token);
        if let Some(m) = self.runtime.device_memory() {
            self.metrics.device_memory(&m);
        }
        if let Ok(mut s) = self.stats.lock() {
            *s = EngineStats {
                running: sch.n_running(),
                queued: sch.n_waiting(),
                kv_blocks_in_use: in_use,
                kv_blocks_total: total,
                kv_blocks_touched: touched,
                preemptions: st.preemptions,
                prompt_tokens_admitted: st.prompt_tokens_queried,
                prompt_tokens_cached: st.prompt_tokens_cached,
                tokens_computed: self.tokens_before + st.tokens_scheduled,
            };
        }
    }

    fn accept(&mut self, c: Command) {
        let s = match c {
            Command::Submit(s) => *s,
            Command::InjectPanic => {
                self.panic_next_step = true;
                return;
            }
            Command::Abort(message) => {
                self.fail_all(&message);
                // Frees the failed requests' blocks and the runtime's state with them.
                self.reset();
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let r = s.req;
        self.active.insert(
            id,
            Active {
                tx: s.tx,
                sampler: Sampler::new(r.sampling, &r.prompt),
                detok: IncrementalDetokenizer::default(),
                stop: StopMatcher::new(r.stop),
                stop_token_ids: r.stop_token_ids,
                max_tokens: r.max_tokens,
                min_tokens: r.min_tokens,
                ignore_eos: r.ignore_eos,
                logprobs: r.logprobs,
                constraint: r.constraint,
                masked: Vec::new(),
                prompt_len: r.prompt.len(),
                generated: 0,
                accepted: Instant::now(),
            },
        );
        self.scheduler.add(id, r.prompt);
    }

    /// Frees everything held by requests whose stream was dropped.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.active.remove(&id);
            release(&mut *self.runtime, &self.scheduler, id);
            if self.scheduler.remove(id) == Some(false) {
                self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            }
            self.metrics.finished(FinishReason::Cancelled);
        }
    }

    fn step(&mut self) {
        if std::mem::take(&mut self.panic_next_step) {
            panic!("injected fault: engine loop panic");
        }
        let plan = self.scheduler.schedule();
        self.waiting_count
            .fetch_sub(plan.admitted.len(), Ordering::AcqRel);
        let admitted_tokens: usize = plan
            .admitted
            .iter()
            .filter_map(|&id| self.scheduler.get(id).map(|s| s.prompt_len))
            .sum();
        self.metrics
            .admissions(admitted_tokens, plan.preempted.len());
        for id in &plan.admitted {
            if let Some(a) = self.active.get(id) {
                self.metrics.queue_time(a.accepted.elapsed());
            }
        }
        if plan.is_empty() {
            // `submit` only accepts requests that fit the cache alone, so with nothing
            // running the head of the queue always fits; an empty plan means nothing to do.
            return;
        }
        let started = Instant::now();
        let Self {
            runtime,
            tokenizer,
            scheduler,
            active,
            metrics,
            device_sampling,
            ..
        } = self;
        // Every planned sequence is tracked by the scheduler; one that were not (a bug)
        // would be left out of the step rather than panic the loop.
        let planned: Vec<(&ScheduledChunk, &Sequence)> = plan
            .chunks
            .iter()
            .filter_map(|c| scheduler.get(c.seq).map(|seq| (c, seq)))
            .collect();
        // Rows the runtime may pick by argmax where the logits are: greedy with nothing
        // applied (no penalties, bias, mask, banned end tokens or log-probabilities).
        let on_device = |seq: SeqId| {
            *device_sampling
                && active.get(&seq).is_some_and(|a| {
                    a.sampler.is_plain_greedy()
                        && a.constraint.is_none()
                        && a.logprobs.is_none()
                        && a.generated >= a.min_tokens
                })
        };
        let device_greedy: Vec<bool> = planned
            .iter()
            .map(|(c, _)| c.sample && on_device(c.seq))
            .collect();
        let chunks: Vec<SeqChunk> = planned
            .iter()
            .zip(&device_greedy)
            .map(|((c, seq), &device_greedy)| SeqChunk {
                tokens: &seq.tokens[c.start..c.start + c.len],
                start_pos: c.start,
                block_table: &seq.blocks,
                want_logits: c.sample,
                decode_from: seq.prompt_len,
                device_greedy,
            })
            .collect();
        let vocab = runtime.vocab_size();
        // Host rows: the sampled chunks whose logits come back, in batch order.
        let row_of: HashMap<SeqId, usize> = planned
            .iter()
            .zip(&device_greedy)
            .filter(|((c, _), &d)| c.sample && !d)
            .enumerate()
            .map(|(row, ((c, _), _))| (c.seq, row))
            .collect();
        let device_rows: Vec<SeqId> = planned
            .iter()
            .zip(&device_greedy)
            .filter(|(_, &d)| d)
            .map(|((c, _), _)| c.seq)
            .collect();
        let tokenizer: &Tokenizer = tokenizer;
        let mut sampled: Vec<(SeqId, u32)> = Vec::new();
        let mut lps: Vec<Option<TokenLogprobs>> = Vec::new();
        let mut failures: Vec<(SeqId, String)> = Vec::new();
        runtime.step(&chunks, &mut |logits: &[f32], runner: &dyn RowRunner| {
            let mut rows: Vec<SampledRow> = active
                .iter_mut()
                .filter_map(|(&seq, a)| {
                    let &row = row_of.get(&seq)?;
                    Some(SampledRow {
                        row,
                        seq,
                        logits: &logits[row * vocab..(row + 1) * vocab],
                        active: a,
                        token: 0,
                        logprobs: None,
                        failed: None,
                    })
                })
                .collect();
            rows.sort_unstable_by_key(|r| r.row);
            // Each row's sampler is independent: the runtime may run them side by side.
            let mut jobs: Vec<_> = rows
                .iter_mut()
                .map(|r| move || sample_row(r, tokenizer))
                .collect();
            let mut jobs: Vec<&mut (dyn FnMut() + Send)> = jobs
                .iter_mut()
                .map(|j| j as &mut (dyn FnMut() + Send))
                .collect();
            runner.run_rows(&mut jobs);
            for r in rows {
                sampled.push((r.seq, r.token));
                lps.push(r.logprobs);
                failures.extend(r.failed.map(|e| (r.seq, e)));
            }
        });
        if !device_rows.is_empty() {
            let tokens = runtime.take_device_tokens();
            if tokens.len() == device_rows.len() {
                for (&seq, &token) in device_rows.iter().zip(&tokens) {
                    if let Some(a) = active.get_mut(&seq) {
                        a.sampler.accept(token);
                    }
                    sampled.push((seq, token));
                    lps.push(None);
                }
            } else {
                // A runtime bug: fail these requests rather than guess their tokens (the
                // scheduler still gets a placeholder, as for rows whose sampling failed).
                let error = format!(
                    "the runtime returned {} device-sampled tokens for {} rows",
                    tokens.len(),
                    device_rows.len()
                );
                for &seq in &device_rows {
                    sampled.push((seq, 0));
                    lps.push(None);
                    failures.push((seq, error.clone()));
                }
            }
        }
        scheduler.update(&plan, &sampled);
        let n_tokens: usize = plan.chunks.iter().map(|c| c.len).sum();
        metrics.step(
            plan.chunks.len(),
            n_tokens,
            sampled.len(),
            started.elapsed(),
        );
        for (seq, error) in failures {
            if let Some(a) = active.remove(&seq) {
                release(&mut **runtime, scheduler, seq);
                scheduler.remove(seq);
                fail(&a, &error, metrics);
            }
        }
        for ((seq, id), lp) in sampled.into_iter().zip(lps) {
            let cached = scheduler.get(seq).map_or(0, |s| s.cached_prompt_tokens);
            let Some(a) = active.get_mut(&seq) else {
                continue;
            };
            if emit(a, tokenizer, id, lp, cached, metrics).is_some() {
                active.remove(&seq);
                release(&mut **runtime, scheduler, seq);
                scheduler.remove(seq);
            }
        }
    }
}

impl SupervisedLoop for EngineLoop {
    fn serve(&mut self) {
        loop {
            if self.active.is_empty() {
                // Idle: block until work arrives (or every handle is gone).
                self.publish();
                match self.rx.recv() {
                    Ok(c) => self.accept(c),
                    Err(_) => return,
                }
            }
            while let Ok(c) = self.rx.try_recv() {
                self.accept(c);
            }
            self.drop_cancelled();
            self.step();
            self.publish();
        }
    }

    fn fail_all(&mut self, message: &str) {
        for (id, a) in self.active.drain() {
            let queued = self.scheduler.get(id).is_some_and(|s| !s.was_admitted());
            if queued {
                self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            }
            fail(&a, message, &self.metrics);
        }
    }

    fn reset(&mut self) {
        self.kv_touched_before = self
            .kv_touched_before
            .max(self.scheduler.kv_blocks_touched());
        self.tokens_before += self.scheduler.stats().tokens_scheduled;
        self.scheduler = Scheduler::new(self.sched_cfg, self.kv.blocks);
        self.runtime.reset();
        self.panic_next_step = false;
        self.publish();
    }
}

/// Tells the runtime that sequence `id` ended, by the first block of its table (how a
/// runtime that keeps K/V itself knows its sequences).
fn release(runtime: &mut dyn ModelRuntime, scheduler: &Scheduler, id: SeqId) {
    if let Some(&first) = scheduler.get(id).and_then(|s| s.blocks.first()) {
        runtime.release(first);
    }
}

/// Draws `r`'s next token (and its logprobs when asked for) from its logits, under its
/// constraint's mask when it has one.
fn sample_row(r: &mut SampledRow, tokenizer: &Tokenizer) {
    let Active {
        sampler,
        constraint,
        masked,
        generated,
        min_tokens,
        stop_token_ids,
        logprobs: want_logprobs,
        ..
    } = &mut *r.active;
    let mut banned: Vec<u32> = if generated < min_tokens {
        tokenizer
            .stop_tokens
            .iter()
            .chain(stop_token_ids.iter())
            .copied()
            .collect()
    } else {
        Vec::new()
    };
    let logits: &[f32] = match constraint {
        None => r.logits,
        Some(c) => {
            if let Err(e) = c.mask(r.logits, masked) {
                r.failed = Some(format!("structured output failed: {e}"));
                return;
            }
            // A complete output allows only end tokens: then `min_tokens` gives way.
            let allowed_besides_banned = masked
                .iter()
                .enumerate()
                .any(|(i, x)| x.is_finite() && !banned.contains(&(i as u32)));
            if !banned.is_empty() && !allowed_besides_banned {
                banned.clear();
            }
            masked
        }
    };
    r.token = sampler.sample(logits, &banned);
    if let Some(c) = constraint {
        if let Err(e) = c.advance(r.token) {
            r.failed = Some(format!("structured output failed: {e}"));
            return;
        }
    }
    // Log-probabilities are the model's own, before any mask (as vLLM reports them).
    r.logprobs = want_logprobs.map(|n| logprobs(r.logits, r.token, n));
}

/// Ends request `a` with an error (counted in `metrics`).
fn fail(a: &Active, error: &str, metrics: &EngineMetrics) {
    // Counted before the client can see the end, so that what it reads next includes
    // this request.
    metrics.finished(FinishReason::Error);
    let _ = a.tx.try_send(Event::Done {
        reason: FinishReason::Error,
        usage: Usage {
            prompt_tokens: a.prompt_len,
            completion_tokens: a.generated,
            cached_tokens: 0,
        },
        error: Some(error.to_string()),
    });
}

/// Sends what token `id` adds to request `a`'s stream; returns the finish reason when
/// the request is done (and counts it in `metrics`).
fn emit(
    a: &mut Active,
    tokenizer: &Tokenizer,
    id: u32,
    logprobs: Option<TokenLogprobs>,
    cached_tokens: usize,
    metrics: &EngineMetrics,
) -> Option<FinishReason> {
    a.generated += 1;
    let end_token =
        (!a.ignore_eos && tokenizer.stop_tokens.contains(&id)) || a.stop_token_ids.contains(&id);
    let mut reason = end_token.then_some(FinishReason::Stop);
    let mut text = String::new();
    if !end_token {
        let piece = a.detok.push(tokenizer, id);
        if a.generated < a.min_tokens {
            // Stop strings do not apply before min_tokens (vLLM's rule).
            text = a.stop.flush() + &piece;
        } else {
            let check = a.stop.push(&piece);
            text = check.emit;
            if check.stopped {
                reason = Some(FinishReason::Stop);
            }
        }
    }
    // A structured output that is complete ends here, as an end token would.
    let complete = a.constraint.as_ref().is_some_and(|c| c.is_finished());
    if reason.is_none() && (complete || a.generated >= a.max_tokens) {
        reason = Some(if complete {
            FinishReason::Stop
        } else {
            FinishReason::Length
        });
        text.push_str(&a.detok.finish());
        text.push_str(&a.stop.flush());
    }
    // An end token is not part of the completion, as in OpenAI's API.
    if !end_token {
        let _ = a.tx.try_send(Event::Token { id, text, logprobs });
    }
    if let Some(reason) = reason {
        // Counted before the client can see the end, so that what it reads next
        // includes this request.
        metrics.finished(reason);
        // The end token counts, as llama-server and vLLM count it.
        let _ = a.tx.try_send(Event::Done {
            reason,
            usage: Usage {
                prompt_tokens: a.prompt_len,
                completion_tokens: a.generated,
                cached_tokens,
            },
            error: None,
        });
    }
    reason
}
