//! `distillery quantize`: a run's checkpoint in, a quantized model folder out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use distillery_config::{ExperimentConfig, QuantizeMethod};
use distillery_model::Llama;
use distillery_run::calibration_windows;

use crate::QuantizeError;
use crate::model::{Calibration, MatrixOutcome, Progress, QuantizeOptions, quantize_model};

/// What `distillery quantize` did.
pub struct QuantizeOutcome {
    pub source: PathBuf,
    pub step: usize,
    pub output: PathBuf,
    /// Wall time of the quantization itself (calibration forward passes included; loading and
    /// saving excluded).
    pub seconds: f64,
    pub matrices: Vec<MatrixOutcome>,
    pub label: String,
}

/// The float model to quantize: a run's checkpoint, or a pretrained model's file (a GGUF file,
/// whose blocks are dequantized first, or a Hugging Face folder) that tokenizes as the run does.
fn load_source(
    config: &ExperimentConfig,
    source: &Path,
    tokenizer: &distillery_data::TextTokenizer,
) -> Result<(PathBuf, usize, Llama), QuantizeError> {
    let device = distillery_run::device_for(&config.run).map_err(distillery_run::RunError::from)?;
    if distillery_formats::source::is_gguf(source) {
        let vocabulary = distillery_formats::source::tokenizer_vocabulary(
            &config.data.tokenizer,
            tokenizer.eos_token_id(),
        )?;
        let (_, model) = distillery_formats::source::load_gguf_for(source, &vocabulary, &device)?;
        return Ok((source.to_path_buf(), 0, model.dequantized()));
    }
    if source.join(distillery_formats::hf::CONFIG_FILE).is_file() {
        let theirs = distillery_data::TextTokenizer::load(
            &source.join(distillery_formats::source::TOKENIZER_FILE),
        )?;
        if theirs.sha256() != tokenizer.sha256() {
            return Err(QuantizeError::Settings(format!(
                "{}: another tokenizer than the run's {}",
                source.display(),
                config.data.tokenizer.display()
            )));
        }
        let model = distillery_formats::hf::import(source, &device)?;
        return Ok((source.to_path_buf(), 0, model));
    }
    Ok(distillery_run::load_for_inference(
        config, source, tokenizer,
    )?)
}

/// Quantizes the checkpoint `config`'s `[quantize]` section names (by default the run's best)
/// and saves it under `<checkpoint_dir>/<name>/`, replacing an earlier result of that name.
pub fn quantize_run(
    config: &ExperimentConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantizeOutcome, QuantizeError> {
    let settings = config
        .quantize
        .as_ref()
        .ok_or_else(|| QuantizeError::Settings("the config has no [quantize] section".into()))?;
    let data = distillery_run::prepare_data(config)?;
    // A run that has not trained yet is its pretrained model.
    let source = match (&settings.checkpoint, &config.model.from) {
        (Some(checkpoint), _) => checkpoint.clone(),
        (None, Some(from)) if !config.run_checkpoint_dir().exists() => from.clone(),
        (None, _) => config.run_checkpoint_dir(),
    };
    let (source, step, mut model) = load_source(config, &source, &data.tokenizer)?;
    let options = QuantizeOptions::from(settings);
    let seq_len = settings
        .seqlen
        .unwrap_or(config.data.seq_len)
        .min(model.config().max_position_embeddings);
    let calibration_source = match &settings.calibration {
        Some(path) => path.display().to_string(),
        None => format!("training split of {}", config.data.corpus.display()),
    };
    let calibration = match settings.method {
        QuantizeMethod::Gptq => {
            let tokens = match &settings.calibration {
                Some(path)
                    if path
                        .extension()
                        .is_some_and(|extension| extension == "tokens") =>
                {
                    distillery_data::read_token_cache(path, &data.tokenizer)?
                }
                Some(path) => {
                    distillery_data::load_or_build(
                        &distillery_data::Corpus::text(path),
                        &data.tokenizer,
                        &config.token_cache_dir(),
                    )?
                    .tokens
                }
                None => data.splits.train.to_vec(),
            };
            if tokens.len() <= seq_len {
                return Err(QuantizeError::Settings(format!(
                    "{calibration_source} holds {} tokens, fewer than one calibration window of \
                     {seq_len} + 1",
                    tokens.len()
                )));
            }
            Some(Calibration {
                tokens: calibration_windows(&tokens, settings.nsamples, seq_len, config.run.seed),
                seq_len,
            })
        }
        QuantizeMethod::Int8 | QuantizeMethod::Rtn => None,
    };

    let started = Instant::now();
    let matrices = quantize_model(&mut model, &options, calibration.as_ref(), progress)?;
    let seconds = started.elapsed().as_secs_f64();

    let label = settings.label();
    let output = config
        .run
        .checkpoint_dir
        .join(settings.output_name(&config.run.name));
    let record = serde_json::json!({
        "method": settings.method,
        "label": label,
        "settings": settings,
        "source_checkpoint": source,
        "source_step": step,
        "tokenizer_sha256": data.tokenizer.sha256(),
        "calibration": calibration.as_ref().map(|calibration| serde_json::json!({
            "source": calibration_source,
            "windows": calibration.tokens.len() / seq_len,
            "seq_len": seq_len,
            "seed": config.run.seed,
        })),
        "seconds": seconds,
        "matrices": matrices,
    });
    let gptq_config =
        distillery_formats::quantized::GptqConfig::new(&options.gptq, options.true_sequential);
    let eos = data.tokenizer.eos_token_id();
    let folder = distillery_formats::quantized::QuantizedFolder {
        model: &model,
        tokenizer: &config.data.tokenizer,
        bos_token_id: eos,
        eos_token_id: eos,
        config: &gptq_config,
        record: &record,
    };
    distillery_formats::quantized::save(&folder, &output, true)?;
    Ok(QuantizeOutcome {
        source,
        step,
        output,
        seconds,
        matrices,
        label,
    })
}
