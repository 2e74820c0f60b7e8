//! Launch geometry of every kernel, exactly as `kernels/ABI.md` fixes it, as pure
//! functions (tested without a GPU), and the one place that launches a kernel.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::error::ModelError;

/// Grid and block dimensions of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
}

impl Geometry {
    /// Whether the launch has no blocks (nothing to do: it is skipped, as CUDA refuses
    /// an empty grid).
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: 0,
        }
    }
}

/// Batch sizes up to this go to the `mmv_*` kernels; larger ones to `mm_*`.
pub const MMV_MAX_BATCH: usize = 8;

/// Batch sizes from which the tensor-core `mm_tc_*` kernels (TF32 inputs, ~1e-3
/// relative error) replace `mm_*`; `None` keeps every product on the f32 path. Off
/// until they have been measured against the CPU's logits on a GPU.
pub const TENSOR_CORES_FROM_BATCH: Option<usize> = None;

/// Which matrix-product kernel family a batch of `b` rows takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKind {
    /// `mmv_<t>`: one output row per warp, for 1..=8 input rows (decode).
    Mmv,
    /// `mm_<t>`: 64×64 tiles, for larger batches (prefill, big decode batches).
    Mm,
    /// `mm_tc_<t>`: as `Mm` on the tensor cores (long prefills).
    MmTc,
}

impl MatmulKind {
    /// The kernel family for `b` input rows.
    pub fn for_batch(b: usize) -> Self {
        Self::choose(b, TENSOR_CORES_FROM_BATCH)
    }

    /// The kernel family for `b` input rows when tensor cores take batches from
    /// `tensor_cores_from` on.
    pub fn choose(b: usize, tensor_cores_from: Option<usize>) -> Self {
        if b <= MMV_MAX_BATCH {
            MatmulKind::Mmv
        } else if tensor_cores_from.is_some_and(|t| b >= t) {
            MatmulKind::MmTc
        } else {
            MatmulKind::Mm
        }
    }

    /// The families a model's products may use (whose kernels to load).
    pub fn in_use() -> &'static [MatmulKind] {
        if TENSOR_CORES_FROM_BATCH.is_some() {
            &[MatmulKind::Mmv, MatmulKind::Mm, MatmulKind::MmTc]
        } else {
            &[MatmulKind::Mmv, MatmulKind::Mm]
        }
    }

    /// The kernel name's prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            MatmulKind::Mmv => "mmv",
            MatmulKind::Mm => "mm",
            MatmulKind::MmTc => "mm_tc",
        }
    }
}

fn g(grid: (usize, usize, usize), block: u32) -> Geometry {
    // Sizes beyond u32 are refused earlier (`to_i32`); saturate rather than wrap.
    let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Geometry {
        grid: (c(grid.0), c(grid.1), c(grid.2)),
        block: (block, 1, 1),
    }
}

/// `mmv_<t>`: four warps per block, one output row per warp.
pub fn mmv(n: usize) -> Geometry {
    g((n.div_ceil(4), 1, 1), 128)
}

/// `mm_<t>`: tiles of 64 output rows × 64 batch rows.
pub fn mm(n: usize, b: usize) -> Geometry {
    g((n.div_ceil(64), b.div_ceil(64), 1), 256)
}

/// The matrix product of `n` output rows for `b` input rows.
pub fn matmul(n: usize, b: usize) -> Geometry {
    match MatmulKind::for_batch(b) {
        MatmulKind::Mmv => mmv(n),
        // The tensor-core kernels keep `mm`'s tiles and grid (ABI.md).
        MatmulKind::Mm | MatmulKind::MmTc => mm(n, b),
    }
}

/// `get_rows_<t>`: one block per looked-up row.
pub fn get_rows(n_ids: usize) -> Geometry {
    g((n_ids, 1, 1), 256)
}

/// `rms_norm`: one block per row.
pub fn rms_norm(rows: usize) -> Geometry {
    g((rows, 1, 1), 256)
}

/// `add`, `swiglu`, `geglu`, `softcap`: one thread per element.
pub fn elementwise(n: usize) -> Geometry {
    g((n.div_ceil(256), 1, 1), 256)
}

/// `add_bias`: x over the row, y over the rows.
pub fn add_bias(rows: usize, n: usize) -> Geometry {
    g((n.div_ceil(256), rows, 1), 256)
}

/// `rope`: one block per (token, head), one thread per rotated pair (rounded up to a
/// warp, at most 256).
pub fn rope(n_tokens: usize, n_heads: usize, rot_dim: usize) -> Geometry {
    let threads = (rot_dim / 2).next_multiple_of(32).clamp(32, 256);
    g((n_tokens, n_heads, 1), threads as u32)
}

/// `kv_store`: one block per token.
pub fn kv_store(n_tokens: usize) -> Geometry {
    g((n_tokens, 1, 1), 256)
}

/// `paged_attention_decode`: one block per (head, sequence).
pub fn attention_decode(n_heads: usize, b: usize) -> Geometry {
    g((n_heads, b, 1), 128)
}

/// Queries per block of `paged_attention_prefill`.
pub const PREFILL_QUERIES_PER_BLOCK: usize = 16;

/// `paged_attention_prefill`: one block per 16 queries and head.
pub fn attention_prefill(n_q: usize, n_heads: usize) -> Geometry {
    g((n_q.div_ceil(PREFILL_QUERIES_PER_BLOCK), n_heads, 1), 128)
}

