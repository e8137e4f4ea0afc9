//! llama.cpp's `llama` architecture in GGUF: metadata keys, tensor names and the rotary row
//! order, to and from distillery's model. Quantized tensors stay in their blocks.

use burn::tensor::Device;
use distillery_model::{LayerMatrix, Llama, LlamaConfig, RopeScaling};
use distillery_quant::ggml::GgmlType;
use distillery_quant::{BlockMatrix, QuantizedWeight};

use super::container::{ALIGNMENT, GgufError, GgufFile, GgufTensor, TensorData, Value};
use super::vocab::GgufVocabulary;
use crate::assembly::ModelAssembly;
use crate::hf::hf_tensors;
use crate::rope_layout::{interleaved_to_rotate_half, rotate_half_to_interleaved};

#[derive(Debug, thiserror::Error)]
pub enum GgufModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("metadata `{key}`: {message}")]
    Metadata { key: String, message: String },
    #[error("{0}")]
    Model(String),
}

fn metadata_error<T>(key: &str, message: impl Into<String>) -> Result<T, GgufModelError> {
    Err(GgufModelError::Metadata {
        key: key.to_string(),
        message: message.into(),
    })
}

/// llama.cpp's name of a layer matrix's tensor (`blk.N.<name>.weight`).
fn matrix_tensor(matrix: LayerMatrix) -> &'static str {
    match matrix {
        LayerMatrix::Query => "attn_q",
        LayerMatrix::Key => "attn_k",
        LayerMatrix::Value => "attn_v",
        LayerMatrix::Output => "attn_output",
        LayerMatrix::Gate => "ffn_gate",
        LayerMatrix::Up => "ffn_up",
        LayerMatrix::Down => "ffn_down",
    }
}

