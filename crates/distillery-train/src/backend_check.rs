//! One backend against the cpu backend (burn-flex with distillery's fused kernels) on a config's
//! model: the logits of one forward pass from the same initial weights, then one training step
//! (data, initialization, forward, loss, backward, AdamW, validation, checkpoint) on each.
//!
//! Tolerances: logits (magnitude ~1) within 1e-4; after the step, the training and validation
//! losses within 1e-4 and every weight within 1e-4 of the cpu run. One AdamW step at the tiny
//! config's learning rate (3e-3, warmup cut to that one step) moves a weight by lr·g/(|g|+ε), up
//! to ~3e-3, so a weight stepped in the wrong direction, or not stepped, fails by a factor of
//! 30. The weights are the loose bound: where |g| is near ε (1e-8) the step magnifies rounding
//! differences in g (wgpu on lavapipe: 1.4e-5 measured).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::{DType, Int, Tensor, TensorData};
use distillery_config::{Backend, ExperimentConfig, Precision};
use distillery_model::{Llama, LlamaConfig};
use distillery_run::checkpoint::{MODEL_FILE, step_dir_name};
use distillery_run::{RunError, backend_description, device_for, prepare_data};
use serde::Serialize;

use crate::{
    METRICS_FILE, NextTokenObjective, Resume, TrainError, TrainOptions, TrainOutcome, read_records,
    train,
};

pub const LOGIT_TOLERANCE: f64 = 1e-4;
pub const LOSS_TOLERANCE: f64 = 1e-4;
pub const WEIGHT_TOLERANCE: f64 = 1e-4;

/// How far a backend's results lie from the cpu backend's.
#[derive(Debug, Clone, Serialize)]
pub struct BackendCheck {
    pub backend: String,
    /// The device it ran on, as the run log names it.
    pub device: String,
    pub logit_difference: f64,
    pub train_loss: Comparison,
    pub validation_loss: Comparison,
    /// The largest difference over every weight after the step, and the tensor it is in.
    pub weight_difference: f64,
    pub weight_with_largest_difference: String,
    /// What exceeds its tolerance, empty when the backend agrees with the cpu.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Comparison {
    pub cpu: f64,
    pub backend: f64,
}

impl Comparison {
    pub fn difference(self) -> f64 {
        (self.cpu - self.backend).abs()
    }
}

/// Runs the comparison for `config.run.backend`, writing both runs' checkpoints and metrics
/// under `scratch`.
pub fn check_against_cpu(
    config: &ExperimentConfig,
    scratch: &Path,
) -> Result<BackendCheck, TrainError> {
    if config.run.backend == Backend::Cpu {
        return Err(RunError::Config {
            origin: "run.backend".into(),
            message: "the check compares a backend with cpu: set run.backend to another one".into(),
        }
        .into());
    }
    if config.run.dtype != Precision::F32 {
        return Err(RunError::Config {
            origin: "run.dtype".into(),
            message: "the check compares with cpu in f32, where its tolerances hold: leave \
                      run.dtype at f32"
                .into(),
        }
        .into());
    }
    let cpu = one_step_config(config, Backend::Cpu, scratch);
    let other = one_step_config(config, config.run.backend, scratch);
    let device = device_for(&other.run)?;
    let description = backend_description(&other.run, &device);

    // Both runs share the data and so the architecture; it is read once.
    let llama = prepare_data(&cpu)?.llama;
    let logit_difference = max_difference(&logits(&cpu, &llama)?, &logits(&other, &llama)?);
    let cpu_step = train_one_step(&cpu)?;
    let other_step = train_one_step(&other)?;
    let cpu_weights = f32_tensors(&cpu_step.model_file)?;
    let other_weights = f32_tensors(&other_step.model_file)?;
    let (weight_with_largest_difference, weight_difference) =
        largest_weight_difference(&cpu_weights, &other_weights, &other_step.model_file)?;

    let train_loss = Comparison {
        cpu: cpu_step.train_loss,
        backend: other_step.train_loss,
    };
    let validation_loss = Comparison {
        cpu: cpu_step.validation_loss,
        backend: other_step.validation_loss,
    };
    let mut failures = Vec::new();
    let mut check = |what: &str, difference: f64, tolerance: f64| {
        if difference.is_nan() || difference > tolerance {
            failures.push(format!(
                "{what} differ by {difference:.3e} (tolerance {tolerance:.0e})"
            ));
        }
    };
    check("logits", logit_difference, LOGIT_TOLERANCE);
    check("training losses", train_loss.difference(), LOSS_TOLERANCE);
    check(
        "validation losses",
        validation_loss.difference(),
        LOSS_TOLERANCE,
    );
    check(
        &format!("weights ({weight_with_largest_difference}) after one step"),
        weight_difference,
        WEIGHT_TOLERANCE,
    );
    Ok(BackendCheck {
        backend: config.run.backend.name().into(),
        device: description,
        logit_difference,
        train_loss,
        validation_loss,
        weight_difference,
        weight_with_largest_difference,
        failures,
    })
}

