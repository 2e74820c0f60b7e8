//! Fuzz harnesses for the inputs Sluice takes from strangers: OpenAI request bodies,
//! WebSocket messages, chat templates (a GGUF carries its own) and GGUF files.
//!
//! Each harness runs the server's real parsing and validation code on arbitrary bytes
//! and checks what must hold whatever the input: no panic, no 5xx for a client's
//! mistake, and every accepted request within the documented limits. `cargo fuzz`
//! drives them through `fuzz_targets/`; `tests/corpus.rs` replays the committed corpora
//! and every crash ever found, as an ordinary test.

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use sluice_engine::gguf::GgufFile;
use sluice_engine::text::chat_template::{ChatMessage, ChatTemplate, MAX_RENDERED_BYTES};
use sluice_gateway::api_types::{ChatRequest, CommonParams, CompletionRequest};
use sluice_gateway::error::ApiError;
use sluice_gateway::generation::{build_request, MAX_N};
use sluice_gateway::respond::Flavor;
use sluice_gateway::routes::chat_messages;
use sluice_gateway::routes::completions::{completion_prompt, CompletionPrompt};
use sluice_gateway::sessions::{Membership, SessionHub, MAX_CONVERSATION_BYTES};
use sluice_gateway::structured_output::output_format;
use sluice_gateway::tools::take_tools;
use sluice_gateway::ws_protocol::{ClientMessage, ProtocolError};

/// The default model's template: requests are rendered with what production renders.
pub const SMOLLM_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The default model's context and vocabulary.
const CONTEXT: usize = 8192;
const VOCAB: usize = 49152;

fn smollm() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        ChatTemplate::new(SMOLLM_TEMPLATE, "<|im_start|>", "<|im_end|>").expect("compiles")
    })
}

/// A stand-in for the tokenizer: one id per byte. Validation only looks at ids and
/// their count, and a real tokenizer gives at most one id per byte.
fn byte_ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// A client's mistake must be a 4xx; a 5xx here would be a server bug.
fn assert_client_error(e: &ApiError) {
    let status = e.status().as_u16();
    assert!(
        (400..500).contains(&status),
        "a bad request gave {status}: {e}"
    );
    let body = e.body();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

/// What every accepted request must satisfy.
fn check_accepted(p: &CommonParams, flavor: Flavor, prompt: Vec<u32>) {
    let len = prompt.len();
    // The default model's preset, as `sluice serve` applies it.
    let defaults = sluice_gateway::model_store::default_model().sampling;
    match build_request(p, flavor, prompt, CONTEXT, VOCAB, &defaults) {
        Ok((req, n)) => {
            assert!((1..=MAX_N).contains(&n));
            assert!(req.max_tokens >= 1);
            assert!(req.min_tokens <= req.max_tokens);
            assert!(
                len + req.max_tokens <= CONTEXT,
                "{len} + {}",
                req.max_tokens
            );
            assert!(req.stop.len() <= 16 && req.stop.iter().all(|s| s.len() <= 256));
            assert!(req
                .stop_token_ids
                .iter()
                .chain(req.sampling.logit_bias.iter().map(|(t, _)| t))
                .all(|&t| (t as usize) < VOCAB));
            let s = &req.sampling;
            assert!((0.0..=2.0).contains(&s.temperature));
            assert!(s.top_p > 0.0 && s.top_p <= 1.0);
            assert!(s.logit_bias.iter().all(|(_, b)| b.is_finite()));
        }
        Err(e) => assert_client_error(&e),
    }
}

/// A body for `/v1/chat/completions` or `/v1/completions`: parse, render, validate.
pub fn openai_request(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        // As the chat route does: tools out of the parameters, history flattened for them.
        let mut common = req.common.clone();
        let messages = take_tools(&mut common.rest, req.messages.clone());
        if let Err(e) = output_format(&common) {
            assert_client_error(&e);
        }
        match messages.and_then(|(m, _)| chat_messages(&m)) {
            Ok(msgs) => match smollm().render(&msgs, true) {
                Ok(text) => check_accepted(&common, Flavor::Chat, byte_ids(&text)),
                Err(e) => assert!(e.to_string().contains("exceeds"), "{e}"),
            },
            Err(e) => assert_client_error(&e),
        }
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        match completion_prompt(&req.prompt) {
            Ok(CompletionPrompt::Text(t)) => {
                assert!(!t.is_empty());
                check_accepted(&req.common, Flavor::Completion, byte_ids(t));
            }
            Ok(CompletionPrompt::Tokens(ids)) => {
                assert!(!ids.is_empty());
                check_accepted(&req.common, Flavor::Completion, ids);
            }
            Err(e) => assert_client_error(&e),
        }
    }
}