/// The layer norms: Hugging Face's module name and llama.cpp's.
const NORMS: [(&str, &str); 2] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// The tensors outside the layers: Hugging Face's name and llama.cpp's.
const GLOBALS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// llama.cpp's name for a Hugging Face Llama tensor name.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    if let Some((_, gguf)) = GLOBALS.iter().find(|(hf, _)| *hf == hf_name) {
        return Some(gguf.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    let short = match LayerMatrix::from_path(module) {
        Some(matrix) => matrix_tensor(matrix),
        None => NORMS.iter().find(|(hf, _)| *hf == module)?.1,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// The Hugging Face name of a llama.cpp tensor name.
pub fn hf_name_of(gguf_name: &str) -> Option<String> {
    if let Some((hf, _)) = GLOBALS.iter().find(|(_, gguf)| *gguf == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let short = rest.strip_suffix(".weight")?;
    let module = match LayerMatrix::ALL
        .into_iter()
        .find(|&matrix| matrix_tensor(matrix) == short)
    {
        Some(matrix) => matrix.path(),
        None => NORMS.iter().find(|(_, gguf)| *gguf == short)?.0,
    };
    Some(format!("model.layers.{layer}.{module}.weight"))
}

/// The tensor that carries per-pair rotary frequency factors (Llama 3.1's scaling).
const ROPE_FACTORS: &str = "rope_freqs.weight";

/// `llama.*` keys that change nothing distillery computes: llama.cpp's bookkeeping.
const INFORMATIONAL_KEYS: [&str; 2] = [
    "llama.rope.scaling.original_context_length",
    "llama.rope.scaling.finetuned",
];

/// The architecture a `llama` GGUF file describes. Every `llama.*` key must be understood:
/// one that would change the model and that distillery does not implement is an error naming
/// it.
pub fn architecture(file: &GgufFile) -> Result<LlamaConfig, GgufModelError> {
    match file.value("general.architecture").and_then(Value::as_str) {
        Some("llama") => {}
        Some(other) => {
            return metadata_error(
                "general.architecture",
                format!("\"{other}\"; distillery reads \"llama\""),
            );
        }
        None => return metadata_error("general.architecture", "is missing"),
    }
    let integer = |key: &str| -> Result<Option<usize>, GgufModelError> {
        match file.value(key) {
            None => Ok(None),
            Some(value) => match value.as_u64().and_then(|v| usize::try_from(v).ok()) {
                Some(number) => Ok(Some(number)),
                None => metadata_error(key, format!("{value:?} is not a count")),
            },
        }
    };
    let required = |key: &str| {
        integer(key)?.ok_or_else(|| GgufModelError::Metadata {
            key: key.into(),
            message: "is missing".into(),
        })
    };
    let float = |key: &str| -> Result<Option<f64>, GgufModelError> {
        match file.value(key) {
            None => Ok(None),
            Some(value) => match value.as_f64() {
                Some(number) => Ok(Some(number)),
                None => metadata_error(key, format!("{value:?} is not a number")),
            },
        }
    };
    let hidden_size = required("llama.embedding_length")?;
    let num_attention_heads = required("llama.attention.head_count")?;
    let tokens = match file.value("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => Some(tokens.len()),
        _ => None,
    };
    let vocab_size = match (integer("llama.vocab_size")?, tokens) {
        (Some(size), Some(tokens)) if size < tokens => {
            return metadata_error(
                "llama.vocab_size",
                format!("{size} is fewer than the {tokens} tokens of tokenizer.ggml.tokens"),
            );
        }
        (Some(size), _) => size,
        (None, Some(tokens)) => tokens,
        (None, None) => {
            return metadata_error("llama.vocab_size", "is missing, and so are the tokens");
        }
    };
    let mut config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: required("llama.feed_forward_length")?,
        num_hidden_layers: required("llama.block_count")?,
        num_attention_heads,
        num_key_value_heads: integer("llama.attention.head_count_kv")?
            .unwrap_or(num_attention_heads),
        max_position_embeddings: required("llama.context_length")?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            GgufModelError::Metadata {
                key: "llama.attention.layer_norm_rms_epsilon".into(),
                message: "is missing".into(),
            }
        })?,
        rope_theta: float("llama.rope.freq_base")?.unwrap_or(10000.0),
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        rope_scaling: None,
    };
    let head_dim = hidden_size.checked_div(num_attention_heads).unwrap_or(0);
    for key in [
        "llama.rope.dimension_count",
        "llama.attention.key_length",
        "llama.attention.value_length",
    ] {
        if let Some(length) = integer(key)?
            && length != head_dim
        {
            return metadata_error(
                key,
                format!(
                    "{length} differs from the head dimension {head_dim}: partial rotary \
                     embeddings and heads wider than hidden_size / heads are not supported"
                ),
            );
        }
    }
    for key in ["llama.expert_count", "llama.expert_used_count"] {
        if let Some(experts) = integer(key)?
            && experts > 0
        {
            return metadata_error(
                key,
                format!("{experts}: mixtures of experts are not supported"),
            );
        }
    }
    let scaling = file.value("llama.rope.scaling.type");
    match scaling.map(|value| value.as_str().ok_or(value)) {
        None | Some(Ok("none")) => {}
        Some(Ok("linear")) => {
            let factor =
                float("llama.rope.scaling.factor")?.ok_or_else(|| GgufModelError::Metadata {
                    key: "llama.rope.scaling.factor".into(),
                    message: "is missing for linear rope scaling".into(),
                })?;
            config.rope_scaling = Some(RopeScaling::Linear { factor });
        }
        Some(Ok(other)) => {
            return metadata_error(
                "llama.rope.scaling.type",
                format!("\"{other}\" is not supported (none, linear)"),
            );
        }
        Some(Err(value)) => {
            return metadata_error(
                "llama.rope.scaling.type",
                format!("{value:?} is not a name"),
            );
        }
    }
    let understood = [
        "llama.vocab_size",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
        "llama.rope.dimension_count",
        "llama.attention.key_length",
        "llama.attention.value_length",
        "llama.expert_count",
        "llama.expert_used_count",
        "llama.rope.scaling.type",
        "llama.rope.scaling.factor",
    ];
    if let Some((key, value)) = file.metadata().iter().find(|(key, _)| {
        key.starts_with("llama.")
            && !understood.contains(&key.as_str())
            && !INFORMATIONAL_KEYS.contains(&key.as_str())
    }) {
        return metadata_error(
            key,
            format!("= {value:?} is not understood by distillery and may change the model"),
        );
    }
    config
        .validate()
        .map_err(|e| GgufModelError::Model(format!("the GGUF metadata: {e}")))?;
    Ok(config)
}

