//! OpenAI's Responses API in terms of chat: a request's `input` items, `instructions`
//! and stored history become chat messages, its options chat parameters; the generated
//! text becomes output items (a `message` with `output_text`, `function_call`s), whole or
//! as the typed stream events.

use serde_json::{json, Map, Value};
use sluice_engine::Usage;

use crate::api_types::{CommonParams, InMessage};
use crate::error::ApiError;
use crate::tools::CallDelta;

/// Fields of a Responses request read here.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "previous_response_id",
    "metadata",
    "user",
    "truncation",
];

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message.into())
}

/// A Responses request, read.
pub struct ResponsesRequest {
    /// The chat parameters it amounts to (tools and `response_format` in `rest`, in
    /// chat's shape, for `tools::take_tools` and `structured_output`).
    pub params: CommonParams,
    /// `input` as chat messages.
    pub input: Vec<InMessage>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub store: bool,
    /// The request's own values, echoed in the response object.
    pub echo: Map<String, Value>,
}

fn message(role: &str, content: Value) -> InMessage {
    InMessage {
        role: role.into(),
        content: Some(content),
        tool_calls: None,
        tool_call_id: None,
    }
}

/// A message item's content: a string, or `input_text` / `output_text` parts.
fn content(param: &str, v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (k, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (ty, _) => {
                        return Err(invalid(
                            &format!("{param}.content[{k}]"),
                            format!("content part type {ty:?} is not supported (only text)"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(invalid(
            param,
            format!("{param}.content must be a string or a list of parts"),
        )),
    }
}

/// `input`: a string (one user message) or a list of items.
fn input(v: &Value) -> Result<Vec<InMessage>, ApiError> {
    let items = match v {
        Value::String(s) => return Ok(vec![message("user", Value::String(s.clone()))]),
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(invalid(
                "input",
                "input must be a string or a non-empty list of items",
            ))
        }
    };
    let mut out: Vec<InMessage> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let ty = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match ty {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(invalid(&param, format!("{param}.role {role:?} is not supported")));
                }
                let text = content(&param, item.get("content"))?;
                out.push(message(role, Value::String(text)));
            }
            "function_call" => {
                let s = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
                if s("name").is_empty() || s("call_id").is_empty() {
                    return Err(invalid(&param, format!("{param} needs a name and a call_id")));
                }
                let call = json!({"id": s("call_id"), "type": "function",
                                  "function": {"name": s("name"), "arguments": s("arguments")}});
                // Consecutive calls belong to one assistant turn.
                match out.last_mut() {
                    Some(m) if m.role == "assistant" && m.tool_calls.is_some() => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(InMessage {
                        role: "assistant".into(),
                        content: None,
                        tool_calls: Some(vec![call]),
                        tool_call_id: None,
                    }),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => return Err(invalid(&param, format!("{param} needs an output"))),
                };
                out.push(InMessage {
                    role: "tool".into(),
                    content: Some(Value::String(output)),
                    tool_calls: None,
                    tool_call_id: item.get("call_id").and_then(Value::as_str).map(str::to_string),
                });
            }
            other => {
                return Err(invalid(
                    &param,
                    format!("input item type {other:?} is not supported (message, function_call, function_call_output)"),
                ))
            }
        }
    }
    Ok(out)
}

/// `text.format` as chat's `response_format`.
fn text_format(v: &Value) -> Result<Option<Value>, ApiError> {
    let Some(f) = v.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => Ok(Some(json!({"type": "json_schema", "json_schema": {
            "name": f.get("name").cloned().unwrap_or(Value::Null),
            "schema": f.get("schema").cloned().unwrap_or(Value::Null),
            "strict": f.get("strict").cloned().unwrap_or(Value::Null),
        }}))),
        other => Err(invalid(
            "text.format",
            format!("text.format type {other:?} is not supported (text, json_object, json_schema)"),
        )),
    }
}

/// Responses' flat function tools as chat's `{"type": "function", "function": {...}}`.
fn tools(v: &Value) -> Result<Value, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("tools", "tools must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid(
                    &format!("tools[{i}]"),
                    "only function tools are supported (no built-in tools)",
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(x) = t.get(k) {
                    f.insert(k.into(), x.clone());
                }
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `tool_choice` in chat's shape (`{"type": "function", "name"}` → nested `function`).
fn tool_choice(v: &Value) -> Value {
    match v.get("name") {
        Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "function", "function": {"name": name}})
        }
        _ => v.clone(),
    }
}

