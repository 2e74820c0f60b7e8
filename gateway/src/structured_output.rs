//! Structured-output parameters, as OpenAI, vLLM and llama-server clients send them,
//! turned into the engine's [`OutputFormat`] and compiled into a request's constraint.
//!
//! - OpenAI: `response_format` `{"type": "json_object"}` or `{"type": "json_schema",
//!   "json_schema": {"name", "schema", "strict"}}` (`{"type": "text"}` is no constraint).
//! - vLLM: `structured_outputs` `{"json" | "regex" | "choice" | "grammar" |
//!   "json_object"}`, and its older `guided_json`, `guided_regex`, `guided_choice`,
//!   `guided_grammar` (with `guided_decoding_backend`, which has one choice here).
//! - llama-server: a top-level `json_schema`.
//!
//! A request sets at most one of them.

use serde_json::{Map, Value};
use sluice_engine::structured::{Constraint, OutputFormat};

use crate::api_types::CommonParams;
use crate::error::ApiError;
use crate::routes::prepare;
use crate::state::{AppState, ServedModel};

/// The request fields read here; the generic check for unsupported fields skips them.
pub const FIELDS: &[&str] = &[
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "json_schema",
];

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message.into())
}

/// A schema given as an object, or as a JSON string holding one (vLLM accepts both).
fn schema(param: &str, v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| invalid(param, format!("{param} is not valid JSON: {e}"))),
        _ => Err(invalid(
            param,
            format!("{param} must be a JSON schema object"),
        )),
    }
}

fn string(param: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(param, format!("{param} must be a string")))
}

fn choices(param: &str, v: &Value) -> Result<Vec<String>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid(param, format!("{param} must be a list of strings")))?;
    list.iter()
        .map(|c| string(param, c))
        .collect::<Result<_, _>>()
}

/// OpenAI's `response_format`.
fn response_format(v: &Value) -> Result<Option<OutputFormat>, ApiError> {
    const P: &str = "response_format";
    let ty = v.get("type").and_then(Value::as_str);
    match ty {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| {
                invalid(P, "response_format of type json_schema needs a `json_schema` object")
            })?;
            if !spec.is_object() {
                return Err(invalid(P, "response_format.json_schema must be an object"));
            }
            // OpenAI requires a name; strict or not, the schema is enforced.
            if !spec.get("name").is_some_and(Value::is_string) {
                return Err(invalid(P, "response_format.json_schema.name is required"));
            }
            let s = match spec.get("schema") {
                None | Some(Value::Null) => serde_json::json!({}),
                Some(s) => schema("response_format.json_schema.schema", s)?,
            };
            Ok(Some(OutputFormat::JsonSchema(s)))
        }
        Some(other) => Err(invalid(
            P,
            format!("response_format type {other:?} is not supported (text, json_object or json_schema)"),
        )),
        None => Err(invalid(P, "response_format needs a `type`")),
    }
}

/// vLLM's `structured_outputs` object: exactly one of its constraint fields.
fn structured_outputs(v: &Map<String, Value>) -> Result<OutputFormat, ApiError> {
    const P: &str = "structured_outputs";
    let mut found = Vec::new();
    for (k, x) in v {
        if x.is_null() || (k == "json_object" && x == &Value::Bool(false)) {
            continue;
        }
        let param = format!("{P}.{k}");
        found.push(match k.as_str() {
            "json" => OutputFormat::JsonSchema(schema(&param, x)?),
            "regex" => OutputFormat::Regex(string(&param, x)?),
            "choice" => OutputFormat::Choice(choices(&param, x)?),
            "grammar" => OutputFormat::Lark(string(&param, x)?),
            "json_object" if x == &Value::Bool(true) => OutputFormat::JsonObject,
            // Options that do not change the constraint.
            "disable_any_whitespace"
            | "disable_fallback"
            | "disable_additional_properties"
            | "whitespace_pattern"
            | "backend" => continue,
            _ => {
                return Err(invalid(
                    &param,
                    format!(
                        "{param} is not supported (json, regex, choice, grammar or json_object)"
                    ),
                ))
            }
        });
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(invalid(P, "structured_outputs sets no constraint")),
        _ => Err(invalid(
            P,
            "structured_outputs sets more than one of json, regex, choice, grammar, json_object",
        )),
    }
}

