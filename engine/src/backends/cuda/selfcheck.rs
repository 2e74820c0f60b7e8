//! The CUDA self-check behind `sluice check cuda`: every kernel of ABI.md against a
//! CPU reference on random inputs, then the whole forward pass of every architecture
//! against the CPU runtime's.
//!
//! It lives in the library (not in tests) because the GPU machine has no Rust
//! toolchain: the release binary is all that is carried there, so every GPU
//! correctness check must run from it. It loads the kernels exactly as the runtime does
//! ([`device::open`], [`Kernels::load`]) and launches them through the same wrappers
//! ([`Ops`]), so it checks what the runtime launches.
//!
//! The references are computed in f64 from the very inputs the GPU gets (dequantized
//! weights, f32 activations, f16-rounded K/V), so the tolerances only have to cover
//! f32 rounding on the GPU, not the inputs' own quantization.

use std::fmt::Write as _;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaStream, DeviceRepr, ValidAsZeroBits};
use half::f16;
use serde::Serialize;

use super::device::{self, CudaUnavailable};
use super::launch::{self, to_i32, Arg, MatmulKind};
use super::modules::{Kernels, FIXED_KERNELS};
use super::ops::{AttnShape, Ops};
use super::runtime::{CudaOptions, CudaRuntime};
use super::weights::{kernel_name, DeviceBuffer, GpuMatrix};
use crate::backends::cpu::kv_cache::KvCache;
use crate::backends::cpu::model::{ForwardScratch, Model};
use crate::backends::cpu::thread_pool::ThreadPool;
use crate::backends::{ModelRuntime, SeqChunk};
use crate::block_allocator::BLOCK_SIZE;
use crate::error::ModelError;
use crate::gguf::quant::{dequantize_row, quantize::quantize_row, GgmlType};
use crate::gguf::tiny::{rand_vec, tiny_model};
use crate::gguf::GgufFile;

/// Every weight type the matrix kernels take (ABI.md's `<t>`).
pub const WEIGHT_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::F16,
    GgmlType::F32,
];

/// Matrix products: relative to the row's `Σ|w|·|x|`. The GPU multiplies the same
/// dequantized weights and f32 activations in f32; over K = 512 terms its rounding is
/// ~1e-6 of that scale, so 1e-4 only fails on a wrong product.
pub const MATMUL_TOLERANCE: f64 = 1e-4;
/// Tensor-core products (`mm_tc_<t>`): weights and activations rounded to TF32 (10-bit
/// mantissa), so each product is off by up to ~2·2⁻¹⁰ of itself, hence of `Σ|w|·|x|`.
pub const TENSOR_CORE_TOLERANCE: f64 = 4e-3;
/// Dequantization (`get_rows`): relative to the row's largest weight; only the order of
/// a block's f32 multiplies can differ.
pub const GET_ROWS_TOLERANCE: f64 = 1e-6;
/// Element-wise kernels and norms: relative to `max(|want|, ELEMENTWISE_FLOOR)`
/// (transcendentals in f32 are accurate to a few ulps).
pub const ELEMENTWISE_TOLERANCE: f64 = 1e-5;
/// Values below this are compared absolutely in element-wise checks: near zero a
/// relative error says nothing.
pub const ELEMENTWISE_FLOOR: f64 = 1e-2;
/// RoPE: relative to the rotated pair's length. The angle `pos · θ` is an f32 on the
/// GPU: at position 1000 its rounding is ~1e-4 radians.
pub const ROPE_TOLERANCE: f64 = 1e-3;
/// Attention over the f16 cache: relative to `max(|want|, 1)` (V is uniform in ±1). The
/// reference reads the same f16-rounded K/V, so this covers f32 accumulation only.
pub const ATTENTION_TOLERANCE: f64 = 1e-3;
/// The forward pass against the CPU's, relative to the step's largest logit: the CPU
/// quantizes activations to 8 bits for its dot products (as llama.cpp does), the GPU
/// does not, so they differ by more than rounding.
pub const FORWARD_TOLERANCE: f64 = 0.05;
/// Graph replay against eager steps (the same kernels on the same inputs; only a
/// different batch padding), relative to the step's largest logit.
pub const GRAPH_TOLERANCE: f64 = 1e-4;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    /// What was checked (kernel and shape).
    pub name: String,
    /// The largest `|got − want|`.
    pub max_abs: f64,
    /// The largest `|got − want| / scale` (the scale each check documents).
    pub max_rel: f64,
    /// The bound on `max_rel`.
    pub tolerance: f64,
    /// Whether `max_rel <= tolerance`, every value finite and every length right.
    pub pass: bool,
    /// Why the check could not run (a launch or copy failed), if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CheckRow {
    /// A check that could not run: failed, with the reason.
    pub fn failed(name: impl Into<String>, error: &ModelError) -> Self {
        CheckRow {
            name: name.into(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            tolerance: 0.0,
            pass: false,
            error: Some(error.to_string()),
        }
    }
}

/// What [`run`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelfCheckReport {
    /// The device checked, as [`device::DeviceInfo::describe`] names it.
    pub device: String,
    /// One row per check, in the order run.
    pub checks: Vec<CheckRow>,
}

impl SelfCheckReport {
    /// Whether every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.pass).count()
    }

    /// The checks as an aligned text table: check, max abs, max rel, tolerance, ok.
    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .chain(["check".len()])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>9}  ok",
            "check", "max abs", "max rel", "tolerance"
        );
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:<width$}  {:>10.3e}  {:>10.3e}  {:>9.1e}  {}",
                c.name,
                c.max_abs,
                c.max_rel,
                c.tolerance,
                if c.pass { "ok" } else { "FAIL" }
            );
            if let Some(e) = &c.error {
                let _ = writeln!(out, "    error: {e}");
            }
        }
        out
    }
}

/// Why the self-check could not run at all (a single check's failure is a row of the
/// report instead).
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// No usable GPU or driver.
    #[error("{0}")]
    Unavailable(#[from] CudaUnavailable),
    /// Setting up failed (stream, kernels), or a driver call panicked.
    #[error("{0}")]
    Setup(#[from] ModelError),
}

/// Compares `got` with `want`: element `i`'s error is `|got[i] − want[i]|`, relative to
/// `scale[i]`. Non-finite values and a length mismatch fail with an infinite error.
pub fn compare(
    name: impl Into<String>,
    got: &[f32],
    want: &[f64],
    scale: &[f64],
    tolerance: f64,
) -> CheckRow {
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    if got.len() != want.len() || want.len() != scale.len() {
        max_abs = f64::INFINITY;
        max_rel = f64::INFINITY;
    }
    for ((&g, &w), &s) in got.iter().zip(want).zip(scale) {
        let d = if g.is_finite() && w.is_finite() {
            (f64::from(g) - w).abs()
        } else {
            f64::INFINITY
        };
        max_abs = max_abs.max(d);
        max_rel = max_rel.max(d / s.max(f64::MIN_POSITIVE));
    }
    CheckRow {
        name: name.into(),
        max_abs,
        max_rel,
        tolerance,
        pass: max_rel <= tolerance,
        error: None,
    }
}

/// Per-element scales `max(|want|, floor)`.
pub fn floor_scale(want: &[f64], floor: f64) -> Vec<f64> {
    want.iter().map(|w| w.abs().max(floor)).collect()
}

/// `y[b, n] = Σ_k w[n, k] · x[b, k]` in f64, and each output's scale `Σ_k |w|·|x|`.
pub fn ref_matmul(w: &[f32], x: &[f32], k: usize, n: usize, b: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = Vec::with_capacity(b * n);
    let mut scale = Vec::with_capacity(b * n);
    for xb in x.chunks_exact(k).take(b) {
        for wn in w.chunks_exact(k).take(n) {
            let (mut dot, mut mag) = (0f64, 0f64);
            for (&wi, &xi) in wn.iter().zip(xb) {
                let p = f64::from(wi) * f64::from(xi);
                dot += p;
                mag += p.abs();
            }
            y.push(dot);
            scale.push(mag);
        }
    }
    (y, scale)
}

/// RMSNorm of each row of `n`: `x / sqrt(mean(x²) + eps) · w`.
pub fn ref_rms_norm(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let ss: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = 1.0 / (ss / n as f64 + f64::from(eps)).sqrt();
        y.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| f64::from(v) * inv * f64::from(g)),
        );
    }
    y
}

