//! `distillery export`: one model to one file format, or every export a config's `[export]`
//! section lists.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use distillery_config::{ExperimentConfig, ExportFormatName, GgufTypeName};
use distillery_data::TextTokenizer;
use distillery_formats::gguf;
use distillery_formats::load::{self, LoadedModel, ModelKind};
use distillery_formats::quantized::{QuantizedFolder, save};
use distillery_quant::GgmlType;

use crate::ConfigArgs;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The experiment config (TOML); without it, the config the checkpoint was trained with
    /// (its run.toml, or for a quantized folder, its source checkpoint's).
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set export.gguf_types='["q4_0"]' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// A checkpoint directory, a run directory (its best checkpoint), a quantized model
    /// folder or a GGUF file.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// hf (a Hugging Face Llama folder), gguf (a file for llama.cpp, the tokenizer
    /// embedded) or gptq (a GPTQ folder of a model `distillery quantize` made).
    #[arg(long)]
    format: Option<ExportFormatName>,
    /// How GGUF stores the weight matrices: f32, f16, q8_0 or q4_0.
    #[arg(long = "type", default_value = "f32")]
    gguf_type: GgufTypeName,
    /// The folder (hf, gptq) or file (gguf) to create.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let config_path = match (args.config, &args.checkpoint) {
        (Some(config), _) => config,
        (None, Some(checkpoint)) => recorded_config(checkpoint)?,
        (None, None) => {
            anyhow::bail!("give the experiment config, or --checkpoint with --format and --out")
        }
    };
    let config = ConfigArgs::new(config_path, args.overrides).load()?;
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    let jobs = match (args.format, args.checkpoint, args.out) {
        (Some(format), Some(checkpoint), Some(out)) => vec![ExportJob {
            source: checkpoint,
            format,
            gguf_type: args.gguf_type,
            out,
            replace: false,
        }],
        (None, None, None) => configured_jobs(&config)?,
        _ => anyhow::bail!(
            "give --checkpoint, --format and --out together, or none of them to export as the \
             config's [export] section says"
        ),
    };
    for job in &jobs {
        let loaded = load::load_model(&config, &job.source, &tokenizer)?;
        let description = export(&config, &tokenizer, &loaded, job)?;
        println!(
            "wrote {} ({description}) from {}",
            job.out.display(),
            loaded.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub struct ExportJob {
    pub source: PathBuf,
    pub format: ExportFormatName,
    pub gguf_type: GgufTypeName,
    pub out: PathBuf,
    /// Replace an earlier output (the config form rewrites its own outputs).
    pub replace: bool,
}

/// The config a model was trained with: a checkpoint's `run.toml`, or for a quantized folder,
/// the one of the checkpoint it was quantized from.
pub fn recorded_config(model: &std::path::Path) -> anyhow::Result<PathBuf> {
    let checkpoint = if distillery_formats::quantized::is_quantized_dir(model) {
        let record_path = model.join(distillery_formats::quantized::RECORD_FILE);
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&record_path)
                .with_context(|| format!("reading {}", record_path.display()))?,
        )
        .with_context(|| format!("parsing {}", record_path.display()))?;
        let Some(source) = record["source_checkpoint"].as_str() else {
            anyhow::bail!(
                "{}: names no source checkpoint; give the experiment config",
                record_path.display()
            );
        };
        PathBuf::from(source)
    } else {
        model.to_path_buf()
    };
    let directory = distillery_run::checkpoint::resolve_checkpoint(&checkpoint)
        .with_context(|| format!("{}: give the experiment config", model.display()))?;
    Ok(directory.join(distillery_run::checkpoint::RUN_CONFIG_FILE))
}

