//! Paged KV cache storage: fixed-size blocks of token slots, addressed through a
//! per-sequence block table.
//!
//! Values are stored as f16 (IEEE half, as raw bits), which is what llama.cpp's default
//! F16 cache holds: K and V are rounded to nearest-even f16 on write and widened back
//! to the same f32 values in the attention kernels (with F16C where the CPU has it), so
//! results are those of an f32 cache holding f16-rounded values, at half the bytes.

use crate::backends::cpu::kernels;
use crate::block_allocator::BLOCK_SIZE;
use crate::config::ModelConfig;

/// K and V for every layer, in `n_blocks` blocks of `BLOCK_SIZE` tokens.
pub struct KvCache {
    kv_dim: usize,
    n_blocks: usize,
    /// Per layer, `n_blocks × BLOCK_SIZE` rows of `kv_dim` f16 bit patterns. Plain `u16`
    /// (not `half::f16`) so that `vec![0; n]` allocates zeroed pages lazily.
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl KvCache {
    /// Storage for `n_blocks` blocks. The memory is zero-mapped, so pages cost RAM only
    /// once a block is first written.
    pub fn new(cfg: &ModelConfig, n_blocks: usize) -> Self {
        let per_layer = n_blocks * BLOCK_SIZE * cfg.kv_dim();
        KvCache {
            kv_dim: cfg.kv_dim(),
            n_blocks,
            k: (0..cfg.n_layers).map(|_| vec![0u16; per_layer]).collect(),
            v: (0..cfg.n_layers).map(|_| vec![0u16; per_layer]).collect(),
        }
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Bytes one token takes across all layers (K and V, 2 bytes per value).
    pub fn bytes_per_token(cfg: &ModelConfig) -> usize {
        2 * cfg.n_layers * cfg.kv_dim() * std::mem::size_of::<u16>()
    }

    #[inline]
    fn slot(&self, table: &[u32], pos: usize) -> usize {
        let block = table[pos / BLOCK_SIZE] as usize;
        debug_assert!(block < self.n_blocks);
        (block * BLOCK_SIZE + pos % BLOCK_SIZE) * self.kv_dim
    }

    /// Stores the K and V rows of the token at `pos`, rounded to f16.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let s = self.slot(table, pos);
        let d = self.kv_dim;
        kernels::f32_to_f16(&mut self.k[layer][s..s + d], &k[..d]);
        kernels::f32_to_f16(&mut self.v[layer][s..s + d], &v[..d]);
    }

    /// K rows (f16 bits) of the `n` tokens from `pos`, which must lie in one block:
    /// `n × kv_dim`.
    #[inline]
    pub fn k_rows(&self, layer: usize, table: &[u32], pos: usize, n: usize) -> &[u16] {
        assert!(pos % BLOCK_SIZE + n <= BLOCK_SIZE);
        let s = self.slot(table, pos);
        &self.k[layer][s..s + n * self.kv_dim]
    }

    /// V rows (f16 bits) of the `n` tokens from `pos`, which must lie in one block:
    /// `n × kv_dim`.
    #[inline]
    pub fn v_rows(&self, layer: usize, table: &[u32], pos: usize, n: usize) -> &[u16] {
        assert!(pos % BLOCK_SIZE + n <= BLOCK_SIZE);
        let s = self.slot(table, pos);
        &self.v[layer][s..s + n * self.kv_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            n_layers: 2,
            dim: 256,
            ffn_dim: 512,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            vocab_size: 48,
            context_length: 256,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
            rope_freq_scale: 1.0,
            rope_style: crate::config::RopeStyle::Interleaved,
            ffn_activation: crate::config::FfnActivation::SwiGlu,
            sliding_window: None,
            embedding_scale: None,
            qk_norm: false,
            post_norms: false,
            final_logit_softcap: None,
        }
    }

    #[test]
    fn rows_round_trip_through_f16_at_two_bytes_a_value() {
        let cfg = cfg();
        let d = cfg.kv_dim();
        assert_eq!(KvCache::bytes_per_token(&cfg), 2 * cfg.n_layers * d * 2);
        let mut kv = KvCache::new(&cfg, 3);
        // Block 2 then block 0: positions 16.. live in the table's second entry.
        let table = [2u32, 0];
        let k: Vec<f32> = (0..d).map(|i| i as f32 * 0.3711 - 7.0).collect();
        let v: Vec<f32> = (0..d).map(|i| 1.0 / (i as f32 + 0.5)).collect();
        kv.write(1, &table, 17, &k, &v);
        let (kr, vr) = (kv.k_rows(1, &table, 17, 1), kv.v_rows(1, &table, 17, 1));
        for i in 0..d {
            assert_eq!(kr[i], half::f16::from_f32(k[i]).to_bits());
            assert_eq!(vr[i], half::f16::from_f32(v[i]).to_bits());
        }
        // Slot 1 of block 0 in the storage; other layers and slots untouched.
        assert_eq!(kv.k[1][d..2 * d], kr[..]);
        assert!(kv.k[0].iter().all(|&x| x == 0));
        assert_eq!(kv.k_rows(1, &table, 16, 2).len(), 2 * d);
    }
}
