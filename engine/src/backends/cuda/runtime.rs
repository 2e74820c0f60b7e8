//! The CUDA runtime behind the engine's seam: the weights, the paged f16 KV cache and
//! the forward pass's workspace in GPU memory, one stream, the kernels of ABI.md.
//!
//! The forward pass mirrors the CPU one (`backends/cpu/model.rs`) operation for
//! operation: embedding (× Gemma's scale), then per layer RMSNorm, Q/K/V (+ biases),
//! per-head Q/K RMSNorm, RoPE (normal or NeoX pairs, the local layers' own base, Llama
//! 3.1 frequency factors on the global ones), K/V stored for every chunk, attention
//! (sliding window on local layers), output projection (+ post norm), residual, FFN
//! with SwiGLU or GeGLU (+ post norm), residual; then the final norm, the LM head (the
//! embedding when tied) and the logit softcap, for the wanted rows only.
//!
//! Which attention kernel a token takes depends on its chunk, not on
//! `SeqChunk::decode_from`: single-token chunks go through `paged_attention_decode`
//! (all of a step's at once), longer chunks through `paged_attention_prefill`, one
//! launch each. (The CPU follows llama.cpp's two numeric paths for bit-exactness with
//! it; on the GPU both kernels accumulate in f32 and agree to rounding.)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};

use super::device::{self, DeviceInfo};
use super::graphs::{self, DecodeGraphs};
use super::launch::{MatmulKind, MAX_ATTENTION_HEAD_DIM};
use super::modules::{Kernels, FIXED_KERNELS};
use super::ops::{AttnShape, Ops};
use super::plan::{self, Layout, StepPlan};
use super::weights::{self, kernel_name, DeviceBuffer, GpuWeights};
use crate::backends::{
    Capabilities, DeviceMemory, KvCapacity, KvStorage, ModelRuntime, RowRunner, RuntimeInfo,
    SeqChunk, SerialRows,
};
use crate::block_allocator::BLOCK_SIZE;
use crate::config::{FfnActivation, ModelConfig, RopeStyle};
use crate::error::ModelError;
use crate::gguf::quant::GgmlType;
use crate::gguf::GgufFile;

/// What [`CudaRuntime::load`] builds the runtime with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CudaOptions {
    /// Share of the GPU's free memory (at load) the model may take: weights, workspace
    /// and KV cache together, in (0, 1].
    pub gpu_memory_fraction: f32,
    /// K/V capacity in tokens; `None` takes all the memory left.
    pub kv_cache_tokens: Option<usize>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            gpu_memory_fraction: 0.9,
            kv_cache_tokens: None,
        }
    }
}

/// Rows the workspace starts with (the scheduler's default token budget per step); it
/// grows when a step needs more.
const INITIAL_WORKSPACE_ROWS: usize = 512;

/// Rows of workspace the KV sizing leaves room for, so the workspace can grow to a
/// 2048-token step without running out of memory the cache took.
const RESERVED_WORKSPACE_ROWS: usize = 2048;

/// Logit rows the workspace starts with: the largest decode bucket.
const INITIAL_LOGIT_ROWS: usize = graphs::BUCKETS[graphs::BUCKETS.len() - 1];

/// Floats of activations per workspace row: x, xb, q, att, k, v, gate, up, act.
pub fn workspace_floats_per_row(cfg: &ModelConfig) -> usize {
    2 * cfg.dim + 2 * cfg.q_dim() + 2 * cfg.kv_dim() + 3 * cfg.ffn_dim
}

/// Device bytes of a workspace of `rows` rows, `logit_rows` logit rows and `ints` ints.
pub fn workspace_bytes(cfg: &ModelConfig, rows: usize, logit_rows: usize, ints: usize) -> usize {
    4 * (rows * workspace_floats_per_row(cfg) + logit_rows * cfg.vocab_size + ints)
}

/// Ints a step plan over `rows` rows with tables `max_blocks` wide can take: tokens,
/// positions, slots, context lengths and picked rows (≤ rows each) and one table per
/// row at most.
fn ints_for(rows: usize, max_blocks: usize) -> usize {
    rows * (5 + max_blocks)
}

