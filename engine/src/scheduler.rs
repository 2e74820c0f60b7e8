//! The scheduler: which tokens of which requests go into the next forward step.
//!
//! vLLM v1's idea: every step, each request gets the tokens it needs next (one for a
//! decoding request, a chunk of its prompt for one still prefilling) within a token
//! budget. Requests join between steps and leave when finished, so the batch is always
//! full of live work. This is a synchronous state machine with no tensors in it:
//! `schedule` plans a step, the engine runs it, `update` advances the requests.
//!
//! KV blocks are taken as tokens are scheduled, not reserved up front. When they run out
//! the newest running request is preempted: its blocks are released (the full ones stay
//! in the prefix cache) and it goes back to the front of the queue, to be recomputed
//! from its prompt and the tokens it had produced, and then continue.
//!
//! A block enters the prefix cache when it is *scheduled* to be filled, not after the
//! step: a runtime with paged K/V writes every token's K/V of a layer before any
//! attention of that layer (the contract in `backends`), so a sequence later in the same
//! step may attend to blocks an earlier one computes in it. Identical prompts admitted
//! together (the `n` choices of one request, or simultaneous requests) therefore compute
//! their shared blocks once. A runtime that keeps K/V itself shares nothing: its
//! scheduler runs with `prefix_caching` off.
//!
//! A waiting request never finds the next block of its prompt still to be computed by a
//! running request: waiting requests are admitted only with budget left after every
//! running request got its chunk, and a chunk that stops short of the end of its
//! sequence's known tokens spends the whole budget. So by the time a request is
//! admitted, every full block that running requests know the tokens of is either
//! computed or scheduled in this step, hence in the cache (until evicted), and there is
//! nothing to wait for. (Were chunks ever capped per request, a prompt sharing a
//! prefix with one still prefilling would have to wait for it instead.)

use std::collections::VecDeque;

use crate::block_allocator::BLOCK_SIZE;
use crate::block_allocator::{BlockHasher, BlockId, KvBlockAllocator};

/// Identifies a request inside the engine.
pub type SeqId = u64;

/// Limits the scheduler enforces.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Requests in the running batch at once.
    pub max_running_requests: usize,
    /// Tokens one step may process (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Share the blocks of a common prefix between sequences. Off for a runtime that
    /// keeps K/V itself (`KvStorage::Internal`): its sequences never share a block.
    pub prefix_caching: bool,
}

/// A request as the scheduler sees it: tokens and where their K/V live.
pub struct Sequence {
    pub id: SeqId,
    /// Prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub computed: usize,
    /// Block table: block `i` holds positions `i * BLOCK_SIZE..`.
    pub blocks: Vec<BlockId>,
    /// Prompt tokens found in the prefix cache at first admission.
    pub cached_prompt_tokens: usize,
    hashes: Vec<u64>,
    /// Leading blocks already registered in the prefix cache.
    registered: usize,
    admitted_before: bool,
}

impl Sequence {
    /// Whether the request has ever been in the running batch (it no longer counts
    /// against the waiting-queue bound).
    pub fn was_admitted(&self) -> bool {
        self.admitted_before
    }
}

/// Part of one sequence in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    /// First position computed.
    pub start: usize,
    pub len: usize,
    /// The chunk ends the known tokens, so the step samples the next one.
    pub sample: bool,
}

/// What one step runs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Requests that entered the running batch for the first time.
    pub admitted: Vec<SeqId>,
    /// Requests sent back to the queue to free blocks.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    /// Nothing to run.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Running totals for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SchedulerStats {
    pub prompt_tokens_queried: u64,
    pub prompt_tokens_cached: u64,
    pub preemptions: u64,
    /// Tokens in all steps planned so far.
    pub tokens_scheduled: u64,
}

