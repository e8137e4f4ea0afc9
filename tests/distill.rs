//! End-to-end tests of `distillery distill`: a tiny teacher trained on the shipped corpus
//! teaches a smaller student.

mod common;

use common::{Workspace, repo_path};

/// `distill configs/tiny-test.toml` with a teacher from this workspace and a student half the
/// width of the tiny teacher.
fn distill_args(workspace: &Workspace, run_name: &str, settings: &[&str]) -> Vec<String> {
    let mut args = vec!["distill".to_string(), repo_path("configs/tiny-test.toml")];
    args.extend(workspace.common_settings(run_name));
    let teacher = format!(
        "teacher.checkpoint={}",
        workspace.checkpoints.join("teacher").display()
    );
    let student = [
        "model.hidden_size=16",
        "model.intermediate_size=32",
        "model.num_hidden_layers=1",
        "distill.temperature=2.0",
        "distill.alpha=0.5",
    ];
    for setting in std::iter::once(teacher.as_str())
        .chain(student)
        .chain(settings.iter().copied())
    {
        args.extend(["--set".to_string(), setting.to_string()]);
    }
    args
}

/// One step at a vanishing learning rate: the student's checkpoint still holds its start.
const ONE_FROZEN_STEP: [&str; 5] = [
    "train.steps=1",
    "train.lr=1e-12",
    "train.min_lr=0",
    "train.warmup_steps=0",
    "train.weight_decay=0",
];

fn train_teacher(workspace: &Workspace) {
    workspace.run_ok(&workspace.train_args("teacher", &["train.steps=30"]));
}

#[test]
fn distillation_resumes_bit_identically_and_never_touches_the_teacher() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    let teacher_files = common::snapshot(&workspace.checkpoints.join("teacher"));

    let settings = ["train.steps=30", "checkpoint.every=10", "checkpoint.keep=5"];
    let output = workspace.run_ok(&distill_args(&workspace, "straight", &settings));
    assert!(output.contains("trained 30 steps"), "{output}");

    let run_dir = workspace.checkpoints.join("killed");
    common::kill_after(
        &workspace,
        &distill_args(&workspace, "killed", &settings),
        &run_dir.join("step-0000010"),
        5,
    );
    let resumed = workspace.run_ok(
        &[
            distill_args(&workspace, "killed", &settings),
            vec!["--resume".into()],
        ]
        .concat(),
    );
    assert!(resumed.contains("trained 30 steps"), "{resumed}");
    common::assert_same_tensors(
        &workspace
            .checkpoints
            .join("straight/step-0000030/model.bpk"),
        &run_dir.join("step-0000030/model.bpk"),
    );
    for tag in ["train/loss", "train/ce", "train/kd", "val/kd"] {
        assert_eq!(
            common::metric_series(&workspace.experiments.join("straight"), tag),
            common::metric_series(&workspace.experiments.join("killed"), tag),
            "{tag}"
        );
    }

    // The teacher's files are byte for byte what its own training wrote.
    assert_eq!(
        common::snapshot(&workspace.checkpoints.join("teacher")),
        teacher_files
    );
    // The optimizer holds moments for the student's parameters only.
    let student_tensors = common::model_tensors(&run_dir.join("step-0000030/model.bpk")).len();
    let optimizer_names: Vec<String> =
        common::model_tensors(&run_dir.join("step-0000030/optimizer.bpk"))
            .into_keys()
            .collect();
    let teacher_tensors =
        common::model_tensors(&workspace.checkpoints.join("teacher/step-0000030/model.bpk"));
    assert_eq!(
        optimizer_names.len(),
        2 * student_tensors,
        "{optimizer_names:?}"
    );
    assert!(teacher_tensors.len() > student_tensors);
}

