//! Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) for models whose
//! chat templates know nothing of tools: a generic JSON tool-call prompt, a grammar for
//! calls that must happen, and a parser that takes the calls out of the generated text.
//!
//! The format is the one Hermes- and Qwen-style models are trained on:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! - The tools are described in a system message ([`ToolSpec::system_prompt`]), added
//!   before the conversation's own system prompt.
//! - History: an assistant message's `tool_calls` are rendered as such blocks after its
//!   content, and a `tool` message becomes a user turn holding
//!   `<tool_response>…</tool_response>`, so any template renders them.
//! - `tool_choice: "required"` or a named function constrains the output to one or more
//!   calls (one with `parallel_tool_calls: false`) whose arguments follow each function's
//!   JSON schema ([`ToolSpec::output_format`]); with `"auto"` the model writes freely and
//!   the calls it writes are parsed out; `"none"` leaves the tools out of the prompt.
//! - [`CallParser`] parses generated text incrementally, the same way for streamed and
//!   whole responses: text outside the blocks is the message's content, each block is a
//!   call (its id and name as soon as they are known, then its arguments piece by piece).

use serde_json::{json, Map, Value};
use sluice_engine::structured::OutputFormat;

use crate::api_types::InMessage;
use crate::error::ApiError;

/// The request fields read here; the generic check for unsupported fields skips them.
pub const FIELDS: &[&str] = &["tools", "tool_choice", "parallel_tool_calls"];

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// Most calls one response may hold when calls are required.
const MAX_CALLS: usize = 8;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema.
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message.into())
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn tool(i: usize, v: &Value) -> Result<Tool, ApiError> {
    let param = format!("tools[{i}]");
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(
            &param,
            format!("{param}.type must be \"function\""),
        ));
    }
    let f = v
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(&param, format!("{param}.function must be an object")))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(invalid(
            &param,
            format!("{param}.function.name must be 1 to 64 letters, digits, `_` or `-`"),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(invalid(
                &param,
                format!("{param}.function.parameters must be a JSON schema object"),
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        parameters,
    })
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` without tools.
pub fn tool_spec(rest: &Map<String, Value>) -> Result<Option<ToolSpec>, ApiError> {
    let tools = match rest.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(invalid("tools", "tools must be a list")),
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(invalid(
                "tools",
                format!("two tools are named {:?}", t.name),
            ));
        }
    }
    let choice = match rest.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of none, auto, required"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    invalid(
                        "tool_choice",
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    let parallel = match rest.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(invalid(
                "parallel_tool_calls",
                "parallel_tool_calls must be a boolean",
            ))
        }
    };
    if tools.is_empty() {
        if choice == ToolChoice::Required {
            return Err(invalid("tool_choice", "tool_choice needs tools"));
        }
        return Ok(None);
    }
    Ok(Some(ToolSpec {
        tools,
        choice,
        parallel,
    }))
}

impl ToolSpec {
    /// Whether the model sees the tools and its calls are parsed out.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools the model may call under `tool_choice`.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            ToolChoice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// The system message that describes the tools and the call format.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You can call functions to help with the user's request. The functions are:\n<tools>\n",
        );
        for t in self.callable() {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = json!(d);
            }
            s.push_str(&json!({"type": "function", "function": f}).to_string());
            s.push('\n');
        }
        s.push_str("</tools>\nTo call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments>}}\n</tool_call>\n");
        match &self.choice {
            ToolChoice::Required => s.push_str("You must call at least one function.\n"),
            ToolChoice::Named(n) => s.push_str(&format!("You must call {n}.\n")),
            _ => {}
        }
        s
    }

    /// For calls that must happen: a grammar of one or more calls, each a function's
    /// name and arguments valid under its schema.
    pub fn output_format(&self) -> Option<OutputFormat> {
        if !matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return None;
        }
        let mut rules = Vec::new();
        let mut alternatives = Vec::new();
        for (k, t) in self.callable().enumerate() {
            let schema = json!({
                "x-guidance": {"whitespace_flexible": false},
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            });
            rules.push(format!("fn{k}: %json {schema}"));
            alternatives.push(format!("fn{k}"));
        }
        let start = if self.parallel {
            format!("start: call (\"\\n\" call){{0,{}}}", MAX_CALLS - 1)
        } else {
            "start: call".to_string()
        };
        let open = serde_json::to_string(&format!("{OPEN}\n")).unwrap_or_default();
        let close = serde_json::to_string(&format!("\n{CLOSE}")).unwrap_or_default();
        Some(OutputFormat::Lark(format!(
            "{start}\ncall: {open} ({}) {close}\n{}\n",
            alternatives.join(" | "),
            rules.join("\n"),
        )))
    }
}

/// Takes a chat request's tool fields out of its parameters (so the generic check for
/// unsupported fields never sees them) and rewrites its history for them: the messages
/// to render and the tools, when the request has any.
pub fn take_tools(
    rest: &mut Map<String, Value>,
    messages: Vec<InMessage>,
) -> Result<(Vec<InMessage>, Option<std::sync::Arc<ToolSpec>>), ApiError> {
    let spec = tool_spec(rest)?;
    for f in FIELDS {
        rest.remove(*f);
    }
    let messages = flatten_history(messages, spec.as_ref())?;
    Ok((messages, spec.map(std::sync::Arc::new)))
}

/// Text of a message's `content` (a string or text parts), for history rendering.
fn content_text(m: &InMessage) -> String {
    match &m.content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Rewrites a conversation for a template that knows nothing of tools: the tools'
/// system message first (when `spec` is active), assistant `tool_calls` as
/// `<tool_call>` blocks, `tool` messages as user turns holding `<tool_response>`.
pub fn flatten_history(
    messages: Vec<InMessage>,
    spec: Option<&ToolSpec>,
) -> Result<Vec<InMessage>, ApiError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(spec) = spec.filter(|s| s.active()) {
        out.push(InMessage {
            role: "system".into(),
            content: Some(Value::String(spec.system_prompt())),
            tool_calls: None,
            tool_call_id: None,
        });
    }
    for (i, m) in messages.into_iter().enumerate() {
        if m.role == "tool" {
            let text = content_text(&m);
            out.push(InMessage {
                role: "user".into(),
                content: Some(Value::String(format!(
                    "<tool_response>\n{text}\n</tool_response>"
                ))),
                tool_calls: None,
                tool_call_id: None,
            });
            continue;
        }
        let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) else {
            out.push(m);
            continue;
        };
        if m.role != "assistant" {
            return Err(invalid(
                &format!("messages[{i}].tool_calls"),
                "only assistant messages carry tool_calls",
            ));
        }
        let mut text = content_text(&m);
        for (k, c) in calls.iter().enumerate() {
            let param = format!("messages[{i}].tool_calls[{k}]");
            let f = c
                .get("function")
                .ok_or_else(|| invalid(&param, format!("{param} needs a function")))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let args = match f.get("arguments") {
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                }
                Some(v) => v.clone(),
                None => json!({}),
            };
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!(
                "{OPEN}\n{}\n{CLOSE}",
                json!({"name": name, "arguments": args})
            ));
        }
        out.push(InMessage {
            role: "assistant".into(),
            content: Some(Value::String(text)),
            tool_calls: None,
            tool_call_id: None,
        });
    }
    Ok(out)
}

/// What a piece of generated text adds to a response with tools.
#[derive(Debug, Clone, PartialEq)]
pub enum CallDelta {
    /// Text outside any call: the message's content.
    Content(String),
    /// A call begins: its index among the response's calls, id and function name.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// The next piece of that call's arguments (JSON text).
    Arguments { index: usize, piece: String },
}

/// Where the parser is in the generated text.
#[derive(Debug)]
enum Phase {
    /// Outside calls.
    Text,
    /// After `<tool_call>`, before the arguments object opens.
    Head,
    /// Inside the arguments object: JSON nesting depth, in a string, after a backslash.
    Arguments {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    /// After the arguments, until `</tool_call>`.
    Tail,
    /// A block that is not a call this request allows (unknown function, or not the
    /// expected JSON shape): passed through as content until `</tool_call>`.
    Literal,
}

/// Parses generated text into content and calls, incrementally.
pub struct CallParser {
    names: Vec<String>,
    id_base: String,
    pending: String,
    phase: Phase,
    calls: usize,
}

/// The longest suffix of `s` that is a proper prefix of `pat` (which may still grow
/// into `pat`), as a byte length.
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && pat.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

impl CallParser {
    /// A parser for calls to `spec`'s functions, with call ids built from `id_base`.
    pub fn new(spec: &ToolSpec, id_base: &str) -> Self {
        CallParser {
            names: spec.callable().map(|t| t.name.clone()).collect(),
            id_base: id_base.to_string(),
            pending: String::new(),
            phase: Phase::Text,
            calls: 0,
        }
    }

    /// Calls started so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, text: &str, out: &mut Vec<CallDelta>) {
        self.pending.push_str(text);
        loop {
            let progressed = match self.phase {
                Phase::Text => self.in_text(out),
                Phase::Head => self.in_head(out),
                Phase::Arguments { .. } => self.in_arguments(out),
                Phase::Tail => self.in_tail(),
                Phase::Literal => self.in_literal(out),
            };
            if !progressed {
                return;
            }
        }
    }

    /// The end of the text: what is held back is content (a call cut short stays as it
    /// is: its arguments are incomplete JSON, as OpenAI's are when `length` cuts them).
    pub fn finish(&mut self, out: &mut Vec<CallDelta>) {
        let rest = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Text | Phase::Literal | Phase::Head => {
                let keep = !(self.calls > 0 && rest.trim().is_empty());
                if keep && !rest.is_empty() {
                    out.push(CallDelta::Content(rest));
                }
            }
            Phase::Arguments { .. } => {
                if !rest.is_empty() {
                    out.push(CallDelta::Arguments {
                        index: self.calls - 1,
                        piece: rest,
                    });
                }
            }
            Phase::Tail => {}
        }
    }

    fn content(&mut self, upto: usize, out: &mut Vec<CallDelta>) {
        if upto > 0 {
            let text: String = self.pending.drain(..upto).collect();
            out.push(CallDelta::Content(text));
        }
    }

    fn in_text(&mut self, out: &mut Vec<CallDelta>) -> bool {
        if let Some(at) = self.pending.find(OPEN) {
            // Whitespace between the content and the call is not content.
            let before = self.pending[..at].trim_end().len();
            self.content(before, out);
            let skip = self.pending.find(OPEN).map_or(0, |a| a + OPEN.len());
            self.pending.drain(..skip);
            self.phase = Phase::Head;
            return true;
        }
        // Hold back what may become `<tool_call>`, and trailing whitespace (which may
        // precede one).
        let hold = partial_suffix(&self.pending, OPEN);
        let safe = self.pending[..self.pending.len() - hold].trim_end().len();
        self.content(safe, out);
        false
    }

    /// `{"name": "<name>", "arguments": ` then the arguments' opening brace.
    fn in_head(&mut self, out: &mut Vec<CallDelta>) -> bool {
        let s = self.pending.trim_start();
        let lead = self.pending.len() - s.len();
        // What a head looks like, step by step; `None`: not yet known; `Some(false)`:
        // not a head this parser follows.
        /// Takes `tok` (after whitespace) off the front of `rest`: `None` while `rest`
        /// may still grow into it, `Err` when it cannot.
        fn eat(tok: &str, rest: &mut &str) -> Option<Result<(), ()>> {
            let r = rest.trim_start();
            if r.len() < tok.len() {
                return if tok.starts_with(r) {
                    None
                } else {
                    Some(Err(()))
                };
            }
            match r.strip_prefix(tok) {
                Some(after) => {
                    *rest = after;
                    Some(Ok(()))
                }
                None => Some(Err(())),
            }
        }
        let parsed = (|| -> Option<Result<(String, usize), ()>> {
            let mut rest = s;
            for tok in ["{", "\"name\"", ":", "\""] {
                if let Err(()) = eat(tok, &mut rest)? {
                    return Some(Err(()));
                }
            }
            let end = rest.find('"')?;
            let name = rest[..end].to_string();
            if name.contains('\\') {
                return Some(Err(()));
            }
            rest = &rest[end + 1..];
            for tok in [",", "\"arguments\"", ":", "{"] {
                if let Err(()) = eat(tok, &mut rest)? {
                    return Some(Err(()));
                }
            }
            // `rest` starts after the arguments' `{`.
            Some(Ok((name, s.len() - rest.len() - 1)))
        })();
        match parsed {
            None => false,
            Some(Ok((name, brace))) if self.names.contains(&name) => {
                let index = self.calls;
                self.calls += 1;
                out.push(CallDelta::Start {
                    index,
                    id: format!("call_{}{index}", self.id_base),
                    name,
                });
                self.pending.drain(..lead + brace);
                self.phase = Phase::Arguments {
                    depth: 0,
                    in_string: false,
                    escaped: false,
                };
                true
            }
            Some(_) => {
                // Not a call to one of the tools: the block stays text.
                self.pending.insert_str(0, OPEN);
                self.phase = Phase::Literal;
                true
            }
        }
    }

    fn in_arguments(&mut self, out: &mut Vec<CallDelta>) -> bool {
        let Phase::Arguments {
            mut depth,
            mut in_string,
            mut escaped,
        } = self.phase
        else {
            return false;
        };
        let mut end = None;
        for (i, c) in self.pending.char_indices() {
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '{' | '[' => depth += 1,
                '}' | ']' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let index = self.calls - 1;
        let take = end.unwrap_or(self.pending.len());
        if take > 0 {
            let piece: String = self.pending.drain(..take).collect();
            out.push(CallDelta::Arguments { index, piece });
        }
        if end.is_some() {
            self.phase = Phase::Tail;
            true
        } else {
            self.phase = Phase::Arguments {
                depth,
                in_string,
                escaped,
            };
            false
        }
    }

    /// After the arguments: the call object's `}` and `</tool_call>`.
    fn in_tail(&mut self) -> bool {
        match self.pending.find(CLOSE) {
            Some(at) => {
                self.pending.drain(..at + CLOSE.len());
                self.phase = Phase::Text;
                true
            }
            None => false,
        }
    }

    fn in_literal(&mut self, out: &mut Vec<CallDelta>) -> bool {
        match self.pending.find(CLOSE) {
            Some(at) => {
                self.content(at + CLOSE.len(), out);
                self.phase = Phase::Text;
                true
            }
            None => {
                let hold = partial_suffix(&self.pending, CLOSE);
                self.content(self.pending.len() - hold, out);
                false
            }
        }
    }
}

/// A whole response's calls, as OpenAI's `message.tool_calls`, and its content.
pub fn collect(deltas: Vec<CallDelta>) -> (Option<String>, Vec<Value>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for d in deltas {
        match d {
            CallDelta::Content(t) => content.push_str(&t),
            CallDelta::Start { id, name, .. } => calls.push((id, name, String::new())),
            CallDelta::Arguments { index, piece } => {
                if let Some(c) = calls.get_mut(index) {
                    c.2.push_str(&piece);
                }
            }
        }
    }
    let calls = calls
        .into_iter()
        .map(|(id, name, arguments)| {
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
        })
        .collect::<Vec<_>>();
    let content = if calls.is_empty() || !content.trim().is_empty() {
        Some(content)
    } else {
        None
    };
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(choice: ToolChoice) -> ToolSpec {
        ToolSpec {
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            }],
            choice,
            parallel: true,
        }
    }

    /// Feeds `text` in pieces of `step` bytes (on char boundaries).
    fn parse(text: &str, step: usize) -> Vec<CallDelta> {
        let mut p = CallParser::new(&spec(ToolChoice::Auto), "x");
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            p.push(&text[i..j], &mut out);
            i = j;
        }
        p.finish(&mut out);
        out
    }

    #[test]
    fn calls_and_content_come_out_the_same_whatever_the_pieces() {
        let text = "Let me check é.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}r\\\"is\", \"n\": [1, {\"a\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (content, calls) = collect(parse(text, step));
            assert_eq!(content.as_deref(), Some("Let me check é."), "step {step}");
            assert_eq!(calls.len(), 2, "step {step}");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            let args: Value =
                serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(args, json!({"city": "Pa}r\"is", "n": [1, {"a": 2}]}));
            assert_eq!(calls[1]["function"]["arguments"], "{}");
            assert_eq!(calls[0]["id"], "call_x0");
            assert_eq!(calls[1]["id"], "call_x1");
        }
    }

    #[test]
    fn text_without_calls_and_unknown_functions_stay_content() {
        for text in [
            "Just an answer with <tool and < signs.",
            "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call> done",
            "<tool_call>not json</tool_call>",
        ] {
            for step in [1, 4, 100] {
                let (content, calls) = collect(parse(text, step));
                assert!(calls.is_empty(), "{text}");
                assert_eq!(content.as_deref(), Some(text), "step {step}");
            }
        }
    }

    #[test]
    fn the_head_streams_before_the_arguments_end() {
        let mut p = CallParser::new(&spec(ToolChoice::Auto), "y");
        let mut out = Vec::new();
        p.push(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                CallDelta::Start {
                    index: 0,
                    id: "call_y0".into(),
                    name: "get_weather".into()
                },
                CallDelta::Arguments {
                    index: 0,
                    piece: "{\"ci".into()
                },
            ]
        );
    }

    #[test]
    fn tools_and_choices_are_read_and_checked() {
        let rest = |v: Value| v.as_object().unwrap().clone();
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let s = tool_spec(&rest(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": false})))
            .unwrap()
            .unwrap();
        assert_eq!(s.choice, ToolChoice::Named("f".into()));
        assert!(!s.parallel);
        assert!(tool_spec(&rest(json!({}))).unwrap().is_none());
        for (body, param) in [
            (json!({"tools": [{"type": "code"}]}), "tools[0]"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0]",
            ),
            (
                json!({"tools": tools, "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": [tools[0], tools[0]]}), "tools"),
        ] {
            match tool_spec(&rest(body.clone())) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