/// distillery's model from a `llama` GGUF file. Float (F32) tensors become float parameters;
/// half-precision and block-quantized matrices keep their bytes ([`BlockMatrix`]), with the
/// query and key rows moved from llama.cpp's rotary order to Hugging Face's.
pub fn import(file: &GgufFile, device: &Device) -> Result<Llama, GgufModelError> {
    let mut config = architecture(file)?;
    let model_error = |message: String| GgufModelError::Model(message);
    // A tensor distillery cannot read is named before anything else is judged.
    for tensor in file.tensors() {
        tensor.readable_type()?;
    }
    // Hostile metadata must not size an allocation: the file has to hold that many values,
    // counted over the tensors whose data it was checked to hold.
    let stored = file
        .tensors()
        .iter()
        .filter(|tensor| tensor.bytes().is_some())
        .fold(0u64, |sum, tensor| sum.saturating_add(tensor.values()));
    if config.num_parameters() as u64 > stored {
        return Err(model_error(format!(
            "the metadata describes {} parameters; the file holds {stored} values",
            config.num_parameters()
        )));
    }
    // Nor may the context: the rotary tables take 8 bytes a position and head dimension.
    let tables =
        (config.max_position_embeddings as u64).saturating_mul(8 * config.head_dim() as u64);
    if tables > file.len() {
        return Err(model_error(format!(
            "a context of {} positions needs rotary tables of {tables} bytes, more than the \
             {}-byte file",
            config.max_position_embeddings,
            file.len()
        )));
    }
    if let Some(tensor) = file.tensor(ROPE_FACTORS) {
        if config.rope_scaling.is_some() {
            return Err(model_error(format!(
                "tensor `{ROPE_FACTORS}` and llama.rope.scaling.type both scale the rotary \
                 frequencies"
            )));
        }
        let factors = file.tensor_values(tensor)?;
        config.rope_scaling = Some(RopeScaling::Factors {
            factors: factors.into_iter().map(f64::from).collect(),
        });
        config
            .validate()
            .map_err(|e| model_error(format!("tensor `{ROPE_FACTORS}`: {e}")))?;
    }
    let mut assembly = ModelAssembly::new(&config, "GGUF metadata", device).map_err(model_error)?;
    let head_dim = config.head_dim();
    for tensor in file
        .tensors()
        .iter()
        .filter(|tensor| tensor.name != ROPE_FACTORS)
    {
        let name = hf_name_of(&tensor.name)
            .ok_or_else(|| model_error(format!("unexpected tensor `{}`", tensor.name)))?;
        let shape: Vec<usize> = tensor.dims.iter().rev().map(|&d| d as usize).collect();
        assembly.check(&name, &shape).map_err(model_error)?;
        let heads = LayerMatrix::ALL
            .into_iter()
            .find(|matrix| name.ends_with(&format!("{}.weight", matrix.path())))
            .and_then(|matrix| matrix.heads(&config));
        match (tensor.kind, shape.as_slice()) {
            (Ok(GgmlType::F32), _) | (_, [_]) => {
                let values = file.tensor_values(tensor)?;
                let values = match (heads, shape.as_slice()) {
                    (Some(heads), &[_, cols]) => {
                        interleaved_to_rotate_half(&values, heads, head_dim, cols)
                    }
                    _ => values,
                };
                assembly.put(&name, values);
            }
            (_, &[rows, cols]) => {
                let bytes = file.tensor_bytes(tensor)?;
                let kind = tensor.readable_type()?;
                let row_bytes = bytes.len() / rows;
                let bytes = match heads {
                    Some(heads) => interleaved_to_rotate_half(bytes, heads, head_dim, row_bytes),
                    None => bytes.to_vec(),
                };
                let matrix = BlockMatrix::new(kind, rows, cols, bytes)
                    .map_err(|e| model_error(format!("tensor `{}`: {e}", tensor.name)))?;
                assembly.put_quantized(&name, matrix).map_err(model_error)?;
            }
            _ => unreachable!("shapes were checked"),
        }
    }
    assembly.finish().map_err(model_error)
}

