//! A model assembled tensor by tensor from a file: every Hugging Face-named tensor must be one
//! the architecture has, with the shape it implies, and none may be missing at the end.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use distillery_model::{LayerMatrix, LayerWeights, Llama, LlamaConfig, LlamaWeights, Weight};
use distillery_quant::QuantizedWeight;
use safetensors::Dtype;

use crate::names::layer_tensor_names;

/// The tensors of a Hugging Face Llama checkpoint of `config`, with their shapes (`[out, in]`
/// for matrices).
pub fn hf_shapes(config: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let hidden = config.hidden_size;
    let mut shapes = BTreeMap::new();
    shapes.insert(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, hidden],
    );
    shapes.insert("model.norm.weight".into(), vec![hidden]);
    if !config.tie_word_embeddings {
        shapes.insert("lm_head.weight".into(), vec![config.vocab_size, hidden]);
    }
    for layer in 0..config.num_hidden_layers {
        let names = layer_tensor_names(layer);
        shapes.insert(names.input_layernorm, vec![hidden]);
        shapes.insert(names.post_attention_layernorm, vec![hidden]);
        for (matrix, name) in LayerMatrix::ALL.into_iter().zip(names.matrices) {
            let (inputs, outputs) = matrix.shape(config);
            shapes.insert(name, vec![outputs, inputs]);
        }
    }
    shapes
}

enum Slot {
    Vector(Tensor<1>),
    Matrix(Weight),
}

pub(crate) struct ModelAssembly {
    /// What the architecture came from, for errors: `config.json`, the GGUF metadata.
    source: &'static str,
    config: LlamaConfig,
    expected: BTreeMap<String, Vec<usize>>,
    slots: BTreeMap<String, Slot>,
    device: Device,
}

impl ModelAssembly {
    pub(crate) fn new(
        config: &LlamaConfig,
        source: &'static str,
        device: &Device,
    ) -> Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        Ok(Self {
            source,
            config: config.clone(),
            expected: hf_shapes(config),
            slots: BTreeMap::new(),
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
            Some(_) if self.slots.contains_key(name) => {
                Err(format!("tensor `{name}` appears twice"))
            }
            Some(_) => Ok(()),
        }
    }

    /// Stores the float values of a tensor that passed [`check`](Self::check).
    pub(crate) fn put(&mut self, name: &str, values: Vec<f32>) {
        let shape = &self.expected[name];
        let slot = match *shape.as_slice() {
            [length] => Slot::Vector(Tensor::from_data(
                TensorData::new(values, [length]),
                &self.device,
            )),
            [rows, cols] if name == "model.embed_tokens.weight" => Slot::Matrix(Weight::float(
                Tensor::from_data(TensorData::new(values, [rows, cols]), &self.device),
            )),
            [outputs, inputs] => Slot::Matrix(Weight::float(distillery_model::in_out_weight(
                &values,
                outputs,
                inputs,
                &self.device,
            ))),
            _ => unreachable!("tensors are vectors or matrices"),
        };
        self.slots.insert(name.to_string(), slot);
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
        self.put(name, values);
        Ok(())
    }

    /// Stores a quantized matrix for the weight `name` (Hugging Face's name of the float
    /// weight), whose `[out, in]` shape it must have.
    pub(crate) fn put_quantized(
        &mut self,
        name: &str,
        weight: impl Into<QuantizedWeight>,
    ) -> Result<(), String> {
        let weight = weight.into();
        self.check(name, &[weight.rows(), weight.cols()])?;
        if self.expected[name].len() != 2 {
            return Err(format!("`{name}` is not a matrix that can be quantized"));
        }
        self.slots
            .insert(name.to_string(), Slot::Matrix(Weight::quantized(weight)));
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<Llama, String> {
        let missing: Vec<&str> = self
            .expected
            .keys()
            .filter(|name| !self.slots.contains_key(*name))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing tensors: {}", missing.join(", ")));
        }
        let mut take = |name: &str| self.slots.remove(name).expect("every tensor is present");
        let vector = |slot: Slot| match slot {
            Slot::Vector(values) => values,
            Slot::Matrix(_) => unreachable!("shapes were checked"),
        };
        let matrix = |slot: Slot| match slot {
            Slot::Matrix(weight) => weight,
            Slot::Vector(_) => unreachable!("shapes were checked"),
        };
        let layers = (0..self.config.num_hidden_layers)
            .map(|layer| {
                let names = layer_tensor_names(layer);
                LayerWeights {
                    input_layernorm: vector(take(&names.input_layernorm)),
                    post_attention_layernorm: vector(take(&names.post_attention_layernorm)),
                    matrices: names.matrices.map(|name| matrix(take(&name))),
                }
            })
            .collect();
        let weights = LlamaWeights {
            embed_tokens: matrix(take("model.embed_tokens.weight")),
            layers,
            norm: vector(take("model.norm.weight")),
            lm_head: (!self.config.tie_word_embeddings).then(|| matrix(take("lm_head.weight"))),
        };
        Llama::from_weights(&self.config, weights, &self.device).map_err(|e| e.to_string())
    }
}

/// Little-endian f32, f16 or bf16 tensor bytes as f32 values.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use distillery_quant::ggml::{self, GgmlType};
    let kind = match dtype {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::Bf16,
        _ => return None,
    };
    let mut values = vec![0.0; bytes.len() / kind.block_bytes()];
    ggml::dequantize(kind, bytes, &mut values);
    Some(values)
}
