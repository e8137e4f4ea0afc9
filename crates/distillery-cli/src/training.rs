//! `distillery train`, `distill` and `teacher-cache`: the commands that run training loops or
//! feed them, and what they print when a run ends or is interrupted.

use std::path::PathBuf;
use std::process::ExitCode;

use distillery_config::{ConfigError, ExperimentConfig};
use distillery_train::{NextTokenObjective, Resume, TrainOptions, TrainOutcome, train};

use crate::{ConfigArgs, EXIT_INTERRUPTED, interrupt_flag};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue the run from its newest checkpoint, or from the checkpoint at PATH.
    #[arg(long, value_name = "PATH")]
    resume: Option<Option<PathBuf>>,
}

pub fn run_train(args: RunArgs) -> anyhow::Result<ExitCode> {
    let origin = args.config.origin();
    let config = args.config.load()?;
    if config.teacher.is_some() {
        return Err(ConfigError::Invalid {
            origin,
            key: "teacher".into(),
            line: None,
            message: "this config distills from a teacher: run `distillery distill`".into(),
        }
        .into());
    }
    let options = train_options(args.resume)?;
    report_outcome(train(&config, &options, &mut NextTokenObjective)?)
}

pub fn run_distill(args: RunArgs) -> anyhow::Result<ExitCode> {
    let origin = args.config.origin();
    let config = args.config.load()?;
    let options = train_options(args.resume)?;
    report_outcome(distillery_distill::distill(&config, &origin, &options)?)
}

pub fn run_teacher_cache(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let origin = args.origin();
    let config = args.load()?;
    let written = write_teacher_cache(&config, &origin)?;
    println!("{}", written.summary);
    Ok(ExitCode::SUCCESS)
}

/// A run's teacher cache, written or found already written, and the line that says so.
pub struct WrittenTeacherCache {
    pub path: PathBuf,
    pub bytes: u64,
    pub summary: String,
}

/// Writes `config`'s teacher cache unless it is already written, reporting progress on stderr
/// every 10%.
pub fn write_teacher_cache(
    config: &ExperimentConfig,
    origin: &str,
) -> anyhow::Result<WrittenTeacherCache> {
    let started = std::time::Instant::now();
    let mut reported = 0;
    let prepared = distillery_distill::write_teacher_cache(config, origin, &mut |done, total| {
        let percent = done * 100 / total.max(1);
        if percent >= reported + 10 || done == total {
            reported = percent;
            eprintln!("teacher cache: {done}/{total} micro-batches ({percent}%)");
        }
    })?;
    let (path, header) = (prepared.path, prepared.header);
    let bytes = std::fs::metadata(&path)?.len();
    let summary = format!(
        "{} {} ({} micro-batches x {} windows x {} tokens, top-{} logits and the rest, {:.1} MiB) in {:.0} s",
        if prepared.reused {
            "kept the cache already written for this run,"
        } else {
            "wrote"
        },
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
