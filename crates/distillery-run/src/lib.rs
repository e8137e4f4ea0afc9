//! What every stage of a run shares beneath training, distillation and quantization: the
//! device the config asks for, the run's data as token splits, checkpoints (written, verified,
//! read for inference) and the seeds every random draw derives from.

pub mod backend;
pub mod checkpoint;
pub mod proc_report;
pub mod seeds;

use std::path::PathBuf;

use distillery_config::ExperimentConfig;
use distillery_data::{
    CacheStatus, DataError, TextTokenizer, TokenSpan, TokenSplits, WindowSampler,
};
use distillery_model::LlamaConfig;

pub use backend::{BackendDevices, BackendError, backend_description, device_for, list_devices};
pub use checkpoint::CheckpointError;

use crate::seeds::{Stream, derive_seed};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A config value that only turns out wrong once the data is known.
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A checkpoint trained with another tokenizer than the config's.
    #[error("{}: was trained with another tokenizer than {}", path.display(), tokenizer.display())]
    Tokenizer { path: PathBuf, tokenizer: PathBuf },
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

/// The run's tokenizer, its corpus as token splits (from the token cache, built when missing
/// or stale) and the model architecture the config resolves to with that tokenizer.
pub fn prepare_data(config: &ExperimentConfig) -> Result<RunData, RunError> {
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
        .map_err(|error| RunError::Config {
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

/// Loads a checkpoint (a checkpoint directory or a run directory) for inference, refusing one
/// trained with another tokenizer than `config`'s.
pub fn load_for_inference(
    config: &ExperimentConfig,
    checkpoint_path: &std::path::Path,
    tokenizer: &TextTokenizer,
) -> Result<(PathBuf, usize, distillery_model::Llama), RunError> {
    let directory = checkpoint::resolve_checkpoint(checkpoint_path)?;
    let progress = checkpoint::read_progress(&directory)?;
    check_trained_tokenizer(config, &directory, &progress, tokenizer)?;
    let device = device_for(&config.run)?;
    let model = checkpoint::load_model(&directory, None, 0.0, &device)?;
    Ok((directory, progress.step, model))
}

/// Refuses the checkpoint at `directory` (with its `progress`) when it was trained with
/// another tokenizer than `config`'s, loaded as `tokenizer`: a model read against other token
/// ids would be silently wrong.
pub fn check_trained_tokenizer(
    config: &ExperimentConfig,
    directory: &std::path::Path,
    progress: &checkpoint::Progress,
    tokenizer: &TextTokenizer,
) -> Result<(), RunError> {
    if progress.tokenizer_sha256 == tokenizer.sha256() {
        return Ok(());
    }
    Err(RunError::Tokenizer {
        path: directory.to_path_buf(),
        tokenizer: config.data.tokenizer.clone(),
    })
}

/// `count` windows of `seq_len` tokens at offsets drawn from the run's calibration stream: the
/// text post-training quantization calibrates on, and the text that ranks a teacher's units
/// for a narrower student.
pub fn calibration_windows(tokens: &[u32], count: usize, seq_len: usize, seed: u64) -> Vec<u32> {
    let mut sampler = WindowSampler::new(derive_seed(seed, Stream::Calibration, 0), seq_len);
    sampler.next_batch(&TokenSpan::new(tokens), count).inputs
}