#[test]
fn distillation_logs_both_loss_terms_teacher_agreement_and_the_teacher_once() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    workspace.run_ok(&distill_args(
        &workspace,
        "logged",
        &["train.steps=20", "eval.every=10", "log.every=5"],
    ));
    let experiment = workspace.experiments.join("logged");
    let series = |tag: &str| common::metric_series(&experiment, tag);

    let teacher = series("teacher/val_loss");
    assert_eq!(teacher.len(), 1);
    assert_eq!(teacher[0].0, 0);
    // The logged teacher loss is what `eval` reports for the teacher's best checkpoint.
    let json = workspace.run_ok(
        &[
            vec!["eval".into(), repo_path("configs/tiny-test.toml")],
            workspace.common_settings("teacher"),
            vec![
                "--checkpoint".into(),
                workspace.checkpoints.join("teacher").display().to_string(),
                "--json".into(),
            ],
        ]
        .concat(),
    );
    let evaluation: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!((evaluation["loss"].as_f64().unwrap() - teacher[0].1).abs() < 1e-9);

    let (loss, ce, kd) = (series("train/loss"), series("train/ce"), series("train/kd"));
    assert_eq!(loss.len(), 20);
    for ((total, ce), kd) in loss.iter().zip(&ce).zip(&kd) {
        assert!(
            (total.1 - (0.5 * ce.1 + 0.5 * kd.1)).abs() < 1e-4,
            "{total:?} {ce:?} {kd:?}"
        );
        assert!(kd.1 > 0.0);
    }
    let agreement = series("val/teacher_agreement");
    assert_eq!(
        agreement.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        vec![10, 20]
    );
    assert!(
        agreement
            .iter()
            .all(|(_, share)| (0.0..=1.0).contains(share))
    );
    assert_eq!(series("val/kd").len(), 2);

    // `eval` with the distillation config compares the student's best checkpoint with the
    // teacher as the run did at that step.
    let mut eval_args = distill_args(&workspace, "logged", &[]);
    eval_args[0] = "eval".into();
    eval_args.extend([
        "--checkpoint".into(),
        workspace.checkpoints.join("logged").display().to_string(),
        "--json".into(),
    ]);
    let evaluation: serde_json::Value =
        serde_json::from_str(&workspace.run_ok(&eval_args)).unwrap();
    let best_step = evaluation["step"].as_u64().unwrap();
    let logged = |series: &[(u64, f64)]| {
        series
            .iter()
            .find(|(step, _)| *step == best_step)
            .map(|(_, value)| *value)
            .unwrap()
    };
    assert_eq!(
        evaluation["teacher_agreement"].as_f64().unwrap(),
        logged(&agreement)
    );
    assert!((evaluation["kd"].as_f64().unwrap() - logged(&series("val/kd"))).abs() < 1e-9);
}

#[test]
fn student_from_teacher_with_other_head_widths_is_a_config_error() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    // Half the teacher's width with all four of its heads: heads of 4 against the teacher's 8.
    let (code, stderr) = workspace.run_err(&distill_args(
        &workspace,
        "mismatch",
        &["student.init=from_teacher"],
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("student.init"), "{stderr}");
    assert!(
        stderr.contains("head width 4 (hidden_size / num_attention_heads) vs the teacher's 8"),
        "{stderr}"
    );
}

#[test]
fn a_narrower_student_from_teacher_keeps_some_of_the_teachers_channels() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    workspace.run_ok(&distill_args(
        &workspace,
        "pruned",
        &[
            &[
                "model.num_attention_heads=2",
                "model.num_key_value_heads=1",
                "student.init=from_teacher",
                "student.teacher_layers=[1]",
            ][..],
            &ONE_FROZEN_STEP,
        ]
        .concat(),
    ));
    // Each of the student's 16 embedding columns is one of the teacher's 32, in the teacher's
    // order: the residual channels it kept.
    let student =
        common::model_f32_tensors(&workspace.checkpoints.join("pruned/step-0000001/model.bpk"));
    let teacher = common::model_f32_tensors(&workspace.checkpoints.join("teacher/best/model.bpk"));
    let column = |table: &[f32], width: usize, index: usize| -> Vec<f32> {
        table.iter().skip(index).step_by(width).copied().collect()
    };
    let (student_table, teacher_table) = (&student["embed_tokens"], &teacher["embed_tokens"]);
    let mut channels = Vec::new();
    for index in 0..16 {
        let kept = column(student_table, 16, index);
        let channel = (0..32)
            .find(|&channel| {
                column(teacher_table, 32, channel)
                    .iter()
                    .zip(&kept)
                    .all(|(a, b)| (a - b).abs() <= 1e-6)
            })
            .unwrap_or_else(|| panic!("student column {index} is none of the teacher's"));
        channels.push(channel);
    }
    assert!(
        channels.windows(2).all(|pair| pair[0] < pair[1]),
        "{channels:?}"
    );
}

