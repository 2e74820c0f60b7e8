//! Allocation of KV cache blocks, with prefix caching.
//!
//! Every block has a reference count. A full block whose tokens have been computed is
//! registered under a hash of its tokens and of everything before it, so a later request
//! whose prompt starts the same way takes the block instead of recomputing it. A freed
//! block keeps its contents and its hash until the space is needed again: free cached
//! blocks are reused least recently freed first, and blocks that were never registered
//! go before any of them.
//!
//! Hashes are SipHash with a per-process random key: nobody outside can craft two token
//! sequences that collide and read each other's cache.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

/// Token slots per KV block: the unit the scheduler hands out, and in which a runtime
/// with paged K/V storage lays out its cache.
pub const BLOCK_SIZE: usize = 16;

/// Index of a block in the KV cache.
pub type BlockId = u32;

/// Hash chain of a sequence's full blocks: entry `i` covers tokens `0..(i + 1) * BLOCK_SIZE`.
#[derive(Clone)]
pub struct BlockHasher {
    state: RandomState,
}

impl BlockHasher {
    /// A hasher with a fresh random key.
    pub fn new() -> Self {
        BlockHasher {
            state: RandomState::new(),
        }
    }

    /// The hash of the block holding `tokens` (exactly `BLOCK_SIZE`) after `parent`.
    pub fn hash(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        debug_assert_eq!(tokens.len(), BLOCK_SIZE);
        let mut h = self.state.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Extends `hashes` to cover every full block of `tokens`.
    pub fn extend(&self, hashes: &mut Vec<u64>, tokens: &[u32]) {
        while (hashes.len() + 1) * BLOCK_SIZE <= tokens.len() {
            let i = hashes.len();
            let h = self.hash(
                hashes.last().copied(),
                &tokens[i * BLOCK_SIZE..][..BLOCK_SIZE],
            );
            hashes.push(h);
        }
    }
}

impl Default for BlockHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Hands out KV blocks; says no (returns `None`) rather than failing when they run out.
pub struct KvBlockAllocator {
    ref_count: Vec<u32>,
    /// The hash a block is registered under, while it holds reusable contents.
    hash_of: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    /// Free blocks with nothing worth keeping.
    free_plain: Vec<BlockId>,
    /// Free blocks that still hold registered contents, by the time they were freed.
    evictable: BTreeMap<u64, BlockId>,
    freed_at: Vec<u64>,
    clock: u64,
    in_use: usize,
    touched: usize,
}

impl KvBlockAllocator {
    /// An allocator over `n_blocks` blocks, all free.
    pub fn new(n_blocks: usize) -> Self {
        KvBlockAllocator {
            ref_count: vec![0; n_blocks],
            hash_of: vec![None; n_blocks],
            cached: HashMap::new(),
            free_plain: (0..n_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            freed_at: vec![0; n_blocks],
            clock: 0,
            in_use: 0,
            touched: 0,
        }
    }

    /// All blocks.
    pub fn n_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that `allocate` can still hand out (cached free blocks included).
    pub fn n_free(&self) -> usize {
        self.free_plain.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn n_in_use(&self) -> usize {
        self.in_use
    }

    /// A block for new contents, evicting the least recently freed cached block if no
    /// plain one is left; `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free_plain.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.take(b);
        Some(b)
    }

    /// `n` blocks, or none at all (and `None`) when fewer than `n` are free.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.n_free() < n {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// Takes the cached blocks for the longest prefix of `hashes` that is cached (at most
    /// `max_blocks`); the caller owns one reference to each returned block.
    pub fn take_cached_prefix(&mut self, hashes: &[u64], max_blocks: usize) -> Vec<BlockId> {
        let mut out = Vec::new();
        for h in hashes.iter().take(max_blocks) {
            let Some(&b) = self.cached.get(h) else { break };
            if self.ref_count[b as usize] == 0 {
                self.evictable.remove(&self.freed_at[b as usize]);
            }
            self.take(b);
            out.push(b);
        }
        out
    }

    /// How many leading blocks of `hashes` are cached right now (no side effects).
    pub fn cached_prefix_len(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Marks `block` (full and computed) as holding the block hashed `hash`. When another
    /// block already holds the same contents the first one stays the cached copy.
    pub fn register(&mut self, block: BlockId, hash: u64) {
        if self.hash_of[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
    }

    /// Drops one reference to `block`.
    pub fn free(&mut self, block: BlockId) {
        let rc = &mut self.ref_count[block as usize];
        assert!(*rc > 0, "block {block} freed more often than taken");
        *rc -= 1;
        if *rc > 0 {
            return;
        }
        self.in_use -= 1;
        if self.hash_of[block as usize].is_some() {
            self.clock += 1;
            self.freed_at[block as usize] = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free_plain.push(block);
        }
    }

    /// Blocks ever handed out (fresh blocks go out in increasing order, so these are
    /// blocks `0..touched`): the part of the KV cache whose memory has been written.
    pub fn n_touched(&self) -> usize {
        self.touched
    }

    fn take(&mut self, b: BlockId) {
        self.touched = self.touched.max(b as usize + 1);
        let rc = &mut self.ref_count[b as usize];
        if *rc == 0 {
            self.in_use += 1;
        }
        *rc += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    #[test]
    fn hands_out_every_block_then_says_no() {
        let mut a = KvBlockAllocator::new(3);
        let got: Vec<_> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(a.allocate(), None);
        assert_eq!(a.n_in_use(), 3);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        a.free(got[1]);
        assert_eq!(a.allocate(), Some(got[1]));
    }

    #[test]
    fn hash_chain_depends_on_the_whole_prefix() {
        let h = BlockHasher::new();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut a = toks(1, 40);
        h.extend(&mut x, &a);
        assert_eq!(x.len(), 2);
        a[0] += 1; // first block differs, second block's tokens do not
        h.extend(&mut y, &a);
        assert_ne!(x[0], y[0]);
        assert_ne!(x[1], y[1]);
    }

    #[test]
    fn freed_registered_blocks_are_reused_by_prefix_until_evicted() {
        let h = BlockHasher::new();
        let mut a = KvBlockAllocator::new(4);
        let mut hashes = Vec::new();
        h.extend(&mut hashes, &toks(7, 32));
        let b0 = a.allocate().unwrap();
        let b1 = a.allocate().unwrap();
        a.register(b0, hashes[0]);
        a.register(b1, hashes[1]);
        a.free(b0);
        a.free(b1);
        assert_eq!(a.n_in_use(), 0);
        assert_eq!(a.n_free(), 4);
        // A new sequence with the same prefix takes the same blocks back.
        assert_eq!(a.take_cached_prefix(&hashes, 8), vec![b0, b1]);
        assert_eq!(a.n_in_use(), 2);
        // Shared: a second taker adds a reference; one free leaves it in use.
        assert_eq!(a.take_cached_prefix(&hashes[..1], 8), vec![b0]);
        a.free(b0);
        assert_eq!(a.n_in_use(), 2);
        a.free(b0);
        a.free(b1);
        // Plain blocks go first; then cached ones, least recently freed first.
        let p = [a.allocate().unwrap(), a.allocate().unwrap()];
        assert!(!p.contains(&b0) && !p.contains(&b1));
        assert_eq!(a.cached_prefix_len(&hashes), 2);
        assert_eq!(a.allocate(), Some(b0));
        assert_eq!(
            a.cached_prefix_len(&hashes),
            0,
            "the chain breaks at block 0"
        );
        assert_eq!(a.take_cached_prefix(&hashes, 8), Vec::<BlockId>::new());
    }

    #[test]
    fn a_duplicate_block_does_not_replace_the_cached_copy() {
        let mut a = KvBlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.register(x, 42);
        a.register(y, 42);
        a.free(y);
        a.free(x);
        assert_eq!(a.take_cached_prefix(&[42], 1), vec![x]);
    }
}