/// Bytes one KV block takes across all layers (K and V, f16).
pub fn kv_bytes_per_block(cfg: &ModelConfig) -> usize {
    2 * cfg.n_layers * BLOCK_SIZE * cfg.kv_dim() * 2
}

/// KV blocks for the scheduler: `free × fraction − weights − workspace`, less the
/// runtime's scratch block, capped at `requested_tokens` (rounded up to whole blocks)
/// when given.
pub fn kv_blocks(
    free: usize,
    fraction: f32,
    weights: usize,
    workspace: usize,
    bytes_per_block: usize,
    requested_tokens: Option<usize>,
) -> Result<usize, ModelError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(ModelError::BadHyperparameters(format!(
            "gpu_memory_fraction {fraction} is not in (0, 1]"
        )));
    }
    let budget = (free as f64 * fraction as f64) as usize;
    let left = budget.saturating_sub(weights).saturating_sub(workspace);
    let fit = (left / bytes_per_block.max(1)).saturating_sub(1);
    if fit == 0 {
        return Err(ModelError::Runtime(format!(
            "not enough GPU memory: {} MiB free × {fraction} holds the weights ({} MiB) and \
             workspace ({} MiB) but no KV cache; raise gpu_memory_fraction or use a smaller model",
            free >> 20,
            weights >> 20,
            workspace >> 20
        )));
    }
    Ok(match requested_tokens {
        Some(t) => fit.min(t.div_ceil(BLOCK_SIZE).max(1)),
        None => fit,
    })
}

/// The step's activations and inputs on the device. Their addresses are baked into
/// captured graphs, so they only change when the workspace grows (which drops them).
struct Workspace {
    rows: usize,
    logit_rows: usize,
    x: DeviceBuffer<f32>,
    xb: DeviceBuffer<f32>,
    q: DeviceBuffer<f32>,
    att: DeviceBuffer<f32>,
    k: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    gate: DeviceBuffer<f32>,
    up: DeviceBuffer<f32>,
    act: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    ints: DeviceBuffer<i32>,
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
    what: &str,
) -> Result<DeviceBuffer<T>, ModelError> {
    let slice = stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
        ModelError::Runtime(format!(
            "cannot allocate {} MiB of GPU memory for the {what}: {e}",
            (n * std::mem::size_of::<T>()) >> 20
        ))
    })?;
    Ok(DeviceBuffer::new(slice, stream))
}

impl Workspace {
    fn new(
        cfg: &ModelConfig,
        stream: &Arc<CudaStream>,
        rows: usize,
        logit_rows: usize,
        ints: usize,
    ) -> Result<Self, ModelError> {
        let f = |n: usize| zeros::<f32>(stream, rows * n, "workspace");
        Ok(Workspace {
            rows,
            logit_rows,
            x: f(cfg.dim)?,
            xb: f(cfg.dim)?,
            q: f(cfg.q_dim())?,
            att: f(cfg.q_dim())?,
            k: f(cfg.kv_dim())?,
            v: f(cfg.kv_dim())?,
            gate: f(cfg.ffn_dim)?,
            up: f(cfg.ffn_dim)?,
            act: f(cfg.ffn_dim)?,
            logits: zeros(stream, logit_rows * cfg.vocab_size, "logits")?,
            ints: zeros(stream, ints, "step inputs")?,
        })
    }
}

/// One layer's K and V cache: `(n_blocks + 1) × 16` rows of `kv_dim` f16 (bits).
struct KvLayer {
    k: DeviceBuffer<u16>,
    v: DeviceBuffer<u16>,
}

/// A model on one NVIDIA GPU with its KV cache.
pub struct CudaRuntime {
    cfg: ModelConfig,
    device: DeviceInfo,
    // Graphs first: dropped before the buffers they point into.
    graphs: DecodeGraphs,
    ws: Workspace,
    kv: Vec<KvLayer>,
    weights: GpuWeights,
    kernels: Kernels,
    /// Blocks the scheduler addresses; block `n_blocks` is the scratch block that
    /// dummy rows and table padding point at.
    n_blocks: usize,
    /// Table width of graph steps: every block a sequence of the context length needs.
    graph_max_blocks: usize,
    /// Whether decode steps run as CUDA graphs ([`graphs::DECODE_GRAPHS_ENV`]; the self-check
    /// sets it both ways to check graphs against eager steps).
    decode_graphs: bool,
    host_logits: Vec<f32>,
    /// The last step's `device_greedy` rows' tokens, in batch order.
    device_tokens: Vec<u32>,
    stream: Arc<CudaStream>,
    _ctx: Arc<CudaContext>,
    _file: Arc<GgufFile>,
}