#[test]
fn student_from_teacher_starts_from_the_chosen_teacher_layer() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    let output = workspace.run_ok(&distill_args(
        &workspace,
        "copied",
        &[
            &[
                "model.hidden_size=32",
                "model.intermediate_size=64",
                "student.init=from_teacher",
                "student.teacher_layers=[1]",
            ][..],
            &ONE_FROZEN_STEP,
        ]
        .concat(),
    ));
    assert!(output.contains("trained 1 steps"), "{output}");
    // After one step at a vanishing learning rate the student still holds the teacher's
    // layer 1 as its layer 0.
    let student =
        common::model_f32_tensors(&workspace.checkpoints.join("copied/step-0000001/model.bpk"));
    let teacher = common::model_f32_tensors(&workspace.checkpoints.join("teacher/best/model.bpk"));
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-6);
    for (student_name, teacher_name) in [
        (
            "layers.0.self_attn.q_proj.weight",
            "layers.1.self_attn.q_proj.weight",
        ),
        (
            "layers.0.mlp.down_proj.weight",
            "layers.1.mlp.down_proj.weight",
        ),
        ("embed_tokens", "embed_tokens"),
    ] {
        assert!(
            close(&student[student_name], &teacher[teacher_name]),
            "{student_name} is not the teacher's {teacher_name}"
        );
    }
}

#[test]
fn teacher_with_another_tokenizer_is_refused() {
    let workspace = Workspace::new();
    let other_tokenizer = workspace.root.join("other-tokenizer.json");
    workspace.run_ok(&[
        "tokenizer".into(),
        "train".into(),
        "--corpus".into(),
        repo_path("datasets/tinyshakespeare.txt"),
        "--vocab-size".into(),
        "1024".into(),
        "--out".into(),
        other_tokenizer.display().to_string(),
    ]);
    let tokenizer = format!("data.tokenizer={}", other_tokenizer.display());
    workspace.run_ok(&workspace.train_args("teacher", &["train.steps=5", &tokenizer]));
    let (code, stderr) = workspace.run_err(&distill_args(&workspace, "student", &[]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("another tokenizer"), "{stderr}");
    assert!(stderr.contains("teacher"), "{stderr}");
}

#[test]
fn train_and_distill_refuse_each_others_configs() {
    let workspace = Workspace::new();
    let mut train_with_teacher = workspace.train_args("wrong", &[]);
    train_with_teacher.extend(["--set".into(), "teacher.checkpoint=checkpoints/x".into()]);
    let (code, stderr) = workspace.run_err(&train_with_teacher);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("distillery distill"), "{stderr}");

    let mut distill_without_teacher = workspace.train_args("wrong", &[]);
    distill_without_teacher[0] = "distill".into();
    let (code, stderr) = workspace.run_err(&distill_without_teacher);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`teacher`"), "{stderr}");
}

#[test]
fn alpha_zero_trains_on_the_labels_alone_like_train() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    let settings = ["train.steps=10", "distill.alpha=0"];
    workspace.run_ok(&distill_args(&workspace, "labels", &settings));
    // The same student, trained without a teacher.
    let plain = workspace.train_args(
        "plain",
        &[
            "model.hidden_size=16",
            "model.intermediate_size=32",
            "model.num_hidden_layers=1",
            "train.steps=10",
        ],
    );
    workspace.run_ok(&plain);
    for tag in ["train/loss", "val/loss"] {
        let labels = common::metric_series(&workspace.experiments.join("labels"), tag);
        let trained = common::metric_series(&workspace.experiments.join("plain"), tag);
        assert_eq!(labels, trained, "{tag}");
    }
}

