//! Sluice behind vllm-router (the vLLM production-stack router, PyPI `vllm-router`, in a
//! venv the test creates under target/): two `sluice serve` workers on loopback, every
//! request through the router, under `round_robin` and `cache_aware` (which renders
//! prompts through `/v1/chat/completions/render` and `/v1/completions/render`).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{metric_sum, Server};

const VLLM_ROUTER: &str = "vllm-router==0.1.17";
const DEV: &str = "sk-sluice-dev";

/// The router's launcher, installed into a venv on first use.
fn router_bin() -> PathBuf {
    crate::support::python_venv("vllm-router-venv", VLLM_ROUTER).join("bin/vllm-router")
}

/// A running vllm-router, killed on drop.
struct Router {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Router {
    fn start(policy: &str, workers: &[&Server]) -> Router {
        let bin = router_bin();
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let port = free_port();
        // Its own Prometheus listener too: the default port is fixed, and two routers
        // (two tests at once) would collide on it.
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "sluice-vllm-router-{}-{policy}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log).expect("router log file");
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
            .arg(metrics_port.to_string())
            .args(["--policy", policy, "--api-key", DEV, "--log-level", "debug"])
            .arg("--worker-urls")
            .args(workers.iter().map(|w| w.base.as_str()))
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        let child = cmd.spawn().expect("starting vllm-router");
        Router {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the router answers `/v1/models` through a healthy worker.
    async fn wait_ready(&self) {
        let t = Instant::now();
        loop {
            if let Ok(r) = Server::client()
                .get(format!("{}/v1/models", self.base))
                .bearer_auth(DEV)
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "vllm-router never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let r = Server::client()
            .post(format!("{}{path}", self.base))
            .bearer_auth(DEV)
            .json(&body)
            .send()
            .await
            .expect("request through the router");
        (r.status().as_u16(), r.text().await.expect("body"))
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Six requests of each kind a client sends: chat and completions, streamed or not.
async fn six_requests(router: &Router) {
    let chat = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 6, "temperature": 0,
                      "messages": [{"role": "user", "content": "Name three colors."}]});
    let completion = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 6,
                            "temperature": 0, "prompt": "The capital of France is"});
    for stream in [false, true] {
        for (path, body) in [
            ("/v1/chat/completions", &chat),
            ("/v1/completions", &completion),
            ("/v1/chat/completions", &chat),
        ] {
            let mut body = body.clone();
            body["stream"] = json!(stream);
            let (status, text) = router.post(path, body).await;
            assert_eq!(
                status,
                200,
                "{path} stream={stream}: {text}\nrouter log:\n{}",
                router.log()
            );
            if stream {
                assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
            } else {
                let v: Value = serde_json::from_str(&text).expect("JSON body");
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
                assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
            }
        }
    }
}

fn requests(m: &str, route: &str) -> f64 {
    metric_sum(m, "sluice_http_requests_total", &[("route", route)]).unwrap_or(0.0)
}

#[tokio::test]
async fn vllm_router_round_robin_spreads_every_request_over_two_workers() {
    let (a, b) = (Server::start(&[]), Server::start(&[]));
    let router = Router::start("round_robin", &[&a, &b]);
    router.wait_ready().await;
    six_requests(&router).await;
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let generation = |m: &str| requests(m, "/v1/chat/completions") + requests(m, "/v1/completions");
    assert_eq!(generation(&ma) + generation(&mb), 6.0, "{ma}\n{mb}");
    assert!(
        generation(&ma) >= 2.0 && generation(&mb) >= 2.0,
        "round robin left a worker idle:\n{ma}\n{mb}"
    );
}

#[tokio::test]
async fn vllm_router_cache_aware_renders_prompts_on_the_workers() {
    let (a, b) = (Server::start(&[]), Server::start(&[]));
    let router = Router::start("cache_aware", &[&a, &b]);
    router.wait_ready().await;
    six_requests(&router).await;
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let both = |route: &str| requests(&ma, route) + requests(&mb, route);
    // Every request was rendered first (the router renders on the workers it scores;
    // status 200 everywhere: no fallback to /tokenize).
    let ok_renders = |route: &str| {
        metric_sum(
            &ma,
            "sluice_http_requests_total",
            &[("route", route), ("status", "200")],
        )
        .unwrap_or(0.0)
            + metric_sum(
                &mb,
                "sluice_http_requests_total",
                &[("route", route), ("status", "200")],
            )
            .unwrap_or(0.0)
    };
    assert!(
        ok_renders("/v1/chat/completions/render") >= 4.0,
        "{ma}\n{mb}"
    );
    assert!(ok_renders("/v1/completions/render") >= 2.0, "{ma}\n{mb}");
    assert_eq!(
        both("/v1/chat/completions/render") + both("/v1/completions/render"),
        ok_renders("/v1/chat/completions/render") + ok_renders("/v1/completions/render"),
        "a render failed:\n{ma}\n{mb}"
    );
    assert_eq!(both("/tokenize"), 0.0, "the router fell back to /tokenize");
    assert_eq!(both("/v1/chat/completions") + both("/v1/completions"), 6.0);
    // Cache-aware: the router learnt each prompt's text from Sluice's renders and
    // recognised every repeat (match rate 1), sending it where its first copy went.
    // Asserted on the router's own decisions, in request order: chat, completion,
    // chat, chat, completion, chat.
    let log = router.log();
    let decisions = cache_decisions(&log);
    assert_eq!(decisions.len(), 6, "{decisions:?}\nrouter log:\n{log}");
    for (i, first) in [(2, 0), (3, 0), (4, 1), (5, 0)] {
        assert_eq!(decisions[i].1, 1.0, "{decisions:?}\nrouter log:\n{log}");
        assert_eq!(
            decisions[i].0, decisions[first].0,
            "{decisions:?}\nrouter log:\n{log}"
        );
    }
}

/// The cache-aware policy's decisions in the router's debug log: (worker, match rate).
fn cache_decisions(log: &str) -> Vec<(String, f64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let plain: String = strip_ansi(line);
        let rest = &plain[plain.find(&format!("{name}="))? + name.len() + 1..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| l.contains("Cache prefix decision"))
        .filter_map(|l| {
            let rate = field(l, "match_rate")?.parse().ok()?;
            Some((field(l, "selected")?, rate))
        })
        .collect()
}

/// The text of a log line without its colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
