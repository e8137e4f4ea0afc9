//! The tiny model on every backend compiled in, against the cpu backend (burn-flex, with
//! distillery's fused kernels): the logits of one forward pass, then one training step through
//! the CLI (data, initialization, forward, loss, backward, AdamW, validation, checkpoint).
//!
//! Tolerances: logits (magnitude ~1) within 1e-4; after the step, the training and validation
//! losses within 1e-4 and every weight within 1e-4 of the cpu run. One AdamW step at the tiny
//! config's learning rate (3e-3, warmup cut to that one step) moves a weight by lr·g/(|g|+ε), up
//! to ~3e-3, so a weight stepped in the wrong direction, or not stepped, fails by a factor of
//! 30. The weights are the loose bound: where |g| is near ε (1e-8) the step magnifies rounding
//! differences in g (wgpu on lavapipe: 1.4e-5 measured).

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use common::{Workspace, repo_path};
use distillery_config::ExperimentConfig;
use distillery_model::Llama;

const LOGIT_TOLERANCE: f32 = 1e-4;
const LOSS_TOLERANCE: f64 = 1e-4;
const WEIGHT_TOLERANCE: f32 = 1e-4;

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_cpu() {
    assert_backend_matches_cpu("wgpu");
}

/// Run by `scripts/check-tch.sh`, which builds with `--features tch`.
#[cfg(feature = "tch")]
#[test]
fn tch_cpu_matches_cpu() {
    assert_backend_matches_cpu("tch-cpu");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_backend_left_out_of_the_build_is_refused_before_anything_is_written() {
    let workspace = Workspace::new();
    let (code, message) =
        workspace.run_err(&workspace.train_args("no-cuda", &["run.backend=cuda"]));
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains("run.backend = \"cuda\"") && message.contains("--features cuda"),
        "{message}"
    );
    assert!(!workspace.checkpoints.join("no-cuda").exists());
}

fn assert_backend_matches_cpu(backend: &str) {
    let cpu_logits = logits("cpu");
    let logits = logits(backend);
    let logit_difference = max_difference(&cpu_logits, &logits);
    assert!(
        logit_difference <= LOGIT_TOLERANCE,
        "{backend} logits differ from cpu's by {logit_difference}"
    );

    let workspace = Workspace::new();
    let cpu = train_one_step(&workspace, "cpu");
    let other = train_one_step(&workspace, backend);
    for tag in ["train/loss", "val/loss"] {
        let (expected, actual) = (
            metric(&workspace, &cpu, tag),
            metric(&workspace, &other, tag),
        );
        assert!(
            (expected - actual).abs() <= LOSS_TOLERANCE,
            "{tag} on {backend}: {actual}, cpu: {expected}"
        );
    }
    let step = |run: &str| {
        workspace
            .checkpoints
            .join(run)
            .join("step-0000001/model.bpk")
    };
    let expected = common::model_f32_tensors(&step(&cpu));
    let actual = common::model_f32_tensors(&step(&other));
    assert_eq!(expected.len(), actual.len());
    let mut largest = 0.0f32;
    for (name, expected) in &expected {
        let difference = max_difference(expected, &actual[name]);
        assert!(
            difference <= WEIGHT_TOLERANCE,
            "{name} on {backend} differs from cpu's by {difference} after one step"
        );
        largest = largest.max(difference);
    }
    eprintln!(
        "{backend} vs cpu: logits differ by at most {logit_difference:.2e}, weights after one \
         step by at most {largest:.2e}"
    );
}

fn config(backend: &str) -> ExperimentConfig {
    distillery_config::load(
        Path::new(&repo_path("configs/tiny-test.toml")),
        &[format!("run.backend=\"{backend}\"")],
    )
    .unwrap()
}

fn logits(backend: &str) -> Vec<f32> {
    let config = config(backend);
    let device = distillery_train::device_for(&config.run).unwrap();
    let llama = config.llama_config(2048).unwrap();
    let model = Llama::new(&llama, 0.0, 11, &device).unwrap();
    let tokens: Vec<i64> = (0..64).map(|i| (i * 131 + 7) % 2048).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tokens, [2, 32]), &device);
    model
        .forward(tokens)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Trains the tiny config for one step on `backend`, validating and saving after it; returns
/// the run's name.
fn train_one_step(workspace: &Workspace, backend: &str) -> String {
    let run = format!("one-step-{backend}");
    let backend_setting = format!("run.backend=\"{backend}\"");
    let args = workspace.train_args(
        &run,
        &[
            &backend_setting,
            "train.steps=1",
            "train.warmup_steps=1",
            "eval.every=1",
            "eval.max_windows=8",
            "checkpoint.every=1",
        ],
    );
    let output = workspace.command(&args).output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "training on {backend} failed: {log}"
    );
    assert!(
        log.contains(&format!("backend {backend} (")),
        "the run does not say it runs on {backend}: {log}"
    );
    run
}

fn metric(workspace: &Workspace, run: &str, tag: &str) -> f64 {
    let series = common::metric_series(&workspace.experiments.join(run), tag);
    assert_eq!(series.len(), 1, "{tag} of {run}: {series:?}");
    series[0].1
}

/// The largest absolute difference; NaN if either side has a NaN, so that it fails every
/// tolerance.
fn max_difference(expected: &[f32], actual: &[f32]) -> f32 {
    assert_eq!(expected.len(), actual.len());
    expected
        .iter()
        .zip(actual)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, |largest, difference| {
            if difference.is_nan() || difference > largest {
                difference
            } else {
                largest
            }
        })
}
