//! The model's tensors in GPU memory.
//!
//! Matrices are uploaded byte for byte as the GGUF stores them: the kernels read ggml's
//! block layouts directly (ABI.md), so nothing is requantized and the GPU holds the
//! same bytes the CPU runtime multiplies. Norm weights, biases and RoPE frequency
//! factors are small; they are widened to f32 on the host, as the kernels take them.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::quant::{dequantize_row, GgmlType};
use crate::gguf::GgufFile;
use crate::model_tensors::{self, Layer, TensorSource};
pub use crate::model_tensors::{TensorSpec, TensorUse};

/// The kernel-name suffix (`<t>` in ABI.md) of a weight type.
pub fn kernel_suffix(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q5K => "q5_k",
        GgmlType::Q6K => "q6_k",
    }
}

/// The kernel `prefix_<t>` for a weight type (`mmv`, `mm`, `get_rows`).
pub fn kernel_name(prefix: &str, ty: GgmlType) -> String {
    format!("{prefix}_{}", kernel_suffix(ty))
}

/// Bytes of one row of `k` elements of `ty`; refused when `k` is not a whole number of
/// blocks (the kernels assume it).
pub fn row_bytes(ty: GgmlType, k: usize) -> Result<usize, ModelError> {
    if !k.is_multiple_of(ty.block_size()) {
        return Err(ModelError::BadHyperparameters(format!(
            "a row of {k} elements is not a whole number of {} blocks ({} elements)",
            ty.name(),
            ty.block_size()
        )));
    }
    Ok(ty.row_bytes(k))
}

/// The name of the LM head: `output.weight`, or the token embedding when the model
/// ties them (no `output.weight` in the file, as Gemma and small Qwens do).
pub fn output_tensor_name(has_output: bool) -> &'static str {
    if has_output {
        "output.weight"
    } else {
        "token_embd.weight"
    }
}

/// Every tensor `cfg`'s architecture reads (matrices uploaded as their file bytes,
/// vectors as f32).
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    model_tensors::specs(cfg)
}

/// The weight types of the matrices `cfg` multiplies or looks up in `file`: the
/// matmul and `get_rows` kernels to load. Missing tensors are skipped here (the upload
/// names them).
pub fn matrix_types(file: &GgufFile, cfg: &ModelConfig) -> (Vec<GgmlType>, Option<GgmlType>) {
    let mut matmul = Vec::new();
    let mut embed = None;
    let has_output = file.tensors.contains_key("output.weight");
    for spec in tensor_specs(cfg) {
        let TensorUse::Matrix { .. } = spec.usage else {
            continue;
        };
        let Some(info) = file.tensors.get(&spec.name) else {
            continue;
        };
        if spec.name == "token_embd.weight" {
            embed = Some(info.ty);
            if has_output {
                continue;
            }
        }
        if !matmul.contains(&info.ty) {
            matmul.push(info.ty);
        }
    }
    (matmul, embed)
}

/// A device buffer and its address (stable for the buffer's life, which is what
/// kernel arguments and captured graphs hold).
pub struct DeviceBuffer<T> {
    slice: CudaSlice<T>,
    ptr: u64,
}

impl<T> DeviceBuffer<T> {
    /// Wraps `slice`, reading its address once.
    pub fn new(slice: CudaSlice<T>, stream: &CudaStream) -> Self {
        let ptr = {
            // Event tracking is off (one stream), so the guard records nothing.
            let (ptr, _guard) = slice.device_ptr(stream);
            ptr
        };
        DeviceBuffer { slice, ptr }
    }

