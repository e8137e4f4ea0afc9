//! Every kind of model distillery reads, behind one loader: training checkpoints (and run
//! directories), quantized model folders and GGUF files, each checked against the run's
//! tokenizer. `eval`, `generate`, `bench` and `export` take any of them.

use std::path::{Path, PathBuf};

use distillery_config::ExperimentConfig;
use distillery_data::TextTokenizer;
use distillery_model::Llama;
use distillery_run::checkpoint::MODEL_FILE;
use distillery_run::{RunError, device_for, load_for_inference};

use crate::hf::HfError;
use crate::quantized;
use crate::source::{self, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Folder(#[from] HfError),
    #[error("{}: was quantized from a model trained with another tokenizer than {}", path.display(), tokenizer.display())]
    Tokenizer { path: PathBuf, tokenizer: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub enum ModelKind {
    Checkpoint {
        step: usize,
    },
    Quantized {
        label: String,
        config: quantized::GptqConfig,
        record: serde_json::Value,
    },
    Gguf,
}

pub struct LoadedModel {
    /// The file or directory the model came from (a run directory resolved to its checkpoint).
    pub path: PathBuf,
    pub kind: ModelKind,
    pub model: Llama,
    /// Bytes of the weights file.
    pub file_bytes: u64,
    /// Stored bits per parameter, counted over the weight tensors.
    pub bits_per_weight: f64,
    /// Stored bits per weight of the quantized matrices (scales, zeros, group indices included).
    pub quantized_bits_per_weight: Option<f64>,
}

impl LoadedModel {
    pub fn is_float(&self) -> bool {
        matches!(self.kind, ModelKind::Checkpoint { .. })
    }

    pub fn describe(&self) -> String {
        match &self.kind {
            ModelKind::Checkpoint { step } => format!("{} (step {step})", self.path.display()),
            ModelKind::Quantized { label, .. } => format!("{} ({label})", self.path.display()),
            ModelKind::Gguf => self.path.display().to_string(),
        }
    }
}

/// [`load_model`] and the seconds it took, from opening the file to a model ready to compute.
pub fn load_model_timed(
    config: &ExperimentConfig,
    path: &Path,
    tokenizer: &TextTokenizer,
) -> Result<(LoadedModel, f64), LoadError> {
    let started = std::time::Instant::now();
    let loaded = load_model(config, path, tokenizer)?;
    Ok((loaded, started.elapsed().as_secs_f64()))
}

/// The model at `path` (a GGUF file, a quantized folder or a checkpoint), with the memory its
/// loading freed handed back and its weights moved into 2 MiB pages where the kernel allows
/// ([`crate::huge_pages::settle_heap_after_loading`]).
pub fn load_model(
    config: &ExperimentConfig,
    path: &Path,
    tokenizer: &TextTokenizer,
) -> Result<LoadedModel, LoadError> {
    let loaded = read_model(config, path, tokenizer)?;
    crate::huge_pages::settle_heap_after_loading();
    Ok(loaded)
}

fn read_model(
    config: &ExperimentConfig,
    path: &Path,
    tokenizer: &TextTokenizer,
) -> Result<LoadedModel, LoadError> {
    let device = device_for(&config.run).map_err(RunError::from)?;
    if source::is_gguf(path) {
        let vocabulary =
            source::tokenizer_vocabulary(&config.data.tokenizer, tokenizer.eos_token_id())?;
        let (file, model) = source::load_gguf_for(path, &vocabulary, &device)?;
        let tensor_bytes: u64 = file
            .tensors()
            .iter()
            .filter_map(|tensor| tensor.bytes())
            .sum();
        let parameters = model.config().num_parameters() as f64;
        return Ok(LoadedModel {
            path: path.to_path_buf(),
            kind: ModelKind::Gguf,
            model,
            file_bytes: file.len(),
            bits_per_weight: tensor_bytes as f64 * 8.0 / parameters,
            quantized_bits_per_weight: None,
        });
    }
    if quantized::is_quantized_dir(path) {
        let loaded = quantized::load(path, &device)?;
        if let Some(sha) = loaded.record["tokenizer_sha256"].as_str()
            && sha != tokenizer.sha256()
        {
            return Err(LoadError::Tokenizer {
                path: path.to_path_buf(),
                tokenizer: config.data.tokenizer.clone(),
            });
        }
        let label = loaded.record["label"].as_str().map_or_else(
            || format!("{}-bit GPTQ", loaded.config.bits),
            str::to_string,
        );
        return Ok(LoadedModel {
            path: path.to_path_buf(),
            kind: ModelKind::Quantized {
                label,
                config: loaded.config,
                record: loaded.record,
            },
            model: loaded.model,
            file_bytes: loaded.file_bytes,
            bits_per_weight: loaded.storage.bits_per_weight(),
            quantized_bits_per_weight: loaded.storage.quantized_bits_per_weight(),
        });
    }
    let (directory, step, model) = load_for_inference(config, path, tokenizer)?;
    let weights = directory.join(MODEL_FILE);
    let file_bytes = std::fs::metadata(&weights)
        .map_err(|source| LoadError::Io {
            path: weights.clone(),
            source,
        })?
        .len();
    Ok(LoadedModel {
        path: directory,
        kind: ModelKind::Checkpoint { step },
        model,
        file_bytes,
        // Checkpoints hold every parameter as f32.
        bits_per_weight: 32.0,
        quantized_bits_per_weight: None,
    })
}
