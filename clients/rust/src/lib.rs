//! A Rust client for Sluice and any OpenAI-compatible server: typed chat and completions,
//! non-streaming and streaming (SSE), and collaborative WebSocket sessions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! use futures_util::StreamExt;
//! use sluice_client::{ChatMessage, ChatRequest, Client};
//!
//! let client = Client::new("http://127.0.0.1:8080", Some("sk-sluice-dev".into()));
//! let req = ChatRequest::new(vec![ChatMessage::user("Write a haiku.")]).max_tokens(64);
//! let mut stream = client.chat_stream(&req).await?;
//! while let Some(chunk) = stream.next().await {
//!     print!("{}", chunk?.text());
//! }
//! # Ok(()) }
//! ```

mod client;
mod error;
mod session;
mod sse;
mod types;

pub use client::Client;
pub use error::{ApiErrorBody, ClientError};
pub use session::{
    LiveGeneration, SessionClient, SessionEvent, SessionEvents, SessionMessage, SessionSender,
};
pub use sse::EventStream;
pub use types::*;
