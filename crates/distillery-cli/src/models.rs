//! Models as commands present them: the draft and activation flags, and the evaluation table
//! of models any kind of file holds (`distillery_formats::load`).

use std::path::PathBuf;
use std::time::Instant;

use distillery_config::ExperimentConfig;
use distillery_formats::load::LoadedModel;
use distillery_quant::ActivationRounding;
use distillery_train::EvalMetrics;

/// A draft model for speculative decoding, as `generate` and `bench generate` take it: each
/// flag may instead be the config's `[generate]` key of the same name.
#[derive(clap::Args)]
pub struct DraftArgs {
    /// A smaller model with the same tokenizer (a checkpoint, run directory, quantized folder
    /// or GGUF file) that drafts tokens for the model to check (speculative decoding): the
    /// output follows the model's own distribution, and greedy output is the model's own.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per pass of the model (1 to 7, default 4; with
    /// --adaptive-draft, the most).
    #[arg(long)]
    pub draft_tokens: Option<usize>,
    /// Draft two more tokens after a pass that keeps them all, one fewer after a rejection.
    #[arg(long)]
    pub adaptive_draft: bool,
    /// Stop drafting before a position where the draft's most likely token has less than this
    /// probability (llama.cpp's --draft-p-min): the model checks fewer positions, or takes a
    /// plain step, where the draft is unsure.
    #[arg(long)]
    pub draft_p_min: Option<f32>,
    /// The draft's head scores only this many tokens: the most frequent in the config's
    /// training split (pass the draft's own config), and the stop tokens. A small draft spends
    /// most of a token in a large vocabulary's head; the model still checks every token.
    #[arg(long)]
    pub draft_vocabulary: Option<std::num::NonZeroUsize>,
}

/// The draft's settings once the command line and the config agree.
pub struct DraftSettings {
    pub path: PathBuf,
    pub length: distillery_model::DraftLength,
    pub vocabulary: Option<usize>,
}

impl DraftArgs {
    /// The draft the command line or the config's `[generate]` section names, with its
    /// settings: a setting both give must be the same in both, and the others need a draft.
    pub fn resolve(&self, config: &ExperimentConfig) -> anyhow::Result<Option<DraftSettings>> {
        let section = config.generate.clone().unwrap_or_default();
        fn agree<T: PartialEq + std::fmt::Debug>(
            flag: Option<T>,
            key: Option<T>,
            name: &str,
        ) -> anyhow::Result<Option<T>> {
            match (flag, key) {
                (Some(flag), Some(key)) if flag != key => anyhow::bail!(
                    "--{name} {flag:?} and the config's generate.{} = {key:?} disagree: give one",
                    name.replace('-', "_")
                ),
                (flag, key) => Ok(flag.or(key)),
            }
        }
        let path = agree(self.draft.clone(), section.draft, "draft")?;
        let tokens = agree(self.draft_tokens, section.draft_tokens, "draft-tokens")?;
        let adaptive = agree(
            self.adaptive_draft.then_some(true),
            section.adaptive_draft,
            "adaptive-draft",
        )?;
        let vocabulary = agree(
            self.draft_vocabulary.map(std::num::NonZeroUsize::get),
            section.draft_vocabulary,
            "draft-vocabulary",
        )?;
        let min_probability = agree(self.draft_p_min, section.draft_p_min, "draft-p-min")?;
        let Some(path) = path else {
            anyhow::ensure!(
                tokens.is_none()
                    && adaptive.is_none()
                    && vocabulary.is_none()
                    && min_probability.is_none(),
                "draft settings without a draft: give --draft or the config's generate.draft"
            );
            return Ok(None);
        };
        let most = tokens.unwrap_or(DEFAULT_DRAFT_TOKENS);
        let length = match (adaptive == Some(true), min_probability) {
            (true, Some(_)) => anyhow::bail!(
                "--adaptive-draft (generate.adaptive_draft) and --draft-p-min \
                 (generate.draft_p_min) are two rules for one draft length: give one"
            ),
            (true, None) => distillery_model::DraftLength::Adaptive(most),
            (false, Some(min_probability)) => distillery_model::DraftLength::Confident {
                most,
                min_probability,
            },
            (false, None) => distillery_model::DraftLength::Fixed(most),
        };
        Ok(Some(DraftSettings {
            path,
            length,
            vocabulary,
        }))
    }

