//! Details of OpenAI's and vLLM's APIs that clients and routers rely on: retrieving one
//! model, `refusal` in chat objects, vLLM/SGLang extension fields that routers add to
//! every body, and vLLM's render endpoints.

use serde_json::{json, Value};

use crate::gateway::{chat, error_of, hi, new_key};
use crate::support::Server;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const DEV: &str = "sk-sluice-dev";

async fn post(server: &Server, path: &str, key: &str, body: Value) -> reqwest::Response {
    Server::client()
        .post(format!("{}{path}", server.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn get(server: &Server, path: &str, key: &str) -> reqwest::Response {
    Server::client()
        .get(format!("{}{path}", server.base))
        .bearer_auth(key)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn one_model_is_retrieved_by_name_or_alias_as_the_key_may_see_it() {
    let (alice, alice_entry) = new_key("alice", "models = [\"org/small\"]");
    let server = Server::with_config(
        &format!(
            "[[models]]\nname = \"org/small\"\npath = \"{{model}}\"\naliases = [\"smol\"]\n\n\
             [[models]]\nname = \"other\"\npath = \"{{model}}\"\n\n{alice_entry}"
        ),
        &[],
    );
    let listed: Value = get(&server, "/v1/models", &alice)
        .await
        .json()
        .await
        .unwrap();
    let want = listed["data"][0].clone();
    assert_eq!(want["id"], "org/small", "{listed}");
    // A name with a slash, and an alias, give the same object as the list.
    for path in ["/v1/models/org/small", "/v1/models/smol"] {
        let r = get(&server, path, &alice).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap(), want, "{path}");
    }
    let v = error_of(get(&server, "/v1/models/nope", &alice).await, 404).await;
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    let v = error_of(get(&server, "/v1/models/other", &alice).await, 403).await;
    assert_eq!(v["error"]["code"], "model_not_allowed", "{v}");
    error_of(get(&server, "/v1/models/org/small", "sk-wrong").await, 401).await;
}

#[tokio::test]
async fn chat_messages_and_logprobs_carry_a_null_refusal() {
    let server = Server::start(&[]);
    let body = hi(json!({"logprobs": true, "top_logprobs": 2, "temperature": 0}));
    let v: Value = chat(&server, DEV, body.clone()).await.json().await.unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["refusal"], Value::Null, "{v}");
    assert!(
        choice["message"]
            .as_object()
            .unwrap()
            .contains_key("refusal"),
        "{v}"
    );
    assert!(choice["logprobs"]
        .as_object()
        .unwrap()
        .contains_key("refusal"));
    assert_eq!(choice["logprobs"]["content"].as_array().unwrap().len(), 2);

    let mut stream = body;
    stream["stream"] = json!(true);
    let text = chat(&server, DEV, stream).await.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let with_logprobs: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["logprobs"])
        .filter(|l| !l.is_null())
        .collect();
    assert!(!with_logprobs.is_empty(), "{text}");
    for l in with_logprobs {
        assert!(l.as_object().unwrap().contains_key("refusal"), "{l}");
    }
}

/// The bodies vllm-router 0.1.17 forwards (recorded from it): the client's request plus
/// these fields.
fn as_vllm_router_sends(mut body: Value, chat: bool) -> Value {
    let added = if chat {
        json!({"logprobs": false, "no_stop_trim": false, "ignore_eos": false,
               "continue_final_message": false, "skip_special_tokens": true,
               "separate_reasoning": true, "stream_reasoning": true,
               "return_hidden_states": false, "include_reasoning": true})
    } else {
        json!({"echo": false, "no_stop_trim": false, "ignore_eos": false,
               "skip_special_tokens": true, "return_hidden_states": false})
    };
    for (k, v) in added.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn router_extension_fields_are_accepted_and_unhonourable_values_named() {
    let server = Server::start(&[]);
    let plain = hi(json!({"temperature": 0, "max_tokens": 8}));
    let want: Value = chat(&server, DEV, plain.clone())
        .await
        .json()
        .await
        .unwrap();
    let routed = as_vllm_router_sends(plain.clone(), true);
    let r = chat(&server, DEV, routed).await;
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.unwrap();
    assert_eq!(
        got["choices"][0]["message"], want["choices"][0]["message"],
        "the extension fields change nothing"
    );
    let completion =
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let r = post(
        &server,
        "/v1/completions",
        DEV,
        as_vllm_router_sends(completion, false),
    )
    .await;
    assert_eq!(r.status(), 200);

    // Values that would change the output and that this server cannot honour are refused
    // with the field named, never silently ignored.
    for (field, value) in [
        ("skip_special_tokens", json!(false)),
        ("continue_final_message", json!(true)),
        ("echo", json!(true)),
        ("return_hidden_states", json!(true)),
        ("no_stop_trim", json!(true)),
        ("include_reasoning", json!("yes")),
    ] {
        let mut body = hi(json!({}));
        body[field] = value.clone();
        let v = error_of(chat(&server, DEV, body).await, 400).await;
        assert_eq!(v["error"]["param"], field, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field) && message.contains(&value.to_string()),
            "{message}"
        );
    }

    // `add_generation_prompt: false` renders the conversation without opening the
    // assistant's turn: the prompt is shorter than with the default.
    let tokens = |add: bool| {
        let server = &server;
        async move {
            let v: Value = post(
                server,
                "/v1/chat/completions/render",
                DEV,
                hi(json!({"add_generation_prompt": add})),
            )
            .await
            .json()
            .await
            .unwrap();
            v["token_ids"].as_array().unwrap().len()
        }
    };
    assert!(tokens(false).await < tokens(true).await);
}

#[tokio::test]
async fn render_gives_the_prompt_tokens_and_parameters_a_request_would_run_with() {
    let server = Server::start(&[]);
    let messages = json!([{"role": "user", "content": "Name three colors."}]);
    let tokenized: Value = post(&server, "/tokenize", DEV, json!({"messages": messages}))
        .await
        .json()
        .await
        .unwrap();
    let r = post(
        &server,
        "/v1/chat/completions/render",
        DEV,
        json!({"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0.5,
               "stop": ["\n"], "seed": 7, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_ids"], tokenized["tokens"], "{v}");
    assert_eq!(v["model"], MODEL);
    assert!(v["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["stream"], true);
    let p = &v["sampling_params"];
    assert_eq!(p["max_tokens"], 5, "{v}");
    assert_eq!(p["temperature"], 0.5);
    assert_eq!(p["stop"], json!(["\n"]));
    assert_eq!(p["seed"], 7);
    assert_eq!(p["n"], 1);

    // Completions: a list, one rendered request per prompt; the tokens are the prompt's.
    let tokenized: Value = post(&server, "/tokenize", DEV, json!({"prompt": "Once upon"}))
        .await
        .json()
        .await
        .unwrap();
    let v: Value = post(
        &server,
        "/v1/completions/render",
        DEV,
        json!({"prompt": "Once upon", "max_tokens": 3}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["token_ids"], tokenized["tokens"]);

    // A request that generation would refuse is refused the same way, and rendering
    // generates nothing.
    for (path, body, param) in [
        (
            "/v1/chat/completions/render",
            hi(json!({"temperature": 7})),
            "temperature",
        ),
        (
            "/v1/chat/completions/render",
            hi(json!({"max_tokens": 1_000_000})),
            "max_tokens",
        ),
        (
            "/v1/completions/render",
            json!({"prompt": [1, 99999999]}),
            "prompt",
        ),
        ("/v1/completions/render", json!({"prompt": ""}), "prompt"),
    ] {
        let v = error_of(post(&server, path, DEV, body).await, 400).await;
        assert_eq!(v["error"]["param"], param, "{path}: {v}");
    }
    let v = error_of(
        post(
            &server,
            "/v1/chat/completions/render",
            DEV,
            hi(json!({"model": "nope"})),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");
    error_of(
        post(
            &server,
            "/v1/chat/completions/render",
            "sk-wrong",
            hi(json!({})),
        )
        .await,
        401,
    )
    .await;
    let m = server.metrics().await;
    assert!(
        !m.contains("sluice_generation_tokens_total"),
        "rendering generated tokens:\n{m}"
    );
}
