//! The engine's metrics, recorded through the `metrics` facade; the gateway installs the
//! Prometheus exporter. Without an installed recorder these calls cost next to nothing.
//!
//! Every series carries a `model` label with the served model's name, so the engines of
//! several models keep separate gauges instead of overwriting one another's. Handles are
//! looked up at each call (a few per step) rather than kept, so an engine started before
//! the exporter is installed still reports to it.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram, SharedString};

use crate::request::FinishReason;
use crate::scheduler::SchedulerStats;

/// Requests in the running batch.
pub const REQUESTS_RUNNING: &str = "sluice_requests_running";
/// Requests accepted and waiting for a slot (preempted ones included).
pub const REQUESTS_WAITING: &str = "sluice_requests_waiting";
/// KV blocks held by live requests over all blocks.
pub const KV_CACHE_USAGE: &str = "sluice_kv_cache_usage_ratio";
/// Prompt tokens served from the prefix cache over all prompt tokens admitted.
pub const PREFIX_CACHE_HIT: &str = "sluice_prefix_cache_hit_ratio";
/// Requests preempted to free KV blocks.
pub const PREEMPTIONS: &str = "sluice_preemptions_total";
/// Prompt tokens admitted.
pub const PROMPT_TOKENS: &str = "sluice_prompt_tokens_total";
/// Tokens generated.
pub const GENERATION_TOKENS: &str = "sluice_generation_tokens_total";
/// Finished requests, by finish reason.
pub const REQUESTS_FINISHED: &str = "sluice_requests_finished_total";
/// Sequences per forward step.
pub const STEP_BATCH_SIZE: &str = "sluice_step_batch_size";
/// Tokens per forward step.
pub const STEP_TOKENS: &str = "sluice_step_tokens";
/// Wall time of one forward step, sampling included.
pub const STEP_SECONDS: &str = "sluice_step_duration_seconds";

/// Bytes of the KV cache written so far (its pages are touched lazily, block by block,
/// so resident memory grows with this until the whole cache has been used once).
pub const KV_CACHE_TOUCHED_BYTES: &str = "sluice_kv_cache_touched_bytes";
/// Device (GPU) memory the model's runtime holds, by use.
pub const DEVICE_MEMORY_BYTES: &str = "sluice_device_memory_bytes";
/// Engine loops restarted after a panic.
pub const ENGINE_RESTARTS: &str = "sluice_engine_restarts_total";

/// Time from submission to first admission into the running batch.
pub const QUEUE_SECONDS: &str = "sluice_request_queue_seconds";

/// vLLM's names for the queue and cache gauges, labelled `model_name` as vLLM labels
/// them, so routers and endpoint pickers written for vLLM (vllm-router, the Gateway API
/// Inference Extension's) can balance over Sluice engines too.
pub mod vllm {
    /// Requests in the running batch (`sluice_requests_running`).
    pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
    /// Requests waiting for a slot (`sluice_requests_waiting`).
    pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
    /// KV cache usage, 0 to 1 (`sluice_kv_cache_usage_ratio`).
    pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
    /// Always 1, with the KV cache's shape in its labels (`block_size`, `num_gpu_blocks`).
    pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";
}

/// Gives every engine metric its help text (Prometheus `# HELP`), once the exporter is
/// installed: scrapers and `promtool check metrics` expect one per family.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(REQUESTS_RUNNING, "Requests in the running batch.");
    describe_gauge!(
        REQUESTS_WAITING,
        "Requests accepted and waiting for a batch slot, preempted ones included."
    );
    describe_gauge!(
        KV_CACHE_USAGE,
        "KV cache blocks held by live requests over all blocks (0 to 1)."
    );
    describe_gauge!(
        PREFIX_CACHE_HIT,
        "Prompt tokens served from the prefix cache over all prompt tokens admitted (0 to 1)."
    );
    describe_counter!(PREEMPTIONS, "Requests preempted to free KV cache blocks.");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens admitted into the batch.");
    describe_counter!(GENERATION_TOKENS, "Tokens generated.");
    describe_counter!(REQUESTS_FINISHED, "Finished requests, by finish reason.");
    describe_histogram!(STEP_BATCH_SIZE, "Sequences per forward step.");
    describe_histogram!(
        STEP_TOKENS,
        "Tokens per forward step (decodes plus prefill chunks)."
    );
    describe_histogram!(
        STEP_SECONDS,
        Unit::Seconds,
        "Wall time of one forward step, sampling included."
    );
    describe_gauge!(
        KV_CACHE_TOUCHED_BYTES,
        Unit::Bytes,
        "Bytes of the KV cache written at least once (resident memory grows with it)."
    );
    describe_gauge!(
        DEVICE_MEMORY_BYTES,
        Unit::Bytes,
        "Device (GPU) memory the model's runtime holds, by use: weights, kv_cache, workspace."
    );
    describe_counter!(ENGINE_RESTARTS, "Engine loops restarted after a panic.");
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Time from submission to first admission into the running batch."
    );
    describe_gauge!(
        vllm::NUM_REQUESTS_RUNNING,
        "Requests in the running batch (vLLM's name for sluice_requests_running)."
    );
    describe_gauge!(
        vllm::NUM_REQUESTS_WAITING,
        "Requests waiting for a batch slot (vLLM's name for sluice_requests_waiting)."
    );
    describe_gauge!(
        vllm::KV_CACHE_USAGE_PERC,
        "KV cache usage from 0 to 1 (vLLM's name for sluice_kv_cache_usage_ratio)."
    );
    describe_gauge!(
        vllm::CACHE_CONFIG_INFO,
        "The KV cache's shape in labels (block_size in tokens, num_gpu_blocks: all blocks, on any device); always 1."
    );
}

