//! Sampling and serving features over HTTP: stop strings, logprobs, `n`, parameter
//! validation, and cancellation seen through `/metrics`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{metric_sum, Server};

const KEY: &str = "Bearer sk-sluice-dev";

async fn call(server: &Server, path: &str, body: Value) -> (u16, String) {
    let resp = Server::client()
        .post(format!("{}{path}", server.base))
        .header("Authorization", KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

async fn ok_json(server: &Server, path: &str, body: Value) -> Value {
    let (status, text) = call(server, path, body).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("JSON body")
}

/// The `data:` payloads of an SSE body, `[DONE]` excluded (and required last).
fn sse_chunks(raw: &str) -> Vec<Value> {
    let data: Vec<&str> = raw
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{raw}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect()
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them_and_never_leak() {
    let server = Server::start(&[]);
    let base = json!({"prompt": "A list of fruits: apples, pears,", "max_tokens": 32,
                      "temperature": 0, "ignore_eos": true});
    let free = ok_json(&server, "/v1/completions", base.clone()).await;
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string taken from the middle of the greedy text (3 characters).
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "{full:?}");
    let stop: String = chars[12..15].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];

    let mut req = base.clone();
    req["stop"] = json!(["never-appears", stop]);
    let v = ok_json(&server, "/v1/completions", req.clone()).await;
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    req["stream"] = json!(true);
    let (status, raw) = call(&server, "/v1/completions", req).await;
    assert_eq!(status, 200);
    let chunks = sse_chunks(&raw);
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn logprobs_in_chat_and_completions() {
    let server = Server::start(&[]);
    let v = ok_json(
        &server,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6,
               "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    let mut text = String::new();
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["token"], top[0]["token"]);
        assert_eq!(e["logprob"], top[0]["logprob"]);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0);
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4);
        assert!(e["bytes"].is_array());
        text.push_str(e["token"].as_str().unwrap());
    }
    assert_eq!(text, v["choices"][0]["message"]["content"]);

    let v = ok_json(
        &server,
        "/v1/completions",
        json!({"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0, "ignore_eos": true,
               "logprobs": 2}),
    )
    .await;
    let lp = &v["choices"][0]["logprobs"];
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[k].as_array().map(Vec::len), Some(4), "{k}: {lp}");
    }
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn n_choices_streamed_and_not_with_reproducible_seeds() {
    let server = Server::start(&[]);
    let req = json!({"messages": [{"role": "user", "content": "Write a word."}], "max_tokens": 8,
                     "temperature": 1.0, "seed": 42, "n": 3, "ignore_eos": true});
    let a = ok_json(&server, "/v1/chat/completions", req.clone()).await;
    let b = ok_json(&server, "/v1/chat/completions", req.clone()).await;
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");
    assert_eq!(a["usage"]["completion_tokens"], 24);

    let mut s = req.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let (status, raw) = call(&server, "/v1/chat/completions", s).await;
    assert_eq!(status, 200);
    let chunks = sse_chunks(&raw);
    let mut texts = vec![String::new(); 3];
    let mut finished = 0;
    for c in &chunks {
        if let Some(choice) = c["choices"].get(0) {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            finished += choice["finish_reason"].is_string() as usize;
        }
    }
    assert_eq!(finished, 3);
    for i in 0..3 {
        assert_eq!(
            texts[i],
            a["choices"][i]["message"]["content"].as_str().unwrap()
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 24);
}

#[tokio::test]
async fn bad_sampling_parameters_are_400_naming_the_field() {
    let server = Server::start(&[]);
    let msg = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"n": 17}), "n"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"1": 500}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (
            json!({"stop": (0..17).map(|i| i.to_string()).collect::<Vec<_>>()}),
            "stop",
        ),
        (json!({"stop": 5}), "stop"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"max_tokens": 4, "min_tokens": 5}), "min_tokens"),
        (json!({"stop_token_ids": [99999999]}), "stop_token_ids"),
    ];
    for (extra, param) in cases {
        let mut body = json!({"messages": msg, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, text) = call(&server, "/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{param}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{text}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}

/// The value of an unlabelled metric in Prometheus text.
#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_slot_and_blocks() {
    let server = Server::start(&[]);
    let client = Server::client();
    let resp = client
        .post(format!("{}/v1/chat/completions", server.base))
        .header("Authorization", KEY)
        .json(
            &json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": 4000, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = body.next().await.unwrap().unwrap();
        seen += chunk.windows(6).filter(|w| w == b"data: ").count();
    }
    let during = server.metrics().await;
    assert_eq!(
        metric_sum(&during, "sluice_requests_running", &[]),
        Some(1.0),
        "{during}"
    );
    assert!(metric_sum(&during, "sluice_kv_cache_usage_ratio", &[]).unwrap() > 0.0);
    drop(body);
    let t = Instant::now();
    loop {
        let m = server.metrics().await;
        if metric_sum(&m, "sluice_requests_running", &[]) == Some(0.0)
            && metric_sum(&m, "sluice_kv_cache_usage_ratio", &[]) == Some(0.0)
        {
            let cancelled = [("reason", "cancelled")];
            assert_eq!(
                metric_sum(&m, "sluice_requests_finished_total", &cancelled),
                Some(1.0),
                "{m}"
            );
            for name in [
                "sluice_step_duration_seconds_bucket",
                "sluice_prefix_cache_hit_ratio",
            ] {
                assert!(m.contains(name), "{name} missing:\n{m}");
            }
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "slot not freed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_models(server: &Server) -> Value {
    Server::client()
        .get(format!("{}/v1/models", server.base))
        .header("Authorization", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn requests_that_leave_sampling_out_get_the_models_defaults() {
    // The default model's catalogue preset, then a configured override of one field.
    let preset = Server::start(&[]);
    let models = get_models(&preset).await;
    assert_eq!(
        models["data"][0]["sampling_defaults"],
        json!({"temperature": 0.2, "top_p": 0.9}),
        "{models}"
    );
    drop(preset);
    let server = Server::with_config(
        "[[models]]\nname = \"m\"\npath = \"{model}\"\nsampling = { temperature = 0.0 }\n",
        &[],
    );
    let models = get_models(&server).await;
    // The configured field wins; the others still come from the preset.
    assert_eq!(
        models["data"][0]["sampling_defaults"],
        json!({"temperature": 0.0, "top_p": 0.9}),
        "{models}"
    );
    let ask = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                           "max_tokens": 24, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // No temperature sent: the default 0 is greedy, whatever the seed.
    let greedy = text(
        &ok_json(
            &server,
            "/v1/chat/completions",
            ask(json!({"temperature": 0})),
        )
        .await,
    );
    for seed in [1, 2, 3] {
        let v = ok_json(&server, "/v1/chat/completions", ask(json!({"seed": seed}))).await;
        assert_eq!(text(&v), greedy, "seed {seed}");
    }
    // A request that sets the field gets what it asked for: at temperature 2 over the
    // whole vocabulary, three seeds do not all give the greedy text.
    let mut differ = 0;
    for seed in [1, 2, 3] {
        let v = ok_json(
            &server,
            "/v1/chat/completions",
            ask(json!({"seed": seed, "temperature": 2, "top_p": 1})),
        )
        .await;
        differ += usize::from(text(&v) != greedy);
    }
    assert!(differ > 0, "temperature 2 was not applied");
}
