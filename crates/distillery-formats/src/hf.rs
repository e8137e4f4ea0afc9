//! Hugging Face Llama folders: `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), tensors named as `transformers` names them, linear weights
//! in `[out, in]` layout. distillery's model uses the same rotate-half rotary layout, so q and k
//! rows need no permutation here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use distillery_model::{Linear, Llama, LlamaConfig};
use distillery_quant::PackedMatrix;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::names::{distillery_path, hf_name};
use distillery_quant::f16::f16_to_f32;

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

/// The fields of a Hugging Face Llama `config.json` that decide the model. The file holds many
/// more (token ids, dtype, generation defaults); those are ignored, and features distillery's
/// model does not have are refused.
#[derive(Debug, Deserialize)]
struct HfConfigFile {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    head_dim: Option<usize>,
}

/// Reads a Hugging Face Llama `config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, HfError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| error(&path, e.to_string()))?;
    let file: HfConfigFile = serde_json::from_str(&text)
        .map_err(|e| error(&path, format!("not a Llama config: {e}")))?;
    let unsupported = |what: &str| Err(error(&path, format!("{what} is not supported")));
    if let Some(model_type) = &file.model_type
        && model_type != "llama"
    {
        return unsupported(&format!("model_type \"{model_type}\""));
    }
    if let Some(act) = &file.hidden_act
        && act != "silu"
    {
        return unsupported(&format!("hidden_act \"{act}\""));
    }
    if file.attention_bias == Some(true) || file.mlp_bias == Some(true) {
        return unsupported("a bias in the attention or MLP projections");
    }
    if file
        .rope_scaling
        .as_ref()
        .is_some_and(|value| !value.is_null())
    {
        return unsupported("rope_scaling");
    }
    if let Some(head_dim) = file.head_dim
        && head_dim * file.num_attention_heads != file.hidden_size
    {
        return unsupported(&format!(
            "head_dim {head_dim} other than hidden_size / heads"
        ));
    }
    let config = LlamaConfig {
        vocab_size: file.vocab_size,
        hidden_size: file.hidden_size,
        intermediate_size: file.intermediate_size,
        num_hidden_layers: file.num_hidden_layers,
        num_attention_heads: file.num_attention_heads,
        num_key_value_heads: file.num_key_value_heads.unwrap_or(file.num_attention_heads),
        max_position_embeddings: file.max_position_embeddings,
        rms_norm_eps: file.rms_norm_eps,
        rope_theta: file.rope_theta.unwrap_or(10000.0),
        tie_word_embeddings: file.tie_word_embeddings.unwrap_or(false),
    };
    config.validate().map_err(|e| error(&path, e.to_string()))?;
    Ok(config)
}

/// `config.json` for `config` as `transformers` writes it for `LlamaForCausalLM`.
pub fn config_json(
    config: &LlamaConfig,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
) -> String {
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
    serde_json::to_string_pretty(&value).expect("json serializes")
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

/// Little-endian f32, f16 or bf16 tensor bytes as f32 values.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        ),
        _ => None,
    }
}

/// A model of a given architecture filled tensor by tensor from Hugging Face-named tensors:
/// every name must be one the model has, with the shape the architecture implies, and none may
/// be missing at the end.
pub(crate) struct ModelAssembly {
    /// What the architecture came from, for errors: `config.json`, the GGUF metadata.
    source: &'static str,
    model: Llama,
    expected: BTreeMap<String, Vec<usize>>,
    loaded: BTreeSet<String>,
    device: Device,
}

impl ModelAssembly {
    pub(crate) fn new(
        config: &LlamaConfig,
        source: &'static str,
        device: &Device,
    ) -> Result<Self, String> {
        let model = Llama::new(config, 0.0, 0, device).map_err(|e| e.to_string())?;
        let expected = hf_tensors(&model)
            .into_iter()
            .map(|tensor| (tensor.name, tensor.shape))
            .collect();
        Ok(Self {
            source,
            model,
            expected,
            loaded: BTreeSet::new(),
            device: device.clone(),
        })
    }

    /// Checks `name` and `shape` (Hugging Face layout) before the values are decoded.
    pub(crate) fn check(&self, name: &str, shape: &[usize]) -> Result<(), String> {
        match self.expected.get(name) {
            None => Err(format!(
                "unexpected tensor `{name}` for this {}",
                self.source
            )),
            Some(expected) if expected != shape => Err(format!(
                "tensor `{name}` has shape {shape:?}; {} implies {expected:?}",
                self.source
            )),
            Some(_) => Ok(()),
        }
    }

    /// Stores a tensor that passed [`check`](Self::check).
    pub(crate) fn put(&mut self, name: &str, values: Vec<f32>) -> Result<(), String> {
        let shape = self.expected[name].clone();
        let path = distillery_path(name).map_err(|e| e.to_string())?;
        assign(&mut self.model, &path, values, &shape, &self.device);
        self.loaded.insert(name.to_string());
        Ok(())
    }