/// Records one engine's metrics under its model's name.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    model: SharedString,
}

impl EngineMetrics {
    /// Metrics labelled `model="<model>"`.
    pub fn new(model: &str) -> Self {
        EngineMetrics {
            model: SharedString::from(Arc::<str>::from(model)),
        }
    }

    /// The model label's value.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A request entered the running batch for the first time after `waited`.
    pub fn queue_time(&self, waited: Duration) {
        histogram!(QUEUE_SECONDS, "model" => self.model.clone()).record(waited.as_secs_f64());
    }

    /// Queue and cache gauges, after every loop iteration.
    pub fn state(&self, running: usize, waiting: usize, kv_usage: f64, stats: &SchedulerStats) {
        let m = || self.model.clone();
        gauge!(REQUESTS_RUNNING, "model" => m()).set(running as f64);
        gauge!(REQUESTS_WAITING, "model" => m()).set(waiting as f64);
        gauge!(KV_CACHE_USAGE, "model" => m()).set(kv_usage);
        gauge!(vllm::NUM_REQUESTS_RUNNING, "model_name" => m()).set(running as f64);
        gauge!(vllm::NUM_REQUESTS_WAITING, "model_name" => m()).set(waiting as f64);
        gauge!(vllm::KV_CACHE_USAGE_PERC, "model_name" => m()).set(kv_usage);
        if stats.prompt_tokens_queried > 0 {
            gauge!(PREFIX_CACHE_HIT, "model" => m())
                .set(stats.prompt_tokens_cached as f64 / stats.prompt_tokens_queried as f64);
        }
    }

    /// Device memory the runtime holds, by use.
    pub fn device_memory(&self, m: &crate::backends::DeviceMemory) {
        for (kind, bytes) in [
            ("weights", m.weights),
            ("kv_cache", m.kv_cache),
            ("workspace", m.workspace),
        ] {
            gauge!(DEVICE_MEMORY_BYTES, "model" => self.model.clone(), "use" => kind)
                .set(bytes as f64);
        }
    }

    /// The KV cache's shape, as vLLM publishes it (`vllm:cache_config_info`).
    pub fn cache_config(&self, block_size: usize, num_blocks: usize) {
        gauge!(
            vllm::CACHE_CONFIG_INFO,
            "model_name" => self.model.clone(),
            "block_size" => block_size.to_string(),
            "num_gpu_blocks" => num_blocks.to_string()
        )
        .set(1.0);
    }

    /// Bytes of the KV cache written at least once.
    pub fn kv_touched(&self, bytes: usize) {
        gauge!(KV_CACHE_TOUCHED_BYTES, "model" => self.model.clone()).set(bytes as f64);
    }

    /// The engine loop panicked and is being restarted.
    pub fn restart(&self) {
        counter!(ENGINE_RESTARTS, "model" => self.model.clone()).increment(1);
    }

    /// One forward step.
    pub fn step(&self, sequences: usize, tokens: usize, sampled: usize, took: Duration) {
        let m = || self.model.clone();
        histogram!(STEP_BATCH_SIZE, "model" => m()).record(sequences as f64);
        histogram!(STEP_TOKENS, "model" => m()).record(tokens as f64);
        histogram!(STEP_SECONDS, "model" => m()).record(took.as_secs_f64());
        counter!(GENERATION_TOKENS, "model" => m()).increment(sampled as u64);
    }

    /// Newly admitted prompts and preemptions in a step.
    pub fn admissions(&self, prompt_tokens: usize, preemptions: usize) {
        counter!(PROMPT_TOKENS, "model" => self.model.clone()).increment(prompt_tokens as u64);
        counter!(PREEMPTIONS, "model" => self.model.clone()).increment(preemptions as u64);
    }

    /// A request ended.
    pub fn finished(&self, reason: FinishReason) {
        counter!(REQUESTS_FINISHED, "model" => self.model.clone(), "reason" => reason.as_str())
            .increment(1);
    }
}