/// `config` on `backend`, cut to one step that is validated and saved, with its run's
/// directories under `scratch`.
fn one_step_config(
    config: &ExperimentConfig,
    backend: Backend,
    scratch: &Path,
) -> ExperimentConfig {
    let mut config = config.clone();
    config.run.backend = backend;
    config.run.name = format!("{}-{}", config.run.name, backend.name());
    config.run.checkpoint_dir = scratch.join("checkpoints");
    config.run.experiment_dir = scratch.join("experiments");
    config.train.steps = 1;
    config.train.warmup_steps = 1;
    config.eval.every = 1;
    config.eval.max_windows = Some(8);
    config.checkpoint.every = 1;
    config
}

fn logits(config: &ExperimentConfig, llama: &LlamaConfig) -> Result<Vec<f32>, TrainError> {
    let device = device_for(&config.run)?;
    let model = Llama::new(llama, 0.0, config.run.seed, &device)?;
    let vocab = llama.vocab_size as i64;
    let sequence = config.data.seq_len;
    let tokens: Vec<i64> = (0..2 * sequence as i64)
        .map(|i| (i * 131 + 7) % vocab)
        .collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [2, sequence]), &device);
    model
        .forward(tokens)
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|error| TrainError::Device {
            backend: config.run.backend.name(),
            message: format!("the logits are not f32: {error:?}"),
        })
}

struct OneStep {
    train_loss: f64,
    validation_loss: f64,
    model_file: std::path::PathBuf,
}

fn train_one_step(config: &ExperimentConfig) -> Result<OneStep, TrainError> {
    let options = TrainOptions {
        resume: Resume::Fresh,
        interrupt: Arc::new(AtomicBool::new(false)),
    };
    let summary = match train(config, &options, &mut NextTokenObjective)? {
        TrainOutcome::Completed(summary) => summary,
        TrainOutcome::Interrupted { checkpoint, .. } => {
            return Err(TrainError::Path {
                path: checkpoint,
                message: "interrupted".into(),
            });
        }
    };
    let metrics_file = config.run_experiment_dir().join(METRICS_FILE);
    let train_loss = read_records(&metrics_file)?
        .iter()
        .find_map(|record| record.values.get("train/loss").copied())
        .ok_or_else(|| TrainError::Path {
            path: metrics_file.clone(),
            message: "has no train/loss".into(),
        })?;
    Ok(OneStep {
        train_loss,
        validation_loss: summary.final_validation.loss,
        model_file: config
            .run_checkpoint_dir()
            .join(step_dir_name(1))
            .join(MODEL_FILE),
    })
}

/// Every tensor of an f32 burnpack file by name, read by burn-pack's own reader rather than
/// through the model, so that a loading bug cannot hide a difference.
fn f32_tensors(path: &Path) -> Result<BTreeMap<String, Vec<f32>>, TrainError> {
    let fail = |message: String| TrainError::Path {
        path: path.to_path_buf(),
        message,
    };
    let reader =
        burn_pack::Reader::from_file_exact(path).map_err(|error| fail(error.to_string()))?;
    let mut tensors = BTreeMap::new();
    for tensor in reader
        .into_tensors()
        .map_err(|error| fail(error.to_string()))?
    {
        let (name, dtype, _, _, bytes) = tensor
            .into_parts()
            .map_err(|error| fail(error.to_string()))?;
        if dtype != DType::F32 {
            return Err(fail(format!("tensor `{name}` is {dtype:?}, not f32")));
        }
        let values = bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect();
        tensors.insert(name, values);
    }
    Ok(tensors)
}

fn largest_weight_difference(
    cpu: &BTreeMap<String, Vec<f32>>,
    other: &BTreeMap<String, Vec<f32>>,
    other_path: &Path,
) -> Result<(String, f64), TrainError> {
    let mut largest = (String::new(), 0.0);
    for (name, expected) in cpu {
        let actual = other
            .get(name)
            .filter(|actual| actual.len() == expected.len())
            .ok_or_else(|| TrainError::Path {
                path: other_path.to_path_buf(),
                message: format!("has no tensor `{name}` of the cpu run's size"),
            })?;
        let difference = max_difference(expected, actual);
        if difference.is_nan() {
            return Ok((name.clone(), difference));
        }
        if difference > largest.1 {
            largest = (name.clone(), difference);
        }
    }
    Ok(largest)
}

/// The largest absolute difference; NaN if either side has a NaN, so that it fails every
/// tolerance.
fn max_difference(expected: &[f32], actual: &[f32]) -> f64 {
    if expected.len() != actual.len() {
        return f64::NAN;
    }
    let mut largest = 0.0f64;
    for (a, b) in expected.iter().zip(actual) {
        let difference = f64::from((a - b).abs());
        if difference.is_nan() {
            return f64::NAN;
        }
        largest = largest.max(difference);
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_is_the_largest_difference_wherever_it_sits() {
        assert!(max_difference(&[f32::NAN, 0.0], &[0.0, 5.0]).is_nan());
        assert!(max_difference(&[0.0, f32::NAN], &[5.0, 0.0]).is_nan());
        assert_eq!(max_difference(&[1.0, 2.0], &[1.5, 4.0]), 2.0);
        assert!(max_difference(&[1.0], &[1.0, 2.0]).is_nan());
    }
}
