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
    let only_device_zero = |needs: &'static str| {
        if index == 0 {
            Ok(())
        } else {
            Err(BackendError::NoDevice {
                backend: backend.name(),
                index,
                found: 1,
                needs,
            })
        }
    };
    match backend {
        Backend::Cpu => {
            only_device_zero("the cpu backend has one device, 0").map(|()| Device::flex())
        }
        Backend::Wgpu => wgpu(index),
        Backend::TchCpu => {
            only_device_zero("the tch-cpu backend has one device, 0")?;
            tch_cpu()
        }
        Backend::TchCuda => tch_cuda(index),
        Backend::Cuda => cuda(index),
    }
}

/// The `index`-th of the devices a backend found, or an error saying what it needs.
#[cfg(any(feature = "wgpu", feature = "tch", feature = "cuda"))]
fn nth_device(
    found: burn::tensor::Devices,
    backend: Backend,
    index: usize,
    needs: &'static str,
) -> Result<Device, BackendError> {
    let count = found.len();
    found.into_iter().nth(index).ok_or(BackendError::NoDevice {
        backend: backend.name(),
        index,
        found: count,
        needs,
    })
}

/// The N-th adapter wgpu finds, of any kind: a discrete GPU, an integrated one, or a software
/// rasterizer such as Mesa's lavapipe.
#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> Result<Device, BackendError> {
    nth_device(
        Device::enumerate(burn::tensor::DeviceType::Wgpu),
        Backend::Wgpu,
        index,
        "wgpu needs a Vulkan, Metal or DX12 driver (on Debian without a GPU: apt-get install \
         mesa-vulkan-drivers libvulkan1)",
    )
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: usize) -> Result<Device, BackendError> {
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
fn tch_cpu() -> Result<Device, BackendError> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "tch"))]
fn tch_cpu() -> Result<Device, BackendError> {
    Err(not_compiled(Backend::TchCpu, "tch", LIBTORCH_NEEDS))
}

/// LibTorch enumerates its CUDA devices.
#[cfg(feature = "tch")]
fn tch_cuda(index: usize) -> Result<Device, BackendError> {
    nth_device(
        Device::enumerate(burn::tensor::DeviceType::LibTorch),
        Backend::TchCuda,
        index,
        "tch-cuda needs an NVIDIA GPU, its driver and a CUDA build of libtorch (LIBTORCH \
         pointing at one)",
    )
}

#[cfg(not(feature = "tch"))]
fn tch_cuda(_: usize) -> Result<Device, BackendError> {
    Err(not_compiled(Backend::TchCuda, "tch", LIBTORCH_NEEDS))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device, BackendError> {
    nth_device(
        Device::enumerate(burn::tensor::DeviceType::Cuda),
        Backend::Cuda,
        index,
        "the cuda backend needs an NVIDIA GPU and its driver (libcuda.so.1)",
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device, BackendError> {
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