    /// The address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// The address of element 0.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// The slice, for copies.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    /// The slice, for copies into it.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

/// A weight matrix in its file encoding.
pub struct GpuMatrix {
    /// Its ggml type (selects the kernel).
    pub ty: GgmlType,
    /// Input size `K`.
    pub cols: usize,
    /// Output size `N`.
    pub rows: usize,
    /// `rows × row_bytes` bytes.
    pub bytes: DeviceBuffer<u8>,
}

/// One transformer block's tensors on the GPU.
pub type GpuLayer = Layer<GpuMatrix, DeviceBuffer<f32>>;

/// Every tensor of the model on the GPU.
pub struct GpuWeights {
    /// Token embedding (looked up with `get_rows_<t>`).
    pub token_embd: GpuMatrix,
    /// The LM head; `None` when it is tied to `token_embd` (uploaded once).
    pub output: Option<GpuMatrix>,
    /// Final RMSNorm weights.
    pub output_norm: DeviceBuffer<f32>,
    /// Llama 3.1 style RoPE frequency divisors.
    pub rope_freqs: Option<DeviceBuffer<f32>>,
    /// The blocks.
    pub layers: Vec<GpuLayer>,
    /// Device bytes the weights take.
    pub bytes: usize,
}

impl GpuWeights {
    /// The LM head.
    pub fn lm_head(&self) -> &GpuMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Checks every tensor's presence and shape against `cfg` and uploads it.
    pub fn upload(
        file: &Arc<GgufFile>,
        cfg: &ModelConfig,
        stream: &Arc<CudaStream>,
    ) -> Result<Self, ModelError> {
        let mut up = Uploader {
            file,
            stream,
            bytes: 0,
        };
        let t = model_tensors::load(cfg, &mut up)?;
        Ok(GpuWeights {
            token_embd: t.token_embd,
            output: t.output,
            output_norm: t.output_norm,
            rope_freqs: t.rope_freqs,
            layers: t.layers,
            bytes: up.bytes,
        })
    }
}

/// Device bytes the tensors of `cfg` in `file` take once uploaded: matrices as stored,
/// vectors as f32 (for sizing the KV cache before anything is allocated).
pub fn upload_bytes(file: &GgufFile, cfg: &ModelConfig) -> usize {
    tensor_specs(cfg)
        .iter()
        .filter_map(|s| {
            let info = file.tensors.get(&s.name)?;
            Some(match s.usage {
                TensorUse::Matrix { .. } => info.n_bytes,
                TensorUse::Vector { len } => len * 4,
            })
        })
        .sum()
}

struct Uploader<'a> {
    file: &'a GgufFile,
    stream: &'a Arc<CudaStream>,
    bytes: usize,
}

impl Uploader<'_> {
    fn upload<T: cudarc::driver::DeviceRepr>(
        &mut self,
        name: &str,
        host: &[T],
    ) -> Result<DeviceBuffer<T>, ModelError> {
        let slice = self.stream.clone_htod(host).map_err(|e| {
            ModelError::Runtime(format!("cannot upload tensor {name} to the GPU: {e}"))
        })?;
        self.bytes += std::mem::size_of_val(host);
        Ok(DeviceBuffer::new(slice, self.stream))
    }
}

