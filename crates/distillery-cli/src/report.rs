//! `distillery report PIPELINE`: the pipeline's story in `notebooks-export/<name>/`, from what
//! its stages left behind: the runs' metrics, the eval stage's table and decoding speeds, the
//! export stage's files, and a cost estimate from the measured speed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use distillery_config::{PipelineConfig, StageKind};
use distillery_report::{ModelSummary, Report, RunCurves};

use crate::cost;

/// Assumptions of the report's cost section: a small cloud CPU instance against a budget API.
const HARDWARE_PER_HOUR: f64 = 0.05;
const UTILIZATION: f64 = 0.5;
const TOKENS_PER_DAY: f64 = 5e7;
const API_PER_MILLION: f64 = 0.15;

pub fn write_report(pipeline: &PipelineConfig, out_root: &Path) -> anyhow::Result<PathBuf> {
    let name = &pipeline.pipeline.name;
    let tables = pipeline.pipeline.experiment_dir.join(name);
    let mut runs = Vec::new();
    let mut exports = Vec::new();
    let mut evals = Vec::new();
    for stage in &pipeline.stages {
        let config = distillery_config::load_reading(
            &stage.config,
            &stage.set,
            Some(&crate::read_model_source),
        )?;
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