/// Plans steps over a fixed pool of KV blocks.
pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: KvBlockAllocator,
    hasher: BlockHasher,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last one is the newest.
    running: Vec<Sequence>,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler over `n_blocks` KV blocks.
    pub fn new(cfg: SchedulerConfig, n_blocks: usize) -> Self {
        Scheduler {
            cfg,
            alloc: KvBlockAllocator::new(n_blocks),
            hasher: BlockHasher::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    /// Queues a request at the back (FCFS).
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) {
        assert!(!prompt.is_empty());
        let prompt_len = prompt.len();
        self.waiting.push_back(Sequence {
            id,
            tokens: prompt,
            prompt_len,
            computed: 0,
            blocks: Vec::new(),
            cached_prompt_tokens: 0,
            hashes: Vec::new(),
            registered: 0,
            admitted_before: false,
        });
    }

    /// Removes a request wherever it is and releases its blocks. Returns whether it was
    /// known, and whether it had been admitted.
    pub fn remove(&mut self, id: SeqId) -> Option<bool> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        let admitted = seq.admitted_before;
        self.release(seq);
        Some(admitted)
    }

    /// A tracked request.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .find(|s| s.id == id)
            .or_else(|| self.waiting.iter().find(|s| s.id == id))
    }

    /// Requests in the running batch.
    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Requests queued (new ones and preempted ones).
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Share of the KV blocks held by requests (cached free blocks do not count).
    pub fn kv_usage(&self) -> f64 {
        self.alloc.n_in_use() as f64 / self.alloc.n_blocks().max(1) as f64
    }

    /// (blocks held by requests, all blocks).
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.alloc.n_in_use(), self.alloc.n_blocks())
    }

    /// KV blocks ever handed out (see `KvBlockAllocator::n_touched`).
    pub fn kv_blocks_touched(&self) -> usize {
        self.alloc.n_touched()
    }

    /// Running totals.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens.max(1);

        // Running requests first, oldest first, so the ones closest to done keep pace.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = (seq.tokens.len() - seq.computed).min(budget);
            let need = (seq.computed + n)
                .div_ceil(BLOCK_SIZE)
                .saturating_sub(seq.blocks.len());
            let mut preempted_self = false;
            while self.alloc.n_free() < need {
                // `i` is in `running`, so there is always a victim (at worst `i` itself).
                let Some(victim) = self.running.pop() else {
                    break;
                };
                plan.preempted.push(victim.id);
                let is_self = self.running.len() == i;
                self.preempt(victim);
                if is_self {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            let Some(blocks) = self.alloc.allocate_n(need) else {
                break;
            };
            let seq = &mut self.running[i];
            seq.blocks.extend(blocks);
            plan.chunks.push(ScheduledChunk {
                seq: seq.id,
                start: seq.computed,
                len: n,
                sample: seq.computed + n == seq.tokens.len(),
            });
            if self.cfg.prefix_caching {
                Self::register_scheduled(&self.hasher, &mut self.alloc, seq, seq.computed + n);
            }
            budget -= n;
            i += 1;
        }
        // Admission with budget left means every running request was scheduled to the
        // end of its known tokens (see the module doc): nothing it will compute later
        // could be shared with an admitted prompt.
        debug_assert!(
            budget == 0
                || self.running.iter().all(|s| plan
                    .chunks
                    .iter()
                    .any(|c| c.seq == s.id && c.start + c.len == s.tokens.len())),
            "budget left while a running request is not fully scheduled"
        );

        // Then queued requests, first come first served, unless this step had to preempt
        // (admitting more would only preempt again).
        while plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.cfg.max_running_requests
        {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let hits = if self.cfg.prefix_caching {
                self.hasher.extend(&mut seq.hashes, &seq.tokens);
                // At least the last token is computed, to get logits for the next one.
                let max_hit = (seq.tokens.len() - 1) / BLOCK_SIZE;
                self.alloc.take_cached_prefix(&seq.hashes, max_hit)
            } else {
                Vec::new()
            };
            let computed = hits.len() * BLOCK_SIZE;
            let n = (seq.tokens.len() - computed).min(budget);
            let need = (computed + n).div_ceil(BLOCK_SIZE) - hits.len();
            let Some(fresh) = self.alloc.allocate_n(need) else {
                for b in hits {
                    self.alloc.free(b);
                }
                break; // the head of the queue waits for blocks; FCFS keeps its place
            };
            let Some(mut seq) = self.waiting.pop_front() else {
                break; // unreachable: `front_mut` found it above
            };
            seq.registered = hits.len();
            seq.blocks = hits;
            seq.blocks.extend(fresh);
            seq.computed = computed;
            if !seq.admitted_before {
                seq.admitted_before = true;
                seq.cached_prompt_tokens = computed;
                self.stats.prompt_tokens_queried += seq.prompt_len as u64;
                self.stats.prompt_tokens_cached += computed as u64;
                plan.admitted.push(seq.id);
            }
            plan.chunks.push(ScheduledChunk {
                seq: seq.id,
                start: computed,
                len: n,
                sample: computed + n == seq.tokens.len(),
            });
            // Before the next waiting request looks up the cache, so that an identical
            // prompt behind this one shares the blocks this step fills.
            if self.cfg.prefix_caching {
                Self::register_scheduled(&self.hasher, &mut self.alloc, &mut seq, computed + n);
            }
            budget -= n;
            self.running.push(seq);
        }
        self.stats.tokens_scheduled += plan.chunks.iter().map(|c| c.len as u64).sum::<u64>();
        plan
    }

    /// Registers in the prefix cache every full block of `seq` below `end`, the end of
    /// what this step computes for it.
    fn register_scheduled(
        hasher: &BlockHasher,
        alloc: &mut KvBlockAllocator,
        seq: &mut Sequence,
        end: usize,
    ) {
        let full = end / BLOCK_SIZE;
        if full <= seq.registered {
            return;
        }
        hasher.extend(&mut seq.hashes, &seq.tokens);
        for b in seq.registered..full {
            alloc.register(seq.blocks[b], seq.hashes[b]);
        }
        seq.registered = full;
    }

    /// Applies a finished step: the planned tokens are now computed, and `sampled` holds
    /// the token drawn for each chunk that sampled. (Their blocks were registered in the
    /// prefix cache when the step was planned.)
    pub fn update(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) {
        for chunk in &plan.chunks {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == chunk.seq) else {
                continue;
            };
            debug_assert_eq!(seq.computed, chunk.start);
            seq.computed = chunk.start + chunk.len;
            if chunk.sample {
                if let Some(&(_, t)) = sampled.iter().find(|(id, _)| *id == chunk.seq) {
                    seq.tokens.push(t);
                }
            }
        }
    }

    fn preempt(&mut self, mut seq: Sequence) {
        self.stats.preemptions += 1;
        for b in seq.blocks.drain(..) {
            self.alloc.free(b);
        }
        seq.computed = 0;
        seq.registered = 0;
        self.waiting.push_front(seq);
    }

    fn release(&mut self, seq: Sequence) {
        for &b in &seq.blocks {
            self.alloc.free(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_running: usize, budget: usize, blocks: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_running_requests: max_running,
                max_num_batched_tokens: budget,
                prefix_caching: true,
            },
            blocks,
        )
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    /// Runs a step with every sampling chunk drawing `token`.
    fn step(s: &mut Scheduler, token: u32) -> StepPlan {
        let plan = s.schedule();
        let sampled: Vec<_> = plan
            .chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| (c.seq, token))
            .collect();
        s.update(&plan, &sampled);
        plan
    }

    fn chunk(seq: SeqId, start: usize, len: usize, sample: bool) -> ScheduledChunk {
        ScheduledChunk {
            seq,
            start,
            len,
            sample,
        }
    }

    #[test]
    fn long_prompts_are_chunked_and_decodes_go_first() {
        let mut s = sched(4, 32, 64);
        s.add(1, prompt(1, 20));
        let p = step(&mut s, 7);
        assert_eq!(p.chunks, vec![chunk(1, 0, 20, true)]);
        assert_eq!(p.admitted, vec![1]);
        s.add(2, prompt(2, 50));
        // Request 1 decodes one token; request 2 gets the rest of the budget.
        let p = step(&mut s, 7);
        assert_eq!(
            p.chunks,
            vec![chunk(1, 20, 1, true), chunk(2, 0, 31, false)]
        );
        let p = step(&mut s, 7);
        assert_eq!(
            p.chunks,
            vec![chunk(1, 21, 1, true), chunk(2, 31, 19, true)]
        );
        assert_eq!(s.get(2).unwrap().tokens.len(), 51);
        assert_eq!(s.get(1).unwrap().blocks.len(), 2); // 22 tokens
    }

    #[test]
    fn requests_join_between_steps_up_to_the_running_limit() {
        let mut s = sched(2, 512, 64);
        for id in 1..=3 {
            s.add(id, prompt(id as u32, 5));
        }
        let p = step(&mut s, 9);
        assert_eq!(p.admitted, vec![1, 2]);
        assert_eq!(s.n_waiting(), 1);
        s.remove(1);
        let p = step(&mut s, 9);
        assert_eq!(p.admitted, vec![3]);
        assert_eq!(p.chunks, vec![chunk(2, 5, 1, true), chunk(3, 0, 5, true)]);
    }

    #[test]
    fn removing_a_request_frees_its_blocks() {
        let mut s = sched(4, 512, 8);
        s.add(1, prompt(1, 40));
        step(&mut s, 1);
        assert_eq!(s.kv_usage(), 3.0 / 8.0);
        assert_eq!(s.remove(1), Some(true));
        assert_eq!(s.kv_usage(), 0.0);
        assert_eq!(s.remove(1), None);
        assert_eq!(s.n_running(), 0);
    }

    #[test]
    fn a_shared_prefix_skips_prefill() {
        let mut s = sched(4, 512, 16);
        let mut a = prompt(1, 40);
        s.add(1, a.clone());
        step(&mut s, 5);
        // Same first 32 tokens (two full blocks), different tail.
        a.truncate(32);
        a.extend([1, 2, 3]);
        s.add(2, a.clone());
        let p = step(&mut s, 5);
        assert_eq!(p.chunks[1], chunk(2, 32, 3, true));
        assert_eq!(s.get(2).unwrap().cached_prompt_tokens, 32);
        // The blocks are shared, not copied.
        let (b1, b2) = (&s.get(1).unwrap().blocks, &s.get(2).unwrap().blocks);
        assert_eq!(b1[..2], b2[..2]);
        // After both finish, an identical prompt hits all but its last token's block.
        s.remove(1);
        s.remove(2);
        s.add(3, a);
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(3, 32, 3, true)]);
        let st = s.stats();
        assert_eq!(
            (st.prompt_tokens_queried, st.prompt_tokens_cached),
            (110, 64)
        );
    }

    #[test]
    fn without_prefix_caching_identical_prompts_share_no_block() {
        // A runtime that keeps K/V itself: every sequence computes its whole prompt in
        // blocks of its own, together or after another.
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_running_requests: 4,
                max_num_batched_tokens: 512,
                prefix_caching: false,
            },
            16,
        );
        let p = prompt(1, 40);
        s.add(1, p.clone());
        s.add(2, p.clone());
        let plan = step(&mut s, 5);
        assert_eq!(
            plan.chunks,
            vec![chunk(1, 0, 40, true), chunk(2, 0, 40, true)]
        );
        let (b1, b2) = (&s.get(1).unwrap().blocks, &s.get(2).unwrap().blocks);
        assert!(b1.iter().all(|b| !b2.contains(b)), "{b1:?} {b2:?}");
        s.remove(1);
        s.add(3, p);
        let plan = step(&mut s, 5);
        assert_eq!(
            plan.chunks,
            vec![chunk(2, 40, 1, true), chunk(3, 0, 40, true)]
        );
        let (b2, b3) = (&s.get(2).unwrap().blocks, &s.get(3).unwrap().blocks);
        assert!(b2.iter().all(|b| !b3.contains(b)), "{b2:?} {b3:?}");
        assert_eq!(s.get(3).unwrap().cached_prompt_tokens, 0);
        assert_eq!(s.stats().prompt_tokens_cached, 0);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut s = sched(4, 512, 16);
        s.add(1, prompt(1, 32));
        step(&mut s, 5);
        s.remove(1);
        s.add(2, prompt(1, 32));
        let p = step(&mut s, 5);
        assert_eq!(p.chunks, vec![chunk(2, 16, 16, true)]);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_it_still_finishes() {
        // 4 blocks = 64 tokens; two requests of 16-token prompts each growing to 40.
        let mut s = sched(4, 512, 4);
        s.add(1, prompt(1, 16));
        s.add(2, prompt(2, 16));
        let mut preempted = Vec::new();
        let mut done = Vec::new();
        for _ in 0..200 {
            let p = step(&mut s, 3);
            preempted.extend(p.preempted.iter().copied());
            for id in [1, 2] {
                if s.get(id).is_some_and(|q| q.tokens.len() >= 40) {
                    s.remove(id);
                    done.push(id);
                }
            }
            if done.len() == 2 {
                break;
            }
            assert!(s.kv_usage() <= 1.0);
        }
        assert_eq!(done, vec![1, 2], "the oldest finishes first");
        assert_eq!(preempted, vec![2]);
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(s.kv_usage(), 0.0);
    }

    #[test]
    fn a_preempted_request_recomputes_prompt_and_output() {
        let mut s = sched(4, 512, 3);
        s.add(1, prompt(1, 16));
        s.add(2, prompt(2, 16));
        step(&mut s, 3); // both prefilled: 2 blocks... plus growth
        let mut p = step(&mut s, 3); // 17 tokens each: needs 4 blocks > 3
        while p.preempted.is_empty() {
            p = step(&mut s, 3);
        }
        assert_eq!(p.preempted, vec![2]);
        let before = s.get(2).unwrap().tokens.clone();
        assert!(before.len() > 16);
        s.remove(1);
        let p = step(&mut s, 3);
        // Its first full block comes back from the prefix cache; the rest is recomputed.
        assert_eq!(p.chunks, vec![chunk(2, 16, before.len() - 16, true)]);
        assert!(p.admitted.is_empty(), "a re-admission is not a new request");
    }

    #[test]
    fn identical_prompts_admitted_together_compute_the_shared_blocks_once() {
        // Four choices of one 710-token prompt, a 512-token budget: the first one's
        // prompt takes two steps, the others join in the second and compute only their
        // last, partial block (the last token's logits are needed).
        let mut s = sched(8, 512, 256);
        let p = prompt(1, 710);
        for id in 1..=4 {
            s.add(id, p.clone());
        }
        let first = step(&mut s, 9);
        assert_eq!(first.chunks, vec![chunk(1, 0, 512, false)]);
        let second = step(&mut s, 9);
        assert_eq!(
            second.chunks,
            vec![
                chunk(1, 512, 198, true),
                chunk(2, 704, 6, true),
                chunk(3, 704, 6, true),
                chunk(4, 704, 6, true),
            ]
        );
        assert_eq!(s.stats().tokens_scheduled, 710 + 3 * 6);
        // They read the same blocks, which the first one fills in this very step.
        let table = |id| s.get(id).unwrap().blocks.clone();
        for id in 2..=4 {
            assert_eq!(table(id)[..44], table(1)[..44]);
            assert_ne!(
                table(id)[44],
                table(1)[44],
                "the partial block is each one's own"
            );
        }
        assert_eq!(s.get(4).unwrap().cached_prompt_tokens, 704);

        // Admitted in the same step as the one that computes them, too.
        let mut s = sched(8, 512, 256);
        for id in 1..=3 {
            s.add(id, prompt(2, 100));
        }
        let p = step(&mut s, 9);
        assert_eq!(
            p.chunks,
            vec![
                chunk(1, 0, 100, true),
                chunk(2, 96, 4, true),
                chunk(3, 96, 4, true)
            ]
        );
        assert_eq!(s.get(3).unwrap().blocks[..6], s.get(1).unwrap().blocks[..6]);
    }

    #[test]
    fn a_prompt_arriving_while_its_prefix_is_prefilled_does_not_recompute_it() {
        // Request 2 shares request 1's first 992 tokens and arrives after request 1's
        // first chunk: it is admitted only once request 1 has been scheduled to the end
        // of its prompt, whose blocks are then in the cache.
        let mut s = sched(8, 512, 256);
        let mut a = prompt(1, 1000);
        s.add(1, a.clone());
        step(&mut s, 9);
        a.truncate(992);
        a.extend([5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        s.add(2, a);
        let p = step(&mut s, 9);
        assert_eq!(
            p.chunks,
            vec![chunk(1, 512, 488, true), chunk(2, 992, 10, true)]
        );
        assert_eq!(s.stats().tokens_scheduled, 1000 + 10);

        // Decodes of other requests take part of the budget: the chunk that ends a
        // prompt leaves the rest for admissions, a chunk that does not leaves none.
        let mut s = sched(8, 300, 256);
        s.add(1, prompt(3, 20));
        step(&mut s, 9);
        s.add(2, prompt(4, 640));
        s.add(3, prompt(4, 640));
        let plans: Vec<StepPlan> = (0..3).map(|_| step(&mut s, 9)).collect();
        assert_eq!(
            plans[0].chunks,
            vec![chunk(1, 20, 1, true), chunk(2, 0, 299, false)]
        );
        assert_eq!(
            plans[1].chunks,
            vec![chunk(1, 21, 1, true), chunk(2, 299, 299, false)]
        );
        assert_eq!(
            plans[2].chunks,
            vec![
                chunk(1, 22, 1, true),
                chunk(2, 598, 42, true),
                chunk(3, 624, 16, true)
            ]
        );
    }

    #[test]
    fn the_head_of_the_queue_waits_for_blocks() {
        let mut s = sched(4, 512, 4);
        s.add(1, prompt(1, 40)); // 3 blocks
        s.add(2, prompt(2, 40)); // 3 more: only 1 left
        s.add(3, prompt(3, 4));
        let p = step(&mut s, 1);
        assert_eq!(p.admitted, vec![1]);
        assert_eq!(s.n_waiting(), 2, "request 3 does not jump the queue");
        s.remove(1);
        let p = step(&mut s, 1);
        assert_eq!(p.admitted, vec![2, 3]);
    }
}
