//! Hugging Face Llama folders: `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), tensors named as `transformers` names them, linear weights
//! in `[out, in]` layout. distillery's model uses the same rotate-half rotary layout, so q and k
//! rows need no permutation here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use distillery_model::{Linear, Llama, LlamaConfig, RopeScaling};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::assembly::ModelAssembly;
use crate::names::hf_name;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct HfError {
    pub path: PathBuf,
    pub message: String,
}

pub(crate) fn error(path: &Path, message: impl Into<String>) -> HfError {
    HfError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Keys of a Hugging Face `config.json` that change nothing distillery computes: bookkeeping,
/// token ids, training-only settings and generation defaults.
const INERT_KEYS: [&str; 52] = [
    "architectures",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "pretraining_tp",
    "is_llama_config",
    "transformers.js_config",
    "tokenizer_class",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tie_encoder_decoder",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "chunk_size_feed_forward",
    "pruned_heads",
    "problem_type",
    "id2label",
    "label2id",
    "task_specific_params",
    "finetuning_task",
    "prefix",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
];

/// Reads a Hugging Face Llama `config.json`, as transformers 4 and 5 write it. Every key must
/// be understood: one that changes the model in a way distillery does not implement, or that
/// it does not know, is an error naming it.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, HfError> {
    read_config_file(dir, false)
}

/// [`read_config`] of a quantized folder, whose `quantization_config` its own reader checks.
pub(crate) fn read_quantized_config(dir: &Path) -> Result<LlamaConfig, HfError> {
    read_config_file(dir, true)
}

fn read_config_file(dir: &Path, quantized: bool) -> Result<LlamaConfig, HfError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| error(&path, e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| error(&path, format!("not JSON: {e}")))?;
    parse_config_of(&json, quantized).map_err(|message| error(&path, message))
}

