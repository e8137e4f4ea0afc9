//! `distillery`: train, distill, quantize and export Llama-architecture language models.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distillery_config::{ConfigError, ExperimentConfig};
use distillery_data::TextTokenizer;
use distillery_model::{GenerationConfig, SamplingConfig};
use distillery_train::{
    NextTokenObjective, Resume, TrainError, TrainOptions, TrainOutcome, bench_train,
    evaluate_checkpoint, load_for_inference, train,
};

/// Exit status for configuration errors (a wrong key, type or value), as for usage errors.
const EXIT_CONFIG: u8 = 2;
/// Exit status after Ctrl-C, as a shell reports a process killed by SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "distillery",
    version,
    about = "Train, distill, quantize and export Llama-architecture language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML experiment config.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Continue the run from its newest checkpoint, or from the checkpoint at PATH.
        #[arg(long, value_name = "PATH")]
        resume: Option<Option<PathBuf>>,
    },
    /// Validation loss, perplexity and accuracy of a checkpoint.
    Eval {
        #[command(flatten)]
        config: ConfigArgs,
        /// A checkpoint directory, or a run directory (its best checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with a checkpoint.
    Generate {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 100)]
        max_new_tokens: usize,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Measurements.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        what: TokenizerCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput (tokens/s) and peak memory of the config's model.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on a text file.
    Train {
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ConfigArgs {
    /// The experiment config (TOML).
    config: PathBuf,
    /// Override a config key, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    /// The config with its overrides applied, its input files checked.
    fn load(&self) -> Result<ExperimentConfig, ConfigError> {
        let config = distillery_config::load(&self.config, &self.overrides)?;
        config.check_inputs(&self.config.display().to_string())?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if is_config_error(&error) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A training step frees and reallocates the same large tensors every step. By default glibc
/// hands blocks over a few MiB back to the kernel and faults them in again, zeroed, on the next
/// step (15% of a step's time at batch 16); keeping them in the heap avoids that.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn is_config_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<ConfigError>() || matches!(cause.downcast_ref(), Some(TrainError::Config { .. }))
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train { config, resume } => {
            let config = config.load()?;
            let resume = match resume {
                None => Resume::Fresh,
                Some(None) => Resume::Latest,
                Some(Some(path)) => Resume::From(path),
            };
            let options = TrainOptions {
                resume,
                interrupt: interrupt_flag()?,
            };
            match train(&config, &options, &mut NextTokenObjective)? {
                TrainOutcome::Completed(summary) => {
                    let validation = summary.final_validation;
                    println!(
                        "trained {} steps: validation loss {:.4}, perplexity {:.2}, accuracy {:.4}",
                        summary.steps, validation.loss, validation.perplexity, validation.accuracy
                    );
                    if let Some(best) = summary.best {
                        println!(
                            "best validation loss {:.4} at step {} -> {}",
                            best.loss,
                            best.step,
                            summary.checkpoint_dir.join("best").display()
                        );
                    }
                    if summary.tokens_per_sec > 0.0 {
                        println!("throughput {:.0} tokens/s", summary.tokens_per_sec);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                TrainOutcome::Interrupted { step, checkpoint } => {
                    eprintln!(
                        "interrupted: saved step {step} to {}; continue with --resume",
                        checkpoint.display()
                    );
                    Ok(ExitCode::from(EXIT_INTERRUPTED))
                }
            }
        }
        Command::Eval {
            config,
            checkpoint,
            json,
        } => {
            let config = config.load()?;
            let result = evaluate_checkpoint(&config, &checkpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
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
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            config,
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            let config = config.load()?;
            let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
            let (_, _, model) = load_for_inference(&config, &checkpoint, &tokenizer)?;
            let prompt_ids = tokenizer.encode(&prompt)?;
            let generation = distillery_model::generate(
                &model,
                &prompt_ids,
                &GenerationConfig {
                    max_new_tokens,
                    sampling: SamplingConfig {
                        temperature,
                        top_k,
                        top_p,
                        seed,
                    },
                    eos_token_id: tokenizer.eos_token_id(),
                },
            )?;
            println!("{prompt}{}", tokenizer.decode(&generation.tokens)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    config,
                    warmup,
                    steps,
                    json,
                },
        } => {
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            let config = config.load()?;
            let report = bench_train(&config, warmup, steps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{}: {} parameters, {} tokens/step, {} threads: {:.0} tokens/s ({:.1} ± {:.1} ms/step over {} steps after {} warm-up), peak RSS {}",
                    report.backend,
                    report.parameters,
                    report.tokens_per_step,
                    report.threads,
                    report.tokens_per_sec,
                    report.step_ms_mean,
                    report.step_ms_std,
                    report.timed_steps,
                    report.warmup_steps,
                    report
                        .peak_rss_mib
                        .map_or_else(|| "unknown".into(), |mib| format!("{mib:.0} MiB"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokenizer {
            what:
                TokenizerCommand::Train {
                    corpus,
                    vocab_size,
                    out,
                },
        } => {
            let tokenizer = TextTokenizer::train_bpe(&corpus, vocab_size)?;
            tokenizer
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} tokens, sha256 {})",
                out.display(),
                tokenizer.vocab_size(),
                tokenizer.sha256()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The first Ctrl-C asks the loop to save a checkpoint and stop; a second one exits at once.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_INTERRUPTED.into());
        }
        eprintln!("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}
