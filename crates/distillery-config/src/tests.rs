use super::*;

const MINIMAL: &str = r#"
[run]
name = "unit"
seed = 5

[data]
corpus = "datasets/tinyshakespeare.txt"
tokenizer = "datasets/shakespeare-bpe-2048.json"
seq_len = 32

[model]
preset = "llama-tiny"

[train]
steps = 10
batch_size = 4
lr = 1e-3
"#;

fn error(text: &str, overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse(text, "test.toml", &overrides)
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn minimal_config_gets_defaults_and_preset_fields() {
    let config = parse(MINIMAL, "test.toml", &[]).unwrap();
    assert_eq!(config.train.grad_accum, 1);
    assert_eq!(config.train.beta2, 0.95);
    assert_eq!(config.eval.every, 100);
    assert_eq!(config.checkpoint.keep, 3);
    assert!(config.log.tensorboard);
    assert_eq!(config.run.backend, Backend::Cpu);
    assert_eq!(config.model.hidden_size, Some(32));
    assert_eq!(
        config.run_checkpoint_dir(),
        PathBuf::from("checkpoints/unit")
    );
    assert_eq!(config.token_cache_dir(), PathBuf::from("datasets"));
    let llama = config.llama_config(2048).unwrap();
    assert_eq!(llama.vocab_size, 2048);
    assert_eq!(llama.num_key_value_heads, 2);
    assert!(config.llama_config(4096).is_ok());
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let config = parse(MINIMAL, "test.toml", &[]).unwrap();
    let reparsed = parse(&config.to_toml(), "saved.toml", &[]).unwrap();
    assert_eq!(config, reparsed);
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = MINIMAL.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 1e-3");
    let message = error(&text, &[]);
    assert!(message.contains("test.toml"), "{message}");
    assert!(message.contains("learning_rate"), "{message}");
    assert!(message.contains("line 18"), "{message}");
}

#[test]
fn wrong_type_names_key_and_line() {
    let text = MINIMAL.replace("batch_size = 4", "batch_size = \"four\"");
    let message = error(&text, &[]);
    assert!(message.contains("train.batch_size"), "{message}");
    assert!(message.contains("line 16"), "{message}");
}

#[test]
fn missing_required_key_is_named() {
    let text = MINIMAL.replace("seq_len = 32\n", "");
    let message = error(&text, &[]);
    assert!(message.contains("seq_len"), "{message}");
}

#[test]
fn invalid_value_names_key_and_line() {
    let text = MINIMAL.replace("lr = 1e-3", "lr = -1.0");
    let message = error(&text, &[]);
    assert!(message.contains("`train.lr`"), "{message}");
    assert!(message.contains("line 17"), "{message}");
}

#[test]
fn syntax_error_gives_the_line() {
    let text = MINIMAL.replace("seed = 5", "seed = = 5");
    let message = error(&text, &[]);
    assert!(message.contains("test.toml, line 4"), "{message}");
}

#[test]
fn lines_refer_to_the_file_even_when_overrides_add_keys() {
    let text = MINIMAL.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 1e-3");
    let message = error(
        &text,
        &[
            "run.checkpoint_dir=/elsewhere",
            "run.experiment_dir=/there",
            "run.name=x",
        ],
    );
    assert!(message.contains("line 18"), "{message}");
}

#[test]
fn unknown_backend_lists_the_choices() {
    let message = error(MINIMAL, &["run.backend=quantum"]);
    assert!(message.contains("run.backend"), "{message}");
    for backend in ["cpu", "wgpu", "tch-cpu", "tch-cuda", "cuda"] {
        assert!(message.contains(backend), "{message}");
    }
    let message = error(MINIMAL, &["run.dtype=\"f64\""]);
    assert!(
        message.contains("run.dtype") && message.contains("bf16"),
        "{message}"
    );
}

#[test]
fn overrides_set_values_of_any_type_and_create_tables() {
    let overrides: Vec<String> = [
        "train.lr=3e-4",
        "run.name=other",
        "model.dropout=0.1",
        "eval.max_windows=7",
        "log.tensorboard=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let config = parse(MINIMAL, "test.toml", &overrides).unwrap();
    assert_eq!(config.train.lr, 3e-4);
    assert_eq!(config.run.name, "other");
    assert_eq!(config.model.dropout, 0.1);
    assert_eq!(config.eval.max_windows, Some(7));
    assert!(!config.log.tensorboard);
}

#[test]
fn bad_overrides_are_reported_against_the_override() {
    let message = error(MINIMAL, &["train.lr=fast"]);
    assert!(message.contains("--set train.lr=fast"), "{message}");
    assert!(message.contains("train.lr"), "{message}");
    let message = error(MINIMAL, &["train.lr"]);
    assert!(message.contains("KEY=VALUE"), "{message}");
    let message = error(MINIMAL, &["run.name.inner=3"]);
    assert!(message.contains("not a table"), "{message}");
    let message = error(MINIMAL, &["train.momentum=0.9"]);
    assert!(message.contains("momentum"), "{message}");
}

#[test]
fn model_needs_a_preset_or_its_fields() {
    let text = MINIMAL.replace("preset = \"llama-tiny\"", "hidden_size = 64");
    let message = error(&text, &[]);
    assert!(message.contains("model.intermediate_size"), "{message}");
    let message = error(MINIMAL, &["model.preset=huge"]);
    assert!(message.contains("unknown preset"), "{message}");
    let message = error(MINIMAL, &["model.num_attention_heads=3"]);
    assert!(message.contains("model.hidden_size"), "{message}");
}

#[test]
fn sequence_must_fit_the_context() {
    let message = error(MINIMAL, &["data.seq_len=65"]);
    assert!(message.contains("data.seq_len"), "{message}");
}

#[test]
fn vocabulary_cannot_be_smaller_than_the_tokenizer() {
    let config = parse(MINIMAL, "test.toml", &["model.vocab_size=100".into()]).unwrap();
    assert_eq!(
        config.llama_config(2048).unwrap_err(),
        VocabularyTooSmall {
            vocab_size: 100,
            tokenizer_vocab: 2048
        }
    );
}

#[test]
fn run_name_must_be_a_directory_name() {
    let message = error(MINIMAL, &["run.name=../escape"]);
    assert!(message.contains("run.name"), "{message}");
}

#[test]
fn corpus_formats_parse_and_a_text_field_needs_json_lines() {
    let jsonl = parse(
        MINIMAL,
        "test.toml",
        &[
            "data.format=\"jsonl\"".into(),
            "data.text_field=\"body\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(jsonl.corpus().format, distillery_data::CorpusFormat::Jsonl);
    assert_eq!(jsonl.corpus().text_field, "body");
    let base = parse(MINIMAL, "test.toml", &[]).unwrap();
    assert_eq!(base.corpus().format, distillery_data::CorpusFormat::Text);
    // A text corpus's saved config is unchanged, so runs from before formats still resume.
    assert!(!base.to_toml().contains("format"));
    let chat = parse(MINIMAL, "test.toml", &["data.format=\"chat\"".into()]).unwrap();
    assert_ne!(base.trajectory_sha256(), chat.trajectory_sha256());
    let message = error(MINIMAL, &["data.text_field=\"body\""]);
    assert!(message.contains("data.text_field"), "{message}");
    assert!(message.contains("jsonl"), "{message}");
    let message = error(MINIMAL, &["data.format=\"csv\""]);
    assert!(message.contains("chat"), "{message}");
}

#[test]
fn trajectory_ignores_cadence_but_not_optimization() {
    let base = parse(MINIMAL, "test.toml", &[]).unwrap();
    let cadence = parse(
        MINIMAL,
        "test.toml",
        &[
            "log.every=3".into(),
            "checkpoint.every=2".into(),
            "run.name=x".into(),
        ],
    )
    .unwrap();
    assert_eq!(base.trajectory_sha256(), cadence.trajectory_sha256());
    let other_gpu = parse(MINIMAL, "test.toml", &["run.device=1".into()]).unwrap();
    assert_eq!(base.trajectory_sha256(), other_gpu.trajectory_sha256());
    let explicit_f32 = parse(MINIMAL, "test.toml", &["run.dtype=\"f32\"".into()]).unwrap();
    assert_eq!(base.trajectory_sha256(), explicit_f32.trajectory_sha256());
    let half = parse(MINIMAL, "test.toml", &["run.dtype=\"bf16\"".into()]).unwrap();
    assert_eq!(half.run.dtype, Precision::Bf16);
    assert_eq!(
        base.trajectory_differences(&half),
        vec!["run.dtype: (unset) -> \"bf16\"".to_string()]
    );
    let gpu = parse(MINIMAL, "test.toml", &["run.backend=\"wgpu\"".into()]).unwrap();
    assert_eq!(gpu.run.backend, Backend::Wgpu);
    assert_ne!(base.trajectory_sha256(), gpu.trajectory_sha256());
    let faster = parse(MINIMAL, "test.toml", &["train.lr=0.01".into()]).unwrap();
    assert_ne!(base.trajectory_sha256(), faster.trajectory_sha256());
    assert_eq!(
        base.trajectory_differences(&faster),
        vec!["train.lr: 0.001 -> 0.01".to_string()]
    );
}

#[test]
fn every_shipped_config_parses() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&directory).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        if table.contains_key("pipeline") {
            // A pipeline: every stage's config, with the stage's overrides, parses too.
            let pipeline = load_pipeline(&path).unwrap_or_else(|error| panic!("{error}"));
            for stage in pipeline.stages {
                let stage_path = directory.join("..").join(&stage.config);
                load_reading(&stage_path, &stage.set, Some(&smollm2_source))
                    .unwrap_or_else(|error| panic!("{error}"));
            }
        } else {
            load_reading(&path, &[], Some(&smollm2_source))
                .unwrap_or_else(|error| panic!("{error}"));
        }
        count += 1;
    }
    assert!(
        count >= 2,
        "found only {count} configs in {}",
        directory.display()
    );
}

#[test]
fn quantize_section_gets_autogptq_defaults_per_method() {
    // llama-tiny's 32-wide layers are narrower than the default group of 128 columns.
    let message = error(MINIMAL, &["quantize.method=\"gptq\""]);
    assert!(message.contains("128 is wider than"), "{message}");
    let wide = [
        "quantize.method=\"gptq\"".into(),
        "model.hidden_size=128".into(),
        "model.intermediate_size=256".into(),
    ];
    let gptq = parse(MINIMAL, "test.toml", &wide).unwrap();
    let quantize = gptq.quantize.unwrap();
    assert_eq!(quantize.bits(), 4);
    assert_eq!(quantize.group_size(), Some(128));
    assert!(quantize.sym && quantize.true_sequential && !quantize.act_order);
    assert_eq!(quantize.damp_percent, 0.01);
    assert_eq!(quantize.nsamples, 128);
    assert_eq!(quantize.label(), "gptq-4bit-g128");
    let int8 = parse(MINIMAL, "test.toml", &["quantize.method=\"int8\"".into()]).unwrap();
    let quantize = int8.quantize.unwrap();
    assert_eq!((quantize.bits(), quantize.group_size()), (8, Some(32)));
    assert_eq!(quantize.label(), "int8-g32");
    let rows = parse(
        MINIMAL,
        "test.toml",
        &[
            "quantize.method=\"int8\"".into(),
            "quantize.group_size=-1".into(),
        ],
    )
    .unwrap();
    let quantize = rows.quantize.unwrap();
    assert_eq!((quantize.bits(), quantize.group_size()), (8, None));
    assert_eq!(quantize.label(), "int8");
}

#[test]
fn bad_quantize_settings_name_their_key() {
    let with = |extra: &str| format!("{MINIMAL}\n[quantize]\n{extra}\n");
    for (extra, key, message) in [
        (
            "method = \"gptq\"\nbits = 5",
            "quantize.bits",
            "5 bits are not supported (2, 3, 4 or 8)",
        ),
        (
            "method = \"int8\"\nbits = 4",
            "quantize.bits",
            "always 8 for int8",
        ),
        (
            "method = \"rtn\"\ngroup_size = 0",
            "quantize.group_size",
            "got 0",
        ),
        (
            "method = \"rtn\"\ngroup_size = 48",
            "quantize.group_size",
            "self_attn.q_proj: group_size = 48 is wider than the 32 input columns",
        ),
        (
            "method = \"rtn\"\nact_order = true",
            "quantize.act_order",
            "only applies",
        ),
        (
            "method = \"int8\"\nclip_search = true",
            "quantize.clip_search",
            "absmax",
        ),
        (
            "method = \"gptq\"\ndamp_percent = 0.0",
            "quantize.damp_percent",
            "(0, 1]",
        ),
        (
            "method = \"gptq\"\nseqlen = 65",
            "quantize.seqlen",
            "longer than",
        ),
        (
            "method = \"gptq\"\nquantize_lm_head = true",
            "quantize.quantize_lm_head",
            "tied",
        ),
        ("method = \"gptq\"\nblocksize = 64", "quantize", "blocksize"),
    ] {
        let message_text = error(&with(extra), &[]);
        assert!(
            message_text.contains(key) && message_text.contains(message),
            "{extra}: {message_text}"
        );
    }
}

#[test]
fn three_bit_storage_needs_widths_in_whole_words() {
    let message = error(
        MINIMAL,
        &[
            "quantize.method=\"gptq\"",
            "quantize.bits=3",
            "quantize.group_size=-1",
        ],
    );
    assert!(
        message.contains("self_attn.k_proj: 32 inputs x 16 outputs")
            && message.contains("multiples of 32"),
        "{message}"
    );
}

/// What reading SmolLM2-135M-Instruct's file gives `model.from`.
fn smollm2_source(_: &Path) -> Result<ModelSource, ModelSourceError> {
    Ok(ModelSource {
        architecture: distillery_model::LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            tie_word_embeddings: true,
            rope_scaling: None,
        },
        tokenizer: PathBuf::from("models/smollm2.tokenizer/tokenizer.json"),
    })
}

