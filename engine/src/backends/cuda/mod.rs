//! The CUDA backend: a model's forward pass on one NVIDIA GPU (compute capability 8.0
//! or newer) through the CUDA driver API (`cudarc`), with our own kernels shipped as PTX
//! (`kernels/`, contract in `kernels/ABI.md`) and JIT-compiled by the driver at load.
//!
//! K/V live in GPU memory in the engine's blocks ([`KvStorage::Paged`]), so prefix
//! caching works as on the CPU. `libcuda.so` is loaded at run time: building needs no
//! CUDA, and a machine without a driver or device gets an error ([`CudaUnavailable`])
//! from [`probe`] or [`CudaRuntime::load`], never a crash.
//!
//! - `device`: finding the GPU and picking its PTX build.
//! - `modules`: the embedded PTX and the kernels loaded from it.
//! - `weights`: the model's tensors uploaded as the GGUF stores them.
//! - `launch`: every kernel's launch geometry; `ops`: one typed wrapper per kernel.
//! - `plan`: a step's device rows, slots and block tables, packed for one upload.
//! - `graphs`: CUDA graphs of decode steps per batch-size bucket.
//! - `runtime`: [`CudaRuntime`], the forward pass behind [`ModelRuntime`].
//! - `selfcheck`: every kernel and the forward pass against CPU references, on the GPU
//!   (`sluice check cuda`).
//!
//! [`KvStorage::Paged`]: crate::backends::KvStorage::Paged
//! [`ModelRuntime`]: crate::backends::ModelRuntime

pub mod device;
pub mod graphs;
pub mod launch;
pub mod modules;
mod ops;
pub mod plan;
mod runtime;
pub mod selfcheck;
pub mod weights;

pub use device::{probe, CudaUnavailable, DeviceInfo};
pub use runtime::{CudaOptions, CudaRuntime};
