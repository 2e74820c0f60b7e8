//! `sluice model export-onnx`: a GGUF model as an ONNX model for the `onnx` backend.
//!
//! The exporter is a Python script (`scripts/export_onnx.py`, built into the binary) run
//! in its own virtual environment with pinned PyPI packages (`onnx`, `numpy`, `gguf`; no
//! PyTorch), made on first use in the user's cache folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const SCRIPT: &str = include_str!("../../scripts/export_onnx.py");
const REQUIREMENTS: &str = include_str!("../../scripts/export-onnx-requirements.txt");

/// The exporter's virtual environment: `onnx-export-venv` in the user's Sluice cache.
fn venv_dir() -> Result<PathBuf> {
    let cache = sluice_gateway::model_store::sluice_cache_dir()
        .context("neither XDG_CACHE_HOME nor HOME is set: no place for the exporter's venv")?;
    Ok(cache.join("onnx-export-venv"))
}

/// The venv's Python with the pinned requirements installed (installed when missing or
/// different: the requirements are kept beside it to compare).
fn python() -> Result<PathBuf> {
    let venv = venv_dir()?;
    let python = venv.join("bin/python");
    let stamp = venv.join("sluice-requirements.txt");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS) {
        return Ok(python);
    }
    eprintln!(
        "setting up the exporter's Python packages in {} (once)",
        venv.display()
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("running python3 -m venv (python3 with venv is needed to export)")?
        .success();
    if !ok {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let req = venv.join("requirements.txt");
    std::fs::write(&req, REQUIREMENTS)?;
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "-r"])
        .arg(&req)
        .status()
        .context("running pip")?
        .success();
    if !ok {
        bail!("installing the exporter's packages failed (is PyPI reachable?)");
    }
    std::fs::write(&stamp, REQUIREMENTS)?;
    Ok(python)
}

/// Exports `model` (a GGUF file) into `out` at ONNX Runtime accuracy level
/// `accuracy_level` (`0` or `4`).
pub fn export(model: &Path, out: &Path, accuracy_level: &str) -> Result<()> {
    let python = python()?;
    let script = venv_dir()?.join("export_onnx.py");
    std::fs::write(&script, SCRIPT)?;
    let ok = Command::new(&python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--accuracy-level", accuracy_level])
        .status()
        .context("running the exporter")?
        .success();
    if !ok {
        bail!("exporting {} failed", model.display());
    }
    Ok(())
}
