//! The Rust client library and `sluice chat` against the real gateway.

use std::io::Write;
use std::process::{Command, Stdio};

use futures_util::StreamExt;
use sluice_client::{
    ChatMessage, ChatRequest, Client, ClientError, CompletionRequest, Sampling, SessionEvent,
};

use crate::support::Server;

const KEY: &str = "sk-sluice-dev";

fn greedy(max_tokens: u32) -> Sampling {
    Sampling {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Sampling::default()
    }
}

#[tokio::test]
async fn the_client_library_speaks_every_endpoint() {
    let server = Server::start(&[]);
    let client = Client::new(&server.base, Some(KEY.into()));
    let models = client.models().await.unwrap();
    assert_eq!(models[0].id, "SmolLM2-135M-Instruct.Q4_1");

    let req = ChatRequest {
        messages: vec![ChatMessage::user("Name three fruits.")],
        sampling: greedy(12),
    };
    let whole = client.chat(&req).await.unwrap();
    assert!(!whole.text().is_empty());
    assert_eq!(whole.usage.completion_tokens, 12);
    let mut stream = client.chat_stream(&req).await.unwrap();
    let (mut text, mut usage) = (String::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(chunk.text());
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, whole.text());
    assert_eq!(usage.unwrap().completion_tokens, 12);

    let creq = CompletionRequest {
        prompt: "Once upon a time".into(),
        sampling: greedy(6),
    };
    let done = client.completion(&creq).await.unwrap();
    let mut s = client.completion_stream(&creq).await.unwrap();
    let mut streamed = String::new();
    while let Some(c) = s.next().await {
        streamed.push_str(c.unwrap().text());
    }
    assert_eq!(streamed, done.text());

    // Errors carry the server's error object.
    let bad = Client::new(&server.base, Some("sk-wrong".into()));
    let e = bad.chat(&req).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(401), Some("invalid_api_key")));
    let e = client.chat(&req.clone().model("nope")).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("model_not_found")));
    let mut hot = req.clone();
    hot.sampling.temperature = Some(9.0);
    match client.chat_stream(&hot).await {
        Err(ClientError::Api { status: 400, error }) => {
            assert_eq!(error.param.as_deref(), Some("temperature"))
        }
        other => panic!("expected a 400, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn the_session_client_sees_a_shared_generation() {
    let server = Server::start(&[]);
    let client = Client::new(&server.base, Some(KEY.into()));
    let mut a = client.join_session("lib", "ann").await.unwrap();
    let mut b = client.join_session("lib", "bob").await.unwrap();
    a.say("Say hello.").await.unwrap();
    a.generate(&greedy(6)).await.unwrap();
    for s in [&mut a, &mut b] {
        let mut text = String::new();
        loop {
            match s.next_event().await.unwrap().expect("open") {
                SessionEvent::Token { text: t, .. } => text.push_str(&t),
                SessionEvent::GenerationDone { finish_reason, .. } => {
                    assert_eq!(finish_reason, "length");
                    break;
                }
                SessionEvent::Error { code, message } => panic!("{code}: {message}"),
                _ => {}
            }
        }
        assert!(!text.is_empty());
    }
    let e = Client::new(&server.base, Some("sk-wrong".into()))
        .join_session("lib", "eve")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.status(), Some(401));
}

fn sluice_chat(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sluice chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn sluice_chat_streams_answers_from_stdin() {
    let server = Server::start(&[]);
    let client = Client::new(&server.base, Some(KEY.into()));
    let first = client
        .chat(&ChatRequest {
            messages: vec![ChatMessage::user("Name a color.")],
            sampling: greedy(10),
        })
        .await
        .unwrap();
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        sluice_chat(
            &["--url", &base, "--max-tokens", "10", "--temperature", "0"],
            "Name a color.\nAnd another one?\n",
        )
    })
    .await
    .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], first.text(), "the first reply");
    assert!(
        !lines[1].is_empty(),
        "the second reply, with the conversation kept"
    );

    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        sluice_chat(
            &[
                "--url",
                &base,
                "--session",
                "cli",
                "--user",
                "zed",
                "--max-tokens",
                "6",
                "--temperature",
                "0",
            ],
            "Say something.\n",
        )
    })
    .await
    .unwrap();
    assert!(out.contains("* session cli, here: zed"), "{out}");
    let reply = out
        .lines()
        .find_map(|l| l.strip_prefix("[assistant, for zed] "))
        .unwrap_or_else(|| panic!("no reply in {out}"));
    assert!(!reply.is_empty());
}
