//! The kernels: PTX embedded in the binary (one module per `.cu` source and arch, see
//! `kernels/ABI.md`), loaded into the context at start-up and looked up by name.
//!
//! Kernels are found by name across all four modules rather than assumed to live in a
//! given one, so moving a kernel between `.cu` files needs no change here.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::device::PtxArch;
use crate::error::ModelError;

/// The PTX modules of one arch: (source name, PTX text).
type PtxSet = [(&'static str, &'static str); 4];

const PTX_SM80: PtxSet = [
    ("matmul", include_str!("kernels/ptx/matmul.sm_80.ptx")),
    ("embed", include_str!("kernels/ptx/embed.sm_80.ptx")),
    (
        "elementwise",
        include_str!("kernels/ptx/elementwise.sm_80.ptx"),
    ),
    ("attention", include_str!("kernels/ptx/attention.sm_80.ptx")),
];

const PTX_SM90: PtxSet = [
    ("matmul", include_str!("kernels/ptx/matmul.sm_90.ptx")),
    ("embed", include_str!("kernels/ptx/embed.sm_90.ptx")),
    (
        "elementwise",
        include_str!("kernels/ptx/elementwise.sm_90.ptx"),
    ),
    ("attention", include_str!("kernels/ptx/attention.sm_90.ptx")),
];

/// The embedded PTX modules for `arch`.
pub fn ptx_for(arch: PtxArch) -> &'static PtxSet {
    match arch {
        PtxArch::Sm80 => &PTX_SM80,
        PtxArch::Sm90 => &PTX_SM90,
    }
}

/// Kernels every model needs, whatever its weight types (ABI.md).
pub const FIXED_KERNELS: &[&str] = &[
    "rms_norm",
    "add",
    "add_bias",
    "swiglu",
    "geglu",
    "softcap",
    "rope",
    "kv_store",
    "paged_attention_decode",
    "paged_attention_prefill",
    "argmax",
    // Gathers the rows whose logits are wanted (f32 rows are a GGUF f32 matrix).
    "get_rows_f32",
];

/// The loaded kernels, by name.
pub struct Kernels {
    functions: HashMap<String, CudaFunction>,
    /// Kept so the functions' modules stay loaded for the runtime's life.
    _modules: Vec<Arc<CudaModule>>,
}

impl Kernels {
    /// Loads `arch`'s modules into `ctx` and looks up `names` (each must exist).
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: PtxArch,
        names: &[String],
    ) -> Result<Self, ModelError> {
        let mut modules = Vec::new();
        for (source, ptx) in ptx_for(arch) {
            let m = ctx.load_module(Ptx::from_src(*ptx)).map_err(|e| {
                ModelError::Runtime(format!(
                    "cannot load CUDA module {source}.{}.ptx: {e}",
                    arch.name()
                ))
            })?;
            modules.push(m);
        }
        let mut functions = HashMap::new();
        for name in names {
            let f = modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .ok_or_else(|| {
                    ModelError::Runtime(format!(
                        "CUDA kernel {name} is not in the {} PTX modules",
                        arch.name()
                    ))
                })?;
            functions.insert(name.clone(), f);
        }
        Ok(Kernels {
            functions,
            _modules: modules,
        })
    }

    /// The kernel `name`, which `load` was asked for.
    pub fn get(&self, name: &str) -> Result<&CudaFunction, ModelError> {
        self.functions
            .get(name)
            .ok_or_else(|| ModelError::Runtime(format!("CUDA kernel {name} was not loaded")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_embeds_four_ptx_modules_for_its_target() {
        for (arch, target) in [(PtxArch::Sm80, "sm_80"), (PtxArch::Sm90, "sm_90")] {
            let set = ptx_for(arch);
            let names: Vec<_> = set.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, ["matmul", "embed", "elementwise", "attention"]);
            for (name, ptx) in set {
                assert!(
                    ptx.lines().any(|l| l.trim() == format!(".target {target}")),
                    "{name}.{target}.ptx does not target {target}"
                );
            }
        }
    }
}
