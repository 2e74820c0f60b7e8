//! HTTPS and HTTP/2: a self-signed certificate made here with `openssl`, clients `curl
//! --http2` / `--http1.1` / `--http2-prior-knowledge` (real clients, real ALPN), the
//! certificate reloaded without a restart (file change and SIGHUP), and the connection
//! defences on the new paths (TLS handshake timeout, silent and idle HTTP/2 connections,
//! the advertised stream limit) checked on raw sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{metric, Server};

/// A fresh folder under target/ for this test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-tls")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Writes a self-signed P-256 certificate for `localhost`/127.0.0.1 with common name `cn`
/// to `cert`/`key`.
fn make_cert(cert: &Path, key: &Path, cn: &str) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl (Debian's openssl package) is needed to make the test certificate");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What curl printed and the HTTP version it used.
struct Curl {
    body: String,
    version: String,
}

fn curl(args: &[&str], url: &str) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "-N", "-v", "--max-time", "30"])
        .args(args)
        .args(["-w", "\n%{http_version}"])
        .arg(url)
        .output()
        .expect("curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "curl {args:?} {url} failed:\n{trace}");
    let (body, version) = stdout.rsplit_once('\n').expect("curl's -w line");
    Curl {
        body: body.to_string(),
        version: version.to_string(),
    }
}

const CHAT: &str = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}"#;

/// A streamed chat completion with `args`: checks it streamed every chunk and `[DONE]`,
/// returns curl's HTTP version.
fn stream_chat(base: &str, args: &[&str]) -> String {
    let mut all = vec![
        "-H",
        "authorization: Bearer sk-sluice-dev",
        "-H",
        "content-type: application/json",
        "-d",
        CHAT,
    ];
    all.extend_from_slice(args);
    let c = curl(&all, &format!("{base}/v1/chat/completions"));
    let chunks = c.body.lines().filter(|l| l.starts_with("data: {")).count();
    assert!(
        c.body.trim_end().ends_with("data: [DONE]") && chunks >= 8,
        "{args:?}: {chunks} chunks, body:\n{}",
        c.body
    );
    c.version
}

/// The certificate's subject as curl's trace shows it, if curl trusts it with `ca`.
fn served_subject(base: &str, ca: &Path) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(format!("{base}/health"))
        .output()
        .expect("curl");
    let trace = String::from_utf8_lossy(&out.stderr);
    let subject = trace
        .lines()
        .find_map(|l| l.strip_prefix("*  subject: "))
        .map(str::to_string);
    out.status.success().then_some(subject).flatten()
}

/// Polls until `f` is true, at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A counter's value, 0 when it has not been counted yet.
fn count(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or(0.0)
}

fn metrics_of(base: &str, ca: &Path) -> String {
    curl(
        &["--cacert", ca.to_str().unwrap()],
        &format!("{base}/metrics"),
    )
    .body
}

fn addr(base: &str) -> String {
    base.split("://").nth(1).expect("scheme").to_string()
}

/// Reads from `s` until the peer closes; returns the bytes and how long it took.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    s.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, start.elapsed())
            }
            Err(e) => panic!("the server kept the connection open past {limit:?}: {e}"),
        }
    }
}

