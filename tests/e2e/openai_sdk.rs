//! The gateway driven by the official `openai` Python SDK (in a venv the test creates
//! under target/, pinned below): models, chat and completions streamed and not, and the
//! SDK's typed exceptions for 401, 404 and 400.

use std::path::PathBuf;
use std::process::Command;

use crate::support::Server;

const OPENAI_SDK: &str = "openai==3.54.0";

/// A Python with the pinned SDK installed, created on first use.
fn sdk_python() -> PathBuf {
    crate::support::python_venv("openai-sdk-venv", OPENAI_SDK).join("bin/python")
}

#[test]
fn the_official_openai_sdk_works_unchanged() {
    let python = sdk_python();
    let server = Server::start(&[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/openai_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .args([&server.base, "sk-sluice-dev", "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .expect("running the SDK script");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "SDK script failed:\n{stdout}\n{stderr}"
    );
}