/// `silu(g) · u`.
pub fn ref_swiglu(g: f32, u: f32) -> f64 {
    let g = f64::from(g);
    g / (1.0 + (-g).exp()) * f64::from(u)
}

/// `gelu_tanh(g) · u` with ggml's constants.
pub fn ref_geglu(g: f32, u: f32) -> f64 {
    let g = f64::from(g);
    let t = ((2.0 / std::f64::consts::PI).sqrt() * g * (1.0 + 0.044715 * g * g)).tanh();
    0.5 * g * (1.0 + t) * f64::from(u)
}

/// RoPE as ABI.md states it, in f64: `x` is `[pos.len()][n_heads][head_dim]`, pair `i`
/// rotates by `pos · freq_scale · base^(−2i/head_dim) / freq_factors[i]`, pairs
/// `(2i, 2i+1)` or (`neox`) `(i, i + head_dim/2)`. Also returns each element's pair
/// length (the rotation keeps it), the scale its error is measured against.
#[allow(clippy::too_many_arguments)]
pub fn ref_rope(
    x: &[f32],
    pos: &[i32],
    n_heads: usize,
    head_dim: usize,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
    neox: bool,
) -> (Vec<f64>, Vec<f64>) {
    let half = head_dim / 2;
    let mut y: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut scale = vec![0f64; x.len()];
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let o = (t * n_heads + h) * head_dim;
            for i in 0..half {
                let ff = freq_factors.map_or(1.0, |f| f64::from(f[i]));
                let theta = f64::from(p)
                    * f64::from(freq_scale)
                    * f64::from(base).powf(-2.0 * i as f64 / head_dim as f64)
                    / ff;
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (y[o + a], y[o + b]);
                let (s, c) = theta.sin_cos();
                y[o + a] = x0 * c - x1 * s;
                y[o + b] = x0 * s + x1 * c;
                let len = x0.hypot(x1);
                scale[o + a] = len;
                scale[o + b] = len;
            }
        }
    }
    (y, scale)
}

