//! End-to-end tests of the `distillery` binary on the shipped corpus, tokenizer and tiny config.

mod common;
mod tensorboard;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Workspace, read_jsonl, repo_path};
use distillery_formats::gguf::Value;

#[test]
fn sigkill_then_resume_ends_bit_identical_to_an_uninterrupted_run() {
    let workspace = Workspace::new();
    // Dropout and gradient accumulation on: both must replay exactly after a resume.
    let settings = [
        "train.steps=120",
        "train.grad_accum=2",
        "model.dropout=0.1",
        "checkpoint.every=10",
        "checkpoint.keep=20",
        "eval.every=20",
    ];
    let uninterrupted = workspace.run_ok(&workspace.train_args("straight", &settings));
    assert!(
        uninterrupted.contains("trained 120 steps"),
        "{uninterrupted}"
    );

    // Kill the second run twice at different moments after its first checkpoint, then let it
    // finish.
    let run_dir = workspace.checkpoints.join("killed");
    for (first_checkpoint, extra_delay_ms) in [(10, 0), (50, 37)] {
        let mut args = workspace.train_args("killed", &settings);
        if first_checkpoint > 10 {
            args.push("--resume".into());
        }
        let marker = run_dir.join(format!("step-{first_checkpoint:07}"));
        common::kill_after(&workspace, &args, &marker, extra_delay_ms);
    }
    let resumed = workspace.run_ok(
        &[
            workspace.train_args("killed", &settings),
            vec!["--resume".into()],
        ]
        .concat(),
    );
    assert!(resumed.contains("trained 120 steps"), "{resumed}");
    common::assert_same_tensors(
        &workspace
            .checkpoints
            .join("straight/step-0000120/model.bpk"),
        &run_dir.join("step-0000120/model.bpk"),
    );

    // The metrics of the killed run hold each step once, with the uninterrupted run's losses.
    let straight = common::metric_series(&workspace.experiments.join("straight"), "train/loss");
    let killed = common::metric_series(&workspace.experiments.join("killed"), "train/loss");
    assert_eq!(straight.len(), 120);
    assert_eq!(straight, killed);
    let events = tensorboard::scalars(&workspace.experiments.join("killed/tb"));
    let steps: Vec<i64> = events["train/loss"].iter().map(|(step, _)| *step).collect();
    assert_eq!(steps, (1..=120).collect::<Vec<i64>>());
}

#[test]
fn tensorboard_events_hold_every_metric_at_its_step() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("logged", &[]));
    let events = tensorboard::scalars(&workspace.experiments.join("logged/tb"));
    let records = common::read_jsonl(&workspace.experiments.join("logged/metrics.jsonl"));

    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "val/loss",
        "val/ppl",
        "val/accuracy",
    ] {
        let from_jsonl: Vec<(i64, f32)> = records
            .iter()
            .filter_map(|record| {
                record.get(tag).map(|value| {
                    (
                        record["step"].as_i64().unwrap(),
                        value.as_f64().unwrap() as f32,
                    )
                })
            })
            .collect();
        assert!(!from_jsonl.is_empty(), "no {tag} in metrics.jsonl");
        assert_eq!(events.get(tag), Some(&from_jsonl), "{tag}");
    }
    let validation_steps: Vec<i64> = events["val/loss"].iter().map(|(step, _)| *step).collect();
    assert_eq!(validation_steps, vec![10, 20, 30, 40]);
    // The learning rate follows the warm-up: step 1 of 5 uses a fifth of the peak.
    let first_lr = events["train/lr"][0];
    assert_eq!(first_lr.0, 1);
    assert!((first_lr.1 - 3e-3 / 5.0).abs() < 1e-7, "{first_lr:?}");
    // Perplexity is exp(loss).
    for ((_, loss), (_, ppl)) in events["val/loss"].iter().zip(&events["val/ppl"]) {
        assert!((loss.exp() - ppl).abs() < 1e-3 * ppl);
    }
}

#[test]
fn training_learns_and_keeps_the_best_and_newest_checkpoints() {
    let workspace = Workspace::new();
    let output = workspace.run_ok(&workspace.train_args("learn", &["train.steps=60"]));
    let records = common::read_jsonl(&workspace.experiments.join("learn/metrics.jsonl"));
    let losses: Vec<f64> = records
        .iter()
        .filter_map(|record| record.get("val/loss").and_then(|v| v.as_f64()))
        .collect();
    let uniform = (2048f64).ln();
    assert!(
        losses[0] < uniform && losses.last().unwrap() < &(losses[0] - 0.3),
        "validation losses {losses:?} (uniform {uniform})"
    );
    assert!(output.contains("best validation loss"), "{output}");

    let run_dir = workspace.checkpoints.join("learn");
    let mut entries: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, vec!["best", "step-0000050", "step-0000060"]);
    let progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("best/progress.json")).unwrap())
            .unwrap();
    let best_loss = losses.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(progress["best"]["loss"].as_f64().unwrap(), best_loss);

    // eval reproduces the validation loss the run logged for its best checkpoint.
    let json = workspace.run_ok(
        &[
            vec!["eval".into(), repo_path("configs/tiny-test.toml")],
            workspace.common_settings("learn"),
            vec![
                "--checkpoint".into(),
                run_dir.display().to_string(),
                "--json".into(),
            ],
        ]
        .concat(),
    );
    let evaluation: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!((evaluation["loss"].as_f64().unwrap() - best_loss).abs() < 1e-9);
    assert!((evaluation["perplexity"].as_f64().unwrap() - best_loss.exp()).abs() < 1e-6);
    assert!(evaluation["accuracy"].as_f64().unwrap() > 0.0);
    assert_eq!(evaluation["tokens"].as_u64().unwrap(), 32 * 32);

    let text = workspace.run_ok(
        &[
            vec!["generate".into(), repo_path("configs/tiny-test.toml")],
            workspace.common_settings("learn"),
            vec![
                "--checkpoint".into(),
                run_dir.display().to_string(),
                "--prompt".into(),
                "ROMEO:".into(),
                "--max-new-tokens".into(),
                "8".into(),
                "--temperature".into(),
                "0".into(),
            ],
        ]
        .concat(),
    );
    assert!(text.starts_with("ROMEO:"), "{text}");
    assert!(text.len() > "ROMEO:\n".len(), "nothing generated: {text:?}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let workspace = Workspace::new();
    let settings = ["train.steps=100000", "checkpoint.every=1000"];
    let child = workspace
        .command(&workspace.train_args("interrupted", &settings))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = workspace.experiments.join("interrupted/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::metadata(&metrics).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: saved step"), "{stderr}");
    let saved: Vec<_> = std::fs::read_dir(workspace.checkpoints.join("interrupted"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("step-"))
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
}

