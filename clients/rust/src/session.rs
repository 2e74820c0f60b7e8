//! A participant in a collaborative WebSocket session (protocol: docs/websocket.md).

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::ClientError;
use crate::types::Sampling;

/// A message of the shared conversation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SessionMessage {
    pub role: String,
    pub user: Option<String>,
    pub content: String,
}

/// A reply in progress when one joined.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LiveGeneration {
    pub id: String,
    pub by: String,
    pub text: String,
}

/// What the server sends to session participants.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionEvent {
    Authenticated,
    Session {
        session: String,
        messages: Vec<SessionMessage>,
        participants: Vec<String>,
        generation: Option<LiveGeneration>,
    },
    ParticipantJoined {
        user: String,
    },
    ParticipantLeft {
        user: String,
    },
    Message {
        role: String,
        user: Option<String>,
        content: String,
    },
    GenerationStarted {
        id: String,
        by: String,
    },
    Token {
        id: String,
        text: String,
    },
    GenerationDone {
        id: String,
        finish_reason: String,
        usage: Value,
    },
    Error {
        code: String,
        message: String,
    },
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One connection to a session. [`SessionClient::split`] gives a sender and an event
/// reader that can be used from two places at once.
pub struct SessionClient {
    tx: SessionSender,
    rx: SessionEvents,
}

/// The sending half of a session connection.
pub struct SessionSender {
    sink: futures_util::stream::SplitSink<Ws, Message>,
}

/// The receiving half of a session connection.
pub struct SessionEvents {
    stream: futures_util::stream::SplitStream<Ws>,
}

fn ws_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::WebSocket(e.to_string())
}

impl SessionClient {
    /// Connects to `url` (`ws://host:port/v1/ws`) and joins `session` as `user`.
    pub async fn connect(
        url: &str,
        api_key: Option<&str>,
        session: &str,
        user: &str,
    ) -> Result<Self, ClientError> {
        let mut req = url.into_client_request().map_err(ws_err)?;
        if let Some(k) = api_key {
            let v = format!("Bearer {k}").parse().map_err(ws_err)?;
            req.headers_mut().insert("Authorization", v);
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    crate::error::from_body(status, &body)
                }
                other => ws_err(other),
            })?;
        let (sink, stream) = ws.split();
        let mut c = SessionClient {
            tx: SessionSender { sink },
            rx: SessionEvents { stream },
        };
        c.tx.send(json!({"type": "join", "session": session, "user": user}))
            .await?;
        Ok(c)
    }

    /// The sender and the event reader, to use concurrently.
    pub fn split(self) -> (SessionSender, SessionEvents) {
        (self.tx, self.rx)
    }

    /// Adds a user message to the conversation.
    pub async fn say(&mut self, content: &str) -> Result<(), ClientError> {
        self.tx.say(content).await
    }

    /// Starts the assistant's reply with these sampling settings.
    pub async fn generate(&mut self, sampling: &Sampling) -> Result<(), ClientError> {
        self.tx.generate(sampling).await
    }

    /// Stops the running reply.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.tx.cancel().await
    }

    /// The next event; `None` once the server closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<SessionEvent>, ClientError> {
        self.rx.next_event().await
    }

    /// Leaves the session and closes the connection.
    pub async fn leave(self) -> Result<(), ClientError> {
        self.tx.leave().await
    }
}

impl SessionSender {
    async fn send(&mut self, v: Value) -> Result<(), ClientError> {
        self.sink
            .send(Message::Text(v.to_string().into()))
            .await
            .map_err(ws_err)
    }

    /// Adds a user message to the conversation.
    pub async fn say(&mut self, content: &str) -> Result<(), ClientError> {
        self.send(json!({"type": "say", "content": content})).await
    }

    /// Starts the assistant's reply with these sampling settings.
    pub async fn generate(&mut self, sampling: &Sampling) -> Result<(), ClientError> {
        let mut v =
            serde_json::to_value(sampling).map_err(|e| ClientError::Protocol(e.to_string()))?;
        v["type"] = json!("generate");
        self.send(v).await
    }

    /// Stops the running reply.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.send(json!({"type": "cancel"})).await
    }

    /// Leaves the session and closes the connection.
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.send(json!({"type": "leave"})).await?;
        self.sink.close().await.map_err(ws_err)
    }
}

impl SessionEvents {
    /// The next event; `None` once the server closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<SessionEvent>, ClientError> {
        loop {
            match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => return Err(ws_err(e)),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t)
                        .map(Some)
                        .map_err(|e| ClientError::Protocol(format!("bad event {t}: {e}")))
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}
