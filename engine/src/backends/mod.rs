//! The seam between the serving core and the runtime that computes a model step.
//!
//! The engine loop, the scheduler, the block allocator, sampling and stop strings never
//! name a runtime: the loop holds a `Box<dyn ModelRuntime>` and hands it each step's
//! batch ([`SeqChunk`]s), then samples from the logits it returns. [`load`] picks the
//! runtime for a model file; today every model runs on `cpu` (our kernels on this
//! machine's cores, `CpuRuntime`).
//!
//! # What a runtime declares
//!
//! Once, at start-up, in [`Capabilities`], [`KvCapacity`] and [`RuntimeInfo`]:
//!
//! - **Where K/V live.** With [`KvStorage::Paged`] the runtime stores K/V in
//!   `kv_capacity().blocks` blocks of [`BLOCK_SIZE`] tokens, and each chunk's block table
//!   says which blocks hold its sequence's positions (block `i` holds positions
//!   `i * BLOCK_SIZE..`). The engine then shares the blocks of a common prompt prefix
//!   between sequences (prefix caching), so a chunk may read blocks another sequence
//!   wrote, including blocks an earlier chunk of the *same* batch fills: within each
//!   layer a paged runtime must write every chunk's K/V before any attention of that
//!   layer reads the cache.
//!
//!   With [`KvStorage::Internal`] the runtime keeps each sequence's K/V itself, as an
//!   ONNX Runtime session does with its `past_key_values`. The engine then turns prefix
//!   caching off (see `Engine::start`), so no block is ever shared: a sequence's block
//!   table is only its share of `kv_capacity`, and its first entry identifies the
//!   sequence among those running. Such a runtime keys its per-sequence state by that
//!   first block, starts the state afresh for a chunk at `start_pos` 0 (a new
//!   request, or one recomputed from its start after preemption), and frees it when the
//!   engine says the sequence ended ([`ModelRuntime::release`]).
//!
//! - **Sampling on the device.** A runtime that can pick tokens where the logits are (a
//!   CUDA runtime, to avoid copying every step's logits to the host) says so in
//!   [`Capabilities::device_sampling`]. The engine then marks the rows whose requests
//!   sample plain greedily ([`SeqChunk::device_greedy`]): the runtime leaves those rows
//!   out of the logits it passes to `sample` and hands their tokens over through
//!   [`ModelRuntime::take_device_tokens`] after the step. Every other row is sampled on
//!   the host from its logits.
//!
//! - **Token masks.** Structured outputs mask each constrained row's logits on the host,
//!   in the row's sampling job, so every runtime serves them. [`Capabilities::token_mask`]
//!   says whether a runtime could take the masks on its device instead (a runtime that
//!   samples there); none does yet, so the engine never sends one.
//!
//! The per-row work on a step's logits (each request's sampler) runs through the
//! [`RowRunner`] the runtime passes along with the logits: the CPU runtime spreads it over
//! its compute pool, a runtime without host threads of its own passes [`SerialRows`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod numerics;
pub mod onnx;

use std::sync::Arc;

use crate::block_allocator::{BlockId, BLOCK_SIZE};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use cpu::thread_pool::ThreadPool;
use cpu::CpuRuntime;
use device::Device;
pub use numerics::Numerics;

/// One sequence's share of a step's batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Tokens to process, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first token.
    pub start_pos: usize,
    /// The sequence's KV blocks; must cover every position up to the chunk's end.
    pub block_table: &'a [u32],
    /// Whether to return logits for the chunk's last token.
    pub want_logits: bool,
    /// First position that holds a generated token (the prompt's length). Generated
    /// tokens take llama.cpp's single-token attention path even when they are recomputed
    /// in a chunk (after preemption), so recomputing reproduces the same numbers.
    pub decode_from: usize,
    /// With `want_logits`, on a runtime with [`Capabilities::device_sampling`]: the row's
    /// request samples greedily with nothing else applied (no penalties, bias, mask or
    /// log-probabilities), so the runtime picks its token by argmax where the logits
    /// are and returns the token ([`ModelRuntime::take_device_tokens`]) instead of the
    /// row's logits. Never set for other runtimes.
    pub device_greedy: bool,
}

/// Where a runtime keeps K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStorage {
    /// In blocks that the engine's block tables address; prefixes are shared.
    Paged,
    /// Inside the runtime, per sequence; the engine shares nothing (no prefix caching).
    Internal,
}

/// What a runtime supports beyond computing logits (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Where K/V live, which decides whether the engine caches prompt prefixes.
    pub kv: KvStorage,
    /// Whether the runtime picks greedy rows' tokens on its device
    /// ([`SeqChunk::device_greedy`]).
    pub device_sampling: bool,
    /// Whether the runtime accepts a per-row mask of allowed tokens.
    pub token_mask: bool,
}

/// How much K/V a runtime holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCapacity {
    /// Blocks of [`BLOCK_SIZE`] tokens: the scheduler's whole pool.
    pub blocks: usize,
    /// Bytes one token's K/V take across all layers (for the KV memory metric).
    pub bytes_per_token: usize,
}

impl KvCapacity {
    /// Capacity in tokens.
    pub fn tokens(&self) -> usize {
        self.blocks * BLOCK_SIZE
    }
}

