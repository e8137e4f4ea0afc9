//! From `run.backend`, `run.device` and `run.dtype` to a burn `Device`: the one place a run's
//! device is made. Never `Device::default()`, which prefers a GPU backend whenever one is
//! compiled in, and never a fallback to another backend.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{Device, FloatDType};
use distillery_config::{Backend, Precision, RunConfig};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "run.backend = \"{backend}\" is not compiled into this build of distillery: rebuild with \
         `cargo build --release --features {feature}`{needs}"
    )]
    NotCompiled {
        backend: &'static str,
        feature: &'static str,
        needs: &'static str,
    },
    #[error(
        "run.backend = \"{backend}\": run.device = {index} does not exist ({found} found); {needs}"
    )]
    NoDevice {
        backend: &'static str,
        index: usize,
        found: usize,
        needs: &'static str,
    },
    #[error(
        "run.dtype = \"{dtype}\" is not supported on run.backend = \"{backend}\" ({reason}); use \
         run.dtype = \"f32\""
    )]
    Precision {
        backend: &'static str,
        dtype: &'static str,
        reason: String,
    },
}

/// The devices this process has opened, by backend and index, with the precision each was set
/// to: burn fixes a device's default precision once, at its first tensor.
type OpenDevices = HashMap<(Backend, usize), (Precision, Device)>;

/// The device a run computes on, opened once per process so that every stage of a pipeline and
/// every model of an evaluation share it. Opening it prints which device it is, for every
/// command that computes.
pub fn device_for(run: &RunConfig) -> Result<Device, BackendError> {
    static DEVICES: OnceLock<Mutex<OpenDevices>> = OnceLock::new();
    if run.backend == Backend::Cpu && run.dtype != Precision::F32 {
        return Err(precision_error(
            run,
            "distillery's fused CPU kernels compute in f32".into(),
        ));
    }
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((precision, device)) = devices.get(&(run.backend, run.device)) {
        if *precision != run.dtype {
            return Err(precision_error(
                run,
                format!(
                    "this process already computes in {} on device {}, and burn sets a \
                     device's precision once",
                    precision.name(),
                    run.device
                ),
            ));
        }
        return Ok(device.clone());
    }
    let mut device = open(run.backend, run.device)?;
    set_precision(&mut device, run)?;
    eprintln!("backend {}", backend_description(run, &device));
    devices.insert((run.backend, run.device), (run.dtype, device.clone()));
    Ok(device)
}

/// What the run computes on, for the log and the bench reports: backend, the device's own name
/// where the backend reports one, index and precision.
pub fn backend_description(run: &RunConfig, device: &Device) -> String {
    let engine = match run.backend {
        Backend::Cpu => "burn-flex",
        Backend::Wgpu => "burn CubeCL wgpu",
        Backend::TchCpu | Backend::TchCuda => "LibTorch",
        Backend::Cuda => "burn CubeCL CUDA",
    };
    let name = device_name(device)
        .map(|name| format!(", {name}"))
        .unwrap_or_default();
    format!(
        "{} ({engine}{name}, device {}, {})",
        run.backend.name(),
        run.device,
        run.dtype.name()
    )
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn device_name(device: &Device) -> Option<String> {
    device.identity().map(|identity| identity.name)
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn device_name(_: &Device) -> Option<String> {
    None
}

fn open(backend: Backend, index: usize) -> Result<Device, BackendError> {
    let found = devices_of(backend)?;
    let count = found.len();
    found.into_iter().nth(index).ok_or(BackendError::NoDevice {
        backend: backend.name(),
        index,
        found: count,
        needs: what_it_needs(backend),
    })
}

/// Every device of `backend` this machine has, in `run.device` order; an error when the
/// backend is not compiled in.
fn devices_of(backend: Backend) -> Result<Vec<Device>, BackendError> {
    match backend {
        Backend::Cpu => Ok(vec![Device::flex()]),
        Backend::Wgpu => wgpu(),
        Backend::TchCpu => tch_cpu(),
        Backend::TchCuda => tch_cuda(),
        Backend::Cuda => cuda(),
    }
}

fn what_it_needs(backend: Backend) -> &'static str {
    match backend {
        Backend::Cpu => "the cpu backend has one device, 0",
        Backend::TchCpu => "the tch-cpu backend has one device, 0",
        Backend::Wgpu => {
            "wgpu needs a Vulkan, Metal or DX12 driver (on Debian without a GPU: apt-get install \
             mesa-vulkan-drivers libvulkan1)"
        }
        Backend::TchCuda => {
            "tch-cuda needs an NVIDIA GPU, its driver and a CUDA build of libtorch (LIBTORCH \
             pointing at one)"
        }
        Backend::Cuda => "the cuda backend needs an NVIDIA GPU and its driver (libcuda.so.1)",
    }
}

/// What one backend offers on this machine, for `distillery devices`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendDevices {
    pub backend: &'static str,
    /// The devices by `run.device` index; empty when the backend finds none.
    pub devices: Vec<String>,
    /// Why the backend cannot run here: not compiled in, or no device found.
    pub unavailable: Option<String>,
}

/// Every backend distillery knows, with the devices each finds on this machine.
pub fn list_devices() -> Vec<BackendDevices> {
    Backend::ALL
        .into_iter()
        .map(|backend| match devices_of(backend) {
            Ok(devices) => BackendDevices {
                backend: backend.name(),
                unavailable: devices
                    .is_empty()
                    .then(|| what_it_needs(backend).to_string()),
                devices: devices
                    .iter()
                    .map(|device| device_name(device).unwrap_or_else(|| format!("{device:?}")))
                    .collect(),
            },
            Err(error) => BackendDevices {
                backend: backend.name(),
                devices: Vec::new(),
                unavailable: Some(error.to_string()),
            },
        })
        .collect()
}

