//! Typed TOML experiment configs.
//!
//! A config file is read, `--set key.path=value` overrides are applied to the document, and the
//! result is deserialized into strict serde structs and checked. Every error names the file, the
//! key and, where the document has it, the line.

mod pipeline;
mod presets;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distillery_data::{Corpus, CorpusFormat};
use distillery_model::{LayerMatrix, LlamaConfig};
use distillery_quant::settings::{self, SettingsError};
use sha2::{Digest, Sha256};

pub use pipeline::{PipelineConfig, PipelineSection, StageConfig, StageKind, load_pipeline};
pub use presets::{PRESET_NAMES, preset};
pub use schema::{
    Backend, CheckpointConfig, DataConfig, DistillConfig, DistillLoss, EvalConfig,
    ExperimentConfig, ExportConfig, ExportFormatName, GenerateConfig, GgufTypeName, LogConfig,
    ModelSection, Precision, QuantizeConfig, QuantizeMethod, RunConfig, StudentConfig, StudentInit,
    TeacherCheckpoint, TeacherConfig, TeacherSource, TrainConfig, UnknownName,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}, line {line}: invalid TOML: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("--set {spec}: {reason}")]
    Override { spec: String, reason: String },
    #[error("{origin}{}: `{key}`: {message}", line.map(|line| format!(", line {line}")).unwrap_or_default())]
    Invalid {
        origin: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
    /// The file `model.from` or `teacher.from` names could not be read as a model.
    #[error("{origin}{}: `{key}`: {source}", line.map(|line| format!(", line {line}")).unwrap_or_default())]
    Source {
        origin: String,
        key: String,
        line: Option<usize>,
        source: ModelSourceError,
    },
}

/// A `model.vocab_size` below the tokenizer's vocabulary: some token ids would have no row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model.vocab_size = {vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens")]
pub struct VocabularyTooSmall {
    pub vocab_size: usize,
    pub tokenizer_vocab: usize,
}

/// What a pretrained model's file (`model.from`) says about the run: its architecture and where
/// its tokenizer lies as a `tokenizer.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub architecture: LlamaConfig,
    pub tokenizer: PathBuf,
}

/// The error of a [`ModelSourceReader`], kept whole as the [`ConfigError::Source`] of the key
/// that names the file.
pub type ModelSourceError = Box<dyn std::error::Error + Send + Sync>;

/// Reads a `model.from` path.
pub type ModelSourceReader<'a> = &'a dyn Fn(&Path) -> Result<ModelSource, ModelSourceError>;

/// Why a key naming a model file is refused: what is wrong with the key, or the reader's error.
enum SourceFault {
    Invalid(String, String),
    Unreadable(&'static str, ModelSourceError),
}

/// Calls the macro `$callback` with every architecture field of `[model]` that a preset and a
/// model file both give.
macro_rules! with_shape_fields {
    ($callback:ident) => {
        $callback!(
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings
        )
    };
}

/// Reads a config file and applies `overrides` (`key.path=value`, the value in TOML syntax, or a
/// bare string). A config whose `model.from` still has to be read needs [`load_reading`].
pub fn load(path: &Path, overrides: &[String]) -> Result<ExperimentConfig, ConfigError> {
    load_reading(path, overrides, None)
}

/// [`load`], with `reader` for the file `model.from` names.
pub fn load_reading(
    path: &Path,
    overrides: &[String],
    reader: Option<ModelSourceReader>,
) -> Result<ExperimentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_reading(&text, &path.display().to_string(), overrides, reader)
}

