//! The model's tensors, kept quantized in the memory map.

use std::sync::Arc;

use crate::backends::cpu::kernels::{self, KernelSet, PackedMatrix};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::quant::{dequantize_row, GgmlType};
use crate::gguf::GgufFile;
use crate::model_tensors::{self, Layer, TensorSource};

/// A weight matrix of `rows` rows of `cols` elements, left in its file encoding.
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    file: Arc<GgufFile>,
    offset: usize,
    len: usize,
    /// The same weights regrouped for the faster kernel, when it applies.
    pub packed: Option<PackedMatrix>,
}

impl QMatrix {
    fn load(
        file: &Arc<GgufFile>,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Self, ModelError> {
        let info = file
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
        Ok(QMatrix {
            ty: info.ty,
            rows,
            cols,
            file: file.clone(),
            offset: info.offset,
            len: info.n_bytes,
            packed: None,
        })
    }

    /// A matrix that is multiplied (not just looked up) also gets the faster layout.
    fn for_matmul(mut self) -> Self {
        if kernels::detected() == KernelSet::Avx2 {
            self.packed = PackedMatrix::pack(self.ty, self.bytes(), self.rows, self.cols);
        }
        self
    }

    /// The raw bytes, `rows × row_bytes`.
    pub fn bytes(&self) -> &[u8] {
        let all = self.file.tensor_bytes_at(self.offset, self.len);
        debug_assert_eq!(all.len(), self.rows * self.ty.row_bytes(self.cols));
        all
    }

    /// Dequantizes row `r` into `out`.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let rb = self.ty.row_bytes(self.cols);
        dequantize_row(self.ty, &self.bytes()[r * rb..(r + 1) * rb], out);
    }
}

fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let info = file
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
    let mut out = vec![0f32; len];
    dequantize_row(info.ty, file.tensor_bytes(info), &mut out);
    Ok(out)
}

/// One transformer block, in host memory.
pub type LayerWeights = Layer<QMatrix, Vec<f32>>;

/// Every tensor of a Llama-family model.
pub struct ModelWeights {
    pub token_embd: QMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// The LM head; the token embedding when the model ties them.
    pub output: QMatrix,
    /// Llama 3.1 style per-frequency rope divisors, when the model has them.
    pub rope_freqs: Option<Vec<f32>>,
}

impl ModelWeights {
    /// Checks every tensor's presence and shape against `cfg`.
    pub fn load(file: &Arc<GgufFile>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let t = model_tensors::load(cfg, &mut HostTensors { file })?;
        // A tied head multiplies the embedding: a second copy, packed for products
        // (the lookup reads the plain rows).
        let output = match t.output {
            Some(o) => o,
            None => QMatrix::load(file, "token_embd.weight", cfg.dim, cfg.vocab_size)?.for_matmul(),
        };
        Ok(ModelWeights {
            token_embd: t.token_embd,
            layers: t.layers,
            output_norm: t.output_norm,
            output,
            rope_freqs: t.rope_freqs,
        })
    }
}

/// The model file as a [`TensorSource`]: matrices packed for our kernels (but the
/// embedding, which is looked up row by row), vectors as f32.
struct HostTensors<'a> {
    file: &'a Arc<GgufFile>,
}

impl TensorSource for HostTensors<'_> {
    type Matrix = QMatrix;
    type Vector = Vec<f32>;

    fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<QMatrix, ModelError> {
        let m = QMatrix::load(self.file, name, cols, rows)?;
        Ok(if name == "token_embd.weight" {
            m
        } else {
            m.for_matmul()
        })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        vector(self.file, name, len)
    }

    fn has(&self, name: &str) -> bool {
        self.file.tensors.contains_key(name)
    }
}
