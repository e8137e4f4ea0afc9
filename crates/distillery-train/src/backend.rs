//! From `run.backend`, `run.device` and `run.dtype` to a burn `Device`: the one place a run's
//! device is made. Never `Device::default()`, which prefers a GPU backend whenever one is
//! compiled in, and never a fallback to another backend.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::{Device, FloatDType};
use distillery_config::{Backend, Precision, RunConfig};

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

/// A run's (backend, device index, precision).
type DeviceKey = (Backend, usize, Precision);

/// The device a run computes on, made once per process for each (backend, device, dtype) so
/// that every stage of a pipeline and every model of an evaluation share it. Opening it prints
/// which device it is, for every command that computes.
pub fn device_for(run: &RunConfig) -> Result<Device, BackendError> {
    static DEVICES: OnceLock<Mutex<HashMap<DeviceKey, Device>>> = OnceLock::new();
    let key = (run.backend, run.device, run.dtype);
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(device) = devices.get(&key) {
        return Ok(device.clone());
    }
    let mut device = open(run.backend, run.device)?;
    set_precision(&mut device, run.backend, run.dtype)?;
    eprintln!("backend {}", backend_description(run, &device));
    devices.insert(key, device.clone());
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
    let missing = |found: usize, needs: &'static str| BackendError::NoDevice {
        backend: backend.name(),
        index,
        found,
        needs,
    };
    match backend {
        Backend::Cpu if index == 0 => Ok(Device::flex()),
        Backend::Cpu => Err(missing(1, "the cpu backend has one device, 0")),
        Backend::Wgpu => wgpu(index).ok_or_else(|| {
            missing(
                wgpu_adapters(),
                "wgpu needs a Vulkan, Metal or DX12 driver (on Debian without a GPU: apt-get \
                 install mesa-vulkan-drivers libvulkan1)",
            )
        }),
        Backend::TchCpu if index == 0 => tch_cpu(),
        Backend::TchCpu => Err(missing(1, "the tch-cpu backend has one device, 0")),
        Backend::TchCuda => tch_cuda(index)?.ok_or_else(|| {
            missing(
                tch_cuda_devices(),
                "tch-cuda needs an NVIDIA GPU, its driver and a CUDA build of libtorch \
                 (LIBTORCH pointing at one)",
            )
        }),
        Backend::Cuda => cuda(index)?.ok_or_else(|| {
            missing(
                cuda_devices(),
                "the cuda backend needs an NVIDIA GPU and its driver (libcuda.so.1)",
            )
        }),
    }
}

/// The N-th adapter wgpu finds, of any kind: a discrete GPU, an integrated one, or a software
/// rasterizer such as Mesa's lavapipe.
#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> Option<Device> {
    Device::enumerate(burn::tensor::DeviceType::Wgpu)
        .into_iter()
        .nth(index)
}

#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> usize {
    Device::enumerate(burn::tensor::DeviceType::Wgpu)
        .into_iter()
        .count()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: usize) -> Option<Device> {
    None
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_adapters() -> usize {
    0
}

#[cfg(not(all(feature = "tch", feature = "cuda")))]
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
fn tch_cpu() -> Result<Device, BackendError> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "tch"))]
fn tch_cpu() -> Result<Device, BackendError> {
    Err(not_compiled(Backend::TchCpu, "tch", LIBTORCH_NEEDS))
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn tch_cuda(index: usize) -> Result<Option<Device>, BackendError> {
    Ok((index < tch_cuda_devices()).then(|| Device::libtorch_cuda(index)))
}

#[cfg(feature = "tch")]
fn tch_cuda_devices() -> usize {
    Device::enumerate(burn::tensor::DeviceType::LibTorch)
        .into_iter()
        .count()
}

#[cfg(not(feature = "tch"))]
fn tch_cuda(_: usize) -> Result<Option<Device>, BackendError> {
    Err(not_compiled(Backend::TchCuda, "tch", LIBTORCH_NEEDS))
}

#[cfg(not(feature = "tch"))]
fn tch_cuda_devices() -> usize {
    0
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Option<Device>, BackendError> {
    Ok(Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_iter()
        .nth(index))
}

#[cfg(feature = "cuda")]
fn cuda_devices() -> usize {
    Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_iter()
        .count()
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Option<Device>, BackendError> {
    Err(not_compiled(Backend::Cuda, "cuda", ""))
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> usize {
    0
}

/// f32 is every backend's default and needs no setting; a half precision must be one the
/// device computes in, not only stores.
fn set_precision(
    device: &mut Device,
    backend: Backend,
    dtype: Precision,
) -> Result<(), BackendError> {
    let float = match dtype {
        Precision::F32 => return Ok(()),
        Precision::Bf16 => FloatDType::BF16,
        Precision::F16 => FloatDType::F16,
    };
    let refuse = |reason: String| BackendError::Precision {
        backend: backend.name(),
        dtype: dtype.name(),
        reason,
    };
    if backend == Backend::Cpu {
        return Err(refuse(
            "distillery's CPU kernels and optimizer compute in f32".into(),
        ));
    }
    if !device.supports_dtype(float) {
        return Err(refuse("the device has no arithmetic in it".into()));
    }
    device
        .configure(float)
        .map_err(|error| refuse(error.to_string()))
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
        if !cfg!(feature = "cuda") {
            let message = error(Backend::Cuda, 0, Precision::F32);
            assert!(message.contains("--features cuda"), "{message}");
        }
    }

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
