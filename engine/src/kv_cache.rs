//! Paged KV cache storage: fixed-size blocks of token slots, addressed through a
//! per-sequence block table.
//!
//! Values are stored as f32 but rounded to f16 precision on write, which is what
//! llama.cpp's default F16 cache holds: the same numbers at twice the bytes, in
//! exchange for no conversion in the attention loop.

use crate::config::ModelConfig;
use crate::kernels;

/// Token slots per block.
pub const BLOCK_SIZE: usize = 16;

/// K and V for every layer, in `n_blocks` blocks of `BLOCK_SIZE` tokens.
pub struct KvCache {
    kv_dim: usize,
    n_blocks: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// Storage for `n_blocks` blocks. The memory is zero-mapped, so pages cost RAM only
    /// once a block is first written.
    pub fn new(cfg: &ModelConfig, n_blocks: usize) -> Self {
        let per_layer = n_blocks * BLOCK_SIZE * cfg.kv_dim();
        KvCache {
            kv_dim: cfg.kv_dim(),
            n_blocks,
            k: (0..cfg.n_layers).map(|_| vec![0f32; per_layer]).collect(),
            v: (0..cfg.n_layers).map(|_| vec![0f32; per_layer]).collect(),
        }
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Bytes one token takes across all layers.
    pub fn bytes_per_token(cfg: &ModelConfig) -> usize {
        2 * cfg.n_layers * cfg.kv_dim() * std::mem::size_of::<f32>()
    }

    #[inline]
    fn slot(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / BLOCK_SIZE] as usize;
        debug_assert!(block < self.n_blocks);
        (block * BLOCK_SIZE + pos % BLOCK_SIZE) * self.kv_dim
    }

    /// Stores the K and V rows of the token at `pos`.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let s = self.slot(table, pos);
        let d = self.kv_dim;
        kernels::round_f16(&mut self.k[layer][s..s + d], &k[..d]);
        kernels::round_f16(&mut self.v[layer][s..s + d], &v[..d]);
    }

    /// K rows of the `n` tokens from `pos`, which must lie in one block: `n × kv_dim`.
    #[inline]
    pub fn k_rows(&self, layer: usize, table: &[u32], pos: usize, n: usize) -> &[f32] {
        assert!(pos % BLOCK_SIZE + n <= BLOCK_SIZE);
        let s = self.slot(table, pos);
        &self.k[layer][s..s + n * self.kv_dim]
    }

    /// V rows of the `n` tokens from `pos`, which must lie in one block: `n × kv_dim`.
    #[inline]
    pub fn v_rows(&self, layer: usize, table: &[u32], pos: usize, n: usize) -> &[f32] {
        assert!(pos % BLOCK_SIZE + n <= BLOCK_SIZE);
        let s = self.slot(table, pos);
        &self.v[layer][s..s + n * self.kv_dim]
    }

    /// K row (all KV heads) of the token at `pos`.
    #[inline]
    pub fn k(&self, layer: usize, table: &[u32], pos: usize) -> &[f32] {
        let s = self.slot(table, pos);
        &self.k[layer][s..s + self.kv_dim]
    }

    /// V row (all KV heads) of the token at `pos`.
    #[inline]
    pub fn v(&self, layer: usize, table: &[u32], pos: usize) -> &[f32] {
        let s = self.slot(table, pos);
        &self.v[layer][s..s + self.kv_dim]
    }
}
