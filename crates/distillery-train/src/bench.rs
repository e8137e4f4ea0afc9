//! Training throughput: the training loop's own step, timed after warm-up.

use std::time::Instant;

use burn::module::Module;
use distillery_config::ExperimentConfig;
use distillery_data::WindowSampler;
use distillery_model::Llama;
use distillery_run::seeds::{Stream, derive_seed};
use distillery_run::{device_for, prepare_data};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::optim::AdamW;
use crate::trainer::{NextTokenObjective, Objective, StepRunner, adamw_settings, schedule};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub backend: String,
    pub parameters: usize,
    pub tokens_per_step: usize,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub tokens_per_sec: f64,
    /// Mean and standard deviation of the timed steps, milliseconds.
    pub step_ms_mean: f64,
    pub step_ms_std: f64,
    /// Peak resident memory of the process during the timed steps (Linux), MiB.
    pub peak_rss_mib: Option<f64>,
    pub threads: usize,
}

/// Throughput of next-token training.
pub fn bench_train(
    config: &ExperimentConfig,
    warmup_steps: usize,
    timed_steps: usize,
) -> Result<BenchReport, TrainError> {
    bench_objective(config, warmup_steps, timed_steps, &mut NextTokenObjective)
}

/// Throughput of training `config`'s model on `objective`, from fresh weights.
pub fn bench_objective(
    config: &ExperimentConfig,
    warmup_steps: usize,
    timed_steps: usize,
    objective: &mut dyn Objective,
) -> Result<BenchReport, TrainError> {
    let device = device_for(&config.run)?;
    let data = prepare_data(config)?;
    let model = objective.initial_model(Llama::new(
        &data.llama,
        config.model.dropout,
        derive_seed(config.run.seed, Stream::Init, 0),
        &device,
    )?);
    let parameters = data.llama.num_parameters();
    let mut optimizer = AdamW::new(adamw_settings(config));
    let mut sampler = WindowSampler::new(
        derive_seed(config.run.seed, Stream::DataOrder, 0),
        config.data.seq_len,
    );
    let mut runner = StepRunner {
        config,
        splits: &data.splits,
        autodiff_device: device.clone().autodiff(),
        schedule: schedule(config),
        objective,
    };
    let mut model = model.train();
    let mut tokens_per_step = 0;
    for step in 0..warmup_steps {
        model = runner.run(model, &mut optimizer, &mut sampler, step)?.0;
    }
    reset_peak_rss();
    let mut durations = Vec::with_capacity(timed_steps);
    for step in warmup_steps..warmup_steps + timed_steps {
        let started = Instant::now();
        let (updated, stats) = runner.run(model, &mut optimizer, &mut sampler, step)?;
        model = updated;
        // A GPU may still be applying the update; the step ends when the device has finished.
        device.sync().map_err(|error| TrainError::Device {
            backend: config.run.backend.name(),
            message: format!("the device failed during the step: {error}"),
        })?;
        durations.push(started.elapsed().as_secs_f64());
        tokens_per_step = stats.tokens;
    }
    let total: f64 = durations.iter().sum();
    let mean = total / durations.len().max(1) as f64;
    let variance =
        durations.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / durations.len().max(1) as f64;
    Ok(BenchReport {
        backend: distillery_run::backend_description(&config.run, &device),
        parameters,
        tokens_per_step,
        warmup_steps,
        timed_steps,
        tokens_per_sec: (tokens_per_step * timed_steps) as f64 / total,
        step_ms_mean: mean * 1e3,
        step_ms_std: variance.sqrt() * 1e3,
        peak_rss_mib: peak_rss_mib(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Resets the kernel's peak-RSS counter so the peak covers only what follows (Linux >= 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(distillery_run::proc_report::kibibytes(&status, "VmHWM:")? as f64 / 1024.0)
}
