//! Sluice's gateway: an OpenAI-compatible HTTP server in front of the engine.
//!
//! A library: the `sluice` binary (its own crate) starts it, and the CLI tools that talk
//! to a server (chat, load test, soak) live there, so the server links none of them.

pub mod api_types;
pub mod auth;
pub mod body_guard;
pub mod config;
pub mod connections;
pub mod error;
pub mod extract;
pub mod generation;
pub mod load_shed;
pub mod metrics;
pub mod model_store;
pub mod rate_limit;
pub mod respond;
pub mod response_store;
pub mod responses;
pub mod routes;
pub mod sampling_defaults;
pub mod server;
pub mod sessions;
pub mod state;
pub mod structured_output;
pub mod tls;
pub mod tools;
pub mod upstream;
pub mod ws_protocol;