#[test]
fn https_serves_http2_and_http1_streams_and_reloads_its_certificate() {
    let dir = scratch("https");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    make_cert(&cert, &key, "first");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        "[limits]\ntls_handshake_timeout_seconds = 1\nheader_read_timeout_seconds = 2\n",
    )
    .unwrap();
    let server = Server::spawn_env(
        &[
            "--engine",
            "synthetic",
            "--tokens-per-second",
            "400",
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        None,
        &[],
    );
    let base = server.base.clone();
    assert!(base.starts_with("https://"), "{base}");
    // The hostname, so curl checks the certificate's name too.
    let base = base.replace("127.0.0.1", "localhost");
    let resolve = format!(
        "localhost:{}:127.0.0.1",
        addr(&base).rsplit(':').next().unwrap()
    );
    let ca = cert.to_str().unwrap().to_string();
    let tls = ["--cacert", ca.as_str(), "--resolve", resolve.as_str()];

    // SSE over HTTP/2 (ALPN h2) and over HTTP/1.1, on the same port.
    let v2 = stream_chat(&base, &[&tls[..], &["--http2"]].concat());
    assert_eq!(v2, "2", "curl --http2 over TLS did not get HTTP/2");
    let v1 = stream_chat(&base, &[&tls[..], &["--http1.1"]].concat());
    assert_eq!(v1, "1.1");
    let m = metrics_of(&base, &cert);
    assert!(
        count(
            &m,
            "sluice_connections_served_total{protocol=\"h2\",tls=\"true\"}"
        ) >= 1.0
            && count(
                &m,
                "sluice_connections_served_total{protocol=\"http1\",tls=\"true\"}"
            ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        served_subject(&server.base, &cert).as_deref(),
        Some("CN=first")
    );

    // A new pair written over the files is served without a restart.
    let (cert2, key2) = (dir.join("cert2.pem"), dir.join("key2.pem"));
    make_cert(&cert2, &key2, "second");
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || served_subject(
            &server.base,
            &cert2
        )
        .as_deref()
            == Some("CN=second")),
        "the new certificate was not picked up"
    );
    // A broken file is not used: the pair in use stays, and the failure is counted.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    assert!(
        eventually(Duration::from_secs(15), || count(
            &metrics_of(&server.base, &cert2),
            "sluice_tls_reloads_total{result=\"error\"}"
        ) >= 1.0),
        "the broken certificate was not noticed"
    );
    assert_eq!(
        served_subject(&server.base, &cert2).as_deref(),
        Some("CN=second")
    );
    // SIGHUP reloads even when no file changed (here: the good pair put back, then a
    // reload forced and counted).
    std::fs::copy(&cert2, &cert).unwrap();
    assert!(eventually(Duration::from_secs(15), || {
        count(
            &metrics_of(&server.base, &cert2),
            "sluice_tls_reloads_total{result=\"ok\"}",
        ) >= 2.0
    }));
    let ok_before = count(
        &metrics_of(&server.base, &cert2),
        "sluice_tls_reloads_total{result=\"ok\"}",
    );
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    assert!(
        eventually(Duration::from_secs(10), || count(
            &metrics_of(&server.base, &cert2),
            "sluice_tls_reloads_total{result=\"ok\"}"
        ) > ok_before),
        "SIGHUP did not reload"
    );

    // A client that opens a connection and never says hello is cut off by the handshake
    // timeout (1 s here), and counted.
    let mut silent = TcpStream::connect(addr(&server.base)).unwrap();
    let (_, took) = read_to_close(&mut silent, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let m = metrics_of(&server.base, &cert2);
    assert!(
        count(
            &m,
            "sluice_tls_handshake_failures_total{reason=\"timeout\"}"
        ) >= 1.0,
        "{m}"
    );
    // Plaintext on the TLS port is a failed handshake, not a hang.
    let mut plain = TcpStream::connect(addr(&server.base)).unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let (_, took) = read_to_close(&mut plain, Duration::from_secs(10));
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// HTTP/2 frames: (type, flags, stream, payload).
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
        let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        if at + 9 + len > bytes.len() {
            break;
        }
        out.push((kind, flags, stream, bytes[at + 9..at + 9 + len].to_vec()));
        at += 9 + len;
    }
    out
}

