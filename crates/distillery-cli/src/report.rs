//! `distillery report PIPELINE`: the pipeline's story in `notebooks-export/<name>/`, from what
//! its stages left behind: the runs' metrics, the eval stage's table and decoding speeds, the
//! export stage's files, and a cost estimate from the measured speed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use distillery_config::{DistillConfig, ExperimentConfig, PipelineConfig, StageConfig, StageKind};
use distillery_report::{ModelSummary, Report, RunCurves};

use crate::cost;
use crate::pipeline::PipelineArgs;

/// Assumptions of the report's cost section: a small cloud CPU instance against a budget API.
const HARDWARE_PER_HOUR: f64 = 0.05;
const UTILIZATION: f64 = 0.5;
const TOKENS_PER_DAY: f64 = 5e7;
const API_PER_MILLION: f64 = 0.15;

#[derive(clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    config: PipelineArgs,
    #[arg(long, default_value = "notebooks-export")]
    out: PathBuf,
}

pub fn run_command(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let pipeline = args.config.load()?;
    let dir = write_report(&pipeline, &args.out)?;
    println!(
        "wrote {} (report.md, report.ipynb and the figures)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn write_report(pipeline: &PipelineConfig, out_root: &Path) -> anyhow::Result<PathBuf> {
    let name = &pipeline.pipeline.name;
    let tables = pipeline.pipeline.experiment_dir.join(name);
    let mut runs = Vec::new();
    let mut exports = Vec::new();
    let mut evals = Vec::new();
    let mut configs = Vec::new();
    for stage in &pipeline.stages {
        let config = distillery_config::load_reading(
            &stage.config,
            &stage.set,
            Some(&crate::read_model_source),
        )?;
        configs.push((stage, config.clone()));
        match stage.kind {
            StageKind::Train | StageKind::Distill => {
                runs.push(run_curves(&stage.name, &config.run_experiment_dir())?);
            }
            StageKind::Export => {
                for job in crate::export::configured_jobs(&config)? {
                    let bytes = directory_bytes(&job.out);
                    exports.push((job.out, bytes));
                }
            }
            StageKind::Eval => evals.push(tables.join(format!("{}.json", stage.name))),
            StageKind::Quantize | StageKind::TeacherCache => {}
        }
    }
    let Some(eval_path) = evals.last() else {
        anyhow::bail!("{name}: the pipeline has no eval stage to report");
    };
    let eval: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(eval_path)
            .with_context(|| format!("reading {}; run the pipeline first", eval_path.display()))?,
    )
    .with_context(|| format!("parsing {}", eval_path.display()))?;
    let labels: Vec<String> = eval["models"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let rows = eval["validation"].as_array().cloned().unwrap_or_default();
    let speeds = eval["decoding"].as_array().cloned().unwrap_or_default();
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or(f64::NAN);
    let models: Vec<ModelSummary> = labels
        .iter()
        .zip(rows.iter().zip(&speeds))
        .map(|(label, (row, speed))| ModelSummary {
            label: label.clone(),
            bits_per_weight: number(&row["bits_per_weight"]),
            file_bytes: row["file_bytes"].as_u64().unwrap_or(0),
            perplexity: number(&row["perplexity"]),
            decode_tokens_per_sec: number(&speed["decode_tokens_per_sec"]),
        })
        .collect();
    let table = std::fs::read_to_string(eval_path.with_extension("md")).unwrap_or_default();

    let mut sections = vec![("Models".to_string(), model_section(&labels, &table))];
    let margins: Vec<String> = distillations(&configs)
        .iter()
        .filter_map(|distilled| distilled.describe(&labels, &rows))
        .collect();
    if !margins.is_empty() {
        sections.push(("What distillation gained".into(), margins.join("\n")));
    }
    if let Some(fastest_small) = models.last() {
        sections.push((
            "Production metrics and cost".into(),
            cost_section(fastest_small)?,
        ));
    }
    if !exports.is_empty() {
        sections.push(("Edge deployment".into(), edge_section(&exports)));
    }
    let report = Report {
        title: format!("distillery pipeline `{name}`"),
        introduction: format!(
            "What `distillery pipeline` produced for `{name}`: {} training runs, then the \
             models below, each evaluated on the same validation split (the last 10% of the \
             corpus). Regenerate with `distillery report <pipeline config>`.",
            runs.len()
        ),
        runs,
        models,
        sections,
    };
    let dir = out_root.join(name);
    distillery_report::write(&report, &dir)?;
    Ok(dir)
}

fn run_curves(label: &str, experiment_dir: &Path) -> anyhow::Result<RunCurves> {
    let path = experiment_dir.join(distillery_train::METRICS_FILE);
    let records = distillery_train::read_records(&path)?;
    let series = |keys: &[&str]| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|record| {
                let value = keys.iter().find_map(|key| record.values.get(*key))?;
                Some((record.step as f64, *value))
            })
            .collect()
    };
    Ok(RunCurves {
        label: label.to_string(),
        // A distillation run's `train/loss` mixes in the divergence; its cross-entropy
        // compares with the other runs.
        train: series(&["train/ce", "train/loss"]),
        validation: series(&["val/loss"]),
    })
}