/// Newline-separated WebSocket text frames from one client, applied to a real session
/// (generation requests are validated, not run).
pub fn ws_message(data: &[u8]) {
    let hub = SessionHub::new(64, std::time::Duration::from_secs(60));
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let kick = Arc::new(tokio::sync::Notify::new());
    let conn = hub.connection_id();
    let mut membership = Membership::new(conn, tx.clone(), kick.clone());
    let mut said = 0usize;
    for frame in data.split(|&b| b == b'\n') {
        let Ok(text) = std::str::from_utf8(frame) else {
            continue;
        };
        match ClientMessage::parse(text) {
            Ok(ClientMessage::Auth { .. }) => {}
            Ok(ClientMessage::Join { session, user }) => {
                assert!(!session.trim().is_empty() && session.chars().count() <= 64);
                membership
                    .join(&hub, &session, user)
                    .expect("far below the session limit");
            }
            Ok(ClientMessage::Leave) => membership.leave(),
            Ok(ClientMessage::Say { content }) => {
                assert!(!content.is_empty());
                if let Some((s, user)) = membership.current() {
                    if s.say(user, &content).is_ok() {
                        said += 1;
                    }
                    let t = s.transcript();
                    assert!(
                        t.iter().map(|(_, c)| c.len()).sum::<usize>() <= MAX_CONVERSATION_BYTES
                    );
                }
            }
            Ok(ClientMessage::Generate(p)) => {
                assert!(p.n.is_none_or(|n| n == 1));
                if let Some((s, _)) = membership.current() {
                    let msgs: Vec<ChatMessage> = s
                        .transcript()
                        .into_iter()
                        .map(|(role, content)| ChatMessage { role, content })
                        .collect();
                    if let Ok(text) = smollm().render(&msgs, true) {
                        check_accepted(&p, Flavor::Chat, byte_ids(&text));
                    }
                }
            }
            Ok(ClientMessage::Cancel) => {
                if let Some((s, _)) = membership.current() {
                    assert!(s.cancel().is_err(), "nothing was started");
                }
            }
            Err(e) => {
                assert!(matches!(
                    e.code(),
                    "bad_request" | "unknown_type" | "invalid_request_error"
                ));
                assert!(!e.to_string().is_empty());
                if let ProtocolError::UnknownType(t) = &e {
                    assert!(!matches!(
                        t.as_str(),
                        "auth" | "join" | "leave" | "say" | "generate" | "cancel"
                    ));
                }
            }
        }
        // Drain what the session sent, as the connection's writer would.
        while rx.try_recv().is_ok() {}
    }
    assert!(said <= data.len());
}

/// A chat template (up to the first NUL) rendered over messages (the rest, as JSON;
/// or the raw rest as one user message when it is not JSON).
pub fn chat_template(data: &[u8]) {
    let (src, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(src) = std::str::from_utf8(src) else {
        return;
    };
    let messages: Vec<ChatMessage> = match serde_json::from_slice::<Value>(rest) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap_or("user").to_string(),
                content: m["content"].as_str().unwrap_or("").to_string(),
            })
            .collect(),
        _ => vec![ChatMessage {
            role: "user".into(),
            content: String::from_utf8_lossy(rest).into_owned(),
        }],
    };
    let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") else {
        return;
    };
    for add_generation_prompt in [false, true] {
        if let Ok(out) = t.render(&messages, add_generation_prompt) {
            assert!(out.len() <= MAX_RENDERED_BYTES);
        }
    }
}

/// A GGUF file: parse, read the config, tokenizer and weights, and run one token
/// through a model that loads.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let file = Arc::new(file);
    for t in file.tensors.values() {
        // Every tensor the reader accepted lies inside the file.
        let _ = file.tensor_bytes(t);
    }
    if let Ok(tok) = sluice_engine::text::tokenizer::Tokenizer::load(&file, None) {
        if let Ok(ids) = tok.encode("Hello, wörld! 123", true) {
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            let _ = tok.decode(&ids, true);
        }
        if let Some(src) = file
            .meta("tokenizer.chat_template")
            .and_then(|v| v.as_str())
        {
            chat_template(src.as_bytes());
        }
    }
    // One thread, so no worker is spawned per input.
    let Ok(pool) = sluice_engine::backends::cpu::thread_pool::ThreadPool::new(1) else {
        return;
    };
    let Ok(model) =
        sluice_engine::backends::cpu::model::Model::from_gguf(file, std::sync::Arc::new(pool))
    else {
        return;
    };
    let cfg = model.cfg.clone();
    // Keep the fuzzer fast: run the forward pass only for small models.
    if cfg.dim * cfg.vocab_size > 1 << 22 || cfg.n_layers > 8 {
        return;
    }
    let mut kv = sluice_engine::backends::cpu::kv_cache::KvCache::new(&cfg, 1);
    let mut scratch = sluice_engine::backends::cpu::model::ForwardScratch::default();
    let chunk = sluice_engine::backends::SeqChunk {
        tokens: &[0],
        start_pos: 0,
        block_table: &[0],
        want_logits: true,
        decode_from: 1,
        device_greedy: false,
    };
    let logits = model.forward(&[chunk], &mut kv, &mut scratch);
    assert_eq!(logits.len(), cfg.vocab_size);
}