#[test]
fn cached_teacher_with_every_logit_trains_like_the_live_teacher() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    // The teacher cache lives next to the token cache: keep both inside this workspace.
    let cache_dir = format!("data.cache_dir={}", workspace.root.join("cache").display());
    let settings = ["train.steps=10", "distill.top_k=2048", cache_dir.as_str()];
    let mut cache_args = distill_args(&workspace, "cached", &settings);
    cache_args[0] = "teacher-cache".into();
    let output = workspace.run_ok(&cache_args);
    assert!(output.contains("top-2048 logits"), "{output}");
    // Asked again for the same run, it keeps the cache it wrote instead of running the teacher.
    let written = |output: &str| {
        let path = output
            .split_whitespace()
            .find(|word| word.ends_with(".topk"))
            .unwrap();
        let modified = std::fs::metadata(path).unwrap().modified().unwrap();
        (path.to_string(), modified)
    };
    let first = written(&output);
    let again = workspace.run_ok(&cache_args);
    assert!(
        again.starts_with("kept the cache already written for this run, "),
        "{again}"
    );
    assert_eq!(written(&again), first);

    let cached_settings = [settings.as_slice(), &["distill.teacher=cached"]].concat();
    workspace.run_ok(&distill_args(&workspace, "cached", &cached_settings));
    workspace.run_ok(&distill_args(&workspace, "live", &settings));
    // The cached path sums the divergence over the teacher's tokens in the cache's order, the
    // live path in vocabulary order: equal up to float rounding.
    for tag in ["train/loss", "train/kd", "val/loss"] {
        let cached = common::metric_series(&workspace.experiments.join("cached"), tag);
        let live = common::metric_series(&workspace.experiments.join("live"), tag);
        assert_eq!(cached.len(), live.len(), "{tag}");
        for ((step, cached), (_, live)) in cached.iter().zip(&live) {
            assert!(
                (cached - live).abs() <= 1e-5 * live.abs().max(1.0),
                "{tag} at step {step}: cached {cached} vs live {live}"
            );
        }
    }

    // A longer run draws micro-batches the cache does not hold: refused, naming both counts.
    let longer = [cached_settings.as_slice(), &["train.steps=12"]].concat();
    let (code, stderr) = workspace.run_err(&distill_args(&workspace, "longer", &longer));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("teacher cache"), "{stderr}");
    assert!(
        stderr.contains("holds the first 10 micro-batches of this run's schedule, which draws 12"),
        "{stderr}"
    );
    // A shorter run reads the first micro-batches of the longer run's cache, and trains as it
    // does from a cache written for itself (which replaces the longer one at the same path).
    let shorter = [cached_settings.as_slice(), &["train.steps=8"]].concat();
    workspace.run_ok(&distill_args(&workspace, "shorter-of-10", &shorter));
    let mut cache_args = distill_args(&workspace, "shorter", &shorter);
    cache_args[0] = "teacher-cache".into();
    let output = workspace.run_ok(&cache_args);
    assert!(output.contains("8 micro-batches"), "{output}");
    workspace.run_ok(&distill_args(&workspace, "shorter-of-8", &shorter));
    for tag in ["train/loss", "train/kd", "val/loss"] {
        let of_10 = common::metric_series(&workspace.experiments.join("shorter-of-10"), tag);
        let of_8 = common::metric_series(&workspace.experiments.join("shorter-of-8"), tag);
        assert!(!of_10.is_empty(), "{tag}");
        assert_eq!(of_10, of_8, "{tag}");
    }

    // A top-16 cache trains every divergence to finite losses.
    let top_16 = ["train.steps=10", "distill.top_k=16", cache_dir.as_str()];
    let mut cache_args = distill_args(&workspace, "top16", &top_16);
    cache_args[0] = "teacher-cache".into();
    workspace.run_ok(&cache_args);
    for loss in ["forward_kl", "reverse_kl", "jsd"] {
        let run = format!("top16-{loss}");
        let choice = format!("distill.loss={loss}");
        let settings = [top_16.as_slice(), &["distill.teacher=cached", &choice]].concat();
        workspace.run_ok(&distill_args(&workspace, &run, &settings));
        let kd = common::metric_series(&workspace.experiments.join(&run), "train/kd");
        assert_eq!(kd.len(), 10);
        assert!(
            kd.iter()
                .all(|(_, value)| value.is_finite() && *value >= -1e-6),
            "{loss}: {kd:?}"
        );
    }
    // The rest's mass depends on the temperature the cache was written at.
    let hotter = [
        top_16.as_slice(),
        &["distill.teacher=cached", "distill.temperature=4"],
    ]
    .concat();
    let (code, stderr) = workspace.run_err(&distill_args(&workspace, "hotter", &hotter));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("temperature: 2.0 -> 4.0"), "{stderr}");
}