/// A GGUF file's contents before they are written: its metadata and its tensors.
pub type GgufContents = (Vec<(String, Value)>, Vec<GgufTensor>);

/// The metadata and tensors of a `llama` GGUF file of `model`, its weight matrices stored as
/// `weights` (F32, F16, Q8_0 or Q4_0); a matrix already in `weights` blocks is written as it
/// is. Norm gains stay F32, as llama.cpp's converter keeps them; matrices with rows that are
/// not whole blocks stay F32 too.
pub fn llama_contents(
    model: &Llama,
    name: &str,
    vocabulary: &GgufVocabulary,
    weights: GgmlType,
) -> Result<GgufContents, GgufModelError> {
    let config = model.config();
    let u32_value = |value: usize| Value::U32(value as u32);
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(file_type(weights)?)),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        (
            "llama.context_length".into(),
            u32_value(config.max_position_embeddings),
        ),
        (
            "llama.embedding_length".into(),
            u32_value(config.hidden_size),
        ),
        (
            "llama.block_count".into(),
            u32_value(config.num_hidden_layers),
        ),
        (
            "llama.feed_forward_length".into(),
            u32_value(config.intermediate_size),
        ),
        (
            "llama.rope.dimension_count".into(),
            u32_value(config.head_dim()),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config.rope_theta as f32),
        ),
        (
            "llama.attention.head_count".into(),
            u32_value(config.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32_value(config.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u32_value(config.vocab_size)),
    ];
    if weights.is_block_quantized() {
        metadata.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let mut tensors = Vec::new();
    match &config.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            metadata.push((
                "llama.rope.scaling.type".into(),
                Value::String("linear".into()),
            ));
            metadata.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
        }
        Some(scaling @ (RopeScaling::Llama3 { .. } | RopeScaling::Factors { .. })) => {
            // llama.cpp divides each rotary frequency by its factor from this tensor.
            let head_dim = config.head_dim();
            let factors = (0..head_dim / 2)
                .map(|i| {
                    let frequency = config.rope_theta.powf(-2.0 * i as f64 / head_dim as f64);
                    (frequency / scaling.scale(i, frequency)) as f32
                })
                .collect();
            tensors.push(GgufTensor {
                name: ROPE_FACTORS.into(),
                dims: vec![(head_dim / 2) as u64],
                kind: GgmlType::F32,
                data: TensorData::Values(factors),
            });
        }
    }
    metadata.extend(vocabulary.metadata());
    let head_dim = config.head_dim();
    for tensor in hf_tensors(model) {
        let gguf = gguf_name(&tensor.name).expect("every Llama tensor has a GGUF name");
        let heads = LayerMatrix::ALL
            .into_iter()
            .find(|matrix| tensor.name.ends_with(&format!("{}.weight", matrix.path())))
            .and_then(|matrix| matrix.heads(config));
        let dims: Vec<u64> = tensor.shape.iter().rev().map(|&d| d as u64).collect();
        let fits =
            !weights.is_block_quantized() || dims[0].is_multiple_of(weights.block_values() as u64);
        let kind = if dims.len() == 2 && fits {
            weights
        } else {
            GgmlType::F32
        };
        let same_blocks = quantized_weight(model, &tensor.name)
            .and_then(QuantizedWeight::blocks)
            .filter(|blocks| blocks.kind() == kind);
        // llama.cpp rotates adjacent pairs: q and k rows move to the interleaved layout.
        let data = match (same_blocks, heads) {
            (Some(blocks), Some(heads)) => {
                let bytes = blocks.bytes();
                let row_bytes = bytes.len() / blocks.rows();
                TensorData::Blocks(rotate_half_to_interleaved(
                    &bytes, heads, head_dim, row_bytes,
                ))
            }
            (Some(blocks), None) => TensorData::Blocks(blocks.bytes().into_owned()),
            (None, Some(heads)) => TensorData::Values(rotate_half_to_interleaved(
                &tensor.values,
                heads,
                head_dim,
                tensor.shape[1],
            )),
            (None, None) => TensorData::Values(tensor.values),
        };
        tensors.push(GgufTensor {
            name: gguf,
            dims,
            kind,
            data,
        });
    }
    Ok((metadata, tensors))
}