/// A distillation stage with the stage that trained its teacher (or the teacher's file) and
/// the label-only stage of the same student architecture it is judged against.
struct Distillation {
    student: String,
    teacher: String,
    baseline: String,
}

fn distillations(stages: &[(&StageConfig, ExperimentConfig)]) -> Vec<Distillation> {
    let labels_only = |config: &ExperimentConfig| {
        config
            .distill
            .as_ref()
            .is_some_and(DistillConfig::labels_only)
    };
    let architecture = |config: &ExperimentConfig| config.llama_config(0).ok();
    let mut found = Vec::new();
    for (stage, config) in stages {
        let Some(teacher) = &config.teacher else {
            continue;
        };
        if stage.kind != StageKind::Distill || labels_only(config) {
            continue;
        }
        let trained_teacher = stages.iter().find(|(other, other_config)| {
            other.kind == StageKind::Train
                && teacher.checkpoint.as_ref().is_some_and(|path| {
                    distillery_config::same_file(path, &other_config.run_checkpoint_dir())
                })
        });
        let teacher = match (trained_teacher, &teacher.from) {
            (Some((other, _)), _) => other.name.clone(),
            (None, Some(file)) => file.display().to_string(),
            (None, None) => continue,
        };
        let baseline = stages.iter().find(|(other, other_config)| {
            let label_only = other.kind == StageKind::Train
                || (other.kind == StageKind::Distill && labels_only(other_config));
            label_only
                && other.name != teacher
                && architecture(other_config) == architecture(config)
                && other_config.data == config.data
        });
        if let Some((baseline, _)) = baseline {
            found.push(Distillation {
                student: stage.name.clone(),
                teacher,
                baseline: baseline.name.clone(),
            });
        }
    }
    found
}

impl Distillation {
    /// The teacher's margin over the baseline and the share of it the student closed, from
    /// the eval table's rows; `None` when the table lacks one of the three models.
    fn describe(&self, labels: &[String], rows: &[serde_json::Value]) -> Option<String> {
        let row = |name: &str| {
            let index = labels.iter().position(|label| label == name)?;
            let row = rows.get(index)?;
            Some((
                row["loss"].as_f64()?,
                row["perplexity"].as_f64()?,
                row["accuracy"].as_f64()?,
            ))
        };
        let (teacher, baseline, student) = (
            row(&self.teacher)?,
            row(&self.baseline)?,
            row(&self.student)?,
        );
        let margin = 100.0 * (1.0 - teacher.1 / baseline.1);
        let gap = baseline.0 - teacher.0;
        let closed = if gap > 0.0 {
            format!(
                "closing {:.0}% of the gap in validation loss",
                100.0 * (baseline.0 - student.0) / gap
            )
        } else {
            "with no gap to close".to_string()
        };
        Some(format!(
            "- `{}` from `{}`: the teacher's perplexity {:.2} is {:.1}% {} the label-only \
             baseline's (`{}`, {:.2}); the student reaches {:.2}, {closed}, and {:.1}% of the \
             teacher's top-1 accuracy ({:.4} against {:.4}; baseline {:.4}).",
            self.student,
            self.teacher,
            teacher.1,
            margin.abs(),
            if margin >= 0.0 { "below" } else { "above" },
            self.baseline,
            baseline.1,
            student.1,
            100.0 * student.2 / teacher.2,
            student.2,
            teacher.2,
            baseline.2,
        ))
    }
}

