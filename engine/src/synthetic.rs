//! The synthetic engine loop: tokens at a fixed pace per request, no model. It honours
//! the same queue bound, `max_tokens`, cancellation and event protocol as the real loop,
//! so clients and the gateway can be tested and measured without inference costs.
//!
//! # Pacing
//!
//! Each running request has the time its next token is due. Token `k` is due no earlier
//! than one interval after token `k - 1` was due, and when the loop is late (a stall:
//! the thread was not scheduled, the machine is busy) the timeline slips instead of
//! being caught up: the next token is due one interval after this one was actually sent,
//! less a small slack (at most one tick) that absorbs the loop's own tick granularity
//! so that, when nothing stalls, the average pace is exactly the set one.
//!
//! A fixed timeline (token `k` due at `start + k × interval` whatever happened) would
//! answer a stall with a burst of back-to-back tokens. This engine exists to measure
//! the gateway's overhead as added inter-token latency: bursts would hide exactly that
//! (a late token followed by near-zero gaps averages back to the nominal pace), and
//! would make clients see gaps no real engine produces. With slipping, two tokens of one
//! request are never sent closer than `interval - slack` apart, so every delay shows up
//! as a longer gap and the nominal interval is a lower bound on every gap.
//!
//! Only due requests are touched: they wait in a min-heap keyed by due time, so a tick
//! costs O(tokens sent × log running) rather than a scan of every running request (with
//! 10,000 streams a scan per millisecond would take a core by itself). Cancelled
//! requests are noticed when their next token cannot be sent and by a sweep every
//! `SWEEP`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;

use crate::engine_loop::{Command, Submission};
use crate::metrics::EngineMetrics;
use crate::request::{EngineStats, Event, FinishReason, Usage};
use crate::supervisor::SupervisedLoop;

/// Filler words the synthetic engine "generates", one per token.
const WORDS: [&str; 8] = [
    " lorem",
    " ipsum",
    " dolor",
    " sit",
    " amet",
    " consectetur",
    " adipiscing",
    " elit",
];

/// Shortest gap between two ticks of the loop: with thousands of streams due at
/// staggered times, waking once per token would cost a wake-up per token; one tick
/// serves every token due within it.
const TICK: Duration = Duration::from_millis(1);

/// How often running requests are checked for cancellation (besides when a token is
/// due), so that a client that hangs up frees its place promptly even at a slow pace.
const SWEEP: Duration = Duration::from_millis(50);

/// One running request.
struct Stream {
    sub: Submission,
    generated: usize,
}

/// A running request in the heap, ordered by when its next token is due (then by
/// admission, so that requests due at the same instant keep their order). The request
/// is boxed: the heap moves entries on every push and pop, and a request is large.
struct Due {
    at: Instant,
    seq: u64,
    stream: Box<Stream>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

pub(crate) struct SyntheticLoop {
    rx: Receiver<Command>,
    waiting_count: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    interval: Duration,
    /// Lateness absorbed without slipping the timeline: the tick granularity, or half
    /// an interval when that is shorter.
    slack: Duration,
    max_running: usize,
    queued: std::collections::VecDeque<Submission>,
    running: BinaryHeap<Reverse<Due>>,
    next_seq: u64,
    last_sweep: Instant,
    /// Set by `Command::InjectPanic`.
    panic_next_tick: bool,
    metrics: EngineMetrics,
}

impl SyntheticLoop {
    pub(crate) fn new(
        rx: Receiver<Command>,
        waiting_count: Arc<AtomicUsize>,
        stats: Arc<Mutex<EngineStats>>,
        tokens_per_second: f64,
        max_running: usize,
        metrics: EngineMetrics,
    ) -> Self {
        let interval = Duration::from_secs_f64(1.0 / tokens_per_second);
        SyntheticLoop {
            rx,
            waiting_count,
            stats,
            interval,
            slack: TICK.min(interval / 2),
            max_running,
            queued: Default::default(),
            running: BinaryHeap::new(),
            next_seq: 0,
            last_sweep: Instant::now(),
            panic_next_tick: false,
            metrics,
        }
    }

    fn take(&mut self, c: Command) {
        match c {
            Command::Submit(s) => self.queued.push_back(*s),
            Command::InjectPanic => self.panic_next_tick = true,
            Command::Abort(message) => self.fail_all(&message),
        }
    }

