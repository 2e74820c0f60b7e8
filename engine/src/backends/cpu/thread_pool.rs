//! A small fork-join pool for the forward pass, shared by every model's engine loop.
//!
//! A decode step dispatches ~120 parallel matrix multiplies of a few microseconds
//! each, so waking threads through the OS every time would cost a large share of the
//! step. Workers spin briefly after each job and only then sleep on a condvar, so
//! back-to-back dispatches cost well under a microsecond while an idle engine uses no CPU
//! (`idle_workers_sleep_and_use_no_cpu` checks the kernel's CPU accounting).
//!
//! The process has one pool: `--threads` is its whole compute budget, however many models
//! it serves. Engine loops share it through a lease: `lease` gives the calling thread the
//! pool until the lease is dropped (a forward pass takes it once for all its dispatches,
//! so two models never interleave their matrix multiplies and thrash the cache). Leases
//! are granted first come first served, so two busy engines alternate step by step
//! instead of one starving the other; a thread waiting for the lease sleeps. `run` from a
//! thread without the lease takes one for that call, and `run` from inside a job (which
//! would otherwise wait for itself) runs every index on the calling thread.

use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// Who holds the pool: a FIFO ticket lock, re-entrant for its holder.
struct LeaseState {
    queue: Mutex<Tickets>,
    turn: Condvar,
    /// `thread_token()` of the holder; 0 when free. Only the holder writes its own
    /// token here and clears it, so a thread that reads its own token holds the lease.
    holder: AtomicU64,
    /// Nested leases of the holder (touched by the holder only).
    depth: AtomicUsize,
}

struct Tickets {
    next: u64,
    serving: u64,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is Sync and outlives every use (`run` waits for all workers).
unsafe impl Send for JobPtr {}

thread_local! {
    /// Set while this thread runs a pool job: a nested `run` must not wait for the pool.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
    static TOKEN: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// A non-zero id unique to the calling thread.
fn thread_token() -> u64 {
    TOKEN.with(|t| *t)
}

/// Fork-join pool: `run(f)` calls `f(i)` for every thread index `i` in `0..threads()`.
pub struct ThreadPool {
    shared: Arc<Shared>,
    lease: LeaseState,
    workers: Vec<JoinHandle<()>>,
}

/// Exclusive use of a `ThreadPool` by the thread that holds it, until dropped.
pub struct PoolLease<'a> {
    pool: &'a ThreadPool,
    /// Released on the thread that took it (the holder is identified by thread).
    _not_send: PhantomData<*const ()>,
}

impl Drop for PoolLease<'_> {
    fn drop(&mut self) {
        let l = &self.pool.lease;
        if l.depth.fetch_sub(1, Ordering::Relaxed) > 1 {
            return;
        }
        l.holder.store(0, Ordering::Release);
        let mut q = l.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.serving += 1;
        // Waking costs a system call: only when a thread waits for its turn.
        let waiting = q.next > q.serving;
        drop(q);
        if waiting {
            l.turn.notify_all();
        }
    }
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
            lease: LeaseState {
                queue: Mutex::new(Tickets {
                    next: 0,
                    serving: 0,
                }),
                turn: Condvar::new(),
                holder: AtomicU64::new(0),
                depth: AtomicUsize::new(0),
            },
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

    /// Takes the pool for the calling thread until the lease is dropped, waiting (asleep)
    /// behind the threads that asked first. A thread that already holds it gets a nested
    /// lease at once.
    pub fn lease(&self) -> PoolLease<'_> {
        let l = &self.lease;
        let me = thread_token();
        if l.holder.load(Ordering::Acquire) != me {
            let mut q = l.queue.lock().unwrap_or_else(|e| e.into_inner());
            let ticket = q.next;
            q.next += 1;
            while q.serving != ticket {
                q = l.turn.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            drop(q);
            l.holder.store(me, Ordering::Release);
        }
        l.depth.fetch_add(1, Ordering::Relaxed);
        PoolLease {
            pool: self,
            _not_send: PhantomData,
        }
    }

    /// Runs `f(i)` on every thread and returns when all are done. Panics in workers
    /// are re-raised here. Called from inside a job, it runs every `i` on this thread.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if IN_JOB.with(|j| j.get()) {
            (0..self.threads()).for_each(f);
            return;
        }
        let _lease = self.lease();
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
        let mine = run_job(f, 0);
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
    /// thread slowed by a noisy neighbour does not hold up the others. Each chunk is a
    /// share of what is left (guided scheduling): the last ones are small, so no thread
    /// waits long for another's last chunk (fixed quarters left a thread idle for ~7%
    /// of a 16-stream decode step).
    pub fn for_chunks(
        &self,
        n: usize,
        min_chunk: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let threads = self.threads();
        let min_chunk = min_chunk.max(1);
        if threads == 1 || n <= min_chunk {
            f(0..n);
            return;
        }
        // Guided: each grab takes a share of what is left, so chunks shrink towards the
        // end and the threads finish within a small chunk of each other.
        let next = AtomicUsize::new(0);
        self.run(&|_| {
            let mut start = next.load(Ordering::Relaxed);
            loop {
                if start >= n {
                    break;
                }
                let len = ((n - start) / (2 * threads)).max(min_chunk);
                let end = (start + len).min(n);
                match next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        f(start..end);
                        start = next.load(Ordering::Relaxed);
                    }
                    Err(now) => start = now,
                }
            }
        });
    }

    /// Calls `f` once on every item, the items spread over the pool's threads.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: &(dyn Fn(&mut T) + Sync)) {
        struct Items<T>(*mut T);
        // SAFETY: shared only to hand each thread distinct items (below).
        unsafe impl<T: Send> Sync for Items<T> {}
        let base = Items(items.as_mut_ptr());
        let base = &base;
        self.for_chunks(items.len(), 1, &|range| {
            for i in range {
                // SAFETY: `for_chunks` hands out every index in `0..len` exactly once,
                // so no two threads reach the same item, and `items` outlives the call.
                f(unsafe { &mut *base.0.add(i) });
            }
        });
    }
}