/// The architecture a `config.json` describes (of a quantized model when `quantized`); the
/// message names the key at fault.
fn parse_config_of(json: &serde_json::Value, quantized: bool) -> Result<LlamaConfig, String> {
    let Some(fields) = json.as_object() else {
        return Err("is not a JSON object".into());
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut get = |key: &'static str| {
        seen.push(key);
        fields.get(key).filter(|value| !value.is_null())
    };
    let count = |key: &str, value: Option<&serde_json::Value>| -> Result<Option<usize>, String> {
        value
            .map(|value| {
                value
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| format!("`{key}` = {value} is not a count"))
            })
            .transpose()
    };
    let number = |key: &str, value: Option<&serde_json::Value>| -> Result<Option<f64>, String> {
        value
            .map(|value| {
                value
                    .as_f64()
                    .ok_or_else(|| format!("`{key}` = {value} is not a number"))
            })
            .transpose()
    };
    let flag = |key: &str, value: Option<&serde_json::Value>| -> Result<Option<bool>, String> {
        value
            .map(|value| {
                value
                    .as_bool()
                    .ok_or_else(|| format!("`{key}` = {value} is not true or false"))
            })
            .transpose()
    };
    let required =
        |key: &str, value: Option<usize>| value.ok_or_else(|| format!("`{key}` is missing"));
    match get("model_type") {
        None => {}
        Some(kind) if *kind == "llama" => {}
        Some(other) => return Err(format!("`model_type` {other} is not supported (llama)")),
    }
    if let Some(act) = get("hidden_act")
        && *act != "silu"
    {
        return Err(format!("`hidden_act` {act} is not supported (silu)"));
    }
    for key in ["attention_bias", "mlp_bias", "rope_interleaved"] {
        if flag(key, get(key))? == Some(true) {
            return Err(format!("`{key}` = true is not supported"));
        }
    }
    if let Some(quantization) = get("quantization_config")
        && !quantized
    {
        return Err(format!(
            "`quantization_config` = {quantization}: a quantized folder is read as one (GPTQ \
             layout); other quantization formats are not supported"
        ));
    }
    let num_attention_heads = required(
        "num_attention_heads",
        count("num_attention_heads", get("num_attention_heads"))?,
    )?;
    let hidden_size = required("hidden_size", count("hidden_size", get("hidden_size"))?)?;
    if let Some(head_dim) = count("head_dim", get("head_dim"))?
        && head_dim.checked_mul(num_attention_heads) != Some(hidden_size)
    {
        return Err(format!(
            "`head_dim` {head_dim} other than hidden_size / num_attention_heads is not supported"
        ));
    }
    let (rope_theta, rope_scaling) = rope(
        get("rope_theta"),
        get("rope_scaling"),
        get("rope_parameters"),
    )?;
    let config = LlamaConfig {
        vocab_size: required("vocab_size", count("vocab_size", get("vocab_size"))?)?,
        hidden_size,
        intermediate_size: required(
            "intermediate_size",
            count("intermediate_size", get("intermediate_size"))?,
        )?,
        num_hidden_layers: required(
            "num_hidden_layers",
            count("num_hidden_layers", get("num_hidden_layers"))?,
        )?,
        num_attention_heads,
        num_key_value_heads: count("num_key_value_heads", get("num_key_value_heads"))?
            .unwrap_or(num_attention_heads),
        max_position_embeddings: required(
            "max_position_embeddings",
            count("max_position_embeddings", get("max_position_embeddings"))?,
        )?,
        rms_norm_eps: number("rms_norm_eps", get("rms_norm_eps"))?
            .ok_or("`rms_norm_eps` is missing")?,
        rope_theta,
        tie_word_embeddings: flag("tie_word_embeddings", get("tie_word_embeddings"))?
            .unwrap_or(false),
        rope_scaling,
    };
    let not_understood = fields.iter().find(|(key, value)| {
        !seen.contains(&key.as_str()) && !INERT_KEYS.contains(&key.as_str()) && !value.is_null()
    });
    if let Some((key, value)) = not_understood {
        return Err(format!(
            "`{key}` = {value} is not understood by distillery and may change the model"
        ));
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The rotary base and scaling from transformers 4's `rope_theta` and `rope_scaling`, or
/// transformers 5's `rope_parameters`; every place that states the base or the scaling must
/// agree with every other.
fn rope(
    theta: Option<&serde_json::Value>,
    scaling: Option<&serde_json::Value>,
    parameters: Option<&serde_json::Value>,
) -> Result<(f64, Option<RopeScaling>), String> {
    let mut thetas = Vec::new();
    if let Some(value) = theta {
        let theta = value
            .as_f64()
            .ok_or_else(|| format!("`rope_theta` = {value} is not a number"))?;
        thetas.push(("rope_theta".to_string(), theta));
    }
    let mut scalings = Vec::new();
    for (key, table) in [("rope_scaling", scaling), ("rope_parameters", parameters)] {
        if let Some(table) = table.filter(|table| !table.is_null()) {
            let (theta, scaling) = rope_table(key, table)?;
            if let Some(theta) = theta {
                thetas.push((format!("{key}.rope_theta"), theta));
            }
            scalings.push((key, scaling));
        }
    }
    if let Some(((a_key, a), (b_key, b))) = thetas
        .iter()
        .zip(thetas.iter().skip(1))
        .find(|((_, a), (_, b))| a != b)
    {
        return Err(format!("`{a_key}` = {a} and `{b_key}` = {b} disagree"));
    }
    if let [(a_key, a), (b_key, b)] = scalings.as_slice()
        && a != b
    {
        return Err(format!(
            "`{a_key}` and `{b_key}` disagree: {a:?} against {b:?}"
        ));
    }
    Ok((
        thetas.first().map_or(10000.0, |(_, theta)| *theta),
        scalings.into_iter().next().and_then(|(_, scaling)| scaling),
    ))
}

/// A `rope_scaling` or `rope_parameters` table: the rotary base it states, and its scaling
/// (`None` for plain rotary embeddings).
fn rope_table(
    key: &str,
    value: &serde_json::Value,
) -> Result<(Option<f64>, Option<RopeScaling>), String> {
    let Some(table) = value.as_object() else {
        return Err(format!("`{key}` = {value} is not a table"));
    };
    // transformers 4 wrote the type as `type`, later as `rope_type`; both may be present.
    let mut kinds = Vec::new();
    for field in ["rope_type", "type"] {
        if let Some(kind) = table.get(field) {
            let kind = kind
                .as_str()
                .ok_or_else(|| format!("`{key}.{field}` = {kind} is not a string"))?;
            kinds.push(kind);
        }
    }
    if let [a, b] = kinds.as_slice()
        && a != b
    {
        return Err(format!(
            "`{key}.rope_type` = \"{a}\" and `{key}.type` = \"{b}\" disagree"
        ));
    }
    let kind = kinds.first().copied().unwrap_or("default");
    let number = |field: &str| -> Result<f64, String> {
        table
            .get(field)
            .and_then(|value| value.as_f64())
            .ok_or_else(|| format!("`{key}.{field}` is missing or not a number"))
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => {
            let field = "original_max_position_embeddings";
            let original = table
                .get(field)
                .and_then(|value| value.as_u64())
                .and_then(|value| usize::try_from(value).ok())
                .ok_or_else(|| format!("`{key}.{field}` is missing or not a whole number"))?;
            Some(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: original,
            })
        }
        other => {
            return Err(format!(
                "`{key}` of rope_type \"{other}\" is not supported (default, linear, llama3)"
            ));
        }
    };
    let known: &[&str] = match kind {
        "default" => &["rope_type", "type", "rope_theta"],
        "linear" => &["rope_type", "type", "rope_theta", "factor"],
        _ => &[
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
    };
    if let Some(field) = table.keys().find(|field| !known.contains(&field.as_str())) {
        return Err(format!(
            "`{key}.{field}` is not understood by distillery and may change the model"
        ));
    }
    let theta = table
        .get("rope_theta")
        .map(|value| {
            value
                .as_f64()
                .ok_or_else(|| format!("`{key}.rope_theta` = {value} is not a number"))
        })
        .transpose()?;
    Ok((theta, scaling))
}

/// `config.json` for `config` as `transformers` writes it for `LlamaForCausalLM`.
pub fn config_json(
    config: &LlamaConfig,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> Result<String, String> {
    if let Some(RopeScaling::Factors { .. }) = config.rope_scaling {
        return Err(
            "the model's rotary frequencies are scaled by a table of per-pair factors (a GGUF \
             `rope_freqs.weight`), which a transformers config cannot express; export it as GGUF"
                .into(),
        );
    }
    let mut value = serde_json::to_value(config).expect("configs serialize");
    let object = value.as_object_mut().expect("an object");
    object.insert(
        "architectures".into(),
        serde_json::json!(["LlamaForCausalLM"]),
    );
    object.insert("model_type".into(), "llama".into());
    object.insert("hidden_act".into(), "silu".into());
    object.insert("attention_bias".into(), false.into());
    object.insert("mlp_bias".into(), false.into());
    object.insert("torch_dtype".into(), "float32".into());
    object.insert("bos_token_id".into(), bos_token_id.into());
    object.insert("eos_token_id".into(), eos_token_id.into());
    Ok(serde_json::to_string_pretty(&value).expect("json serializes"))
}

/// A tensor in Hugging Face layout: name, shape and little-endian f32 values.
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn tensor_values<const D: usize>(tensor: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = tensor.dims().to_vec();
    let values = tensor
        .into_data()
        .try_into_vec::<f32>()
        .expect("parameters are f32");
    (shape, values)
}

/// Every parameter of `model` under its Hugging Face name, in Hugging Face layout.
pub fn hf_tensors(model: &Llama) -> Vec<HfTensor> {
    let mut tensors = Vec::new();
    let mut push = |path: String, (shape, values): (Vec<usize>, Vec<f32>)| {
        tensors.push(HfTensor {
            name: hf_name(&path).expect("every parameter has a Hugging Face name"),
            shape,
            values,
        });
    };
    // Linear weights are `[in, out]` in burn, `[out, in]` in transformers.
    let linear = |linear: &Linear| {
        (
            vec![linear.d_output(), linear.d_input()],
            linear.weight_out_in(),
        )
    };
    let norm = |gamma: &Param<Tensor<1>>| tensor_values(gamma.val());
    let config = model.config();
    push(
        "embed_tokens".into(),
        (
            vec![config.vocab_size, config.hidden_size],
            model.embedding_values(),
        ),
    );
    for (index, layer) in model.layers.iter().enumerate() {
        let prefix = format!("layers.{index}");
        push(
            format!("{prefix}.input_layernorm.gamma"),
            norm(&layer.input_layernorm.gamma),
        );
        push(
            format!("{prefix}.post_attention_layernorm.gamma"),
            norm(&layer.post_attention_layernorm.gamma),
        );
        for (name, weight) in layer.linears() {
            push(format!("{prefix}.{name}.weight"), linear(weight));
        }
    }
    push("norm.gamma".into(), norm(&model.norm.gamma));
    if let Some(head) = &model.lm_head {
        push("lm_head.weight".into(), linear(head));
    }
    tensors
}

/// `model.safetensors` bytes for `model`.
pub fn safetensors_bytes(model: &Llama) -> Vec<u8> {
    safetensors_of(&hf_tensors(model), Dtype::F32, |value| {
        value.to_le_bytes().to_vec()
    })
}

/// A safetensors file of `tensors`, each value stored as `encode` writes it in `dtype`.
fn safetensors_of(tensors: &[HfTensor], dtype: Dtype, encode: impl Fn(f32) -> Vec<u8>) -> Vec<u8> {
    safetensors_file(
        tensors
            .iter()
            .map(|tensor| RawTensor {
                name: tensor.name.clone(),
                dtype,
                shape: tensor.shape.clone(),
                bytes: tensor.values.iter().flat_map(|&v| encode(v)).collect(),
            })
            .collect(),
    )
}

/// One tensor of a safetensors file, its values already encoded little-endian.
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub(crate) fn safetensors_file(tensors: Vec<RawTensor>) -> Vec<u8> {
    let views = tensors.iter().map(|tensor| {
        (
            tensor.name.clone(),
            safetensors::tensor::TensorView::new(tensor.dtype, tensor.shape.clone(), &tensor.bytes)
                .expect("sizes match shapes"),
        )
    });
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(metadata)).expect("tensors serialize")
}

/// The weight files of a folder: `model.safetensors`, or the shards its index lists.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    let text = std::fs::read_to_string(&index_path).map_err(|_| {
        error(
            dir,
            format!("holds neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}"),
        )
    })?;
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| error(&index_path, format!("invalid index: {e}")))?;
    let shards: BTreeSet<&String> = index.weight_map.values().collect();
    shards
        .into_iter()
        .map(|shard| {
            if shard.contains(['/', '\\']) || shard.starts_with('.') {
                Err(error(
                    &index_path,
                    format!("shard name \"{shard}\" leaves the folder"),
                ))
            } else {
                Ok(dir.join(shard))
            }
        })
        .collect()
}

