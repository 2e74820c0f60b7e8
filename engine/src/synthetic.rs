//! The synthetic engine loop: tokens at a fixed pace per request, no model. It honours
//! the same queue bound, `max_tokens`, cancellation and event protocol as the real loop,
//! so clients and the gateway can be tested and measured without inference costs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Shortest gap between two ticks of the loop.
const TICK: Duration = Duration::from_millis(1);

struct Stream {
    sub: Submission,
    generated: usize,
    next_at: Instant,
}

pub(crate) struct SyntheticLoop {
    rx: Receiver<Command>,
    waiting_count: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    interval: Duration,
    max_running: usize,
    queued: std::collections::VecDeque<Submission>,
    running: Vec<Stream>,
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
        SyntheticLoop {
            rx,
            waiting_count,
            stats,
            interval: Duration::from_secs_f64(1.0 / tokens_per_second),
            max_running,
            queued: Default::default(),
            running: Vec::new(),
            panic_next_tick: false,
            metrics,
        }
    }

    fn take(&mut self, c: Command) {
        match c {
            Command::Submit(s) => self.queued.push_back(s),
            Command::InjectPanic => self.panic_next_tick = true,
        }
    }
}

impl SupervisedLoop for SyntheticLoop {
    fn serve(&mut self) {
        let mut last_tick = Instant::now();
        loop {
            // Sleep until the next token is due or a request arrives. Ticks are at least
            // TICK apart: each one scans every stream, and with thousands of streams at
            // staggered times waking for each would cost a scan per token.
            let wait = self.running.iter().map(|s| s.next_at).min().map(|t| {
                t.max(last_tick + TICK)
                    .saturating_duration_since(Instant::now())
            });
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
            self.tick();
        }
    }

    fn fail_all(&mut self, message: &str) {
        let queued = self.queued.drain(..).map(|s| (s, 0, true));
        let running = self.running.drain(..).map(|s| (s.sub, s.generated, false));
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
    fn tick(&mut self) {
        if std::mem::take(&mut self.panic_next_tick) {
            panic!("injected fault: synthetic loop panic");
        }
        let before = self.queued.len();
        self.queued.retain(|s| !s.tx.is_closed());
        self.waiting_count
            .fetch_sub(before - self.queued.len(), Ordering::AcqRel);
        let now = Instant::now();
        while self.running.len() < self.max_running {
            let Some(sub) = self.queued.pop_front() else {
                break;
            };
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            self.running.push(Stream {
                sub,
                generated: 0,
                next_at: now + self.interval,
            });
        }
        let interval = self.interval;
        self.running.retain_mut(|s| {
            if s.sub.tx.is_closed() {
                return false;
            }
            if s.next_at > now {
                return true;
            }
            let id = (s.generated % WORDS.len()) as u32;
            let text = WORDS[s.generated % WORDS.len()].to_string();
            s.generated += 1;
            // The channel holds every event a request can produce: this never fails
            // for a live reader.
            let _ = s.sub.tx.try_send(Event::Token {
                id,
                text,
                logprobs: None,
            });
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
                return false;
            }
            // Keep the pace even when a tick runs late.
            s.next_at = (s.next_at + interval).max(now);
            true
        });
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
}

#[cfg(test)]
mod tests {
    use crate::engine::{Engine, EngineConfig};
    use crate::request::{Event, FinishReason, GenerationRequest};

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
        // 20 tokens at 200/s take ~100 ms.
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(95), "{took:?}");
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