/// wgpu's adapters of every kind: discrete GPUs, integrated ones, and software rasterizers
/// such as Mesa's lavapipe.
#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Vec<Device>, BackendError> {
    Ok(Device::enumerate(burn::tensor::DeviceType::Wgpu)
        .into_iter()
        .collect())
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Vec<Device>, BackendError> {
    Err(not_compiled(Backend::Wgpu, "wgpu", ""))
}

#[cfg(not(all(feature = "wgpu", feature = "tch", feature = "cuda")))]
fn not_compiled(backend: Backend, feature: &'static str, needs: &'static str) -> BackendError {
    BackendError::NotCompiled {
        backend: backend.name(),
        feature,
        needs,
    }
}

#[cfg(not(feature = "tch"))]
const LIBTORCH_NEEDS: &str = " and libtorch 2.9.0 (scripts/setup-libtorch.sh)";

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn 0.22 deprecates LibTorch in favour of CubeCL; the issue asks for it.
fn tch_cpu() -> Result<Vec<Device>, BackendError> {
    Ok(vec![Device::libtorch()])
}

#[cfg(not(feature = "tch"))]
fn tch_cpu() -> Result<Vec<Device>, BackendError> {
    Err(not_compiled(Backend::TchCpu, "tch", LIBTORCH_NEEDS))
}

/// LibTorch enumerates its CUDA devices.
#[cfg(feature = "tch")]
fn tch_cuda() -> Result<Vec<Device>, BackendError> {
    Ok(Device::enumerate(burn::tensor::DeviceType::LibTorch)
        .into_iter()
        .collect())
}

#[cfg(not(feature = "tch"))]
fn tch_cuda() -> Result<Vec<Device>, BackendError> {
    Err(not_compiled(Backend::TchCuda, "tch", LIBTORCH_NEEDS))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Vec<Device>, BackendError> {
    Ok(Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_iter()
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Vec<Device>, BackendError> {
    Err(not_compiled(Backend::Cuda, "cuda", ""))
}

fn precision_error(run: &RunConfig, reason: String) -> BackendError {
    BackendError::Precision {
        backend: run.backend.name(),
        dtype: run.dtype.name(),
        reason,
    }
}

/// f32 is every backend's default and needs no setting; a half precision must be one the
/// device computes in, not only stores.
fn set_precision(device: &mut Device, run: &RunConfig) -> Result<(), BackendError> {
    let float = match run.dtype {
        Precision::F32 => return Ok(()),
        Precision::Bf16 => FloatDType::BF16,
        Precision::F16 => FloatDType::F16,
    };
    if !device.supports_dtype(float) {
        return Err(precision_error(
            run,
            "the device has no arithmetic in it".into(),
        ));
    }
    device
        .configure(float)
        .map_err(|error| precision_error(run, error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(backend: Backend, device: usize, dtype: Precision) -> RunConfig {
        RunConfig {
            name: "unit".into(),
            seed: 0,
            backend,
            device,
            dtype,
            checkpoint_dir: "checkpoints".into(),
            experiment_dir: "experiments".into(),
        }
    }

    fn error(backend: Backend, device: usize, dtype: Precision) -> String {
        device_for(&run(backend, device, dtype))
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn the_cpu_backend_is_flex_in_f32_on_device_zero() {
        let cpu = run(Backend::Cpu, 0, Precision::F32);
        let device = device_for(&cpu).unwrap();
        assert_eq!(device, Device::flex());
        assert_eq!(
            backend_description(&cpu, &device),
            "cpu (burn-flex, device 0, f32)"
        );
        let message = error(Backend::Cpu, 1, Precision::F32);
        assert!(message.contains("run.device = 1") && message.contains("one device, 0"));
        let message = error(Backend::Cpu, 0, Precision::Bf16);
        assert!(message.contains("run.dtype = \"bf16\"") && message.contains("\"cpu\""));
    }

    #[test]
    fn backends_left_out_of_the_build_name_their_cargo_feature() {
        if !cfg!(feature = "tch") {
            let message = error(Backend::TchCpu, 0, Precision::F32);
            assert!(message.contains("--features tch"), "{message}");
            assert!(message.contains("setup-libtorch.sh"), "{message}");
            let message = error(Backend::TchCuda, 0, Precision::F32);
            assert!(message.contains("--features tch"), "{message}");
        }
        if !cfg!(feature = "wgpu") {
            let message = error(Backend::Wgpu, 0, Precision::F32);
            assert!(message.contains("--features wgpu"), "{message}");
        }
        if !cfg!(feature = "cuda") {
            let message = error(Backend::Cuda, 0, Precision::F32);
            assert!(message.contains("--features cuda"), "{message}");
        }
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn a_device_keeps_the_precision_it_was_opened_with() {
        device_for(&run(Backend::Wgpu, 0, Precision::F32)).unwrap();
        let message = error(Backend::Wgpu, 0, Precision::F16);
        assert!(
            message.contains("already computes in f32 on device 0"),
            "{message}"
        );
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn a_missing_adapter_is_an_error_that_says_what_is_missing() {
        let message = error(Backend::Wgpu, 64, Precision::F32);
        assert!(
            message.contains("run.device = 64 does not exist"),
            "{message}"
        );
        assert!(message.contains("mesa-vulkan-drivers"), "{message}");
    }
}
