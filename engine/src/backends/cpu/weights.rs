//! The model's tensors, kept quantized in the memory map.

use std::sync::Arc;

use crate::backends::cpu::kernels::{self, KernelSet, PackedMatrix};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::quant::{dequantize_row, GgmlType};
use crate::gguf::GgufFile;

/// A weight matrix of `rows` rows of `cols` elements, left in its file encoding.
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    file: Arc<GgufFile>,
    offset: usize,
    len: usize,
    /// The same weights regrouped for the faster kernel, when it applies.
    pub packed: Option<PackedMatrix>,
}

impl QMatrix {
    fn load(
        file: &Arc<GgufFile>,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Self, ModelError> {
        let info = file
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        let expected = vec![cols as u64, rows as u64];
        if info.dims != expected {
            return Err(ModelError::BadShape {
                name: name.into(),
                got: info.dims.clone(),
                expected,
            });
        }
        Ok(QMatrix {
            ty: info.ty,
            rows,
            cols,
            file: file.clone(),
            offset: info.offset,
            len: info.n_bytes,
            packed: None,
        })
    }

    /// A matrix that is multiplied (not just looked up) also gets the faster layout.
    fn for_matmul(mut self) -> Self {
        if kernels::detected() == KernelSet::Avx2 {
            self.packed = PackedMatrix::pack(self.ty, self.bytes(), self.rows, self.cols);
        }
        self
    }

    /// The raw bytes, `rows × row_bytes`.
    pub fn bytes(&self) -> &[u8] {
        let all = self.file.tensor_bytes_at(self.offset, self.len);
        debug_assert_eq!(all.len(), self.rows * self.ty.row_bytes(self.cols));
        all
    }

    /// Dequantizes row `r` into `out`.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let rb = self.ty.row_bytes(self.cols);
        dequantize_row(self.ty, &self.bytes()[r * rb..(r + 1) * rb], out);
    }
}

fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let info = file
        .tensors
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
    if info.dims != [len as u64] {
        return Err(ModelError::BadShape {
            name: name.into(),
            got: info.dims.clone(),
            expected: vec![len as u64],
        });
    }
    let mut out = vec![0f32; len];
    dequantize_row(info.ty, file.tensor_bytes(info), &mut out);
    Ok(out)
}

fn optional_vector(
    file: &GgufFile,
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    if file.tensors.contains_key(name) {
        vector(file, name, len).map(Some)
    } else {
        Ok(None)
    }
}

/// One transformer block.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of Q and K (`head_dim` each), Qwen3 and Gemma 3.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub wo: QMatrix,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// RMSNorm of the FFN output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<Vec<f32>>,
    pub w_gate: QMatrix,
    pub w_up: QMatrix,
    pub w_down: QMatrix,
}

/// Every tensor of a Llama-family model.
pub struct ModelWeights {
    pub token_embd: QMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// The LM head; the token embedding when the model ties them.
    pub output: QMatrix,
    /// Llama 3.1 style per-frequency rope divisors, when the model has them.
    pub rope_freqs: Option<Vec<f32>>,
}

impl ModelWeights {
    /// Checks every tensor's presence and shape against `cfg`.
    pub fn load(file: &Arc<GgufFile>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (d, kv, ff, v) = (cfg.dim, cfg.kv_dim(), cfg.ffn_dim, cfg.vocab_size);
        let (qd, hd) = (cfg.q_dim(), cfg.head_dim);
        // Tensors the architecture needs are required; a file without them is refused
        // by name rather than run wrongly.
        let needed = |file: &GgufFile, name: &str, len: usize, on: bool| {
            if on {
                vector(file, name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let token_embd = QMatrix::load(file, "token_embd.weight", d, v)?;
        let output = if file.tensors.contains_key("output.weight") {
            QMatrix::load(file, "output.weight", d, v)?
        } else {
            QMatrix::load(file, "token_embd.weight", d, v)?
        }
        .for_matmul();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(LayerWeights {
                attn_norm: vector(file, &n("attn_norm.weight"), d)?,
                wq: QMatrix::load(file, &n("attn_q.weight"), d, qd)?.for_matmul(),
                wk: QMatrix::load(file, &n("attn_k.weight"), d, kv)?.for_matmul(),
                wv: QMatrix::load(file, &n("attn_v.weight"), d, kv)?.for_matmul(),
                bq: optional_vector(file, &n("attn_q.bias"), qd)?,
                bk: optional_vector(file, &n("attn_k.bias"), kv)?,
                bv: optional_vector(file, &n("attn_v.bias"), kv)?,
                q_norm: needed(file, &n("attn_q_norm.weight"), hd, cfg.qk_norm)?,
                k_norm: needed(file, &n("attn_k_norm.weight"), hd, cfg.qk_norm)?,
                wo: QMatrix::load(file, &n("attn_output.weight"), qd, d)?.for_matmul(),
                post_attn_norm: needed(file, &n("post_attention_norm.weight"), d, cfg.post_norms)?,
                ffn_norm: vector(file, &n("ffn_norm.weight"), d)?,
                post_ffn_norm: needed(file, &n("post_ffw_norm.weight"), d, cfg.post_norms)?,
                w_gate: QMatrix::load(file, &n("ffn_gate.weight"), d, ff)?.for_matmul(),
                w_up: QMatrix::load(file, &n("ffn_up.weight"), d, ff)?.for_matmul(),
                w_down: QMatrix::load(file, &n("ffn_down.weight"), ff, d)?.for_matmul(),
            });
        }
        let output_norm = vector(file, "output_norm.weight", d)?;
        let rope_freqs = optional_vector(file, "rope_freqs.weight", cfg.head_dim / 2)?;
        Ok(ModelWeights {
            token_embd,
            layers,
            output_norm,
            output,
            rope_freqs,
        })
    }
}