/// The cache row ("slot") of position `pos` in a sequence with block table `table`.
pub fn slot(table: &[i32], pos: usize) -> usize {
    table[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
}

/// A host copy of one layer's paged K/V cache, as f32 values of the stored halves:
/// `slots × kv_dim` each.
#[derive(Debug, Clone)]
pub struct HostCache {
    /// Floats per row (`n_kv_heads × head_dim`).
    pub kv_dim: usize,
    /// K rows by slot.
    pub k: Vec<f32>,
    /// V rows by slot.
    pub v: Vec<f32>,
}

impl HostCache {
    /// An all-zero cache of `n_blocks` blocks.
    pub fn new(n_blocks: usize, kv_dim: usize) -> Self {
        let n = n_blocks * BLOCK_SIZE * kv_dim;
        HostCache {
            kv_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Stores a row of K and V at `slot`, rounded to f16 as `kv_store` does; a
    /// negative slot stores nothing.
    pub fn store(&mut self, slot: i32, k: &[f32], v: &[f32]) {
        let Ok(s) = usize::try_from(slot) else {
            return;
        };
        let d = self.kv_dim;
        let round = |x: &f32| f16::from_f32(*x).to_f32();
        for (dst, src) in self.k[s * d..(s + 1) * d].iter_mut().zip(k) {
            *dst = round(src);
        }
        for (dst, src) in self.v[s * d..(s + 1) * d].iter_mut().zip(v) {
            *dst = round(src);
        }
    }
}

/// One query row's attention (`n_heads × head_dim`) over cache `positions` of the
/// sequence with block table `table`, in f64: scores scaled, softmax with max
/// subtraction, GQA head `h` reading KV head `h / (n_heads / n_kv_heads)`. An empty
/// range gives zeros.
pub fn ref_attention(
    q: &[f32],
    cache: &HostCache,
    table: &[i32],
    positions: Range<usize>,
    s: &AttnShape,
) -> Vec<f64> {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads.max(1);
    let mut out = vec![0f64; s.n_heads * hd];
    if positions.is_empty() {
        return out;
    }
    for h in 0..s.n_heads {
        let kvo = (h / group.max(1)) * hd;
        let qh = &q[h * hd..(h + 1) * hd];
        let scores: Vec<f64> = positions
            .clone()
            .map(|p| {
                let row = slot(table, p) * cache.kv_dim + kvo;
                let dot: f64 = qh
                    .iter()
                    .zip(&cache.k[row..row + hd])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                dot * f64::from(s.scale)
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let oh = &mut out[h * hd..(h + 1) * hd];
        for (p, w) in positions.clone().zip(&weights) {
            let row = slot(table, p) * cache.kv_dim + kvo;
            for (o, &v) in oh.iter_mut().zip(&cache.v[row..row + hd]) {
                *o += w / total * f64::from(v);
            }
        }
    }
    out
}

/// The positions a decode query of a sequence of `ctx_len` tokens attends:
/// `max(0, ctx_len − window) .. ctx_len` (window 0: from 0).
pub fn decode_range(ctx_len: usize, window: usize) -> Range<usize> {
    let lo = if window > 0 {
        ctx_len.saturating_sub(window)
    } else {
        0
    };
    lo..ctx_len
}

/// The positions a prefill query at position `p` attends: `max(0, p − window + 1) ..= p`
/// (window 0: from 0).
pub fn prefill_range(p: usize, window: usize) -> Range<usize> {
    let lo = if window > 0 {
        (p + 1).saturating_sub(window)
    } else {
        0
    };
    lo..p + 1
}

/// The first index of each row's maximum.
pub fn ref_argmax(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Runs every check on device 0. Errors only when the device or the kernels cannot be
/// set up at all; each check's failure (wrong values or a failed launch) is a failed
/// row of the report. Never panics: a panicking driver call becomes an error.
pub fn run() -> Result<SelfCheckReport, SelfCheckError> {
    match catch_unwind(AssertUnwindSafe(run_inner)) {
        Ok(r) => r,
        Err(panic) => Err(SelfCheckError::Setup(ModelError::Runtime(format!(
            "CUDA self-check: {}",
            device::panic_message(&*panic)
        )))),
    }
}

fn run_inner() -> Result<SelfCheckReport, SelfCheckError> {
    let (ctx, info) = device::open()?;
    let mut checks = Vec::new();
    {
        // SAFETY: every buffer of the kernel checks is used on this one stream, in
        // order, as in the runtime (which turns tracking off the same way).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| ModelError::Runtime(format!("cannot create a CUDA stream: {e}")))?;
        let kernels = Kernels::load(&ctx, info.arch, &all_kernel_names())?;
        let gpu = Gpu {
            stream: &stream,
            kernels: &kernels,
        };
        kernel_checks(&gpu, &mut checks);
    }
    forward_checks(&mut checks);
    Ok(SelfCheckReport {
        device: info.describe(),
        checks,
    })
}

/// Every kernel of ABI.md: the fixed ones and, for every weight type, the three
/// matrix-product families and the embedding lookup.
fn all_kernel_names() -> Vec<String> {
    let mut names: Vec<String> = FIXED_KERNELS.iter().map(|s| s.to_string()).collect();
    for ty in WEIGHT_TYPES {
        // The tensor-core family too, in use or not: this check is what would clear
        // it for use (launch.rs's `TENSOR_CORES_FROM_BATCH`).
        for kind in [MatmulKind::Mmv, MatmulKind::Mm, MatmulKind::MmTc] {
            names.push(kernel_name(kind.prefix(), ty));
        }
        names.push(kernel_name("get_rows", ty));
    }
    // `get_rows_f32` is also a fixed kernel.
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The stream and kernels of the kernel checks, with copies to and from the device.
struct Gpu<'a> {
    stream: &'a Arc<CudaStream>,
    kernels: &'a Kernels,
}

fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> ModelError {
    move |e| ModelError::Runtime(format!("CUDA {what}: {e}"))
}

impl Gpu<'_> {
    fn ops(&self) -> Ops<'_> {
        Ops {
            stream: self.stream,
            kernels: self.kernels,
        }
    }

    /// A device copy of `data` (which must not be empty).
    fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DeviceBuffer<T>, ModelError> {
        let slice = self.stream.clone_htod(data).map_err(driver_err("upload"))?;
        Ok(DeviceBuffer::new(slice, self.stream))
    }

    /// `n` zeroed elements on the device.
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<DeviceBuffer<T>, ModelError> {
        let slice = self
            .stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(driver_err("allocation"))?;
        Ok(DeviceBuffer::new(slice, self.stream))
    }

    /// The buffer's contents, after everything queued before has run (a kernel fault
    /// surfaces here).
    fn download<T: DeviceRepr>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, ModelError> {
        let v = self
            .stream
            .clone_dtoh(buf.slice())
            .map_err(driver_err("download"))?;
        self.stream.synchronize().map_err(driver_err("kernel"))?;
        Ok(v)
    }
}

/// Runs `f`, turning its error into one failed row named `name`.
fn record(
    checks: &mut Vec<CheckRow>,
    name: &str,
    f: impl FnOnce() -> Result<Vec<CheckRow>, ModelError>,
) {
    match f() {
        Ok(rows) => checks.extend(rows),
        Err(e) => checks.push(CheckRow::failed(name, &e)),
    }
}

fn kernel_checks(gpu: &Gpu<'_>, checks: &mut Vec<CheckRow>) {
    let mut seed = 0x5eed_cafe_u64;
    for ty in WEIGHT_TYPES {
        let name = kernel_name("matmul", ty);
        record(checks, &name, || check_matrix(gpu, ty, 512, 97, &mut seed));
    }
    // f16/f32 rows that are not a multiple of 8 long take the element-wise path.
    for ty in [GgmlType::F16, GgmlType::F32] {
        let name = kernel_name("matmul", ty);
        record(checks, &name, || check_matrix(gpu, ty, 100, 33, &mut seed));
    }
    record(checks, "rms_norm", || check_rms_norm(gpu, &mut seed));
    record(checks, "add", || check_add(gpu, &mut seed));
    record(checks, "swiglu/geglu", || check_glu(gpu, &mut seed));
    record(checks, "softcap", || check_softcap(gpu, &mut seed));
    record(checks, "rope", || check_rope(gpu, &mut seed));
    for (n_heads, n_kv_heads, head_dim) in [(8, 2, 128), (4, 4, 64), (2, 1, 256)] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        };
        record(checks, "kv_store/attention", || {
            check_attention(gpu, shape, &mut seed)
        });
    }
    record(checks, "argmax", || check_argmax(gpu, &mut seed));
}

/// `mmv_<t>` (B = 1, 3, 8), `mm_<t>` and `mm_tc_<t>` (B = 9, 70) and `get_rows_<t>` on
/// one random `n × k` matrix of `ty`.
fn check_matrix(
    gpu: &Gpu<'_>,
    ty: GgmlType,
    k: usize,
    n: usize,
    seed: &mut u64,
) -> Result<Vec<CheckRow>, ModelError> {
    let w = rand_vec(k * n, seed, 1.0);
    let bytes: Vec<u8> = w
        .chunks_exact(k)
        .flat_map(|row| quantize_row(ty, row))
        .collect();
    // The reference multiplies exactly the weights the GPU gets.
    let mut deq = vec![0f32; k * n];
    for (row, out) in bytes
        .chunks_exact(ty.row_bytes(k))
        .zip(deq.chunks_exact_mut(k))
    {
        dequantize_row(ty, row, out);
    }
    let m = GpuMatrix {
        ty,
        cols: k,
        rows: n,
        bytes: gpu.upload(&bytes)?,
    };
    let mut rows = Vec::new();
    for (b, kind) in [
        (1, MatmulKind::Mmv),
        (3, MatmulKind::Mmv),
        (8, MatmulKind::Mmv),
        (9, MatmulKind::Mm),
        (70, MatmulKind::Mm),
        (9, MatmulKind::MmTc),
        (70, MatmulKind::MmTc),
    ] {
        let x = rand_vec(b * k, seed, 1.0);
        let xd = gpu.upload(&x)?;
        let yd = gpu.zeros::<f32>(b * n)?;
        let kernel = kernel_name(kind.prefix(), ty);
        if kind == MatmulKind::for_batch(b) {
            // SAFETY: `xd` holds `b × k` floats and `yd` `b × n`; the matrix `n` rows
            // of `k`.
            unsafe { gpu.ops().matmul(&m, xd.ptr(), yd.ptr(), b)? };
        } else {
            // A family the runtime does not pick for this batch (the tensor-core one
            // while it is off): launched directly, with `mm_`'s geometry (ABI.md).
            let args = [
                Arg::Ptr(m.bytes.ptr()),
                Arg::Ptr(xd.ptr()),
                Arg::Ptr(yd.ptr()),
                Arg::I32(to_i32(k, "K")?),
                Arg::I32(to_i32(n, "N")?),
                Arg::I32(to_i32(b, "B")?),
            ];
            let f = gpu.kernels.get(&kernel)?;
            // SAFETY: as above; the arguments are the matrix kernels' of ABI.md.
            unsafe { launch::launch(gpu.stream, f, &kernel, launch::mm(n, b), &args)? };
        }
        let got = gpu.download(&yd)?;
        let (want, scale) = ref_matmul(&deq, &x, k, n, b);
        let tolerance = if kind == MatmulKind::MmTc {
            TENSOR_CORE_TOLERANCE
        } else {
            MATMUL_TOLERANCE
        };
        rows.push(compare(
            format!("{kernel} K={k} N={n} B={b}"),
            &got,
            &want,
            &scale,
            tolerance,
        ));
    }

    // Repeated, first and last rows, scaled as Gemma's embedding is.
    let ids: Vec<i32> = vec![3, 0, n as i32 - 1, 3, (n / 2) as i32];
    let emb_scale = 1.5f32;
    let idd = gpu.upload(&ids)?;
    let out = gpu.zeros::<f32>(ids.len() * k)?;
    // SAFETY: the matrix holds every row `ids` names (all < n), `idd` holds the ids,
    // `out` `ids.len() × k` floats.
    unsafe {
        gpu.ops().get_rows(
            ty,
            m.bytes.ptr(),
            idd.ptr(),
            out.ptr(),
            k,
            ids.len(),
            emb_scale,
        )?
    };
    let got = gpu.download(&out)?;
    let mut want = Vec::with_capacity(ids.len() * k);
    let mut scale = Vec::with_capacity(ids.len() * k);
    for &id in &ids {
        let row = &deq[id as usize * k..(id as usize + 1) * k];
        let big = row
            .iter()
            .map(|v| f64::from(v.abs()) * f64::from(emb_scale))
            .fold(f64::MIN_POSITIVE, f64::max);
        want.extend(row.iter().map(|&v| f64::from(v) * f64::from(emb_scale)));
        scale.extend(std::iter::repeat_n(big, k));
    }
    rows.push(compare(
        format!("{} K={k} ids={}", kernel_name("get_rows", ty), ids.len()),
        &got,
        &want,
        &scale,
        GET_ROWS_TOLERANCE,
    ));
    Ok(rows)
}

fn check_rms_norm(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let eps = 1e-6f32;
    let mut rows = Vec::new();
    // Whole rows into another buffer, then per head in place (Q/K norms).
    for (n, count, in_place) in [(256usize, 6usize, false), (128, 12, true)] {
        let x = rand_vec(n * count, seed, 2.0);
        let w: Vec<f32> = rand_vec(n, seed, 0.5).iter().map(|v| 1.0 + v).collect();
        let xd = gpu.upload(&x)?;
        let wd = gpu.upload(&w)?;
        let yd = if in_place {
            None
        } else {
            Some(gpu.zeros::<f32>(n * count)?)
        };
        let y_ptr = yd.as_ref().map_or(xd.ptr(), DeviceBuffer::ptr);
        // SAFETY: `xd` and the output hold `count × n` floats, `wd` `n`.
        unsafe {
            gpu.ops()
                .rms_norm(xd.ptr(), wd.ptr(), y_ptr, n, count, eps)?
        };
        let got = gpu.download(yd.as_ref().unwrap_or(&xd))?;
        let want = ref_rms_norm(&x, &w, n, eps);
        rows.push(compare(
            format!(
                "rms_norm n={n} rows={count}{}",
                if in_place { " in place" } else { "" }
            ),
            &got,
            &want,
            &floor_scale(&want, ELEMENTWISE_FLOOR),
            ELEMENTWISE_TOLERANCE,
        ));
    }
    Ok(rows)
}

fn check_add(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let n = 1000;
    let x = rand_vec(n, seed, 3.0);
    let y = rand_vec(n, seed, 3.0);
    let xd = gpu.upload(&x)?;
    let yd = gpu.upload(&y)?;
    // SAFETY: both hold `n` floats.
    unsafe { gpu.ops().add(xd.ptr(), yd.ptr(), n)? };
    let got = gpu.download(&xd)?;
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &b)| f64::from(a + b)).collect();
    let mut rows = vec![compare(
        format!("add n={n}"),
        &got,
        &want,
        &floor_scale(&want, ELEMENTWISE_FLOOR),
        ELEMENTWISE_TOLERANCE,
    )];

    let (count, width) = (3, 300);
    let x = rand_vec(count * width, seed, 3.0);
    let bias = rand_vec(width, seed, 1.0);
    let xd = gpu.upload(&x)?;
    let bd = gpu.upload(&bias)?;
    // SAFETY: `xd` holds `count × width` floats, `bd` `width`.
    unsafe { gpu.ops().add_bias(xd.ptr(), bd.ptr(), count, width)? };
    let got = gpu.download(&xd)?;
    let want: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &a)| f64::from(a + bias[i % width]))
        .collect();
    rows.push(compare(
        format!("add_bias rows={count} n={width}"),
        &got,
        &want,
        &floor_scale(&want, ELEMENTWISE_FLOOR),
        ELEMENTWISE_TOLERANCE,
    ));
    Ok(rows)
}

