//! The runtimes that compute a model step. `cpu` runs GGUF models on this machine's
//! cores with its own kernels.

pub mod cpu;
