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

/// The feed-forward block's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    /// `silu(gate) * up` (Llama, Qwen).
    SwiGlu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeGlu,
}

/// Sliding-window (local) attention on some layers, as Gemma 3 interleaves it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// A local layer's query at position `p` sees cache positions `p - window + 1 ..= p`.
    pub window: usize,
    /// Every `pattern`-th layer (the last of each group) is global; the others are local.
    pub pattern: usize,
    /// RoPE base of the local layers (the global ones use `rope_theta`).
    pub rope_theta: f32,
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
    /// Position multiplier of the global layers' RoPE (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    pub ffn_activation: FfnActivation,
    /// Local attention layers, when the architecture has them.
    pub sliding_window: Option<SlidingWindow>,
    /// Multiplier of the token embeddings before the first layer (Gemma: √dim).
    pub embedding_scale: Option<f32>,
    /// Per-head RMSNorm of Q and K before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before the residual add (Gemma 3).
    pub post_norms: bool,
    /// `cap * tanh(logit / cap)` on the output logits, when the file asks for it.
    pub final_logit_softcap: Option<f32>,
}

/// Architectures whose GGUF layout matches our forward pass.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3"];

impl ModelConfig {
    /// Reads and validates the hyperparameters.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch = f.meta_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
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
        // Qwen3 and Gemma 3 state the head size (which need not be dim / heads).
        let key_length = f
            .meta(&key("attention.key_length"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        let value_length = f
            .meta(&key("attention.value_length"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        if n_heads == 0
            || n_kv_heads == 0
            || (key_length.is_none() && !dim.is_multiple_of(n_heads))
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::BadHyperparameters(format!(
                "embedding_length {dim}, head_count {n_heads}, head_count_kv {n_kv_heads} do not divide evenly"
            )));
        }
        let head_dim = key_length.unwrap_or(dim / n_heads);
        if value_length.is_some_and(|v| v != head_dim) {
            return Err(ModelError::BadHyperparameters(format!(
                "attention.key_length {head_dim} and attention.value_length {} differ",
                value_length.unwrap_or(0)
            )));
        }
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
            || head_dim == 0
            || head_dim > 512
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
        // llama.cpp's LLAMA_ROPE_TYPE_NEOX architectures.
        let rope_style = if matches!(arch.as_str(), "qwen2" | "qwen3" | "gemma3") {
            RopeStyle::Halves
        } else {
            RopeStyle::Interleaved
        };
        let gemma3 = arch == "gemma3";
        let qk_norm = matches!(arch.as_str(), "qwen3" | "gemma3");
        let final_logit_softcap = f
            .meta(&key("final_logit_softcapping"))
            .and_then(|v| v.as_f64())
            .map(|v| v as f32)
            .filter(|&c| c > 0.0);
        let rope_freq_scale = match f.meta(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = f
                    .meta(&key("rope.scaling.factor"))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0) as f32;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(ModelError::BadHyperparameters(format!(
                        "rope.scaling.factor {factor} is not a positive number"
                    )));
                }
                1.0 / factor
            }
            Some(other) => {
                return Err(ModelError::BadHyperparameters(format!(
                    "rope scaling type {other:?} is not supported (supported: none, linear)"
                )))
            }
        };
        let sliding_window = if gemma3 {
            let window = f
                .meta(&key("attention.sliding_window"))
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    ModelError::BadHyperparameters(format!(
                        "{arch}.attention.sliding_window is missing"
                    ))
                })? as usize;
            if window == 0 {
                return Err(ModelError::BadHyperparameters(
                    "attention.sliding_window is zero".into(),
                ));
            }
            // llama.cpp: five local layers then one global, local RoPE base 10,000.
            Some(SlidingWindow {
                window,
                pattern: 6,
                rope_theta: 10_000.0,
            })
        } else {
            None
        };
        if gemma3 && (n_layers == 62 || dim == 5376) {
            // Gemma 3 27B scales attention by dim / heads, not by the head size; refuse
            // rather than answer wrongly.
            return Err(ModelError::BadHyperparameters(
                "Gemma 3 27B is not supported (its attention scale differs)".into(),
            ));
        }
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
            rope_freq_scale,
            rope_style,
            ffn_activation: if gemma3 {
                FfnActivation::GeGlu
            } else {
                FfnActivation::SwiGlu
            },
            sliding_window,
            embedding_scale: gemma3.then(|| (dim as f32).sqrt()),
            qk_norm,
            post_norms: gemma3,
            final_logit_softcap,
        })
    }

    /// Width of the query projection (heads × head size; not always `dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// The attention window of layer `l`: `Some(w)` for a local layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.sliding_window
            .filter(|sw| l % sw.pattern < sw.pattern - 1)
            .map(|sw| sw.window)
    }

    /// RoPE base and position scale of layer `l`.
    pub fn layer_rope(&self, l: usize) -> (f32, f32) {
        match self.sliding_window {
            Some(sw) if self.layer_window(l).is_some() => (sw.rope_theta, 1.0),
            _ => (self.rope_theta, self.rope_freq_scale),
        }
    }

    /// Width of the K (and V) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