const FROM_FILE: &str = r#"
[run]
name = "real"
[data]
corpus = "c.txt"
seq_len = 64
[model]
from = "models/smollm2.gguf"
[train]
steps = 1
batch_size = 1
lr = 1e-4
"#;

#[test]
fn model_from_fills_the_architecture_and_the_tokenizer() {
    let config = parse_reading(FROM_FILE, "from.toml", &[], Some(&smollm2_source)).unwrap();
    assert_eq!(config.model.hidden_size, Some(576));
    assert_eq!(config.model.rope_theta, Some(100000.0));
    assert_eq!(config.model.tie_word_embeddings, Some(true));
    assert_eq!(
        config.data.tokenizer,
        PathBuf::from("models/smollm2.tokenizer/tokenizer.json")
    );
    assert_eq!(
        config.llama_config(49152).unwrap(),
        smollm2_source(Path::new("")).unwrap().architecture
    );
    // The resolved config, as a run saves it, parses without reading the file again.
    let saved = parse(&config.to_toml(), "run.toml", &[]).unwrap();
    assert_eq!(saved, config);
    // Without a reader, an unresolved one says so.
    let error = parse(FROM_FILE, "from.toml", &[]).unwrap_err().to_string();
    assert!(
        error.contains("`model.from`") && error.contains("must be read"),
        "{error}"
    );
}

