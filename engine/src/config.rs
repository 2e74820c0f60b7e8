//! Model hyperparameters read from GGUF metadata.

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's "normal" mode, used by llama-arch GGUFs
    /// (the converter permutes Q/K so this matches the original weights).
    Interleaved,
    /// Halves (i, i + d/2): GPT-NeoX style, used by Qwen2.
    Halves,
}

/// The shape of a Llama-family transformer.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub dim: usize,
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
}

/// Architectures whose GGUF layout matches our forward pass.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    /// Reads and validates the hyperparameters.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f.meta_str("general.architecture")?.to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = f.meta_u64(&key("block_count"))? as usize;
        let dim = f.meta_u64(&key("embedding_length"))? as usize;
        let ffn_dim = f.meta_u64(&key("feed_forward_length"))? as usize;
        let n_heads = f.meta_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = f
            .meta(&key("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .map_or(n_heads, |v| v as usize);
        let context_length = f.meta_u64(&key("context_length"))? as usize;
        let rms_eps = f
            .meta(&key("attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5) as f32;
        let rope_theta = f
            .meta(&key("rope.freq_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0) as f32;
        let vocab_size = match f.meta(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => f
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map_or(0, |a| a.len()),
        };
        if n_heads == 0
            || n_kv_heads == 0
            || !dim.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::BadHyperparameters(format!(
                "embedding_length {dim}, head_count {n_heads}, head_count_kv {n_kv_heads} do not divide evenly"
            )));
        }
        let head_dim = dim / n_heads;
        if let Some(rd) = f
            .meta(&key("rope.dimension_count"))
            .and_then(|v| v.as_u64())
        {
            if rd as usize != head_dim {
                return Err(ModelError::BadHyperparameters(format!(
                    "partial rotary embeddings ({rd} of {head_dim}) are not supported"
                )));
            }
        }
        if n_layers == 0
            || n_layers > 512
            || dim == 0
            || !dim.is_multiple_of(32)
            || !ffn_dim.is_multiple_of(32)
            || !head_dim.is_multiple_of(2)
        {
            return Err(ModelError::BadHyperparameters(format!(
                "block_count {n_layers}, embedding_length {dim}, feed_forward_length {ffn_dim} are out of range"
            )));
        }
        if vocab_size == 0 || context_length == 0 {
            return Err(ModelError::BadHyperparameters(
                "vocabulary or context length is zero".into(),
            ));
        }
        let rope_style = if arch == "qwen2" {
            RopeStyle::Halves
        } else {
            RopeStyle::Interleaved
        };
        Ok(ModelConfig {
            architecture: arch,
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rms_eps,
            rope_theta,
            rope_style,
        })
    }

    /// Width of the K (and V) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