/// Parses config text; `origin` names it in errors.
pub fn parse(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<ExperimentConfig, ConfigError> {
    parse_reading(text, origin, overrides, None)
}

/// [`parse`], with `reader` for the file `model.from` names.
pub fn parse_reading(
    text: &str,
    origin: &str,
    overrides: &[String],
    reader: Option<ModelSourceReader>,
) -> Result<ExperimentConfig, ConfigError> {
    let mut document: toml_edit::DocumentMut =
        text.parse()
            .map_err(|error: toml_edit::TomlError| ConfigError::Syntax {
                origin: origin.to_string(),
                line: error.span().map_or(1, |span| line_of(text, span.start)),
                message: error.message().to_string(),
            })?;
    let mut overridden = BTreeMap::new();
    for spec in overrides {
        let key = apply_override(&mut document, spec)?;
        overridden.insert(key, spec.clone());
    }
    let original = text;
    let text = document.to_string();
    // Lines are looked up in the file as written: applying overrides can move keys around.
    let locate = |key: &str| -> (String, Option<usize>) {
        match overridden.get(key) {
            Some(spec) => (format!("{origin} (--set {spec})"), None),
            None => (origin.to_string(), key_line(original, key)),
        }
    };

    let deserializer = toml::Deserializer::parse(&text).map_err(|error| ConfigError::Syntax {
        origin: origin.to_string(),
        line: error.span().map_or(1, |span| line_of(&text, span.start)),
        message: error.message().to_string(),
    })?;
    let mut config: ExperimentConfig =
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let key = error.path().to_string();
            let inner = error.into_inner();
            let (origin, line) = locate(&key);
            ConfigError::Invalid {
                origin,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                line,
                message: inner.message().to_string(),
            }
        })?;

    let invalid = |(key, message): (String, String)| {
        let (origin, line) = locate(&key);
        ConfigError::Invalid {
            origin,
            key,
            line,
            message,
        }
    };
    resolve_preset(&mut config.model).map_err(invalid)?;
    resolve_source(&mut config, reader).map_err(|fault| match fault {
        SourceFault::Invalid(key, message) => invalid((key, message)),
        SourceFault::Unreadable(key, source) => {
            let (origin, line) = locate(key);
            ConfigError::Source {
                origin,
                key: key.to_string(),
                line,
                source,
            }
        }
    })?;
    validate(&config).map_err(invalid)?;
    Ok(config)
}

/// Fills the model fields and the tokenizer from `model.from`'s file. A field the config also
/// sets must agree with the file; a config saved with a run already holds them all and needs no
/// reader.
fn resolve_source(
    config: &mut ExperimentConfig,
    reader: Option<ModelSourceReader>,
) -> Result<(), SourceFault> {
    let Some(from) = config.model.from.clone() else {
        return resolve_teacher_tokenizer(config, reader);
    };
    let fail = |key: &str, message: String| Err(SourceFault::Invalid(key.to_string(), message));
    if config.model.preset.is_some() {
        return fail(
            "model.preset",
            "and model.from both give the architecture; keep one".into(),
        );
    }
    let Some(reader) = reader else {
        // Without the file, only a config that states every shape field (as a resolved config
        // written beside a run does) is complete: a default must never stand in for the file.
        macro_rules! all_stated {
            ($($field:ident),*) => { true $(&& config.model.$field.is_some())* };
        }
        let complete = with_shape_fields!(all_stated);
        if complete && !config.data.tokenizer.as_os_str().is_empty() {
            return Ok(());
        }
        return fail(
            "model.from",
            format!("{} must be read to resolve the config", from.display()),
        );
    };
    let source = reader(&from).map_err(|source| SourceFault::Unreadable("model.from", source))?;
    let file = source.architecture;
    let model = &mut config.model;
    macro_rules! agree {
        ($($field:ident),*) => {
            $(
                match model.$field {
                    Some(value) if value != file.$field => {
                        return fail(
                            concat!("model.", stringify!($field)),
                            format!("= {value} contradicts {}'s {}", from.display(), file.$field),
                        );
                    }
                    _ => model.$field = Some(file.$field),
                }
            )*
        };
    }
    with_shape_fields!(agree);
    match &model.rope_scaling {
        Some(scaling) if Some(scaling) != file.rope_scaling.as_ref() => {
            return fail(
                "model.rope_scaling",
                format!(
                    "= {scaling:?} contradicts {}'s {:?}",
                    from.display(),
                    file.rope_scaling
                ),
            );
        }
        _ => model.rope_scaling = file.rope_scaling,
    }
    let data = &mut config.data;
    if data.tokenizer.as_os_str().is_empty() {
        data.tokenizer = source.tokenizer;
    } else if !same_file(&data.tokenizer, &source.tokenizer) {
        return fail(
            "data.tokenizer",
            format!(
                "= {} is not the tokenizer of model.from ({}); leave data.tokenizer out or name \
                 that file",
                data.tokenizer.display(),
                source.tokenizer.display()
            ),
        );
    }
    Ok(())
}