fn check_glu(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let n = 1000;
    let mut rows = Vec::new();
    for (kernel, f) in [
        ("swiglu", ref_swiglu as fn(f32, f32) -> f64),
        ("geglu", ref_geglu),
    ] {
        let gate = rand_vec(n, seed, 6.0);
        let up = rand_vec(n, seed, 2.0);
        let gd = gpu.upload(&gate)?;
        let ud = gpu.upload(&up)?;
        let od = gpu.zeros::<f32>(n)?;
        // SAFETY: all three hold `n` floats.
        unsafe { gpu.ops().glu(kernel, gd.ptr(), ud.ptr(), od.ptr(), n)? };
        let got = gpu.download(&od)?;
        let want: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| f(g, u)).collect();
        rows.push(compare(
            format!("{kernel} n={n}"),
            &got,
            &want,
            &floor_scale(&want, ELEMENTWISE_FLOOR),
            ELEMENTWISE_TOLERANCE,
        ));
    }
    Ok(rows)
}

fn check_softcap(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let (n, cap) = (1000, 30.0f32);
    let x = rand_vec(n, seed, 100.0);
    let xd = gpu.upload(&x)?;
    // SAFETY: `xd` holds `n` floats.
    unsafe { gpu.ops().softcap(xd.ptr(), n, cap)? };
    let got = gpu.download(&xd)?;
    let c = f64::from(cap);
    let want: Vec<f64> = x.iter().map(|&v| c * (f64::from(v) / c).tanh()).collect();
    Ok(vec![compare(
        format!("softcap n={n} cap={cap}"),
        &got,
        &want,
        &floor_scale(&want, ELEMENTWISE_FLOOR),
        ELEMENTWISE_TOLERANCE,
    )])
}

fn check_rope(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let (n_heads, head_dim) = (3usize, 64usize);
    let pos: Vec<i32> = vec![0, 1, 7, 100, 999];
    let factors: Vec<f32> = rand_vec(head_dim / 2, seed, 1.0)
        .iter()
        .map(|v| 1.0 + 3.5 * (v + 1.0))
        .collect();
    let fd = gpu.upload(&factors)?;
    let pd = gpu.upload(&pos)?;
    let mut rows = Vec::new();
    for (neox, with_factors, base, freq_scale) in [
        (false, false, 10_000.0f32, 1.0f32),
        (false, true, 500_000.0, 0.5),
        (true, false, 1_000_000.0, 0.25),
        (true, true, 10_000.0, 1.0),
    ] {
        let x = rand_vec(pos.len() * n_heads * head_dim, seed, 1.0);
        let xd = gpu.upload(&x)?;
        let ff_ptr = if with_factors { fd.ptr() } else { 0 };
        // SAFETY: `xd` holds `tokens × heads × head_dim` floats, `pd` the positions,
        // `fd` `head_dim / 2` floats.
        unsafe {
            gpu.ops().rope(
                xd.ptr(),
                pd.ptr(),
                pos.len(),
                n_heads,
                head_dim,
                base,
                freq_scale,
                ff_ptr,
                neox,
            )?
        };
        let got = gpu.download(&xd)?;
        let (want, scale) = ref_rope(
            &x,
            &pos,
            n_heads,
            head_dim,
            base,
            freq_scale,
            with_factors.then_some(&factors[..]),
            neox,
        );
        rows.push(compare(
            format!(
                "rope neox={} base={base} freq_scale={freq_scale}{}",
                u8::from(neox),
                if with_factors { " freq_factors" } else { "" }
            ),
            &got,
            &want,
            &scale,
            ROPE_TOLERANCE,
        ));
    }
    Ok(rows)
}