impl ResponsesRequest {
    /// Reads a `POST /v1/responses` body.
    pub fn parse(body: Map<String, Value>) -> Result<Self, ApiError> {
        let get = |k: &str| body.get(k).filter(|v| !v.is_null());
        let input = input(get("input").ok_or_else(|| invalid("input", "input is required"))?)?;
        let instructions = match get("instructions") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("instructions", "instructions must be a string")),
        };
        let mut rest = Map::new();
        for (k, v) in &body {
            if !FIELDS.contains(&k.as_str()) {
                rest.insert(k.clone(), v.clone());
            }
        }
        if let Some(t) = get("text") {
            if let Some(rf) = text_format(t)? {
                rest.insert("response_format".into(), rf);
            }
        }
        if let Some(t) = get("tools") {
            rest.insert("tools".into(), tools(t)?);
        }
        if let Some(c) = get("tool_choice") {
            rest.insert("tool_choice".into(), tool_choice(c));
        }
        if let Some(p) = get("parallel_tool_calls") {
            rest.insert("parallel_tool_calls".into(), p.clone());
        }
        // OpenAI's default; anything else would change what the model sees.
        match get("truncation").and_then(Value::as_str) {
            None | Some("disabled") => {}
            Some(_) => {
                return Err(invalid(
                    "truncation",
                    "only truncation \"disabled\" is supported",
                ))
            }
        }
        let num = |k: &str| -> Result<Option<f64>, ApiError> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| invalid(k, format!("{k} must be a number"))),
            }
        };
        let max_tokens = match get("max_output_tokens") {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                invalid("max_output_tokens", "max_output_tokens must be an integer")
            })?),
        };
        let stream = match get("stream") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("stream", "stream must be a boolean")),
        };
        let store = get("store").and_then(Value::as_bool).unwrap_or(true);
        let params = CommonParams {
            model: get("model").and_then(Value::as_str).map(str::to_string),
            stream,
            stream_options: None,
            max_tokens,
            max_completion_tokens: None,
            temperature: num("temperature")?,
            top_p: num("top_p")?,
            top_k: None,
            seed: None,
            n: None,
            ignore_eos: false,
            user: get("user").and_then(Value::as_str).map(str::to_string),
            stop: None,
            stop_token_ids: None,
            logprobs: None,
            top_logprobs: None,
            logit_bias: None,
            presence_penalty: None,
            frequency_penalty: None,
            repetition_penalty: None,
            min_p: None,
            min_tokens: None,
            rest,
        };
        let mut echo = Map::new();
        for k in [
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "previous_response_id",
            "metadata",
            "user",
            "text",
        ] {
            echo.insert(k.into(), body.get(k).cloned().unwrap_or(Value::Null));
        }
        Ok(ResponsesRequest {
            params,
            input,
            instructions,
            previous_response_id: get("previous_response_id")
                .and_then(Value::as_str)
                .map(str::to_string),
            store,
            echo,
        })
    }
}

/// Usage in the Responses API's shape.
pub fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// What a response's identity and echoed settings are.
pub struct ResponseHead {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    pub store: bool,
    pub echo: Map<String, Value>,
}

impl ResponseHead {
    /// The response object with this status, output and usage.
    pub fn object(
        &self,
        status: &str,
        output: &[Value],
        usage: Option<Value>,
        incomplete: bool,
    ) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "model": self.model, "output": output,
            "store": self.store, "truncation": "disabled",
            "usage": usage.unwrap_or(Value::Null),
        });
        for (k, v) in &self.echo {
            r[k] = v.clone();
        }
        if r["tools"].is_null() {
            r["tools"] = json!([]);
        }
        if r["tool_choice"].is_null() {
            r["tool_choice"] = json!("auto");
        }
        if r["parallel_tool_calls"].is_null() {
            r["parallel_tool_calls"] = json!(true);
        }
        if r["text"].is_null() {
            r["text"] = json!({"format": {"type": "text"}});
        }
        if r["metadata"].is_null() {
            r["metadata"] = json!({});
        }
        r
    }
}

/// Output items being built from generated text: a `message` (its text so far) and
/// `function_call`s, in the order they appeared.
#[derive(Default)]
pub struct Output {
    pub items: Vec<Item>,
}

