//! The CPU runtime: the Llama-family forward pass (`model`) over quantized weights kept
//! in the memory map (`weights`), our SIMD kernels (`kernels`), the paged f16 KV storage
//! (`kv_cache`) and the process's compute pool (`thread_pool`).

pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod thread_pool;
pub mod weights;
