//! `distillery`: train, distill, quantize and export Llama-architecture language models.

mod backends;
mod cost;
mod decode_bench;
mod export;
mod generate;
mod import;
mod inspect;
mod models;
mod pipeline;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distillery_config::{ConfigError, ExperimentConfig, TeacherSource};
use distillery_config::{ExportFormatName, GgufTypeName};
use distillery_data::TextTokenizer;
use distillery_distill::DistillError;
use distillery_train::{
    BenchReport, NextTokenObjective, Resume, TrainError, TrainOptions, TrainOutcome,
    bench_objective, bench_train, evaluate_checkpoint, train,
};
use models::Activations;

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
    Pipeline {
        #[command(flatten)]
        config: PipelineArgs,
    },
    /// Write a pipeline's report (plots, report.md, report.ipynb) to notebooks-export/<name>/.
    Report {
        #[command(flatten)]
        config: PipelineArgs,
        #[arg(long, default_value = "notebooks-export")]
        out: PathBuf,
    },
    /// Train a model from a TOML experiment config.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Continue the run from its newest checkpoint, or from the checkpoint at PATH.
        #[arg(long, value_name = "PATH")]
        resume: Option<Option<PathBuf>>,
    },
    /// Train a student against a frozen teacher (the config's [teacher] and [distill]).
    Distill {
        #[command(flatten)]
        config: ConfigArgs,
        /// Continue the run from its newest checkpoint, or from the checkpoint at PATH.
        #[arg(long, value_name = "PATH")]
        resume: Option<Option<PathBuf>>,
    },
    /// Run the config's teacher once over every training window of the run and store its
    /// top-k logits, for `[distill] teacher = "cached"`.
    TeacherCache {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Quantize the run's model as the config's [quantize] section says (int8, round-to-nearest
    /// or GPTQ), save it under the checkpoint directory and compare it with the float model.
    Quantize {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a model in another tool's format, or every export the config's [export] section
    /// lists.
    Export {
        /// The experiment config (TOML); without it, the config the checkpoint was trained with
        /// (its run.toml, or for a quantized folder, its source checkpoint's).
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set export.gguf_types='["q4_0"]' (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// A checkpoint directory, a run directory (its best checkpoint), a quantized model
        /// folder or a GGUF file.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// hf (a Hugging Face Llama folder), gguf (a file for llama.cpp, the tokenizer
        /// embedded) or gptq (a GPTQ folder of a model `distillery quantize` made).
        #[arg(long, value_parser = parse_export_format)]
        format: Option<ExportFormatName>,
        /// How GGUF stores the weight matrices: f32, f16, q8_0 or q4_0.
        #[arg(long = "type", value_parser = parse_gguf_type, default_value = "f32")]
        gguf_type: GgufTypeName,
        /// The folder (hf, gptq) or file (gguf) to create.
        #[arg(long)]
        out: Option<PathBuf>,
    },
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
    Eval {
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
    },
    /// Continue a prompt with a model (any that `eval` takes), or answer a chat message
    /// through its chat template.
    Generate(generate::GenerateArgs),
    /// Cost per million tokens self-hosted against an API, the break-even volume and a
    /// recommendation, from a throughput measured here (--measure) or given.
    Cost {
        /// The experiment config; needed with --measure.
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Measure the decode throughput of this model (as `bench generate` does).
        #[arg(long, value_name = "MODEL", conflicts_with = "tokens_per_sec")]
        measure: Option<PathBuf>,
        /// Measure the model decoding with this draft (speculative decoding).
        #[command(flatten)]
        draft: models::DraftArgs,
        /// Measure the model decoding this many prompts as one batch: an instance's total
        /// throughput.
        #[arg(long, requires = "measure", conflicts_with = "draft")]
        batch: Option<usize>,
        /// Generated tokens per second of one instance, when not measured.
        #[arg(long)]
        tokens_per_sec: Option<f64>,
        /// Rent of one instance per hour.
        #[arg(long)]
        hardware_per_hour: f64,
        /// Share of the time an instance spends generating.
        #[arg(long, default_value_t = 0.5)]
        utilization: f64,
        #[arg(long)]
        tokens_per_day: f64,
        /// The API's price per million generated tokens.
        #[arg(long)]
        api_per_million: f64,
        #[arg(long)]
        json: bool,
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
    Train(BenchArgs),
    /// Distillation throughput with a live and a cached teacher, against plain training of
    /// the same student.
    Distill(BenchArgs),
    /// The config's run.backend against the cpu backend: the logits of one forward pass and
    /// one training step (losses and every weight), within fixed tolerances; exits non-zero
    /// when they disagree.
    Backend {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the comparison as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decoding speed (greedy, KV cache) of one or more models: checkpoints, quantized folders
    /// or GGUF files.
    Generate {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, num_args = 1.., required = true)]
        checkpoint: Vec<PathBuf>,
        /// Prompt length, taken from the start of the validation split.
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Timed runs per model (the median is reported), after one warm-up run.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
        /// How quantized matrices treat their activations.
        #[arg(long, value_enum, default_value_t)]
        activations: Activations,
        // With a draft, each checkpoint is measured alone and decoding with it (greedy), with
        // the draft's acceptance.
        #[command(flatten)]
        draft: models::DraftArgs,
        /// Decode this many prompts of different lengths (from the validation split) as one
        /// batch, against one after another.
        #[arg(long, conflicts_with = "draft")]
        batch: Option<usize>,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Steps run before timing starts.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Steps timed.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
    /// Print the token ids of a text, as JSON: with a tokenizer.json, or the tokenizer a GGUF
    /// file carries (written beside it as model.from does).
    Encode {
        /// A tokenizer.json, or a GGUF file.
        #[arg(long)]
        tokenizer: PathBuf,
        /// The text; or --file.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// A UTF-8 text file to encode.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PipelineArgs {
    /// The pipeline config (TOML).
    config: PathBuf,
    /// Override a key of every stage's experiment config, after the stage's own `set`, e.g.
    /// --set run.backend=wgpu (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl PipelineArgs {
    fn load(&self) -> Result<distillery_config::PipelineConfig, ConfigError> {
        let mut pipeline = distillery_config::load_pipeline(&self.config)?;
        for stage in &mut pipeline.stages {
            stage.set.extend(self.overrides.iter().cloned());
        }
        Ok(pipeline)
    }
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
    /// The config with its overrides applied, `model.from` read, its input files checked.
    pub fn load(&self) -> Result<ExperimentConfig, ConfigError> {
        let config = distillery_config::load_reading(
            &self.config,
            &self.overrides,
            Some(&read_model_source),
        )?;
        config.check_inputs(&self.config.display().to_string())?;
        Ok(config)
    }
}

/// What `model.from` names: a GGUF file (its tokenizer written beside it) or a Hugging Face
/// folder.
pub fn read_model_source(path: &Path) -> Result<distillery_config::ModelSource, String> {
    let source = distillery_formats::source::read_source(path).map_err(|e| e.message)?;
    Ok(distillery_config::ModelSource {
        architecture: source.architecture,
        tokenizer: source.tokenizer,
    })
}

fn parse_export_format(name: &str) -> Result<ExportFormatName, String> {
    name.parse()
}

fn parse_gguf_type(name: &str) -> Result<GgufTypeName, String> {
    name.parse()
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
    error.chain().any(|cause| {
        cause.is::<ConfigError>()
            || matches!(cause.downcast_ref(), Some(TrainError::Config { .. }))
            || matches!(
                cause.downcast_ref(),
                Some(DistillError::Config { .. } | DistillError::Train(TrainError::Config { .. }))
            )
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Report { config, out } => {
            let pipeline = config.load()?;
            let dir = report::write_report(&pipeline, &out)?;
            println!(
                "wrote {} (report.md, report.ipynb and the figures)",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pipeline { config } => {
            let pipeline = config.load()?;
            let started = std::time::Instant::now();
            match pipeline::run(&pipeline, interrupt_flag()?)? {
                pipeline::PipelineOutcome::Completed => {
                    if let Some(report_dir) = &pipeline.pipeline.report_dir {
                        let dir = report::write_report(&pipeline, report_dir)?;
                        eprintln!("report: {}", dir.join("report.ipynb").display());
                    }
                    println!(
                        "pipeline {} complete in {:.0} s; tables in {}",
                        pipeline.pipeline.name,
                        started.elapsed().as_secs_f64(),
                        pipeline
                            .pipeline
                            .experiment_dir
                            .join(&pipeline.pipeline.name)
                            .display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                pipeline::PipelineOutcome::Interrupted { stage } => {
                    eprintln!(
                        "interrupted in stage {stage}: its checkpoint is saved; run the pipeline \
                         again to continue"
                    );
                    Ok(ExitCode::from(EXIT_INTERRUPTED))
                }
            }
        }
        Command::Train { config, resume } => {
            let origin = config.config.display().to_string();
            let config = config.load()?;
            if config.teacher.is_some() {
                return Err(ConfigError::Invalid {
                    origin,
                    key: "teacher".into(),
                    line: None,
                    message: "this config distills from a teacher: run `distillery distill`".into(),
                }
                .into());
            }
            let options = train_options(resume)?;
            report_outcome(train(&config, &options, &mut NextTokenObjective)?)
        }
        Command::Distill { config, resume } => {
            let origin = config.config.display().to_string();
            let config = config.load()?;
            let options = train_options(resume)?;
            report_outcome(distillery_distill::distill(&config, &origin, &options)?)
        }
        Command::TeacherCache { config } => {
            let origin = config.config.display().to_string();
            let config = config.load()?;
            let written = write_teacher_cache(&config, &origin)?;
            println!("{}", written.summary);
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize { config, json } => {
            let config = config.load()?;
            let outcome = quantize_with_progress(&config)?;
            let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
            let models = [
                models::load_model(&config, &outcome.source, &tokenizer)?,
                models::load_model(&config, &outcome.output, &tokenizer)?,
            ];
            let rows = models::evaluation_rows(&config, &models, None)?;
            if json {
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
        Command::Export {
            config,
            overrides,
            checkpoint,
            format,
            gguf_type,
            out,
        } => {
            let config_path = match (config, &checkpoint) {
                (Some(config), _) => config,
                (None, Some(checkpoint)) => export::recorded_config(checkpoint)?,
                (None, None) => anyhow::bail!(
                    "give the experiment config, or --checkpoint with --format and --out"
                ),
            };
            let config = ConfigArgs {
                config: config_path,
                overrides,
            }
            .load()?;
            let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
            let jobs = match (format, checkpoint, out) {
                (Some(format), Some(checkpoint), Some(out)) => vec![export::ExportJob {
                    source: checkpoint,
                    format,
                    gguf_type,
                    out,
                    replace: false,
                }],
                (None, None, None) => export::configured_jobs(&config)?,
                _ => anyhow::bail!(
                    "give --checkpoint, --format and --out together, or none of them to export \
                     as the config's [export] section says"
                ),
            };
            for job in &jobs {
                let loaded = models::load_model(&config, &job.source, &tokenizer)?;
                let description = export::export(&config, &tokenizer, &loaded, job)?;
                println!(
                    "wrote {} ({description}) from {}",
                    job.out.display(),
                    loaded.describe()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Eval {
            config,
            checkpoint,
            json,
            activations,
            predictions,
        } => {
            let origin = config.config.display().to_string();
            let config = config.load()?;
            match checkpoint.as_slice() {
                [single] if !is_other_format(single) && predictions.is_none() => {
                    evaluate_training_checkpoint(&config, &origin, single, json)
                }
                paths => {
                    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
                    let mut models = paths
                        .iter()
                        .map(|path| models::load_model(&config, path, &tokenizer))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    models::apply_activations(&mut models, activations);
                    let mut predicted = Vec::new();
                    let rows = models::evaluation_rows(
                        &config,
                        &models,
                        predictions.is_some().then_some(&mut predicted),
                    )?;
                    if let Some(path) = &predictions {
                        distillery_data::write_atomically(
                            path,
                            serde_json::to_string(&predicted)?.as_bytes(),
                        )?;
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        print!("{}", models::markdown_table(&rows));
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Generate(args) => {
            generate::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Train(BenchArgs {
                    config,
                    warmup,
                    steps,
                    json,
                }),
        } => {
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            let config = config.load()?;
            let report = bench_train(&config, warmup, steps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", describe_bench(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cost {
            config,
            overrides,
            measure,
            draft,
            batch,
            tokens_per_sec,
            hardware_per_hour,
            utilization,
            tokens_per_day,
            api_per_million,
            json,
        } => {
            let (tokens_per_sec, source) = match (measure, tokens_per_sec) {
                (Some(model), _) => {
                    let Some(config) = config else {
                        anyhow::bail!("--measure needs the experiment config");
                    };
                    let config = ConfigArgs { config, overrides }.load()?;
                    decode_bench::measure_throughput(&config, &model, &draft, batch)?
                }
                (None, Some(tokens_per_sec)) => {
                    anyhow::ensure!(
                        draft.draft.is_none(),
                        "--draft is measured: give --measure MODEL instead of --tokens-per-sec"
                    );
                    (tokens_per_sec, "given".to_string())
                }
                (None, None) => anyhow::bail!("give --tokens-per-sec, or --measure MODEL"),
            };
            let inputs = cost::CostInputs {
                tokens_per_sec,
                hardware_per_hour,
                utilization,
                tokens_per_day,
                api_per_million,
            };
            let estimate = cost::estimate(&inputs).map_err(|message| anyhow::anyhow!(message))?;
            if json {
                let report = serde_json::json!({
                    "assumptions": inputs,
                    "throughput_source": source,
                    "estimate": estimate,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", cost::describe(&inputs, &estimate, &source));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what: BenchCommand::Backend { config, json },
        } => backends::check(&config, json),
        Command::Bench {
            what:
                BenchCommand::Generate {
                    config,
                    checkpoint,
                    prompt_tokens,
                    new_tokens,
                    runs,
                    json,
                    activations,
                    draft,
                    batch,
                },
        } => {
            let config = config.load()?;
            let data = distillery_train::prepare_data(&config)?;
            anyhow::ensure!(
                prompt_tokens >= 1 && prompt_tokens < data.splits.validation.len(),
                "--prompt-tokens must be between 1 and the validation split's length"
            );
            let prompt = &data.splits.validation[..prompt_tokens];
            let (mut loaded, load_seconds): (Vec<_>, Vec<_>) = checkpoint
                .iter()
                .map(|path| models::load_model_timed(&config, path, &data.tokenizer))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            if let Some(batch) = batch {
                let prompts =
                    decode_bench::batch_prompts(&data.splits.validation, batch, prompt_tokens)?;
                models::apply_activations(&mut loaded, activations);
                let reports = loaded
                    .iter()
                    .map(|model| decode_bench::bench_batch(model, &prompts, new_tokens, runs))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                } else {
                    print!("{}", decode_bench::batch_table(&reports));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(path) = &draft.draft {
                loaded.push(models::load_model(&config, path, &data.tokenizer)?);
                models::apply_activations(&mut loaded, activations);
                let (draft_model, measured) =
                    loaded.split_last().expect("the draft was just added");
                let reports = measured
                    .iter()
                    .map(|model| {
                        decode_bench::bench_draft(
                            model,
                            draft_model,
                            prompt,
                            new_tokens,
                            runs,
                            draft.length(),
                            data.tokenizer.vocab_size(),
                        )
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                } else {
                    print!("{}", decode_bench::draft_table(&reports));
                }
                return Ok(ExitCode::SUCCESS);
            }
            models::apply_activations(&mut loaded, activations);
            let reports =
                decode_bench::bench_decode(&loaded, &load_seconds, prompt, new_tokens, runs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", decode_bench::markdown_table(&reports));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            what:
                BenchCommand::Distill(BenchArgs {
                    config,
                    warmup,
                    steps,
                    json,
                }),
        } => {
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            let origin = config.config.display().to_string();
            let config = config.load()?;
            let mut objective = distillery_distill::objective_for(&config, &origin)?;
            let student = bench_train(&config, warmup, steps)?;
            let live_teacher = bench_objective(&config, warmup, steps, &mut objective)?;
            drop(objective);
            let mut cached_config = config.clone();
            cached_config
                .distill
                .get_or_insert_with(Default::default)
                .teacher = TeacherSource::Cached;
            let cached_teacher = match distillery_distill::objective_for(&cached_config, &origin) {
                Ok(mut objective) => Some(bench_objective(
                    &cached_config,
                    warmup,
                    steps,
                    &mut objective,
                )?),
                Err(error) => {
                    eprintln!("cached teacher not measured: {error}");
                    None
                }
            };
            let ratio = |report: &BenchReport| student.tokens_per_sec / report.tokens_per_sec;
            if json {
                let reports = serde_json::json!({
                    "student_alone": student,
                    "live_teacher": live_teacher,
                    "live_teacher_step_time_ratio": ratio(&live_teacher),
                    "cached_teacher": cached_teacher,
                    "cached_teacher_step_time_ratio": cached_teacher.as_ref().map(ratio),
                });
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                println!("student alone:  {}", describe_bench(&student));
                println!("live teacher:   {}", describe_bench(&live_teacher));
                println!(
                    "a distillation step with a live teacher takes {:.2}x a plain step",
                    ratio(&live_teacher)
                );
                if let Some(cached) = &cached_teacher {
                    println!("cached teacher: {}", describe_bench(cached));
                    println!(
                        "a distillation step with a cached teacher takes {:.2}x a plain step",
                        ratio(cached)
                    );
                }
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
        Command::Tokenizer {
            what:
                TokenizerCommand::Encode {
                    tokenizer,
                    text,
                    file,
                },
        } => {
            let path = if distillery_formats::source::is_gguf(&tokenizer) {
                distillery_formats::source::read_source(&tokenizer)?.tokenizer
            } else {
                tokenizer
            };
            let tokenizer = TextTokenizer::load(&path)?;
            let text = match (text, file) {
                (Some(text), _) => text,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                (None, None) => unreachable!("clap requires --text or --file"),
            };
            println!("{}", serde_json::to_string(&tokenizer.encode(&text)?)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Quantized model folders and GGUF files, which only the table form of `eval` reads.
fn is_other_format(path: &Path) -> bool {
    distillery_formats::source::is_gguf(path)
        || distillery_formats::quantized::is_quantized_dir(path)
}

/// One training checkpoint's validation metrics, and its agreement with the config's teacher
/// when there is one.
/// A teacher cache just written, and the line that says so.
struct WrittenTeacherCache {
    path: PathBuf,
    bytes: u64,
    summary: String,
}

/// Writes `config`'s teacher cache, reporting progress on stderr every 10%.
fn write_teacher_cache(
    config: &ExperimentConfig,
    origin: &str,
) -> anyhow::Result<WrittenTeacherCache> {
    let started = std::time::Instant::now();
    let mut reported = 0;
    let (path, header) =
        distillery_distill::write_teacher_cache(config, origin, &mut |done, total| {
            let percent = done * 100 / total.max(1);
            if percent >= reported + 10 || done == total {
                reported = percent;
                eprintln!("teacher cache: {done}/{total} micro-batches ({percent}%)");
            }
        })?;
    let bytes = std::fs::metadata(&path)?.len();
    let summary = format!(
        "wrote {} ({} micro-batches x {} windows x {} tokens, top-{} logits and the rest, {:.1} MiB) in {:.0} s",
        path.display(),
        header.micro_batches,
        header.batch_size,
        header.seq_len,
        header.top_k,
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(WrittenTeacherCache {
        path,
        bytes,
        summary,
    })
}

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

fn train_options(resume: Option<Option<PathBuf>>) -> anyhow::Result<TrainOptions> {
    let resume = match resume {
        None => Resume::Fresh,
        Some(None) => Resume::Latest,
        Some(Some(path)) => Resume::From(path),
    };
    Ok(TrainOptions {
        resume,
        interrupt: interrupt_flag()?,
    })
}

fn report_outcome(outcome: TrainOutcome) -> anyhow::Result<ExitCode> {
    match outcome {
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

fn describe_bench(report: &BenchReport) -> String {
    format!(
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
    )
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