    /// When the loop next has something to do: a token due or a sweep (ticks at least
    /// `TICK` apart); `None` when nothing runs.
    fn next_wake(&self, last_tick: Instant) -> Option<Instant> {
        let due = self.running.peek()?.0.at.min(self.last_sweep + SWEEP);
        Some(due.max(last_tick + TICK))
    }
}

impl SupervisedLoop for SyntheticLoop {
    fn serve(&mut self) {
        let mut last_tick = Instant::now();
        loop {
            // Sleep until the next token is due or a request arrives.
            let wait = self
                .next_wake(last_tick)
                .map(|t| t.saturating_duration_since(Instant::now()));
            let got = match wait {
                None if self.queued.is_empty() => {
                    self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                }
                None => Err(RecvTimeoutError::Timeout),
                Some(d) => self.rx.recv_timeout(d),
            };
            match got {
                Ok(c) => self.take(c),
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone: finish what runs, at its pace.
                    if self.running.is_empty() && self.queued.is_empty() {
                        return;
                    }
                    std::thread::sleep(wait.unwrap_or_default());
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            while let Ok(c) = self.rx.try_recv() {
                self.take(c);
            }
            last_tick = Instant::now();
            self.tick(last_tick);
        }
    }

    fn fail_all(&mut self, message: &str) {
        let queued = self.queued.drain(..).map(|s| (s, 0, true));
        let running = std::mem::take(&mut self.running)
            .into_iter()
            .map(|Reverse(d)| (d.stream.sub, d.stream.generated, false));
        for (sub, generated, was_queued) in queued.chain(running).collect::<Vec<_>>() {
            if was_queued {
                self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            }
            let _ = sub.tx.try_send(Event::Done {
                reason: FinishReason::Error,
                usage: Usage {
                    prompt_tokens: sub.req.prompt.len(),
                    completion_tokens: generated,
                    cached_tokens: 0,
                },
                error: Some(message.to_string()),
            });
        }
    }

    fn reset(&mut self) {
        self.panic_next_tick = false;
    }
}

impl SyntheticLoop {
    /// Admits what fits, sends every token due by `now`, and drops cancelled requests.
    fn tick(&mut self, now: Instant) {
        if std::mem::take(&mut self.panic_next_tick) {
            panic!("injected fault: synthetic loop panic");
        }
        let before = self.queued.len();
        self.queued.retain(|s| !s.tx.is_closed());
        self.waiting_count
            .fetch_sub(before - self.queued.len(), Ordering::AcqRel);
        while self.running.len() < self.max_running {
            let Some(sub) = self.queued.pop_front() else {
                break;
            };
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            let seq = self.next_seq;
            self.next_seq += 1;
            self.running.push(Reverse(Due {
                at: now + self.interval,
                seq,
                stream: Box::new(Stream { sub, generated: 0 }),
            }));
        }
        if now >= self.last_sweep + SWEEP {
            self.last_sweep = now;
            self.running.retain(|d| !d.0.stream.sub.tx.is_closed());
        }
        while self.running.peek().is_some_and(|d| d.0.at <= now) {
            let Some(Reverse(mut d)) = self.running.pop() else {
                break;
            };
            if let Some(next) = self.send_token(&mut d.stream, d.at, now) {
                d.at = next;
                self.running.push(Reverse(d));
            }
        }
        if let Ok(mut st) = self.stats.lock() {
            st.running = self.running.len();
            st.queued = self.queued.len();
        }
        self.metrics.state(
            self.running.len(),
            self.queued.len(),
            0.0,
            &Default::default(),
        );
    }

    /// Sends `s`'s token that was due at `due`; returns when the next one is due, or
    /// `None` when the request is over (finished or cancelled).
    fn send_token(&self, s: &mut Stream, due: Instant, now: Instant) -> Option<Instant> {
        let i = s.generated % WORDS.len();
        s.generated += 1;
        // The channel holds every event a request can produce, so sending fails only
        // when the reader is gone: the request was cancelled.
        let sent = s.sub.tx.try_send(Event::Token {
            id: i as u32,
            text: WORDS[i].to_string(),
            logprobs: None,
        });
        if matches!(sent, Err(TrySendError::Closed(_))) {
            return None;
        }
        if s.generated >= s.sub.req.max_tokens {
            let _ = s.sub.tx.try_send(Event::Done {
                reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: s.sub.req.prompt.len(),
                    completion_tokens: s.generated,
                    cached_tokens: 0,
                },
                error: None,
            });
            return None;
        }
        // Slip rather than catch up (see the module doc): never sooner than an interval
        // after this token, less the slack that absorbs the tick granularity.
        Some((due + self.interval).max(now + self.interval - self.slack))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig};
    use crate::request::{Event, FinishReason, GenerationRequest};

    /// Tokens received so far on `rx`.
    fn tokens(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter(|e| matches!(e, Event::Token { .. }))
            .count()
    }