/// Loads a Hugging Face Llama folder into distillery's model on `device`. Every tensor the model
/// needs must be present with the shape `config.json` implies; any other tensor is an error.
pub fn import(dir: &Path, device: &Device) -> Result<Llama, HfError> {
    let config = read_config(dir)?;
    let files = weight_files(dir)?;
    // A hostile config.json must not size an allocation: the weights (at 2 bytes a value at
    // least) have to be there.
    let stored_bytes: u64 = files
        .iter()
        .map(|file| std::fs::metadata(file).map(|meta| meta.len()).unwrap_or(0))
        .sum();
    if config.num_parameters() as u64 > stored_bytes / 2 {
        return Err(error(
            dir,
            format!(
                "config.json describes {} parameters; the weight files hold {stored_bytes} bytes",
                config.num_parameters()
            ),
        ));
    }
    let mut assembly =
        ModelAssembly::new(&config, "config.json", device).map_err(|e| error(dir, e))?;
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| error(&file, e.to_string()))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| error(&file, format!("not a safetensors file: {e}")))?;
        for (name, view) in tensors.tensors() {
            if name.ends_with("rotary_emb.inv_freq") {
                // A buffer older transformers versions saved; recomputed from rope_theta.
                continue;
            }
            if name == "lm_head.weight" && config.tie_word_embeddings {
                continue;
            }
            assembly
                .put_view(&name, &view)
                .map_err(|message| error(&file, message))?;
        }
    }
    assembly.finish().map_err(|message| error(dir, message))
}

