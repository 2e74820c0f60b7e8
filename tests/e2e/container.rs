//! The container image: `scripts/container-test` builds the top-level Dockerfile around
//! the binary this suite built (its `prebuilt` stage) with podman, lints the Dockerfile
//! with hadolint, and runs the image as a deployment would: the image's own command on
//! 0.0.0.0 with a mounted keys file and the models folder mounted read-only, a streamed
//! chat completion, SIGTERM in the middle of a stream (the stream ends with
//! `data: [DONE]`, the container exits 0), HTTPS, and the failures that must be one clear
//! line: no keys, no model and no network. It installs what it needs on first use
//! (podman and friends with apt-get, a Debian base made with mmdebstrap, hadolint from
//! PyPI); anything it cannot do fails the test with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sluice crate lives in the repository root")
        .to_path_buf()
}

#[test]
fn container_image_serves_streams_and_drains() {
    let root = repo_root();
    let models = support::model_path()
        .parent()
        .expect("the default model lives in a models folder")
        .to_path_buf();
    let out_dir = root.join("target/container-test");
    std::fs::create_dir_all(&out_dir).expect("creating target/container-test");
    let summary = out_dir.join("summary.json");
    let _ = std::fs::remove_file(&summary);
    let started = std::time::Instant::now();
    let out = Command::new(root.join("scripts/container-test"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg("--models")
        .arg(&models)
        .arg("--json")
        .arg(&summary)
        .current_dir(&root)
        .output()
        .expect("running scripts/container-test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!(
        "scripts/container-test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        out.status.success(),
        "scripts/container-test failed ({}):\n{}",
        out.status,
        lines[lines.len().saturating_sub(30)..].join("\n")
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&summary).expect("the script wrote its JSON summary"),
    )
    .expect("the JSON summary parses");
    assert_eq!(report["ok"].as_bool(), Some(true), "{report}");
    for field in [
        "image_bytes",
        "cold_start_health_seconds",
        "sigterm_to_exit_seconds",
        "no_model_seconds",
    ] {
        assert!(
            report[field].is_number(),
            "the summary has no {field}: {report}"
        );
    }
    for field in ["no_model_message", "no_keys_message"] {
        let msg = report[field].as_str().unwrap_or_default();
        assert!(
            msg.contains("error: "),
            "{field} has no error line: {msg:?}"
        );
    }
}