#[test]
fn h2c_with_prior_knowledge_streams_limits_streams_and_closes_idle_connections() {
    let dir = scratch("h2c");
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        "[limits]\nhttp2_max_concurrent_streams = 7\nheader_read_timeout_seconds = 2\n",
    )
    .unwrap();
    let server = Server::spawn_env(
        &[
            "--engine",
            "synthetic",
            "--tokens-per-second",
            "400",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
        &[],
    );
    let base = server.base.clone();
    // h2c for internal hops, and HTTP/1.1 on the same port.
    assert_eq!(stream_chat(&base, &["--http2-prior-knowledge"]), "2");
    assert_eq!(stream_chat(&base, &["--http1.1"]), "1.1");

    // The server's SETTINGS advertise the stream limit and the header list size.
    let mut s = TcpStream::connect(addr(&base)).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // our empty SETTINGS
    let started = Instant::now();
    let (bytes, took) = read_to_close(&mut s, Duration::from_secs(15));
    let frames = h2_frames(&bytes);
    let settings = frames
        .iter()
        .find(|f| f.0 == 4 && f.1 & 1 == 0)
        .expect("the server's SETTINGS frame");
    let values: Vec<(u16, u32)> = settings
        .3
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        values.contains(&(3, 7)),
        "MAX_CONCURRENT_STREAMS: {values:?}"
    );
    assert!(
        values.contains(&(6, 65536)),
        "MAX_HEADER_LIST_SIZE: {values:?}"
    );
    // With no stream opened, the connection is idle: GOAWAY after the header timeout
    // (2 s here), then closed.
    assert!(
        frames.iter().any(|f| f.0 == 7),
        "no GOAWAY before close: {frames:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && started.elapsed() < Duration::from_secs(10),
        "idle HTTP/2 connection closed after {took:?}"
    );

    // A plaintext client that never sends a byte is let go after the header timeout.
    let mut silent = TcpStream::connect(addr(&base)).unwrap();
    let (_, took) = read_to_close(&mut silent, Duration::from_secs(15));
    assert!(took < Duration::from_secs(8), "closed after {took:?}");

    // The drain: SIGTERM during an HTTP/2 stream (GOAWAY) lets it finish, then exits 0.
    let long = CHAT.replace("\"max_tokens\":8", "\"max_tokens\":600");
    let url = format!("{base}/v1/chat/completions");
    let stream = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-sS", "-N", "--max-time", "60", "--http2-prior-knowledge"])
            .args(["-H", "authorization: Bearer sk-sluice-dev"])
            .args(["-H", "content-type: application/json", "-d", &long])
            .arg(url)
            .output()
            .expect("curl")
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut server = server;
    assert_eq!(server.terminate(), Some(0), "the server's exit code");
    let out = stream.join().unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    let chunks = body.lines().filter(|l| l.starts_with("data: {")).count();
    assert!(
        out.status.success() && body.trim_end().ends_with("data: [DONE]") && chunks >= 600,
        "the stream did not finish through the drain ({chunks} chunks): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_and_keys_file_mistakes_stop_start_up_with_one_clear_line() {
    let dir = scratch("check");
    let check = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--check-config"])
            .args(args)
            .output()
            .expect("sluice");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    make_cert(&cert, &key, "check");
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (ok, out) = check(&["--tls-cert", c, "--tls-key", k]);
    assert!(
        ok && out.contains("configuration is valid") && out.contains("HTTPS"),
        "{out}"
    );
    let (ok, out) = check(&["--tls-cert", c]);
    assert!(!ok && out.contains("tls_key is not"), "{out}");
    let missing = dir.join("missing.pem");
    let (ok, out) = check(&["--tls-cert", missing.to_str().unwrap(), "--tls-key", k]);
    assert!(
        !ok && out.contains("cannot read TLS certificate") && out.contains("missing.pem"),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    // A key that belongs to another certificate.
    let (cert2, key2) = (dir.join("cert2.pem"), dir.join("key2.pem"));
    make_cert(&cert2, &key2, "other");
    let (ok, out) = check(&["--tls-cert", c, "--tls-key", key2.to_str().unwrap()]);
    assert!(!ok && out.contains("do not go together"), "{out}");

    // Keys from a file (a mounted secret): they count as keys, so a non-loopback bind is
    // accepted; a bad file is named.
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nname = \"alice\"\nkey_sha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
    )
    .unwrap();
    let (ok, out) = check(&["--host", "0.0.0.0", "--keys-file", keys.to_str().unwrap()]);
    assert!(ok && out.contains("1 key(s)"), "{out}");
    let (ok, out) = check(&["--host", "0.0.0.0"]);
    assert!(!ok && out.contains("no [[keys]] are configured"), "{out}");
    std::fs::write(&keys, "[[keys]]\nname = \"bob\"\nkey = \"plain\"\n").unwrap();
    let (ok, out) = check(&["--keys-file", keys.to_str().unwrap()]);
    assert!(!ok && out.contains("keys.toml"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