    /// [`Self::resolve`] for a command that may instead decode a batch (`--batch`), which
    /// takes no draft.
    pub fn resolve_beside_batch(
        &self,
        config: &ExperimentConfig,
        batch: Option<usize>,
    ) -> anyhow::Result<Option<DraftSettings>> {
        let draft = self.resolve(config)?;
        anyhow::ensure!(
            batch.is_none() || draft.is_none(),
            "--batch measures batched decoding, without a draft: drop --draft or the config's \
             generate.draft"
        );
        Ok(draft)
    }
}

const DEFAULT_DRAFT_TOKENS: usize = 4;

/// A draft ready to decode with, and how commands name it.
pub struct LoadedDraft {
    pub draft: distillery_model::Draft,
    pub description: String,
}

/// `loaded` as a draft (its activations already set): with a vocabulary, its head scores the
/// most frequent tokens of `training_tokens` (read only then) and `stop_tokens`.
pub fn into_draft(
    loaded: LoadedModel,
    vocabulary: Option<usize>,
    tokenizer: &distillery_data::TextTokenizer,
    training_tokens: impl FnOnce() -> anyhow::Result<std::sync::Arc<[u32]>>,
    stop_tokens: &[u32],
) -> anyhow::Result<LoadedDraft> {
    let description = loaded.describe();
    let Some(size) = vocabulary else {
        return Ok(LoadedDraft {
            draft: distillery_model::Draft::new(loaded.model),
            description,
        });
    };
    let vocab = tokenizer.vocab_size();
    let training_tokens = training_tokens()?;
    let mut shortlist =
        distillery_model::most_frequent_tokens(&training_tokens, vocab, size.min(vocab));
    for &token in stop_tokens {
        if !shortlist.contains(&token) {
            shortlist.push(token);
        }
    }
    let mut listed = vec![false; vocab];
    for &token in &shortlist {
        listed[token as usize] = true;
    }
    let covered = training_tokens
        .iter()
        .filter(|&&token| listed.get(token as usize) == Some(&true))
        .count();
    let share = 100.0 * covered as f64 / training_tokens.len().max(1) as f64;
    let heads = shortlist.len();
    Ok(LoadedDraft {
        draft: distillery_model::Draft::with_shortlist(loaded.model, shortlist)?,
        description: format!(
            "{description}, head over {heads} of {vocab} tokens ({share:.1}% of the training \
             split's)"
        ),
    })
}

/// How `generate` and `continuations` pick each token.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    pub fn config(&self) -> distillery_model::SamplingConfig {
        distillery_model::SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// How quantized matrices treat their activations, as a command-line flag names it.
#[derive(Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Activations {
    /// int8-rounded activations (llama.cpp's arithmetic) on single-token decoding steps and the
    /// head's product for a prompt's last position, exact f32 activations on prompts and
    /// evaluation batches.
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
/// The lines of a file of `what` (prompts, chat messages), one a line, as written, blank ones
/// skipped; a file without any is an error naming it.
pub fn non_blank_lines(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what}s in {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!lines.is_empty(), "{} holds no {what}", path.display());
    Ok(lines)
}

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
    /// Wall seconds spent scoring the windows, the model already loaded: the forward pass's
    /// speed without the file's loading.
    pub scoring_seconds: f64,
    pub tokens_per_sec: f64,
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
    let metrics: Vec<(EvalMetrics, f64)> = models
        .iter()
        .map(|loaded| {
            let model = &loaded.model;
            let windows = distillery_train::validation_windows(config, &data, model);
            let batch = config.eval_batch_size();
            let started = Instant::now();
            let metrics = match predictions.as_deref_mut() {
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
            };
            (metrics, started.elapsed().as_secs_f64())
        })
        .collect();
    let reference = models
        .iter()
        .position(LoadedModel::is_float)
        .map(|index| (models[index].file_bytes, metrics[index].0.perplexity));
    Ok(models
        .iter()
        .zip(metrics)
        .map(|(loaded, (metrics, scoring_seconds))| EvalRow {
            model: loaded.describe(),
            parameters: loaded.model.config().num_parameters(),
            bits_per_weight: loaded.bits_per_weight,
            quantized_bits_per_weight: loaded.quantized_bits_per_weight,
            file_bytes: loaded.file_bytes,
            size_vs_float: reference.map(|(bytes, _)| loaded.file_bytes as f64 / bytes as f64),
            delta_perplexity_percent: reference
                .map(|(_, perplexity)| 100.0 * (metrics.perplexity / perplexity - 1.0)),
            scoring_seconds,
            tokens_per_sec: metrics.tokens as f64 / scoring_seconds,
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
