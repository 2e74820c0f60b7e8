//! The browser page in a real browser: Debian's chromium, headless, driven by
//! playwright-core (both installed by scripts/install-browser). Screenshots land in
//! target/browser-test/.

use std::path::PathBuf;
use std::process::Command;

use crate::support::Server;

#[test]
fn the_browser_page_streams_a_chat_and_shares_a_session() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ok = Command::new(root.join("scripts/install-browser"))
        .status()
        .expect("scripts/install-browser")
        .success();
    assert!(ok, "installing chromium and playwright-core failed");
    let server = Server::start(&[]);
    let dir = root.join("target/browser-test");
    let module = dir.join("node_modules/playwright-core/index.mjs");
    let out = Command::new("node")
        .arg(root.join("tests/browser/chat.mjs"))
        .arg(&server.base)
        .arg(&dir)
        .env("PLAYWRIGHT_CORE", &module)
        .output()
        .expect("node");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("result JSON");
    assert!(!v["reply"].as_str().unwrap().is_empty());
    assert!(dir.join("browser-chat.png").is_file());
}
