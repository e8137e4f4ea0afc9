//! Training: the loop, its optimizer and schedule, checkpoints with exact resume, validation,
//! metrics and the throughput bench.

mod backend;
mod backend_check;
mod bench;
pub mod checkpoint;
mod eval;
pub mod loss;
mod metrics;
pub mod optim;
mod progress;
pub mod schedule;
pub mod seeds;
mod trainer;

use std::path::PathBuf;

use distillery_config::ExperimentConfig;
use distillery_data::{CacheStatus, DataError, TextTokenizer, TokenSplits};
use distillery_model::{LlamaConfig, ModelError};

pub use backend::{BackendDevices, BackendError, backend_description, device_for, list_devices};
pub use backend_check::{
    BackendCheck, Comparison, LOGIT_TOLERANCE, LOSS_TOLERANCE, WEIGHT_TOLERANCE, check_against_cpu,
};
pub use bench::{BenchReport, bench_objective, bench_train};
pub use checkpoint::{BestValidation, CheckpointError};
pub use eval::{EvalMetrics, batch_mask, batch_tensors, evaluate, evaluate_with_predictions};
pub use metrics::{METRICS_FILE, MetricRecord, MetricsError, TENSORBOARD_DIR, read_records};
pub use trainer::{
    MicroBatch, NextTokenObjective, Objective, ObjectiveLoss, Resume, TrainOptions, TrainOutcome,
    TrainSummary, train, write_initial_checkpoint,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value that only turns out wrong once the data is known.
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The device failed while computing.
    #[error("run.backend = \"{backend}\": {message}")]
    Device {
        backend: &'static str,
        message: String,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {message}", path.display())]
    Run { path: PathBuf, message: String },
    #[error(
        "training diverged: the loss is {loss} at step {step}; lower train.lr or set train.grad_clip"
    )]
    Diverged { step: usize, loss: f64 },
}

/// The tokenizer, the token splits and the model architecture of a run.
pub struct RunData {
    pub tokenizer: TextTokenizer,
    pub splits: TokenSplits,
    pub llama: LlamaConfig,
    /// The token cache's record of the corpus it encodes.
    pub corpus_sha256: String,
    /// What happened to the token cache, for the log.
    pub cache_note: String,
}

pub fn prepare_data(config: &ExperimentConfig) -> Result<RunData, TrainError> {
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    let cache =
        distillery_data::load_or_build(&config.corpus(), &tokenizer, &config.token_cache_dir())?;
    let cache_note = match &cache.status {
        CacheStatus::Reused => format!("token cache {}", cache.path.display()),
        CacheStatus::Built => format!("built token cache {}", cache.path.display()),
        CacheStatus::Rebuilt(reason) => format!(
            "rebuilt token cache {} because {reason}",
            cache.path.display()
        ),
    };
    let splits = TokenSplits::new(
        &cache.tokens,
        cache.counted.as_deref(),
        config.data.validation_fraction,
        config.data.seq_len,
    )?;
    let llama = config
        .llama_config(tokenizer.vocab_size())
        .map_err(|error| TrainError::Config {
            origin: config.data.tokenizer.display().to_string(),
            message: error.to_string(),
        })?;
    Ok(RunData {
        tokenizer,
        splits,
        llama,
        corpus_sha256: cache.header.corpus_sha256.clone(),
        cache_note,
    })
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

/// Loads a checkpoint (a checkpoint directory or a run directory) for inference, refusing one
/// trained with another tokenizer than `config`'s.
pub fn load_for_inference(
    config: &ExperimentConfig,
    checkpoint_path: &std::path::Path,
    tokenizer: &TextTokenizer,
) -> Result<(PathBuf, usize, distillery_model::Llama), TrainError> {
    let directory = checkpoint::resolve_checkpoint(checkpoint_path)?;
    let progress = checkpoint::read_progress(&directory)?;
    if progress.tokenizer_sha256 != tokenizer.sha256() {
        return Err(TrainError::Run {
            path: directory,
            message: format!(
                "was trained with another tokenizer than {}",
                config.data.tokenizer.display()
            ),
        });
    }
    let device = device_for(&config.run)?;
    let model = checkpoint::load_model(&directory, None, 0.0, &device)?;
    Ok((directory, progress.step, model))
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