/// `argmax`: one block per row.
pub fn argmax(rows: usize) -> Geometry {
    g((rows, 1, 1), 1024)
}

/// The largest head size the attention kernels take.
pub const MAX_ATTENTION_HEAD_DIM: usize = 256;

/// A size as the kernels' `int`, refused when it does not fit.
pub fn to_i32(v: usize, what: &str) -> Result<i32, ModelError> {
    i32::try_from(v).map_err(|_| ModelError::Runtime(format!("{what} {v} does not fit a CUDA int")))
}

/// One kernel argument: device pointers travel as their 64-bit address, so an offset
/// into a buffer, or a null pointer, is plain arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address (`T*`), 0 for a nullable pointer left out.
    Ptr(u64),
    /// An `int`.
    I32(i32),
    /// A `float`.
    F32(f32),
}

/// Launches `f` with `args` on `stream`; an empty grid launches nothing.
///
/// # Safety
/// `args` must match the kernel's parameters in ABI.md, in order and type, and every
/// pointer must address device memory that stays allocated until the kernel has run
/// and is large enough for what the kernel reads and writes at these sizes.
pub unsafe fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    name: &str,
    geometry: Geometry,
    args: &[Arg],
) -> Result<(), ModelError> {
    if geometry.is_empty() {
        return Ok(());
    }
    let mut b = stream.launch_builder(f);
    for a in args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: the caller vouches for the arguments (this function's contract); `args`
    // outlives the launch call, which copies the values.
    unsafe { b.launch(geometry.config()) }
        .map(|_| ())
        .map_err(|e| ModelError::Runtime(format!("launching CUDA kernel {name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(grid: (u32, u32, u32), block: u32) -> Geometry {
        Geometry {
            grid,
            block: (block, 1, 1),
        }
    }

    #[test]
    fn matrix_products_pick_mmv_up_to_eight_rows() {
        assert_eq!(MatmulKind::for_batch(1), MatmulKind::Mmv);
        assert_eq!(MatmulKind::for_batch(8), MatmulKind::Mmv);
        assert_eq!(MatmulKind::for_batch(9), MatmulKind::Mm);
        assert_eq!(MatmulKind::choose(512, None).prefix(), "mm");
        assert_eq!(MatmulKind::choose(8, Some(1)), MatmulKind::Mmv);
        assert_eq!(MatmulKind::choose(63, Some(64)), MatmulKind::Mm);
        assert_eq!(MatmulKind::choose(64, Some(64)).prefix(), "mm_tc");
        assert!(MatmulKind::in_use().contains(&MatmulKind::for_batch(4096)));
        assert_eq!(matmul(4096, 1), geo((1024, 1, 1), 128));
        assert_eq!(matmul(4097, 8), geo((1025, 1, 1), 128));
        assert_eq!(matmul(4096, 9), geo((64, 1, 1), 256));
        assert_eq!(mm(4097, 65), geo((65, 2, 1), 256));
        assert_eq!(mm(64, 64), geo((1, 1, 1), 256));
        assert_eq!(mmv(1), geo((1, 1, 1), 128));
    }

    #[test]
    fn row_kernels_take_one_block_per_row() {
        assert_eq!(get_rows(7), geo((7, 1, 1), 256));
        assert_eq!(rms_norm(3 * 32), geo((96, 1, 1), 256));
        assert_eq!(kv_store(1), geo((1, 1, 1), 256));
        assert_eq!(argmax(5), geo((5, 1, 1), 1024));
    }

    #[test]
    fn elementwise_kernels_cover_every_element() {
        assert_eq!(elementwise(1), geo((1, 1, 1), 256));
        assert_eq!(elementwise(256), geo((1, 1, 1), 256));
        assert_eq!(elementwise(257), geo((2, 1, 1), 256));
        assert_eq!(add_bias(5, 1024), geo((4, 5, 1), 256));
        assert_eq!(add_bias(5, 1025), geo((5, 5, 1), 256));
    }

    #[test]
    fn rope_threads_round_pairs_up_to_a_warp_and_cap_at_256() {
        assert_eq!(rope(3, 32, 128), geo((3, 32, 1), 64));
        assert_eq!(rope(1, 8, 64), geo((1, 8, 1), 32));
        assert_eq!(rope(1, 8, 2), geo((1, 8, 1), 32));
        assert_eq!(rope(1, 8, 80), geo((1, 8, 1), 64));
        assert_eq!(rope(1, 8, 256), geo((1, 8, 1), 128));
        assert_eq!(rope(1, 8, 512), geo((1, 8, 1), 256));
        assert_eq!(rope(1, 8, 1024), geo((1, 8, 1), 256));
    }

    #[test]
    fn attention_grids_follow_heads_sequences_and_query_tiles() {
        assert_eq!(attention_decode(32, 4), geo((32, 4, 1), 128));
        assert_eq!(attention_prefill(1, 32), geo((1, 32, 1), 128));
        assert_eq!(attention_prefill(16, 32), geo((1, 32, 1), 128));
        assert_eq!(attention_prefill(17, 8), geo((2, 8, 1), 128));
    }

    #[test]
    fn empty_work_is_an_empty_grid() {
        assert!(elementwise(0).is_empty());
        assert!(attention_decode(32, 0).is_empty());
        assert!(mm(0, 100).is_empty());
        assert!(!mm(1, 1).is_empty());
        assert!(to_i32(usize::MAX, "n").is_err());
        assert_eq!(to_i32(7, "n").unwrap(), 7);
    }
}
