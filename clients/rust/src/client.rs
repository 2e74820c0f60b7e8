//! The HTTP client.

use serde::Serialize;
use serde_json::Value;

use crate::error::{from_body, ClientError};
use crate::session::SessionClient;
use crate::sse::EventStream;
use crate::types::{
    ChatChunk, ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, Model,
};

/// A connection to one server; cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base_url: &str, api_key: Option<String>) -> Self {
        Self::with_http(base_url, api_key, reqwest::Client::new())
    }

    /// Like [`Client::new`], over a configured `reqwest::Client` (timeouts, pooling, …).
    pub fn with_http(base_url: &str, api_key: Option<String>, http: reqwest::Client) -> Self {
        Client {
            http,
            base: base_url
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string(),
            key: api_key,
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            Err(from_body(status, &resp.text().await.unwrap_or_default()))
        }
    }

    async fn call<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        stream: bool,
    ) -> Result<reqwest::Response, ClientError> {
        let mut v = serde_json::to_value(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        v["stream"] = Value::Bool(stream);
        self.send(self.post(path).json(&v)).await
    }

    /// The served models.
    pub async fn models(&self) -> Result<Vec<Model>, ClientError> {
        let mut r = self.http.get(format!("{}/v1/models", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        let v: Value = self.send(r).await?.json().await?;
        serde_json::from_value(v["data"].clone()).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// A chat completion, whole.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ClientError> {
        Ok(self
            .call("/v1/chat/completions", req, false)
            .await?
            .json()
            .await?)
    }

    /// A chat completion as it is generated; usage arrives on the last chunk.
    pub async fn chat_stream(
        &self,
        req: &ChatRequest,
    ) -> Result<EventStream<ChatChunk>, ClientError> {
        let mut req = req.clone();
        req.sampling.extra.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
        let resp = self.call("/v1/chat/completions", &req, true).await?;
        Ok(EventStream::new(resp))
    }

    /// A plain completion, whole.
    pub async fn completion(
        &self,
        req: &CompletionRequest,
    ) -> Result<CompletionResponse, ClientError> {
        Ok(self
            .call("/v1/completions", req, false)
            .await?
            .json()
            .await?)
    }

    /// A plain completion as it is generated.
    pub async fn completion_stream(
        &self,
        req: &CompletionRequest,
    ) -> Result<EventStream<CompletionResponse>, ClientError> {
        let resp = self.call("/v1/completions", req, true).await?;
        Ok(EventStream::new(resp))
    }

    /// Joins collaborative session `session` as `user` over the WebSocket.
    pub async fn join_session(
        &self,
        session: &str,
        user: &str,
    ) -> Result<SessionClient, ClientError> {
        let ws = self.base.replacen("http", "ws", 1) + "/v1/ws";
        SessionClient::connect(&ws, self.key.as_deref(), session, user).await
    }
}