impl TensorSource for Uploader<'_> {
    type Matrix = GpuMatrix;
    type Vector = DeviceBuffer<f32>;

    fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<GpuMatrix, ModelError> {
        let info = self
            .file
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        let expected = vec![cols as u64, rows as u64];
        if info.dims != expected {
            return Err(ModelError::BadShape {
                name: name.into(),
                got: info.dims.clone(),
                expected,
            });
        }
        let host = self.file.tensor_bytes(info);
        let want = row_bytes(info.ty, cols)? * rows;
        if host.len() != want {
            return Err(ModelError::BadHyperparameters(format!(
                "tensor {name} holds {} bytes, expected {want}",
                host.len()
            )));
        }
        Ok(GpuMatrix {
            ty: info.ty,
            cols,
            rows,
            bytes: self.upload(name, host)?,
        })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<DeviceBuffer<f32>, ModelError> {
        let info = self
            .file
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if info.dims != [len as u64] {
            return Err(ModelError::BadShape {
                name: name.into(),
                got: info.dims.clone(),
                expected: vec![len as u64],
            });
        }
        let mut host = vec![0f32; len];
        dequantize_row(info.ty, self.file.tensor_bytes(info), &mut host);
        self.upload(name, &host)
    }

    fn has(&self, name: &str) -> bool {
        self.file.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::model::tests::{tiny_llama, tiny_model};

    fn load(bytes: Vec<u8>) -> (GgufFile, ModelConfig) {
        let file = GgufFile::from_bytes(bytes).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        (file, cfg)
    }

    #[test]
    fn every_type_has_its_kernel_suffix() {
        let all = [
            (GgmlType::F32, "f32"),
            (GgmlType::F16, "f16"),
            (GgmlType::Q4_0, "q4_0"),
            (GgmlType::Q4_1, "q4_1"),
            (GgmlType::Q5_0, "q5_0"),
            (GgmlType::Q5_1, "q5_1"),
            (GgmlType::Q8_0, "q8_0"),
            (GgmlType::Q4K, "q4_k"),
            (GgmlType::Q5K, "q5_k"),
            (GgmlType::Q6K, "q6_k"),
        ];
        for (ty, suffix) in all {
            assert_eq!(kernel_suffix(ty), suffix);
        }
        assert_eq!(kernel_name("mmv", GgmlType::Q4K), "mmv_q4_k");
        assert_eq!(kernel_name("get_rows", GgmlType::Q8_0), "get_rows_q8_0");
    }

    #[test]
    fn row_bytes_follow_the_block_layouts_and_refuse_partial_blocks() {
        assert_eq!(row_bytes(GgmlType::Q4_0, 4096).unwrap(), 128 * 18);
        assert_eq!(row_bytes(GgmlType::Q5_1, 64).unwrap(), 2 * 24);
        assert_eq!(row_bytes(GgmlType::Q8_0, 32).unwrap(), 34);
        assert_eq!(row_bytes(GgmlType::Q4K, 4096).unwrap(), 16 * 144);
        assert_eq!(row_bytes(GgmlType::Q5K, 256).unwrap(), 176);
        assert_eq!(row_bytes(GgmlType::Q6K, 512).unwrap(), 2 * 210);
        assert_eq!(row_bytes(GgmlType::F16, 3).unwrap(), 6);
        assert_eq!(row_bytes(GgmlType::F32, 3).unwrap(), 12);
        let e = row_bytes(GgmlType::Q4K, 4000).unwrap_err();
        assert!(e.to_string().contains("Q4_K"), "{e}");
        assert!(row_bytes(GgmlType::Q8_0, 48).is_err());
    }

    #[test]
    fn each_architecture_needs_its_own_tensors() {
        let names = |arch: &str, layers, window| {
            let (_, cfg) = load(tiny_model(arch, None, layers, window));
            tensor_specs(&cfg)
                .into_iter()
                .filter(|s| !s.optional)
                .map(|s| s.name)
                .collect::<Vec<_>>()
        };
        let llama = names("llama", 2, None);
        assert_eq!(llama.len(), 2 + 2 * 9);
        assert!(!llama
            .iter()
            .any(|n| n.contains("q_norm") || n.contains("post_")));
        let qwen3 = names("qwen3", 2, None);
        assert!(qwen3.contains(&"blk.1.attn_k_norm.weight".to_string()));
        assert!(!qwen3.iter().any(|n| n.contains("post_")));
        let gemma = names("gemma3", 6, Some(5));
        assert!(gemma.contains(&"blk.5.post_ffw_norm.weight".to_string()));
        assert!(gemma.contains(&"blk.0.attn_q_norm.weight".to_string()));
        // Biases, the LM head and rope factors are optional everywhere.
        let (_, cfg) = load(tiny_llama("qwen2", None));
        let optional: Vec<_> = tensor_specs(&cfg)
            .into_iter()
            .filter(|s| s.optional)
            .map(|s| s.name)
            .collect();
        assert!(optional.contains(&"output.weight".to_string()));
        assert!(optional.contains(&"blk.0.attn_q.bias".to_string()));
        assert!(optional.contains(&"rope_freqs.weight".to_string()));
    }

    #[test]
    fn a_model_without_an_output_matrix_ties_its_head_to_the_embedding() {
        assert_eq!(output_tensor_name(true), "output.weight");
        assert_eq!(output_tensor_name(false), "token_embd.weight");
        // The tiny models have no output.weight: the head multiplies the (Q8_0)
        // embedding, so Q8_0 joins the matmul types.
        let (file, cfg) = load(tiny_llama("llama", None));
        assert!(!file.tensors.contains_key("output.weight"));
        let (matmul, embed) = matrix_types(&file, &cfg);
        assert_eq!(embed, Some(GgmlType::Q8_0));
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::F16,
            GgmlType::Q6K,
            GgmlType::Q5K,
        ] {
            assert!(matmul.contains(&ty), "{ty:?} missing from {matmul:?}");
        }
        assert_eq!(matmul.len(), 7);
    }

    #[test]
    fn upload_size_counts_matrices_as_stored_and_vectors_as_f32() {
        let (file, cfg) = load(tiny_llama("llama", None));
        let mats: usize = file
            .tensors
            .values()
            .filter(|t| t.dims.len() == 2)
            .map(|t| t.n_bytes)
            .sum();
        let vecs = (1 + 2 * cfg.n_layers) * cfg.dim * 4;
        assert_eq!(upload_bytes(&file, &cfg), mats + vecs);
    }
}