/// A student of a pretrained teacher (`teacher.from`) speaks the teacher's tokenizer: without a
/// `data.tokenizer` of its own it takes the teacher file's, so a student config needs no path
/// that only exists once the teacher has been read.
fn resolve_teacher_tokenizer(
    config: &mut ExperimentConfig,
    reader: Option<ModelSourceReader>,
) -> Result<(), SourceFault> {
    let teacher_file = config
        .teacher
        .as_ref()
        .and_then(|teacher| teacher.from.clone());
    let (Some(from), Some(reader)) = (teacher_file, reader) else {
        return Ok(());
    };
    if !config.data.tokenizer.as_os_str().is_empty() {
        return Ok(());
    }
    let source = reader(&from).map_err(|source| SourceFault::Unreadable("teacher.from", source))?;
    config.data.tokenizer = source.tokenizer;
    Ok(())
}

/// Whether two paths name the same file or folder: compared as resolved when both exist, as
/// written otherwise.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn apply_override(
    document: &mut toml_edit::DocumentMut,
    spec: &str,
) -> Result<String, ConfigError> {
    let fail = |reason: String| ConfigError::Override {
        spec: spec.to_string(),
        reason,
    };
    let (key, raw_value) = spec
        .split_once('=')
        .ok_or_else(|| fail("expected KEY=VALUE, e.g. train.lr=3e-4".into()))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|part| part.is_empty()) {
        return Err(fail(format!("`{key}` is not a dotted key path")));
    }
    let raw_value = raw_value.trim();
    let value: toml_edit::Value = raw_value
        .parse()
        .unwrap_or_else(|_| toml_edit::Value::from(raw_value));
    let (last, parents) = path.split_last().expect("path has at least one part");
    let mut table = document.as_table_mut() as &mut dyn toml_edit::TableLike;
    for (depth, part) in parents.iter().enumerate() {
        let entry = table
            .entry(part)
            .or_insert(toml_edit::Item::Table(toml_edit::Table::new()));
        table = entry.as_table_like_mut().ok_or_else(|| {
            fail(format!(
                "`{}` is a value, not a table",
                path[..=depth].join(".")
            ))
        })?;
    }
    table.insert(last, toml_edit::Item::Value(value));
    Ok(path.join("."))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The line where `key` (dotted) is written, when the document has it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let document: toml_edit::Document<&str> = toml_edit::Document::parse(text).ok()?;
    let mut item = document.as_item();
    for part in key.split('.') {
        item = item.get(part)?;
    }
    let span = item.span()?;
    Some(line_of(text, span.start))
}

/// Fills the model fields a preset defines and the config leaves out.
fn resolve_preset(model: &mut ModelSection) -> Result<(), (String, String)> {
    let Some(name) = model.preset.clone() else {
        return Ok(());
    };
    let preset = preset(&name).ok_or_else(|| {
        (
            "model.preset".to_string(),
            format!(
                "unknown preset \"{name}\", expected one of {}",
                PRESET_NAMES.join(", ")
            ),
        )
    })?;
    macro_rules! fill {
        ($($field:ident),*) => {
            $( model.$field = model.$field.or(preset.$field); )*
        };
    }
    with_shape_fields!(fill);
    Ok(())
}

