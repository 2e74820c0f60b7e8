//! The CPU runtime behind the engine's seam: the model, its paged KV storage and the
//! forward pass's scratch buffers, computing on the process's compute pool.

use crate::backends::cpu::kernels;
use crate::backends::cpu::kv_cache::KvCache;
use crate::backends::cpu::model::{ForwardScratch, Model};
use crate::backends::cpu::thread_pool::ThreadPool;
use crate::backends::{
    Capabilities, KvCapacity, KvStorage, ModelRuntime, RowRunner, RuntimeInfo, SeqChunk,
};
use crate::block_allocator::BLOCK_SIZE;

/// A model on the CPU with its KV cache.
pub struct CpuRuntime {
    model: Model,
    kv: KvCache,
    scratch: ForwardScratch,
}

impl CpuRuntime {
    /// The runtime for `model`, with K/V storage for `kv_cache_tokens` tokens (rounded
    /// up to whole blocks, at least one). The storage is zero-mapped: it costs memory
    /// only as blocks are first written.
    pub fn new(model: Model, kv_cache_tokens: usize) -> Self {
        let n_blocks = kv_cache_tokens.div_ceil(BLOCK_SIZE).max(1);
        let kv = KvCache::new(&model.cfg, n_blocks);
        CpuRuntime {
            model,
            kv,
            scratch: ForwardScratch::default(),
        }
    }

    /// The model it runs.
    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl ModelRuntime for CpuRuntime {
    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            backend: "cpu",
            device: kernels::describe().to_string(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kv: KvStorage::Paged,
            // The host is the device: the engine's sampling already runs here.
            device_sampling: false,
            token_mask: false,
        }
    }

    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        self.model.cfg.context_length
    }

    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            blocks: self.kv.n_blocks(),
            bytes_per_token: KvCache::bytes_per_token(&self.model.cfg),
        }
    }

    fn step(&mut self, batch: &[SeqChunk<'_>], sample: &mut dyn FnMut(&[f32], &dyn RowRunner)) {
        let pool = self.model.pool();
        // The pool is ours from the forward pass through sampling; another model's loop
        // waits (asleep) for its turn.
        let _lease = pool.lease();
        let logits = self.model.forward(batch, &mut self.kv, &mut self.scratch);
        sample(logits, pool);
    }

    fn reset(&mut self) {
        self.scratch = ForwardScratch::default();
    }
}

/// Each row's sampler is independent: whole-vocabulary passes per row, spread over the
/// compute threads instead of run one after another on the loop's thread.
impl RowRunner for ThreadPool {
    fn run_rows(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
        self.for_each_mut(jobs, &|job| job());
    }
}
