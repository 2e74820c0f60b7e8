//! Which device a served model computes on: `--device cpu|cuda|auto` (`[server] device`).
//!
//! The choice is resolved once, at start-up, before any model is fetched or loaded, so
//! that `--device cuda` on a machine (or a build) without a usable GPU stops at once
//! with one line naming what is missing, instead of after a download. `auto` takes a
//! usable GPU when this binary was built with the `cuda` feature and falls back to the
//! CPU otherwise, saying why.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// The device asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A usable GPU if there is one (and this build has CUDA), else the CPU.
    #[default]
    Auto,
    /// Our CPU kernels.
    Cpu,
    /// The CUDA backend; an error when it cannot run here.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(format!("unknown device {s:?} (devices: auto, cpu, cuda)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The device models run on, once resolved.
#[derive(Debug, Clone)]
pub enum Device {
    /// Our CPU kernels on the process's compute pool.
    Cpu,
    /// The GPU the CUDA backend found.
    #[cfg(feature = "cuda")]
    Cuda {
        info: crate::backends::cuda::DeviceInfo,
        /// Share of the GPU's free memory the backend may take (weights, KV, workspace).
        gpu_memory_fraction: f32,
    },
}

impl Device {
    /// The backend's name, as `/admin/models` shows it.
    pub fn backend(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            Device::Cuda { .. } => "cuda",
        }
    }
}

/// Why `--device cuda` cannot be served here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda: this sluice was built without CUDA support \
         (build it with `cargo build --release --features cuda`)"
    )]
    NotBuilt,
    #[error("--device cuda: {0}")]
    Unusable(String),
    #[error("gpu_memory_fraction must be in (0, 1], got {0}")]
    BadFraction(String),
}

/// Resolves `choice`: the device, and why it is the one it is (for the log).
pub fn resolve(
    choice: DeviceChoice,
    gpu_memory_fraction: f32,
) -> Result<(Device, String), DeviceError> {
    resolve_with(choice, gpu_memory_fraction, || {
        probe_cuda(gpu_memory_fraction)
    })
}

/// [`resolve`] with the GPU probe passed in, so that every outcome is testable on any
/// build and machine.
fn resolve_with(
    choice: DeviceChoice,
    gpu_memory_fraction: f32,
    probe_gpu: impl FnOnce() -> Result<Device, DeviceError>,
) -> Result<(Device, String), DeviceError> {
    if !(gpu_memory_fraction > 0.0 && gpu_memory_fraction <= 1.0) {
        return Err(DeviceError::BadFraction(gpu_memory_fraction.to_string()));
    }
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "asked for".into())),
        DeviceChoice::Cuda => Ok((probe_gpu()?, "asked for".into())),
        DeviceChoice::Auto => match probe_gpu() {
            Ok(gpu) => Ok((gpu, "auto: a usable GPU".into())),
            Err(e) => Ok((Device::Cpu, format!("auto: {}", why_not(&e)))),
        },
    }
}

/// The reason in a [`DeviceError`] without its `--device cuda:` prefix.
fn why_not(e: &DeviceError) -> String {
    match e {
        DeviceError::NotBuilt => "this build has no CUDA support".into(),
        DeviceError::Unusable(why) => why.clone(),
        DeviceError::BadFraction(_) => e.to_string(),
    }
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(_gpu_memory_fraction: f32) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt)
}

#[cfg(feature = "cuda")]
fn probe_cuda(gpu_memory_fraction: f32) -> Result<Device, DeviceError> {
    let info = crate::backends::cuda::probe().map_err(|e| DeviceError::Unusable(e.to_string()))?;
    Ok(Device::Cuda {
        info,
        gpu_memory_fraction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_case_insensitively_and_unknown_ones_list_the_choices() {
        assert_eq!("CUDA".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        let e = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(e.contains("auto, cpu, cuda"), "{e}");
    }

    #[test]
    fn cpu_is_always_available_and_fractions_are_checked() {
        let (d, _) = resolve(DeviceChoice::Cpu, 0.9).unwrap();
        assert_eq!(d.backend(), "cpu");
        assert!(matches!(
            resolve(DeviceChoice::Cpu, 1.5),
            Err(DeviceError::BadFraction(_))
        ));
        assert!(resolve(DeviceChoice::Cpu, 0.0).is_err());
    }

    #[test]
    fn cuda_where_it_cannot_run_is_an_error_and_auto_falls_back_saying_why() {
        for (err, why) in [
            (DeviceError::NotBuilt, "no CUDA support"),
            (
                DeviceError::Unusable("no CUDA driver: libcuda.so was not found".into()),
                "libcuda.so",
            ),
        ] {
            let e = resolve_with(DeviceChoice::Cuda, 0.9, || Err(err.clone())).unwrap_err();
            assert_eq!(e, err);
            let (d, reason) = resolve_with(DeviceChoice::Auto, 0.9, || Err(err.clone())).unwrap();
            assert_eq!(d.backend(), "cpu");
            assert!(reason.contains(why), "{reason}");
        }
        assert!(DeviceError::NotBuilt
            .to_string()
            .contains("--features cuda"));
    }

    #[test]
    fn auto_takes_a_usable_gpu_and_cpu_never_probes() {
        // (The stand-in "GPU" is the CPU device: what matters is that auto takes what
        // the probe found.)
        let (_, reason) = resolve_with(DeviceChoice::Auto, 0.9, || Ok(Device::Cpu)).unwrap();
        assert_eq!(reason, "auto: a usable GPU");
        let (d, _) = resolve_with(DeviceChoice::Cpu, 0.9, || panic!("probed")).unwrap();
        assert_eq!(d.backend(), "cpu");
    }

    /// This build's own probe: without the feature, `cuda` names the rebuild.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_cuda_is_refused() {
        assert_eq!(
            resolve(DeviceChoice::Cuda, 0.9).unwrap_err(),
            DeviceError::NotBuilt
        );
    }
}
