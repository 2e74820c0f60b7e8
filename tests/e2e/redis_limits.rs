//! Per-key limits shared through Redis (`[limits] store = "redis"`) by two real
//! `sluice serve --engine synthetic` replicas on loopback, against a real `redis-server`
//! (installed by scripts/install-redis when missing) on a free port, without persistence.
//!
//! One test, in phases: a key's requests per minute, tokens per minute and concurrent
//! streams are shared by the replicas (the same 429s and `x-ratelimit-*` headers as the
//! in-memory store); the added latency per request is measured against a replica that
//! counts in memory; then Redis is killed (replica A has `redis_on_error = "allow"`, B
//! `"deny"`: each policy applies at once, the outage is logged once and counted, no
//! request hangs) and restarted on the same port (the replicas find it by themselves and
//! limit again). It fails, never skips, when something cannot run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::gateway::{chat, error_of, hi, new_key};
use crate::support::{metric, metric_sum, Server};

/// A `redis-server` child process on loopback, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts `redis-server` on `port` (no RDB, no AOF) and waits until it answers PING.
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-server");
        let redis = Redis {
            child: Some(child),
            port,
        };
        let t = Instant::now();
        while !redis.answers() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server on port {port} did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "redis-server {} on port {port}: answering after {:.0} ms",
            redis.child.as_ref().unwrap().id(),
            t.elapsed().as_secs_f64() * 1e3
        );
        redis
    }

    /// Whether PING gets PONG.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Sends `signal` (STOP: Redis hangs, its connections open; CONT: it goes on).
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Runs one command; its raw reply (RESP), small enough for one read.
    fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to Redis");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let n = s.read(&mut buf).expect("Redis's reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Writes a config file (not `Server::config_file`, which would fetch the model).
fn config_file(toml: &str, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "sluice-redis-limits-{}-{name}.toml",
        std::process::id()
    ));
    std::fs::write(&path, toml).expect("writing the config");
    path
}