impl CudaRuntime {
    /// Loads `file`'s model onto device 0: checks the device, loads the kernels its
    /// weight types need, sizes the KV cache from the memory left (see [`kv_blocks`])
    /// and uploads the weights.
    pub fn load(file: Arc<GgufFile>, opts: &CudaOptions) -> Result<Self, ModelError> {
        // cudarc panics when the driver lacks a function it calls (an old driver):
        // loading reports that as an error like any other.
        match catch_unwind(AssertUnwindSafe(|| Self::load_inner(file, opts))) {
            Ok(r) => r,
            Err(panic) => Err(ModelError::Runtime(format!(
                "CUDA backend: {}",
                device::panic_message(&*panic)
            ))),
        }
    }

    fn load_inner(file: Arc<GgufFile>, opts: &CudaOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        if cfg.head_dim > MAX_ATTENTION_HEAD_DIM {
            return Err(ModelError::BadHyperparameters(format!(
                "head size {} is larger than the CUDA attention kernels take ({MAX_ATTENTION_HEAD_DIM})",
                cfg.head_dim
            )));
        }
        // The kernels read activations with 16-byte vector loads, and a prompt chunk's
        // Q/attention rows start at `row × q_dim` floats into their buffers.
        if !cfg.q_dim().is_multiple_of(4) || !cfg.kv_dim().is_multiple_of(4) {
            return Err(ModelError::BadHyperparameters(format!(
                "Q width {} and K/V width {} must be multiples of 4 for the CUDA kernels",
                cfg.q_dim(),
                cfg.kv_dim()
            )));
        }
        let (ctx, device) =
            device::open().map_err(|e| ModelError::Runtime(format!("CUDA backend: {e}")))?;
        // SAFETY: all of this runtime's memory is used on its one stream, in order, so
        // cudarc's per-buffer events (which order uses across streams) are not needed;
        // they would also be recorded into captured graphs, which capture forbids.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| ModelError::Runtime(format!("cannot create a CUDA stream: {e}")))?;

        let (matmul_types, embed_type) = weights::matrix_types(&file, &cfg);
        let mut names: Vec<String> = FIXED_KERNELS.iter().map(|s| s.to_string()).collect();
        for ty in matmul_types {
            for kind in MatmulKind::in_use() {
                names.push(kernel_name(kind.prefix(), ty));
            }
        }
        if let Some(ty) = embed_type {
            names.push(kernel_name("get_rows", ty));
        }
        let kernels = Kernels::load(&ctx, device.arch, &names)?;

        let graph_max_blocks = cfg.context_length.div_ceil(BLOCK_SIZE);
        let reserve = workspace_bytes(
            &cfg,
            RESERVED_WORKSPACE_ROWS,
            INITIAL_LOGIT_ROWS,
            ints_for(RESERVED_WORKSPACE_ROWS, graph_max_blocks),
        );
        let n_blocks = kv_blocks(
            device.free_memory,
            opts.gpu_memory_fraction,
            weights::upload_bytes(&file, &cfg),
            reserve,
            kv_bytes_per_block(&cfg),
            opts.kv_cache_tokens,
        )?;
        if let Some(t) = opts.kv_cache_tokens {
            if n_blocks * BLOCK_SIZE < t {
                tracing::warn!(
                    requested = t,
                    fits = n_blocks * BLOCK_SIZE,
                    "the KV cache asked for does not fit in GPU memory; using what fits"
                );
            }
        }

        let weights = GpuWeights::upload(&file, &cfg, &stream)?;
        let per_layer = (n_blocks + 1) * BLOCK_SIZE * cfg.kv_dim();
        let mut kv = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            kv.push(KvLayer {
                k: zeros(&stream, per_layer, "KV cache")?,
                v: zeros(&stream, per_layer, "KV cache")?,
            });
        }
        let ws = Workspace::new(
            &cfg,
            &stream,
            INITIAL_WORKSPACE_ROWS,
            INITIAL_LOGIT_ROWS,
            ints_for(INITIAL_WORKSPACE_ROWS, graph_max_blocks),
        )?;
        stream
            .synchronize()
            .map_err(|e| ModelError::Runtime(format!("uploading the model to the GPU: {e}")))?;
        tracing::info!(
            device = %device.describe(),
            weights_mib = weights.bytes >> 20,
            kv_blocks = n_blocks,
            kv_tokens = n_blocks * BLOCK_SIZE,
            "model loaded on CUDA"
        );
        Ok(CudaRuntime {
            cfg,
            device,
            graphs: DecodeGraphs::default(),
            ws,
            kv,
            weights,
            kernels,
            n_blocks,
            graph_max_blocks,
            decode_graphs: graphs::decode_graphs_enabled(),
            host_logits: Vec::new(),
            device_tokens: Vec::new(),
            stream,
            _ctx: ctx,
            _file: file,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device it runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// Runs `batch` and returns the wanted rows' logits in batch order. Unlike
    /// [`ModelRuntime::step`], whose seam has no error path, a failed step is returned:
    /// the self-check reports it instead of panicking.
    pub(super) fn logits(&mut self, batch: &[SeqChunk<'_>]) -> Result<&[f32], ModelError> {
        let n = self.forward(batch)?;
        Ok(&self.host_logits[..n])
    }

    /// Turns CUDA-graph replay of decode steps on or off, so that the self-check can
    /// run the same steps both ways.
    pub(super) fn set_decode_graphs(&mut self, on: bool) {
        self.decode_graphs = on;
        if !on {
            self.graphs.clear();
        }
    }

    /// Grows the workspace to hold `plan` (dropping the graphs, whose buffers move).
    fn ensure_capacity(&mut self, plan: &StepPlan, logit_rows: usize) -> Result<(), ModelError> {
        // The plan's ints, then one per logit row for the device argmax.
        let ints = plan.ints.len() + logit_rows;
        if plan.n_rows <= self.ws.rows
            && logit_rows <= self.ws.logit_rows
            && ints <= self.ws.ints.len()
        {
            return Ok(());
        }
        self.graphs.clear();
        let rows = self.ws.rows.max(plan.n_rows.next_power_of_two());
        let logit_rows = self.ws.logit_rows.max(logit_rows.next_power_of_two());
        let ints = self
            .ws
            .ints
            .len()
            .max(ints)
            .max(ints_for(rows, self.graph_max_blocks));
        // Free the old buffers before allocating the new ones.
        self.stream
            .synchronize()
            .map_err(|e| ModelError::Runtime(format!("CUDA step: {e}")))?;
        self.ws = Workspace::new(&self.cfg, &self.stream, 1, 1, 1)?;
        self.ws = Workspace::new(&self.cfg, &self.stream, rows, logit_rows, ints)?;
        Ok(())
    }

    /// Runs `batch` and leaves the wanted rows' logits, in batch order, in
    /// `host_logits` (but `device_greedy` rows', whose argmax goes to `device_tokens`);
    /// returns how many floats that is.
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<usize, ModelError> {
        let vocab = self.cfg.vocab_size;
        let graph_bucket = (self.decode_graphs && batch.iter().all(|c| c.tokens.len() == 1))
            .then(|| graphs::bucket_for(batch.len()))
            .flatten();
        let graph_plan = match graph_bucket {
            Some(bucket) => {
                let layout = Layout::Graph {
                    bucket,
                    max_blocks: self.graph_max_blocks,
                };
                plan::plan(batch, layout, self.n_blocks, vocab)?.map(|p| (bucket, p))
            }
            None => None,
        };
        let (bucket, plan) = match graph_plan {
            Some((b, p)) => (Some(b), p),
            None => (
                None,
                plan::plan(batch, Layout::Eager, self.n_blocks, vocab)?.ok_or_else(|| {
                    ModelError::Runtime("an eager step plan always exists".into())
                })?,
            ),
        };
        let m = plan.picked.len();
        // A graph computes logits for all its rows (its sizes are fixed); an eager step
        // for the wanted rows only.
        let logit_rows = bucket.unwrap_or(m);
        self.ensure_capacity(&plan, logit_rows)?;
        if plan.n_rows == 0 {
            return Ok(0);
        }
        let err = |what: &'static str| {
            move |e: cudarc::driver::DriverError| ModelError::Runtime(format!("CUDA {what}: {e}"))
        };
        // One upload of every input the step's kernels read.
        {
            let mut dst = self.ws.ints.slice_mut().slice_mut(..plan.ints.len());
            self.stream
                .memcpy_htod(&plan.ints, &mut dst)
                .map_err(err("upload of the step's inputs"))?;
        }

        match bucket {
            Some(bucket) => {
                if !self.graphs.launch(bucket)? {
                    let mut graphs = std::mem::take(&mut self.graphs);
                    let captured = graphs
                        .capture_and_launch(bucket, &self.stream, || self.record(&plan, false));
                    self.graphs = graphs;
                    captured?;
                }
            }
            None => self.record(&plan, true)?,
        }

        // Wanted row `i` (batch order) holds its logits at this row of the buffer: a
        // graph step computed every row, an eager one gathered the wanted rows.
        let logit_row = |i: usize| if bucket.is_some() { plan.picked[i] } else { i };
        let on_device: Vec<bool> = batch
            .iter()
            .filter(|c| c.want_logits)
            .map(|c| c.device_greedy)
            .collect();
        if on_device.len() != m {
            return Err(ModelError::Runtime(format!(
                "CUDA step: {} rows want logits but the plan picked {m}",
                on_device.len()
            )));
        }
        self.device_tokens.clear();
        if on_device.iter().any(|&d| d) {
            // One argmax over every logit row (a few microseconds), then only the ints
            // cross to the host.
            let out = plan.ints.len();
            let ops = Ops {
                stream: &self.stream,
                kernels: &self.kernels,
            };
            // SAFETY: the logits buffer holds `logit_rows` rows of `vocab` and the ints
            // buffer `plan.ints.len() + logit_rows` ints (`ensure_capacity`).
            unsafe {
                ops.argmax(
                    self.ws.logits.ptr(),
                    self.ws.ints.at(out),
                    vocab,
                    logit_rows,
                )?
            };
            let mut ids = vec![0i32; logit_rows];
            let src = self.ws.ints.slice().slice(out..out + logit_rows);
            self.stream
                .memcpy_dtoh(&src, &mut ids[..])
                .map_err(err("copy of the device-sampled tokens"))?;
            for i in (0..m).filter(|&i| on_device[i]) {
                let id = ids[logit_row(i)];
                self.device_tokens
                    .push(u32::try_from(id).map_err(|_| {
                        ModelError::Runtime(format!("CUDA argmax gave token {id}"))
                    })?);
            }
        }
        // The other rows' logits, in runs of consecutive buffer rows (one copy each).
        let host: Vec<usize> = (0..m).filter(|&i| !on_device[i]).collect();
        self.host_logits.resize(host.len() * vocab, 0.0);
        let mut k = 0;
        while k < host.len() {
            let first = logit_row(host[k]);
            let mut len = 1;
            while k + len < host.len() && logit_row(host[k + len]) == first + len {
                len += 1;
            }
            let src = self
                .ws
                .logits
                .slice()
                .slice(first * vocab..(first + len) * vocab);
            self.stream
                .memcpy_dtoh(&src, &mut self.host_logits[k * vocab..(k + len) * vocab])
                .map_err(err("copy of the logits"))?;
            k += len;
        }
        // The copies are asynchronous in form: wait for them (and report any fault of
        // the step's kernels here, where it can be named).
        self.stream.synchronize().map_err(err("step"))?;
        Ok(host.len() * vocab)
    }

    /// Launches the step's kernels (nothing else: this is what a graph captures).
    /// `gather`: run the LM head on the wanted rows only (eager steps); otherwise on
    /// every row (graph steps, whose sizes must not depend on the batch).
    fn record(&self, plan: &StepPlan, gather: bool) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        let ws = &self.ws;
        let ops = Ops {
            stream: &self.stream,
            kernels: &self.kernels,
        };
        let w = &self.weights;
        let (dim, q_dim, kv_dim, ffn, hd) = (
            cfg.dim,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.head_dim,
        );
        let (n, eps) = (plan.n_rows, cfg.rms_eps);
        let o = plan.offsets;
        let ints = |off: usize| ws.ints.at(off);
        let neox = cfg.rope_style == RopeStyle::Halves;
        let glu = match cfg.ffn_activation {
            FfnActivation::SwiGlu => "swiglu",
            FfnActivation::GeGlu => "geglu",
        };
        let attn = |window: usize| AttnShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };

        // SAFETY (every launch below): the workspace holds `plan.n_rows` rows of each
        // activation (`ensure_capacity`), `logit_rows` rows of logits and the plan's
        // ints; weights have the shapes the config gives (checked at upload); every
        // token id is in the vocabulary, every slot and table entry addresses a block
        // of the cache (`plan` checks them; padding uses the scratch block), and every
        // buffer outlives the launches (the stream is synchronized before any is freed).
        unsafe {
            ops.get_rows(
                w.token_embd.ty,
                w.token_embd.bytes.ptr(),
                ints(o.tokens),
                ws.x.ptr(),
                dim,
                n,
                cfg.embedding_scale.unwrap_or(1.0),
            )?;
            for (l, (lw, kv)) in w.layers.iter().zip(&self.kv).enumerate() {
                ops.rms_norm(ws.x.ptr(), lw.attn_norm.ptr(), ws.xb.ptr(), dim, n, eps)?;
                ops.matmul(&lw.wq, ws.xb.ptr(), ws.q.ptr(), n)?;
                ops.matmul(&lw.wk, ws.xb.ptr(), ws.k.ptr(), n)?;
                ops.matmul(&lw.wv, ws.xb.ptr(), ws.v.ptr(), n)?;
                for (bias, out, width) in [
                    (&lw.bq, &ws.q, q_dim),
                    (&lw.bk, &ws.k, kv_dim),
                    (&lw.bv, &ws.v, kv_dim),
                ] {
                    if let Some(b) = bias {
                        ops.add_bias(out.ptr(), b.ptr(), n, width)?;
                    }
                }
                if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                    ops.rms_norm(ws.q.ptr(), qn.ptr(), ws.q.ptr(), hd, n * cfg.n_heads, eps)?;
                    ops.rms_norm(
                        ws.k.ptr(),
                        kn.ptr(),
                        ws.k.ptr(),
                        hd,
                        n * cfg.n_kv_heads,
                        eps,
                    )?;
                }
                let window = cfg.layer_window(l);
                let (base, freq_scale) = cfg.layer_rope(l);
                // Llama 3.1's frequency factors belong to the global RoPE; local layers
                // (Gemma 3) use plain frequencies, as the CPU's tables do.
                let factors = match (&w.rope_freqs, window) {
                    (Some(f), None) => f.ptr(),
                    _ => 0,
                };
                for (x, heads) in [(&ws.q, cfg.n_heads), (&ws.k, cfg.n_kv_heads)] {
                    ops.rope(
                        x.ptr(),
                        ints(o.pos),
                        n,
                        heads,
                        hd,
                        base,
                        freq_scale,
                        factors,
                        neox,
                    )?;
                }
                // Every chunk's K/V before any attention: a chunk may read blocks
                // another chunk of this batch writes (shared prompt prefixes).
                ops.kv_store(
                    ws.k.ptr(),
                    ws.v.ptr(),
                    kv.k.ptr(),
                    kv.v.ptr(),
                    ints(o.slots),
                    n,
                    kv_dim,
                )?;
                let shape = attn(window.unwrap_or(0));
                if plan.n_decode > 0 {
                    ops.attention_decode(
                        ws.q.ptr(),
                        kv.k.ptr(),
                        kv.v.ptr(),
                        ws.att.ptr(),
                        ints(o.tables),
                        ints(o.ctx_lens),
                        plan.max_blocks,
                        plan.n_decode,
                        shape,
                    )?;
                }
                for run in &plan.prefill {
                    ops.attention_prefill(
                        ws.q.at(run.row * q_dim),
                        kv.k.ptr(),
                        kv.v.ptr(),
                        ws.att.at(run.row * q_dim),
                        ints(o.tables + run.table * plan.max_blocks),
                        run.start_pos,
                        run.n_q,
                        shape,
                    )?;
                }
                ops.matmul(&lw.wo, ws.att.ptr(), ws.xb.ptr(), n)?;
                if let Some(pn) = &lw.post_attn_norm {
                    ops.rms_norm(ws.xb.ptr(), pn.ptr(), ws.xb.ptr(), dim, n, eps)?;
                }
                ops.add(ws.x.ptr(), ws.xb.ptr(), n * dim)?;

                ops.rms_norm(ws.x.ptr(), lw.ffn_norm.ptr(), ws.xb.ptr(), dim, n, eps)?;
                ops.matmul(&lw.w_gate, ws.xb.ptr(), ws.gate.ptr(), n)?;
                ops.matmul(&lw.w_up, ws.xb.ptr(), ws.up.ptr(), n)?;
                ops.glu(glu, ws.gate.ptr(), ws.up.ptr(), ws.act.ptr(), n * ffn)?;
                ops.matmul(&lw.w_down, ws.act.ptr(), ws.xb.ptr(), n)?;
                if let Some(pn) = &lw.post_ffn_norm {
                    ops.rms_norm(ws.xb.ptr(), pn.ptr(), ws.xb.ptr(), dim, n, eps)?;
                }
                ops.add(ws.x.ptr(), ws.xb.ptr(), n * dim)?;
            }

            // The head: the wanted rows gathered (f32 rows are a GGUF f32 matrix), or
            // every row of a graph step.
            let rows = if gather {
                let m = plan.picked.len();
                ops.get_rows(
                    GgmlType::F32,
                    ws.x.ptr(),
                    ints(o.picked),
                    ws.xb.ptr(),
                    dim,
                    m,
                    1.0,
                )?;
                ops.rms_norm(ws.xb.ptr(), w.output_norm.ptr(), ws.xb.ptr(), dim, m, eps)?;
                m
            } else {
                ops.rms_norm(ws.x.ptr(), w.output_norm.ptr(), ws.xb.ptr(), dim, n, eps)?;
                n
            };
            ops.matmul(w.lm_head(), ws.xb.ptr(), ws.logits.ptr(), rows)?;
            if let Some(cap) = cfg.final_logit_softcap {
                ops.softcap(ws.logits.ptr(), rows * cfg.vocab_size, cap)?;
            }
        }
        Ok(())
    }
}

