//! The Responses API over raw HTTP: the event stream's order and numbering (text and
//! function calls), stored responses per key, `store: false`, deletion, and errors.

use serde_json::{json, Value};

use crate::gateway::{error_of, new_key};
use crate::support::Server;

const DEV: &str = "sk-sluice-dev";

async fn post(server: &Server, key: &str, body: Value) -> reqwest::Response {
    Server::client()
        .post(format!("{}/v1/responses", server.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn get(server: &Server, key: &str, id: &str) -> reqwest::Response {
    Server::client()
        .get(format!("{}/v1/responses/{id}", server.base))
        .bearer_auth(key)
        .send()
        .await
        .expect("request")
}

/// `(event, data)` of each SSE event, checking that `event:` names the data's `type`.
fn events(sse: &str) -> Vec<(String, Value)> {
    sse.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap();
            let data: Value =
                serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap())
                    .unwrap();
            assert_eq!(data["type"], name, "{e}");
            (name.to_string(), data)
        })
        .collect()
}

#[tokio::test]
async fn streamed_calls_arrive_as_typed_events_in_order() {
    let server = Server::start(&[]);
    let tools = json!([{"type": "function", "name": "get_weather", "strict": true,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false}}]);
    let body = json!({"input": "What is the weather in Paris?", "tools": tools,
                      "tool_choice": {"type": "function", "name": "get_weather"},
                      "parallel_tool_calls": false, "max_output_tokens": 60,
                      "temperature": 0, "stream": true});
    let sse = post(&server, DEV, body.clone()).await.text().await.unwrap();
    let ev = events(&sse);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    for (i, (_, d)) in ev.iter().enumerate() {
        assert_eq!(d["sequence_number"], i, "numbered from 0: {sse}");
    }
    assert_eq!(
        names[..3],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(ev[2].1["item"]["type"], "function_call");
    assert_eq!(ev[2].1["item"]["name"], "get_weather");
    let deltas: String = ev
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_string())
        .collect();
    let done = ev
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done.1["arguments"], deltas.as_str());
    assert!(serde_json::from_str::<Value>(&deltas).unwrap()["city"].is_string());
    assert_eq!(
        names[names.len() - 2..],
        ["response.output_item.done", "response.completed"]
    );
    let last = &ev.last().unwrap().1["response"];
    assert_eq!(last["status"], "completed");
    assert_eq!(last["output"][0]["arguments"], deltas.as_str());
    // The same request unstreamed gives the same call; both are stored.
    let mut whole = body;
    whole["stream"] = json!(false);
    let v: Value = post(&server, DEV, whole).await.json().await.unwrap();
    assert_eq!(v["output"][0]["arguments"], deltas.as_str());
    let stored: Value = get(&server, DEV, last["id"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(&stored, last);
}

#[tokio::test]
async fn stored_responses_belong_to_their_key_and_can_be_deleted() {
    let (alice, alice_entry) = new_key("alice", "");
    let (bob, bob_entry) = new_key("bob", "");
    let server = Server::with_config(
        &format!("[[models]]\nname = \"m\"\npath = \"{{model}}\"\n\n{alice_entry}\n{bob_entry}"),
        &[],
    );
    let r: Value = post(
        &server,
        &alice,
        json!({"input": "Hi", "max_output_tokens": 4}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = r["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"), "{r}");
    assert_eq!(get(&server, &alice, id).await.status(), 200);
    let v = error_of(get(&server, &bob, id).await, 404).await;
    assert_eq!(v["error"]["code"], "not_found");
    let v = error_of(
        post(
            &server,
            &bob,
            json!({"input": "Hi", "previous_response_id": id}),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(v["error"]["param"], "previous_response_id");
    // Deletion: once, by its owner.
    let del = |key: String| {
        let server = &server;
        async move {
            Server::client()
                .delete(format!("{}/v1/responses/{id}", server.base))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(del(bob.clone()).await.status(), 404);
    let d: Value = del(alice.clone()).await.json().await.unwrap();
    assert_eq!(
        d,
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    assert_eq!(get(&server, &alice, id).await.status(), 404);

    // store: false keeps nothing, and says so.
    let r: Value = post(
        &server,
        &alice,
        json!({"input": "Hi", "max_output_tokens": 4, "store": false}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r["store"], false);
    assert_eq!(
        get(&server, &alice, r["id"].as_str().unwrap())
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn unsupported_responses_requests_are_refused_by_field() {
    let server = Server::start(&[]);
    for (body, param) in [
        (
            json!({"input": [{"type": "input_image", "image_url": "x"}]}),
            "input[0]",
        ),
        (
            json!({"input": "x", "tools": [{"type": "web_search_preview"}]}),
            "tools[0]",
        ),
        (
            json!({"input": "x", "reasoning": {"effort": "high"}}),
            "reasoning",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}),
            "response_format",
        ),
        (json!({"input": "x", "temperature": 5}), "temperature"),
        (json!({"model": "x"}), "input"),
    ] {
        let v = error_of(post(&server, DEV, body.clone()).await, 400).await;
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
}
