//! Every kind of model distillery reads, behind one loader: training checkpoints (and run
//! directories), quantized model folders and GGUF files. `eval`, `generate` and `export` take
//! any of them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use distillery_config::ExperimentConfig;
use distillery_data::TextTokenizer;
use distillery_formats::{quantized, source};
use distillery_model::Llama;
use distillery_quant::ActivationRounding;
use distillery_run::checkpoint::MODEL_FILE;
use distillery_run::load_for_inference;
use distillery_train::EvalMetrics;

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
) -> anyhow::Result<(LoadedModel, f64)> {
    let started = std::time::Instant::now();
    let loaded = load_model(config, path, tokenizer)?;
    Ok((loaded, started.elapsed().as_secs_f64()))
}

pub fn load_model(
    config: &ExperimentConfig,
    path: &Path,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<LoadedModel> {
    let device = distillery_run::device_for(&config.run)?;
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
            anyhow::bail!(
                "{}: was quantized from a model trained with another tokenizer than {}",
                path.display(),
                config.data.tokenizer.display()
            );
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
        .with_context(|| format!("reading {}", weights.display()))?
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

/// A draft model for speculative decoding, as `generate` and `bench generate` take it.
#[derive(clap::Args)]
pub struct DraftArgs {
    /// A smaller model with the same tokenizer (a checkpoint, run directory, quantized folder
    /// or GGUF file) that drafts tokens for the model to check (speculative decoding): the
    /// output follows the model's own distribution, and greedy output is the model's own.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per pass of the model (1 to 7; with --adaptive-draft, the
    /// most).
    #[arg(long, default_value_t = 4, requires = "draft")]
    pub draft_tokens: usize,
    /// Draft two more tokens after a pass that keeps them all, one fewer after a rejection.
    #[arg(long, requires = "draft")]
    pub adaptive_draft: bool,
}

impl DraftArgs {
    pub fn length(&self) -> distillery_model::DraftLength {
        if self.adaptive_draft {
            distillery_model::DraftLength::Adaptive(self.draft_tokens)
        } else {
            distillery_model::DraftLength::Fixed(self.draft_tokens)
        }
    }
}

/// How quantized matrices treat their activations, as a command-line flag names it.
#[derive(Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Activations {
    /// int8-rounded activations (llama.cpp's arithmetic) on single-token decoding steps, exact
    /// f32 activations on prompts and evaluation batches.
    #[default]
    Auto,
    /// Exact f32 activations everywhere: the stored weights' own arithmetic.
    F32,
    /// Activations rounded to int8 per 32 columns everywhere, as llama.cpp computes.
    Int8,
}

impl Activations {
    pub fn rounding(self) -> ActivationRounding {
        match self {
            Self::Auto => ActivationRounding::DecodeSteps,
            Self::F32 => ActivationRounding::Never,
            Self::Int8 => ActivationRounding::Always,
        }
    }
}

/// Sets `activations` on every model and, when one is quantized, says which arithmetic runs.
pub fn apply_activations(models: &mut [LoadedModel], activations: Activations) {
    let rounding = activations.rounding();
    for loaded in models.iter_mut() {
        loaded.model.set_activation_rounding(rounding);
    }
    if models.iter().any(|loaded| loaded.model.is_quantized()) {
        eprintln!(
            "arithmetic: {} (--activations {})",
            rounding.describe(),
            clap::ValueEnum::to_possible_value(&activations)
                .map(|value| value.get_name().to_string())
                .unwrap_or_default()
        );
    }
}

/// One row of `distillery eval`'s table.
#[derive(serde::Serialize)]
pub struct EvalRow {
    pub model: String,
    pub parameters: usize,
    pub bits_per_weight: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantized_bits_per_weight: Option<f64>,
    pub file_bytes: u64,
    /// File size over the reference float model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_vs_float: Option<f64>,
    #[serde(flatten)]
    pub metrics: EvalMetrics,
    /// Perplexity change against the reference float model, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_perplexity_percent: Option<f64>,
}

/// Rows for `models` evaluated on the validation split; the first float checkpoint among them
/// is the reference of the relative columns.
/// With `predictions`, each model's most likely next token at every evaluated position is
/// pushed there too.
pub fn evaluation_rows(
    config: &ExperimentConfig,
    models: &[LoadedModel],
    mut predictions: Option<&mut Vec<Vec<u32>>>,
) -> anyhow::Result<Vec<EvalRow>> {
    let data = distillery_run::prepare_data(config)?;
    let metrics: Vec<EvalMetrics> = models
        .iter()
        .map(|loaded| {
            let model = &loaded.model;
            let windows = distillery_train::validation_windows(config, &data, model);
            let batch = config.eval_batch_size();
            match predictions.as_deref_mut() {
                Some(predictions) => {
                    let (metrics, predicted) = distillery_train::evaluate_with_predictions(
                        model,
                        &windows,
                        batch,
                        &model.device(),
                    );
                    predictions.push(predicted);
                    metrics
                }
                None => distillery_train::evaluate(model, &windows, batch, &model.device()),
            }
        })
        .collect();
    let reference = models
        .iter()
        .position(LoadedModel::is_float)
        .map(|index| (models[index].file_bytes, metrics[index].perplexity));
    Ok(models
        .iter()
        .zip(metrics)
        .map(|(loaded, metrics)| EvalRow {
            model: loaded.describe(),
            parameters: loaded.model.config().num_parameters(),
            bits_per_weight: loaded.bits_per_weight,
            quantized_bits_per_weight: loaded.quantized_bits_per_weight,
            file_bytes: loaded.file_bytes,
            size_vs_float: reference.map(|(bytes, _)| loaded.file_bytes as f64 / bytes as f64),
            delta_perplexity_percent: reference
                .map(|(_, perplexity)| 100.0 * (metrics.perplexity / perplexity - 1.0)),
            metrics,
        })
        .collect())
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[EvalRow]) -> String {
    let mut table = String::from(
        "| model | bits/weight | bits/weight (quantized matrices) | file bytes | size vs float | \
         perplexity | Δ perplexity | top-1 accuracy |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let optional = |value: Option<f64>, format: &dyn Fn(f64) -> String| {
        value.map_or_else(|| "–".to_string(), format)
    };
    for row in rows {
        table.push_str(&format!(
            "| {} | {:.2} | {} | {} | {} | {:.3} | {} | {:.4} |\n",
            row.model,
            row.bits_per_weight,
            optional(row.quantized_bits_per_weight, &|bits| format!("{bits:.2}")),
            row.file_bytes,
            optional(row.size_vs_float, &|share| format!("{:.1}%", 100.0 * share)),
            row.metrics.perplexity,
            optional(row.delta_perplexity_percent, &|delta| format!(
                "{delta:+.2}%"
            )),
            row.metrics.accuracy,
        ));
    }
    table
}
