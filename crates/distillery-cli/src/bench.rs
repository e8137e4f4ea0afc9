//! `distillery bench`: training, distillation and decoding throughput, and a backend checked
//! against the cpu backend.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use distillery_config::TeacherSource;
use distillery_formats::load;
use distillery_train::{BenchReport, bench_objective, bench_train};

use crate::models::{self, Activations};
use crate::{ConfigArgs, backends, decode_bench, print_report};

#[derive(Subcommand)]
pub enum BenchCommand {
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
    Generate(GenerateBenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
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

#[derive(Args)]
pub struct GenerateBenchArgs {
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
    #[arg(long)]
    batch: Option<usize>,
    /// With a draft: this many prompts of --prompt-tokens tokens, spread evenly over the
    /// validation split from its start, decoded one after another (rates and acceptance over
    /// all of them).
    #[arg(long)]
    prompts: Option<usize>,
    /// With a draft: user messages (the flag repeated) answered through the model's chat
    /// template are the prompts, instead of the validation split's, and decoding stops at the
    /// template's end-of-turn token (or after --new-tokens).
    #[arg(long, conflicts_with_all = ["prompt_tokens", "prompts"])]
    chat: Vec<String>,
    /// A system message before each chat message.
    #[arg(long, requires = "chat")]
    system: Option<String>,
}

pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Train(args) => train(args),
        BenchCommand::Distill(args) => distill(args),
        BenchCommand::Backend { config, json } => backends::check(&config, json),
        BenchCommand::Generate(args) => generate(args),
    }
}

fn train(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let config = args.config.load()?;
    let report = bench_train(&config, args.warmup, args.steps)?;
    print_report(args.json, &report, |report| {
        format!("{}\n", describe_bench(report))
    })?;
    Ok(ExitCode::SUCCESS)
}

fn distill(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let BenchArgs {
        config,
        warmup,
        steps,
        json,
    } = args;
    anyhow::ensure!(steps > 0, "--steps must be at least 1");
    let origin = config.origin();
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

fn generate(args: GenerateBenchArgs) -> anyhow::Result<ExitCode> {
    let GenerateBenchArgs {
        config,
        checkpoint,
        prompt_tokens,
        new_tokens,
        runs,
        json,
        activations,
        draft,
        batch,
        prompts,
        chat,
        system,
    } = args;
    if batch.is_some() {
        decode_bench::check_batch_tokens(new_tokens)?;
    }
    let config = config.load()?;
    let draft = draft.resolve_beside_batch(&config, batch)?;
    anyhow::ensure!(
        draft.is_some() || (prompts.is_none() && chat.is_empty()),
        "--prompts and --chat measure a draft: give --draft or the config's generate.draft"
    );
    let data = distillery_run::prepare_data(&config)?;
    anyhow::ensure!(
        prompt_tokens >= 1 && prompt_tokens < data.splits.validation.len(),
        "--prompt-tokens must be between 1 and the validation split's length"
    );
    let mut generation = decode_bench::greedy(new_tokens);
    let prompts = if chat.is_empty() {
        let prompts = prompts.unwrap_or(1);
        crate::continuations::spaced_prompts(&data.splits.validation, prompts, prompt_tokens)
            .context("--prompts and --prompt-tokens over the validation split")?
    } else {
        let (prompts, end_of_turn) =
            crate::generate::chat_prompts(&data.tokenizer, system.as_deref(), &chat)?;
        generation.stop_tokens = data.tokenizer.eos_token_id().into_iter().collect();
        generation.stop_tokens.extend(end_of_turn);
        prompts
    };
    let prompt = &prompts[0];
    let (mut loaded, load_seconds): (Vec<_>, Vec<_>) = checkpoint
        .iter()
        .map(|path| load::load_model_timed(&config, path, &data.tokenizer))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    if let Some(batch) = batch {
        let batch = decode_bench::batch_prompts(&data.splits.validation, batch, prompt_tokens)?;
        models::apply_activations(&mut loaded, activations);
        let reports = loaded
            .iter()
            .map(|model| decode_bench::bench_batch(model, &batch, new_tokens, runs))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print_report(json, &reports, |reports| decode_bench::batch_table(reports))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(settings) = &draft {
        loaded.push(load::load_model(&config, &settings.path, &data.tokenizer)?);
        models::apply_activations(&mut loaded, activations);
        let draft = models::into_draft(
            loaded.pop().expect("the draft was just added"),
            settings.vocabulary,
            &data.tokenizer,
            || Ok(data.splits.train.tokens.clone()),
            &generation.stop_tokens,
        )?;
        let reports = loaded
            .iter()
            .map(|model| {
                decode_bench::bench_draft(
                    model,
                    &draft,
                    &prompts,
                    &generation,
                    runs,
                    settings.length,
                    data.tokenizer.vocab_size(),
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        print_report(json, &reports, |reports| decode_bench::draft_table(reports))?;
        return Ok(ExitCode::SUCCESS);
    }
    models::apply_activations(&mut loaded, activations);
    let reports = decode_bench::bench_decode(&loaded, &load_seconds, prompt, new_tokens, runs)?;
    print_report(json, &reports, |reports| {
        decode_bench::markdown_table(reports)
    })?;
    Ok(ExitCode::SUCCESS)
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