/// The output format a request asks for and the field that asked, if any.
pub fn output_format(p: &CommonParams) -> Result<Option<(OutputFormat, &'static str)>, ApiError> {
    let mut found: Vec<(OutputFormat, &'static str)> = Vec::new();
    for &field in FIELDS {
        let Some(v) = p.rest.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let format = match field {
            "response_format" => response_format(v)?,
            "structured_outputs" => {
                Some(structured_outputs(v.as_object().ok_or_else(|| {
                    invalid(field, "structured_outputs must be an object")
                })?)?)
            }
            "guided_json" | "json_schema" => Some(OutputFormat::JsonSchema(schema(field, v)?)),
            "guided_regex" => Some(OutputFormat::Regex(string(field, v)?)),
            "guided_choice" => Some(OutputFormat::Choice(choices(field, v)?)),
            "guided_grammar" => Some(OutputFormat::Lark(string(field, v)?)),
            // Which library enforces the constraint: llguidance, whatever is asked.
            _ => None,
        };
        found.extend(format.map(|f| (f, field)));
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(invalid(
            found[1].1,
            format!(
                "`{}` and `{}` both constrain the output; set one",
                found[0].1, found[1].1
            ),
        )),
    }
}

/// The request's constraint, compiled off the runtime workers (a large schema takes
/// milliseconds): `None` without structured output; a 400 naming the field and the
/// problem when its format cannot be compiled.
pub async fn constraint(
    state: &AppState,
    model: &ServedModel,
    p: &CommonParams,
) -> Result<Option<Constraint>, ApiError> {
    match output_format(p)? {
        None => Ok(None),
        Some((format, field)) => compile(state, model, format, field).await.map(Some),
    }
}

/// Compiles `format` for `model` off the runtime workers; errors name `field`.
pub async fn compile(
    state: &AppState,
    model: &ServedModel,
    format: OutputFormat,
    field: &'static str,
) -> Result<Constraint, ApiError> {
    if !model.engine.structured_outputs() {
        return Err(sluice_engine::EngineError::StructuredOutputUnsupported(
            model.engine.runtime().backend,
        )
        .into());
    }
    let grammars = model.grammars.clone();
    let size = match &format {
        OutputFormat::JsonSchema(s) => s.to_string().len(),
        OutputFormat::Regex(s) | OutputFormat::Lark(s) => s.len(),
        OutputFormat::Choice(c) => c.iter().map(String::len).sum(),
        OutputFormat::JsonObject => 0,
    };
    prepare(state, size, move || {
        grammars
            .compile(&format)
            .map_err(|e| invalid(field, format!("{field}: {e}")))
    })
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(v: Value) -> CommonParams {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_way_clients_ask_for_structured_output_is_read() {
        let s = json!({"type": "object"});
        for (body, want, field) in [
            (
                json!({"response_format": {"type": "json_object"}}),
                OutputFormat::JsonObject,
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}}),
                OutputFormat::JsonSchema(s.clone()),
                "response_format",
            ),
            (
                json!({"guided_json": s.to_string()}),
                OutputFormat::JsonSchema(s.clone()),
                "guided_json",
            ),
            (
                json!({"json_schema": s}),
                OutputFormat::JsonSchema(s.clone()),
                "json_schema",
            ),
            (
                json!({"guided_regex": "a+"}),
                OutputFormat::Regex("a+".into()),
                "guided_regex",
            ),
            (
                json!({"guided_choice": ["a", "b"], "guided_decoding_backend": "guidance"}),
                OutputFormat::Choice(vec!["a".into(), "b".into()]),
                "guided_choice",
            ),
            (
                json!({"structured_outputs": {"grammar": "start: \"a\"", "json": null}}),
                OutputFormat::Lark("start: \"a\"".into()),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                OutputFormat::JsonObject,
                "structured_outputs",
            ),
        ] {
            let got = output_format(&params(body.clone())).unwrap();
            assert_eq!(got, Some((want, field)), "{body}");
        }
        assert_eq!(
            output_format(&params(json!({"response_format": {"type": "text"}}))).unwrap(),
            None
        );
        assert_eq!(output_format(&params(json!({}))).unwrap(), None);
    }

    #[test]
    fn malformed_or_conflicting_requests_name_the_field() {
        for (body, param) in [
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_choice": [1]}), "guided_choice"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structured_outputs.structural_tag",
            ),
            (
                json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
                "guided_regex",
            ),
        ] {
            let e = output_format(&params(body.clone())).unwrap_err();
            match e {
                ApiError::InvalidRequest { param: Some(p), .. } => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
