//! `distillery quantize`: the run's model quantized as the config's `[quantize]` section says,
//! saved, and compared with the float model.

use std::process::ExitCode;

use distillery_config::ExperimentConfig;
use distillery_data::TextTokenizer;
use distillery_formats::load;

use crate::{ConfigArgs, models};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config.load()?;
    let outcome = quantize_with_progress(&config)?;
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    let models = [
        load::load_model(&config, &outcome.source, &tokenizer)?,
        load::load_model(&config, &outcome.output, &tokenizer)?,
    ];
    let rows = models::evaluation_rows(&config, &models, None)?;
    if args.json {
        let report = serde_json::json!({
            "output": outcome.output,
            "label": outcome.label,
            "seconds": outcome.seconds,
            "matrices": outcome.matrices,
            "models": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for matrix in &outcome.matrices {
            if let Some(damp) = matrix.damp_percent_used {
                println!(
                    "{}: the Hessian needed damp_percent = {damp} to be positive definite",
                    matrix.name
                );
            }
        }
        println!(
            "quantized {} (step {}) with {} in {:.2} s -> {}",
            outcome.source.display(),
            outcome.step,
            outcome.label,
            outcome.seconds,
            outcome.output.display()
        );
        print!("{}", models::markdown_table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `distillery quantize` with a bar on a terminal, or a line per decoder layer otherwise.
fn quantize_with_progress(
    config: &ExperimentConfig,
) -> anyhow::Result<distillery_quantize::QuantizeOutcome> {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} ({elapsed}, about {eta} left)",
            )
            .expect("the template is valid"),
        );
        bar
    });
    let mut last_block = None;
    // Loading and data preparation are over when the first matrix is announced.
    let mut started = None;
    let outcome = distillery_quantize::quantize_run(config, &mut |progress| {
        let started = *started.get_or_insert_with(std::time::Instant::now);
        let block = progress
            .name
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".");
        match &bar {
            Some(bar) => {
                bar.set_length(progress.total as u64);
                bar.set_position(progress.done as u64);
                bar.set_message(progress.name.to_string());
            }
            None if last_block.as_ref() != Some(&block) => {
                let elapsed = started.elapsed().as_secs_f64();
                let left = match progress.done {
                    0 => String::new(),
                    done => format!(
                        ", about {:.0} s left",
                        elapsed / done as f64 * (progress.total - done) as f64
                    ),
                };
                eprintln!(
                    "quantizing {block} ({}/{} matrices done, {elapsed:.0} s{left})",
                    progress.done, progress.total
                );
                last_block = Some(block);
            }
            None => {}
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(outcome?)
}
