//! Structured outputs on the real model: every way clients ask for them (OpenAI's
//! `response_format`, vLLM's `structured_outputs` and `guided_*`), streamed or not, with
//! `n` choices, and the errors for formats that cannot be used.

use serde_json::{json, Value};

use crate::gateway::{chat, error_of, hi};
use crate::support::Server;

const DEV: &str = "sk-sluice-dev";

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                       "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "colors"],
        "additionalProperties": false,
    })
}

/// Checks `v` against [`person_schema`] by hand.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(o.len(), 3, "{text}");
    assert!(
        v["name"].as_str().is_some_and(|n| n.chars().count() <= 20),
        "{text}"
    );
    assert!(v["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
    let colors = v["colors"].as_array().unwrap();
    assert!((1..=3).contains(&colors.len()), "{text}");
    assert!(colors
        .iter()
        .all(|c| ["red", "green", "blue"].contains(&c.as_str().unwrap())));
}

fn ask(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "Describe a person as JSON."}],
                       "max_tokens": 80, "temperature": 0.8, "seed": 1});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn json_schemas_hold_for_every_choice_streamed_or_not() {
    let server = Server::start(&[]);
    let rf = json!({"type": "json_schema",
                    "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    let r = chat(&server, DEV, ask(json!({"response_format": rf, "n": 3}))).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    for c in v["choices"].as_array().unwrap() {
        // The object closes well within max_tokens, and generation stops there.
        assert_eq!(c["finish_reason"], "stop", "{v}");
        assert_person(c["message"]["content"].as_str().unwrap());
    }

    let mut streamed = ask(json!({"response_format": rf, "stream": true}));
    streamed["temperature"] = json!(0);
    let text = chat(&server, DEV, streamed.clone())
        .await
        .text()
        .await
        .unwrap();
    let mut content = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        content.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert_person(&content);
    // The same request unstreamed gives the same text.
    streamed["stream"] = json!(false);
    let v: Value = chat(&server, DEV, streamed).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], content.as_str());
}

#[tokio::test]
async fn json_object_regex_choice_and_lark_constrain_the_text() {
    let server = Server::start(&[]);
    let content = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // json_object: any object; the model may fill max_tokens before closing it, so
    // ask for enough and check what a closed one looks like.
    let v: Value = chat(
        &server,
        DEV,
        ask(json!({"response_format": {"type": "json_object"}, "max_tokens": 120, "temperature": 0})),
    )
    .await
    .json()
    .await
    .unwrap();
    let text = content(&v);
    assert!(text.starts_with('{'), "{text}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(&text).unwrap().is_object(),
            "{text}"
        );
    }

    for seed in 0..3 {
        let v: Value = chat(
            &server,
            DEV,
            ask(json!({"guided_regex": "[A-Z][a-z]{2,8} (is|was) [0-9]{1,2}", "seed": seed})),
        )
        .await
        .json()
        .await
        .unwrap();
        let text = content(&v);
        let (name, rest) = text.split_once(' ').unwrap();
        assert!(
            name.chars().next().unwrap().is_ascii_uppercase() && (3..=9).contains(&name.len()),
            "{text}"
        );
        let (verb, n) = rest.split_once(' ').unwrap();
        assert!(
            ["is", "was"].contains(&verb) && n.parse::<u32>().is_ok_and(|n| n < 100),
            "{text}"
        );

        let v: Value = chat(
            &server,
            DEV,
            ask(json!({"structured_outputs": {"choice": ["yes", "no", "maybe later"]}, "seed": seed})),
        )
        .await
        .json()
        .await
        .unwrap();
        assert!(
            ["yes", "no", "maybe later"].contains(&content(&v).as_str()),
            "{v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        let grammar = "start: \"(\" num (\"+\" num)* \")\"\nnum: /[1-9][0-9]?/";
        let v: Value = chat(
            &server,
            DEV,
            ask(
                json!({"structured_outputs": {"grammar": grammar}, "seed": seed, "max_tokens": 40}),
            ),
        )
        .await
        .json()
        .await
        .unwrap();
        let text = content(&v);
        if v["choices"][0]["finish_reason"] == "stop" {
            let inner = text
                .strip_prefix('(')
                .and_then(|t| t.strip_suffix(')'))
                .unwrap();
            assert!(inner.split('+').all(|n| n.parse::<u32>().is_ok()), "{text}");
        } else {
            assert!(text.starts_with('('), "{text}");
        }
    }
}

#[tokio::test]
async fn formats_that_cannot_be_used_are_refused_with_the_problem_named() {
    let server = Server::start(&[]);
    for (extra, param, says) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}),
            "response_format",
            "frobnicate",
        ),
        (
            json!({"guided_regex": "(unclosed"}),
            "guided_regex",
            "regex",
        ),
        (
            json!({"guided_grammar": "root ::= \"a\""}),
            "guided_grammar",
            "GBNF",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "yaml",
        ),
        (
            json!({"guided_choice": ["a"], "response_format": {"type": "json_object"}}),
            "guided_choice",
            "set one",
        ),
    ] {
        let v = error_of(chat(&server, DEV, hi(extra.clone())).await, 400).await;
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&says.to_lowercase()),
            "{extra}: {message}"
        );
    }
    // The server keeps serving.
    assert_eq!(chat(&server, DEV, hi(json!({}))).await.status(), 200);

    // Filler text cannot follow a grammar: the synthetic engine says so.
    let synthetic = Server::with_config("[[models]]\nname = \"s\"\nengine = \"synthetic\"\n", &[]);
    let v = error_of(
        chat(
            &synthetic,
            DEV,
            hi(json!({"response_format": {"type": "json_object"}})),
        )
        .await,
        400,
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("synthetic"),
        "{v}"
    );
}
