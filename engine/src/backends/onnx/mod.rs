//! The ONNX Runtime backend: a model exported by `sluice model export-onnx` (the same
//! network as its GGUF, with ONNX Runtime's own quantized operators) served through
//! `ort`. ONNX Runtime keeps each sequence's K/V as the graph's `past`/`present` tensors,
//! so this runtime declares [`KvStorage::Internal`](super::KvStorage::Internal): the
//! engine runs without prefix caching and each sequence keeps its own K/V here.
//!
//! `libonnxruntime` is loaded at run time from a path the caller gives
//! ([`library::init`]); nothing of ONNX Runtime is needed at build time.

pub mod library;
pub mod manifest;
mod runtime;

pub use manifest::Manifest;
pub use runtime::OnnxRuntime;