/// A sequence of the attention checks: its block table and length.
struct PagedSeq {
    table: Vec<i32>,
    len: usize,
}

/// `kv_store` of several sequences (non-contiguous tables, a padding token), then
/// `paged_attention_decode` over them and `paged_attention_prefill` of a chunk from
/// `start_pos > 0`, each with and without a sliding window.
fn check_attention(
    gpu: &Gpu<'_>,
    shape: AttnShape,
    seed: &mut u64,
) -> Result<Vec<CheckRow>, ModelError> {
    let n_blocks = 12;
    let kv_dim = shape.n_kv_heads * shape.head_dim;
    let q_dim = shape.n_heads * shape.head_dim;
    let tag = format!(
        "heads={}/{} d={}",
        shape.n_heads, shape.n_kv_heads, shape.head_dim
    );
    // Decode sequences (a three-block non-contiguous table, one full block, one token,
    // an empty one) and the prefill sequence, on disjoint blocks.
    let decode = [
        PagedSeq {
            table: vec![5, 2, 9],
            len: 37,
        },
        PagedSeq {
            table: vec![0],
            len: 16,
        },
        PagedSeq {
            table: vec![7],
            len: 1,
        },
        PagedSeq {
            table: vec![11],
            len: 0,
        },
    ];
    let prefill = PagedSeq {
        table: vec![3, 10, 1],
        len: 40,
    };

    // Every sequence's K/V in one kv_store, with a padding token (slot −1).
    let mut slots = Vec::new();
    for s in decode.iter().chain([&prefill]) {
        for p in 0..s.len {
            slots.push(slot(&s.table, p) as i32);
        }
    }
    slots.insert(slots.len() / 2, -1);
    let n_tokens = slots.len();
    let k = rand_vec(n_tokens * kv_dim, seed, 1.0);
    let v = rand_vec(n_tokens * kv_dim, seed, 1.0);
    let mut host = HostCache::new(n_blocks, kv_dim);
    for (t, &s) in slots.iter().enumerate() {
        host.store(
            s,
            &k[t * kv_dim..(t + 1) * kv_dim],
            &v[t * kv_dim..(t + 1) * kv_dim],
        );
    }
    let cache_len = n_blocks * BLOCK_SIZE * kv_dim;
    let kc = gpu.zeros::<u16>(cache_len)?;
    let vc = gpu.zeros::<u16>(cache_len)?;
    let (kd, vd, sd) = (gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&slots)?);
    // SAFETY: `kd`, `vd` hold `n_tokens × kv_dim` floats, `sd` `n_tokens` slots, each
    // negative or a row of the `n_blocks × 16`-row caches.
    unsafe {
        gpu.ops().kv_store(
            kd.ptr(),
            vd.ptr(),
            kc.ptr(),
            vc.ptr(),
            sd.ptr(),
            n_tokens,
            kv_dim,
        )?
    };
    let halves = |bits: Vec<u16>| -> Vec<f32> {
        bits.into_iter()
            .map(|b| f16::from_bits(b).to_f32())
            .collect()
    };
    let got_k = halves(gpu.download(&kc)?);
    let got_v = halves(gpu.download(&vc)?);
    let want: Vec<f64> = host
        .k
        .iter()
        .chain(&host.v)
        .map(|&x| f64::from(x))
        .collect();
    let got: Vec<f32> = got_k.into_iter().chain(got_v).collect();
    // Exact: rounding to nearest-even half has one right answer, and a padding token
    // or a wrong slot leaves a row that should be zero non-zero.
    let mut rows = vec![compare(
        format!("kv_store {tag} tokens={n_tokens}"),
        &got,
        &want,
        &vec![1.0; want.len()],
        0.0,
    )];

    // Decode: one query per sequence, tables padded with block 4 (unused: any valid
    // block, as the runtime pads with its scratch block).
    let max_blocks = decode.iter().map(|s| s.table.len()).max().unwrap_or(1);
    let mut tables = Vec::new();
    for s in &decode {
        tables.extend(&s.table);
        tables.extend(std::iter::repeat_n(4, max_blocks - s.table.len()));
    }
    let ctx_lens: Vec<i32> = decode.iter().map(|s| s.len as i32).collect();
    let q = rand_vec(decode.len() * q_dim, seed, 3.0);
    let (qd, td, cd) = (
        gpu.upload(&q)?,
        gpu.upload(&tables)?,
        gpu.upload(&ctx_lens)?,
    );
    for window in [0, 20] {
        let s = AttnShape { window, ..shape };
        let od = gpu.zeros::<f32>(decode.len() * q_dim)?;
        // SAFETY: `qd`/`od` hold `B × q_dim` floats, `td` `B × max_blocks` valid
        // blocks, `cd` `B` lengths each covered by its table.
        unsafe {
            gpu.ops().attention_decode(
                qd.ptr(),
                kc.ptr(),
                vc.ptr(),
                od.ptr(),
                td.ptr(),
                cd.ptr(),
                max_blocks,
                decode.len(),
                s,
            )?
        };
        let got = gpu.download(&od)?;
        let mut want = Vec::new();
        for (i, seq) in decode.iter().enumerate() {
            want.extend(ref_attention(
                &q[i * q_dim..(i + 1) * q_dim],
                &host,
                &seq.table,
                decode_range(seq.len, window),
                &s,
            ));
        }
        rows.push(compare(
            format!(
                "paged_attention_decode {tag} B={} window={window}",
                decode.len()
            ),
            &got,
            &want,
            &floor_scale(&want, 1.0),
            ATTENTION_TOLERANCE,
        ));
    }

    // Prefill: a chunk of 19 queries (two query tiles, one partial) from position 21.
    let (start_pos, n_q) = (21usize, prefill.len - 21);
    let q = rand_vec(n_q * q_dim, seed, 3.0);
    let (qd, td) = (gpu.upload(&q)?, gpu.upload(&prefill.table)?);
    for window in [0, 7] {
        let s = AttnShape { window, ..shape };
        let od = gpu.zeros::<f32>(n_q * q_dim)?;
        // SAFETY: `qd`/`od` hold `n_q × q_dim` floats; `td` covers positions up to
        // `start_pos + n_q`, all stored above.
        unsafe {
            gpu.ops().attention_prefill(
                qd.ptr(),
                kc.ptr(),
                vc.ptr(),
                od.ptr(),
                td.ptr(),
                start_pos,
                n_q,
                s,
            )?
        };
        let got = gpu.download(&od)?;
        let mut want = Vec::new();
        for i in 0..n_q {
            want.extend(ref_attention(
                &q[i * q_dim..(i + 1) * q_dim],
                &host,
                &prefill.table,
                prefill_range(start_pos + i, window),
                &s,
            ));
        }
        rows.push(compare(
            format!("paged_attention_prefill {tag} start={start_pos} n_q={n_q} window={window}"),
            &got,
            &want,
            &floor_scale(&want, 1.0),
            ATTENTION_TOLERANCE,
        ));
    }
    Ok(rows)
}

