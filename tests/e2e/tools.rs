//! Tool calling on the real model: required and named calls constrained to each
//! function's schema, calls parsed out of free text under `auto`, streamed as OpenAI's
//! `tool_calls` deltas, tool results in the history, and the errors.

use serde_json::{json, Value};

use crate::gateway::{chat, error_of};
use crate::support::Server;

const DEV: &str = "sk-sluice-dev";

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["city", "unit"],
                           "properties": {"city": {"type": "string", "maxLength": 30},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "Local time in a city",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["city"],
                           "properties": {"city": {"type": "string", "maxLength": 30}}}}},
    ])
}

fn ask(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                       "tools": tools(), "max_tokens": 100, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Checks one call against the tools' schemas; returns its function name.
fn check_call(c: &Value) -> String {
    assert_eq!(c["type"], "function", "{c}");
    assert!(
        c["id"].as_str().is_some_and(|id| id.starts_with("call_")),
        "{c}"
    );
    let name = c["function"]["name"].as_str().unwrap().to_string();
    let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {c}"));
    assert!(args["city"].is_string(), "{c}");
    match name.as_str() {
        "get_weather" => {
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
            assert_eq!(args.as_object().unwrap().len(), 2);
        }
        "get_time" => assert_eq!(args.as_object().unwrap().len(), 1),
        other => panic!("unknown function {other}"),
    }
    name
}

/// The calls of a streamed response, assembled from its deltas, and its finish reason.
fn assemble(sse: &str) -> (Vec<Value>, String, String) {
    let mut calls: Vec<Value> = Vec::new();
    let (mut content, mut finish) = (String::new(), String::new());
    for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let k = d["index"].as_u64().unwrap() as usize;
            if d.get("id").is_some() {
                assert_eq!(k, calls.len(), "calls start in order: {line}");
                assert_eq!(
                    d["function"]["arguments"], "",
                    "the head comes alone: {line}"
                );
                calls.push(d.clone());
            } else {
                let args = calls[k]["function"]["arguments"]
                    .as_str()
                    .unwrap()
                    .to_string();
                calls[k]["function"]["arguments"] =
                    json!(args + d["function"]["arguments"].as_str().unwrap());
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (calls, content, finish)
}

#[tokio::test]
async fn required_and_named_calls_follow_the_schemas_streamed_or_not() {
    let server = Server::start(&[]);
    // Required, one call.
    let v: Value = chat(
        &server,
        DEV,
        ask(json!({"tool_choice": "required", "parallel_tool_calls": false})),
    )
    .await
    .json()
    .await
    .unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], Value::Null, "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    check_call(&calls[0]);

    // Named: only that function, in every choice (sampled), streamed the same as whole.
    // (One call each: with parallel calls allowed, this small model repeats its call until
    // max_tokens.)
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}},
                       "parallel_tool_calls": false, "n": 2, "temperature": 0.9, "seed": 5});
    let v: Value = chat(&server, DEV, ask(named.clone()))
        .await
        .json()
        .await
        .unwrap();
    for choice in v["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        for c in choice["message"]["tool_calls"].as_array().unwrap() {
            assert_eq!(check_call(c), "get_time");
        }
    }
    let mut one = ask(named);
    one["n"] = json!(1);
    let whole: Value = chat(&server, DEV, one.clone()).await.json().await.unwrap();
    one["stream"] = json!(true);
    let sse = chat(&server, DEV, one).await.text().await.unwrap();
    let (calls, content, finish) = assemble(&sse);
    assert_eq!(finish, "tool_calls");
    assert_eq!(content, "");
    let want = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), want.len(), "{sse}");
    for (got, want) in calls.iter().zip(want) {
        assert_eq!(got["function"], want["function"], "streamed vs whole");
    }
}

#[tokio::test]
async fn auto_parses_calls_the_model_writes_and_keeps_plain_answers() {
    let server = Server::start(&[]);
    // The small model never writes a call on its own; a regex makes it write one, so
    // that the parsing of free text is what is tested.
    let forced = "Checking\\.\\n<tool_call>\\n\\{\"name\": \"get_weather\", \"arguments\": \\{\"city\": \"(Paris|Lyon)\", \"unit\": \"celsius\"\\}\\}\\n</tool_call>";
    let body = ask(json!({"tool_choice": "auto", "guided_regex": forced}));
    let v: Value = chat(&server, DEV, body.clone()).await.json().await.unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], "Checking.", "{v}");
    assert_eq!(
        check_call(&choice["message"]["tool_calls"][0]),
        "get_weather"
    );

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let sse = chat(&server, DEV, streamed).await.text().await.unwrap();
    let (calls, content, finish) = assemble(&sse);
    assert_eq!(
        (content.as_str(), finish.as_str()),
        ("Checking.", "tool_calls"),
        "{sse}"
    );
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0]["function"],
        choice["message"]["tool_calls"][0]["function"]
    );

    // No call written: a plain answer, as without tools.
    let v: Value = chat(&server, DEV, ask(json!({"max_tokens": 12})))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // The round trip: the call and its result in the history.
    let history = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
    ]);
    let r = chat(
        &server,
        DEV,
        ask(json!({"messages": history, "max_tokens": 20})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{v}"
    );
}

#[tokio::test]
async fn bad_tool_requests_are_refused_by_field() {
    let server = Server::start(&[]);
    for (extra, param) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0]",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                   "tool_choice": "required"}),
            "tools",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}]}),
            "messages[0].tool_calls",
        ),
    ] {
        let v = error_of(chat(&server, DEV, ask(extra.clone())).await, 400).await;
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // Plain completions have no tools: refused by name, not ignored.
    let r = Server::client()
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth(DEV)
        .json(&json!({"prompt": "hi", "max_tokens": 2, "tools": tools()}))
        .send()
        .await
        .unwrap();
    let v = error_of(r, 400).await;
    assert_eq!(v["error"]["param"], "tools");
}