/// The quantized weight behind a Hugging Face tensor name, when it is quantized.
fn quantized_weight<'a>(model: &'a Llama, hf_name: &str) -> Option<&'a QuantizedWeight> {
    if hf_name == "model.embed_tokens.weight" {
        return model.quantized_embedding();
    }
    let path = hf_name.strip_prefix("model.").unwrap_or(hf_name);
    let path = path.strip_suffix(".weight")?;
    model
        .linears()
        .into_iter()
        .find(|(linear_path, _)| linear_path == path)
        .and_then(|(_, linear)| linear.quantized_weight())
}

/// `general.file_type` of a file whose weight matrices are stored as `weights`
/// (`llama_ftype`).
fn file_type(weights: GgmlType) -> Result<u32, GgufModelError> {
    match weights {
        GgmlType::F32 => Ok(0),
        GgmlType::F16 => Ok(1),
        GgmlType::Q4_0 => Ok(2),
        GgmlType::Q8_0 => Ok(7),
        other => Err(GgufModelError::Model(format!(
            "distillery writes GGUF files of F32, F16, Q8_0 or Q4_0 matrices, not {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::tensor::Device;
    use distillery_model::LlamaConfig;
    use distillery_quant::f16::round_to_f16;

    use super::*;
    use crate::gguf::container::{read, write};
    use crate::gguf::vocab::vocabulary_from_tokenizer_json;

    fn config(hidden_size: usize, tie_word_embeddings: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 6,
            hidden_size,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings,
            rope_scaling: None,
        }
    }

    fn model() -> Llama {
        Llama::new(&config(8, true), 0.0, 9, &Device::flex()).unwrap()
    }

    fn vocabulary() -> GgufVocabulary {
        let tokenizer = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "vocab": {"a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġab": 5},
                "merges": ["a b", ["Ġ", "ab"]],
            },
        });
        vocabulary_from_tokenizer_json(&tokenizer, None, Some(0)).unwrap()
    }

    fn round_trip(model: &Llama, weights: GgmlType) -> GgufFile {
        let (metadata, tensors) = llama_contents(model, "tiny", &vocabulary(), weights).unwrap();
        read(write(&metadata, &tensors).unwrap()).unwrap()
    }

    #[test]
    fn names_map_both_ways() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.11.input_layernorm.weight",
                "blk.11.attn_norm.weight",
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
        ] {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(hf_name_of(gguf).as_deref(), Some(hf));
        }
        assert_eq!(hf_name_of("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name_of("rope_freqs.weight"), None);
    }

    #[test]
    fn written_files_read_back_with_llama_names_dims_and_values() {
        let model = model();
        let file = round_trip(&model, GgmlType::F32);
        assert_eq!(file.version(), 3);
        assert_eq!(
            file.value("llama.attention.head_count_kv"),
            Some(&Value::U32(1))
        );
        assert_eq!(
            file.value("llama.rope.dimension_count"),
            Some(&Value::U32(4))
        );
        assert_eq!(
            file.value("tokenizer.ggml.pre"),
            Some(&Value::String("gpt-2".into()))
        );
        assert_eq!(
            file.tensors().len(),
            1 + 2 * 9 + 1,
            "tied: no output.weight"
        );
        assert!(file.tensor("output.weight").is_none());
        let embedding = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embedding.dims, vec![8, 6]);
        assert_eq!(
            file.tensor_values(embedding).unwrap(),
            model.embedding_values()
        );
        let down = file.tensor("blk.1.ffn_down.weight").unwrap();
        assert_eq!(down.dims, vec![12, 8], "innermost (input) dimension first");
        // q and k are in llama.cpp's interleaved rotary layout; undoing it gives Hugging
        // Face's rows back.
        let hf: BTreeMap<String, Vec<f32>> = hf_tensors(&model)
            .into_iter()
            .map(|tensor| (tensor.name, tensor.values))
            .collect();
        let k = file
            .tensor_values(file.tensor("blk.0.attn_k.weight").unwrap())
            .unwrap();
        assert_eq!(
            interleaved_to_rotate_half(&k, 1, 4, 8),
            hf["model.layers.0.self_attn.k_proj.weight"]
        );
        let q = file
            .tensor_values(file.tensor("blk.1.attn_q.weight").unwrap())
            .unwrap();
        assert_ne!(q, hf["model.layers.1.self_attn.q_proj.weight"]);
        assert_eq!(
            interleaved_to_rotate_half(&q, 2, 4, 8),
            hf["model.layers.1.self_attn.q_proj.weight"]
        );
    }

    #[test]
    fn f32_files_import_back_to_the_same_model() {
        let model = model();
        let imported = import(&round_trip(&model, GgmlType::F32), &Device::flex()).unwrap();
        assert_eq!(imported.config(), model.config());
        let by_name = |model: &Llama| -> Vec<(String, Vec<f32>)> {
            hf_tensors(model)
                .into_iter()
                .map(|t| (t.name, t.values))
                .collect()
        };
        assert_eq!(by_name(&imported), by_name(&model));
    }

    /// Llama 3 scaling travels as llama.cpp's `rope_freqs.weight` (each pair's frequency
    /// divisor), computed here by hand from Meta's formula, and reads back as those factors
    /// with the same logits over a context longer than the original one.
    #[test]
    fn scaled_rotary_frequencies_travel_as_rope_freqs() {
        let mut scaled = config(16, true);
        let (factor, low, high, original) = (8.0, 1.0, 4.0, 16usize);
        scaled.max_position_embeddings = 64;
        scaled.rope_scaling = Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        });
        let model = Llama::new(&scaled, 0.0, 5, &Device::flex()).unwrap();
        let file = round_trip(&model, GgmlType::F32);
        let written = file
            .tensor_values(file.tensor("rope_freqs.weight").unwrap())
            .unwrap();
        // head_dim 8: frequencies 1, 0.1, 0.01, 0.001, wavelengths 2π/frequency.
        let expected: Vec<f32> = (0..4)
            .map(|pair| {
                let frequency = 10000f64.powf(-(pair as f64) / 4.0);
                let wavelength = 2.0 * std::f64::consts::PI / frequency;
                let scaled_frequency = if wavelength < original as f64 / high {
                    frequency
                } else if wavelength > original as f64 / low {
                    frequency / factor
                } else {
                    let smooth = (original as f64 / wavelength - low) / (high - low);
                    (1.0 - smooth) * frequency / factor + smooth * frequency
                };
                (frequency / scaled_frequency) as f32
            })
            .collect();
        assert_eq!(written.len(), 4);
        for (got, want) in written.iter().zip(&expected) {
            assert!(
                (got - want).abs() < 1e-5 * want,
                "{written:?} vs {expected:?}"
            );
        }
        assert!(
            written[0] > 1.0 && written[0] < factor as f32,
            "smoothed pair"
        );
        assert_eq!(written[1], factor as f32);

        let imported = import(&file, &Device::flex()).unwrap();
        let Some(RopeScaling::Factors { factors }) = &imported.config().rope_scaling else {
            panic!("{:?}", imported.config().rope_scaling);
        };
        assert_eq!(
            factors,
            &written.iter().map(|&f| f64::from(f)).collect::<Vec<_>>()
        );
        let ids: Vec<i64> = (0..48).map(|i| i % 6).collect();
        let logits = |model: &Llama| crate::testing::logits(model, ids.clone(), [1, 48]);
        let (ours, theirs) = (logits(&model), logits(&imported));
        let largest = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(largest < 1e-4, "logits differ by {largest}");
        // Written again, the factors are the same tensor.
        let again = round_trip(&imported, GgmlType::F32);
        assert_eq!(
            again
                .tensor_values(again.tensor("rope_freqs.weight").unwrap())
                .unwrap(),
            written
        );
    }

    /// Quantized and half-precision matrices keep their blocks in memory, q and k rows in
    /// Hugging Face's order, and write back unchanged.
    #[test]
    fn quantized_files_import_as_blocks_and_write_back_unchanged() {
        let model = Llama::new(&config(64, false), 0.0, 4, &Device::flex()).unwrap();
        for kind in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F16] {
            let file = round_trip(&model, kind);
            let imported = import(&file, &Device::flex()).unwrap();
            let q_proj = &imported.layers[1].self_attn.q_proj;
            let blocks = q_proj
                .quantized_weight()
                .and_then(QuantizedWeight::blocks)
                .unwrap();
            assert_eq!(blocks.kind(), kind);
            let stored = file
                .tensor_values(file.tensor("blk.1.attn_q.weight").unwrap())
                .unwrap();
            assert_eq!(
                q_proj.weight_out_in(),
                interleaved_to_rotate_half(&stored, 2, 32, 64)
            );
            // Twelve-wide rows of the down projection are not whole blocks: F32.
            let down = file.tensor("blk.0.ffn_down.weight").unwrap();
            let expected = if kind == GgmlType::F16 {
                kind
            } else {
                GgmlType::F32
            };
            assert_eq!(down.kind, Ok(expected));
            let again = round_trip(&imported, kind);
            for tensor in file.tensors() {
                assert_eq!(
                    again
                        .tensor_bytes(again.tensor(&tensor.name).unwrap())
                        .unwrap(),
                    file.tensor_bytes(tensor).unwrap(),
                    "{kind} {}",
                    tensor.name
                );
            }
        }
    }

    #[test]
    fn int8_matrices_in_groups_of_32_become_q8_0_blocks_unchanged() {
        let mut model = Llama::new(&config(64, false), 0.0, 4, &Device::flex()).unwrap();
        let paths: Vec<String> = model.linears().into_iter().map(|(path, _)| path).collect();
        for path in paths {
            let linear = model.linear_mut(&path).unwrap();
            let (rows, cols) = (linear.d_output(), linear.d_input());
            if cols % 32 != 0 {
                continue;
            }
            let matrix =
                distillery_quant::int8_absmax(&linear.weight_out_in(), rows, cols, Some(32))
                    .unwrap();
            *linear = distillery_model::Linear::quantized(
                distillery_quant::PackedMatrix::from_quantized(&matrix),
            );
        }
        let file = round_trip(&model, GgmlType::Q8_0);
        for (name, linear) in [
            ("blk.0.attn_v.weight", &model.layers[0].self_attn.v_proj),
            ("output.weight", model.lm_head.as_ref().unwrap()),
        ] {
            let stored = file.tensor(name).unwrap();
            assert_eq!(stored.kind, Ok(GgmlType::Q8_0));
            assert_eq!(
                file.tensor_values(stored).unwrap(),
                linear.weight_out_in(),
                "{name}"
            );
        }
    }

    #[test]
    fn f16_files_hold_every_matrix_in_half_precision_and_norms_in_f32() {
        let model = model();
        let file = round_trip(&model, GgmlType::F16);
        assert_eq!(file.value("general.file_type"), Some(&Value::U32(1)));
        assert!(file.value("general.quantization_version").is_none());
        let embedding = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embedding.kind, Ok(GgmlType::F16));
        let rounded: Vec<f32> = model
            .embedding_values()
            .iter()
            .map(|&v| round_to_f16(v))
            .collect();
        assert_eq!(file.tensor_values(embedding).unwrap(), rounded);
        assert_eq!(
            file.tensor("blk.0.attn_norm.weight").unwrap().kind,
            Ok(GgmlType::F32)
        );
        let imported = import(&file, &Device::flex()).unwrap();
        assert_eq!(imported.embedding_values(), rounded);
    }

    fn with_metadata(model: &Llama, key: &str, value: Option<Value>) -> GgufFile {
        let (mut metadata, tensors) =
            llama_contents(model, "tiny", &vocabulary(), GgmlType::F32).unwrap();
        metadata.retain(|(name, _)| name != key);
        if let Some(value) = value {
            metadata.push((key.to_string(), value));
        }
        read(write(&metadata, &tensors).unwrap()).unwrap()
    }

    #[test]
    fn metadata_that_changes_the_model_must_be_understood() {
        let model = model();
        let error = |key: &str, value: Option<Value>| {
            import(&with_metadata(&model, key, value), &Device::flex())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let message = error("llama.attention.clamp_kqv", Some(Value::F32(8.0)));
        assert!(message.contains("`llama.attention.clamp_kqv`"), "{message}");
        let message = error(
            "llama.rope.scaling.type",
            Some(Value::String("yarn".into())),
        );
        assert!(message.contains("\"yarn\" is not supported"), "{message}");
        let message = error("llama.expert_count", Some(Value::U32(8)));
        assert!(message.contains("mixtures of experts"), "{message}");
        let message = error("llama.rope.dimension_count", Some(Value::U32(2)));
        assert!(message.contains("partial rotary"), "{message}");
        let message = error("llama.embedding_length", None);
        assert!(
            message.contains("`llama.embedding_length`: is missing"),
            "{message}"
        );
        let message = error("general.architecture", Some(Value::String("gemma".into())));
        assert!(message.contains("\"gemma\""), "{message}");
        // Bookkeeping keys and linear scaling are understood.
        let linear = with_metadata(
            &model,
            "llama.rope.scaling.type",
            Some(Value::String("linear".into())),
        );
        let (mut metadata, tensors) = (linear.metadata().to_vec(), Vec::<GgufTensor>::new());
        metadata.push(("llama.rope.scaling.factor".into(), Value::F32(2.0)));
        metadata.push(("llama.rope.scaling.finetuned".into(), Value::Bool(true)));
        let config = architecture(&read(write(&metadata, &tensors).unwrap()).unwrap()).unwrap();
        assert_eq!(
            config.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
    }

    #[test]
    fn metadata_larger_than_the_file_is_refused_before_allocating() {
        let file = with_metadata(&model(), "llama.block_count", Some(Value::U32(1 << 24)));
        let error = import(&file, &Device::flex())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("the file holds"), "{error}");
    }

    #[test]
    fn tensors_of_types_distillery_does_not_read_are_refused_by_name() {
        let model = Llama::new(&config(256, true), 0.0, 4, &Device::flex()).unwrap();
        let (metadata, mut tensors) =
            llama_contents(&model, "tiny", &vocabulary(), GgmlType::F32).unwrap();
        let embedding = tensors
            .iter_mut()
            .find(|t| t.name == "token_embd.weight")
            .unwrap();
        embedding.kind = GgmlType::Iq2Xxs;
        embedding.data = TensorData::Blocks(vec![0; 6 * 66]);
        let file = read(write(&metadata, &tensors).unwrap()).unwrap();
        let error = import(&file, &Device::flex())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("`token_embd.weight` is IQ2_XXS"), "{error}");
    }
}
