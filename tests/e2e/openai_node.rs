//! The gateway driven by the official `openai` Node SDK (installed with npm into
//! target/openai-node-sdk on first use, pinned below): streamed chat and streamed tool
//! calls, chunk by chunk and through the SDK's stream helper.

use std::path::PathBuf;
use std::process::Command;

use crate::support::Server;

const OPENAI_NODE: &str = "openai@7.59.0";

/// The folder whose node_modules holds the pinned SDK.
fn sdk_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/openai-node-sdk");
    let version = OPENAI_NODE.split('@').nth(1).unwrap_or_default();
    let installed = std::fs::read_to_string(dir.join("node_modules/openai/package.json"))
        .is_ok_and(|p| p.contains(&format!("\"version\": \"{version}\"")));
    if !installed {
        std::fs::create_dir_all(&dir).expect("target/openai-node-sdk");
        let ok = Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir)
            .arg(OPENAI_NODE)
            .status()
            .expect("npm (Node.js is needed for this test)")
            .success();
        assert!(ok, "installing {OPENAI_NODE} failed");
    }
    dir
}

#[test]
fn the_official_openai_node_sdk_streams_chat_and_tool_calls() {
    let dir = sdk_dir();
    // Node resolves `openai` from the script's folder upwards: run a copy beside
    // node_modules.
    let script = dir.join("openai_node.mjs");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/openai_node.mjs"),
        &script,
    )
    .expect("copying the script");
    let server = Server::start(&[]);
    let out = Command::new("node")
        .arg(&script)
        .args([&server.base, "sk-sluice-dev", "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .expect("node");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim() == "OK",
        "Node SDK script failed:\n{stdout}\n{stderr}"
    );
}
