//! `distillery eval`: validation loss, perplexity and accuracy of one training checkpoint (with
//! its agreement with the config's teacher), or a table comparing models of any kind.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use distillery_config::ExperimentConfig;
use distillery_data::TextTokenizer;
use distillery_formats::load;
use distillery_train::evaluate_checkpoint;

use crate::models::{self, Activations};
use crate::{ConfigArgs, print_report};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Checkpoint directories, run directories (their best checkpoint), quantized model
    /// folders or GGUF files; with several, one table compares them against the first
    /// float checkpoint.
    #[arg(long, num_args = 1.., required = true)]
    checkpoint: Vec<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// How quantized matrices treat their activations.
    #[arg(long, value_enum, default_value_t)]
    activations: Activations,
    /// Also write each model's most likely next token at every evaluated position, as a
    /// JSON list of lists (one per model).
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let origin = args.config.origin();
    let config = args.config.load()?;
    if let [single] = args.checkpoint.as_slice()
        && !is_other_format(single)
        && args.predictions.is_none()
    {
        return evaluate_training_checkpoint(&config, &origin, single, args.json);
    }
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    let mut models = args
        .checkpoint
        .iter()
        .map(|path| load::load_model(&config, path, &tokenizer))
        .collect::<Result<Vec<_>, _>>()?;
    models::apply_activations(&mut models, args.activations);
    let mut predicted = Vec::new();
    let rows = models::evaluation_rows(
        &config,
        &models,
        args.predictions.is_some().then_some(&mut predicted),
    )?;
    if let Some(path) = &args.predictions {
        distillery_data::write_atomically(path, serde_json::to_string(&predicted)?.as_bytes())?;
    }
    print_report(args.json, &rows, |rows| models::markdown_table(rows))?;
    Ok(ExitCode::SUCCESS)
}

/// Quantized model folders and GGUF files, which only the table form of `eval` reads.
fn is_other_format(path: &Path) -> bool {
    distillery_formats::source::is_gguf(path)
        || distillery_formats::quantized::is_quantized_dir(path)
}

/// One training checkpoint's validation metrics, and its agreement with the config's teacher
/// when there is one.
fn evaluate_training_checkpoint(
    config: &ExperimentConfig,
    origin: &str,
    checkpoint: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let result = evaluate_checkpoint(config, checkpoint)?;
    let comparison = match config.teacher {
        Some(_) => Some(distillery_distill::compare_with_teacher(
            config, origin, checkpoint,
        )?),
        None => None,
    };
    if json {
        let mut report = serde_json::to_value(&result)?;
        if let Some(comparison) = &comparison {
            report["kd"] = comparison.kd.into();
            report["teacher_agreement"] = comparison.teacher_agreement.into();
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} (step {}): validation loss {:.4}, perplexity {:.2}, accuracy {:.4} over {} tokens",
            result.checkpoint.display(),
            result.step,
            result.metrics.loss,
            result.metrics.perplexity,
            result.metrics.accuracy,
            result.metrics.tokens
        );
        if let Some(comparison) = comparison {
            println!(
                "against the teacher: top-1 agreement {:.4}, divergence {:.4}",
                comparison.teacher_agreement, comparison.kd
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