fn validate(config: &ExperimentConfig) -> Result<(), (String, String)> {
    let fail = |key: &str, message: String| Err((key.to_string(), message));
    let name = &config.run.name;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return fail(
            "run.name",
            format!("\"{name}\" must be a plain directory name (no slashes)"),
        );
    }
    let data = &config.data;
    if data.tokenizer.as_os_str().is_empty() {
        return fail(
            "data.tokenizer",
            "is required (a tokenizer.json), unless model.from or teacher.from names a model that \
             has one"
                .into(),
        );
    }
    if data.text_field.is_some() && data.format != CorpusFormat::Jsonl {
        return fail(
            "data.text_field",
            "only applies with data.format = \"jsonl\"".into(),
        );
    }
    if !(data.validation_fraction > 0.0 && data.validation_fraction < 1.0) {
        return fail(
            "data.validation_fraction",
            format!("must be in (0, 1), got {}", data.validation_fraction),
        );
    }
    let positive_counts = [
        ("data.seq_len", data.seq_len),
        ("train.steps", config.train.steps),
        ("train.batch_size", config.train.batch_size),
        ("train.grad_accum", config.train.grad_accum),
        ("eval.every", config.eval.every),
        ("checkpoint.every", config.checkpoint.every),
        ("checkpoint.keep", config.checkpoint.keep),
        ("log.every", config.log.every),
    ];
    for (key, value) in positive_counts {
        if value == 0 {
            return fail(key, "must be at least 1".into());
        }
    }
    let generate = config.generate.clone().unwrap_or_default();
    for (key, value) in [
        ("eval.batch_size", config.eval.batch_size),
        ("eval.max_windows", config.eval.max_windows),
        ("generate.draft_tokens", generate.draft_tokens),
        ("generate.draft_vocabulary", generate.draft_vocabulary),
    ] {
        if value == Some(0) {
            return fail(key, "must be at least 1".into());
        }
    }

    let train = &config.train;
    if !(train.lr.is_finite() && train.lr > 0.0) {
        return fail("train.lr", format!("must be positive, got {}", train.lr));
    }
    if !(train.min_lr >= 0.0 && train.min_lr <= train.lr) {
        return fail(
            "train.min_lr",
            format!(
                "must be in [0, train.lr = {}], got {}",
                train.lr, train.min_lr
            ),
        );
    }
    if train.warmup_steps > train.steps {
        return fail(
            "train.warmup_steps",
            format!(
                "{} is more than train.steps = {}",
                train.warmup_steps, train.steps
            ),
        );
    }
    if !(train.weight_decay.is_finite() && train.weight_decay >= 0.0) {
        return fail(
            "train.weight_decay",
            format!("must be >= 0, got {}", train.weight_decay),
        );
    }
    for (key, beta) in [("train.beta1", train.beta1), ("train.beta2", train.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return fail(key, format!("must be in [0, 1), got {beta}"));
        }
    }
    if !(train.eps.is_finite() && train.eps > 0.0) {
        return fail("train.eps", format!("must be positive, got {}", train.eps));
    }
    if let Some(clip) = train.grad_clip
        && !(clip.is_finite() && clip > 0.0)
    {
        return fail("train.grad_clip", format!("must be positive, got {clip}"));
    }

    let model = &config.model;
    if !(model.dropout.is_finite() && (0.0..1.0).contains(&model.dropout)) {
        return fail(
            "model.dropout",
            format!("must be in [0, 1), got {}", model.dropout),
        );
    }
    let required = [
        ("hidden_size", model.hidden_size),
        ("intermediate_size", model.intermediate_size),
        ("num_hidden_layers", model.num_hidden_layers),
        ("num_attention_heads", model.num_attention_heads),
        ("max_position_embeddings", model.max_position_embeddings),
    ];
    for (field, value) in required {
        if value.is_none() {
            return fail(
                &format!("model.{field}"),
                "is required (set it, or choose a model.preset)".into(),
            );
        }
    }
    let shape = model_config(model, model.vocab_size.unwrap_or(1))
        .expect("required model fields were checked");
    if let Err(distillery_model::ModelError::InvalidConfig { field, reason }) = shape.validate() {
        return fail(&format!("model.{field}"), reason);
    }
    if data.seq_len > shape.max_position_embeddings {
        return fail(
            "data.seq_len",
            format!(
                "{} is longer than model.max_position_embeddings = {}",
                data.seq_len, shape.max_position_embeddings
            ),
        );
    }
    validate_distillation(config, shape.num_hidden_layers)?;
    match &config.quantize {
        Some(quantize) => validate_quantize(quantize, &shape, data.seq_len),
        None => Ok(()),
    }
}