fn check_argmax(gpu: &Gpu<'_>, seed: &mut u64) -> Result<Vec<CheckRow>, ModelError> {
    let vocab = 3000;
    let mut logits = rand_vec(4 * vocab, seed, 10.0);
    // Row 1: the maximum at the last index; row 2: all equal (index 0); row 3: a tie
    // (the first of the two).
    logits[2 * vocab - 1] = 50.0;
    logits[2 * vocab..3 * vocab].fill(1.25);
    logits[3 * vocab + 5] = 50.0;
    logits[3 * vocab + 2000] = 50.0;
    let ld = gpu.upload(&logits)?;
    let od = gpu.zeros::<i32>(4)?;
    let f = gpu.kernels.get("argmax")?;
    // The runtime does not launch argmax yet (sampling is on the host), so there is no
    // wrapper in `ops`: the arguments are ABI.md's.
    let args = [
        Arg::Ptr(ld.ptr()),
        Arg::Ptr(od.ptr()),
        Arg::I32(to_i32(vocab, "vocab")?),
        Arg::I32(4),
    ];
    // SAFETY: `ld` holds 4 rows of `vocab` floats and `od` 4 ints, as the arguments
    // say; the geometry is ABI.md's.
    unsafe { launch::launch(gpu.stream, f, "argmax", launch::argmax(4), &args)? };
    let got: Vec<f32> = gpu.download(&od)?.iter().map(|&i| i as f32).collect();
    let want: Vec<f64> = ref_argmax(&logits, vocab)
        .into_iter()
        .map(|i| i as f64)
        .collect();
    Ok(vec![compare(
        format!("argmax rows=4 vocab={vocab}"),
        &got,
        &want,
        &[1.0; 4],
        0.0,
    )])
}

/// The whole forward pass of every architecture against the CPU's.
fn forward_checks(checks: &mut Vec<CheckRow>) {
    let pool = match ThreadPool::new(2) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            checks.push(CheckRow::failed(
                "forward",
                &ModelError::Threads(e.to_string()),
            ));
            return;
        }
    };
    for (arch, layers, window) in [
        ("llama", 2, None),
        ("qwen2", 2, None),
        ("qwen3", 2, None),
        ("gemma3", 6, Some(5)),
    ] {
        record(checks, &format!("forward {arch}"), || {
            check_forward(arch, layers, window, &pool)
        });
    }
}

/// A batch of two prompts, decode steps of both, then a decode step batched with a
/// third prompt that shares the first's prefix blocks, on the CPU and on the GPU
/// (eager, and decode steps replayed as CUDA graphs).
fn check_forward(
    arch: &str,
    layers: usize,
    window: Option<u32>,
    pool: &Arc<ThreadPool>,
) -> Result<Vec<CheckRow>, ModelError> {
    let file = Arc::new(GgufFile::from_bytes(tiny_model(
        arch, None, layers, window,
    ))?);
    let cpu = Model::from_gguf(file.clone(), pool.clone())?;
    let opts = CudaOptions {
        gpu_memory_fraction: 0.5,
        kv_cache_tokens: Some(8 * BLOCK_SIZE),
    };
    let mut eager = CudaRuntime::load(file.clone(), &opts)?;
    eager.set_decode_graphs(false);
    let mut graphed = CudaRuntime::load(file.clone(), &opts)?;
    graphed.set_decode_graphs(true);
    // Every other wanted row's token picked on the device (`device_greedy`).
    let mut split = CudaRuntime::load(file, &opts)?;
    split.set_decode_graphs(false);
    let mut kv = KvCache::new(&cpu.cfg, 8);
    let mut scratch = ForwardScratch::default();

    let a: Vec<u32> = (0..18).map(|i| (i * 7 + 3) % 48).collect();
    let b: Vec<u32> = vec![9, 11, 30, 1, 2];
    let (ta, tb, tc) = ([0u32, 1, 5], [2u32], [0u32, 3, 4]);
    let c: Vec<u32> = a[..16].iter().chain(&[4, 4, 4]).copied().collect();
    let chunk = |tokens, start_pos, table, decode_from| SeqChunk {
        tokens,
        start_pos,
        block_table: table,
        want_logits: true,
        decode_from,
        device_greedy: false,
    };
    let steps: Vec<Vec<SeqChunk>> = vec![
        vec![chunk(&a, 0, &ta, 18), chunk(&b, 0, &tb, 5)],
        vec![chunk(&[5], 18, &ta, 18), chunk(&[6], 5, &tb, 5)],
        vec![chunk(&[7], 19, &ta, 18), chunk(&[8], 6, &tb, 5)],
        // The third prompt's first block is the first's (computed already); its chunk
        // starts after it.
        vec![chunk(&[9], 20, &ta, 18), chunk(&c[16..], 16, &tc, 19)],
    ];
    let mut rows = Vec::new();
    for (i, batch) in steps.iter().enumerate() {
        let want: Vec<f64> = cpu
            .forward(batch, &mut kv, &mut scratch)
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let got = eager.logits(batch)?.to_vec();
        let replayed = graphed.logits(batch)?.to_vec();
        let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
        rows.push(compare(
            format!("forward {arch} step {i}: cuda vs cpu"),
            &got,
            &want,
            &vec![scale; want.len()],
            FORWARD_TOLERANCE,
        ));
        let eager_logits: Vec<f64> = got.iter().map(|&x| f64::from(x)).collect();
        rows.push(compare(
            format!("forward {arch} step {i}: graph vs eager"),
            &replayed,
            &eager_logits,
            &vec![scale; eager_logits.len()],
            GRAPH_TOLERANCE,
        ));
        rows.extend(check_device_greedy(&mut split, batch, &got, arch, i)?);
    }
    Ok(rows)
}