/// The exports of the config's `[export]` section, into `out_dir`: `<run>-hf/`, `<run>-gptq/`
/// and `<run>-<type>.gguf`.
pub fn configured_jobs(config: &ExperimentConfig) -> anyhow::Result<Vec<ExportJob>> {
    let Some(settings) = &config.export else {
        anyhow::bail!(
            "the config has no [export] section; add one, or give --checkpoint, --format and --out"
        );
    };
    let run = &config.run.name;
    let out_dir = settings.out_dir(config);
    let source = settings
        .checkpoint
        .clone()
        .unwrap_or_else(|| config.run_checkpoint_dir());
    let mut jobs = Vec::new();
    for format in &settings.formats {
        match format {
            ExportFormatName::Hf => jobs.push(ExportJob {
                source: source.clone(),
                format: ExportFormatName::Hf,
                gguf_type: GgufTypeName::F32,
                out: out_dir.join(format!("{run}-hf")),
                replace: true,
            }),
            ExportFormatName::Gguf => {
                for &gguf_type in &settings.gguf_types {
                    jobs.push(ExportJob {
                        source: source.clone(),
                        format: ExportFormatName::Gguf,
                        gguf_type,
                        out: out_dir.join(format!("{run}-{}.gguf", gguf_type.name())),
                        replace: true,
                    });
                }
            }
            ExportFormatName::Gptq => {
                let quantized = settings.quantized.clone().or_else(|| {
                    config
                        .quantize
                        .as_ref()
                        .map(|quantize| config.run.checkpoint_dir.join(quantize.output_name(run)))
                });
                let Some(quantized) = quantized else {
                    anyhow::bail!(
                        "`export.formats` lists gptq: set export.quantized to a quantized model \
                         folder, or add the [quantize] section that makes it"
                    );
                };
                jobs.push(ExportJob {
                    source: quantized,
                    format: ExportFormatName::Gptq,
                    gguf_type: GgufTypeName::F32,
                    out: out_dir.join(format!("{run}-gptq")),
                    replace: true,
                });
            }
        }
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(jobs)
}

/// Writes `loaded` as `job` says; returns what was written, in words.
pub fn export(
    config: &ExperimentConfig,
    tokenizer: &TextTokenizer,
    loaded: &LoadedModel,
    job: &ExportJob,
) -> anyhow::Result<&'static str> {
    let model = &loaded.model;
    let eos = tokenizer.eos_token_id();
    let out = &job.out;
    Ok(match job.format {
        ExportFormatName::Hf => {
            distillery_formats::hf::export(
                model,
                &config.data.tokenizer,
                eos,
                eos,
                out,
                job.replace,
            )?;
            "Hugging Face Llama folder"
        }
        ExportFormatName::Gptq => {
            let ModelKind::Quantized {
                config: gptq,
                record,
                ..
            } = &loaded.kind
            else {
                anyhow::bail!(
                    "{}: --format gptq writes a quantized model; make one with \
                     `distillery quantize` and export its folder",
                    loaded.path.display()
                );
            };
            let float_ends = model.packed_embedding().is_some()
                || model
                    .lm_head
                    .as_ref()
                    .is_some_and(|head| head.packed().is_some());
            let exported = model.with_float_embedding_and_head();
            let folder = QuantizedFolder {
                model: &exported,
                tokenizer: &config.data.tokenizer,
                bos_token_id: eos,
                eos_token_id: eos,
                config: gptq,
                record,
            };
            save(&folder, out, job.replace)?;
            if float_ends {
                "GPTQ folder; the quantized embedding and head dequantized to f32, as GPTQ \
                 loaders expect"
            } else {
                "GPTQ folder"
            }
        }
        ExportFormatName::Gguf => {
            let vocabulary = distillery_formats::source::tokenizer_vocabulary(
                &config.data.tokenizer,
                tokenizer.eos_token_id(),
            )?;
            let (kind, description) = match job.gguf_type {
                GgufTypeName::F32 => (GgmlType::F32, "GGUF, f32"),
                GgufTypeName::F16 => (GgmlType::F16, "GGUF, f16 weight matrices"),
                GgufTypeName::Q8_0 => (GgmlType::Q8_0, "GGUF, Q8_0 weight matrices"),
                GgufTypeName::Q4_0 => (GgmlType::Q4_0, "GGUF, Q4_0 weight matrices"),
            };
            if let Some(note) = gguf::requantization_note(model, kind) {
                eprintln!("{note}");
            }
            gguf::export(model, &config.run.name, &vocabulary, kind, out, job.replace)?;
            description
        }
    })
}