fn validate_quantize(
    quantize: &QuantizeConfig,
    shape: &LlamaConfig,
    seq_len: usize,
) -> Result<(), (String, String)> {
    let fail = |key: &str, message: String| Err((key.to_string(), message));
    if let (QuantizeMethod::Int8, Some(bits)) = (quantize.method, quantize.bits)
        && bits != 8
    {
        return fail("quantize.bits", format!("is always 8 for int8, got {bits}"));
    }
    let bits = quantize.bits();
    if let Err(error) = settings::check_bits(bits) {
        return fail("quantize.bits", error.to_string());
    }
    if let Some(size) = quantize.group_size
        && (size == 0 || size < -1)
    {
        return fail(
            "quantize.group_size",
            format!("must be -1 (whole rows) or a positive column count, got {size}"),
        );
    }
    if quantize.method != QuantizeMethod::Gptq {
        for (key, set) in [
            ("quantize.act_order", quantize.act_order),
            ("quantize.static_groups", quantize.static_groups),
            ("quantize.calibration", quantize.calibration.is_some()),
        ] {
            if set {
                return fail(key, "only applies to method = \"gptq\"".into());
            }
        }
    }
    if quantize.method == QuantizeMethod::Int8 && quantize.clip_search {
        return fail(
            "quantize.clip_search",
            "only applies to method = \"rtn\" or \"gptq\" (int8 is absmax by definition)".into(),
        );
    }
    if !(quantize.damp_percent > 0.0 && quantize.damp_percent <= 1.0) {
        return fail(
            "quantize.damp_percent",
            format!("must be in (0, 1], got {}", quantize.damp_percent),
        );
    }
    for (key, value) in [
        ("quantize.block_size", quantize.block_size),
        ("quantize.nsamples", quantize.nsamples),
        ("quantize.seqlen", quantize.seqlen.unwrap_or(seq_len)),
    ] {
        if value == 0 {
            return fail(key, "must be at least 1".into());
        }
    }
    if let Some(seqlen) = quantize.seqlen
        && seqlen > shape.max_position_embeddings
    {
        return fail(
            "quantize.seqlen",
            format!(
                "{seqlen} is longer than model.max_position_embeddings = {}",
                shape.max_position_embeddings
            ),
        );
    }
    if quantize.quantize_lm_head && shape.tie_word_embeddings {
        return fail(
            "quantize.quantize_lm_head",
            "the output projection is tied to the embedding; set quantize_embeddings instead"
                .into(),
        );
    }
    if let Some(name) = &quantize.name
        && (name.is_empty() || name.contains(['/', '\\']) || name == "." || name == "..")
    {
        return fail(
            "quantize.name",
            format!("\"{name}\" must be a plain directory name (no slashes)"),
        );
    }
    // The vocabulary's width is checked when the model is quantized: it comes from the
    // tokenizer.
    for matrix in LayerMatrix::ALL {
        let (inputs, outputs) = matrix.shape(shape);
        if let Err(error) = settings::check_storable(bits, quantize.group_size(), inputs, outputs) {
            let key = match error {
                SettingsError::EmptyGroup | SettingsError::GroupWiderThanInputs { .. } => {
                    "quantize.group_size"
                }
                SettingsError::UnsupportedBits(_) | SettingsError::NotWholeWords { .. } => {
                    "quantize.bits"
                }
            };
            return fail(key, format!("{}: {error}", matrix.path()));
        }
    }
    Ok(())
}