#[test]
fn resuming_against_a_changed_teacher_is_refused() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    let settings = ["train.steps=10", "checkpoint.every=5"];
    workspace.run_ok(&distill_args(&workspace, "student", &settings));
    // Same path, same config, other weights: the teacher was retrained with another seed.
    std::fs::remove_dir_all(workspace.checkpoints.join("teacher")).unwrap();
    std::fs::remove_dir_all(workspace.experiments.join("teacher")).unwrap();
    workspace.run_ok(&workspace.train_args("teacher", &["train.steps=30", "run.seed=8"]));
    let resume = [
        distill_args(&workspace, "student", &settings),
        vec!["--resume".into()],
    ]
    .concat();
    let (code, stderr) = workspace.run_err(&resume);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("teacher weights sha256"), "{stderr}");
    assert!(
        stderr.contains("would not continue the same run"),
        "{stderr}"
    );
}

#[test]
fn a_hugging_face_teacher_teaches_like_the_checkpoint_it_was_exported_from() {
    let workspace = Workspace::new();
    train_teacher(&workspace);
    let hf_dir = workspace.root.join("teacher-hf");
    let mut export = vec!["export".to_string(), repo_path("configs/tiny-test.toml")];
    export.extend(workspace.common_settings("teacher"));
    export.extend([
        "--checkpoint".into(),
        workspace.checkpoints.join("teacher").display().to_string(),
        "--format".into(),
        "hf".into(),
        "--out".into(),
        hf_dir.display().to_string(),
    ]);
    workspace.run_ok(&export);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(hf_dir.join(file).is_file(), "{file}");
    }

    let settings = ["train.steps=10"];
    workspace.run_ok(&distill_args(&workspace, "from-checkpoint", &settings));
    let mut from_hf = distill_args(&workspace, "from-hf", &settings);
    let position = from_hf
        .iter()
        .position(|arg| arg.starts_with("teacher.checkpoint="))
        .unwrap();
    from_hf[position] = format!("teacher.hf_dir={}", hf_dir.display());
    let output = workspace.run_ok(&from_hf);
    assert!(output.contains("trained 10 steps"), "{output}");

    // The same teacher as an f32 GGUF file, named by `teacher.from`.
    let gguf = workspace.root.join("teacher.gguf");
    let position = export.iter().position(|arg| arg == "hf").unwrap();
    export[position] = "gguf".into();
    *export.last_mut().unwrap() = gguf.display().to_string();
    workspace.run_ok(&export);
    let mut from_gguf = from_hf.clone();
    let position = from_gguf
        .iter()
        .position(|arg| arg.starts_with("teacher.hf_dir="))
        .unwrap();
    from_gguf[position] = format!("teacher.from={}", gguf.display());
    let position = from_gguf
        .iter()
        .position(|arg| arg == "run.name=from-hf")
        .unwrap();
    from_gguf[position] = "run.name=from-gguf".into();
    workspace.run_ok(&from_gguf);
    for tag in ["teacher/val_loss", "train/loss", "val/kd"] {
        let reference = common::metric_series(&workspace.experiments.join("from-checkpoint"), tag);
        for run in ["from-hf", "from-gguf"] {
            assert_eq!(
                common::metric_series(&workspace.experiments.join(run), tag),
                reference,
                "{run} {tag}"
            );
        }
    }
}
