//! Keeps an engine loop alive across panics.
//!
//! A panic in the model loop (a kernel bug, a broken invariant) must not take the
//! server down or leave clients waiting forever. The supervisor catches it, fails the
//! requests in flight with an error event, marks the engine not ready (the gateway's
//! `/ready` turns 503 and `submit` refuses with `EngineError::Restarting`), resets the
//! loop's state and starts it again after a back-off. The weights are read-only during a
//! step, so they survive; the scheduler, the KV block tables and the prefix cache are
//! rebuilt from scratch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// First back-off after a panic; it doubles for panics in quick succession so that a
/// loop that panics on every step does not spin.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A loop that ran this long without panicking starts again from the first back-off.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// What clients of a failed request are told; the panic itself is logged, not sent.
pub(crate) const RESTART_MESSAGE: &str =
    "the engine failed while running this request and was restarted; retry it";

/// Whether the engine takes requests, shared between its loop and its handles.
#[derive(Debug)]
pub struct EngineHealth {
    ready: AtomicBool,
    restarts: AtomicU64,
}

impl Default for EngineHealth {
    fn default() -> Self {
        EngineHealth {
            ready: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
        }
    }
}

impl EngineHealth {
    /// False between a panic and the restart of the loop.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// How many times the loop has been restarted after a panic.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Acquire)
    }
}

/// An engine loop the supervisor can run, fail and reset.
pub(crate) trait SupervisedLoop {
    /// Serves until every handle is gone (returns) or something panics (unwinds).
    fn serve(&mut self);
    /// Ends every accepted request with an error event and releases what it held.
    fn fail_all(&mut self, message: &str);
    /// Brings the loop back to an empty, consistent state.
    fn reset(&mut self);
}

/// Runs `body` until it returns normally, restarting it after each panic; `name` (the
/// served model's) appears in the logs.
pub(crate) fn supervise(
    body: &mut impl SupervisedLoop,
    health: &EngineHealth,
    name: &str,
    metrics: &crate::metrics::EngineMetrics,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut last_start = Instant::now();
    loop {
        match catch_unwind(AssertUnwindSafe(|| body.serve())) {
            Ok(()) => return,
            Err(payload) => {
                health.ready.store(false, Ordering::Release);
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic".into());
                if last_start.elapsed() >= STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                tracing::error!(engine = name, panic = %what, backoff_ms = backoff.as_millis() as u64, "engine loop panicked; failing its requests and restarting");
                // Failing and resetting touch only plain collections; should they panic
                // too the state is beyond repair and the thread ends (submit then says
                // the engine has stopped).
                let recovered = catch_unwind(AssertUnwindSafe(|| {
                    body.fail_all(RESTART_MESSAGE);
                    body.reset();
                }));
                if recovered.is_err() {
                    tracing::error!(
                        engine = name,
                        "engine loop could not be reset after a panic; it stays down"
                    );
                    return;
                }
                metrics.restart();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                health.restarts.fetch_add(1, Ordering::AcqRel);
                health.ready.store(true, Ordering::Release);
                last_start = Instant::now();
                tracing::info!(engine = name, "engine loop restarted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panics on its first `panics` runs, then returns.
    struct Flaky {
        panics: usize,
        failed: Vec<String>,
        resets: usize,
    }

    impl SupervisedLoop for Flaky {
        fn serve(&mut self) {
            if self.panics > 0 {
                self.panics -= 1;
                panic!("boom");
            }
        }
        fn fail_all(&mut self, message: &str) {
            self.failed.push(message.to_string());
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    #[test]
    fn a_panicking_loop_is_failed_reset_and_restarted() {
        let health = EngineHealth::default();
        let mut l = Flaky {
            panics: 2,
            failed: Vec::new(),
            resets: 0,
        };
        let t = Instant::now();
        supervise(
            &mut l,
            &health,
            "test",
            &crate::metrics::EngineMetrics::new("test"),
        );
        assert_eq!(l.failed, vec![RESTART_MESSAGE; 2]);
        assert_eq!(l.resets, 2);
        assert_eq!(health.restarts(), 2);
        assert!(health.is_ready());
        // Back-off doubled: 250 ms + 500 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(740),
            "{:?}",
            t.elapsed()
        );
    }
}
