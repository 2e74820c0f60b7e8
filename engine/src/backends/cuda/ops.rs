//! One typed wrapper per kernel of ABI.md: argument order, `int` conversions, the
//! kernel-name choice (matmul family and weight type) and the launch geometry, so the
//! forward pass reads as the CPU one does.
//!
//! Pointers are device addresses (`u64`). Every wrapper is `unsafe`: it cannot check
//! that they address buffers as large as the sizes it is given.

use cudarc::driver::CudaStream;

use super::launch::{self, to_i32, Arg, MatmulKind};
use super::modules::Kernels;
use super::weights::{kernel_name, GpuMatrix};
use crate::error::ModelError;
use crate::gguf::quant::GgmlType;

/// Launches kernels on one stream.
pub struct Ops<'a> {
    /// The stream every launch goes to (in order).
    pub stream: &'a CudaStream,
    /// The loaded kernels.
    pub kernels: &'a Kernels,
}

/// Attention parameters shared by both attention kernels.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// K/V heads.
    pub n_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Score scale (1/√head_dim).
    pub scale: f32,
    /// Sliding window in positions; 0 for none.
    pub window: usize,
}

impl Ops<'_> {
    unsafe fn go(
        &self,
        name: &str,
        geometry: launch::Geometry,
        args: &[Arg],
    ) -> Result<(), ModelError> {
        let f = self.kernels.get(name)?;
        // SAFETY: forwarded from the caller's contract (see each wrapper).
        unsafe { launch::launch(self.stream, f, name, geometry, args) }
    }

    /// `y[b, n] = W[n, :] · x[b, :]` for `b` rows.
    ///
    /// # Safety
    /// `x` holds `b × w.cols` floats and `y` `b × w.rows`.
    pub unsafe fn matmul(&self, w: &GpuMatrix, x: u64, y: u64, b: usize) -> Result<(), ModelError> {
        if b == 0 {
            return Ok(());
        }
        let kind = MatmulKind::for_batch(b);
        let args = [
            Arg::Ptr(w.bytes.ptr()),
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::I32(to_i32(w.cols, "K")?),
            Arg::I32(to_i32(w.rows, "N")?),
            Arg::I32(to_i32(b, "B")?),
        ];
        let name = kernel_name(kind.prefix(), w.ty);
        // SAFETY: the weights hold `rows` rows of `cols` (checked at upload); the caller
        // vouches for `x` and `y`.
        unsafe { self.go(&name, launch::matmul(w.rows, b), &args) }
    }

    /// `out[i, :] = W[ids[i], :] * scale` for a matrix of `k` columns in `ty`'s layout.
    ///
    /// # Safety
    /// `w` holds every row `ids` names, `ids` holds `n_ids` ints, `out` `n_ids × k` floats.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn get_rows(
        &self,
        ty: GgmlType,
        w: u64,
        ids: u64,
        out: u64,
        k: usize,
        n_ids: usize,
        scale: f32,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(w),
            Arg::Ptr(ids),
            Arg::Ptr(out),
            Arg::I32(to_i32(k, "K")?),
            Arg::I32(to_i32(n_ids, "rows")?),
            Arg::F32(scale),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go(&kernel_name("get_rows", ty), launch::get_rows(n_ids), &args) }
    }

    /// RMSNorm of `rows` rows of `n` (`y` may be `x`).
    ///
    /// # Safety
    /// `x` and `y` hold `rows × n` floats, `w` `n`.
    pub unsafe fn rms_norm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        n: usize,
        rows: usize,
        eps: f32,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(w),
            Arg::Ptr(y),
            Arg::I32(to_i32(n, "n")?),
            Arg::I32(to_i32(rows, "rows")?),
            Arg::F32(eps),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go("rms_norm", launch::rms_norm(rows), &args) }
    }

    /// `x += y` over `n` floats.
    ///
    /// # Safety
    /// `x` and `y` hold `n` floats.
    pub unsafe fn add(&self, x: u64, y: u64, n: usize) -> Result<(), ModelError> {
        let args = [Arg::Ptr(x), Arg::Ptr(y), Arg::I32(to_i32(n, "n")?)];
        // SAFETY: the caller's contract.
        unsafe { self.go("add", launch::elementwise(n), &args) }
    }

    /// Adds `bias` (`n`) to each of `rows` rows of `x`.
    ///
    /// # Safety
    /// `x` holds `rows × n` floats, `bias` `n`.
    pub unsafe fn add_bias(
        &self,
        x: u64,
        bias: u64,
        rows: usize,
        n: usize,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(bias),
            Arg::I32(to_i32(rows, "rows")?),
            Arg::I32(to_i32(n, "n")?),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go("add_bias", launch::add_bias(rows, n), &args) }
    }

    /// `out = act(gate) * up` over `n` floats; `kernel` is `swiglu` or `geglu`.
    ///
    /// # Safety
    /// `gate`, `up` and `out` hold `n` floats.
    pub unsafe fn glu(
        &self,
        kernel: &str,
        gate: u64,
        up: u64,
        out: u64,
        n: usize,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(gate),
            Arg::Ptr(up),
            Arg::Ptr(out),
            Arg::I32(to_i32(n, "n")?),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go(kernel, launch::elementwise(n), &args) }
    }

    /// `x = cap · tanh(x / cap)` over `n` floats.
    ///
    /// # Safety
    /// `x` holds `n` floats.
    pub unsafe fn softcap(&self, x: u64, n: usize, cap: f32) -> Result<(), ModelError> {
        let args = [Arg::Ptr(x), Arg::I32(to_i32(n, "n")?), Arg::F32(cap)];
        // SAFETY: the caller's contract.
        unsafe { self.go("softcap", launch::elementwise(n), &args) }
    }

    /// `out[r]` = the first index of row `r`'s maximum, for `rows` rows of `vocab`.
    ///
    /// # Safety
    /// `logits` holds `rows × vocab` floats and `out` `rows` ints.
    pub unsafe fn argmax(
        &self,
        logits: u64,
        out: u64,
        vocab: usize,
        rows: usize,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(logits),
            Arg::Ptr(out),
            Arg::I32(to_i32(vocab, "vocab")?),
            Arg::I32(to_i32(rows, "rows")?),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go("argmax", launch::argmax(rows), &args) }
    }

    /// RoPE in place on `[n_tokens][n_heads][head_dim]`, rotating whole heads.
    ///
    /// # Safety
    /// `x` holds `n_tokens × n_heads × head_dim` floats, `pos` `n_tokens` ints,
    /// `freq_factors` (0 for none) `head_dim / 2` floats.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope(
        &self,
        x: u64,
        pos: u64,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        theta_base: f32,
        freq_scale: f32,
        freq_factors: u64,
        neox: bool,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(pos),
            Arg::I32(to_i32(n_tokens, "tokens")?),
            Arg::I32(to_i32(n_heads, "heads")?),
            Arg::I32(to_i32(head_dim, "head_dim")?),
            // Partial rotation is refused by the config: every head rotates whole.
            Arg::I32(to_i32(head_dim, "rot_dim")?),
            Arg::F32(theta_base),
            Arg::F32(freq_scale),
            Arg::Ptr(freq_factors),
            Arg::I32(i32::from(neox)),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go("rope", launch::rope(n_tokens, n_heads, head_dim), &args) }
    }

    /// Stores `n_tokens` rows of K and V (f32, `kv_dim` each) into the f16 caches at
    /// `slots`.
    ///
    /// # Safety
    /// `k`, `v` hold `n_tokens × kv_dim` floats, `slots` `n_tokens` ints, each slot a
    /// row of `kc` and `vc`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kv_store(
        &self,
        k: u64,
        v: u64,
        kc: u64,
        vc: u64,
        slots: u64,
        n_tokens: usize,
        kv_dim: usize,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(slots),
            Arg::I32(to_i32(n_tokens, "tokens")?),
            Arg::I32(to_i32(kv_dim, "kv_dim")?),
        ];
        // SAFETY: the caller's contract.
        unsafe { self.go("kv_store", launch::kv_store(n_tokens), &args) }
    }

    /// Decode attention of `b` sequences, one query each.
    ///
    /// # Safety
    /// `q`, `out` hold `b × n_heads × head_dim` floats, `tables` `b × max_blocks` ints
    /// naming blocks of the caches, `ctx_lens` `b` ints each covered by its table.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_decode(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        out: u64,
        tables: u64,
        ctx_lens: u64,
        max_blocks: usize,
        b: usize,
        s: AttnShape,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(q),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(out),
            Arg::Ptr(tables),
            Arg::Ptr(ctx_lens),
            Arg::I32(to_i32(max_blocks, "max_blocks")?),
            Arg::I32(to_i32(s.n_heads, "heads")?),
            Arg::I32(to_i32(s.n_kv_heads, "kv heads")?),
            Arg::I32(to_i32(s.head_dim, "head_dim")?),
            Arg::F32(s.scale),
            Arg::I32(to_i32(s.window, "window")?),
            // No model we run caps attention scores (Gemma 2 did; Gemma 3 does not).
            Arg::F32(0.0),
        ];
        // SAFETY: the caller's contract.
        unsafe {
            self.go(
                "paged_attention_decode",
                launch::attention_decode(s.n_heads, b),
                &args,
            )
        }
    }

    /// Causal attention of one sequence's `n_q` queries from `start_pos`.
    ///
    /// # Safety
    /// `q`, `out` hold `n_q × n_heads × head_dim` floats, `table` covers positions up to
    /// `start_pos + n_q` with blocks of the caches, all of them already stored.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_prefill(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        out: u64,
        table: u64,
        start_pos: usize,
        n_q: usize,
        s: AttnShape,
    ) -> Result<(), ModelError> {
        let args = [
            Arg::Ptr(q),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(out),
            Arg::Ptr(table),
            Arg::I32(to_i32(start_pos, "start_pos")?),
            Arg::I32(to_i32(n_q, "queries")?),
            Arg::I32(to_i32(s.n_heads, "heads")?),
            Arg::I32(to_i32(s.n_kv_heads, "kv heads")?),
            Arg::I32(to_i32(s.head_dim, "head_dim")?),
            Arg::F32(s.scale),
            Arg::I32(to_i32(s.window, "window")?),
            Arg::F32(0.0),
        ];
        // SAFETY: the caller's contract.
        unsafe {
            self.go(
                "paged_attention_prefill",
                launch::attention_prefill(n_q, s.n_heads),
                &args,
            )
        }
    }
}
