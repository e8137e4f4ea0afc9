//! `distillery pipeline`: the stages of a pipeline config, in order. A stage whose outputs are
//! complete and whose settings (and upstream stages) are unchanged is skipped; an interrupted
//! training stage resumes from its newest checkpoint; a failing stage stops the pipeline with
//! its name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use distillery_config::{ConfigError, ExperimentConfig, PipelineConfig, StageConfig, StageKind};
use distillery_formats::load;
use distillery_run::checkpoint::{latest_checkpoint, read_progress};
use distillery_train::{NextTokenObjective, Resume, TrainOptions, TrainOutcome};
use serde::{Deserialize, Serialize};

use crate::{EXIT_INTERRUPTED, decode_bench, export, interrupt_flag, models, report};

const STATE_FILE: &str = "pipeline.json";

/// What a pipeline has finished: each stage's fingerprint when it last completed.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PipelineState {
    completed: BTreeMap<String, String>,
}

enum PipelineOutcome {
    Completed,
    /// A training stage saved a checkpoint and stopped on Ctrl-C.
    Interrupted {
        stage: String,
    },
}

struct Stage<'a> {
    settings: &'a StageConfig,
    config: ExperimentConfig,
    origin: String,
    fingerprint: String,
}

#[derive(clap::Args)]
pub struct PipelineArgs {
    /// The pipeline config (TOML).
    config: PathBuf,
    /// Override a key of every stage's experiment config, after the stage's own `set`, e.g.
    /// --set run.backend=wgpu (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl PipelineArgs {
    pub fn load(&self) -> Result<PipelineConfig, ConfigError> {
        let mut pipeline = distillery_config::load_pipeline(&self.config)?;
        for stage in &mut pipeline.stages {
            stage.set.extend(self.overrides.iter().cloned());
        }
        Ok(pipeline)
    }
}

