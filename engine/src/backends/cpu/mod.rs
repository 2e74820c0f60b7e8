//! The CPU runtime: the Llama-family forward pass (`model`) over quantized weights kept
//! in the memory map (`weights`), our SIMD kernels (`kernels`), the paged f16 KV storage
//! (`kv_cache`) and the process's compute pool (`thread_pool`), put behind the engine's
//! seam by `CpuRuntime` (`runtime`).

pub mod kernels;
pub mod kv_cache;
pub mod model;
mod runtime;
pub mod thread_pool;
pub mod weights;

pub use runtime::CpuRuntime;
