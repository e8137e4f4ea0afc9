//! Training: the loop, its optimizer and schedule, exact resume from checkpoints, validation,
//! metrics and the throughput bench.

mod backend_check;
mod bench;
mod eval;
pub mod loss;
mod metrics;
pub mod optim;
mod progress;
pub mod schedule;
mod trainer;

use std::path::PathBuf;

use distillery_config::ExperimentConfig;
use distillery_data::DataError;
use distillery_model::ModelError;
use distillery_run::{
    BackendError, CheckpointError, RunData, RunError, load_for_inference, prepare_data,
};

pub use backend_check::{
    BackendCheck, Comparison, LOGIT_TOLERANCE, LOSS_TOLERANCE, WEIGHT_TOLERANCE, check_against_cpu,
};
pub use bench::{BenchReport, bench_objective, bench_train};
pub use eval::{EvalMetrics, batch_mask, batch_tensors, evaluate, evaluate_with_predictions};
pub use metrics::{METRICS_FILE, MetricRecord, MetricsError, TENSORBOARD_DIR, read_records};
pub use trainer::{
    MicroBatch, NextTokenObjective, Objective, ObjectiveLoss, Resume, TrainOptions, TrainOutcome,
    TrainSummary, train, write_initial_checkpoint,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The device, the data, a checkpoint, or a config value that only turns out wrong once
    /// the data is known.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The device failed while computing.
    #[error("run.backend = \"{backend}\": {message}")]
    Device {
        backend: &'static str,
        message: String,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A run directory or file that cannot serve: nothing to resume, another run's checkpoint.
    #[error("{}: {message}", path.display())]
    Path { path: PathBuf, message: String },
    #[error(
        "training diverged: the loss is {loss} at step {step}; lower train.lr or set train.grad_clip"
    )]
    Diverged { step: usize, loss: f64 },
}

impl From<BackendError> for TrainError {
    fn from(error: BackendError) -> Self {
        Self::Run(error.into())
    }
}

impl From<DataError> for TrainError {
    fn from(error: DataError) -> Self {
        Self::Run(error.into())
    }
}

impl From<CheckpointError> for TrainError {
    fn from(error: CheckpointError) -> Self {
        Self::Run(error.into())
    }
}

/// A checkpoint's metrics on the validation split of `config`'s corpus.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointEvaluation {
    pub checkpoint: PathBuf,
    pub step: usize,
    pub parameters: usize,
    #[serde(flatten)]
    pub metrics: EvalMetrics,
}

pub fn evaluate_checkpoint(
    config: &ExperimentConfig,
    checkpoint_path: &std::path::Path,
) -> Result<CheckpointEvaluation, TrainError> {
    let data = prepare_data(config)?;
    let (checkpoint, step, model) = load_for_inference(config, checkpoint_path, &data.tokenizer)?;
    Ok(CheckpointEvaluation {
        checkpoint,
        step,
        parameters: model.config().num_parameters(),
        metrics: evaluate_on_data(config, &data, &model),
    })
}

/// `model`'s metrics on the validation split of `config`'s corpus, whatever file it came from.
pub fn evaluate_model(
    config: &ExperimentConfig,
    model: &distillery_model::Llama,
) -> Result<EvalMetrics, TrainError> {
    let data = prepare_data(config)?;
    Ok(evaluate_on_data(config, &data, model))
}

/// `model`'s metrics on the validation split of data already prepared for `config`.
pub fn evaluate_on_data(
    config: &ExperimentConfig,
    data: &RunData,
    model: &distillery_model::Llama,
) -> EvalMetrics {
    evaluate(
        model,
        &validation_windows(config, data, model),
        config.eval_batch_size(),
        &model.device(),
    )
}

/// The validation windows of `config` for `model`: `data.seq_len` tokens (at most the model's
/// context), the first `eval.max_windows`.
pub fn validation_windows(
    config: &ExperimentConfig,
    data: &RunData,
    model: &distillery_model::Llama,
) -> distillery_data::ValidationWindows {
    distillery_data::ValidationWindows::new(
        data.splits.validation.clone(),
        config
            .data
            .seq_len
            .min(model.config().max_position_embeddings),
        config.eval.max_windows,
    )
}