#[test]
fn an_unreadable_model_from_keeps_the_readers_error_under_its_key_and_line() {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}: not a GGUF file")]
    struct NotGguf(PathBuf);
    let reader = |path: &Path| -> Result<ModelSource, ModelSourceError> {
        Err(Box::new(NotGguf(path.to_path_buf())))
    };
    let error = parse_reading(FROM_FILE, "from.toml", &[], Some(&reader)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "from.toml, line 8: `model.from`: models/smollm2.gguf: not a GGUF file"
    );
    let ConfigError::Source { key, source, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(key, "model.from");
    assert_eq!(
        source.downcast_ref::<NotGguf>().map(|e| e.0.as_path()),
        Some(Path::new("models/smollm2.gguf"))
    );
}

#[test]
fn a_field_that_contradicts_model_from_is_an_error_naming_it() {
    let agreeing = parse_reading(
        FROM_FILE,
        "from.toml",
        &["model.num_hidden_layers=30".into()],
        Some(&smollm2_source),
    );
    assert!(agreeing.is_ok());
    for (setting, key) in [
        ("model.num_hidden_layers=4", "model.num_hidden_layers"),
        ("model.rope_theta=10000.0", "model.rope_theta"),
        (
            "model.tie_word_embeddings=false",
            "model.tie_word_embeddings",
        ),
        ("model.preset=\"llama-tiny\"", "model.preset"),
        ("data.tokenizer=\"datasets/other.json\"", "data.tokenizer"),
    ] {
        let error = parse_reading(
            FROM_FILE,
            "from.toml",
            &[setting.into()],
            Some(&smollm2_source),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains(&format!("`{key}`")), "{setting}: {error}");
    }
    let error = parse_reading(
        FROM_FILE,
        "from.toml",
        &["model.num_hidden_layers=4".into()],
        Some(&smollm2_source),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("= 4 contradicts models/smollm2.gguf's 30"),
        "{error}"
    );
}