/// Writes `model` as a Hugging Face Llama folder at `dir`: `config.json`, `model.safetensors`,
/// the tokenizer (`tokenizer.json` copied from `tokenizer`), `tokenizer_config.json` and
/// `generation_config.json`. The folder is assembled beside `dir` and renamed into place, so an
/// interrupted export leaves no folder that looks complete.
/// An existing `dir` is an error unless `replace`.
pub fn export(
    model: &Llama,
    tokenizer: &Path,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    dir: &Path,
    replace: bool,
) -> Result<(), HfError> {
    let files = vec![
        (
            CONFIG_FILE,
            config_json(model.config(), bos_token_id, eos_token_id)
                .map_err(|message| error(dir, message))?
                .into_bytes(),
        ),
        (WEIGHTS_FILE, safetensors_bytes(model)),
    ];
    let tokens = TokenizerFiles {
        config: model.config(),
        tokenizer,
        bos_token_id,
        eos_token_id,
    };
    write_model_folder(dir, files, &tokens, replace)
}

/// What a model folder says about its tokenizer.
pub(crate) struct TokenizerFiles<'a> {
    pub config: &'a LlamaConfig,
    pub tokenizer: &'a Path,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Writes a model folder: `files` plus the tokenizer files (see [`write_folder`]).
pub(crate) fn write_model_folder(
    dir: &Path,
    mut files: Vec<(&str, Vec<u8>)>,
    tokens: &TokenizerFiles,
    replace: bool,
) -> Result<(), HfError> {
    files.extend(tokenizer_files(
        tokens.config,
        tokens.tokenizer,
        tokens.bos_token_id,
        tokens.eos_token_id,
    )?);
    write_folder(dir, &files, replace)
}

