//! Error types of the engine. The gateway maps them to HTTP statuses in one place.

use thiserror::Error;

/// Problems reading a GGUF file.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read model file: {0}")]
    Io(String),
    #[error("not a GGUF file (bad magic bytes)")]
    BadMagic,
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated: {0}")]
    Truncated(String),
    #[error("GGUF file is corrupt: {0}")]
    Corrupt(String),
    #[error("tensor {tensor} has unsupported type id {ty} (supported: F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnknownTensorType { tensor: String, ty: u32 },
    #[error("GGUF metadata key {0} is missing or has the wrong type")]
    MissingMetadata(String),
}

/// Problems turning a GGUF file into a runnable model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "unsupported model architecture {0:?} (supported: llama, mistral, qwen2, qwen3, gemma3)"
    )]
    UnsupportedArchitecture(String),
    #[error("model tensor {name} is missing")]
    MissingTensor { name: String },
    #[error("model tensor {name} has shape {got:?}, expected {expected:?}")]
    BadShape {
        name: String,
        got: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("invalid model hyperparameters: {0}")]
    BadHyperparameters(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("cannot start compute threads: {0}")]
    Threads(String),
    #[error("{0}")]
    Runtime(String),
}

/// Why a request could not be accepted or completed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("the engine's waiting queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("this model's maximum context length is {max} tokens, but the request needs {requested} tokens ({prompt} in the prompt + {completion} for the completion)")]
    ContextLengthExceeded {
        max: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
    },
    #[error("the request needs {needed} tokens of KV cache but the cache holds {capacity}; lower max_tokens or shorten the prompt")]
    ExceedsKvCache { needed: usize, capacity: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {0} is outside the vocabulary")]
    InvalidToken(u32),
    #[error("structured output is not available on the {0} engine")]
    StructuredOutputUnsupported(&'static str),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine is restarting after a failure; retry shortly")]
    Restarting,
    #[error("internal engine error: {0}")]
    Internal(String),
}
