//! What a request asks its output to be, and that request turned into an llguidance
//! grammar.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

/// The shape a request's output must have.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid under this schema (OpenAI's `json_schema`, vLLM's `json`).
    JsonSchema(Value),
    /// Text matching this regular expression, whole (vLLM's `regex`).
    Regex(String),
    /// Exactly one of these strings (vLLM's `choice`).
    Choice(Vec<String>),
    /// Text in the language of this Lark grammar (vLLM's `grammar`, llguidance's dialect).
    Lark(String),
}

/// Why an output format cannot be used; the message names the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// Compact JSON (no whitespace between tokens) unless the schema says otherwise in
/// llguidance's `x-guidance`: with any whitespace allowed, small models tend to pad
/// their objects with newlines until they run out of tokens.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// Escapes `s` as a literal inside a Lark string.
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl OutputFormat {
    /// The llguidance grammar for this format.
    pub(crate) fn grammar(&self) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            OutputFormat::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(json!({"type": "object"})))
            }
            OutputFormat::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(GrammarError("a JSON schema must be an object".into()));
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            OutputFormat::Regex(rx) => TopLevelGrammar::from_regex(rx),
            OutputFormat::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError("choice must list at least one string".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            OutputFormat::Lark(grammar) => {
                if grammar.contains("::=") {
                    return Err(GrammarError(
                        "this looks like a GBNF grammar (`::=`); write it in Lark syntax \
                         (llguidance's gbnf_to_lark.py converts GBNF)"
                            .into(),
                    ));
                }
                TopLevelGrammar::from_lark(grammar.clone())
            }
        })
    }
}
