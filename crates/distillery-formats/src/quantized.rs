//! Quantized models on disk: a Hugging Face Llama folder whose quantized matrices are stored
//! as GPTQ tensors in AutoGPTQ's v1 layout (`qweight` int32 packed along the inputs, `qzeros`
//! int32 holding each zero minus one packed along the outputs, `scales` f16, `g_idx` int32),
//! with `quantize_config.json` and `config.json`'s `quantization_config` as AutoGPTQ and
//! `transformers` write them. Float tensors (norms, and the embedding and head unless they were
//! quantized) stay f32.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use distillery_model::Llama;
use distillery_quant::{GptqSettings, GptqTensors, PackedMatrix};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::assembly::ModelAssembly;
use crate::hf::{
    CONFIG_FILE, HfError, RawTensor, TokenizerFiles, WEIGHTS_FILE, config_json, error, hf_tensors,
    pretty_json, read_quantized_config, safetensors_file, write_model_folder,
};
use crate::names::hf_name;

pub const QUANTIZE_CONFIG_FILE: &str = "quantize_config.json";
/// What distillery records beyond AutoGPTQ's keys: the method, the source checkpoint, the
/// calibration data and the time it took.
pub const RECORD_FILE: &str = "distillery_quantization.json";

const GPTQ_PARTS: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

/// AutoGPTQ's `quantize_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptqConfig {
    pub bits: u32,
    /// -1 for one group per output channel.
    pub group_size: i64,
    pub damp_percent: f64,
    /// Act-order.
    pub desc_act: bool,
    pub static_groups: bool,
    pub sym: bool,
    pub true_sequential: bool,
    pub model_name_or_path: Option<String>,
    pub model_file_base_name: String,
    pub quant_method: String,
    pub checkpoint_format: String,
}

impl GptqConfig {
    /// The `quantize_config.json` of a model quantized with `settings`, its layers' groups of
    /// matrices calibrated one after another when `true_sequential`.
    pub fn new(settings: &GptqSettings, true_sequential: bool) -> Self {
        let quant = &settings.quant;
        Self {
            bits: quant.bits,
            group_size: quant.group_size.map_or(-1, |size| size as i64),
            damp_percent: settings.damp_percent,
            desc_act: settings.act_order,
            static_groups: settings.static_groups,
            sym: quant.symmetric,
            true_sequential,
            model_name_or_path: None,
            model_file_base_name: "model".into(),
            quant_method: "gptq".into(),
            checkpoint_format: "gptq".into(),
        }
    }
}

/// A quantized model read back, with what its files hold.
pub struct QuantizedModel {
    pub model: Llama,
    pub config: GptqConfig,
    /// The contents of [`RECORD_FILE`].
    pub record: serde_json::Value,
    /// Size of `model.safetensors`.
    pub file_bytes: u64,
    pub storage: StorageSummary,
}

/// Where the bits of a model's weights go, counted from the stored tensors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StorageSummary {
    /// Bytes of every weight tensor (GPTQ tensors included).
    pub tensor_bytes: u64,
    pub parameters: u64,
    /// Bytes of the GPTQ tensors alone, and the weights they stand for.
    pub quantized_bytes: u64,
    pub quantized_weights: u64,
}

impl StorageSummary {
    /// Stored bits per model parameter.
    pub fn bits_per_weight(&self) -> f64 {
        self.tensor_bytes as f64 * 8.0 / self.parameters as f64
    }

    /// Stored bits per quantized weight, scales, zeros and group indices included.
    pub fn quantized_bits_per_weight(&self) -> Option<f64> {
        (self.quantized_weights > 0)
            .then(|| self.quantized_bytes as f64 * 8.0 / self.quantized_weights as f64)
    }
}

/// The quantized matrices of `model` by Hugging Face tensor-name prefix
/// (`model.layers.0.self_attn.q_proj`).
fn packed_matrices(model: &Llama) -> BTreeMap<String, &PackedMatrix> {
    let matrices = std::iter::once(("embed_tokens".to_string(), model.packed_embedding())).chain(
        model
            .linears()
            .into_iter()
            .map(|(path, linear)| (format!("{path}.weight"), linear.packed())),
    );
    matrices
        .filter_map(|(path, matrix)| {
            let name = hf_name(&path).expect("every parameter has a Hugging Face name");
            let prefix = name
                .strip_suffix(".weight")
                .expect("weights end in .weight");
            Some((prefix.to_string(), matrix?))
        })
        .collect()
}