    #[test]
    fn a_late_loop_slips_its_timeline_instead_of_sending_a_burst() {
        let (_commands, rx) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(1));
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        // 100 tokens/s: one every 10 ms, 1 ms of slack (the tick).
        let mut l = SyntheticLoop::new(
            rx,
            waiting.clone(),
            stats.clone(),
            100.0,
            16,
            crate::metrics::EngineMetrics::new("synthetic"),
        );
        let (tx, mut events) = tokio::sync::mpsc::channel(64);
        l.take(Command::Submit(Box::new(Submission {
            req: GenerationRequest {
                prompt: vec![1],
                max_tokens: 50,
                ..Default::default()
            },
            tx,
        })));
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        l.tick(t0);
        assert_eq!(waiting.load(Ordering::Acquire), 0, "admitted");
        assert_eq!(stats.lock().unwrap().running, 1);
        // Due one interval after admission, then every interval.
        let mut sent = Vec::new();
        for us in [9_000, 10_000, 19_999, 20_600, 29_000, 30_000] {
            l.tick(at(us));
            sent.push((us, tokens(&mut events)));
        }
        // Late by 0.6 ms (within the slack): the timeline holds, the next is due at 30.
        assert_eq!(
            sent,
            [
                (9_000, 0),
                (10_000, 1),
                (19_999, 0),
                (20_600, 1),
                (29_000, 0),
                (30_000, 1)
            ]
        );
        // A stall: token 4 was due at 40 ms, the loop runs again at 95 ms. One token
        // goes out, not the six a fixed timeline would owe.
        l.tick(at(95_000));
        assert_eq!(tokens(&mut events), 1);
        // The next is due an interval (less the slack) later: at 104 ms, not at once.
        for us in [95_001, 96_000, 100_000, 103_999] {
            l.tick(at(us));
            assert_eq!(tokens(&mut events), 0, "at {us} us");
        }
        l.tick(at(104_000));
        assert_eq!(tokens(&mut events), 1);
        // A client that hangs up frees its place by the next sweep, token due or not.
        drop(events);
        l.tick(at(104_000) + SWEEP);
        assert_eq!(stats.lock().unwrap().running, 0);
    }

    #[test]
    fn tokens_come_at_the_set_pace_and_stop_at_max_tokens() {
        let e = Engine::start_synthetic(4096, 100, 200.0, EngineConfig::default()).unwrap();
        let started = std::time::Instant::now();
        let mut s = e
            .submit(GenerationRequest {
                prompt: vec![1, 2, 3],
                max_tokens: 20,
                ..Default::default()
            })
            .unwrap();
        let mut n = 0;
        loop {
            match s.blocking_recv().unwrap() {
                Event::Token { .. } => n += 1,
                Event::Done { reason, usage, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 20));
                    break;
                }
            }
        }
        assert_eq!(n, 20);
        // 20 tokens at 200/s take at least 100 ms: the pace is a lower bound on every
        // gap (how much longer depends on the machine, so no upper bound here).
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(100), "{took:?}");
        e.shutdown();
    }

    #[test]
    fn a_panic_fails_requests_in_flight_and_the_loop_restarts() {
        let e = Engine::start_synthetic(4096, 100, 100.0, EngineConfig::default()).unwrap();
        let req = || GenerationRequest {
            prompt: vec![1, 2, 3],
            max_tokens: 1000,
            ..Default::default()
        };
        let mut s = e.submit(req()).unwrap();
        assert!(matches!(s.blocking_recv(), Some(Event::Token { .. })));
        e.inject_panic().unwrap();
        let done = loop {
            match s.blocking_recv().unwrap() {
                Event::Token { .. } => continue,
                d => break d,
            }
        };
        let Event::Done { reason, error, .. } = done else {
            unreachable!()
        };
        assert_eq!(reason, FinishReason::Error);
        assert_eq!(error.as_deref(), Some(crate::supervisor::RESTART_MESSAGE));
        // Refused while restarting, then served again.
        assert!(matches!(
            e.submit(req()),
            Err(crate::EngineError::Restarting)
        ));
        assert!(!e.is_ready());
        let t = std::time::Instant::now();
        while !e.is_ready() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(e.restarts(), 1);
        assert_eq!(e.waiting(), 0);
        let mut s = e
            .submit(GenerationRequest {
                max_tokens: 3,
                ..req()
            })
            .unwrap();
        let mut n = 0;
        while let Some(Event::Token { .. }) = s.blocking_recv() {
            n += 1;
        }
        assert_eq!(n, 3);
        e.shutdown();
    }
}