#[test]
fn a_student_of_a_pretrained_teacher_takes_the_teachers_tokenizer() {
    let student = FROM_FILE.replace(
        "[model]\nfrom = \"models/smollm2.gguf\"",
        "[model]\npreset = \"llama-tiny\"\nvocab_size = 49152\n[teacher]\nfrom = \"models/smollm2.gguf\"",
    );
    let config = parse_reading(&student, "student.toml", &[], Some(&smollm2_source)).unwrap();
    assert_eq!(
        config.data.tokenizer,
        PathBuf::from("models/smollm2.tokenizer/tokenizer.json")
    );
    // A tokenizer the config names stays its own: whether it fits the teacher is the
    // distillation's check, which compares the vocabularies.
    let named = parse_reading(
        &student,
        "student.toml",
        &["data.tokenizer=\"datasets/other.json\"".into()],
        Some(&smollm2_source),
    )
    .unwrap();
    assert_eq!(config.model, named.model);
    assert_eq!(named.data.tokenizer, PathBuf::from("datasets/other.json"));
    let error = parse(&student, "student.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`data.tokenizer`") && error.contains("teacher.from"),
        "{error}"
    );
}

#[test]
fn export_names_parse_as_configs_spell_them_and_others_name_the_choices() {
    for kind in GgufTypeName::ALL {
        assert_eq!(kind.name().parse::<GgufTypeName>(), Ok(kind));
    }
    for format in ExportFormatName::ALL {
        assert_eq!(format.name().parse::<ExportFormatName>(), Ok(format));
    }
    let error = "q5_k".parse::<GgufTypeName>().unwrap_err();
    assert_eq!(
        error,
        UnknownName {
            name: "q5_k".into(),
            choices: vec!["f32", "f16", "q8_0", "q4_0"],
        }
    );
    assert_eq!(
        error.to_string(),
        "\"q5_k\" is not one of f32, f16, q8_0, q4_0"
    );
}

