//! `sluice model`: the models Sluice can fetch, fetching them, and where files are.

use std::path::PathBuf;

use anyhow::Result;
use sluice_gateway::model_store;

/// `sluice model` actions.
#[derive(clap::Subcommand)]
pub enum ModelCmd {
    /// Download a model into the models folder and check its SHA-256 (default: the
    /// default model, SmolLM2-135M-Instruct Q4_1). `sluice model list` shows the names.
    Fetch {
        /// A fetchable model's name (e.g. `gemma-3-270m`) or file name.
        name: Option<String>,
    },
    /// The fetchable models (fetched or not) and the other GGUF files in the models folder.
    List,
    /// Write a GGUF model as an ONNX model for the `onnx` backend (`model.onnx`, its
    /// weights, the tokenizer and a manifest in OUT; serve it with `sluice serve --model
    /// OUT`).
    ExportOnnx {
        /// The GGUF file, or a fetchable model's name [default: the default model].
        #[arg(long)]
        model: Option<PathBuf>,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
        /// ONNX Runtime's MatMulNBits accuracy level: 0 computes in f32 (exact
        /// weights and activations), 4 quantizes activations to int8 (faster decoding).
        #[arg(long, default_value = "0", value_parser = ["0", "4"])]
        accuracy_level: String,
    },
    /// Write a GGUF model with a real model's shape and random weights (for serving,
    /// benchmarking and comparing runtimes where the real model cannot be carried).
    Synth {
        /// The shape: smollm2-135m (SmolLM2-135M) or llama3-8b (Llama-3-8B).
        #[arg(long)]
        shape: String,
        /// The matrices' type: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, f16, f32.
        #[arg(long, default_value = "q4_1")]
        quant: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// The random stream's seed (the same arguments write the same file).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
        ModelCmd::Fetch { name } => {
            let m = match name.as_deref() {
                None => model_store::default_model(),
                Some(n) => model_store::known_model(n).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{n:?} is not a model Sluice can fetch (fetchable: {})",
                        model_store::known_model_names()
                    )
                })?,
            };
            let dir = model_store::models_dir()?;
            let r = model_store::ModelRef::Known(m, dir.join(m.file));
            let p = model_store::ensure_model(&r)?;
            println!("{}", p.display());
        }
        ModelCmd::Synth {
            shape,
            quant,
            out,
            seed,
        } => synth(&shape, &quant, &out, seed)?,
        ModelCmd::List => {
            let dir = model_store::models_dir()?;
            println!("models folder: {}", dir.display());
            println!(
                "{:<16} {:<36} {:>9}  served as / licence",
                "name", "file", "size"
            );
            for l in model_store::list_models(&dir) {
                let size = l
                    .present_bytes
                    .map_or("-".to_string(), |b| format!("{} MB", b >> 20));
                let stem = l.file.strip_suffix(".gguf").unwrap_or(&l.file);
                let state = if l.present_bytes.is_some() {
                    "fetched"
                } else {
                    "not fetched"
                };
                match (l.name, l.license) {
                    (Some(n), Some(lic)) => {
                        println!("{n:<16} {:<36} {size:>9}  {stem} ({state}); {lic}", l.file)
                    }
                    _ => println!("{:<16} {:<36} {size:>9}  {stem}", "-", l.file),
                }
            }
        }
        ModelCmd::ExportOnnx {
            model,
            out,
            accuracy_level,
        } => {
            let file = resolve_model(model)?;
            crate::export_onnx::export(&file, &out, &accuracy_level)?;
            println!("{}", out.display());
        }
        ModelCmd::Path { name } => {
            let p = model_store::model_file(&model_store::models_dir()?, name.as_deref())?;
            println!("{}", p.display());
            if !p.is_file() {
                let known = p
                    .file_name()
                    .and_then(|f| f.to_str())
                    .and_then(model_store::known_model);
                let fetch = known.map_or(String::new(), |m| {
                    format!(" (`sluice model fetch {}` fetches it)", m.name)
                });
                eprintln!("not there yet{fetch}");
            }
        }
    }
    Ok(())
}

/// The model file to load: `path` when given (a file, or a model of the models folder by
/// name, fetched first when it is a known one), else the default model, fetched into the
/// models folder when it is not there yet.
pub fn resolve_model(path: Option<PathBuf>) -> Result<PathBuf> {
    let dir = model_store::models_dir()?;
    let r = match path {
        Some(p) => model_store::resolve_model_ref(&p, &dir)?,
        None => {
            let m = model_store::default_model();
            model_store::ModelRef::Known(m, dir.join(m.file))
        }
    };
    Ok(model_store::ensure_model(&r)?)
}

/// `sluice model synth`: writes beside `out`, then renames, so a half-written file is
/// never mistaken for a model.
fn synth(shape: &str, quant: &str, out: &std::path::Path, seed: u64) -> Result<()> {
    use sluice_engine::gguf::synth;
    let s = synth::shape(shape)?;
    let ty = synth::quant(quant)?;
    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let written = synth::write(&s, ty, seed, &mut w)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(std::io::Write::flush(&mut w)?));
    drop(w);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out)?;
    let bytes = std::fs::metadata(out)?.len();
    println!(
        "{} ({} MB: {} shape, {}, random weights, seed {seed})",
        out.display(),
        bytes >> 20,
        s.name,
        ty.name()
    );
    Ok(())
}