fn validate_distillation(
    config: &ExperimentConfig,
    student_layers: usize,
) -> Result<(), (String, String)> {
    let fail = |key: &str, message: String| Err((key.to_string(), message));
    if config.teacher.is_none() {
        for (section, present) in [
            ("distill", config.distill.is_some()),
            ("student", config.student.is_some()),
        ] {
            if present {
                return fail(
                    section,
                    "only applies to distillation; add a [teacher] section".into(),
                );
            }
        }
    }
    if let Some(teacher) = &config.teacher {
        let sources = [&teacher.checkpoint, &teacher.from, &teacher.hf_dir];
        if sources.iter().filter(|source| source.is_some()).count() != 1 {
            return fail(
                "teacher",
                "set exactly one of teacher.checkpoint (a distillery run or checkpoint), \
                 teacher.from (a GGUF file or a Hugging Face Llama folder) and teacher.hf_dir \
                 (a Hugging Face Llama folder)"
                    .into(),
            );
        }
    }
    if let Some(distill) = &config.distill {
        if !(distill.temperature.is_finite() && distill.temperature > 0.0) {
            return fail(
                "distill.temperature",
                format!("must be positive, got {}", distill.temperature),
            );
        }
        if !(0.0..=1.0).contains(&distill.alpha) {
            return fail(
                "distill.alpha",
                format!("must be in [0, 1], got {}", distill.alpha),
            );
        }
        if distill.top_k == 0 {
            return fail("distill.top_k", "must be at least 1".into());
        }
        if !(distill.beta > 0.0 && distill.beta < 1.0) {
            return fail(
                "distill.beta",
                format!("must be in (0, 1), got {}", distill.beta),
            );
        }
    }
    if let Some(student) = &config.student {
        match (student.init, &student.teacher_layers) {
            (StudentInit::Random, Some(_)) => {
                return fail(
                    "student.teacher_layers",
                    "only applies with student.init = \"from_teacher\"".into(),
                );
            }
            (StudentInit::FromTeacher, Some(layers)) if layers.len() != student_layers => {
                return fail(
                    "student.teacher_layers",
                    format!(
                        "lists {} layers; the student has {student_layers}",
                        layers.len()
                    ),
                );
            }
            _ => {}
        }
    }
    Ok(())
}

fn model_config(model: &ModelSection, vocab_size: usize) -> Option<LlamaConfig> {
    let num_attention_heads = model.num_attention_heads?;
    Some(LlamaConfig {
        vocab_size,
        hidden_size: model.hidden_size?,
        intermediate_size: model.intermediate_size?,
        num_hidden_layers: model.num_hidden_layers?,
        num_attention_heads,
        num_key_value_heads: model.num_key_value_heads.unwrap_or(num_attention_heads),
        max_position_embeddings: model.max_position_embeddings?,
        rms_norm_eps: model.rms_norm_eps.unwrap_or(1e-5),
        rope_theta: model.rope_theta.unwrap_or(10000.0),
        tie_word_embeddings: model.tie_word_embeddings.unwrap_or(false),
        rope_scaling: model.rope_scaling.clone(),
    })
}

