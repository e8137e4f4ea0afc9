//! `distillery`: train, distill, quantize and export Llama-architecture language models.

mod backends;
mod bench;
mod continuations;
mod cost;
mod decode_bench;
mod eval;
mod export;
mod generate;
mod import;
mod inspect;
mod models;
mod pipeline;
mod quantize;
mod report;
mod tokenizer;
mod training;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distillery_config::{ConfigError, ExperimentConfig};
use distillery_distill::DistillError;
use distillery_quantize::QuantizeError;
use distillery_run::RunError;
use distillery_train::TrainError;

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
    /// Run a pipeline config's stages in order (train, distill, quantize, export, eval),
    /// skipping the complete ones and resuming an interrupted one.
    Pipeline(pipeline::PipelineArgs),
    /// Write a pipeline's report (plots, report.md, report.ipynb) to notebooks-export/<name>/.
    Report(report::ReportArgs),
    /// Train a model from a TOML experiment config.
    Train(training::RunArgs),
    /// Train a student against a frozen teacher (the config's [teacher] and [distill]).
    Distill(training::RunArgs),
    /// Run the config's teacher once over every training window of the run and store its
    /// top-k logits, for `[distill] teacher = "cached"`.
    TeacherCache(ConfigArgs),
    /// Quantize the run's model as the config's [quantize] section says (int8, round-to-nearest
    /// or GPTQ), save it under the checkpoint directory and compare it with the float model.
    Quantize(quantize::QuantizeArgs),
    /// Write a model in another tool's format, or every export the config's [export] section
    /// lists.
    Export(export::ExportArgs),
    /// Read a pretrained model (a Hugging Face Llama folder or a GGUF file) into a distillery
    /// checkpoint (step 0 of the config's run), for eval, generate, export, a [teacher] or
    /// further training with --resume.
    Import(import::ImportArgs),
    /// List the backends this build has and the devices each finds on this machine.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Print a GGUF file's metadata and tensors.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
    },
    /// Validation loss, perplexity and accuracy of one model, or a table of several.
    Eval(eval::EvalArgs),
    /// Continue a prompt with a model (any that `eval` takes), or answer a chat message
    /// through its chat template.
    Generate(generate::GenerateArgs),
    /// Continue prompts from the config's training split with a model and write prompt and
    /// continuation as JSON Lines (`[data] format = "jsonl"`): data to distill a speculative
    /// draft on what its model writes.
    Continuations(continuations::ContinuationsArgs),
    /// Cost per million tokens self-hosted against an API, the break-even volume and a
    /// recommendation, from a throughput measured here (--measure) or given.
    Cost(cost::CostArgs),
    /// Measurements.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        what: tokenizer::TokenizerCommand,
    },
}

#[derive(Args)]
pub struct ConfigArgs {
    /// The experiment config (TOML).
    config: PathBuf,
    /// Override a config key, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    pub fn new(config: PathBuf, overrides: Vec<String>) -> Self {
        Self { config, overrides }
    }

    /// The config file's name, as errors about it begin.
    pub fn origin(&self) -> String {
        self.config.display().to_string()
    }

    /// The config with its overrides applied, `model.from` read, its input files checked.
    pub fn load(&self) -> Result<ExperimentConfig, ConfigError> {
        let config = distillery_config::load_reading(
            &self.config,
            &self.overrides,
            Some(&read_model_source),
        )?;
        config.check_inputs(&self.origin())?;
        Ok(config)
    }
}

/// What `model.from` names: a GGUF file (its tokenizer written beside it) or a Hugging Face
/// folder.
pub fn read_model_source(
    path: &Path,
) -> Result<distillery_config::ModelSource, distillery_config::ModelSourceError> {
    let source = distillery_formats::source::read_source(path)?;
    Ok(distillery_config::ModelSource {
        architecture: source.architecture,
        tokenizer: source.tokenizer,
    })
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
/// step (15% of a step's time at batch 16); keeping them in the heap avoids that. Blocks over
/// glibc's highest mmap threshold (32 MiB), such as a 49k-vocabulary model's `[tokens, vocab]`
/// logits and their gradient (200 MiB each at 4 x 256 tokens), would still be mapped anew every
/// step (8% of a SmolLM2 student's step): no block is mapped on its own at all.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn is_config_error(error: &anyhow::Error) -> bool {
    let late = |error: &RunError| matches!(error, RunError::Config { .. });
    error.chain().any(|cause| {
        cause.is::<ConfigError>()
            || matches!(cause.downcast_ref(), Some(TrainError::Run(error)) if late(error))
            || matches!(cause.downcast_ref(), Some(QuantizeError::Run(error)) if late(error))
            || matches!(cause.downcast_ref(), Some(DistillError::Config { .. }))
            || matches!(
                cause.downcast_ref(),
                Some(DistillError::Train(TrainError::Run(error))) if late(error)
            )
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pipeline(args) => pipeline::run_command(args),
        Command::Report(args) => report::run_command(args),
        Command::Train(args) => training::run_train(args),
        Command::Distill(args) => training::run_distill(args),
        Command::TeacherCache(args) => training::run_teacher_cache(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Export(args) => export::run(args),
        Command::Import(args) => {
            import::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { json } => {
            backends::devices(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { file } => {
            inspect::run(&file)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => {
            generate::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Continuations(args) => {
            continuations::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cost(args) => cost::run(args),
        Command::Bench { what } => bench::run(what),
        Command::Tokenizer { what } => tokenizer::run(what),
    }
}

/// Prints `report` as pretty JSON with `--json`, otherwise the text `describe` makes of it.
pub fn print_report<T: serde::Serialize>(
    json: bool,
    report: &T,
    describe: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", describe(report));
    }
    Ok(())
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