#[test]
fn unknown_key_is_a_config_error_with_file_key_and_line() {
    let workspace = Workspace::new();
    let config = workspace.root.join("typo.toml");
    let text = std::fs::read_to_string(repo_path("configs/tiny-test.toml"))
        .unwrap()
        .replace("lr = 3e-3", "lr = 3e-3\nlearning_rate = 1e-3");
    std::fs::write(&config, &text).unwrap();
    let line = text
        .lines()
        .position(|line| line.starts_with("learning_rate"))
        .unwrap()
        + 1;
    let (code, stderr) = workspace.run_err(
        &[
            vec!["train".into(), config.display().to_string()],
            workspace.common_settings("typo"),
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("typo.toml"), "{stderr}");
    assert!(stderr.contains("learning_rate"), "{stderr}");
    assert!(stderr.contains(&format!("line {line}")), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr}");
}

#[test]
fn wrong_type_from_the_command_line_is_a_config_error() {
    let workspace = Workspace::new();
    let (code, stderr) = workspace.run_err(&workspace.train_args("typed", &["train.steps=many"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("train.steps"), "{stderr}");
    assert!(stderr.contains("--set train.steps=many"), "{stderr}");
}

#[test]
fn a_config_error_found_once_the_tokenizer_is_read_exits_2_from_every_stage() {
    let workspace = Workspace::new();
    for command in ["train", "quantize"] {
        let mut args = workspace.train_args("small-vocabulary", &["model.vocab_size=100"]);
        args[0] = command.into();
        args.extend(["--set".into(), "quantize.method=\"int8\"".into()]);
        let (code, stderr) = workspace.run_err(&args);
        assert_eq!(code, 2, "{command}: {stderr}");
        assert!(
            stderr.contains("model.vocab_size = 100 is smaller than the tokenizer's 2048 tokens"),
            "{command}: {stderr}"
        );
    }
}

/// Flags of `bench generate` and `continuations` that only mean something together are refused
/// before any model is read, naming the flags; so is an empty file of chat messages.
#[test]
fn prompt_flags_that_do_not_go_together_are_named() {
    let workspace = Workspace::new();
    let config = repo_path("configs/tiny-test.toml");
    let bench = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec!["bench".into(), "generate".into(), config.clone()];
        args.extend(workspace.common_settings("flags"));
        args.extend(["--checkpoint".into(), "no-such-model".into()]);
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    };
    for (extra, named) in [
        (&["--prompts", "3"][..], "--draft"),
        (&["--system", "Be brief."][..], "--chat"),
        (
            &["--draft", "x", "--chat", "hi", "--prompts", "2"][..],
            "--prompts",
        ),
        (&["--batch", "2", "--new-tokens", "1"][..], "--new-tokens"),
        (
            &["--draft", "x", "--draft-vocabulary", "0"][..],
            "--draft-vocabulary",
        ),
        (&["--draft-tokens", "3"][..], "generate.draft"),
        (
            &["--draft", "x", "--batch", "2"][..],
            "--batch measures batched decoding",
        ),
        (
            &["--draft", "x", "--adaptive-draft", "--draft-p-min", "0.3"][..],
            "--draft-p-min",
        ),
    ] {
        let (code, stderr) = workspace.run_err(&bench(extra));
        assert_ne!(code, 0, "{extra:?}");
        assert!(stderr.contains(named), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let empty = workspace.root.join("no-messages.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let mut continuations = vec!["continuations".to_string(), config.clone()];
    continuations.extend(workspace.common_settings("no-messages"));
    continuations.extend(
        [
            "--checkpoint",
            "no-such-model",
            "--out",
            "out.jsonl",
            "--chat",
            &empty.display().to_string(),
        ]
        .map(String::from),
    );
    let (_, stderr) = workspace.run_err(&continuations);
    assert!(stderr.contains("holds no chat message"), "{stderr}");
}

#[test]
fn missing_corpus_file_is_named() {
    let workspace = Workspace::new();
    let (code, stderr) = workspace
        .run_err(&workspace.train_args("nocorpus", &["data.corpus=datasets/no-such-corpus.txt"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("data.corpus"), "{stderr}");
    assert!(stderr.contains("no-such-corpus.txt"), "{stderr}");
    assert!(!workspace.checkpoints.join("nocorpus").exists());
}

#[test]
fn damaged_checkpoints_are_refused_and_left_as_they_were() {
    let workspace = Workspace::new();
    let settings = ["train.steps=20"];
    workspace.run_ok(&workspace.train_args("damaged", &settings));
    let run_dir = workspace.checkpoints.join("damaged");
    let newest = run_dir.join("step-0000020");

    // Truncated weights.
    let weights = newest.join("model.bpk");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let before = common::snapshot(&workspace.root);
    let mut args = workspace.train_args("damaged", &settings);
    args.push("--resume".into());
    let (code, stderr) = workspace.run_err(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("model.bpk"), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
    assert_eq!(
        common::snapshot(&workspace.root),
        before,
        "the run directory changed"
    );

    let (code, stderr) = workspace.run_err(
        &[
            vec!["eval".into(), repo_path("configs/tiny-test.toml")],
            workspace.common_settings("damaged"),
            vec!["--checkpoint".into(), newest.display().to_string()],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("model.bpk"), "{stderr}");

    // A corrupt progress record.
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::write(newest.join("progress.json"), "{\"step\": 2").unwrap();
    let (code, stderr) = workspace.run_err(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("corrupt progress record"), "{stderr}");
}

#[test]
fn checkpoint_of_another_shape_is_refused() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("narrow", &["train.steps=10"]));
    let checkpoint = workspace.checkpoints.join("narrow/step-0000010");
    let wider = [
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "train.steps=10",
    ];
    let mut args = workspace.train_args("wide", &wider);
    args.extend(["--resume".into(), checkpoint.display().to_string()]);
    let (code, stderr) = workspace.run_err(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("model.hidden_size: 32 -> 64"), "{stderr}");

    // The same refusal from the weights themselves, when the settings hash is not involved.
    let shapes = checkpoint.join("config.json");
    let config = std::fs::read_to_string(&shapes).unwrap();
    let progress_path = checkpoint.join("progress.json");
    let mut progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress_path).unwrap()).unwrap();
    let widened = config.replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    std::fs::write(&shapes, &widened).unwrap();
    progress["files"]["config.json"] = common::digest(widened.as_bytes());
    std::fs::write(&progress_path, progress.to_string()).unwrap();
    let (code, stderr) = workspace.run_err(
        &[
            vec!["eval".into(), repo_path("configs/tiny-test.toml")],
            workspace.common_settings("narrow"),
            vec!["--checkpoint".into(), checkpoint.display().to_string()],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("model.bpk"), "{stderr}");
    assert!(stderr.to_lowercase().contains("shape"), "{stderr}");
}

#[test]
fn fresh_run_over_existing_checkpoints_is_refused() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("twice", &["train.steps=10"]));
    let (code, stderr) = workspace.run_err(&workspace.train_args("twice", &["train.steps=10"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
}

#[test]
fn tokenizer_train_writes_a_tokenizer_the_trainer_accepts() {
    let workspace = Workspace::new();
    let corpus = workspace.root.join("small.txt");
    let text = std::fs::read_to_string(repo_path("datasets/tinyshakespeare.txt")).unwrap();
    std::fs::write(&corpus, &text[..200_000]).unwrap();
    let out = workspace.root.join("tok.json");
    let output = workspace.run_ok(&[
        "tokenizer".to_string(),
        "train".into(),
        "--corpus".into(),
        corpus.display().to_string(),
        "--vocab-size".into(),
        "512".into(),
        "--out".into(),
        out.display().to_string(),
    ]);
    assert!(output.contains("512 tokens"), "{output}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["added_tokens"][0]["content"], "<|endoftext|>");
    let output = workspace.run_ok(&workspace.train_args(
        "own-tokenizer",
        &[
            &format!("data.tokenizer={}", out.display()),
            &format!("data.corpus={}", corpus.display()),
            "train.steps=2",
            "train.warmup_steps=0",
            "eval.every=2",
        ],
    ));
    assert!(output.contains("trained 2 steps"), "{output}");
}

#[test]
fn shipped_tokenizer_matches_its_name_and_round_trips_the_corpus() {
    let tokenizer = distillery_data::TextTokenizer::load(Path::new(&repo_path(
        "datasets/shakespeare-bpe-2048.json",
    )))
    .unwrap();
    assert_eq!(tokenizer.vocab_size(), 2048);
    let text = std::fs::read_to_string(repo_path("datasets/tinyshakespeare.txt")).unwrap();
    assert_eq!(text.len(), 1_115_394);
    let sample = &text[..20_000];
    let ids = tokenizer.encode(sample).unwrap();
    assert_eq!(tokenizer.decode(&ids).unwrap(), sample);
    // A trained vocabulary compresses: well under one token per two bytes.
    assert!(ids.len() * 2 < sample.len(), "{} tokens", ids.len());
}

#[test]
fn gguf_export_holds_the_checkpoint_and_the_tokenizer() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("exported", &["train.steps=10"]));
    let out = workspace.root.join("model.gguf");
    let mut export = vec!["export".to_string(), repo_path("configs/tiny-test.toml")];
    export.extend(workspace.common_settings("exported"));
    export.extend([
        "--checkpoint".into(),
        workspace.checkpoints.join("exported").display().to_string(),
        "--format".into(),
        "gguf".into(),
        "--out".into(),
        out.display().to_string(),
    ]);
    workspace.run_ok(&export);
    let file = distillery_formats::gguf::read(std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        file.value("general.architecture"),
        Some(&Value::String("llama".into()))
    );
    let tokens = file
        .value("tokenizer.ggml.tokens")
        .and_then(Value::as_strings)
        .unwrap();
    assert_eq!(tokens.len(), 2048);
    assert_eq!(tokens[0], "<|endoftext|>");
    assert_eq!(
        file.value("tokenizer.ggml.pre"),
        Some(&Value::String("gpt-2".into()))
    );
    let checkpoint = common::model_tensors(&workspace.checkpoints.join("exported/best/model.bpk"));
    let embedding: Vec<u8> = file
        .tensor_values(file.tensor("token_embd.weight").unwrap())
        .unwrap()
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    assert_eq!(embedding, checkpoint["embed_tokens"]);

    // distillery evaluates the GGUF file's weights exactly as it evaluates the checkpoint.
    let evaluate = |target: &Path| -> serde_json::Value {
        let mut args = vec!["eval".to_string(), repo_path("configs/tiny-test.toml")];
        args.extend(workspace.common_settings("exported"));
        args.extend([
            "--checkpoint".into(),
            target.display().to_string(),
            "--json".into(),
        ]);
        serde_json::from_str(&workspace.run_ok(&args)).unwrap()
    };
    let inspected = workspace.run_ok(&["inspect".into(), out.display().to_string()]);
    assert!(inspected.contains("GGUF version 3"), "{inspected}");
    assert!(
        inspected.contains("general.architecture = \"llama\""),
        "{inspected}"
    );
    assert!(
        inspected.contains("blk.1.ffn_down.weight F32 [64, 32]"),
        "{inspected}"
    );
    // A GGUF file is evaluated in the table form: one row.
    let from_gguf = &evaluate(&out)[0];
    let from_checkpoint = evaluate(&workspace.checkpoints.join("exported"));
    assert_eq!(from_gguf["loss"], from_checkpoint["loss"]);
    assert_eq!(from_gguf["accuracy"], from_checkpoint["accuracy"]);
    // The table form also times its scoring, the file's loading left out.
    let (seconds, rate) = (
        from_gguf["scoring_seconds"].as_f64().unwrap(),
        from_gguf["tokens_per_sec"].as_f64().unwrap(),
    );
    let tokens = from_gguf["tokens"].as_f64().unwrap();
    assert!(seconds > 0.0 && (rate * seconds - tokens).abs() < 1e-6 * tokens);
}

#[test]
fn gptq_quantized_model_saves_loads_and_evaluates_to_the_reported_perplexity() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("quantized", &["train.steps=10"]));
    let with_config = |command: &str, settings: &[&str]| {
        let mut args = vec![command.to_string(), repo_path("configs/tiny-test.toml")];
        args.extend(workspace.common_settings("quantized"));
        for setting in settings {
            args.extend(["--set".to_string(), setting.to_string()]);
        }
        args
    };
    let gptq = [
        "quantize.method=\"gptq\"",
        "quantize.group_size=16",
        "quantize.nsamples=8",
        "quantize.quantize_embeddings=true",
    ];
    let mut quantize = with_config("quantize", &gptq);
    quantize.push("--json".into());
    let report: serde_json::Value = serde_json::from_str(&workspace.run_ok(&quantize)).unwrap();
    let output = workspace.checkpoints.join("quantized-gptq-4bit-g16");
    assert_eq!(report["output"], output.display().to_string());
    // The embedding and the 14 linear layers; the head is tied to the embedding.
    assert_eq!(report["matrices"].as_array().unwrap().len(), 15);
    let [float, quantized] = report["models"].as_array().unwrap().as_slice() else {
        panic!("two models compared: {report}");
    };
    assert_eq!(float["delta_perplexity_percent"], 0.0);
    assert!(
        quantized["bits_per_weight"].as_f64().unwrap() < 8.0,
        "{quantized}"
    );
    assert!(quantized["file_bytes"].as_u64().unwrap() < float["file_bytes"].as_u64().unwrap() / 4);

    let quantize_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("quantize_config.json")).unwrap())
            .unwrap();
    for (key, value) in [
        ("bits", serde_json::json!(4)),
        ("group_size", serde_json::json!(16)),
        ("desc_act", serde_json::json!(false)),
        ("sym", serde_json::json!(true)),
        ("true_sequential", serde_json::json!(true)),
        ("damp_percent", serde_json::json!(0.01)),
        ("static_groups", serde_json::json!(false)),
    ] {
        assert_eq!(quantize_config[key], value, "{key}");
    }

    // Loaded back from its folder, the model evaluates to what `quantize` reported.
    let float_run = workspace
        .checkpoints
        .join("quantized")
        .display()
        .to_string();
    let mut eval = with_config("eval", &[]);
    eval.extend([
        "--checkpoint".into(),
        float_run.clone(),
        output.display().to_string(),
        "--json".into(),
    ]);
    let rows: serde_json::Value = serde_json::from_str(&workspace.run_ok(&eval)).unwrap();
    assert_eq!(rows[1]["perplexity"], quantized["perplexity"]);
    assert_eq!(rows[1]["accuracy"], quantized["accuracy"]);
    assert_eq!(rows[0]["perplexity"], float["perplexity"]);

    let mut generate = with_config("generate", &[]);
    generate.extend([
        "--checkpoint".into(),
        output.display().to_string(),
        "--prompt".into(),
        "ROMEO:".into(),
        "--max-new-tokens".into(),
        "8".into(),
    ]);
    assert!(workspace.run_ok(&generate).starts_with("ROMEO:"));

    // The quantized model drafts for the float one (speculative decoding): greedy output is the
    // float model's own, token for token, and the JSON says what the draft did.
    let greedy_flags = [
        "--checkpoint",
        &float_run,
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ]
    .map(String::from);
    let greedy = |draft: Option<&str>| {
        let mut generate = with_config("generate", &[]);
        generate.extend(greedy_flags.clone());
        if let Some(draft) = draft {
            generate.extend(["--draft", draft, "--draft-tokens", "3"].map(String::from));
        }
        serde_json::from_str::<serde_json::Value>(&workspace.run_ok(&generate)).unwrap()
    };
    let (plain, drafted) = (greedy(None), greedy(Some(&output.display().to_string())));
    assert_eq!(drafted["tokens"], plain["tokens"]);
    assert_eq!(drafted["text"], plain["text"]);
    let draft = &drafted["draft"];
    let proposed: u64 = draft["proposed_by_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum();
    let accepted: u64 = draft["accepted_by_position"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert!(proposed > 0 && accepted <= proposed, "{draft}");
    assert!(draft["draft_seconds"].as_f64().unwrap() > 0.0, "{draft}");
    assert!(draft["check_seconds"].as_f64().unwrap() > 0.0, "{draft}");
    // Every pass of the float model emits the accepted drafts and one token of its own; the
    // prompt's pass emits the first.
    // (A stop token can end the last pass early.)
    let passes = draft["model_passes"].as_u64().unwrap();
    let emitted = drafted["tokens"].as_array().unwrap().len() as u64;
    if drafted["stop"] == "max_new_tokens" {
        assert_eq!(emitted, 1 + passes + accepted, "{draft}");
    } else {
        assert!(emitted <= 1 + passes + accepted, "{draft}");
    }
    assert!(plain.get("draft").is_none());

    // The same draft named by the config's [generate] section, its head over the 64 tokens most
    // frequent in the training split and the stop token: the output is still the float model's.
    let draft_path = output.display().to_string();
    let from_config = |extra: &[&str]| {
        let mut generate = with_config(
            "generate",
            &[
                &format!("generate.draft={draft_path}"),
                "generate.draft_tokens=3",
                "generate.draft_vocabulary=64",
            ],
        );
        generate.extend(greedy_flags.clone());
        generate.extend(extra.iter().map(|arg| arg.to_string()));
        generate
    };
    let shortlisted: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&from_config(&[]))).unwrap();
    assert_eq!(shortlisted["tokens"], plain["tokens"]);
    let draft = &shortlisted["draft"];
    assert_eq!(draft["draft_tokens"], 3, "{draft}");
    let proposable = draft["proposable_tokens"].as_u64().unwrap();
    assert!((64..=65).contains(&proposable), "{draft}");
    // A flag that says the same as the config is taken; one that says otherwise is refused.
    let agreeing: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&from_config(&["--draft-tokens", "3"]))).unwrap();
    assert_eq!(agreeing["tokens"], plain["tokens"]);
    let (code, stderr) = workspace.run_err(&from_config(&["--draft-tokens", "2"]));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("--draft-tokens 2 and the config's generate.draft_tokens = 3 disagree"),
        "{stderr}"
    );
    // A draft that stops where it is unsure still gives the float model's output.
    let confident: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&from_config(&["--draft-p-min", "0.25"]))).unwrap();
    assert_eq!(confident["tokens"], plain["tokens"]);
    assert_eq!(confident["draft"]["p_min"], 0.25, "{}", confident["draft"]);

    // Decoding speed: the quantized model against the float model it was quantized from, which
    // is named by its run directory.
    let mut bench = vec![
        "bench".to_string(),
        "generate".into(),
        repo_path("configs/tiny-test.toml"),
    ];
    bench.extend(workspace.common_settings("quantized"));
    bench.extend([
        "--checkpoint".into(),
        float_run.clone(),
        output.display().to_string(),
        "--prompt-tokens".into(),
        "4".into(),
        "--new-tokens".into(),
        "6".into(),
        "--runs".into(),
        "1".into(),
        "--json".into(),
    ]);
    let speeds: serde_json::Value = serde_json::from_str(&workspace.run_ok(&bench)).unwrap();
    let [float, quantized] = speeds.as_array().unwrap().as_slice() else {
        panic!("two models timed: {speeds}");
    };
    assert_eq!(float["decode_vs_float"], 1.0);
    let ratio = quantized["decode_vs_float"].as_f64().unwrap();
    let rates = |model: &serde_json::Value| model["decode_tokens_per_sec"].as_f64().unwrap();
    assert!(
        (ratio - rates(quantized) / rates(float)).abs() < 1e-9 * ratio,
        "{speeds}"
    );
    assert!(
        ["portable", "avx2", "avx512", "amx"].contains(&quantized["kernels"].as_str().unwrap())
    );
    assert_eq!(quantized["prompt_tokens"], 4);
    // Once a model is loaded, its heap asks for 2 MiB pages, which Linux's usual setting
    // (`madvise`) gives only on request; DISTILLERY_HUGE_PAGES=0 keeps 4 KiB pages.
    let settings = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    if cfg!(target_os = "linux") && settings.is_ok_and(|settings| settings.contains("[madvise]")) {
        // The kernel grants 2 MiB pages only where it finds free 2 MiB blocks, and this tiny
        // model's heap may hold no whole 2 MiB page to ask for (the formats crate's test
        // checks that a model-sized mapping asks), so here the report must stay within the
        // resident memory, and ask for nothing with the variable at 0.
        let resident = |speeds: &serde_json::Value, field: &str| {
            speeds[1]["resident"][field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field}: {speeds}"))
        };
        let bytes = resident(&speeds, "bytes");
        assert!(bytes > 0, "{speeds}");
        assert!(
            resident(&speeds, "advised_for_huge_pages") <= bytes,
            "{speeds}"
        );
        assert!(resident(&speeds, "in_huge_pages") <= bytes, "{speeds}");
        let output = workspace
            .command(&bench)
            .env("DISTILLERY_HUGE_PAGES", "0")
            .output()
            .unwrap();
        assert!(output.status.success());
        let small_pages: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            resident(&small_pages, "advised_for_huge_pages"),
            0,
            "{small_pages}"
        );
        assert_eq!(resident(&small_pages, "in_huge_pages"), 0, "{small_pages}");
    }

    // With the quantized model as the float model's draft: both speeds, their ratio and the
    // draft's acceptance (the bench itself checks that the output did not change).
    let draft_path = output.display().to_string();
    let float_index = bench.iter().position(|arg| arg == "--checkpoint").unwrap() + 1;
    bench.remove(float_index + 1);
    bench.extend([
        "--draft".into(),
        draft_path.clone(),
        "--draft-tokens".into(),
        "2".into(),
    ]);
    let drafted: serde_json::Value = serde_json::from_str(&workspace.run_ok(&bench)).unwrap();
    let [drafted] = drafted.as_array().unwrap().as_slice() else {
        panic!("one model timed with the draft: {drafted}");
    };
    let speed = |key: &str| drafted[key].as_f64().unwrap();
    assert!(
        (speed("speedup") - speed("drafted_tokens_per_sec") / speed("alone_tokens_per_sec")).abs()
            < 1e-9,
        "{drafted}"
    );
    assert!((0.0..=1.0).contains(&speed("acceptance_rate")), "{drafted}");
    assert_eq!(drafted["draft_tokens"], 2);
    assert!(drafted["acceptance_by_position"].as_array().unwrap().len() <= 2);
    // Where a pass's time goes: the drafts' forward passes and the model's check.
    assert!(
        speed("draft_token_ms") > 0.0 && speed("check_ms") > 0.0,
        "{drafted}"
    );
    assert!(
        (speed("alone_token_ms") * speed("alone_tokens_per_sec") - 1e3).abs() < 1e-6,
        "{drafted}"
    );
    // Three prompts spread over the validation split, one after another: their tokens in all,
    // and a pass of the model gives between one token and the draft's two plus one.
    bench.extend(["--prompts".into(), "3".into()]);
    let three: serde_json::Value = serde_json::from_str(&workspace.run_ok(&bench)).unwrap();
    let three = &three[0];
    assert_eq!(three["prompts"], 3, "{three}");
    let count = |report: &serde_json::Value, key: &str| report[key].as_u64().unwrap();
    assert_eq!(
        count(three, "prompt_tokens"),
        3 * count(drafted, "prompt_tokens")
    );
    assert_eq!(count(three, "new_tokens"), 3 * count(drafted, "new_tokens"));
    assert!(
        (1.0..=3.0).contains(&three["tokens_per_pass"].as_f64().unwrap()),
        "{three}"
    );
    bench.truncate(bench.len() - 2);

    // Prompts of different lengths decoded as one batch, by the float and the quantized model:
    // each continuation is the one `--prompt` gives alone.
    let prompts = [
        "ROMEO:",
        "JULIET: O Romeo,",
        "First Citizen:\tBefore we proceed any",
    ];
    let prompts_file = workspace.root.join("prompts.txt");
    std::fs::write(&prompts_file, prompts.join("\n\n")).unwrap();
    for checkpoint in [&float_run, &draft_path] {
        let generate = |input: [&str; 2]| {
            let mut generate = with_config("generate", &[]);
            generate.extend(
                [
                    "--checkpoint",
                    checkpoint,
                    input[0],
                    input[1],
                    "--max-new-tokens",
                    "10",
                    "--temperature",
                    "0",
                    "--json",
                ]
                .map(String::from),
            );
            serde_json::from_str::<serde_json::Value>(&workspace.run_ok(&generate)).unwrap()
        };
        let batched = generate(["--prompts", &prompts_file.display().to_string()]);
        let batched = batched.as_array().unwrap();
        assert_eq!(batched.len(), prompts.len(), "empty lines are skipped");
        for (prompt, batched) in prompts.iter().zip(batched) {
            assert_eq!(
                batched,
                &generate(["--prompt", prompt]),
                "{checkpoint}: {prompt}"
            );
        }
    }
    // The model's continuations of prompts spread over the training split, as JSON Lines that
    // distillation reads: the same file whatever the batch, the first prompt the corpus's start
    // and its continuation what `generate` writes after it.
    let continuations = |batch: &str| {
        let out = workspace.root.join(format!("continuations-{batch}.jsonl"));
        let mut continuations = with_config("continuations", &[]);
        continuations.extend(
            [
                "--checkpoint",
                &float_run,
                "--out",
                &out.display().to_string(),
                "--num-prompts",
                "24",
                "--prompt-tokens",
                "6",
                "--max-new-tokens",
                "16",
                "--temperature",
                "0",
                "--batch",
                batch,
            ]
            .map(String::from),
        );
        workspace.run_ok(&continuations);
        out
    };
    let written = continuations("5");
    assert_eq!(
        std::fs::read(&written).unwrap(),
        std::fs::read(continuations("1")).unwrap()
    );
    let lines = read_jsonl(&written);
    assert_eq!(lines.len(), 24);
    let corpus = std::fs::read_to_string(repo_path("datasets/tinyshakespeare.txt")).unwrap();
    let first_prompt = lines[0]["prompt"].as_str().unwrap();
    assert!(corpus.starts_with(first_prompt), "{first_prompt:?}");
    let mut generate = with_config("generate", &[]);
    generate.extend(
        [
            "--checkpoint",
            &float_run,
            "--prompt",
            first_prompt,
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
            "--json",
        ]
        .map(String::from),
    );
    let alone: serde_json::Value = serde_json::from_str(&workspace.run_ok(&generate)).unwrap();
    assert_eq!(alone["prompt_tokens"], 6);
    assert_eq!(
        lines[0]["text"].as_str().unwrap(),
        format!("{first_prompt}{}", alone["text"].as_str().unwrap())
    );
    for line in &lines {
        let text = line["text"].as_str().unwrap();
        let prompt = line["prompt"].as_str().unwrap();
        assert!(
            text.len() > prompt.len() && text.starts_with(prompt),
            "{line:?}"
        );
    }
    let mut train_on_continuations = workspace.train_args(
        "on-continuations",
        &[
            "train.steps=2",
            "train.warmup_steps=1",
            "eval.every=2",
            "data.format=\"jsonl\"",
            "data.text_field=\"text\"",
            "data.seq_len=16",
        ],
    );
    train_on_continuations.extend(["--set".into(), format!("data.corpus={}", written.display())]);
    let trained = workspace.command(&train_on_continuations).output().unwrap();
    let log = String::from_utf8_lossy(&trained.stderr);
    assert!(trained.status.success(), "{log}");
    assert!(
        log.contains("token cache") && log.contains("continuations-5.jsonl"),
        "{log}"
    );

    let draft_flag = bench.iter().position(|arg| arg == "--draft").unwrap();
    bench.truncate(draft_flag);
    bench.extend(["--batch".into(), "3".into()]);
    let batched: serde_json::Value = serde_json::from_str(&workspace.run_ok(&bench)).unwrap();
    let [batched] = batched.as_array().unwrap().as_slice() else {
        panic!("one model timed in a batch: {batched}");
    };
    let speed = |key: &str| batched[key].as_f64().unwrap();
    assert!(
        (speed("speedup") - speed("batched_tokens_per_sec") / speed("alone_tokens_per_sec")).abs()
            < 1e-9,
        "{batched}"
    );
    assert!(
        (speed("per_sequence_tokens_per_sec") * 3.0 - speed("batched_tokens_per_sec")).abs()
            < 1e-6 * speed("batched_tokens_per_sec"),
        "{batched}"
    );
    // The prompts' reading is timed apart from the decoding after it, in both runs.
    for key in [
        "alone_decode_tokens_per_sec",
        "batched_decode_tokens_per_sec",
    ] {
        assert!(speed(key).is_finite() && speed(key) > 0.0, "{batched}");
    }
    // Prompt lengths 4, 3, 4: a token shorter each, down to half of --prompt-tokens.
    assert_eq!(batched["prompt_tokens"], serde_json::json!([4, 3, 4]));

    // The cost estimate measures the model alone, with its draft, or over a batch.
    let cost = |extra: &[&str]| {
        let mut cost = vec![
            "cost".to_string(),
            repo_path("configs/tiny-test.toml"),
            "--measure".into(),
            float_run.clone(),
        ];
        cost.extend(workspace.common_settings("quantized"));
        cost.extend(
            [
                "--hardware-per-hour",
                "1",
                "--tokens-per-day",
                "1e6",
                "--api-per-million",
                "1",
                "--json",
            ]
            .map(String::from),
        );
        cost.extend(extra.iter().map(|arg| arg.to_string()));
        let report: serde_json::Value = serde_json::from_str(&workspace.run_ok(&cost)).unwrap();
        report["throughput_source"].as_str().unwrap().to_string()
    };
    assert!(cost(&[]).starts_with("measured: greedy decoding of"));
    let drafted = cost(&["--draft", &draft_path]);
    assert!(
        drafted.contains("speculative") && drafted.contains("accepted"),
        "{drafted}"
    );
    let batched = cost(&["--batch", "2"]);
    assert!(batched.contains("of 2 prompts together"), "{batched}");

    // The config form of export writes every listed format, and rewrites them when run again.
    let mut export = with_config(
        "export",
        &[
            "export.formats=[\"hf\", \"gguf\", \"gptq\"]",
            "export.gguf_types=[\"q8_0\", \"f16\"]",
        ],
    );
    export.extend(
        gptq.iter()
            .flat_map(|setting| ["--set".to_string(), setting.to_string()]),
    );
    for _ in 0..2 {
        workspace.run_ok(&export);
    }
    let exports = workspace.checkpoints.join("quantized-export");
    for file in [
        "quantized-hf/model.safetensors",
        "quantized-gptq/quantize_config.json",
        "quantized-q8_0.gguf",
        "quantized-f16.gguf",
    ] {
        assert!(exports.join(file).is_file(), "{file}");
    }
    let gptq_weights = std::fs::read(exports.join("quantized-gptq/model.safetensors")).unwrap();
    let gptq_tensors = safetensors::SafeTensors::deserialize(&gptq_weights).unwrap();
    assert!(
        gptq_tensors.tensor("model.embed_tokens.weight").is_ok(),
        "f32 for loaders"
    );
    assert!(
        gptq_tensors
            .tensor("model.layers.0.mlp.up_proj.qweight")
            .is_ok()
    );

    // Without a config, export takes the one the model was trained with.
    let recorded = workspace.root.join("recorded.gguf");
    workspace.run_ok(&[
        "export".into(),
        "--checkpoint".into(),
        output.display().to_string(),
        "--format".into(),
        "gguf".into(),
        "--type".into(),
        "q8_0".into(),
        "--out".into(),
        recorded.display().to_string(),
    ]);
    let recorded = distillery_formats::gguf::read(std::fs::read(&recorded).unwrap()).unwrap();
    assert_eq!(
        recorded.value("general.name"),
        Some(&Value::String("quantized".into()))
    );

    let (code, stderr) = workspace.run_err(&with_config(
        "quantize",
        &["quantize.method=\"gptq\"", "quantize.bits=5"],
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`quantize.bits`: 5 bits are not supported"),
        "{stderr}"
    );
}