fn model_section(labels: &[String], table: &str) -> String {
    format!(
        "Stages compared, in the tables' order: {}. Δ perplexity and size are relative to the \
         first float model.\n\n{table}",
        labels.join(", ")
    )
}

fn cost_section(model: &ModelSummary) -> anyhow::Result<String> {
    let inputs = cost::CostInputs {
        tokens_per_sec: model.decode_tokens_per_sec,
        hardware_per_hour: HARDWARE_PER_HOUR,
        utilization: UTILIZATION,
        tokens_per_day: TOKENS_PER_DAY,
        api_per_million: API_PER_MILLION,
    };
    let estimate = cost::estimate(&inputs).map_err(|message| anyhow::anyhow!(message))?;
    let source = format!("{} decoding, measured by the eval stage", model.label);
    Ok(format!(
        "From the measured decoding speed of `{}`, with assumed prices (change them with \
         `distillery cost --tokens-per-sec ... --hardware-per-hour ... --tokens-per-day ... \
         --api-per-million ...`):\n\n```\n{}```\n",
        model.label,
        cost::describe(&inputs, &estimate, &source)
    ))
}

fn edge_section(exports: &[(PathBuf, u64)]) -> String {
    let mut text = String::from(
        "The exports, ready for llama.cpp (`llama-cli -m FILE.gguf -p \"ROMEO:\"`), \
         transformers (the Hugging Face and GPTQ folders) or distillery itself:\n\n\
         | export | bytes |\n|---|---:|\n",
    );
    for (path, bytes) in exports {
        text.push_str(&format!("| `{}` | {bytes} |\n", path.display()));
    }
    text
}

/// Bytes of a file, or of every file in a folder.
fn directory_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |meta| meta.len());
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| directory_bytes(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, kind: StageKind, settings: &[&str]) -> (StageConfig, ExperimentConfig) {
        let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/tiny-test.toml");
        let settings: Vec<String> = settings.iter().map(|setting| setting.to_string()).collect();
        let config = distillery_config::load(Path::new(config_path), &settings).unwrap();
        let stage = StageConfig {
            name: name.into(),
            kind,
            config: config_path.into(),
            set: settings,
            models: Vec::new(),
        };
        (stage, config)
    }

    /// The student's teacher is the stage whose run its `teacher.checkpoint` names; its
    /// baseline the label-only stage of its architecture and data, never the teacher.
    #[test]
    fn a_distillation_finds_its_teacher_and_baseline_stages() {
        let student = [
            "run.name=student",
            "teacher.checkpoint=\"checkpoints/teacher\"",
            "distill.alpha=0.5",
        ];
        let stages = [
            stage(
                "teacher",
                StageKind::Train,
                &["run.name=teacher", "model.num_hidden_layers=3"],
            ),
            stage("wider", StageKind::Train, &["model.hidden_size=64"]),
            stage("baseline", StageKind::Train, &["run.name=baseline"]),
            stage("student", StageKind::Distill, &student),
        ];
        let borrowed: Vec<(&StageConfig, ExperimentConfig)> = stages
            .iter()
            .map(|(stage, config)| (stage, config.clone()))
            .collect();
        let found = distillations(&borrowed);
        let [found] = found.as_slice() else {
            panic!("one distillation");
        };
        assert_eq!(
            (&*found.student, &*found.teacher, &*found.baseline),
            ("student", "teacher", "baseline")
        );
    }

    #[test]
    fn the_teachers_margin_and_the_closed_gap_come_from_the_eval_rows() {
        let distillation = Distillation {
            student: "student".into(),
            teacher: "teacher".into(),
            baseline: "baseline".into(),
        };
        let row = |loss: f64, accuracy: f64| serde_json::json!({"loss": loss, "perplexity": loss.exp(), "accuracy": accuracy});
        let labels = ["baseline", "teacher", "student"].map(String::from);
        let rows = [row(4.2, 0.25), row(4.0, 0.3), row(4.05, 0.29)];
        let text = distillation.describe(&labels, &rows).unwrap();
        // 1 - e^-0.2 = 18.13%; (4.2 - 4.05) / (4.2 - 4.0) = 75%; 0.29 / 0.3 = 96.7%.
        for part in [
            "perplexity 54.60 is 18.1% below",
            "(`baseline`, 66.69)",
            "closing 75% of the gap",
            "96.7% of the teacher's top-1",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(distillation.describe(&labels[..2], &rows[..2]).is_none());
    }
}