/// The step again with every other wanted row marked `device_greedy`: those rows' tokens
/// must be the argmax of the eager step's logits (same kernels, same numbers) and the
/// other rows' logits must come back unchanged and in order.
fn check_device_greedy(
    rt: &mut CudaRuntime,
    batch: &[SeqChunk<'_>],
    eager: &[f32],
    arch: &str,
    step: usize,
) -> Result<Vec<CheckRow>, ModelError> {
    let vocab = rt.config().vocab_size;
    let mut wanted = 0;
    let marked: Vec<SeqChunk<'_>> = batch
        .iter()
        .map(|c| {
            let on_device = c.want_logits && {
                wanted += 1;
                wanted % 2 == 1
            };
            SeqChunk {
                device_greedy: on_device,
                ..*c
            }
        })
        .collect();
    let host = rt.logits(&marked)?.to_vec();
    let tokens = rt.take_device_tokens();
    let rows: Vec<&[f32]> = eager.chunks_exact(vocab).collect();
    let want_tokens: Vec<f64> = rows
        .iter()
        .step_by(2)
        .map(|r| ref_argmax(r, vocab)[0] as f64)
        .collect();
    let got_tokens: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
    let want_host: Vec<f64> = rows
        .iter()
        .skip(1)
        .step_by(2)
        .flat_map(|r| r.iter().map(|&x| f64::from(x)))
        .collect();
    Ok(vec![
        compare(
            format!("forward {arch} step {step}: device argmax tokens"),
            &got_tokens,
            &want_tokens,
            &vec![1.0; want_tokens.len()],
            0.0,
        ),
        compare(
            format!("forward {arch} step {step}: host rows beside device rows"),
            &host,
            &want_host,
            &vec![1.0; want_host.len()],
            0.0,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::model::{fill_rope_table, rope};
    use crate::config::RopeStyle;

    fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnShape {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        }
    }

    #[test]
    fn compare_measures_against_the_scale_and_fails_past_the_tolerance() {
        let r = compare("x", &[1.0, 2.5], &[1.0, 2.0], &[1.0, 10.0], 0.05);
        assert_eq!(r.max_abs, 0.5);
        assert_eq!(r.max_rel, 0.05);
        assert!(r.pass);
        let r = compare("x", &[1.0, 2.5], &[1.0, 2.0], &[1.0, 10.0], 0.049);
        assert!(!r.pass);
        // Exact comparisons (tolerance 0) pass only when equal.
        assert!(compare("x", &[3.0], &[3.0], &[1.0], 0.0).pass);
        assert!(!compare("x", &[3.0], &[3.000_001], &[1.0], 0.0).pass);
        // NaN, infinities and a wrong length never pass.
        for got in [f32::NAN, f32::INFINITY] {
            let r = compare("x", &[got], &[1.0], &[1.0], 1e9);
            assert!(!r.pass && r.max_abs.is_infinite(), "{got}");
        }
        assert!(!compare("x", &[1.0], &[1.0, 1.0], &[1.0, 1.0], 1e9).pass);
        // A zero scale is not a division by zero that passes.
        assert!(!compare("x", &[1.0], &[0.5], &[0.0], 1e9).pass);
    }

    #[test]
    fn floor_scale_compares_small_values_absolutely() {
        assert_eq!(
            floor_scale(&[-3.0, 0.001, 0.0], 0.01),
            vec![3.0, 0.01, 0.01]
        );
    }

    #[test]
    fn the_report_passes_only_when_every_check_does_and_prints_aligned() {
        let ok = compare("short", &[1.0], &[1.0], &[1.0], 1e-3);
        let bad = compare("a much longer name", &[2.0], &[1.0], &[1.0], 1e-3);
        let mut report = SelfCheckReport {
            device: "test".into(),
            checks: vec![ok.clone()],
        };
        assert!(report.passed());
        report.checks.push(bad);
        report.checks.push(CheckRow::failed(
            "launch",
            &ModelError::Runtime("boom".into()),
        ));
        assert!(!report.passed());
        assert_eq!(report.failures(), 2);
        assert!(!SelfCheckReport {
            device: "test".into(),
            checks: vec![],
        }
        .passed());
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("check "), "{table}");
        // Columns line up: every row's "ok"/"FAIL" column starts at the header's.
        let col = lines[0].rfind("ok").unwrap();
        for line in &lines[1..4] {
            assert!(
                line[col..].starts_with("ok") || line[col..].starts_with("FAIL"),
                "{table}"
            );
        }
        assert!(lines[2].ends_with("FAIL"));
        assert_eq!(lines[4].trim(), "error: boom");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][0]["name"], "short");
        assert_eq!(json["checks"][1]["pass"], false);
        assert!(json["checks"][0].get("error").is_none());
        assert_eq!(json["checks"][2]["error"], "boom");
    }

    #[test]
    fn reference_matmul_multiplies_rows_and_measures_their_scale() {
        // 2×3 weights, two input rows.
        let w = [1.0, -2.0, 0.5, 0.0, 3.0, -1.0];
        let x = [2.0, 1.0, -4.0, 1.0, 1.0, 1.0];
        let (y, s) = ref_matmul(&w, &x, 3, 2, 2);
        assert_eq!(y, vec![-2.0, 7.0, -0.5, 2.0]);
        assert_eq!(s, vec![6.0, 7.0, 3.5, 4.0]);
    }

    /// The matrix tolerances hold what the GPU's arithmetic allows (f32 accumulation;
    /// TF32 inputs truncated to 10 mantissa bits) and catch a wrong product.
    #[test]
    fn matmul_tolerances_cover_rounding_but_not_mistakes() {
        let (k, n, b) = (512, 16, 3);
        let mut seed = 3;
        let ty = GgmlType::Q4K;
        let w = rand_vec(k * n, &mut seed, 1.0);
        let bytes: Vec<u8> = w
            .chunks_exact(k)
            .flat_map(|r| quantize_row(ty, r))
            .collect();
        let mut deq = vec![0f32; k * n];
        for (row, out) in bytes
            .chunks_exact(ty.row_bytes(k))
            .zip(deq.chunks_exact_mut(k))
        {
            dequantize_row(ty, row, out);
        }
        let x = rand_vec(b * k, &mut seed, 1.0);
        let (want, scale) = ref_matmul(&deq, &x, k, n, b);
        let f32_sum = |w: &[f32], x: &[f32]| -> Vec<f32> {
            let mut y = Vec::new();
            for xb in x.chunks_exact(k) {
                for wn in w.chunks_exact(k) {
                    y.push(wn.iter().zip(xb).fold(0f32, |acc, (a, c)| acc + a * c));
                }
            }
            y
        };
        let r = compare("f32", &f32_sum(&deq, &x), &want, &scale, MATMUL_TOLERANCE);
        assert!(r.pass && r.max_rel < MATMUL_TOLERANCE / 10.0, "{r:?}");
        let tf32 = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|a| f32::from_bits(a.to_bits() & !((1 << 13) - 1)))
                .collect()
        };
        let tc = f32_sum(&tf32(&deq), &tf32(&x));
        let r = compare("tc", &tc, &want, &scale, TENSOR_CORE_TOLERANCE);
        assert!(r.pass && r.max_rel > 0.0, "{r:?}");
        // One block's weights read with a wrong scale (doubled) is a failure.
        let mut wrong = deq.clone();
        wrong[256..512].iter_mut().for_each(|v| *v *= 2.0);
        let bad = f32_sum(&wrong, &x);
        assert!(!compare("bad", &bad, &want, &scale, TENSOR_CORE_TOLERANCE).pass);
    }

    #[test]
    fn every_kernel_of_the_abi_is_loaded() {
        let names = all_kernel_names();
        for t in [
            "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "f32",
        ] {
            for p in ["mmv", "mm", "mm_tc", "get_rows"] {
                assert!(names.contains(&format!("{p}_{t}")), "{p}_{t}");
            }
        }
        for k in FIXED_KERNELS {
            assert!(names.contains(&k.to_string()), "{k}");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    /// The reference RoPE agrees with the CPU model's (which matches llama.cpp), for
    /// both pair layouts, with frequency factors and position scaling.
    #[test]
    fn reference_rope_matches_the_cpu_models() {
        let (n_heads, hd) = (2, 16);
        let pos = [0i32, 3, 17, 120];
        let mut seed = 7;
        let x = rand_vec(pos.len() * n_heads * hd, &mut seed, 1.0);
        let factors: Vec<f32> = (0..hd / 2).map(|i| 1.0 + i as f32 * 0.5).collect();
        for (style, neox) in [(RopeStyle::Interleaved, false), (RopeStyle::Halves, true)] {
            for (ff, scale) in [(None, 1.0f32), (Some(&factors[..]), 0.25)] {
                let tok_pos: Vec<usize> = pos.iter().map(|&p| p as usize).collect();
                let (mut cos, mut sin) = (Vec::new(), Vec::new());
                fill_rope_table(&tok_pos, hd, 10_000.0, scale, ff, &mut cos, &mut sin);
                let mut cpu = x.clone();
                for (t, token) in cpu.chunks_exact_mut(n_heads * hd).enumerate() {
                    let half = hd / 2;
                    for head in token.chunks_exact_mut(hd) {
                        rope(
                            head,
                            &cos[t * half..(t + 1) * half],
                            &sin[t * half..(t + 1) * half],
                            style,
                        );
                    }
                }
                let (want, lens) = ref_rope(&x, &pos, n_heads, hd, 10_000.0, scale, ff, neox);
                let r = compare("rope", &cpu, &want, &lens, 1e-5);
                assert!(r.pass, "{style:?} {ff:?}: {r:?}");
                // Position 0 is the identity; lengths are the pairs' norms.
                for i in 0..n_heads * hd {
                    assert!((want[i] - f64::from(x[i])).abs() < 1e-12);
                }
                assert!(lens.iter().all(|&l| l > 0.0));
            }
            // The other pair layout is a different rotation (a check that could not
            // tell them apart would be useless).
            let (other, lens) = ref_rope(&x, &pos, n_heads, hd, 10_000.0, 1.0, None, !neox);
            let (this, _) = ref_rope(&x, &pos, n_heads, hd, 10_000.0, 1.0, None, neox);
            let this: Vec<f32> = this.iter().map(|&v| v as f32).collect();
            assert!(!compare("rope", &this, &other, &lens, ROPE_TOLERANCE).pass);
        }
    }

    /// Naive attention over contiguous K/V (softmax without max subtraction, in f64),
    /// for checking the paged reference.
    fn naive(
        q: &[f32],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        positions: Range<usize>,
        s: &AttnShape,
    ) -> Vec<f64> {
        let hd = s.head_dim;
        let mut out = vec![0f64; s.n_heads * hd];
        for h in 0..s.n_heads {
            let kvh = h * s.n_kv_heads / s.n_heads;
            let mut num = vec![0f64; hd];
            let mut den = 0f64;
            for p in positions.clone() {
                let mut dot = 0f64;
                for d in 0..hd {
                    dot += f64::from(q[h * hd + d]) * f64::from(k[p][kvh * hd + d]);
                }
                let e = (dot * f64::from(s.scale)).exp();
                den += e;
                for d in 0..hd {
                    num[d] += e * f64::from(v[p][kvh * hd + d]);
                }
            }
            for d in 0..hd {
                out[h * hd + d] = if den > 0.0 { num[d] / den } else { 0.0 };
            }
        }
        out
    }

    #[test]
    fn reference_attention_matches_the_naive_formula_on_a_scattered_table() {
        let s = shape(4, 2, 8);
        let kv_dim = 16;
        let table = [3i32, 0, 2];
        let len = 40;
        let mut seed = 11;
        let mut cache = HostCache::new(4, kv_dim);
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for p in 0..len {
            let k = rand_vec(kv_dim, &mut seed, 1.0);
            let v = rand_vec(kv_dim, &mut seed, 1.0);
            cache.store(slot(&table, p) as i32, &k, &v);
            let round = |x: &Vec<f32>| -> Vec<f32> {
                x.iter().map(|&a| f16::from_f32(a).to_f32()).collect()
            };
            ks.push(round(&k));
            vs.push(round(&v));
        }
        let q = rand_vec(s.n_heads * s.head_dim, &mut seed, 2.0);
        for window in [0, 1, 5, 16, 100] {
            let want = naive(&q, &ks, &vs, decode_range(len, window), &s);
            let got = ref_attention(&q, &cache, &table, decode_range(len, window), &s);
            let got32: Vec<f32> = got.iter().map(|&x| x as f32).collect();
            let r = compare("attn", &got32, &want, &floor_scale(&want, 1.0), 1e-6);
            assert!(r.pass, "window {window}: {r:?}");
            // A decode query at `len` sees what a prefill query at `len − 1` does.
            let pre = ref_attention(&q, &cache, &table, prefill_range(len - 1, window), &s);
            assert_eq!(pre, got, "window {window}");
        }
        // Grouped heads read their own KV head: heads 0, 1 share one, 2, 3 the other.
        let out = ref_attention(&q, &cache, &table, 0..1, &s);
        assert_eq!(
            &out[..8],
            &vs[0][..8].iter().map(|&x| f64::from(x)).collect::<Vec<_>>()[..]
        );
        assert_eq!(
            &out[16..24],
            &vs[0][8..].iter().map(|&x| f64::from(x)).collect::<Vec<_>>()[..]
        );
        // An empty range is zeros, as the kernel gives a sequence of length 0.
        assert!(ref_attention(&q, &cache, &table, 0..0, &s)
            .iter()
            .all(|&x| x == 0.0));
    }

    #[test]
    fn windows_and_slots_follow_the_abi() {
        assert_eq!(decode_range(37, 0), 0..37);
        assert_eq!(decode_range(37, 20), 17..37);
        assert_eq!(decode_range(3, 20), 0..3);
        assert_eq!(decode_range(0, 5), 0..0);
        assert_eq!(prefill_range(21, 0), 0..22);
        assert_eq!(prefill_range(21, 7), 15..22);
        assert_eq!(prefill_range(2, 7), 0..3);
        let table = [5, 2, 9];
        assert_eq!(slot(&table, 0), 80);
        assert_eq!(slot(&table, 17), 33);
        assert_eq!(slot(&table, 36), 148);
    }

    #[test]
    fn the_host_cache_rounds_to_half_and_skips_padding() {
        let mut c = HostCache::new(1, 2);
        c.store(3, &[1.0 / 3.0, 70_000.0], &[-2.0, 1e-8]);
        c.store(-1, &[9.0, 9.0], &[9.0, 9.0]);
        assert_eq!(c.k[6], f16::from_f32(1.0 / 3.0).to_f32());
        assert_ne!(c.k[6], 1.0 / 3.0);
        assert!(c.k[7].is_infinite());
        assert_eq!(c.v[6..8], [-2.0, 0.0]);
        assert_eq!(c.k.iter().filter(|&&x| x != 0.0).count(), 2);
    }

    #[test]
    fn reference_activations_match_their_formulas() {
        assert!((ref_swiglu(0.0, 3.0)).abs() < 1e-15);
        assert!((ref_swiglu(20.0, 1.0) - 20.0).abs() < 1e-6);
        assert!((ref_swiglu(-1.0, 2.0) - 2.0 * (-1.0 / (1.0 + 1f64.exp()))).abs() < 1e-12);
        // gelu_tanh(1) = 0.841192 (ggml's table value).
        assert!((ref_geglu(1.0, 1.0) - 0.841_192).abs() < 1e-5);
        assert!((ref_geglu(-10.0, 1.0)).abs() < 1e-6);
        let rms = ref_rms_norm(&[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let inv = 1.0 / 12.5f64.sqrt();
        assert_eq!(rms, vec![3.0 * inv, 8.0 * inv]);
    }

    #[test]
    fn reference_argmax_takes_the_first_maximum() {
        let logits = [
            1.0, 5.0, 5.0, 0.0, 2.0, 2.0, 2.0, 2.0, -1.0, -3.0, -2.0, -0.5,
        ];
        assert_eq!(ref_argmax(&logits, 4), vec![1, 0, 3]);
    }

    /// Without a GPU (the usual machine for unit tests) the self-check is an error
    /// that says what is missing, never a panic; on a GPU it runs every check.
    #[test]
    fn without_a_gpu_the_self_check_is_an_error() {
        match run() {
            Err(SelfCheckError::Unavailable(e)) => assert!(!e.to_string().contains('\n')),
            Err(e) => panic!("a GPU was found but the self-check could not run: {e}"),
            Ok(report) => {
                assert!(report.checks.len() > 80, "{}", report.table());
                assert!(report.passed(), "{}", report.table());
            }
        }
    }
}
