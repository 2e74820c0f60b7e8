//! Sluice's inference engine: GGUF models on CPU, tokenization, chat templates and
//! the model loop that serves requests.

pub mod block_allocator;
pub mod config;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod quant;
pub mod thread_pool;
pub mod weights;

pub use error::{EngineError, GgufError, ModelError};
pub mod chat_template;
pub mod detokenizer;
pub mod engine;
mod engine_loop;
pub mod metrics;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod stop;
pub mod supervisor;
mod synthetic;
pub mod tokenizer;

pub use engine::{Engine, EngineConfig};
pub use request::{EngineStats, Event, FinishReason, GenerationRequest, RequestStream, Usage};
pub use sampling::{SamplingParams, TokenLogprobs};
