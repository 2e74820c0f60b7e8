//! What a caller hands the engine and what it gets back: the engine's whole public
//! vocabulary besides `Engine` itself.

use tokio::sync::mpsc;

use crate::sampling::{SamplingParams, TokenLogprobs};
use crate::structured::Constraint;

/// A validated generation request.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// End-of-generation and stop tokens are banned until this many tokens exist.
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Generation ends before the first of these strings; it is never sent.
    pub stop: Vec<String>,
    /// Extra token ids that end generation, like the model's own end tokens.
    pub stop_token_ids: Vec<u32>,
    /// Report each token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
    /// The shape the output must have (structured outputs): only tokens that keep it
    /// valid are drawn, and generation ends when it is complete.
    pub constraint: Option<Constraint>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose computation the prefix cache saved.
    pub cached_tokens: usize,
}

/// What a request's stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it releases: empty while a character or a
    /// possible stop string is incomplete.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event of every request.
    Done {
        reason: FinishReason,
        usage: Usage,
        error: Option<String>,
    },
}

/// The receiving end of one request. Drop it to cancel the request: the engine notices
/// before its next step and frees the request's KV blocks.
pub struct RequestStream {
    pub(crate) rx: mpsc::Receiver<Event>,
}

impl RequestStream {
    /// The next event; `None` after `Done`.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Blocking variant for non-async callers (benchmarks, tests).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Poll variant, for hand-written streams and response bodies.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// A snapshot of the engine's state, for health checks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    /// Requests in the loop's queue (new and preempted).
    pub queued: usize,
    pub kv_blocks_in_use: usize,
    pub kv_blocks_total: usize,
    /// Blocks ever written: the KV cache's memory is touched lazily, block by block.
    pub kv_blocks_touched: usize,
    pub preemptions: u64,
    pub prompt_tokens_admitted: u64,
    pub prompt_tokens_cached: u64,
    /// Tokens run through the model so far (prompt chunks, recomputation after
    /// preemption, and decodes): the sum of `sluice_step_tokens`.
    pub tokens_computed: u64,
}