/// `model.safetensors` of a quantized model: float tensors as f32, quantized ones as GPTQ
/// tensors.
pub fn safetensors_bytes(model: &Llama) -> Result<Vec<u8>, distillery_quant::QuantError> {
    let packed = packed_matrices(model);
    let mut tensors = Vec::new();
    for tensor in hf_tensors(model) {
        let prefix = tensor.name.strip_suffix(".weight").unwrap_or(&tensor.name);
        let Some(matrix) = packed.get(prefix) else {
            tensors.push(RawTensor {
                name: tensor.name,
                dtype: Dtype::F32,
                shape: tensor.shape,
                bytes: tensor.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
            continue;
        };
        let gptq = matrix.to_gptq()?;
        let words =
            |values: &[u32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let [qweight, qzeros, scales, g_idx] = gptq.shapes();
        for (part, dtype, shape, bytes) in [
            ("qweight", Dtype::I32, qweight, words(&gptq.qweight)),
            ("qzeros", Dtype::I32, qzeros, words(&gptq.qzeros)),
            (
                "scales",
                Dtype::F16,
                scales,
                gptq.scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            ("g_idx", Dtype::I32, g_idx, words(&gptq.g_idx)),
        ] {
            tensors.push(RawTensor {
                name: format!("{prefix}.{part}"),
                dtype,
                shape,
                bytes,
            });
        }
    }
    Ok(safetensors_file(tensors))
}

/// What [`save`] writes.
pub struct QuantizedFolder<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Path,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub config: &'a GptqConfig,
    /// Written as [`RECORD_FILE`].
    pub record: &'a serde_json::Value,
}

/// Writes a quantized model as a folder at `dir`, assembled beside it and renamed into place;
/// an existing `dir` is an error unless `replace`.
pub fn save(folder: &QuantizedFolder, dir: &Path, replace: bool) -> Result<(), HfError> {
    let QuantizedFolder {
        model,
        tokenizer,
        bos_token_id,
        eos_token_id,
        config,
        record,
    } = *folder;
    let weights =
        safetensors_bytes(model).map_err(|e| error(dir, format!("cannot store the model: {e}")))?;
    let config_text = config_json(model.config(), bos_token_id, eos_token_id)
        .map_err(|message| error(dir, message))?;
    let mut hf_config: serde_json::Value =
        serde_json::from_str(&config_text).expect("config_json writes json");
    hf_config["quantization_config"] = serde_json::to_value(config).expect("json");
    let files = vec![
        (CONFIG_FILE, pretty_json(&hf_config)),
        (WEIGHTS_FILE, weights),
        (
            QUANTIZE_CONFIG_FILE,
            pretty_json(&serde_json::to_value(config).expect("json")),
        ),
        (RECORD_FILE, pretty_json(record)),
    ];
    let tokens = TokenizerFiles {
        config: model.config(),
        tokenizer,
        bos_token_id,
        eos_token_id,
    };
    write_model_folder(dir, files, &tokens, replace)
}

/// Whether `dir` holds a quantized model.
pub fn is_quantized_dir(dir: &Path) -> bool {
    dir.join(QUANTIZE_CONFIG_FILE).is_file()
}

/// Reads a folder written by [`save`] (or any single-file GPTQ Llama folder in the v1 layout).
/// Every tensor is checked against `config.json` and `quantize_config.json`: a missing,
/// unexpected or misshapen tensor is an error naming it.
pub fn load(dir: &Path, device: &Device) -> Result<QuantizedModel, HfError> {
    let config = read_quantized_config(dir)?;
    let quantize_path = dir.join(QUANTIZE_CONFIG_FILE);
    let text = std::fs::read_to_string(&quantize_path)
        .map_err(|e| error(&quantize_path, e.to_string()))?;
    let gptq: GptqConfig = serde_json::from_str(&text)
        .map_err(|e| error(&quantize_path, format!("not a GPTQ quantize config: {e}")))?;
    distillery_quant::settings::check_bits(gptq.bits)
        .map_err(|message| error(&quantize_path, message.to_string()))?;
    let record_path = dir.join(RECORD_FILE);
    let record = match std::fs::read_to_string(&record_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| error(&record_path, format!("invalid json: {e}")))?,
        Err(_) => serde_json::Value::Null,
    };
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| error(&path, e.to_string()))?;
    // A hostile config.json must not size an allocation: the weights, at `bits` bits a value
    // at least, have to be there.
    if config.num_parameters() as u64 * u64::from(gptq.bits) > bytes.len() as u64 * 8 {
        return Err(error(
            dir,
            format!(
                "config.json describes {} parameters; {WEIGHTS_FILE} holds {} bytes",
                config.num_parameters(),
                bytes.len()
            ),
        ));
    }
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| error(&path, format!("not a safetensors file: {e}")))?;
    let mut assembly =
        ModelAssembly::new(&config, "config.json", device).map_err(|e| error(dir, e))?;
    let mut parts: BTreeMap<String, BTreeMap<String, safetensors::tensor::TensorView>> =
        BTreeMap::new();
    let mut storage = StorageSummary {
        tensor_bytes: 0,
        parameters: config.num_parameters() as u64,
        quantized_bytes: 0,
        quantized_weights: 0,
    };
    for (name, view) in tensors.tensors() {
        storage.tensor_bytes += view.data().len() as u64;
        if let Some((prefix, part)) = name.rsplit_once('.')
            && GPTQ_PARTS.contains(&part)
        {
            storage.quantized_bytes += view.data().len() as u64;
            parts
                .entry(prefix.to_string())
                .or_default()
                .insert(part.to_string(), view);
            continue;
        }
        assembly
            .put_view(&name, &view)
            .map_err(|message| error(&path, message))?;
    }
    for (prefix, views) in parts {
        let packed = packed_from_views(&prefix, &views, gptq.bits)
            .map_err(|message| error(&path, message))?;
        storage.quantized_weights += (packed.rows() * packed.cols()) as u64;
        assembly
            .put_quantized(&format!("{prefix}.weight"), packed)
            .map_err(|message| error(&path, message))?;
    }
    let model = assembly.finish().map_err(|message| error(&path, message))?;
    Ok(QuantizedModel {
        model,
        config: gptq,
        record,
        file_bytes: bytes.len() as u64,
        storage,
    })
}

