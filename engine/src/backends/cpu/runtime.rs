//! The CPU runtime behind the engine's seam: the model, its paged KV storage and the
//! forward pass's scratch buffers, computing on the process's compute pool.

use crate::backends::cpu::kernels;
use crate::backends::cpu::kv_cache::KvCache;
use crate::backends::cpu::model::{ForwardScratch, Model};
use crate::backends::cpu::thread_pool::ThreadPool;
use crate::backends::{
    Capabilities, KvCapacity, KvStorage, ModelRuntime, Numerics, RowRunner, RuntimeInfo, SeqChunk,
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
        let device = match self.model.numerics() {
            Numerics::Int8 => kernels::describe().to_string(),
            // The default arithmetic goes unsaid; the other is part of what computes.
            n => format!("{} ({n} numerics)", kernels::describe()),
        };
        RuntimeInfo {
            backend: "cpu",
            device,
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::backends::cpu::model::tests::tiny_llama;
    use crate::backends::{self, RuntimeOptions};
    use crate::gguf::{writer, GgufFile, MetaValue};
    use crate::request::{Event, GenerationRequest};
    use crate::sampling::{argmax, SamplingParams};
    use crate::text::tokenizer::Tokenizer;
    use crate::{Engine, EngineConfig};

    fn tiny_file() -> Arc<GgufFile> {
        Arc::new(GgufFile::from_bytes(tiny_llama("llama", None)).unwrap())
    }

    fn pool() -> Arc<ThreadPool> {
        Arc::new(ThreadPool::new(2).unwrap())
    }

    fn tiny_model() -> Model {
        Model::from_gguf(tiny_file(), pool()).unwrap()
    }

    #[test]
    fn it_declares_paged_kv_in_whole_blocks_and_names_its_kernels() {
        let rt = CpuRuntime::new(tiny_model(), 17);
        let cfg = rt.model().cfg.clone();
        assert_eq!(
            rt.kv_capacity(),
            KvCapacity {
                blocks: 2,
                bytes_per_token: KvCache::bytes_per_token(&cfg),
            }
        );
        assert_eq!(CpuRuntime::new(tiny_model(), 0).kv_capacity().blocks, 1);
        assert_eq!(rt.capabilities().kv, KvStorage::Paged);
        assert_eq!((rt.vocab_size(), rt.context_length()), (48, 256));
        assert_eq!(
            rt.info(),
            RuntimeInfo {
                backend: "cpu",
                device: kernels::describe().to_string(),
            }
        );
        // The factory builds the same runtime for a model file.
        let opts = RuntimeOptions {
            pool: pool(),
            kv_cache_tokens: 40,
            numerics: Default::default(),
        };
        let loaded = backends::load(tiny_file(), &opts).unwrap();
        assert_eq!(loaded.info().backend, "cpu");
        assert_eq!(loaded.kv_capacity().blocks, 3);
    }

    #[test]
    fn a_step_returns_the_forward_pass_logits_and_samples_rows_on_the_pool() {
        let mut rt = CpuRuntime::new(tiny_model(), 64);
        let model = tiny_model();
        let mut kv = KvCache::new(&model.cfg, 4);
        let (a, b) = ([3u32, 17, 5, 40, 22], [9u32, 11, 30]);
        let batch = [
            SeqChunk {
                tokens: &a,
                start_pos: 0,
                block_table: &[0],
                want_logits: true,
                decode_from: a.len(),
                device_greedy: false,
            },
            SeqChunk {
                tokens: &b,
                start_pos: 0,
                block_table: &[2],
                want_logits: true,
                decode_from: b.len(),
                device_greedy: false,
            },
        ];
        let want = model
            .forward(&batch, &mut kv, &mut ForwardScratch::default())
            .to_vec();
        let ran = AtomicUsize::new(0);
        let mut calls = 0;
        rt.step(&batch, &mut |logits, runner| {
            calls += 1;
            assert_eq!(logits, &want[..]);
            let mut jobs: Vec<_> = (0..5)
                .map(|_| {
                    || {
                        ran.fetch_add(1, Ordering::AcqRel);
                    }
                })
                .collect();
            let mut jobs: Vec<&mut (dyn FnMut() + Send)> = jobs
                .iter_mut()
                .map(|j| j as &mut (dyn FnMut() + Send))
                .collect();
            runner.run_rows(&mut jobs);
        });
        assert_eq!((calls, ran.load(Ordering::Acquire)), (1, 5));
    }

    /// A tokenizer for the tiny model's 48 tokens: `A`, `B`, ... as themselves.
    fn tiny_vocabulary() -> Arc<Tokenizer> {
        let tokens = (0..48u8)
            .map(|i| MetaValue::Str(char::from(b'A' + i).to_string()))
            .collect();
        let meta = [
            ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.tokens", MetaValue::Array(tokens)),
            ("tokenizer.ggml.merges", MetaValue::Array(Vec::new())),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let file = GgufFile::from_bytes(writer::write(&meta, &[])).unwrap();
        Arc::new(Tokenizer::load(&file, None).unwrap())
    }

    #[test]
    fn the_engine_on_the_cpu_runtime_decodes_as_the_forward_pass_does() {
        let prompt = vec![3u32, 17, 5, 40, 22];
        let n = 8;
        // By hand: the prompt in one chunk, then one token per step, greedy.
        let model = tiny_model();
        let table = [0u32];
        let mut kv = KvCache::new(&model.cfg, 1);
        let mut s = ForwardScratch::default();
        let mut seq = prompt.clone();
        let mut want = Vec::new();
        while want.len() < n {
            let start = if want.is_empty() { 0 } else { seq.len() - 1 };
            let chunk = SeqChunk {
                tokens: &seq[start..],
                start_pos: start,
                block_table: &table,
                want_logits: true,
                decode_from: prompt.len(),
                device_greedy: false,
            };
            let t = argmax(model.forward(&[chunk], &mut kv, &mut s));
            want.push(t);
            seq.push(t);
        }

        let rt = CpuRuntime::new(tiny_model(), 256);
        let e = Engine::start(Box::new(rt), tiny_vocabulary(), EngineConfig::default()).unwrap();
        assert_eq!(e.runtime().backend, "cpu");
        let mut stream = e
            .submit(GenerationRequest {
                prompt,
                max_tokens: n,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        let mut got = Vec::new();
        while let Some(Event::Token { id, .. }) = stream.blocking_recv() {
            got.push(id);
        }
        assert_eq!(got, want);
        e.shutdown();
    }
}
