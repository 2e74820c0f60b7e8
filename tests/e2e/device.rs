//! Device choice and synthetic models, end to end: `--device cuda` where no GPU can be
//! used stops before fetching anything, in one line; `auto` serves on the CPU and says
//! so in `/admin/models`; `sluice model synth` writes a file of a real model's shape
//! that loads and serves.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::gateway::new_key;
use crate::support::Server;

/// `sluice ARGS` with `env`, as (exit code, stdout, stderr).
fn sluice(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running sluice");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn device_cuda_without_a_usable_gpu_stops_in_one_line_before_fetching_a_model() {
    // An empty models folder: had serve got as far as the model, it would fetch the
    // default one into it.
    let models = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("device-cuda-models");
    let _ = std::fs::remove_dir_all(&models);
    let dir = models.to_str().expect("utf-8 path");
    let (code, _, err) = sluice(
        &["serve", "--device", "cuda", "--port", "0"],
        &[("SLUICE_MODELS_DIR", dir), ("SLUICE_LOG", "warn")],
    );
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, no backtrace:\n{err}");
    assert!(lines[0].starts_with("error: --device cuda: "), "{err}");
    if cfg!(feature = "cuda") {
        // This machine has no GPU: the probe names what is missing.
        assert!(
            lines[0].contains("CUDA") || lines[0].contains("GPU"),
            "{err}"
        );
    } else {
        assert!(lines[0].contains("--features cuda"), "{err}");
    }
    assert!(
        !models.exists() || std::fs::read_dir(&models).unwrap().next().is_none(),
        "serve fetched a model before checking the device"
    );
    // Bad values are refused as clearly.
    let (code, _, err) = sluice(&["serve", "--device", "tpu"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("devices: auto, cpu, cuda"), "{err}");
    let (code, _, err) = sluice(&["serve", "--gpu-memory-fraction", "0"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("engine.gpu_memory_fraction"), "{err}");
}

/// Writes a synthetic SmolLM2-135M-shaped Q4_1 file under target/ (once per run).
fn synth_smollm2() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synth-smollm2-135m-q4_1.gguf");
    let out = path.to_str().expect("utf-8 path");
    let (code, stdout, err) = sluice(
        &[
            "model",
            "synth",
            "--shape",
            "smollm2-135m",
            "--quant",
            "q4_1",
            "--out",
            out,
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("smollm2-135m shape, Q4_1"), "{stdout}");
    path
}

#[tokio::test]
async fn a_synthetic_model_serves_on_the_device_auto_picks() {
    let path = synth_smollm2();
    // Deterministic: the same arguments write the same bytes.
    let again = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synth-again.gguf");
    let (code, _, err) = sluice(
        &[
            "model",
            "synth",
            "--shape",
            "smollm2-135m",
            "--out",
            again.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap(),
        "two runs of model synth wrote different files"
    );
    let _ = std::fs::remove_file(&again);

    let (ops, ops_entry) = new_key("ops", "admin = true");
    let server = Server::with_config(
        &format!(
            "[server]\ndevice = \"auto\"\n\n[[models]]\nname = \"synth\"\npath = \"{}\"\n\n{ops_entry}",
            path.display()
        ),
        &[],
    );
    let admin = server.get_json("/admin/models", &ops).await;
    let m = &admin["data"][0];
    // No GPU on this machine: auto falls back to the CPU whatever the build.
    assert_eq!(m["backend"], "cpu", "{admin}");
    let r: Value = Server::client()
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&ops)
        .json(&json!({"model": "synth", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 8, "{r}");
    // The real model's context length and ChatML prompt.
    let models = server.get_json("/v1/models", &ops).await;
    assert_eq!(models["data"][0]["max_model_len"], 8192, "{models}");
    // "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n": 2 specials,
    // "user", "\n", " there"... a prompt of a dozen-odd tokens, not characters.
    let prompt = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((10..30).contains(&prompt), "{r}");
}

/// The GPU machine's prepared check runs its steps in order and stops at the first
/// failure of a required step with a JSON report: here (no GPU) the CUDA self-check
/// fails and is recorded, the synthetic model is written, and the first CUDA generation
/// stops the check, naming why.
#[test]
fn gpu_check_stops_at_the_first_failing_step_with_a_report() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gpu-check");
    let _ = std::fs::remove_dir_all(&tmp);
    let out = Command::new(root.join("scripts/gpu-check"))
        .env("OUT", tmp.join("out"))
        .env("GPU_CHECK_WORK", tmp.join("work"))
        .env("GPU_CHECK_STAGES", "smoke")
        .env("SLUICE_BIN", env!("CARGO_BIN_EXE_sluice"))
        .output()
        .expect("running scripts/gpu-check");
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.join("out/gpu-check.json")).expect("the report"),
    )
    .expect("JSON report");
    let steps = report["steps"].as_array().expect("steps");
    let status = |i: usize| steps[i]["status"].as_str().unwrap_or_default().to_string();
    assert_eq!(steps.len(), 3, "{report}");
    // The self-check is recorded and the check goes on; the synthetic model is written;
    // the first CUDA generation stops it.
    assert!(status(0).starts_with("failed") && status(0).ends_with("continuing"));
    assert_eq!(status(1), "ok", "{report}");
    assert!(status(2).starts_with("failed"), "{report}");
    for i in [0, 2] {
        // The build's own reason: no CUDA support, or (a CUDA build) no driver here.
        let why = steps[i]["output"].to_string();
        assert!(why.contains("CUDA"), "{report}");
    }
    assert_eq!(
        report["status"],
        "failed at smoke: 8 greedy steps, cuda vs cpu"
    );
}
