//! `scripts/local-cluster --synthetic --engines 2`, run as a user runs it (with this suite's
//! binary, free ports and a state folder of its own): Redis, two synthetic engines and
//! two gateways on loopback. Chat requests, streamed and not, go through both gateways
//! and reach both engines (which take only the engine key); a key allowed N requests per
//! minute gets exactly N across both gateways, then 429 (the count is in Redis); SIGTERM
//! to the script stops every process it started, each exiting 0. It fails, never skips,
//! when something cannot run (redis-server is installed by the script when missing).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::gateway::new_key;
use crate::support::{metric, metric_sum, Server};
use crate::upstreams::events;

/// The script, in a process group of its own; on drop (a failed assertion), the whole
/// group and every process the script recorded are killed.
struct Cluster {
    script: Child,
    state: PathBuf,
    /// Everything the script printed, stdout and stderr.
    output: Arc<Mutex<String>>,
}

impl Cluster {
    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// `name pid` of every process the script started (its `pids` file).
    fn pids(&self) -> Vec<(String, u32)> {
        let text = std::fs::read_to_string(self.state.join("pids")).expect("the pids file");
        text.lines()
            .map(|l| {
                let (name, pid) = l.split_once(' ').expect("`name pid`");
                (name.to_string(), pid.parse().expect("a pid"))
            })
            .collect()
    }