/// One quantized matrix from its four GPTQ tensors, every dtype and shape checked.
fn packed_from_views(
    prefix: &str,
    views: &BTreeMap<String, safetensors::tensor::TensorView>,
    bits: u32,
) -> Result<PackedMatrix, String> {
    let view = |part: &str, dtype: Dtype, rank: usize| {
        let view = views
            .get(part)
            .ok_or_else(|| format!("`{prefix}` lacks its `{part}` tensor"))?;
        if view.dtype() != dtype || view.shape().len() != rank {
            return Err(format!(
                "`{prefix}.{part}` is {:?} {:?}; a {rank}-d {dtype:?} tensor expected",
                view.dtype(),
                view.shape()
            ));
        }
        Ok(view)
    };
    let words = |view: &safetensors::tensor::TensorView| -> Vec<u32> {
        view.data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let qweight = view("qweight", Dtype::I32, 2)?;
    let qzeros = view("qzeros", Dtype::I32, 2)?;
    let scales = view("scales", Dtype::F16, 2)?;
    let g_idx = view("g_idx", Dtype::I32, 1)?;
    let tensors = GptqTensors {
        bits,
        rows: scales.shape()[1],
        cols: g_idx.shape()[0],
        groups: scales.shape()[0],
        qweight: words(qweight),
        qzeros: words(qzeros),
        scales: scales
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
        g_idx: words(g_idx),
    };
    let expected = tensors.shapes();
    for ((part, view), expected) in GPTQ_PARTS
        .iter()
        .zip([qweight, qzeros, scales, g_idx])
        .zip(expected)
    {
        if view.shape() != expected.as_slice() {
            return Err(format!(
                "`{prefix}.{part}` has shape {:?}; {bits}-bit GPTQ with scales {:?} and g_idx \
                 {:?} implies {expected:?}",
                view.shape(),
                scales.shape(),
                g_idx.shape()
            ));
        }
    }
    PackedMatrix::from_gptq(&tensors).map_err(|e| format!("`{prefix}`: {e}"))
}

#[cfg(test)]
mod tests {
    use distillery_model::{Linear, LlamaConfig};
    use distillery_quant::{QuantSettings, round_to_nearest};

    use super::*;

    fn shape() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }

    /// A model whose embedding and every linear layer but the head are 4-bit.
    fn quantized_model(device: &Device) -> Llama {
        let mut model = Llama::new(&shape(), 0.0, 6, device).unwrap();
        let settings = QuantSettings {
            bits: 4,
            group_size: Some(16),
            symmetric: false,
            clip_search: false,
        };
        let quantize = |values: &[f32], rows, cols| {
            PackedMatrix::from_quantized(&round_to_nearest(values, rows, cols, &settings).unwrap())
        };
        let embedding = quantize(&model.embedding_values(), 64, 32);
        model.set_packed_embedding(embedding);
        let paths: Vec<String> = model
            .linears()
            .into_iter()
            .map(|(path, _)| path)
            .filter(|path| path != "lm_head")
            .collect();
        for path in paths {
            let linear = model.linear_mut(&path).unwrap();
            let packed = quantize(&linear.weight_out_in(), linear.d_output(), linear.d_input());
            *linear = Linear::quantized(packed);
        }
        model
    }

    fn save_to(model: &Llama, dir: &Path) {
        let tokenizer = dir.with_file_name("tokenizer.json");
        std::fs::write(&tokenizer, "{}").unwrap();
        let settings = GptqSettings {
            quant: QuantSettings {
                bits: 4,
                group_size: Some(16),
                symmetric: false,
                clip_search: false,
            },
            damp_percent: 0.01,
            block_size: 128,
            act_order: false,
            static_groups: false,
        };
        let config = GptqConfig::new(&settings, true);
        let folder = QuantizedFolder {
            model,
            tokenizer: &tokenizer,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            config: &config,
            record: &serde_json::json!({ "label": "rtn-4bit-g16-asym" }),
        };
        save(&folder, dir, true).unwrap();
    }

    fn logits(model: &Llama) -> Vec<f32> {
        let ids: Vec<i64> = (0..12).map(|i| (i * 5 + 1) % 64).collect();
        crate::testing::logits(model, ids, [1, 12])
    }

    #[test]
    fn a_saved_quantized_model_loads_back_identical() {
        let device = Device::flex();
        let model = quantized_model(&device);
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model-rtn");
        save_to(&model, &dir);
        assert!(is_quantized_dir(&dir));
        let loaded = load(&dir, &device).unwrap();
        assert_eq!(loaded.config.bits, 4);
        assert_eq!(loaded.record["label"], "rtn-4bit-g16-asym");
        assert_eq!(loaded.model.packed_embedding(), model.packed_embedding());
        for ((path, original), (_, restored)) in
            model.linears().into_iter().zip(loaded.model.linears())
        {
            assert_eq!(original.packed(), restored.packed(), "{path}");
        }
        assert_eq!(logits(&loaded.model), logits(&model));
        // Everything but the f32 head and norms is 4-bit with scales, zeros and group indices.
        let storage = loaded.storage;
        assert_eq!(storage.parameters, shape().num_parameters() as u64);
        let matrices: Vec<&PackedMatrix> = packed_matrices(&model).into_values().collect();
        let bytes: usize = matrices.iter().map(|matrix| matrix.stored_bytes()).sum();
        let weights: usize = matrices.iter().map(|m| m.rows() * m.cols()).sum();
        assert_eq!(storage.quantized_bytes, bytes as u64);
        assert_eq!(storage.quantized_weights, weights as u64);
        let bits = storage.quantized_bits_per_weight().unwrap();
        assert!(bits > 4.0, "{bits}");

        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["quantization_config"]["quant_method"], "gptq");
        assert_eq!(config["quantization_config"]["desc_act"], false);
        let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let tensors = SafeTensors::deserialize(&weights).unwrap();
        let qweight = tensors
            .tensor("model.layers.1.mlp.down_proj.qweight")
            .unwrap();
        assert_eq!(qweight.dtype(), Dtype::I32);
        assert_eq!(qweight.shape(), [64 * 4 / 32, 32]);
        assert_eq!(
            tensors
                .tensor("model.layers.1.mlp.down_proj.scales")
                .unwrap()
                .shape(),
            [4, 32]
        );
        assert!(tensors.tensor("lm_head.weight").is_ok());
        assert!(tensors.tensor("model.embed_tokens.weight").is_err());

        // A GPTQ export keeps the decoder layers' matrices and turns the embedding into floats.
        let exported = model.with_float_embedding_and_head();
        assert_eq!(exported.embedding_values(), model.embedding_values());
        assert!(exported.packed_embedding().is_none());
        assert_eq!(logits(&exported), logits(&model));

        // Saving again replaces the folder.
        save_to(&Llama::new(&shape(), 0.0, 7, &device).unwrap(), &dir);
        assert!(load(&dir, &device).unwrap().storage.quantized_weights == 0);
    }

    #[test]
    fn truncated_or_corrupted_weights_are_errors_never_panics() {
        let device = Device::flex();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        save_to(&quantized_model(&device), &dir);
        let path = dir.join(WEIGHTS_FILE);
        let valid = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
        for cut in (0..valid.len()).step_by(valid.len() / 40) {
            std::fs::write(&path, &valid[..cut]).unwrap();
            assert!(
                load(&dir, &device).is_err(),
                "a file cut at {cut} bytes loaded"
            );
        }
        // Every byte of the header, and data bytes all over the file, flipped one at a time:
        // each load ends in a model or an error, and a panic fails the test.
        let positions = (0..8 + header_len).chain((8 + header_len..valid.len()).step_by(97));
        for position in positions {
            let mut damaged = valid.clone();
            damaged[position] ^= 0x5A;
            std::fs::write(&path, &damaged).unwrap();
            let _ = load(&dir, &device);
        }
    }

    #[test]
    fn damaged_quantized_folders_are_errors_naming_the_tensor() {
        let device = Device::flex();
        let model = quantized_model(&device);
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        save_to(&model, &dir);
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let rewrite = |skip: &str, reshape: Option<(&str, Vec<usize>)>| {
            let raw: Vec<RawTensor> = tensors
                .tensors()
                .into_iter()
                .filter(|(name, _)| name != skip)
                .map(|(name, view)| {
                    let mut shape = view.shape().to_vec();
                    if let Some((target, new_shape)) = &reshape
                        && name == *target
                    {
                        shape = new_shape.clone();
                    }
                    RawTensor {
                        name,
                        dtype: view.dtype(),
                        shape,
                        bytes: view.data().to_vec(),
                    }
                })
                .collect();
            std::fs::write(dir.join(WEIGHTS_FILE), safetensors_file(raw)).unwrap();
            load(&dir, &device)
                .err()
                .expect("the folder is damaged")
                .to_string()
        };
        let missing = rewrite("model.layers.0.mlp.up_proj.qzeros", None);
        assert!(
            missing.contains("`model.layers.0.mlp.up_proj` lacks its `qzeros` tensor"),
            "{missing}"
        );
        let misshapen = rewrite(
            "",
            Some(("model.layers.1.self_attn.q_proj.qweight", vec![32, 4])),
        );
        assert!(
            misshapen.contains("`model.layers.1.self_attn.q_proj.qweight` has shape [32, 4]"),
            "{misshapen}"
        );
        let no_head = rewrite("lm_head.weight", None);
        assert!(
            no_head.contains("missing tensors: lm_head.weight"),
            "{no_head}"
        );
        std::fs::write(dir.join(QUANTIZE_CONFIG_FILE), r#"{"bits": 5}"#).unwrap();
        let bad_config = load(&dir, &device).err().unwrap().to_string();
        assert!(bad_config.contains("quantize_config.json"), "{bad_config}");
    }
}
