//! The WebSocket protocol's client messages (docs/websocket.md), parsed and checked
//! apart from any socket so that they can be unit-tested and fuzzed.

use serde_json::Value;

use crate::api_types::CommonParams;

/// Longest session or user name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// One message from a client.
#[derive(Debug)]
pub enum ClientMessage {
    /// Authenticate with a key (browsers cannot set headers on a WebSocket).
    Auth {
        api_key: String,
    },
    /// Join (or create) a session under a display name.
    Join {
        session: String,
        user: String,
    },
    Leave,
    /// Add a user message to the session's conversation.
    Say {
        content: String,
    },
    /// Start a reply with chat-completion parameters (`n` is 1).
    Generate(Box<CommonParams>),
    /// Stop the running reply.
    Cancel,
}

/// Why a message was refused; sent back as an `error` event with this code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not a JSON object.
    NotAnObject,
    UnknownType(String),
    /// A known type with missing or bad fields.
    BadField(String),
    /// `generate` parameters that do not parse or are not allowed.
    BadParameters(String),
}

impl ProtocolError {
    /// The `code` of the error event.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::NotAnObject | ProtocolError::BadField(_) => "bad_request",
            ProtocolError::UnknownType(_) => "unknown_type",
            // What HTTP answers bad parameters with (its error `type`: they have no code).
            ProtocolError::BadParameters(_) => "invalid_request_error",
        }
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::NotAnObject => f.write_str("messages are JSON objects with a \"type\""),
            ProtocolError::UnknownType(t) => write!(f, "unknown message type {t:?}"),
            ProtocolError::BadField(m) | ProtocolError::BadParameters(m) => f.write_str(m),
        }
    }
}

/// A session or user name: a non-empty string of bounded length.
fn name(v: &Value) -> Option<String> {
    v.as_str()
        .filter(|s| !s.trim().is_empty() && s.chars().count() <= MAX_NAME_CHARS)
        .map(str::to_string)
}

impl ClientMessage {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
        let mut msg: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(ProtocolError::NotAnObject),
        };
        let kind = msg["type"].as_str().unwrap_or("").to_string();
        Ok(match kind.as_str() {
            "auth" => ClientMessage::Auth {
                api_key: msg["api_key"].as_str().unwrap_or("").to_string(),
            },
            "join" => match (name(&msg["session"]), name(&msg["user"])) {
                (Some(session), Some(user)) => ClientMessage::Join { session, user },
                _ => {
                    return Err(ProtocolError::BadField(format!(
                        "join needs \"session\" and \"user\": non-empty strings of at most \
                         {MAX_NAME_CHARS} characters"
                    )))
                }
            },
            "leave" => ClientMessage::Leave,
            "say" => match msg["content"].as_str().filter(|c| !c.is_empty()) {
                Some(c) => ClientMessage::Say {
                    content: c.to_string(),
                },
                None => {
                    return Err(ProtocolError::BadField(
                        "say needs a non-empty \"content\" string".into(),
                    ))
                }
            },
            "generate" => {
                if let Value::Object(o) = &mut msg {
                    o.remove("type");
                }
                let params: CommonParams = serde_json::from_value(msg).map_err(|e| {
                    ProtocolError::BadParameters(format!("bad generate parameters: {e}"))
                })?;
                if params.n.is_some_and(|n| n != 1) {
                    return Err(ProtocolError::BadParameters(
                        "a session generates one reply at a time (n = 1)".into(),
                    ));
                }
                ClientMessage::Generate(Box::new(params))
            }
            "cancel" => ClientMessage::Cancel,
            _ => return Err(ProtocolError::UnknownType(kind)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_into_their_types() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"auth","api_key":"k"}"#),
            Ok(ClientMessage::Auth { api_key }) if api_key == "k"
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"join","session":"s","user":"u"}"#),
            Ok(ClientMessage::Join { session, user }) if session == "s" && user == "u"
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"generate","max_tokens":4,"temperature":0}"#),
            Ok(ClientMessage::Generate(p)) if p.max_tokens == Some(4)
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"cancel"}"#),
            Ok(ClientMessage::Cancel)
        ));
    }

    #[test]
    fn bad_messages_are_refused_with_their_code() {
        let code = |t: &str| ClientMessage::parse(t).unwrap_err().code();
        assert_eq!(code("{not json"), "bad_request");
        assert_eq!(code("[1,2]"), "bad_request");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"no":"type"}"#), "unknown_type");
        assert_eq!(
            code(r#"{"type":"join","session":"","user":"x"}"#),
            "bad_request"
        );
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert_eq!(
            code(&format!(
                r#"{{"type":"join","session":"{long}","user":"x"}}"#
            )),
            "bad_request"
        );
        assert_eq!(code(r#"{"type":"say","content":""}"#), "bad_request");
        assert_eq!(code(r#"{"type":"say","content":7}"#), "bad_request");
        assert_eq!(
            code(r#"{"type":"generate","n":2}"#),
            "invalid_request_error"
        );
        assert_eq!(
            code(r#"{"type":"generate","max_tokens":"many"}"#),
            "invalid_request_error"
        );
    }
}
