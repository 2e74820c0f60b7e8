//! HTTP handlers, one file per API area.

pub mod admin;
pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod page;
pub mod tokenize;
pub mod ws;

use serde_json::Value;
use sluice_engine::chat_template::ChatMessage;

use crate::api_types::InMessage;
use crate::error::ApiError;
use crate::state::ServedModel;

/// Flattens OpenAI message content (a string or a list of text parts) to text.
pub fn message_text(m: &InMessage, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match &m.content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (ty, _) => {
                        return Err(ApiError::invalid(
                            &param,
                            format!("content part type {ty:?} is not supported (only text)"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            &param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// Checks roles and flattens contents into what a chat template renders.
pub fn chat_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unsupported role {:?}", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        msgs.push(ChatMessage {
            role,
            content: message_text(m, i)?,
        });
    }
    Ok(msgs)
}

/// Renders messages with the model's chat template and tokenizes the result.
pub(crate) fn chat_prompt(
    model: &ServedModel,
    messages: &[InMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = chat_messages(messages)?;
    let template = model.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let text = template
        .render(&msgs, add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template writes BOS itself when the model wants one; do not add a second.
    let bos_text = model
        .tokenizer
        .bos
        .map(|b| model.tokenizer.decode(&[b], true))
        .unwrap_or_default();
    let add_special = bos_text.is_empty() || !text.starts_with(&bos_text);
    model.tokenizer.encode(&text, add_special).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the conversation cannot be tokenized: {e}"),
        )
    })
}
