//! Sluice's inference engine: the serving core (the engine handle, its loop, the
//! scheduler and the KV block allocator), text processing (`text`), sampling, the GGUF
//! reader (`gguf`) and the runtimes that compute a step (`backends`; today `cpu`).

pub mod backends;
pub mod block_allocator;
pub mod config;
pub mod engine;
mod engine_loop;
pub mod error;
pub mod gguf;
pub mod metrics;
pub mod model_tensors;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod structured;
pub mod supervisor;
mod synthetic;
pub mod text;

pub use engine::{Engine, EngineConfig};
pub use error::{EngineError, GgufError, ModelError};
pub use request::{EngineStats, Event, FinishReason, GenerationRequest, RequestStream, Usage};
pub use sampling::{SamplingParams, TokenLogprobs};