/// Device memory a runtime holds (a GPU's), by use, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The model's weights.
    pub weights: usize,
    /// The KV cache (allocated whole at start-up).
    pub kv_cache: usize,
    /// Activations and step inputs (grows with the largest step).
    pub workspace: usize,
}

/// What a runtime is, as logs and `/admin/models` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The backend: `cpu`.
    pub backend: &'static str,
    /// What it computes on: for `cpu`, the kernel set in use (e.g. `avx2+avx512-vnni`,
    /// with `(f32 numerics)` after it under `Numerics::F32`).
    pub device: String,
}

/// Runs independent per-row work of a step (each request's sampler).
pub trait RowRunner {
    /// Calls every job once, in parallel where the runtime has threads for it, and
    /// returns when all are done.
    fn run_rows(&self, jobs: &mut [&mut (dyn FnMut() + Send)]);
}

/// Runs each job in turn on the calling thread: for runtimes with no host threads.
pub struct SerialRows;

impl RowRunner for SerialRows {
    fn run_rows(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
        for job in jobs {
            job();
        }
    }
}

/// A model runtime: computes the steps the scheduler plans.
///
/// The engine calls it from its loop thread only, one step at a time.
pub trait ModelRuntime: Send {
    /// The backend and device, for logs and `/admin/models`.
    fn info(&self) -> RuntimeInfo;

    /// What the runtime supports; the engine reads it once, at start.
    fn capabilities(&self) -> Capabilities;

    /// Logits per row.
    fn vocab_size(&self) -> usize;

    /// The longest sequence the model takes, in tokens.
    fn context_length(&self) -> usize;

    /// K/V the runtime holds; the scheduler sizes its block pool from it, once, at start.
    fn kv_capacity(&self) -> KvCapacity;

    /// Runs one step: stores the K/V of every chunk's tokens, then calls `sample` once
    /// with the logits of the chunks whose `want_logits` is set and `device_greedy` is
    /// not (`vocab_size` each, row after row, in batch order) and the [`RowRunner`] for
    /// the work on them. The step
    /// keeps the runtime's compute until `sample` returns: the CPU runtime holds its
    /// pool's lease throughout, so another model's step never runs between this step's
    /// forward pass and its sampling.
    fn step(&mut self, batch: &[SeqChunk<'_>], sample: &mut dyn FnMut(&[f32], &dyn RowRunner));

    /// Device memory held, for runtimes on an accelerator (`None` on the CPU, whose
    /// memory is the process's own and shows in its resident size).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }

    /// The tokens of the last step's `device_greedy` chunks, in batch order (empty for
    /// runtimes without [`Capabilities::device_sampling`]).
    fn take_device_tokens(&mut self) -> Vec<u32> {
        Vec::new()
    }

    /// Drops whatever a step left half done (a panic in `step` or `sample`); the engine
    /// calls it before serving again. K/V contents need nothing: the scheduler starts
    /// over with every block free.
    fn reset(&mut self) {}

    /// The sequence whose block table starts with `first_block` has ended (finished,
    /// cancelled or failed): a runtime that keeps K/V itself frees that sequence's now.
    /// Paged runtimes need nothing (the scheduler frees the blocks).
    fn release(&mut self, first_block: BlockId) {
        let _ = first_block;
    }
}

/// What [`load`] builds a runtime with.
#[derive(Clone)]
pub struct RuntimeOptions {
    /// The process's compute threads, shared by every model.
    pub pool: Arc<ThreadPool>,
    /// K/V capacity in tokens (rounded up to whole blocks, at least one).
    pub kv_cache_tokens: usize,
    /// The CPU backend's arithmetic (8-bit or f32 activations).
    pub numerics: Numerics,
}

impl RuntimeOptions {
    /// The default K/V capacity, as `engine.kv_cache_tokens` defaults to.
    pub const DEFAULT_KV_CACHE_TOKENS: usize = 65536;
}

/// The runtime for a model file on the CPU.
pub fn load(
    file: Arc<GgufFile>,
    opts: &RuntimeOptions,
) -> Result<Box<dyn ModelRuntime>, ModelError> {
    load_on(&Device::Cpu, file, opts)
}

/// The runtime for a model file on `device` (see [`device::resolve`]). On CUDA the KV
/// cache is sized from the GPU's free memory (`gpu_memory_fraction`), not from
/// `opts.kv_cache_tokens`, which sizes host memory.
pub fn load_on(
    device: &Device,
    file: Arc<GgufFile>,
    opts: &RuntimeOptions,
) -> Result<Box<dyn ModelRuntime>, ModelError> {
    match device {
        Device::Cpu => {
            let mut model = cpu::model::Model::from_gguf(file, opts.pool.clone())?;
            model.set_numerics(opts.numerics);
            Ok(Box::new(CpuRuntime::new(model, opts.kv_cache_tokens)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda {
            gpu_memory_fraction,
            ..
        } => {
            if opts.numerics != Numerics::Int8 {
                return Err(ModelError::Runtime(format!(
                    "numerics {} is for the CPU backend; the CUDA backend computes as llama.cpp's CUDA kernels do",
                    opts.numerics
                )));
            }
            let cuda_opts = cuda::CudaOptions {
                gpu_memory_fraction: *gpu_memory_fraction,
                kv_cache_tokens: None,
            };
            Ok(Box::new(cuda::CudaRuntime::load(file, &cuda_opts)?))
        }
    }
}