    /// Checks and stores a float tensor (f32, f16 or bf16) read from a safetensors file.
    pub(crate) fn put_view(
        &mut self,
        name: &str,
        view: &safetensors::tensor::TensorView,
    ) -> Result<(), String> {
        self.check(name, view.shape())?;
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            format!(
                "tensor `{name}` is {:?}; f32, f16 or bf16 expected",
                view.dtype()
            )
        })?;
        self.put(name, values)
    }

    /// Stores a quantized matrix for the weight `name` (Hugging Face's name of the float
    /// weight), whose `[out, in]` shape it must have.
    pub(crate) fn put_packed(&mut self, name: &str, packed: PackedMatrix) -> Result<(), String> {
        self.check(name, &[packed.rows(), packed.cols()])?;
        let path = distillery_path(name).map_err(|e| e.to_string())?;
        if path == "embed_tokens" {
            self.model.set_packed_embedding(packed);
        } else {
            let layer = path
                .strip_suffix(".weight")
                .and_then(|layer| self.model.linear_mut(layer))
                .ok_or_else(|| format!("`{name}` is not a matrix that can be quantized"))?;
            *layer = Linear::quantized(packed);
        }
        self.loaded.insert(name.to_string());
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<Llama, String> {
        let missing: Vec<&str> = self
            .expected
            .keys()
            .filter(|name| !self.loaded.contains(*name))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            Ok(self.model)
        } else {
            Err(format!("missing tensors: {}", missing.join(", ")))
        }
    }
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

/// A float linear layer from a `[out, in]` (Hugging Face layout) row-major weight. Transposed
/// here, not as a tensor view: a strided weight would take another matmul path and change the
/// logits in their last bits.
pub(crate) fn float_linear(
    out_in: &[f32],
    outputs: usize,
    inputs: usize,
    device: &Device,
) -> Linear {
    let transposed: Vec<f32> = (0..inputs * outputs)
        .map(|index| out_in[(index % outputs) * inputs + index / outputs])
        .collect();
    Linear::new(Param::from_tensor(Tensor::<2>::from_data(
        TensorData::new(transposed, [inputs, outputs]),
        device,
    )))
}

/// Puts a Hugging Face tensor (already shape-checked) into the parameter at `path`.
fn assign(model: &mut Llama, path: &str, values: Vec<f32>, shape: &[usize], device: &Device) {
    let matrix = |values: Vec<f32>| {
        Tensor::<2>::from_data(TensorData::new(values, [shape[0], shape[1]]), device)
    };
    let vector = |values: Vec<f32>| {
        Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(values, [shape[0]]),
            device,
        ))
    };
    let linear = |values: Vec<f32>| float_linear(&values, shape[0], shape[1], device);
    match path {
        "embed_tokens" => model.set_embedding(Param::from_tensor(matrix(values))),
        "norm.gamma" => model.norm.gamma = vector(values),
        "lm_head.weight" => model.lm_head = Some(linear(values)),
        _ => {
            let rest = path.strip_prefix("layers.").expect("names were mapped");
            let (index, rest) = rest.split_once('.').expect("names were mapped");
            let layer = &mut model.layers[index.parse::<usize>().expect("a layer index")];
            match rest {
                "input_layernorm.gamma" => layer.input_layernorm.gamma = vector(values),
                "post_attention_layernorm.gamma" => {
                    layer.post_attention_layernorm.gamma = vector(values)
                }
                "self_attn.q_proj.weight" => layer.self_attn.q_proj = linear(values),
                "self_attn.k_proj.weight" => layer.self_attn.k_proj = linear(values),
                "self_attn.v_proj.weight" => layer.self_attn.v_proj = linear(values),
                "self_attn.o_proj.weight" => layer.self_attn.o_proj = linear(values),
                "mlp.gate_proj.weight" => layer.mlp.gate_proj = linear(values),
                "mlp.up_proj.weight" => layer.mlp.up_proj = linear(values),
                "mlp.down_proj.weight" => layer.mlp.down_proj = linear(values),
                other => unreachable!("the name table has no layer parameter `{other}`"),
            }
        }
    }
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
            config_json(model.config(), bos_token_id, eos_token_id).into_bytes(),
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
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
    });
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
fn write_folder(dir: &Path, files: &[(&str, Vec<u8>)], replace: bool) -> Result<(), HfError> {
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
    let staging = sibling(".tmp-");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| error(&staging, e.to_string()))?;
    for (file, bytes) in files {
        let path = staging.join(file);
        std::fs::write(&path, bytes).map_err(|e| error(&path, e.to_string()))?;
    }
    if dir.exists() {
        let old = sibling(".old-");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| error(dir, e.to_string()))?;
        std::fs::rename(&staging, dir).map_err(|e| error(dir, e.to_string()))?;
        return std::fs::remove_dir_all(&old).map_err(|e| error(&old, e.to_string()));
    }
    std::fs::rename(&staging, dir).map_err(|e| error(dir, e.to_string()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Int;

    use super::*;

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
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 7, 30, 2, 47, 5], [2, 3]),
            &Device::flex(),
        );
        model
            .forward(tokens)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
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

    #[test]
    fn configs_with_features_distillery_lacks_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&config_json(&shape(false), None, None)).unwrap();
        config["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        std::fs::write(root.path().join(CONFIG_FILE), config.to_string()).unwrap();
        let error = read_config(root.path()).unwrap_err().to_string();
        assert!(error.contains("rope_scaling is not supported"), "{error}");
        config["rope_scaling"] = serde_json::Value::Null;
        config["model_type"] = "mistral".into();
        std::fs::write(root.path().join(CONFIG_FILE), config.to_string()).unwrap();
        let error = read_config(root.path()).unwrap_err().to_string();
        assert!(error.contains("model_type \"mistral\""), "{error}");
    }
}