/// A synthetic replica on `config`, logging at info into `logs`.
fn replica(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut args = vec!["--config", config.to_str().expect("utf-8 path")];
    args.extend_from_slice(&["--engine", "synthetic", "--tokens-per-second", "100"]);
    args.extend_from_slice(extra);
    Server::spawn_env(&args, Some("info"), env)
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

fn logs(s: &Server) -> String {
    s.logs.as_ref().unwrap().lock().unwrap().clone()
}

/// Alternates `n` one-token requests with `key` between `a` and `b`; their statuses.
async fn alternate(a: &Server, b: &Server, key: &str, n: usize) -> Vec<reqwest::Response> {
    let mut out = Vec::new();
    for i in 0..n {
        let s = if i % 2 == 0 { a } else { b };
        out.push(chat(s, key, hi(json!({"max_tokens": 1}))).await);
    }
    out
}

/// Median, min and max of `v`, in ms.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::test]
async fn limits_are_shared_by_replicas_through_redis_and_survive_its_outage() {
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/install-redis"))
        .output()
        .expect("scripts/install-redis");
    assert!(
        out.status.success(),
        "installing redis-server failed (it needs root or sudo and Debian's apt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "redis-server: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let mut redis = Redis::start(free_port());

    let (rpm_key, rpm) = new_key("rpm5", "requests_per_minute = 5");
    let (tpm_key, tpm) = new_key("tpm100", "tokens_per_minute = 100");
    let (one_key, one) = new_key("one-stream", "max_concurrent_streams = 1");
    let (bench_key, bench) = new_key(
        "bench",
        "requests_per_minute = 1000000\ntokens_per_minute = 100000000\nmax_concurrent_streams = 1000",
    );
    let keys = format!("{rpm}\n{tpm}\n{one}\n{bench}");
    // A: the URL in the file, fail open. B: the URL in a variable, the store from a flag,
    // fail closed. M: the same keys counted in memory, for the latency baseline.
    let a_cfg = config_file(
        &format!(
            "[limits]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_on_error = \"allow\"\n{keys}",
            redis.url()
        ),
        "a",
    );
    let b_cfg = config_file(
        &format!(
            "[limits]\nredis_url_env = \"SLUICE_TEST_LIMITS_REDIS\"\nredis_on_error = \"deny\"\n{keys}"
        ),
        "b",
    );
    let m_cfg = config_file(&keys, "m");
    let a = replica(&a_cfg, &[], &[]);
    let b = replica(
        &b_cfg,
        &["--limit-store", "redis"],
        &[("SLUICE_TEST_LIMITS_REDIS", &redis.url())],
    );
    let m = replica(&m_cfg, &[], &[]);
    println!(
        "replicas: A {} (allow), B {} (deny), M {} (memory)",
        a.base, b.base, m.base
    );
    for s in [&a, &b] {
        assert_eq!(
            metric(&s.metrics().await, "sluice_limit_store_up"),
            Some(1.0)
        );
    }

    // Requests per minute, shared: 5 in all across both replicas, whichever answers.
    let t = Instant::now();
    let rs = alternate(&a, &b, &rpm_key, 8).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status().as_u16()).collect();
    println!("rpm 5, alternating A/B: {statuses:?}");
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let remaining: Vec<String> = rs
        .iter()
        .map(|r| header(r, "x-ratelimit-remaining-requests"))
        .collect();
    assert_eq!(remaining, ["4", "3", "2", "1", "0", "0", "0", "0"]);
    for r in &rs {
        assert_eq!(header(r, "x-ratelimit-limit-requests"), "5");
    }
    // GCRA: the first request is back after 60/5 = 12 s, the budget full after 60 s.
    let reset = |r: &reqwest::Response| -> f64 {
        let v = header(r, "x-ratelimit-reset-requests");
        v.strip_suffix('s').unwrap().parse().unwrap()
    };
    assert!((11.0..=12.0).contains(&reset(&rs[0])), "{}", reset(&rs[0]));
    assert!((55.0..=60.0).contains(&reset(&rs[4])), "{}", reset(&rs[4]));
    let retry: u64 = header(&rs[5], "retry-after").parse().unwrap();
    let waited = t.elapsed().as_secs();
    assert!(
        (12 - waited.min(11)..=12).contains(&retry),
        "Retry-After {retry} s"
    );
    let mut rs = rs.into_iter();
    let refused = rs.nth(6).unwrap(); // B's
    let v = error_of(refused, 429).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5 requests per minute"),
        "{v}"
    );

    // Tokens per minute, shared: A's charge leaves too little for the same request on B.
    let r = chat(&a, &tpm_key, hi(json!({"max_tokens": 50}))).await;
    assert_eq!(r.status(), 200);
    let after_a: u64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    let usage: Value = r.json().await.unwrap();
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(after_a, 100 - prompt - 50, "charged prompt + max_tokens");
    let r = chat(&b, &tpm_key, hi(json!({"max_tokens": 50}))).await;
    let left: u64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100");
    assert!(
        (after_a..prompt + 50).contains(&left),
        "B sees {left} tokens left"
    );
    let v = error_of(r, 429).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 tokens per minute"),
        "{v}"
    );
    println!(
        "tpm 100: A charged {} tokens, B refused with {left} left",
        prompt + 50
    );

    // Concurrent streams, shared: A's open stream takes the key's only slot.
    let long = hi(json!({"max_tokens": 400, "ignore_eos": true, "stream": true}));
    let first = chat(&a, &one_key, long).await;
    assert_eq!(first.status(), 200);
    let mut body = first.bytes_stream();
    body.next().await.expect("first chunk").unwrap();
    let v = error_of(chat(&b, &one_key, hi(json!({}))).await, 429).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent"),
        "{v}"
    );
    // In Redis: a lease of 30 s at most (a crashed replica's stream stops counting
    // after it), and keys named by the key's SHA-256, never by the key.
    let sha = one
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the entry's key_sha256");
    let set = format!("sluice:key:{sha}:streams");
    let pttl: i64 = redis.command(&["PTTL", &set])[1..].trim().parse().unwrap();
    assert!((20_000..=30_000).contains(&pttl), "lease {pttl} ms");
    assert!(redis.command(&["ZCARD", &set]).starts_with(":1"));
    let names = redis.command(&["KEYS", "*"]);
    assert!(names.contains(&set), "{names}");
    for k in [&rpm_key, &tpm_key, &one_key, &bench_key] {
        assert!(!names.contains(k.as_str()), "a key in Redis: {names}");
    }
    println!("Redis holds {set} (lease {pttl} ms left), no key in clear");
    drop(body);
    let t = Instant::now();
    loop {
        let s = chat(&b, &one_key, hi(json!({"max_tokens": 1})))
            .await
            .status();
        if s == 200 {
            break;
        }
        assert_eq!(s, 429);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "A's ended stream still holds the slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "streams 1: B refused while A streamed, accepted {:.0} ms after A's client left",
        t.elapsed().as_secs_f64() * 1e3
    );

    // The cost: the same requests on M (memory) and A (Redis), interleaved, with a key
    // that has all three limits. `GET /v1/models` is admission alone (a stream slot and a
    // request taken, the token budget read, the slot given back); a chat completion also
    // charges its tokens.
    let client = Server::client();
    let (mut mem, mut red) = (Vec::new(), Vec::new());
    for i in 0..330 {
        for (s, v) in [(&m, &mut mem), (&a, &mut red)] {
            let t = Instant::now();
            let r = client
                .get(format!("{}/v1/models", s.base))
                .bearer_auth(&bench_key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
            r.bytes().await.unwrap();
            if i >= 30 {
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (mm, mmin, mmax) = spread(&mut mem);
    let (rm, rmin, rmax) = spread(&mut red);
    println!(
        "GET /v1/models, {} each: memory median {mm:.3} ms (min {mmin:.3}, max {mmax:.3}); \
         Redis median {rm:.3} ms (min {rmin:.3}, max {rmax:.3}): admission adds {:.3} ms",
        mem.len(),
        rm - mm
    );
    assert!(rm < mm + 25.0, "Redis adds {:.1} ms", rm - mm);
    let (mut mem, mut red) = (Vec::new(), Vec::new());
    for i in 0..55 {
        for (s, v) in [(&m, &mut mem), (&a, &mut red)] {
            let t = Instant::now();
            let r = chat(s, &bench_key, hi(json!({"max_tokens": 1}))).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            if i >= 5 {
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (mm, mmin, mmax) = spread(&mut mem);
    let (rm, rmin, rmax) = spread(&mut red);
    println!(
        "1-token chat completion (synthetic, 100 tokens/s), {} each: memory median {mm:.2} ms \
         (min {mmin:.2}, max {mmax:.2}); Redis median {rm:.2} ms (min {rmin:.2}, max {rmax:.2}): \
         {:+.2} ms",
        mem.len(),
        rm - mm
    );

    // Redis hangs (stopped, its connections open): no request waits more than the call
    // timeout (250 ms) for it; A serves, B refuses; both find it again when it goes on,
    // with its counts intact.
    redis.signal("STOP");
    println!("redis-server stopped (SIGSTOP)");
    for (s, expected) in [(&a, 200), (&b, 503), (&a, 200), (&b, 503)] {
        let t = Instant::now();
        let r = chat(s, &rpm_key, hi(json!({"max_tokens": 1}))).await;
        let took = t.elapsed();
        assert_eq!(r.status(), expected, "{}", s.base);
        assert!(took < Duration::from_secs(1), "a request waited {took:?}");
        println!(
            "  Redis hung: {} answered {expected} in {:.0} ms",
            s.base,
            took.as_secs_f64() * 1e3
        );
    }
    redis.signal("CONT");
    let t = Instant::now();
    for (s, name) in [(&a, "A"), (&b, "B")] {
        while metric(&s.metrics().await, "sluice_limit_store_up") != Some(1.0) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} never found Redis again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let statuses: Vec<u16> = alternate(&a, &b, &rpm_key, 2)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(statuses, [429, 429], "the counts outlived the hang");
    println!(
        "Redis went on (SIGCONT): both replicas limit again after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Redis dies: A serves without the limits, B refuses with 503, neither waits on it.
    redis.kill();
    println!("redis-server killed");
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        for (s, expected) in [(&a, 200), (&b, 503)] {
            let t = Instant::now();
            let r = chat(s, &rpm_key, hi(json!({"max_tokens": 1}))).await;
            worst = worst.max(t.elapsed());
            assert_eq!(r.status(), expected, "{}", s.base);
            if expected == 503 {
                assert!(r.headers().contains_key("retry-after"));
                let v = error_of(r, 503).await;
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("rate limits"),
                    "{v}"
                );
            }
        }
    }
    let t = Instant::now();
    let r = chat(&b, &one_key, hi(json!({"max_tokens": 1}))).await;
    assert_eq!(r.status(), 503, "B's stream slots are refused too");
    let r = chat(&a, &one_key, hi(json!({"max_tokens": 1}))).await;
    assert_eq!(r.status(), 200, "A's are not");
    worst = worst.max(t.elapsed() / 2);
    println!(
        "Redis down: A (allow) 200, B (deny) 503; slowest answer {:.0} ms",
        worst.as_secs_f64() * 1e3
    );
    assert!(worst < Duration::from_secs(1), "a request waited {worst:?}");
    for (s, name) in [(&a, "A"), (&b, "B")] {
        let text = s.metrics().await;
        assert_eq!(metric(&text, "sluice_limit_store_up"), Some(0.0), "{name}");
        let errors = metric_sum(&text, "sluice_limit_store_errors_total", &[]).unwrap_or(0.0);
        assert!(errors >= 1.0, "{name}: no limit-store error counted");
        let l = logs(s);
        // Once per outage: the hang, then the crash.
        assert_eq!(
            l.matches("limits is unreachable").count(),
            2,
            "{name}: each outage is logged once:\n{l}"
        );
        println!("{name}: {errors} limit-store errors counted, each outage logged once");
    }

    // Redis is back (empty) on the same port: both replicas find it and limit again.
    let t = Instant::now();
    let mut redis = Redis::start(redis.port);
    for (s, name) in [(&a, "A"), (&b, "B")] {
        while metric(&s.metrics().await, "sluice_limit_store_up") != Some(1.0) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name} never found Redis again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(logs(s).matches("answers again").count(), 2, "{name}");
    }
    println!(
        "Redis restarted: both replicas limit again after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let statuses: Vec<u16> = alternate(&a, &b, &rpm_key, 7)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    redis.kill();
    for p in [a_cfg, b_cfg, m_cfg] {
        let _ = std::fs::remove_file(p);
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
}
