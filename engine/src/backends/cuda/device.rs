//! Finding the GPU: whether a CUDA driver and a usable device are there, and what the
//! device is.
//!
//! cudarc loads `libcuda.so` lazily and panics (rather than returning an error) when
//! the library or one of its symbols is missing. So [`probe`] asks
//! `is_culib_present` first, before any other cudarc call, and runs every later driver
//! call inside `catch_unwind`: a machine without CUDA gets a [`CudaUnavailable`] saying
//! what is missing, never a panic.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, DriverError};

/// The oldest compute capability our PTX targets (`compute_80`: Ampere).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Why the CUDA backend cannot run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaUnavailable {
    /// `libcuda.so` could not be loaded.
    NoDriver,
    /// The driver loaded but reports no device.
    NoDevice,
    /// Device 0 is older than [`MIN_COMPUTE_CAPABILITY`].
    ComputeCapability {
        /// The device's name.
        name: String,
        /// Its compute capability (major, minor).
        cc: (i32, i32),
    },
    /// A driver call failed (the message names the call and CUDA's error).
    Driver(String),
    /// The driver library lacks a function we call (a driver older than CUDA 12.9).
    DriverTooOld(String),
}

impl fmt::Display for CudaUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaUnavailable::NoDriver => write!(f, "no CUDA driver: libcuda.so was not found"),
            CudaUnavailable::NoDevice => write!(f, "no CUDA device"),
            CudaUnavailable::ComputeCapability { name, cc } => write!(
                f,
                "device 0 ({name}) has compute capability {}.{}; sluice needs {}.{} or newer",
                cc.0, cc.1, MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            ),
            CudaUnavailable::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaUnavailable::DriverTooOld(e) => write!(
                f,
                "the CUDA driver is too old (sluice needs CUDA 12.9 or newer): {e}"
            ),
        }
    }
}

impl std::error::Error for CudaUnavailable {}

/// Which of the embedded PTX builds a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtxArch {
    /// `compute_80` PTX: Ampere and Ada (8.x).
    Sm80,
    /// `compute_90` PTX: Hopper and newer (9.0+).
    Sm90,
}

impl PtxArch {
    /// The PTX for compute capability `cc`; `None` below [`MIN_COMPUTE_CAPABILITY`].
    pub fn for_compute_capability(cc: (i32, i32)) -> Option<Self> {
        if cc >= (9, 0) {
            Some(PtxArch::Sm90)
        } else if cc >= MIN_COMPUTE_CAPABILITY {
            Some(PtxArch::Sm80)
        } else {
            None
        }
    }

    /// The suffix of the PTX file names (`sm_80`, `sm_90`).
    pub fn name(self) -> &'static str {
        match self {
            PtxArch::Sm80 => "sm_80",
            PtxArch::Sm90 => "sm_90",
        }
    }
}

/// What [`probe`] found about device 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name (e.g. `NVIDIA H200`).
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Free device memory in bytes when probed.
    pub free_memory: usize,
    /// The driver's CUDA version, as `cuDriverGetVersion` gives it (13000 for 13.0).
    pub driver_version: i32,
    /// The PTX build the device runs.
    pub arch: PtxArch,
}

impl DeviceInfo {
    /// How logs and `/admin/models` name the device: `NVIDIA H200 (sm_90, 139 GiB)`.
    pub fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!(
            "{} (sm_{major}{minor}, {} GiB)",
            self.name,
            self.total_memory >> 30
        )
    }
}

/// Checks for a CUDA driver and a usable device 0 without keeping anything open.
pub fn probe() -> Result<DeviceInfo, CudaUnavailable> {
    open().map(|(_, info)| info)
}

/// Like [`probe`], and keeps device 0's (primary) context for the runtime.
pub(crate) fn open() -> Result<(Arc<CudaContext>, DeviceInfo), CudaUnavailable> {
    // SAFETY: only tries to dlopen the driver library by its usual names; it calls no
    // function of it.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriver);
    }
    // A symbol missing from an old driver makes cudarc panic: turn that into an error.
    match catch_unwind(AssertUnwindSafe(open_device)) {
        Ok(r) => r,
        Err(panic) => Err(CudaUnavailable::DriverTooOld(panic_message(&*panic))),
    }
}

fn open_device() -> Result<(Arc<CudaContext>, DeviceInfo), CudaUnavailable> {
    let driver =
        |what: &'static str| move |e: DriverError| CudaUnavailable::Driver(format!("{what}: {e}"));
    cudarc::driver::result::init().map_err(driver("cuInit"))?;
    let count = CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?;
    if count < 1 {
        return Err(CudaUnavailable::NoDevice);
    }
    let ctx = CudaContext::new(0).map_err(driver("creating the context of device 0"))?;
    let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
    let cc = ctx
        .compute_capability()
        .map_err(driver("reading the compute capability"))?;
    let arch =
        PtxArch::for_compute_capability(cc).ok_or_else(|| CudaUnavailable::ComputeCapability {
            name: name.clone(),
            cc,
        })?;
    let (free_memory, total_memory) = ctx.mem_get_info().map_err(driver("cuMemGetInfo"))?;
    let mut driver_version = 0i32;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, which is valid
    // for the call.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(driver("cuDriverGetVersion"))?;
    let info = DeviceInfo {
        name,
        compute_capability: cc,
        total_memory,
        free_memory,
        driver_version,
        arch,
    };
    Ok((ctx, info))
}

/// The text of a caught panic (cudarc panics with a `String`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "a CUDA driver call panicked".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_is_picked_by_compute_capability() {
        assert_eq!(PtxArch::for_compute_capability((7, 5)), None);
        assert_eq!(PtxArch::for_compute_capability((8, 0)), Some(PtxArch::Sm80));
        assert_eq!(PtxArch::for_compute_capability((8, 9)), Some(PtxArch::Sm80));
        assert_eq!(PtxArch::for_compute_capability((9, 0)), Some(PtxArch::Sm90));
        assert_eq!(
            PtxArch::for_compute_capability((10, 0)),
            Some(PtxArch::Sm90)
        );
        assert_eq!(PtxArch::Sm90.name(), "sm_90");
    }

    #[test]
    fn unavailability_says_what_is_missing_in_one_line() {
        let old = CudaUnavailable::ComputeCapability {
            name: "Tesla T4".into(),
            cc: (7, 5),
        };
        assert_eq!(
            old.to_string(),
            "device 0 (Tesla T4) has compute capability 7.5; sluice needs 8.0 or newer"
        );
        assert_eq!(
            CudaUnavailable::NoDriver.to_string(),
            "no CUDA driver: libcuda.so was not found"
        );
        for e in [
            old,
            CudaUnavailable::NoDevice,
            CudaUnavailable::Driver("x".into()),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn devices_are_described_with_arch_and_memory() {
        let info = DeviceInfo {
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_memory: 150_000_000_000,
            free_memory: 149_000_000_000,
            driver_version: 13000,
            arch: PtxArch::Sm90,
        };
        assert_eq!(info.describe(), "NVIDIA H200 (sm_90, 139 GiB)");
    }

    /// Without a driver (this test's usual machine) probing fails cleanly; with one it
    /// names a device. Either way it must not panic.
    #[test]
    fn probing_never_panics() {
        match probe() {
            Ok(info) => assert!(!info.name.is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