    /// The variables of `cluster.env`, unquoted.
    fn env(&self) -> HashMap<String, String> {
        let text = std::fs::read_to_string(self.state.join("cluster.env")).expect("cluster.env");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if matches!(self.script.try_wait(), Ok(None)) {
            let group = format!("-{}", self.script.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.script.wait();
        }
        if let Ok(text) = std::fs::read_to_string(self.state.join("pids")) {
            for pid in text.lines().filter_map(|l| l.split_once(' ')).map(|p| p.1) {
                if running(pid.parse().unwrap_or(0)) {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // `pid (comm) STATE ...`: the state follows the last parenthesis.
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Appends every line of `from` to `into`.
fn collect(from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let mut o = into.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
}

/// Starts `scripts/local-cluster ARGS` and waits until it says the cluster is ready.
fn start(args: &[&str], state: &Path) -> Cluster {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/local-cluster");
    let mut child = Command::new(&script)
        .args(args)
        .arg("--state")
        .arg(state)
        .args(["--binary", env!("CARGO_BIN_EXE_sluice")])
        .env("SLUICE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
    let output = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().unwrap(), output.clone());
    collect(child.stderr.take().unwrap(), output.clone());
    let mut cluster = Cluster {
        script: child,
        state: state.to_path_buf(),
        output,
    };
    let t = Instant::now();
    while !cluster.output().contains("local-cluster: ready") {
        if let Some(status) = cluster.script.try_wait().expect("try_wait") {
            std::thread::sleep(Duration::from_millis(100)); // the last lines
            panic!(
                "scripts/local-cluster exited ({status}) before the cluster was ready:\n{}",
                cluster.output()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the cluster was not ready within 60 s:\n{}",
            cluster.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "scripts/local-cluster ready after {:.1} s:\n{}",
        t.elapsed().as_secs_f64(),
        cluster.output()
    );
    cluster
}

async fn post_chat(base: &str, key: &str, body: &Value) -> reqwest::Response {
    Server::client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {base}/v1/chat/completions: {e}"))
}

async fn metrics(base: &str) -> String {
    Server::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {base}/metrics: {e}"))
        .text()
        .await
        .expect("metrics body")
}

fn body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "synthetic", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "stream": stream})
}

#[tokio::test]
async fn the_local_cluster_script_runs_two_gateways_sharing_limits_over_two_engines() {
    let started = Instant::now();
    let state = std::env::temp_dir().join(format!("sluice-local-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("the state folder");
    // A key with a limit, added to the gateways' own with --keys-file.
    let (rpm_key, rpm_entry) = new_key("rpm5", "requests_per_minute = 5");
    let keys_file = state.join("extra-keys.toml");
    std::fs::write(&keys_file, rpm_entry).expect("writing the keys file");
    let mut cluster = start(
        &[
            "--synthetic",
            "--engines",
            "2",
            "--tokens-per-second",
            "200",
            "--base-port",
            "0",
            "--grace",
            "5",
            "--keys-file",
            keys_file.to_str().unwrap(),
        ],
        &state,
    );
    let env = cluster.env();
    let gateways: Vec<String> = env["GATEWAY_URLS"].split(' ').map(String::from).collect();
    let engines: Vec<String> = env["ENGINE_URLS"].split(' ').map(String::from).collect();
    assert_eq!((gateways.len(), engines.len()), (2, 2), "{env:?}");
    assert_eq!(env["MODEL"], "synthetic", "{env:?}");
    let key = |file: &str| {
        std::fs::read_to_string(&env[file])
            .unwrap()
            .trim()
            .to_string()
    };
    let (client_key, engine_key) = (key("CLIENT_KEY_FILE"), key("ENGINE_KEY_FILE"));
    let pids = cluster.pids();
    let names: Vec<&str> = pids.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        names,
        ["redis", "engine-1", "engine-2", "gateway-1", "gateway-2"],
        "{pids:?}"
    );
    assert!(pids.iter().all(|p| running(p.1)), "{pids:?}");

    // Both gateways answer, streamed and not, with the model the engines serve.
    let mut chats = 0.0;
    for g in &gateways {
        let r = post_chat(g, &client_key, &body("Hello", 5, false)).await;
        assert_eq!(r.status(), 200, "{g}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert_eq!(v["model"], "synthetic", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
        let r = post_chat(g, &client_key, &body("Hello", 6, true)).await;
        assert_eq!(r.status(), 200, "{g}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let ev = events(&r.text().await.unwrap());
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
        let text: String = ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).expect("a JSON event"))
            .filter_map(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert!(!text.is_empty(), "no content streamed: {ev:?}");
        assert!(!ev.iter().any(|e| e.contains("\"error\"")), "{ev:?}");
        chats += 2.0;
    }
    // The engines take the engine key only: the client's is refused there.
    for e in &engines {
        let r = post_chat(e, &client_key, &body("Hello", 1, false)).await;
        assert_eq!(r.status(), 401, "{e} took the client's key");
    }
    let r = post_chat(&engines[0], &engine_key, &body("Hello", 1, false)).await;
    assert_eq!(r.status(), 200, "the engine key works on the engine");
    let direct = [1.0, 0.0];

    // Requests per minute, counted once across both gateways (in Redis).
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for i in 0..7 {
        let r = post_chat(&gateways[i % 2], &rpm_key, &body("hi", 1, false)).await;
        statuses.push(r.status().as_u16());
        remaining.push(
            r.headers()
                .get("x-ratelimit-remaining-requests")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        );
        if r.status() == 200 {
            chats += 1.0;
        }
    }
    println!(
        "requests_per_minute = 5, alternating the gateways: {statuses:?}, remaining {remaining:?}"
    );
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(remaining, ["4", "3", "2", "1", "0", "0", "0"]);

    // Concurrent streams through one gateway spread over both engines.
    let streams = (0..8).map(|i| {
        let (g, k) = (&gateways[0], &client_key);
        async move {
            let r = post_chat(g, k, &body(&format!("question {i}"), 20, true)).await;
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
    });
    futures_util::future::join_all(streams).await;
    chats += 8.0;

    // Every chat answered went to an engine, and both engines served some.
    let mut served = Vec::new();
    for (e, d) in engines.iter().zip(direct) {
        let m = metrics(e).await;
        let ok = [("route", "/v1/chat/completions"), ("status", "200")];
        served.push(metric_sum(&m, "sluice_http_requests_total", &ok).unwrap_or(0.0) - d);
    }
    println!("chat completions served through the gateways, by engine: {served:?}");
    assert_eq!(served.iter().sum::<f64>(), chats, "{served:?}");
    assert!(
        served.iter().all(|&n| n >= 1.0),
        "an engine served nothing: {served:?}"
    );
    for g in &gateways {
        let m = metrics(g).await;
        assert_eq!(metric(&m, "sluice_limit_store_up"), Some(1.0), "{g}");
        assert_eq!(
            metric_sum(&m, "sluice_upstream_healthy", &[]),
            Some(2.0),
            "{g}"
        );
    }

    // SIGTERM to the script stops everything it started, cleanly.
    let t = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &cluster.script.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let status = loop {
        if let Some(s) = cluster.script.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the script did not stop within 30 s of SIGTERM:\n{}",
            cluster.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100)); // the last lines
    let out = cluster.output();
    println!(
        "stopped in {:.1} s ({status}):\n{}",
        t.elapsed().as_secs_f64(),
        &out[out.find("Stop with").unwrap_or(0)..]
    );
    assert_eq!(status.code(), Some(0), "{out}");
    for (name, pid) in &pids {
        assert!(!running(*pid), "{name} ({pid}) still runs");
        assert!(
            out.contains(&format!("{name} (pid {pid}) stopped (exit 0)")),
            "{name} did not stop cleanly:\n{out}"
        );
    }
    assert!(
        !state.join("local-cluster.pid").exists(),
        "the script left its pid file"
    );
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
}
