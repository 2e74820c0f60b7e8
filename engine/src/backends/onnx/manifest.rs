//! `manifest.json` of an exported model: what it was made from and its shape.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ModelError;

/// The format this runtime reads.
pub const FORMAT: &str = "sluice-onnx/2";

/// An exported model's manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The GGUF it was exported from, and that file's SHA-256.
    pub source_file: String,
    pub source_sha256: String,
    pub architecture: String,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

impl Manifest {
    /// The folder of an exported model named by `path` (the folder itself, or its
    /// `model.onnx`), if it is one.
    pub fn folder_of(path: &Path) -> Option<PathBuf> {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else if path.file_name().is_some_and(|n| n == "model.onnx") {
            path.parent()?.to_path_buf()
        } else {
            return None;
        };
        dir.join("manifest.json").is_file().then_some(dir)
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, ModelError> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ModelError::Runtime(format!("reading {}: {e}", p.display())))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| ModelError::Runtime(format!("{}: {e}", p.display())))?;
        if m.format != FORMAT {
            return Err(ModelError::Runtime(format!(
                "{}: format {:?}, expected {FORMAT:?} (re-export with `sluice model export-onnx`)",
                p.display(),
                m.format
            )));
        }
        Ok(m)
    }
}
