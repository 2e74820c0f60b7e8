//! A small fork-join pool for the forward pass.
//!
//! A decode step dispatches ~120 parallel matrix multiplies of a few microseconds
//! each, so waking threads through the OS every time would cost a large share of the
//! step. Workers spin briefly after each job and only then sleep on a condvar, so
//! back-to-back dispatches cost well under a microsecond while an idle engine uses no CPU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The job of the current generation, as a raw pointer whose lifetime `run` guarantees.
    job: Mutex<Option<JobPtr>>,
    generation: AtomicUsize,
    finished: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is Sync and outlives every use (`run` waits for all workers).
unsafe impl Send for JobPtr {}

/// Fork-join pool: `run(f)` calls `f(i)` for every thread index `i` in `0..threads()`.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// How long a worker spins for the next job before sleeping.
const SPIN: Duration = Duration::from_micros(300);

impl ThreadPool {
    /// A pool of `threads` (the calling thread is one of them).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        // Built up in place so that, if a spawn fails, Drop stops the ones already running.
        let mut pool = ThreadPool {
            shared,
            workers: Vec::new(),
        };
        for idx in 1..threads.max(1) {
            let s = pool.shared.clone();
            pool.workers.push(
                std::thread::Builder::new()
                    .name(format!("sluice-compute-{idx}"))
                    .spawn(move || worker(s, idx))?,
            );
        }
        Ok(pool)
    }

    /// Number of threads, including the caller.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` on every thread and returns when all are done. Panics in workers
    /// are re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let s = &self.shared;
        // SAFETY: erase the lifetime; we do not return before every worker finished
        // with the pointer (the `finished` wait below), even if `f` panics here.
        let ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        s.finished.store(0, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        while s.finished.load(Ordering::Acquire) < self.workers.len() {
            std::hint::spin_loop();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a compute thread panicked");
        }
    }

    /// Splits `0..n` into chunks of at least `min_chunk`, handed out dynamically so a
    /// thread slowed by a noisy neighbour does not hold up the others.
    pub fn for_chunks(
        &self,
        n: usize,
        min_chunk: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let threads = self.threads();
        let chunk = (n / (threads * 4)).max(min_chunk).max(1);
        if threads == 1 || n <= chunk {
            f(0..n);
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= n {
                break;
            }
            f(start..(start + chunk).min(n));
        });
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0usize;
    loop {
        let spin_start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins.is_multiple_of(64) && spin_start.elapsed() > SPIN {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while s.generation.load(Ordering::Acquire) == seen
                    && !s.stop.load(Ordering::Acquire)
                {
                    sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(p)) = job {
            // SAFETY: `run` keeps the job alive until `finished` counts this worker.
            let f = unsafe { &*p };
            if catch_unwind(AssertUnwindSafe(|| f(idx))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.finished.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_call() {
        let pool = ThreadPool::new(3).unwrap();
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            pool.run(&|i| {
                hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 1 | 1 << 8 | 1 << 16);
        }
    }

    #[test]
    fn chunks_cover_the_range_exactly_once() {
        let pool = ThreadPool::new(2).unwrap();
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        pool.for_chunks(1000, 7, &|r| {
            for i in r {
                seen[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn worker_panic_is_reraised_and_pool_survives() {
        let pool = ThreadPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(&|i| assert!(i != 1, "boom"))));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
