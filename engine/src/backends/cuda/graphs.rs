//! CUDA graphs for decode steps: a decode step launches ~15 kernels per layer, a few
//! microseconds of CPU each, which at small batches costs more than the GPU work. A
//! graph captured once per batch-size bucket replays the whole step in one launch.
//!
//! A graph holds its kernels' arguments by value, so a replayed step must look exactly
//! like the captured one: the same buffers (the runtime's workspace, whose addresses
//! stay put until it grows, which drops the graphs), the same sizes (the batch padded
//! to its bucket with dummy rows, and block tables padded to a fixed width), and only
//! the *contents* of the step's input buffers changing between replays.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph, CudaStream};

use crate::error::ModelError;

/// The environment variable that turns decode graphs on (`1`). They are off by default
/// until the capture path has run on a GPU (`sluice check cuda` compares replays with
/// eager steps): with them off, decode steps launch their kernels one by one (the same
/// kernels, unpadded), which is correct if slower at small batches.
pub const DECODE_GRAPHS_ENV: &str = "SLUICE_CUDA_GRAPHS";

/// Whether decode steps are captured and replayed as CUDA graphs in this process.
pub fn decode_graphs_enabled() -> bool {
    std::env::var(DECODE_GRAPHS_ENV).is_ok_and(|v| v == "1")
}

/// Batch sizes a decode graph is captured for; a batch runs in the smallest that holds
/// it. Larger batches launch eagerly (the launches are then a small share of the step).
pub const BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// The bucket for a decode batch of `n` sequences; `None` when it is empty or larger
/// than the largest bucket.
pub fn bucket_for(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= n && n > 0)
}

/// Dummy rows that pad a batch of `n` up to `bucket`.
pub fn padding(n: usize, bucket: usize) -> usize {
    bucket.saturating_sub(n)
}

/// A captured graph that may move to the engine loop's thread.
struct Graph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronized, so calls on one must be
// serialized; they are not tied to a thread. A `Graph` lives in its runtime's
// `DecodeGraphs` and is only reached through `&mut CudaRuntime` from the one engine
// loop that owns the runtime, which serializes every call.
unsafe impl Send for Graph {}

/// Captured decode graphs, one per bucket.
#[derive(Default)]
pub struct DecodeGraphs {
    graphs: HashMap<usize, Graph>,
}

impl DecodeGraphs {
    /// Replays `bucket`'s graph; `Ok(false)` when none is captured yet.
    pub fn launch(&self, bucket: usize) -> Result<bool, ModelError> {
        match self.graphs.get(&bucket) {
            None => Ok(false),
            Some(g) => g.0.launch().map(|_| true).map_err(|e| {
                ModelError::Runtime(format!("CUDA graph launch (batch {bucket}): {e}"))
            }),
        }
    }

    /// Forgets every graph (their buffers moved, or the runtime was reset).
    pub fn clear(&mut self) {
        self.graphs.clear();
    }

    /// Captures what `record` launches on `stream` as `bucket`'s graph, then replays it
    /// once (capturing runs nothing). `record` must only launch kernels: no copies from
    /// host memory, allocations or synchronization, which capture forbids.
    pub fn capture_and_launch(
        &mut self,
        bucket: usize,
        stream: &Arc<CudaStream>,
        record: impl FnOnce() -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let err = |what: &str| {
            let what = what.to_string();
            move |e: cudarc::driver::DriverError| {
                ModelError::Runtime(format!("CUDA graph {what} (batch {bucket}): {e}"))
            }
        };
        // Thread-local mode: only this thread's calls are checked against the capture,
        // so another model's runtime on another thread is unaffected.
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(err("capture start"))?;
        let recorded = record();
        // Capture must end whatever happened, or the stream stays in capture mode.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = ended.map_err(err("capture"))?.ok_or_else(|| {
            ModelError::Runtime(format!("CUDA graph capture of batch {bucket} was empty"))
        })?;
        graph.launch().map_err(err("launch"))?;
        self.graphs.insert(bucket, Graph(graph));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_take_the_smallest_bucket_that_holds_them() {
        assert_eq!(bucket_for(0), None);
        assert_eq!(bucket_for(1), Some(1));
        assert_eq!(bucket_for(2), Some(2));
        assert_eq!(bucket_for(3), Some(4));
        assert_eq!(bucket_for(8), Some(8));
        assert_eq!(bucket_for(9), Some(16));
        assert_eq!(bucket_for(129), Some(256));
        assert_eq!(bucket_for(256), Some(256));
        assert_eq!(bucket_for(257), None);
        for n in 1..=256 {
            let b = bucket_for(n).unwrap();
            assert!(b >= n && b < 2 * n.max(1) + 1, "{n} -> {b}");
            assert_eq!(padding(n, b), b - n);
        }
        assert_eq!(padding(5, 8), 3);
    }
}
