//! Loading `libonnxruntime` once per process, from an explicit path (`ort`'s implicit
//! loading panics when the library is missing; this reports it), and the process's one
//! ONNX Runtime environment.

use std::path::Path;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::ModelError;

/// The environment, or why ONNX Runtime could not be loaded.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime from `path` and creates the environment sessions are made in
/// (first call only: a process has one; later calls get the first call's outcome).
pub fn init(path: &Path) -> Result<Environment, ModelError> {
    ENVIRONMENT
        .get_or_init(|| {
            let shown = path.display().to_string();
            ort::init_from(path)
                .map_err(|e| format!("cannot load ONNX Runtime from {shown}: {e}"))?
                .with_name("sluice")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime ({shown}): {e}"))
        })
        .clone()
        .map_err(ModelError::Runtime)
}
