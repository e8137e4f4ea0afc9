//! End-to-end tests of `distillery pipeline` on the tiny config: stages run in order, complete
//! stages are skipped, an interrupted stage resumes, a failing stage is named.

mod common;

use std::path::Path;

use common::{Workspace, repo_path};

/// A pipeline of every stage kind over the tiny config, inside `workspace`.
fn pipeline_toml(workspace: &Workspace, gptq_bits: u32) -> String {
    let common: Vec<String> = workspace
        .common_settings("unused")
        .chunks(2)
        .map(|pair| pair[1].clone())
        .filter(|setting| !setting.starts_with("run.name="))
        .collect();
    let settings = |run: &str, extra: &[String]| -> String {
        let mut all = vec![format!("run.name={run}")];
        all.extend(common.iter().cloned());
        all.extend(extra.iter().cloned());
        let quoted: Vec<String> = all.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let config = repo_path("configs/tiny-test.toml");
    let teacher = workspace.checkpoints.join("teacher");
    // The student learns from the teacher's cached logits, which the `cache` stage writes.
    let student = [
        "train.steps=20".to_string(),
        format!("teacher.checkpoint={}", teacher.display()),
        "distill.teacher=\"cached\"".to_string(),
    ];
    let quantized = |method: &str, extra: &[&str]| -> Vec<String> {
        let mut all = student.to_vec();
        all.push(format!("quantize.method={method}"));
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let gptq = quantized(
        "gptq",
        &[
            &format!("quantize.bits={gptq_bits}"),
            "quantize.group_size=16",
            "quantize.nsamples=8",
        ],
    );
    let mut export = student.to_vec();
    export.push("export.formats=[\"gguf\", \"hf\"]".into());
    format!(
        r#"
[pipeline]
name = "tiny"
experiment_dir = {experiments:?}
report_dir = {reports:?}

[[stage]]
name = "teacher"
kind = "train"
config = {config:?}
set = {teacher}

[[stage]]
name = "cache"
kind = "teacher_cache"
config = {config:?}
set = {student}

[[stage]]
name = "student"
kind = "distill"
config = {config:?}
set = {student}

[[stage]]
name = "int8"
kind = "quantize"
config = {config:?}
set = {int8}

[[stage]]
name = "gptq"
kind = "quantize"
config = {config:?}
set = {gptq}

[[stage]]
name = "export"
kind = "export"
config = {config:?}
set = {export}

[[stage]]
name = "table"
kind = "eval"
config = {config:?}
set = {student}
models = ["teacher", "student", "int8", "gptq"]
"#,
        experiments = workspace.experiments.display().to_string(),
        reports = workspace.root.join("reports").display().to_string(),
        teacher = settings("teacher", &["train.steps=30".into()]),
        student = settings("student", &student),
        int8 = settings("student", &quantized("int8", &[])),
        gptq = settings("student", &gptq),
        export = settings("student", &export),
    )
}

fn run_pipeline(workspace: &Workspace, toml: &str) -> (bool, String) {
    let path = workspace.root.join("pipeline.toml");
    std::fs::write(&path, toml).unwrap();
    let output = workspace
        .command(&["pipeline".into(), path.display().to_string()])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn stage_lines<'a>(stderr: &'a str, verdict: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|line| line.starts_with("stage ") && line.contains(verdict))
        .collect()
}

#[test]
fn pipeline_runs_every_stage_then_skips_what_is_complete() {
    let workspace = Workspace::new();
    let (ok, stderr) = run_pipeline(&workspace, &pipeline_toml(&workspace, 4));
    assert!(ok, "{stderr}");
    assert!(stage_lines(&stderr, "skipped").is_empty(), "{stderr}");
    // Each stage that ran says how long it took.
    let timed = stderr
        .lines()
        .filter(|line| {
            line.starts_with("stage ") && line.contains(" (stage: ") && line.ends_with(" s)")
        })
        .count();
    assert_eq!(timed, 7, "{stderr}");
    assert!(
        stderr.contains("stage cache (teacher_cache): wrote ") && stderr.contains("MiB) in "),
        "{stderr}"
    );
    let tables = workspace.experiments.join("tiny");
    let table = std::fs::read_to_string(tables.join("table.md")).unwrap();
    assert!(
        table.contains("quantized-gptq") || table.contains("gptq-4bit-g16"),
        "{table}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tables.join("table.json")).unwrap()).unwrap();
    assert_eq!(report["validation"].as_array().unwrap().len(), 4);
    assert_eq!(report["decoding"].as_array().unwrap().len(), 4);
    let export_dir = workspace.checkpoints.join("student-export");
    assert!(export_dir.join("student-q8_0.gguf").is_file());
    assert!(export_dir.join("student-hf/model.safetensors").is_file());

    // The report: a notebook (nbformat 4) with the figures embedded, Markdown, SVG and PNG.
    let report = workspace.root.join("reports/tiny");
    let notebook: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.ipynb")).unwrap())
            .unwrap();
    assert_eq!(notebook["nbformat"], 4);
    let embedded = notebook["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cell| cell["outputs"][0]["data"]["image/png"].is_string())
        .count();
    assert_eq!(embedded, 4);
    for stem in [
        "loss_curves",
        "perplexity_vs_bits",
        "model_sizes",
        "decode_speed",
    ] {
        let png = std::fs::read(report.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}");
        let svg = std::fs::read_to_string(report.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{stem}");
    }
    let markdown = std::fs::read_to_string(report.join("report.md")).unwrap();
    for section in [
        "## Models",
        "## Production metrics and cost",
        "## Edge deployment",
    ] {
        assert!(markdown.contains(section), "{section}: {markdown}");
    }

    // Again: every stage is complete and unchanged.
    let (ok, stderr) = run_pipeline(&workspace, &pipeline_toml(&workspace, 4));
    assert!(ok, "{stderr}");
    assert_eq!(stage_lines(&stderr, "skipped").len(), 7, "{stderr}");
    assert!(
        stage_lines(&stderr, "skipped")[1].starts_with("stage cache (teacher_cache): skipped"),
        "{stderr}"
    );

    // A changed stage reruns, with the stages after it; the ones before stay skipped.
    let (ok, stderr) = run_pipeline(&workspace, &pipeline_toml(&workspace, 8));
    assert!(ok, "{stderr}");
    let skipped = stage_lines(&stderr, "skipped");
    assert_eq!(skipped.len(), 4, "{stderr}");
    assert!(skipped[3].starts_with("stage int8"), "{stderr}");
    assert!(
        stderr.contains("stage gptq (quantize): gptq-8bit-g16"),
        "{stderr}"
    );
}

#[test]
fn killed_pipeline_resumes_its_stage_and_failures_name_the_stage() {
    let workspace = Workspace::new();
    let toml = pipeline_toml(&workspace, 4);
    let path = workspace.root.join("pipeline.toml");
    std::fs::write(&path, &toml).unwrap();
    let args = vec!["pipeline".to_string(), path.display().to_string()];
    common::kill_after(
        &workspace,
        &args,
        &workspace.checkpoints.join("teacher/step-0000010"),
        0,
    );
    let (ok, stderr) = run_pipeline(&workspace, &toml);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("stage teacher: resuming") && stderr.contains("from step 10"),
        "{stderr}"
    );

    let broken = toml.replace("quantize.bits=4", "quantize.bits=5");
    let (ok, stderr) = run_pipeline(&workspace, &broken);
    assert!(!ok);
    assert!(stderr.contains("quantize.bits"), "{stderr}");
    assert!(stderr.contains("stage gptq"), "{stderr}");
    assert!(!Path::new(&workspace.checkpoints.join("student-gptq-5bit-g16")).exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn settings_given_to_the_pipeline_reach_its_stages() {
    let workspace = Workspace::new();
    let path = workspace.root.join("pipeline.toml");
    std::fs::write(&path, pipeline_toml(&workspace, 4)).unwrap();
    let (code, stderr) = workspace.run_err(&[
        "pipeline".into(),
        path.display().to_string(),
        "--set".into(),
        "run.backend=cuda".into(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("stage teacher (train) failed") && stderr.contains("--features cuda"),
        "{stderr}"
    );
    assert!(!workspace.checkpoints.join("teacher").exists());
}