impl ModelRuntime for CudaRuntime {
    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            backend: "cuda",
            device: self.device.describe(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kv: KvStorage::Paged,
            // Plain-greedy rows' tokens are picked by the argmax kernel, so only the
            // other rows' logits cross to the host; every other sampler (penalties,
            // top-k/p, logprobs, masks) runs on the host from the logits.
            device_sampling: true,
            token_mask: false,
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            blocks: self.n_blocks,
            bytes_per_token: kv_bytes_per_block(&self.cfg) / BLOCK_SIZE,
        }
    }

    fn step(&mut self, batch: &[SeqChunk<'_>], sample: &mut dyn FnMut(&[f32], &dyn RowRunner)) {
        match self.forward(batch) {
            Ok(n) => sample(&self.host_logits[..n], &SerialRows),
            // The seam has no error path: a failed step is a failed engine loop. The
            // supervisor catches this panic, fails the requests in flight, calls
            // `reset` and serves again.
            Err(e) => panic!("CUDA step failed: {e}"),
        }
    }

    fn take_device_tokens(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.device_tokens)
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let ws = &self.ws;
        let workspace = 4
            * (ws.x.len()
                + ws.xb.len()
                + ws.q.len()
                + ws.att.len()
                + ws.k.len()
                + ws.v.len()
                + ws.gate.len()
                + ws.up.len()
                + ws.act.len()
                + ws.logits.len()
                + ws.ints.len());
        Some(DeviceMemory {
            weights: self.weights.bytes,
            kv_cache: self.kv.iter().map(|l| 2 * (l.k.len() + l.v.len())).sum(),
            workspace,
        })
    }

    fn reset(&mut self) {
        // A panic mid-capture leaves the stream capturing: end it (and drop whatever
        // was captured) so the stream takes work again.
        if let Ok(status) = self.stream.capture_status() {
            if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                let _ = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
            }
        }
        self.graphs.clear();
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::kv_cache::KvCache;
    use crate::backends::cpu::model::tests::{tiny_llama, tiny_model};

    fn cfg(bytes: Vec<u8>) -> ModelConfig {
        ModelConfig::from_gguf(&GgufFile::from_bytes(bytes).unwrap()).unwrap()
    }

    #[test]
    fn kv_takes_what_the_fraction_leaves_after_weights_and_workspace() {
        let gib = 1usize << 30;
        // 100 GiB free × 0.9 = 90; − 16 weights − 2 workspace = 72 GiB of 2 MiB blocks,
        // less the scratch block.
        let per_block = 2 << 20;
        let blocks = kv_blocks(100 * gib, 0.9, 16 * gib, 2 * gib, per_block, None).unwrap();
        let budget = (100.0 * gib as f64 * 0.9f32 as f64) as usize - 18 * gib;
        assert_eq!(blocks, budget / per_block - 1);
        // A requested size caps it (rounded up to whole blocks) ...
        assert_eq!(
            kv_blocks(100 * gib, 0.9, 16 * gib, 2 * gib, per_block, Some(17)).unwrap(),
            2
        );
        assert_eq!(
            kv_blocks(100 * gib, 0.9, 16 * gib, 2 * gib, per_block, Some(0)).unwrap(),
            1
        );
        // ... but never past what fits.
        assert_eq!(
            kv_blocks(
                100 * gib,
                0.9,
                16 * gib,
                2 * gib,
                per_block,
                Some(usize::MAX / 2)
            )
            .unwrap(),
            blocks
        );
        // No room, or a fraction out of range, is an error that says why.
        let e = kv_blocks(10 * gib, 0.5, 16 * gib, gib, per_block, None).unwrap_err();
        assert!(e.to_string().contains("not enough GPU memory"), "{e}");
        for f in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(
                kv_blocks(100 * gib, f, 0, 0, per_block, None).is_err(),
                "{f}"
            );
        }
        assert!(kv_blocks(100 * gib, 1.0, 0, 0, per_block, None).is_ok());
    }

    #[test]
    fn kv_and_workspace_sizes_follow_the_model_shape() {
        let c = cfg(tiny_llama("llama", None));
        // The same bytes per token as the CPU cache (f16 K and V in every layer).
        assert_eq!(
            kv_bytes_per_block(&c) / BLOCK_SIZE,
            KvCache::bytes_per_token(&c)
        );
        let g = cfg(tiny_model("gemma3", None, 6, Some(5)));
        assert_eq!(kv_bytes_per_block(&g), 2 * 6 * 16 * 256 * 2);
        // llama: dim 256, q 256, kv 128, ffn 512.
        assert_eq!(
            workspace_floats_per_row(&c),
            2 * 256 + 2 * 256 + 2 * 128 + 3 * 512
        );
        assert_eq!(
            workspace_bytes(&c, 10, 2, 7),
            4 * (10 * workspace_floats_per_row(&c) + 2 * 48 + 7)
        );
        assert_eq!(ints_for(4, 3), 4 * 8);
    }

    #[test]
    fn default_options_leave_headroom_and_size_the_cache_from_memory() {
        let o = CudaOptions::default();
        assert_eq!(o.kv_cache_tokens, None);
        assert!(o.gpu_memory_fraction > 0.0 && o.gpu_memory_fraction < 1.0);
    }

    /// Loading fails with an error, not a panic, where there is no GPU (the usual
    /// machine for this test); on a GPU machine the tiny model loads and declares a
    /// paged cache.
    #[test]
    fn loading_without_a_gpu_is_an_error() {
        let file = Arc::new(GgufFile::from_bytes(tiny_llama("llama", None)).unwrap());
        let opts = CudaOptions {
            gpu_memory_fraction: 0.5,
            kv_cache_tokens: Some(64),
        };
        match CudaRuntime::load(file, &opts) {
            Ok(rt) => {
                assert_eq!(rt.info().backend, "cuda");
                assert_eq!(rt.capabilities().kv, KvStorage::Paged);
                assert_eq!(rt.kv_capacity().blocks, 4);
            }
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}