/// Runs one thread's share of a job, marked as inside a job.
fn run_job(f: &(dyn Fn(usize) + Sync), idx: usize) -> std::thread::Result<()> {
    IN_JOB.with(|j| j.set(true));
    let r = catch_unwind(AssertUnwindSafe(|| f(idx)));
    IN_JOB.with(|j| j.set(false));
    r
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
            if run_job(f, idx).is_err() {
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
    use std::io::Write;

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
        let mut items: Vec<u64> = (0..37).collect();
        pool.for_each_mut(&mut items, &|x| *x = *x * 10 + 1);
        assert_eq!(items, (0..37).map(|x| x * 10 + 1).collect::<Vec<u64>>());
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
        // The panic released the lease: another thread can take the pool.
        std::thread::scope(|s| {
            s.spawn(|| pool.run(&|_| {}));
        });
    }

    #[test]
    fn threads_sharing_a_pool_each_get_every_index_of_their_own_jobs() {
        // Two engine loops dispatching at once: without the lease their jobs would
        // overwrite each other's (and `finished` would count the other's workers).
        let pool = ThreadPool::new(3).unwrap();
        std::thread::scope(|s| {
            for caller in 0..2u64 {
                let pool = &pool;
                s.spawn(move || {
                    for _ in 0..500 {
                        let hits = AtomicU64::new(0);
                        pool.run(&|i| {
                            hits.fetch_add((caller + 1) << (8 * i), Ordering::Relaxed);
                        });
                        let one = caller + 1;
                        assert_eq!(hits.load(Ordering::Relaxed), one | one << 8 | one << 16);
                    }
                });
            }
        });
    }

    #[test]
    fn a_nested_run_or_lease_does_not_wait_for_itself() {
        let pool = ThreadPool::new(2).unwrap();
        let hits = AtomicUsize::new(0);
        let _outer = pool.lease();
        let _inner = pool.lease();
        pool.run(&|_| {
            pool.run(&|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn leases_are_granted_in_the_order_asked() {
        let pool = ThreadPool::new(2).unwrap();
        let order = Mutex::new(Vec::new());
        let waiting = |p: &ThreadPool| {
            let q = p.lease.queue.lock().unwrap();
            (q.next - q.serving) as usize
        };
        std::thread::scope(|s| {
            let first = pool.lease();
            s.spawn(|| {
                let _l = pool.lease();
                order.lock().unwrap().push("other");
            });
            // The other thread is queued behind the held lease.
            while waiting(&pool) < 2 {
                std::thread::yield_now();
            }
            drop(first);
            // Asking again right away does not jump ahead of it.
            let _again = pool.lease();
            order.lock().unwrap().push("again");
        });
        assert_eq!(*order.lock().unwrap(), vec!["other", "again"]);
    }

    /// User plus system CPU ticks of thread `tid` of this process.
    fn cpu_ticks(tid: &str) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }

    #[test]
    fn idle_workers_sleep_and_use_no_cpu() {
        let pool = ThreadPool::new(3).unwrap();
        let tids: Vec<Mutex<Option<String>>> = (0..3).map(|_| Mutex::new(None)).collect();
        pool.run(&|i| {
            // "/proc/thread-self" links to "<pid>/task/<tid>".
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            *tids[i].lock().unwrap() = tid;
        });
        // Well past the spin window every worker is asleep on the condvar.
        let t = Instant::now();
        while *pool.shared.sleepers.lock().unwrap() < 2 {
            assert!(t.elapsed() < Duration::from_secs(10), "workers never slept");
            std::thread::sleep(Duration::from_millis(10));
        }
        let workers: Vec<String> = tids[1..]
            .iter()
            .filter_map(|t| t.lock().unwrap().clone())
            .collect();
        let before: Option<Vec<u64>> = workers.iter().map(|t| cpu_ticks(t)).collect();
        let Some(before) = before.filter(|_| workers.len() == 2) else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED idle_workers_sleep_and_use_no_cpu (CPU time part): no /proc thread accounting here"
            );
            return;
        };
        std::thread::sleep(Duration::from_secs(1));
        let after: Vec<u64> = workers.iter().filter_map(|t| cpu_ticks(t)).collect();
        // A spinning worker would accrue tens of ticks (of 10 ms) in that second, even
        // on a crowded machine; a sleeping one none.
        for (b, a) in before.iter().zip(&after) {
            assert!(a - b <= 2, "an idle worker used {} ticks of CPU", a - b);
        }
        assert_eq!(after.len(), 2);
    }
}