/// `distillery pipeline`: the stages, then the report when the config asks for one.
pub fn run_command(args: PipelineArgs) -> anyhow::Result<ExitCode> {
    let pipeline = args.load()?;
    let started = std::time::Instant::now();
    match run(&pipeline, interrupt_flag()?)? {
        PipelineOutcome::Completed => {
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
        PipelineOutcome::Interrupted { stage } => {
            eprintln!(
                "interrupted in stage {stage}: its checkpoint is saved; run the pipeline again to \
                 continue"
            );
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}

/// Runs every stage of `pipeline` in order.
fn run(pipeline: &PipelineConfig, interrupt: Arc<AtomicBool>) -> anyhow::Result<PipelineOutcome> {
    let dir = pipeline
        .pipeline
        .experiment_dir
        .join(&pipeline.pipeline.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let mut state: PipelineState = match std::fs::read_to_string(&state_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a pipeline state file", state_path.display()))?,
        Err(_) => PipelineState::default(),
    };
    let mut upstream = String::new();
    let mut model_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for settings in &pipeline.stages {
        let origin = format!("{} (stage {})", settings.config.display(), settings.name);
        let label = format!("stage {} ({})", settings.name, settings.kind.name());
        let config =
            load_stage_config(settings, &origin).with_context(|| format!("{label} failed"))?;
        // A stage's fingerprint covers its settings and every stage before it, so a change
        // upstream reruns what depends on it.
        let fingerprint = distillery_data::hex_sha256(
            format!(
                "{upstream}\n{:?}\n{}\n{:?}",
                settings.kind,
                config.to_toml(),
                settings.models
            )
            .as_bytes(),
        );
        upstream = fingerprint.clone();
        let stage = Stage {
            settings,
            config,
            origin,
            fingerprint,
        };
        let recorded = state.completed.get(&settings.name) == Some(&stage.fingerprint);
        let started = std::time::Instant::now();
        let result = run_stage(&stage, recorded, &dir, &model_dirs, &interrupt)
            .with_context(|| format!("{label} failed"))?;
        match result {
            StageResult::Skipped { reason, model } => {
                eprintln!("{label}: skipped, {reason}");
                model_dirs.extend(model.map(|path| (settings.name.clone(), path)));
            }
            StageResult::Done { summary, model } => {
                eprintln!(
                    "{label}: {summary} (stage: {:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                model_dirs.extend(model.map(|path| (settings.name.clone(), path)));
            }
            StageResult::Interrupted => {
                return Ok(PipelineOutcome::Interrupted {
                    stage: settings.name.clone(),
                });
            }
        }
        state
            .completed
            .insert(settings.name.clone(), stage.fingerprint.clone());
        distillery_data::write_atomically(
            &state_path,
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
    }
    Ok(PipelineOutcome::Completed)
}

fn load_stage_config(stage: &StageConfig, origin: &str) -> Result<ExperimentConfig, ConfigError> {
    let config = distillery_config::load_reading(
        &stage.config,
        &stage.set,
        Some(&crate::read_model_source),
    )?;
    config.check_inputs(origin)?;
    Ok(config)
}

/// Where a teacher-cache stage wrote its cache, and its size.
#[derive(Serialize, Deserialize)]
struct TeacherCacheRecord {
    path: PathBuf,
    bytes: u64,
}

enum StageResult {
    Skipped {
        reason: String,
        model: Option<PathBuf>,
    },
    Done {
        summary: String,
        model: Option<PathBuf>,
    },
    Interrupted,
}

fn run_stage(
    stage: &Stage,
    recorded: bool,
    dir: &Path,
    model_dirs: &BTreeMap<String, PathBuf>,
    interrupt: &Arc<AtomicBool>,
) -> anyhow::Result<StageResult> {
    let config = &stage.config;
    match stage.settings.kind {
        StageKind::Train | StageKind::Distill => train_stage(stage, interrupt),
        StageKind::TeacherCache => {
            // The cache's path depends on the teacher's weights; the record names it, so an
            // unchanged stage is skipped without loading the teacher.
            let record_path = dir.join(format!("{}.json", stage.settings.name));
            let record: Option<TeacherCacheRecord> = std::fs::read_to_string(&record_path)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            if recorded
                && let Some(record) = record
                && std::fs::metadata(&record.path).is_ok_and(|meta| meta.len() == record.bytes)
            {
                return Ok(StageResult::Skipped {
                    reason: format!("{} is up to date", record.path.display()),
                    model: None,
                });
            }
            let written = crate::training::write_teacher_cache(config, &stage.origin)?;
            let record = TeacherCacheRecord {
                path: written.path,
                bytes: written.bytes,
            };
            distillery_data::write_atomically(
                &record_path,
                serde_json::to_string_pretty(&record)?.as_bytes(),
            )?;
            Ok(StageResult::Done {
                summary: written.summary,
                model: None,
            })
        }
        StageKind::Quantize => {
            let settings = config.quantize.as_ref().ok_or_else(|| {
                anyhow::anyhow!("{}: the config has no [quantize] section", stage.origin)
            })?;
            let output = config
                .run
                .checkpoint_dir
                .join(settings.output_name(&config.run.name));
            if recorded && distillery_formats::quantized::is_quantized_dir(&output) {
                return Ok(StageResult::Skipped {
                    reason: format!("{} is up to date", output.display()),
                    model: Some(output),
                });
            }
            let outcome = distillery_quantize::quantize_run(config, &mut |_| {})?;
            Ok(StageResult::Done {
                summary: format!(
                    "{} in {:.2} s -> {}",
                    outcome.label,
                    outcome.seconds,
                    outcome.output.display()
                ),
                model: Some(outcome.output),
            })
        }
        StageKind::Export => {
            let jobs = export::configured_jobs(config)?;
            if recorded && jobs.iter().all(|job| job.out.exists()) {
                return Ok(StageResult::Skipped {
                    reason: format!("{} exports are up to date", jobs.len()),
                    model: None,
                });
            }
            let tokenizer = distillery_data::TextTokenizer::load(&config.data.tokenizer)?;
            for job in &jobs {
                let loaded = load::load_model(config, &job.source, &tokenizer)?;
                export::export(config, &tokenizer, &loaded, job)?;
            }
            let outputs: Vec<String> = jobs
                .iter()
                .map(|job| job.out.display().to_string())
                .collect();
            Ok(StageResult::Done {
                summary: format!("wrote {}", outputs.join(", ")),
                model: None,
            })
        }
        StageKind::Eval => {
            let table = dir.join(format!("{}.md", stage.settings.name));
            let json = dir.join(format!("{}.json", stage.settings.name));
            if recorded && table.is_file() && json.is_file() {
                return Ok(StageResult::Skipped {
                    reason: format!("{} is up to date", table.display()),
                    model: None,
                });
            }
            let data = distillery_run::prepare_data(config)?;
            let mut loaded = Vec::new();
            let mut load_seconds = Vec::new();
            for name in &stage.settings.models {
                let path = model_dirs
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from(name));
                let (model, seconds) = load::load_model_timed(config, &path, &data.tokenizer)?;
                loaded.push(model);
                load_seconds.push(seconds);
            }
            let rows = models::evaluation_rows(config, &loaded, None)?;
            let context = loaded
                .iter()
                .map(|model| model.model.config().max_position_embeddings)
                .min()
                .unwrap_or(0);
            let (prompt_tokens, new_tokens) = decode_bench::standard_lengths(context);
            let prompt = &data.splits.validation[..prompt_tokens];
            let decoding =
                decode_bench::bench_decode(&loaded, &load_seconds, prompt, new_tokens, 3)?;
            let report = serde_json::json!({
                "models": stage.settings.models,
                "validation": rows,
                "decoding": decoding,
            });
            distillery_data::write_atomically(
                &json,
                serde_json::to_string_pretty(&report)?.as_bytes(),
            )?;
            let markdown = format!(
                "{}\n{}",
                models::markdown_table(&rows),
                decode_bench::markdown_table(&decoding)
            );
            distillery_data::write_atomically(&table, markdown.as_bytes())?;
            Ok(StageResult::Done {
                summary: format!("{} models compared in {}", loaded.len(), table.display()),
                model: None,
            })
        }
    }
}

/// A training stage is complete when its run holds a checkpoint at its last step made with
/// these settings; checkpoints of other settings are an error, never overwritten.
fn train_stage(stage: &Stage, interrupt: &Arc<AtomicBool>) -> anyhow::Result<StageResult> {
    let config = &stage.config;
    let run_dir = config.run_checkpoint_dir();
    let resume = match latest_checkpoint(&run_dir)? {
        None => Resume::Fresh,
        Some(latest) => {
            let progress = read_progress(&latest)?;
            if progress.trajectory_sha256 != config.trajectory_sha256() {
                anyhow::bail!(
                    "{} holds checkpoints made with other settings than {}; move it away to \
                     train this stage again",
                    run_dir.display(),
                    stage.origin
                );
            }
            if progress.step >= config.train.steps {
                return Ok(StageResult::Skipped {
                    reason: format!(
                        "{} is complete at step {}",
                        run_dir.display(),
                        progress.step
                    ),
                    model: Some(run_dir),
                });
            }
            eprintln!(
                "stage {}: resuming {} from step {}",
                stage.settings.name,
                run_dir.display(),
                progress.step
            );
            Resume::Latest
        }
    };
    let options = TrainOptions {
        resume,
        interrupt: interrupt.clone(),
    };
    let outcome = match stage.settings.kind {
        StageKind::Distill => distillery_distill::distill(config, &stage.origin, &options)?,
        _ => distillery_train::train(config, &options, &mut NextTokenObjective)?,
    };
    Ok(match outcome {
        TrainOutcome::Completed(summary) => StageResult::Done {
            summary: match summary.best {
                Some(best) => format!(
                    "{} steps, best validation loss {:.4} at step {}",
                    summary.steps, best.loss, best.step
                ),
                None => format!("{} steps", summary.steps),
            },
            model: Some(run_dir),
        },
        TrainOutcome::Interrupted { .. } => StageResult::Interrupted,
    })
}