pub(crate) fn pretty_json(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_string_pretty(value)
        .expect("json values serialize")
        .into_bytes()
}

/// `tokenizer.json` (a copy of `tokenizer`), `tokenizer_config.json` and
/// `generation_config.json`.
fn tokenizer_files(
    config: &LlamaConfig,
    tokenizer: &Path,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> Result<Vec<(&'static str, Vec<u8>)>, HfError> {
    let tokenizer_json = std::fs::read(tokenizer).map_err(|e| error(tokenizer, e.to_string()))?;
    // The tokenizer's own settings (special tokens, chat template) travel with it.
    let settings_path = tokenizer.with_file_name("tokenizer_config.json");
    let mut tokenizer_config = match std::fs::read_to_string(&settings_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| error(&settings_path, format!("not JSON: {e}")))?,
        Err(_) => serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"}),
    };
    tokenizer_config["model_max_length"] = config.max_position_embeddings.into();
    let generation_config = serde_json::json!({
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    });
    Ok(vec![
        ("tokenizer.json", tokenizer_json),
        ("tokenizer_config.json", pretty_json(&tokenizer_config)),
        ("generation_config.json", pretty_json(&generation_config)),
    ])
}

/// Writes `files` into folder `dir`, assembled beside it and renamed into place, so an
/// interrupted write leaves no folder that looks complete. An existing `dir` is an error unless
/// `replace`; then it is swapped out only once the new folder is complete.
pub(crate) fn write_folder(
    dir: &Path,
    files: &[(&str, Vec<u8>)],
    replace: bool,
) -> Result<(), HfError> {
    if dir.exists() && !replace {
        return Err(error(dir, "already exists; choose another output folder"));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| error(dir, "names no folder"))?;
    let sibling = |prefix: &str| {
        let mut sibling_name = std::ffi::OsString::from(prefix);
        sibling_name.push(name);
        dir.with_file_name(sibling_name)
    };
    // Named per process: two exports to one folder at once must not write into each other's.
    let process = std::process::id();
    let staging = sibling(&format!(".tmp-{process}-"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| error(&staging, e.to_string()))?;
    for (file, bytes) in files {
        let path = staging.join(file);
        std::fs::write(&path, bytes).map_err(|e| error(&path, e.to_string()))?;
    }
    if dir.exists() {
        let old = sibling(&format!(".old-{process}-"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| error(dir, e.to_string()))?;
        std::fs::rename(&staging, dir).map_err(|e| error(dir, e.to_string()))?;
        return std::fs::remove_dir_all(&old).map_err(|e| error(&old, e.to_string()));
    }
    std::fs::rename(&staging, dir).map_err(|e| error(dir, e.to_string()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, TensorData};

    use super::*;

    /// The architecture of an unquantized model's `config.json`.
    fn parse_config(json: &serde_json::Value) -> Result<LlamaConfig, String> {
        parse_config_of(json, false)
    }

    fn shape(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 48,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: tied,
            rope_scaling: None,
        }
    }

    /// The tensors of a safetensors file, read by hand: an 8-byte little-endian header length,
    /// a JSON header of dtype, shape and byte offsets, then the data.
    fn read_safetensors(bytes: &[u8]) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let data = &bytes[8 + header_len..];
        header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.as_str() != "__metadata__")
            .map(|(name, entry)| {
                assert_eq!(entry["dtype"], "F32");
                let shape: Vec<usize> = entry["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                let start = entry["data_offsets"][0].as_u64().unwrap() as usize;
                let end = entry["data_offsets"][1].as_u64().unwrap() as usize;
                let values = data[start..end]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                (name.clone(), (shape, values))
            })
            .collect()
    }

    fn logits(model: &Llama) -> Vec<f32> {
        crate::testing::logits(model, vec![1, 7, 30, 2, 47, 5], [2, 3])
    }

    fn export_folder(model: &Llama, root: &Path) -> PathBuf {
        let tokenizer = root.join("source-tokenizer.json");
        std::fs::write(&tokenizer, b"{}").unwrap();
        let dir = root.join("hf");
        export(model, &tokenizer, Some(0), Some(0), &dir, false).unwrap();
        dir
    }

    #[test]
    fn safetensors_hold_transformers_names_and_out_in_layout() {
        let device = Device::flex();
        let model = Llama::new(&shape(false), 0.0, 3, &device).unwrap();
        let tensors = read_safetensors(&safetensors_bytes(&model));
        assert_eq!(tensors.len(), 1 + 2 * 9 + 1 + 1);
        let (q_shape, q_values) = &tensors["model.layers.1.self_attn.q_proj.weight"];
        assert_eq!(q_shape, &vec![16, 16]);
        let ours = model.layers[1]
            .self_attn
            .q_proj
            .float_weight()
            .unwrap()
            .val();
        let ours: Vec<f32> = ours.into_data().try_into_vec().unwrap();
        // Ours is [in, out]: element (out o, in i) of the file is ours[i][o].
        for o in 0..16 {
            for i in 0..16 {
                assert_eq!(q_values[o * 16 + i], ours[i * 16 + o]);
            }
        }
        assert_eq!(
            tensors["model.layers.0.self_attn.k_proj.weight"].0,
            vec![8, 16]
        );
        assert_eq!(
            tensors["model.layers.0.mlp.down_proj.weight"].0,
            vec![16, 24]
        );
        assert_eq!(tensors["model.norm.weight"].0, vec![16]);
        assert_eq!(tensors["lm_head.weight"].0, vec![48, 16]);
        assert_eq!(tensors["model.embed_tokens.weight"].0, vec![48, 16]);
    }

    #[test]
    fn export_then_import_gives_back_the_same_model() {
        let device = Device::flex();
        for tied in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let model = Llama::new(&shape(tied), 0.0, 4, &device).unwrap();
            let dir = export_folder(&model, root.path());
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap())
                    .unwrap();
            assert_eq!(config["architectures"][0], "LlamaForCausalLM");
            assert_eq!(config["num_key_value_heads"], 2);
            assert_eq!(config["tie_word_embeddings"], tied);
            let imported = import(&dir, &device).unwrap();
            assert_eq!(imported.config(), model.config());
            let original = read_safetensors(&safetensors_bytes(&model));
            assert_eq!(read_safetensors(&safetensors_bytes(&imported)), original);
            assert_eq!(logits(&imported), logits(&model));
        }
    }

    #[test]
    fn sharded_half_precision_folders_load() {
        let device = Device::flex();
        let root = tempfile::tempdir().unwrap();
        let model = Llama::new(&shape(true), 0.0, 5, &device).unwrap();
        let dir = export_folder(&model, root.path());
        // Re-store every tensor as bf16 across two shards, as large checkpoints come.
        let tensors = hf_tensors(&model);
        let (first, second) = tensors.split_at(tensors.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (shard, part) in [("a.safetensors", first), ("b.safetensors", second)] {
            let bytes = safetensors_of(part, Dtype::BF16, |value| {
                ((value.to_bits() >> 16) as u16).to_le_bytes().to_vec()
            });
            std::fs::write(dir.join(shard), bytes).unwrap();
            for tensor in part {
                weight_map.insert(tensor.name.clone(), shard.into());
            }
        }
        std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
        std::fs::write(
            dir.join(WEIGHTS_INDEX_FILE),
            serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
        )
        .unwrap();
        let imported = import(&dir, &device).unwrap();
        let embedding = imported.embedding_values();
        let original = model.embedding_values();
        for (got, want) in embedding.iter().zip(&original) {
            assert_eq!(
                got.to_bits(),
                want.to_bits() & 0xffff_0000,
                "bf16 truncation"
            );
        }
    }

    #[test]
    fn missing_unexpected_and_misshapen_tensors_are_named() {
        let device = Device::flex();
        let root = tempfile::tempdir().unwrap();
        let model = Llama::new(&shape(false), 0.0, 6, &device).unwrap();
        let dir = export_folder(&model, root.path());
        let rewrite = |edit: &dyn Fn(&mut Vec<HfTensor>)| {
            let mut tensors = hf_tensors(&model);
            edit(&mut tensors);
            let bytes = safetensors_of(&tensors, Dtype::F32, |value| value.to_le_bytes().to_vec());
            std::fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
            import(&dir, &device).map(|_| ()).unwrap_err().to_string()
        };
        let missing = rewrite(&|tensors| tensors.retain(|t| !t.name.contains("layers.1.mlp.up")));
        assert!(
            missing.contains("missing tensors: model.layers.1.mlp.up_proj.weight"),
            "{missing}"
        );
        let unexpected = rewrite(&|tensors| {
            tensors.push(HfTensor {
                name: "model.layers.7.mlp.up_proj.weight".into(),
                shape: vec![1],
                values: vec![0.0],
            })
        });
        assert!(
            unexpected.contains("unexpected tensor `model.layers.7.mlp.up_proj.weight`"),
            "{unexpected}"
        );
        let misshapen = rewrite(&|tensors| {
            let q = tensors
                .iter_mut()
                .find(|t| t.name.ends_with("0.self_attn.q_proj.weight"))
                .unwrap();
            q.shape = vec![8, 32];
        });
        assert!(
            misshapen.contains("has shape [8, 32]; config.json implies [16, 16]"),
            "{misshapen}"
        );
    }

    #[test]
    fn a_config_larger_than_the_weights_is_refused_before_allocating() {
        let root = tempfile::tempdir().unwrap();
        let model = Llama::new(&shape(false), 0.0, 8, &Device::flex()).unwrap();
        let dir = export_folder(&model, root.path());
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        config["num_hidden_layers"] = (1u64 << 24).into();
        std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        let error = import(&dir, &Device::flex())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("the weight files hold"), "{error}");
    }

    /// SmolLM2-135M's `config.json` as transformers 4.42 wrote it, and as transformers 5
    /// writes it (`rope_parameters`, `dtype`, no top-level `rope_theta`).
    fn smollm2_config(transformers_5: bool) -> serde_json::Value {
        let mut config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64,
            "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
            "intermediate_size": 1536, "is_llama_config": true, "max_position_embeddings": 8192,
            "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
            "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": false,
            "tie_word_embeddings": true, "use_cache": true, "vocab_size": 49152,
        });
        if transformers_5 {
            config["rope_parameters"] =
                serde_json::json!({"rope_theta": 100000.0, "rope_type": "default"});
            config["dtype"] = "bfloat16".into();
            config["transformers_version"] = "5.0.0".into();
        } else {
            config["rope_theta"] = 100000.into();
            config["rope_scaling"] = serde_json::Value::Null;
            config["torch_dtype"] = "bfloat16".into();
            config["transformers_version"] = "4.42.3".into();
            config["quantization_config"] = serde_json::Value::Null;
        }
        config
    }

    #[test]
    fn transformers_4_and_5_configs_give_the_same_architecture() {
        let v4 = parse_config(&smollm2_config(false)).unwrap();
        let v5 = parse_config(&smollm2_config(true)).unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v5.rope_theta, 100000.0);
        assert_eq!((v5.num_key_value_heads, v5.head_dim()), (3, 64));
        assert!(v5.tie_word_embeddings);
        assert_eq!(v5.rope_scaling, None);
        // What distillery writes reads back as the same architecture.
        let written: serde_json::Value =
            serde_json::from_str(&config_json(&v5, Some(1), Some(2)).unwrap()).unwrap();
        assert_eq!(parse_config(&written).unwrap(), v5);
    }

    #[test]
    fn rope_scaling_is_implemented_or_refused_by_name() {
        let llama3 = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let expected = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        // transformers 4: `rope_scaling` with `rope_type` (or the older `type`).
        for type_key in ["rope_type", "type"] {
            let mut config = smollm2_config(false);
            let mut scaling = llama3.clone();
            scaling[type_key] = "llama3".into();
            config["rope_scaling"] = scaling;
            assert_eq!(
                parse_config(&config).unwrap().rope_scaling,
                expected,
                "{type_key}"
            );
        }
        // transformers 5: `rope_parameters` carrying the base too.
        let mut config = smollm2_config(true);
        let mut parameters = llama3.clone();
        parameters["rope_type"] = "llama3".into();
        parameters["rope_theta"] = 500000.0.into();
        config["rope_parameters"] = parameters;
        let parsed = parse_config(&config).unwrap();
        assert_eq!(
            (parsed.rope_theta, parsed.rope_scaling),
            (500000.0, expected)
        );

        let error = |config: &serde_json::Value| parse_config(config).unwrap_err();
        let mut dynamic = smollm2_config(false);
        dynamic["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        assert!(
            error(&dynamic).contains("rope_type \"dynamic\" is not supported"),
            "{}",
            error(&dynamic)
        );
        let mut yarn = smollm2_config(true);
        yarn["rope_parameters"] =
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4});
        assert!(
            error(&yarn).contains("`rope_parameters` of rope_type \"yarn\""),
            "{}",
            error(&yarn)
        );
        let mut unknown_field = smollm2_config(false);
        unknown_field["rope_scaling"] =
            serde_json::json!({"rope_type": "linear", "factor": 2.0, "beta": 3});
        assert!(
            error(&unknown_field).contains("`rope_scaling.beta`"),
            "{}",
            error(&unknown_field)
        );
    }

    #[test]
    fn per_pair_rotary_factors_have_no_transformers_config() {
        let mut config = shape(false);
        config.rope_scaling = Some(RopeScaling::Factors {
            factors: vec![2.0; config.head_dim() / 2],
        });
        let error = config_json(&config, None, None).unwrap_err();
        assert!(error.contains("`rope_freqs.weight`"), "{error}");
    }

    #[test]
    fn two_sources_of_one_setting_must_agree() {
        let mut config = smollm2_config(true);
        config["rope_theta"] = 10000.into();
        let error = parse_config(&config).unwrap_err();
        assert!(
            error.contains(
                "`rope_theta` = 10000 and `rope_parameters.rope_theta` = 100000 disagree"
            ),
            "{error}"
        );
        config["rope_theta"] = 100000.into();
        assert_eq!(parse_config(&config).unwrap().rope_theta, 100000.0);

        let refused = |edit: &dyn Fn(&mut serde_json::Value), expected: &str| {
            let mut config = smollm2_config(false);
            edit(&mut config);
            let error = parse_config(&config).unwrap_err();
            assert!(error.contains(expected), "{error}");
        };
        refused(
            &|config| config["rope_scaling"] = serde_json::json!({"rope_theta": 5e5}),
            "`rope_theta` = 100000 and `rope_scaling.rope_theta` = 500000 disagree",
        );
        refused(
            &|config| {
                config["rope_scaling"] =
                    serde_json::json!({"rope_type": "linear", "type": "default", "factor": 2.0})
            },
            "`rope_scaling.rope_type` = \"linear\" and `rope_scaling.type` = \"default\" disagree",
        );
        refused(
            &|config| config["rope_scaling"] = serde_json::json!({"rope_type": 3}),
            "`rope_scaling.rope_type` = 3 is not a string",
        );
        refused(
            &|config| {
                config["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192.5})
            },
            "`rope_scaling.original_max_position_embeddings` is missing or not a whole number",
        );
        refused(
            &|config| {
                config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
                config["rope_parameters"] = serde_json::json!({"rope_type": "default"});
            },
            "`rope_scaling` and `rope_parameters` disagree",
        );
    }

    #[test]
    fn unknown_or_unsupported_fields_are_named() {
        for (key, value, expected) in [
            (
                "sliding_window",
                serde_json::json!(4096),
                "`sliding_window` = 4096 is not understood",
            ),
            (
                "attention_bias",
                serde_json::json!(true),
                "`attention_bias` = true is not supported",
            ),
            ("head_dim", serde_json::json!(128), "`head_dim` 128"),
            (
                "hidden_act",
                serde_json::json!("gelu"),
                "`hidden_act` \"gelu\"",
            ),
            (
                "model_type",
                serde_json::json!("mistral"),
                "`model_type` \"mistral\"",
            ),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "awq"}),
                "`quantization_config`",
            ),
        ] {
            let mut config = smollm2_config(false);
            config[key] = value;
            let error = parse_config(&config).unwrap_err();
            assert!(error.contains(expected), "{key}: {error}");
        }
    }

    /// A folder transformers 5 wrote imports with its own rope base: the same logits as the
    /// same weights under a transformers 4 config.
    #[test]
    fn a_transformers_5_folder_imports_with_its_rope_base() {
        let device = Device::flex();
        let mut architecture = shape(true);
        architecture.rope_theta = 100000.0;
        let model = Llama::new(&architecture, 0.0, 3, &device).unwrap();
        let root = tempfile::tempdir().unwrap();
        let tokenizer = root.path().join("tokenizer.json");
        std::fs::write(&tokenizer, "{}").unwrap();
        let dir = root.path().join("v5");
        export(&model, &tokenizer, None, None, &dir, false).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        let fields = config.as_object_mut().unwrap();
        fields.remove("rope_theta");
        fields.remove("torch_dtype");
        fields.insert("dtype".into(), "float32".into());
        fields.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 100000.0, "rope_type": "default"}),
        );
        std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        let imported = import(&dir, &device).unwrap();
        assert_eq!(imported.config().rope_theta, 100000.0);
        let ids: Vec<i64> = (0..10).map(|i| (i * 7 + 1) % 48).collect();
        let logits = |model: &Llama| -> Vec<f32> {
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, 10]), &device);
            model.forward(input).into_data().try_into_vec().unwrap()
        };
        assert_eq!(logits(&imported), logits(&model));
    }

    #[test]
    fn configs_with_features_distillery_lacks_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&config_json(&shape(false), None, None).unwrap()).unwrap();
        config["model_type"] = "mistral".into();
        std::fs::write(root.path().join(CONFIG_FILE), config.to_string()).unwrap();
        let error = read_config(root.path()).unwrap_err().to_string();
        assert!(
            error.contains("`model_type` \"mistral\" is not supported"),
            "{error}"
        );
    }
}
