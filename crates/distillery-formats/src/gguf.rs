//! GGUF version 3, the file format llama.cpp runs: a writer for distillery's Llama (f32
//! tensors, the tokenizer embedded) and a bounds-checked reader.
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64); the metadata
//! as (key, type, value); the tensor infos as (name, dimension count, dimensions innermost
//! first, type, data offset); padding to `general.alignment`; the tensor data, each tensor at
//! an aligned offset. Every integer is little-endian; strings are a u64 length and UTF-8 bytes.

use std::collections::BTreeMap;

use distillery_model::Llama;

use crate::ggml_blocks::{
    BLOCK, Q4_0_BYTES, Q8_0_BYTES, dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0,
};
use crate::hf::{ModelAssembly, hf_tensors};
use crate::rope_layout::{interleaved_to_rotate_half, rotate_half_to_interleaved};
use distillery_quant::f16::{f16_to_f32, f32_to_f16};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;

/// How a tensor's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl TensorKind {
    /// ggml's type id.
    fn type_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
        }
    }

    /// Stored in blocks of 32 values along a row.
    fn is_blocked(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4_0)
    }

    fn from_type_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::Q4_0, Self::Q8_0]
            .into_iter()
            .find(|kind| kind.type_id() == id)
    }

    /// Bytes of `count` values (a multiple of the block size when quantized).
    pub fn bytes(self, count: u64) -> u64 {
        match self {
            Self::F32 => count * 4,
            Self::F16 => count * 2,
            Self::Q8_0 => count / BLOCK as u64 * Q8_0_BYTES as u64,
            Self::Q4_0 => count / BLOCK as u64 * Q4_0_BYTES as u64,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                .collect(),
            Self::Q8_0 => quantize_q8_0(values),
            Self::Q4_0 => quantize_q4_0(values),
        }
    }

    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Self::Q8_0 => dequantize_q8_0(bytes),
            Self::Q4_0 => dequantize_q4_0(bytes),
        }
    }

    /// `general.file_type` of a file whose weight matrices are stored as `self`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

// GGUF's value type ids.
const T_UINT32: u32 = 4;
const T_INT32: u32 = 5;
const T_FLOAT32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_UINT64: u32 = 10;

/// A tensor of the file: its GGUF name, dimensions innermost first, its storage and its
/// values (as they will be quantized when writing, dequantized when read).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: TensorKind,
    pub values: Vec<f32>,
}

