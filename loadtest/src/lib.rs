//! `sluice loadtest`: drives any OpenAI-compatible server with streaming requests and
//! measures what vLLM's `bench serve` measures, with the same definitions:
//! - TTFT: from sending the request to the first chunk with non-empty content;
//! - ITL: the gaps between consecutive content chunks;
//! - TPOT: (end-to-end − TTFT) / (output tokens − 1);
//! - end-to-end latency, requests/s, output tokens/s (token counts from the server's
//!   `usage`, never from counting chunks), and goodput under an SLO.

mod arrivals;
pub mod html;
mod prompts;
mod report;
mod runner;
pub mod soak;
mod stats;

pub use prompts::{builtin_prompts, load_prompts};
pub use report::{compare_table, Report};
pub use runner::{run, Endpoint, Load, LoadSpec, Slo};
pub use stats::Summary;
