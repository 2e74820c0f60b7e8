//! The tensors of a Llama-family model (llama, mistral, qwen2, qwen3, gemma3), by GGUF
//! name and shape, in one place. Each runtime loads them its own way (the CPU runtime
//! into packed host matrices, the CUDA runtime into GPU buffers) through a
//! [`TensorSource`], so which tensors an architecture needs, and which it may lack, is
//! written once.

use crate::config::ModelConfig;
use crate::error::ModelError;

/// One transformer block's tensors: `M` for matrices, `V` for vectors.
pub struct Layer<M, V> {
    /// RMSNorm weights before attention.
    pub attn_norm: V,
    /// Q projection.
    pub wq: M,
    /// K projection.
    pub wk: M,
    /// V projection.
    pub wv: M,
    /// Q bias (Qwen2).
    pub bq: Option<V>,
    /// K bias (Qwen2).
    pub bk: Option<V>,
    /// V bias (Qwen2).
    pub bv: Option<V>,
    /// Per-head RMSNorm weights of Q (`head_dim`; Qwen3, Gemma 3).
    pub q_norm: Option<V>,
    /// Per-head RMSNorm weights of K (`head_dim`; Qwen3, Gemma 3).
    pub k_norm: Option<V>,
    /// Attention output projection.
    pub wo: M,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    pub post_attn_norm: Option<V>,
    /// RMSNorm weights before the FFN.
    pub ffn_norm: V,
    /// RMSNorm of the FFN output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<V>,
    /// FFN gate projection.
    pub w_gate: M,
    /// FFN up projection.
    pub w_up: M,
    /// FFN down projection.
    pub w_down: M,
}

/// Every tensor of a model.
pub struct Tensors<M, V> {
    /// Token embedding.
    pub token_embd: M,
    /// The LM head; `None` when the model ties it to the embedding.
    pub output: Option<M>,
    /// Final RMSNorm weights.
    pub output_norm: V,
    /// Llama 3.1 style per-frequency RoPE divisors.
    pub rope_freqs: Option<V>,
    /// The blocks.
    pub layers: Vec<Layer<M, V>>,
}

/// Makes tensors from a model file (checking presence and shape, naming what is wrong).
pub trait TensorSource {
    /// A matrix as the runtime holds it.
    type Matrix;
    /// A vector as the runtime holds it.
    type Vector;
    /// The matrix `name` of `cols` columns (input size) and `rows` rows.
    fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<Self::Matrix, ModelError>;
    /// The vector `name` of `len` values.
    fn vector(&mut self, name: &str, len: usize) -> Result<Self::Vector, ModelError>;
    /// Whether the file has `name` (for tensors a model may lack).
    fn has(&self, name: &str) -> bool;

    /// The matrix `name` when the file has it.
    fn optional_matrix(
        &mut self,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Option<Self::Matrix>, ModelError> {
        if self.has(name) {
            self.matrix(name, cols, rows).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The vector `name` when the file has it.
    fn optional_vector(
        &mut self,
        name: &str,
        len: usize,
    ) -> Result<Option<Self::Vector>, ModelError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Loads every tensor `cfg`'s architecture reads from `src`. Tensors the architecture
/// needs are required (a file without them is refused by name rather than run
/// wrongly); biases, the LM head and RoPE divisors are optional.
pub fn load<S: TensorSource>(
    cfg: &ModelConfig,
    src: &mut S,
) -> Result<Tensors<S::Matrix, S::Vector>, ModelError> {
    let (d, kv, ff, v) = (cfg.dim, cfg.kv_dim(), cfg.ffn_dim, cfg.vocab_size);
    let (qd, hd) = (cfg.q_dim(), cfg.head_dim);
    let needed = |src: &mut S, name: &str, len: usize, on: bool| {
        if on {
            src.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    };
    let token_embd = src.matrix("token_embd.weight", d, v)?;
    let output = src.optional_matrix("output.weight", d, v)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        layers.push(Layer {
            attn_norm: src.vector(&n("attn_norm.weight"), d)?,
            wq: src.matrix(&n("attn_q.weight"), d, qd)?,
            wk: src.matrix(&n("attn_k.weight"), d, kv)?,
            wv: src.matrix(&n("attn_v.weight"), d, kv)?,
            bq: src.optional_vector(&n("attn_q.bias"), qd)?,
            bk: src.optional_vector(&n("attn_k.bias"), kv)?,
            bv: src.optional_vector(&n("attn_v.bias"), kv)?,
            q_norm: needed(src, &n("attn_q_norm.weight"), hd, cfg.qk_norm)?,
            k_norm: needed(src, &n("attn_k_norm.weight"), hd, cfg.qk_norm)?,
            wo: src.matrix(&n("attn_output.weight"), qd, d)?,
            post_attn_norm: needed(src, &n("post_attention_norm.weight"), d, cfg.post_norms)?,
            ffn_norm: src.vector(&n("ffn_norm.weight"), d)?,
            post_ffn_norm: needed(src, &n("post_ffw_norm.weight"), d, cfg.post_norms)?,
            w_gate: src.matrix(&n("ffn_gate.weight"), d, ff)?,
            w_up: src.matrix(&n("ffn_up.weight"), d, ff)?,
            w_down: src.matrix(&n("ffn_down.weight"), ff, d)?,
        });
    }
    let output_norm = src.vector("output_norm.weight", d)?;
    let rope_freqs = src.optional_vector("rope_freqs.weight", hd / 2)?;
    Ok(Tensors {
        token_embd,
        output,
        output_norm,
        rope_freqs,
        layers,
    })
}

/// What a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorUse {
    /// A matrix of `cols` columns (input size) and `rows` rows.
    Matrix {
        /// Columns (GGUF `ne0`).
        cols: usize,
        /// Rows.
        rows: usize,
    },
    /// A vector.
    Vector {
        /// Elements.
        len: usize,
    },
}

/// One tensor a model reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its GGUF name.
    pub name: String,
    /// Its shape.
    pub usage: TensorUse,
    /// Whether the model runs without it (biases, `output.weight`, `rope_freqs`).
    pub optional: bool,
}

/// Every tensor `cfg`'s architecture reads, in [`load`]'s order (for sizing a runtime's
/// memory and choosing its kernels before anything is loaded).
pub fn specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    /// A source that makes nothing and writes down what it was asked for.
    struct Specs(Vec<TensorSpec>);
    impl TensorSource for Specs {
        type Matrix = ();
        type Vector = ();
        fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<(), ModelError> {
            self.0.push(TensorSpec {
                name: name.into(),
                usage: TensorUse::Matrix { cols, rows },
                optional: false,
            });
            Ok(())
        }
        fn vector(&mut self, name: &str, len: usize) -> Result<(), ModelError> {
            self.0.push(TensorSpec {
                name: name.into(),
                usage: TensorUse::Vector { len },
                optional: false,
            });
            Ok(())
        }
        fn has(&self, _: &str) -> bool {
            true
        }
        fn optional_matrix(
            &mut self,
            name: &str,
            cols: usize,
            rows: usize,
        ) -> Result<Option<()>, ModelError> {
            self.matrix(name, cols, rows)?;
            if let Some(s) = self.0.last_mut() {
                s.optional = true;
            }
            Ok(Some(()))
        }
        fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<()>, ModelError> {
            self.vector(name, len)?;
            if let Some(s) = self.0.last_mut() {
                s.optional = true;
            }
            Ok(Some(()))
        }
    }
    let mut s = Specs(Vec::new());
    // Specs never fails: every call above returns Ok.
    let _ = load(cfg, &mut s);
    s.0
}