#[test]
fn hugging_face_export_then_import_gives_back_identical_weights() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("round-trip", &["train.steps=10"]));
    let with_config = |command: &str| {
        let mut args = vec![command.to_string(), repo_path("configs/tiny-test.toml")];
        args.extend(workspace.common_settings("round-trip"));
        args
    };
    let hf_dir = workspace.root.join("hf");
    let mut export = with_config("export");
    export.extend([
        "--checkpoint".into(),
        workspace
            .checkpoints
            .join("round-trip")
            .display()
            .to_string(),
        "--format".into(),
        "hf".into(),
        "--out".into(),
        hf_dir.display().to_string(),
    ]);
    workspace.run_ok(&export);
    let imported = workspace.root.join("imported");
    let mut import = vec!["import".to_string(), repo_path("configs/tiny-test.toml")];
    import.extend(workspace.common_settings("fine-tune"));
    import.extend([
        "--hf-dir".into(),
        hf_dir.display().to_string(),
        "--out".into(),
        imported.display().to_string(),
    ]);
    workspace.run_ok(&import);
    common::assert_same_tensors(
        &workspace.checkpoints.join("round-trip/best/model.bpk"),
        &imported.join("model.bpk"),
    );
    let (code, stderr) = workspace.run_err(&import);
    assert_eq!(code, 1);
    assert!(stderr.contains("already exists"), "{stderr}");
    // The imported checkpoint is a run's step 0: it evaluates like the original.
    let evaluate = |target: &Path| -> serde_json::Value {
        let mut args = with_config("eval");
        args.extend([
            "--checkpoint".into(),
            target.display().to_string(),
            "--json".into(),
        ]);
        serde_json::from_str(&workspace.run_ok(&args)).unwrap()
    };
    let original = evaluate(&workspace.checkpoints.join("round-trip"));
    let reloaded = evaluate(&imported);
    assert_eq!(original["loss"], reloaded["loss"]);
    assert_eq!(reloaded["step"], 0);
    // ...from which the config's run trains on.
    let mut fine_tune = workspace.train_args("fine-tune", &[]);
    fine_tune.extend(["--resume".into(), imported.display().to_string()]);
    workspace.run_ok(&fine_tune);
    assert!(
        workspace
            .checkpoints
            .join("fine-tune/step-0000040")
            .is_dir()
    );
}