/// What a tokenizer contributes to the file.
pub struct GgufVocabulary {
    /// Token strings by id.
    pub tokens: Vec<String>,
    /// 1 for normal tokens, 3 for control (special) tokens, by id.
    pub token_types: Vec<i32>,
    /// BPE merges as `"left right"`, in priority order.
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The vocabulary of a Hugging Face byte-level BPE `tokenizer.json`.
pub fn vocabulary_from_tokenizer_json(
    json: &serde_json::Value,
    eos_token_id: Option<u32>,
) -> Result<GgufVocabulary, String> {
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "a {} tokenizer cannot be embedded; BPE expected",
            model["type"]
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("the tokenizer has no vocab")?;
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    for (token, id) in vocab {
        by_id.insert(
            id.as_u64().ok_or("a token id is not a number")?,
            token.clone(),
        );
    }
    let mut special = std::collections::BTreeSet::new();
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().ok_or("an added token has no id")?;
        let content = added["content"]
            .as_str()
            .ok_or("an added token has no content")?;
        by_id.insert(id, content.to_string());
        if added["special"].as_bool() == Some(true) {
            special.insert(id);
        }
    }
    let count = by_id.len() as u64;
    if by_id.keys().copied().ne(0..count) {
        return Err("the token ids are not contiguous from 0".into());
    }
    let token_types = (0..count)
        .map(|id| if special.contains(&id) { 3 } else { 1 })
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or("the tokenizer has no merges")?
        .iter()
        .map(|merge| match merge {
            serde_json::Value::String(pair) => Ok(pair.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            _ => Err("a merge is neither \"a b\" nor [a, b]".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GgufVocabulary {
        tokens: by_id.into_values().collect(),
        token_types,
        merges,
        bos_token_id: eos_token_id,
        eos_token_id,
    })
}

/// The metadata and f32 tensors llama.cpp's `llama` architecture expects for `model`.
pub fn llama_contents(
    model: &Llama,
    name: &str,
    vocabulary: &GgufVocabulary,
    weights: TensorKind,
) -> (Vec<(String, Value)>, Vec<GgufTensor>) {
    let config = model.config();
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(weights.file_type())),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        (
            "llama.context_length".into(),
            Value::U32(config.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(config.hidden_size as u32),
        ),
        (
            "llama.block_count".into(),
            Value::U32(config.num_hidden_layers as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(config.head_dim() as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config.rope_theta as f32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(config.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(config.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            "llama.vocab_size".into(),
            Value::U32(config.vocab_size as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        // GPT-2's pre-tokenizer regex, which a byte-level BPE with `use_regex` applies.
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Strings(vocabulary.tokens.clone()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::I32s(vocabulary.token_types.clone()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Strings(vocabulary.merges.clone()),
        ),
    ];
    if weights.is_blocked() {
        metadata.push(("general.quantization_version".into(), Value::U32(2)));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", vocabulary.bos_token_id),
        ("tokenizer.ggml.eos_token_id", vocabulary.eos_token_id),
    ] {
        if let Some(id) = id {
            metadata.push((key.into(), Value::U32(id)));
        }
    }
    let head_dim = config.head_dim();
    let tensors = hf_tensors(model)
        .into_iter()
        .map(|tensor| {
            let gguf_name = gguf_name(&tensor.name);
            // llama.cpp rotates adjacent pairs: q and k rows move to the interleaved layout.
            let values = match gguf_name.rsplit('.').nth(1) {
                Some("attn_q") => rotate_half_to_interleaved(
                    &tensor.values,
                    config.num_attention_heads,
                    head_dim,
                    tensor.shape[1],
                ),
                Some("attn_k") => rotate_half_to_interleaved(
                    &tensor.values,
                    config.num_key_value_heads,
                    head_dim,
                    tensor.shape[1],
                ),
                _ => tensor.values,
            };
            let dims: Vec<u64> = tensor.shape.iter().rev().map(|&d| d as u64).collect();
            // Norm gains stay f32, as llama.cpp's converter keeps them; blocks need whole rows.
            let fits = !weights.is_blocked() || dims[0].is_multiple_of(BLOCK as u64);
            let kind = if dims.len() == 2 && fits {
                weights
            } else {
                TensorKind::F32
            };
            GgufTensor {
                name: gguf_name,
                dims,
                kind,
                values,
            }
        })
        .collect();
    (metadata, tensors)
}

/// llama.cpp's name for a Hugging Face Llama tensor name.
fn gguf_name(hf_name: &str) -> String {
    match hf_name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf_name
        .strip_prefix("model.layers.")
        .expect("a layer tensor");
    let (layer, rest) = rest.split_once('.').expect("a layer tensor");
    let short = match rest {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => unreachable!("hf_tensors yields no layer tensor `{other}`"),
    };
    format!("blk.{layer}.{short}.weight")
}

/// The Hugging Face name of a llama.cpp tensor name.
fn hf_name_of(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let long = match rest {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{long}"))
}

/// distillery's model from a llama-architecture GGUF file, quantized tensors dequantized.
pub fn import_llama(file: &GgufFile, device: &burn::tensor::Device) -> Result<Llama, String> {
    let number = |key: &str| match file.value(key) {
        Some(Value::U32(value)) => Ok(*value as usize),
        _ => Err(format!("metadata `{key}` is missing or not a u32")),
    };
    // GGUF keeps these as f32: the shortest decimal that rounds to the stored value is the one
    // the model was configured with (1e-5, not 9.99999974e-6).
    let float = |key: &str| match file.value(key) {
        Some(Value::F32(value)) => Ok(value.to_string().parse::<f64>().expect("a float prints")),
        _ => Err(format!("metadata `{key}` is missing or not an f32")),
    };
    if file.value("general.architecture") != Some(&Value::String("llama".into())) {
        return Err("general.architecture is not \"llama\"".into());
    }
    let config = distillery_model::LlamaConfig {
        vocab_size: number("llama.vocab_size")?,
        hidden_size: number("llama.embedding_length")?,
        intermediate_size: number("llama.feed_forward_length")?,
        num_hidden_layers: number("llama.block_count")?,
        num_attention_heads: number("llama.attention.head_count")?,
        num_key_value_heads: number("llama.attention.head_count_kv")?,
        max_position_embeddings: number("llama.context_length")?,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: float("llama.rope.freq_base")?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
    };
    // Hostile metadata must not size an allocation: the file has to hold that many values.
    let stored: usize = file.tensors.iter().map(|tensor| tensor.values.len()).sum();
    if config.num_parameters() > stored {
        return Err(format!(
            "the metadata describes {} parameters; the file holds {stored} values",
            config.num_parameters()
        ));
    }
    let mut assembly = ModelAssembly::new(&config, "GGUF metadata", device)?;
    let head_dim = config.head_dim();
    for tensor in &file.tensors {
        let name = hf_name_of(&tensor.name)
            .ok_or_else(|| format!("unexpected tensor `{}`", tensor.name))?;
        let shape: Vec<usize> = tensor.dims.iter().rev().map(|&d| d as usize).collect();
        assembly.check(&name, &shape)?;
        let values = match tensor.name.rsplit('.').nth(1) {
            Some("attn_q") => interleaved_to_rotate_half(
                &tensor.values,
                config.num_attention_heads,
                head_dim,
                shape[1],
            ),
            Some("attn_k") => interleaved_to_rotate_half(
                &tensor.values,
                config.num_key_value_heads,
                head_dim,
                shape[1],
            ),
            _ => tensor.values.clone(),
        };
        assembly.put(&name, values)?;
    }
    assembly.finish()
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    let put_u32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    match value {
        Value::U32(v) => {
            put_u32(out, T_UINT32);
            put_u32(out, *v);
        }
        Value::I32(v) => {
            put_u32(out, T_INT32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::F32(v) => {
            put_u32(out, T_FLOAT32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            put_u32(out, T_BOOL);
            out.push(u8::from(*v));
        }
        Value::String(v) => {
            put_u32(out, T_STRING);
            put_string(out, v);
        }
        Value::U64(v) => {
            put_u32(out, T_UINT64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Strings(items) => {
            put_u32(out, T_ARRAY);
            put_u32(out, T_STRING);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_string(out, item);
            }
        }
        Value::I32s(items) => {
            put_u32(out, T_ARRAY);
            put_u32(out, T_INT32);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                out.extend_from_slice(&item.to_le_bytes());
            }
        }
    }
}

fn pad_to_alignment(out: &mut Vec<u8>) {
    let padding = (ALIGNMENT - out.len() as u64 % ALIGNMENT) % ALIGNMENT;
    out.resize(out.len() + padding as usize, 0);
}

/// The bytes of a GGUF file holding `metadata` and `tensors`, each stored as its kind says
/// (quantized tensors need rows of a multiple of 32 values).
pub fn write(metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    for tensor in tensors {
        put_string(&mut out, &tensor.name);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            out.extend_from_slice(&dim.to_le_bytes());
        }
        out.extend_from_slice(&tensor.kind.type_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let bytes = tensor.kind.bytes(tensor.values.len() as u64);
        offset += bytes.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad_to_alignment(&mut out);
    for tensor in tensors {
        out.extend_from_slice(&tensor.kind.encode(&tensor.values));
        pad_to_alignment(&mut out);
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed GGUF at byte {offset}: {message}")]
pub struct GgufError {
    pub offset: usize,
    pub message: String,
}

/// A parsed GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<GgufTensor>,
}

impl GgufFile {
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.metadata
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|tensor| tensor.name == name)
    }
}

/// A cursor that never reads past the end and never allocates more than the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, GgufError> {
        Err(GgufError {
            offset: self.position,
            message: message.into(),
        })
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .position
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.position..end];
                self.position = end;
                Ok(slice)
            }
            None => self.fail(format!("{count} bytes needed, the file ends first")),
        }
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count of items of at least `item_bytes` each that must fit in the rest of the file.
    fn count(&mut self, item_bytes: usize) -> Result<usize, GgufError> {
        let count = self.u64()?;
        let left = (self.bytes.len() - self.position) as u64;
        if count.saturating_mul(item_bytes.max(1) as u64) > left {
            return self.fail(format!("a count of {count} exceeds what the file holds"));
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let length = self.count(1)?;
        let bytes = self.take(length)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_string()),
            Err(_) => self.fail("a string is not UTF-8"),
        }
    }

    fn value(&mut self) -> Result<Value, GgufError> {
        let kind = self.u32()?;
        Ok(match kind {
            T_UINT32 => Value::U32(self.u32()?),
            T_INT32 => Value::I32(self.u32()? as i32),
            T_FLOAT32 => Value::F32(f32::from_bits(self.u32()?)),
            T_BOOL => Value::Bool(self.take(1)?[0] != 0),
            T_STRING => Value::String(self.string()?),
            T_UINT64 => Value::U64(self.u64()?),
            T_ARRAY => {
                let element = self.u32()?;
                match element {
                    T_STRING => {
                        let count = self.count(8)?;
                        Value::Strings(
                            (0..count)
                                .map(|_| self.string())
                                .collect::<Result<_, _>>()?,
                        )
                    }
                    T_INT32 => {
                        let count = self.count(4)?;
                        Value::I32s(
                            (0..count)
                                .map(|_| self.u32().map(|v| v as i32))
                                .collect::<Result<_, _>>()?,
                        )
                    }
                    other => return self.fail(format!("arrays of type {other} are not supported")),
                }
            }
            other => return self.fail(format!("value type {other} is not supported")),
        })
    }
}

/// Parses a GGUF file holding f32, Q8_0 and Q4_0 tensors, dequantizing the quantized ones.
/// Every length, count and offset is checked against the file before it is used.
pub fn read(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let mut cursor = Cursor { bytes, position: 0 };
    if cursor.take(4)? != MAGIC {
        return cursor.fail("not a GGUF file (magic)");
    }
    let version = cursor.u32()?;
    if version != VERSION {
        return cursor.fail(format!("version {version}; 3 is supported"));
    }
    let tensor_count = cursor.count(8)?;
    let metadata_count = cursor.count(12)?;
    let metadata = (0..metadata_count)
        .map(|_| Ok((cursor.string()?, cursor.value()?)))
        .collect::<Result<Vec<_>, GgufError>>()?;
    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = cursor.string()?;
        let rank = cursor.u32()? as usize;
        if rank > 4 {
            return cursor.fail(format!("tensor `{name}` has {rank} dimensions"));
        }
        let dims = (0..rank)
            .map(|_| cursor.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = cursor.u32()?;
        let Some(kind) = TensorKind::from_type_id(type_id) else {
            return cursor.fail(format!(
                "tensor `{name}` has ggml type {type_id}; f32, f16, Q8_0 and Q4_0 are read"
            ));
        };
        if kind.is_blocked() && dims.first().is_none_or(|d| d % BLOCK as u64 != 0) {
            return cursor.fail(format!("tensor `{name}` has rows of a partial block"));
        }
        let offset = cursor.u64()?;
        infos.push((name, dims, kind, offset));
    }
    let alignment = match metadata.iter().find(|(key, _)| key == "general.alignment") {
        Some((_, Value::U32(alignment))) if *alignment > 0 => u64::from(*alignment),
        _ => ALIGNMENT,
    };
    let data_start = (cursor.position as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, kind, offset) in infos {
        let count = dims
            .iter()
            .try_fold(1u64, |product, &dim| product.checked_mul(dim));
        let start = data_start.checked_add(offset);
        let end = match (count, start) {
            (Some(count), Some(start)) if count <= u64::MAX / 4 => {
                start.checked_add(kind.bytes(count))
            }
            _ => None,
        };
        let (Some(start), Some(end)) = (start, end) else {
            return cursor.fail(format!("tensor `{name}` has an impossible size or offset"));
        };
        if end > bytes.len() as u64 {
            return cursor.fail(format!("tensor `{name}` runs past the end of the file"));
        }
        let values = kind.decode(&bytes[start as usize..end as usize]);
        tensors.push(GgufTensor {
            name,
            dims,
            kind,
            values,
        });
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use distillery_model::LlamaConfig;

    use super::*;

    fn model() -> Llama {
        let config = LlamaConfig {
            vocab_size: 6,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
        };
        Llama::new(&config, 0.0, 9, &Device::flex()).unwrap()
    }

    fn vocabulary() -> GgufVocabulary {
        let tokenizer = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true}],
            "model": {
                "type": "BPE",
                "vocab": {"a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġab": 5},
                "merges": ["a b", ["Ġ", "ab"]],
            },
        });
        vocabulary_from_tokenizer_json(&tokenizer, Some(0)).unwrap()
    }

    #[test]
    fn tokenizer_vocabulary_is_ordered_by_id_with_control_tokens_marked() {
        let vocabulary = vocabulary();
        assert_eq!(
            vocabulary.tokens,
            ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"]
        );
        assert_eq!(vocabulary.token_types, [3, 1, 1, 1, 1, 1]);
        assert_eq!(vocabulary.merges, ["a b", "Ġ ab"]);
    }

    #[test]
    fn written_files_read_back_with_llama_names_dims_and_values() {
        let model = model();
        let (metadata, tensors) = llama_contents(&model, "tiny", &vocabulary(), TensorKind::F32);
        let bytes = write(&metadata, &tensors);
        assert_eq!(&bytes[..4], b"GGUF");
        let file = read(&bytes).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.metadata, metadata);
        assert_eq!(
            file.value("llama.attention.head_count_kv"),
            Some(&Value::U32(1))
        );
        assert_eq!(
            file.value("llama.rope.dimension_count"),
            Some(&Value::U32(4))
        );
        assert_eq!(file.tensors.len(), 1 + 2 * 9 + 1, "tied: no output.weight");
        assert!(file.tensor("output.weight").is_none());
        let embedding = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embedding.dims, vec![8, 6]);
        assert_eq!(embedding.values, model.embedding_values());
        let down = file.tensor("blk.1.ffn_down.weight").unwrap();
        assert_eq!(down.dims, vec![12, 8], "innermost (input) dimension first");
        // q and k are in llama.cpp's interleaved rotary layout; undoing it gives Hugging
        // Face's rows back.
        let hf: BTreeMap<String, Vec<f32>> = hf_tensors(&model)
            .into_iter()
            .map(|tensor| (tensor.name, tensor.values))
            .collect();
        let k = file.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!(k.dims, vec![8, 4]);
        assert_eq!(
            interleaved_to_rotate_half(&k.values, 1, 4, 8),
            hf["model.layers.0.self_attn.k_proj.weight"]
        );
        let q = file.tensor("blk.1.attn_q.weight").unwrap();
        assert_ne!(q.values, hf["model.layers.1.self_attn.q_proj.weight"]);
        assert_eq!(
            interleaved_to_rotate_half(&q.values, 2, 4, 8),
            hf["model.layers.1.self_attn.q_proj.weight"]
        );
    }

    #[test]
    fn quantized_files_store_blocks_and_read_back_dequantized() {
        let model = model();
        for (kind, bytes_per_block) in [(TensorKind::Q8_0, 34u64), (TensorKind::Q4_0, 18)] {
            let (metadata, tensors) = llama_contents(&model, "tiny", &vocabulary(), kind);
            let bytes = write(&metadata, &tensors);
            let file = read(&bytes).unwrap();
            assert_eq!(
                file.value("general.quantization_version"),
                Some(&Value::U32(2))
            );
            // Rows of 8 values cannot be blocked: every tensor of this tiny model stays f32...
            assert!(
                file.tensors
                    .iter()
                    .all(|tensor| tensor.kind == TensorKind::F32)
            );
            // ...while a matrix with rows of 32 is stored in blocks.
            let matrix = GgufTensor {
                name: "m".into(),
                dims: vec![64, 2],
                kind,
                values: (0..128).map(|i| (i as f32 - 60.0) / 7.0).collect(),
            };
            let bytes = write(&[], std::slice::from_ref(&matrix));
            let read_back = read(&bytes).unwrap();
            let stored = &read_back.tensors[0];
            assert_eq!(stored.kind, kind);
            let expected = match kind {
                TensorKind::Q8_0 => dequantize_q8_0(&quantize_q8_0(&matrix.values)),
                _ => dequantize_q4_0(&quantize_q4_0(&matrix.values)),
            };
            assert_eq!(stored.values, expected);
            assert_eq!(kind.bytes(128), 4 * bytes_per_block);
        }
    }

    #[test]
    fn int8_matrices_in_groups_of_32_become_q8_0_blocks_unchanged() {
        let config = LlamaConfig {
            vocab_size: 6,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
        };
        let mut model = Llama::new(&config, 0.0, 4, &Device::flex()).unwrap();
        let paths: Vec<String> = model.linears().into_iter().map(|(path, _)| path).collect();
        for path in paths {
            let linear = model.linear_mut(&path).unwrap();
            let (rows, cols) = (linear.d_output(), linear.d_input());
            let matrix =
                distillery_quant::int8_absmax(&linear.weight_out_in(), rows, cols, Some(32))
                    .unwrap();
            *linear = distillery_model::Linear::quantized(
                distillery_quant::PackedMatrix::from_quantized(&matrix),
            );
        }
        let (metadata, tensors) = llama_contents(&model, "int8", &vocabulary(), TensorKind::Q8_0);
        let file = read(&write(&metadata, &tensors)).unwrap();
        for (name, linear) in [
            ("blk.0.ffn_down.weight", &model.layers[0].mlp.down_proj),
            ("blk.0.attn_v.weight", &model.layers[0].self_attn.v_proj),
            ("output.weight", model.lm_head.as_ref().unwrap()),
        ] {
            let stored = file.tensor(name).unwrap();
            assert_eq!(stored.kind, TensorKind::Q8_0);
            assert_eq!(stored.values, linear.weight_out_in(), "{name}");
        }
    }

    #[test]
    fn f16_files_hold_every_matrix_in_half_precision_and_norms_in_f32() {
        let model = model();
        let (metadata, tensors) = llama_contents(&model, "tiny", &vocabulary(), TensorKind::F16);
        let file = read(&write(&metadata, &tensors)).unwrap();
        assert_eq!(file.value("general.file_type"), Some(&Value::U32(1)));
        assert!(file.value("general.quantization_version").is_none());
        let embedding = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embedding.kind, TensorKind::F16);
        let rounded: Vec<f32> = model
            .embedding_values()
            .iter()
            .map(|&v| distillery_quant::f16::round_to_f16(v))
            .collect();
        assert_eq!(embedding.values, rounded);
        assert_eq!(
            file.tensor("blk.0.attn_norm.weight").unwrap().kind,
            TensorKind::F32
        );
        let imported = import_llama(&file, &Device::flex()).unwrap();
        assert_eq!(imported.embedding_values(), rounded);
    }

    #[test]
    fn f32_files_import_back_to_the_same_model() {
        let model = model();
        let (metadata, tensors) = llama_contents(&model, "tiny", &vocabulary(), TensorKind::F32);
        let file = read(&write(&metadata, &tensors)).unwrap();
        let imported = import_llama(&file, &Device::flex()).unwrap();
        assert_eq!(imported.config(), model.config());
        let by_name = |model: &Llama| -> Vec<(String, Vec<f32>)> {
            hf_tensors(model)
                .into_iter()
                .map(|t| (t.name, t.values))
                .collect()
        };
        assert_eq!(by_name(&imported), by_name(&model));
    }

    #[test]
    fn metadata_larger_than_the_file_is_refused_before_allocating() {
        let (mut metadata, tensors) =
            llama_contents(&model(), "tiny", &vocabulary(), TensorKind::F32);
        for (key, value) in &mut metadata {
            if key == "llama.block_count" {
                *value = Value::U32(1 << 24);
            }
        }
        let file = read(&write(&metadata, &tensors)).unwrap();
        let error = import_llama(&file, &Device::flex())
            .map(|_| ())
            .unwrap_err();
        assert!(error.contains("the file holds"), "{error}");
    }

    #[test]
    fn data_starts_aligned() {
        let (metadata, tensors) = llama_contents(&model(), "tiny", &vocabulary(), TensorKind::F32);
        let bytes = write(&metadata, &tensors);
        assert_eq!(bytes.len() as u64 % ALIGNMENT, 0);
    }

    #[test]
    fn truncated_and_hostile_files_are_errors() {
        let (metadata, tensors) = llama_contents(&model(), "tiny", &vocabulary(), TensorKind::F32);
        let bytes = write(&metadata, &tensors);
        for length in [0, 3, 10, 24, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                read(&bytes[..length]).is_err(),
                "a file cut at {length} bytes"
            );
        }
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert!(read(&wrong_magic).unwrap_err().message.contains("magic"));
        // A metadata count of 2^60 must be refused before anything is allocated for it.
        let mut huge_count = bytes.clone();
        huge_count[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(read(&huge_count).unwrap_err().message.contains("exceeds"));
        // A string length past the end of the file.
        let mut long_string = bytes;
        long_string[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read(&long_string).is_err());
    }
}