/// One output item.
pub enum Item {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Item {
    /// The item as the API shows it.
    pub fn json(&self, status: &str) -> Value {
        match self {
            Item::Message { id, text } => json!({
                "type": "message", "id": id, "status": status, "role": "assistant",
                "content": if status == "in_progress" && text.is_empty() { json!([]) } else {
                    json!([{"type": "output_text", "text": text, "annotations": []}])
                },
            }),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
            } => json!({
                "type": "function_call", "id": id, "call_id": call_id, "name": name,
                "arguments": arguments, "status": status,
            }),
        }
    }
}

/// What one delta did to the output, for the stream's events.
pub enum Change {
    /// A message item was opened at this index (with its content part).
    MessageOpened(usize),
    /// Text was added to the message at this index.
    Text(usize, String),
    /// A call item was opened at this index.
    CallOpened(usize),
    /// Arguments were added to the call at this index.
    Arguments(usize, String),
}

impl Output {
    /// Applies a delta of the call parser; `ids` makes item ids.
    pub fn apply(&mut self, d: CallDelta, mut ids: impl FnMut(&str) -> String) -> Vec<Change> {
        let mut changes = Vec::new();
        match d {
            CallDelta::Content(t) => {
                let at = match self
                    .items
                    .iter()
                    .position(|i| matches!(i, Item::Message { .. }))
                {
                    Some(at) => at,
                    None => {
                        self.items.push(Item::Message {
                            id: ids("msg"),
                            text: String::new(),
                        });
                        changes.push(Change::MessageOpened(self.items.len() - 1));
                        self.items.len() - 1
                    }
                };
                if let Item::Message { text, .. } = &mut self.items[at] {
                    text.push_str(&t);
                }
                changes.push(Change::Text(at, t));
            }
            CallDelta::Start { id, name, .. } => {
                self.items.push(Item::Call {
                    id: ids("fc"),
                    call_id: id,
                    name,
                    arguments: String::new(),
                });
                changes.push(Change::CallOpened(self.items.len() - 1));
            }
            CallDelta::Arguments { index, piece } => {
                // `index` counts calls; find that call's item.
                let at = self
                    .items
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| matches!(i, Item::Call { .. }))
                    .nth(index)
                    .map(|(at, _)| at);
                if let Some(at) = at {
                    if let Item::Call { arguments, .. } = &mut self.items[at] {
                        arguments.push_str(&piece);
                    }
                    changes.push(Change::Arguments(at, piece));
                }
            }
        }
        changes
    }

    /// The items as the API shows them, all with `status`.
    pub fn json(&self, status: &str) -> Vec<Value> {
        self.items.iter().map(|i| i.json(status)).collect()
    }

    /// The conversation messages this output adds (for stored responses).
    pub fn messages(&self) -> Vec<InMessage> {
        let mut text = None;
        let mut calls = Vec::new();
        for i in &self.items {
            match i {
                Item::Message { text: t, .. } => text = Some(Value::String(t.clone())),
                Item::Call {
                    call_id,
                    name,
                    arguments,
                    ..
                } => calls.push(json!({
                    "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments},
                })),
            }
        }
        vec![InMessage {
            role: "assistant".into(),
            content: text,
            tool_calls: (!calls.is_empty()).then_some(calls),
            tool_call_id: None,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ResponsesRequest, ApiError> {
        ResponsesRequest::parse(v.as_object().unwrap().clone())
    }

    #[test]
    fn inputs_options_and_tools_become_chat() {
        let r = parse(json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "temperature": 0.5,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "w"},
            "store": false,
        }))
        .unwrap();
        assert_eq!(r.instructions.as_deref(), Some("Be brief."));
        assert!(!r.store);
        assert_eq!(r.params.max_tokens, Some(50));
        assert_eq!(r.input.len(), 3, "two calls in one assistant turn");
        assert_eq!(r.input[1].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(r.input[2].role, "tool");
        assert_eq!(r.params.rest["tools"][0]["function"]["name"], "w");
        assert_eq!(r.params.rest["tool_choice"]["function"]["name"], "w");
        assert_eq!(r.params.rest["response_format"]["json_schema"]["name"], "x");
        assert!(!r.params.rest.contains_key("store"));
    }

    #[test]
    fn unsupported_inputs_are_named() {
        for (body, param) in [
            (json!({}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": [{"type": "input_image"}]}), "input[0]"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input[0].content[0]",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0]",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format",
            ),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
        ] {
            match parse(body.clone()) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                Err(other) => panic!("{body}: {other:?}"),
                Ok(_) => panic!("{body}: accepted"),
            }
        }
    }
}