#[test]
fn cost_states_its_assumptions_and_recommends() {
    let workspace = Workspace::new();
    let args = |tokens_per_day: &str| -> Vec<String> {
        [
            "cost",
            "--tokens-per-sec",
            "2000",
            "--hardware-per-hour",
            "0.2",
            "--utilization",
            "0.25",
            "--tokens-per-day",
            tokens_per_day,
            "--api-per-million",
            "1.0",
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let report: serde_json::Value = serde_json::from_str(&workspace.run_ok(&args("1e8"))).unwrap();
    // 2000 tokens/s a quarter of the time: 43.2M tokens/day per instance at 4.80 a day.
    let estimate = &report["estimate"];
    assert_eq!(estimate["instances"], 3);
    assert_eq!(estimate["self_host"], true);
    assert!((estimate["break_even_tokens_per_day"].as_f64().unwrap() - 4.8e6).abs() < 1e-3);
    assert_eq!(report["assumptions"]["utilization"], 0.25);
    assert_eq!(report["throughput_source"], "given");
    let small: serde_json::Value = serde_json::from_str(&workspace.run_ok(&args("1e6"))).unwrap();
    assert_eq!(small["estimate"]["self_host"], false);
    let mut impossible = args("1e6");
    impossible[6] = "1.5".into();
    let (code, stderr) = workspace.run_err(&impossible);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("utilization must be in (0, 1], got 1.5"),
        "{stderr}"
    );
}

/// A pretrained model's file as `model.from`: the config takes its architecture and tokenizer,
/// and refuses a field that contradicts it, naming the field.
#[test]
fn model_from_a_gguf_file_gives_the_architecture_and_refuses_contradictions() {
    let workspace = Workspace::new();
    workspace.run_ok(&workspace.train_args("pretrained", &["train.steps=10"]));
    let gguf = workspace.root.join("pretrained.gguf");
    let mut export = vec!["export".to_string(), repo_path("configs/tiny-test.toml")];
    export.extend(workspace.common_settings("pretrained"));
    export.extend([
        "--checkpoint".into(),
        workspace
            .checkpoints
            .join("pretrained")
            .display()
            .to_string(),
        "--format".into(),
        "gguf".into(),
        "--out".into(),
        gguf.display().to_string(),
    ]);
    workspace.run_ok(&export);
    let config = workspace.root.join("from.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"from\"\ncheckpoint_dir = \"{}\"\n[data]\ncorpus = \"{}\"\nseq_len = 32\n\
             [model]\nfrom = \"{}\"\n[train]\nsteps = 1\nbatch_size = 4\nlr = 1e-3\n[eval]\nmax_windows = 8\n",
            workspace.checkpoints.display(),
            repo_path("datasets/tinyshakespeare.txt"),
            gguf.display()
        ),
    )
    .unwrap();
    let evaluate = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["eval".to_string(), config.display().to_string()];
        for setting in extra {
            args.extend(["--set".to_string(), setting.to_string()]);
        }
        args.extend([
            "--checkpoint".into(),
            gguf.display().to_string(),
            "--json".into(),
        ]);
        args
    };
    let rows: serde_json::Value = serde_json::from_str(&workspace.run_ok(&evaluate(&[]))).unwrap();
    assert!(rows[0]["loss"].as_f64().unwrap() > 0.0);
    // The file's tokenizer, written beside it, is the one the run uses.
    let written = workspace.root.join("pretrained.tokenizer/tokenizer.json");
    let tokenizer = distillery_data::TextTokenizer::load(&written).unwrap();
    assert_eq!(tokenizer.vocab_size(), 2048);
    // The same fields as the file's are fine; another value is an error naming the field.
    workspace.run_ok(&evaluate(&["model.hidden_size=32"]));
    let (code, stderr) = workspace.run_err(&evaluate(&["model.hidden_size=64"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`model.hidden_size`") && stderr.contains("= 64 contradicts"),
        "{stderr}"
    );
    let (code, stderr) = workspace.run_err(&evaluate(&[&format!(
        "data.tokenizer={}",
        repo_path("datasets/shakespeare-bpe-2048.json")
    )]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`data.tokenizer`"), "{stderr}");
    // A model without a chat template cannot chat.
    let (_, stderr) = workspace.run_err(&[
        "generate".into(),
        config.display().to_string(),
        "--checkpoint".into(),
        gguf.display().to_string(),
        "--chat".into(),
        "hello".into(),
    ]);
    assert!(stderr.contains("no chat template"), "{stderr}");

    // `import --gguf` makes a checkpoint of the file's weights; `quantize` takes the file too.
    let imported = workspace.root.join("imported");
    let mut import = vec!["import".to_string(), repo_path("configs/tiny-test.toml")];
    import.extend(workspace.common_settings("imported"));
    import.extend([
        "--gguf".into(),
        gguf.display().to_string(),
        "--out".into(),
        imported.display().to_string(),
    ]);
    workspace.run_ok(&import);
    assert_eq!(
        common::model_tensors(&imported.join("model.bpk")),
        common::model_tensors(&workspace.checkpoints.join("pretrained/best/model.bpk"))
    );
    let mut quantize = vec!["quantize".to_string(), repo_path("configs/tiny-test.toml")];
    quantize.extend(workspace.common_settings("pretrained"));
    for setting in [
        "quantize.method=\"int8\"".to_string(),
        format!("quantize.checkpoint={}", gguf.display()),
        "quantize.name=\"from-gguf\"".into(),
    ] {
        quantize.extend(["--set".to_string(), setting]);
    }
    quantize.push("--json".into());
    let report: serde_json::Value = serde_json::from_str(&workspace.run_ok(&quantize)).unwrap();
    assert_eq!(
        report["models"][0]["model"].as_str().unwrap(),
        gguf.display().to_string()
    );
    assert!(
        workspace
            .checkpoints
            .join("from-gguf/quantize_config.json")
            .is_file()
    );
}

#[test]
fn a_chat_corpus_counts_only_the_assistant_turns() {
    let workspace = Workspace::new();
    // The shipped tokenizer with ChatML's two special tokens, and a ChatML template beside it.
    let tokenizer_dir = workspace.root.join("chat-tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).unwrap();
    let mut tokenizer: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("datasets/shakespeare-bpe-2048.json")).unwrap(),
    )
    .unwrap();
    for (id, content) in [(2048, "<|im_start|>"), (2049, "<|im_end|>")] {
        tokenizer["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}));
    }
    let tokenizer_path = tokenizer_dir.join("tokenizer.json");
    std::fs::write(&tokenizer_path, tokenizer.to_string()).unwrap();
    let template = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                    message['content'] + '<|im_end|>\\n' }}{% endfor %}\
                    {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    std::fs::write(
        tokenizer_dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template}).to_string(),
    )
    .unwrap();

    // Each conversation: a line of Shakespeare from the user, the next line from the assistant.
    let text = std::fs::read_to_string(repo_path("datasets/tinyshakespeare.txt")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let corpus = workspace.root.join("chat.jsonl");
    let conversations: String = lines[..1200]
        .chunks(2)
        .map(|pair| {
            serde_json::json!({"messages": [
                {"role": "user", "content": pair[0]},
                {"role": "assistant", "content": pair[1]},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&corpus, &conversations).unwrap();
    let cache_dir = workspace.root.join("cache");
    let chat_settings = [
        format!("data.corpus={}", corpus.display()),
        "data.format=\"chat\"".to_string(),
        format!("data.tokenizer={}", tokenizer_path.display()),
        format!("data.cache_dir={}", cache_dir.display()),
    ];
    let settings: Vec<&str> = chat_settings
        .iter()
        .map(String::as_str)
        .chain(["train.steps=5", "eval.every=5", "checkpoint.every=5"])
        .collect();
    workspace.run_ok(&workspace.train_args("chat", &settings));

    // eval counts exactly the targets the token cache marks as counted in its validation
    // windows: the tail's first 32 windows of 32 targets.
    let mut eval = vec!["eval".to_string(), repo_path("configs/tiny-test.toml")];
    eval.extend(workspace.common_settings("chat"));
    for setting in &chat_settings {
        eval.extend(["--set".to_string(), setting.clone()]);
    }
    eval.extend([
        "--checkpoint".into(),
        workspace.checkpoints.join("chat").display().to_string(),
        "--json".into(),
    ]);
    let evaluation: serde_json::Value = serde_json::from_str(&workspace.run_ok(&eval)).unwrap();
    let counted_file = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.to_string_lossy().ends_with(".counted"))
        .expect("the token cache keeps which tokens count");
    let counted = std::fs::read(counted_file).unwrap();
    let validation_start = counted.len() - (counted.len() as f64 * 0.1).round() as usize;
    let expected: usize = (0..32)
        .flat_map(|window| (1..=32).map(move |offset| validation_start + window * 32 + offset))
        .filter(|&position| counted[position] == 1)
        .count();
    assert!(expected > 100 && expected < 32 * 32 - 100, "{expected}");
    assert_eq!(evaluation["tokens"].as_u64().unwrap() as usize, expected);
    assert!(evaluation["loss"].as_f64().unwrap().is_finite());

    // A malformed line is named with its file and line number.
    std::fs::write(&corpus, conversations + "{\"messages\": \"hello\"}\n").unwrap();
    let (code, stderr) = workspace.run_err(&workspace.train_args("broken", &settings));
    assert_ne!(code, 0);
    assert!(stderr.contains("chat.jsonl, line 601"), "{stderr}");
    assert!(stderr.contains("\"messages\""), "{stderr}");
}