impl ExperimentConfig {
    /// The model architecture for a tokenizer of `tokenizer_vocab` tokens. An explicit
    /// `model.vocab_size` may pad the vocabulary beyond the tokenizer's, never shrink it.
    pub fn llama_config(&self, tokenizer_vocab: usize) -> Result<LlamaConfig, VocabularyTooSmall> {
        let vocab_size = match self.model.vocab_size {
            Some(size) if size < tokenizer_vocab => {
                return Err(VocabularyTooSmall {
                    vocab_size: size,
                    tokenizer_vocab,
                });
            }
            Some(size) => size,
            None => tokenizer_vocab,
        };
        Ok(model_config(&self.model, vocab_size).expect("validated at load"))
    }

    /// Checks that the input files the config names exist; `origin` names the config in the
    /// error.
    pub fn check_inputs(&self, origin: &str) -> Result<(), ConfigError> {
        let calibration = self
            .quantize
            .as_ref()
            .and_then(|quantize| quantize.calibration.as_ref());
        for (key, path) in [
            ("data.corpus", Some(&self.data.corpus)),
            ("data.tokenizer", Some(&self.data.tokenizer)),
            ("quantize.calibration", calibration),
        ]
        .into_iter()
        .filter_map(|(key, path)| Some((key, path?)))
        {
            if !path.is_file() {
                return Err(ConfigError::Invalid {
                    origin: origin.to_string(),
                    key: key.to_string(),
                    line: None,
                    message: format!("file {} does not exist", path.display()),
                });
            }
        }
        Ok(())
    }

    pub fn run_checkpoint_dir(&self) -> PathBuf {
        self.run.checkpoint_dir.join(&self.run.name)
    }

    pub fn run_experiment_dir(&self) -> PathBuf {
        self.run.experiment_dir.join(&self.run.name)
    }

    /// The corpus and how to read it.
    pub fn corpus(&self) -> Corpus {
        Corpus {
            path: self.data.corpus.clone(),
            format: self.data.format,
            text_field: self
                .data
                .text_field
                .clone()
                .unwrap_or_else(|| "text".into()),
        }
    }

    pub fn token_cache_dir(&self) -> PathBuf {
        self.data
            .cache_dir
            .clone()
            .unwrap_or_else(|| match self.data.corpus.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            })
    }

    pub fn eval_batch_size(&self) -> usize {
        self.eval.batch_size.unwrap_or(self.train.batch_size)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configs serialize to TOML")
    }

    /// The settings that decide the trained weights: seed, backend, precision, data, model and
    /// optimization. Logging, evaluation and checkpoint cadence are not among them.
    fn trajectory(&self) -> BTreeMap<String, String> {
        let value = toml::Value::try_from(self).expect("configs serialize to TOML");
        let mut flat = BTreeMap::new();
        flatten("", &value, &mut flat);
        flat.retain(|key, _| {
            ["run.seed", "run.backend", "run.dtype"].contains(&key.as_str())
                || [
                    "data.", "model.", "train.", "teacher.", "distill.", "student.",
                ]
                .iter()
                .any(|section| key.starts_with(section))
        });
        flat
    }

    /// A hash of [the settings that decide the weights](Self::trajectory), recorded with each
    /// checkpoint.
    pub fn trajectory_sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for (key, value) in self.trajectory() {
            hasher.update(key.as_bytes());
            hasher.update(b"=");
            hasher.update(value.as_bytes());
            hasher.update(b"\n");
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The weight-deciding settings that differ, as `key: this -> other`.
    pub fn trajectory_differences(&self, other: &ExperimentConfig) -> Vec<String> {
        let mine = self.trajectory();
        let theirs = other.trajectory();
        let keys: std::collections::BTreeSet<&String> = mine.keys().chain(theirs.keys()).collect();
        keys.into_iter()
            .filter(|key| mine.get(*key) != theirs.get(*key))
            .map(|key| {
                let show = |value: Option<&String>| value.map_or("(unset)", |v| v).to_string();
                format!(
                    "{key}: {} -> {}",
                    show(mine.get(key)),
                    show(theirs.get(key))
                )
            })
            .collect()
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests;
