//! `/metrics` read by the real Prometheus tools (Debian's, unpacked by
//! scripts/install-prometheus): `promtool check metrics` lints the exposition (help text
//! on every family, names, types), and a Prometheus server scrapes Sluice with a scrape
//! key and answers queries on what it scraped.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::gateway::{chat, hi, new_key};
use crate::support::Server;

/// The folder holding `prometheus` and `promtool`, installed on first use.
fn prometheus_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/install-prometheus"))
        .output()
        .expect("scripts/install-prometheus");
    assert!(
        out.status.success(),
        "installing Prometheus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn promtool_accepts_the_exposition_and_prometheus_scrapes_it() {
    let bin = prometheus_bin();
    let (user, user_entry) = new_key("user", "");
    let (scrape, scrape_hash) = sluice_gateway::auth::new_key();
    let server = Server::with_config(
        &format!(
            "[metrics]\nrequire_key = true\nkey_sha256 = \"{scrape_hash}\"\n\n\
             [[models]]\nname = \"m\"\npath = \"{{model}}\"\n\n{user_entry}"
        ),
        &[],
    );
    // Traffic, so that every kind of family (counters, gauges, histograms) is exposed.
    let r = chat(&server, &user, hi(json!({"stream": true}))).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let text = Server::client()
        .get(format!("{}/metrics", server.base))
        .bearer_auth(&scrape)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help text for {name}:\n{text}"
        );
    }

    let mut lint = Command::new(bin.join("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The one finding allowed: the colon in the `vllm:` families, which keep vLLM's own
    // names on purpose (routers written for vLLM read them; vLLM's exposition draws the
    // same finding). Every other family must be clean.
    let findings: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("vllm:") && l.ends_with("metric names should not contain ':'")))
        .collect();
    assert!(
        said.contains("vllm:num_requests_waiting"),
        "the vLLM families are in the exposition: {said}"
    );
    assert!(
        findings.is_empty(),
        "promtool check metrics: {}\n{text}",
        findings.join("\n")
    );

    // A Prometheus server scraping with the scrape key, as a deployment would.
    let dir = std::env::temp_dir().join(format!("sluice-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = server.base.trim_start_matches("http://");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    \
         authorization:\n      credentials: {scrape}\n    static_configs:\n      \
         - targets: ['{target}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let _prometheus = Killed(
        Command::new(bin.join("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus"),
    );
    let query = |q: &'static str| {
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        async move {
            let r = Server::client()
                .get(url)
                .query(&[("query", q)])
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            v["data"]["result"].as_array().cloned()
        }
    };
    let t = Instant::now();
    loop {
        let up = query("up{job=\"sluice\"} == 1").await.unwrap_or_default();
        let served =
            query("sluice_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}")
                .await
                .unwrap_or_default();
        if !up.is_empty() && !served.is_empty() {
            assert_eq!(served[0]["value"][1], "1", "{served:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "Prometheus never scraped Sluice:\n{}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