/// The speculative draft's settings are optional, read as written, and checked like the
/// other counts; they do not change the training trajectory.
#[test]
fn generate_section_names_the_draft_and_its_settings() {
    let with_section = format!(
        "{MINIMAL}\n[generate]\ndraft = \"checkpoints/draft-int8-g32\"\ndraft_tokens = 3\n\
         draft_vocabulary = 4096\ndraft_p_min = 0.25\n"
    );
    let config = parse(&with_section, "test.toml", &[]).unwrap();
    let generate = config.generate.clone().unwrap();
    assert_eq!(
        generate.draft.as_deref(),
        Some(Path::new("checkpoints/draft-int8-g32"))
    );
    assert_eq!(
        (generate.draft_tokens, generate.draft_vocabulary),
        (Some(3), Some(4096))
    );
    assert_eq!(generate.adaptive_draft, None);
    assert_eq!(generate.draft_p_min, Some(0.25));
    let plain = parse(MINIMAL, "test.toml", &[]).unwrap();
    assert!(plain.generate.is_none());
    assert_eq!(config.trajectory_sha256(), plain.trajectory_sha256());
    for key in ["generate.draft_tokens", "generate.draft_vocabulary"] {
        let message = error(MINIMAL, &[&format!("{key}=0")]);
        assert!(
            message.contains(key) && message.contains("at least 1"),
            "{message}"
        );
    }
    let message = error(&format!("{MINIMAL}\n[generate]\ndraft_size = 2\n"), &[]);
    assert!(message.contains("draft_size"), "{message}");
}
