//! The Llama decoder (Touvron et al. 2023; reference: Hugging Face `modeling_llama.py`).
//!
//! Parameter paths mirror Hugging Face's names without the `model.` prefix
//! (`layers.0.self_attn.q_proj.weight`), so the name table at each file boundary stays short.
//! Linear weights are stored `[in, out]` (burn's layout); Hugging Face's `[out, in]` is a
//! transpose at the file boundary.

use burn::module::{
    Content, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param,
};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::module::embedding;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use distillery_kernels::{
    FEW_ROWS, causal_attention, dropout, is_flex, linear, rms_norm, rows_times_matrix, swiglu,
};
use distillery_quant::{ActivationRounding, PackedMatrix, QuantizedWeight};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kv_cache::{LayerCache, LayerKv};
use crate::rope::RotaryTables;
use crate::{KvCache, LayerMatrix, LlamaConfig, ModelError};

/// Standard deviation of every weight matrix at initialization (GPT-2 and Hugging Face Llama's
/// `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// A weight matrix: float values, the parameter training updates and files hold, or a
/// quantized matrix to compute with.
#[derive(Debug, Clone)]
pub enum Weight {
    /// burn's layout: `[in, out]` for a linear map, `[vocab, hidden]` for the token embedding.
    Float(Param<Tensor<2>>),
    /// Output channels (or tokens) as rows.
    Quantized(Arc<QuantizedWeight>),
}

impl Weight {
    pub fn float(values: Tensor<2>) -> Self {
        Self::Float(Param::from_tensor(values))
    }

    pub fn quantized(weight: impl Into<QuantizedWeight>) -> Self {
        Self::Quantized(Arc::new(weight.into()))
    }

    pub fn as_float(&self) -> Option<&Param<Tensor<2>>> {
        match self {
            Self::Float(values) => Some(values),
            Self::Quantized(_) => None,
        }
    }

    pub fn as_quantized(&self) -> Option<&QuantizedWeight> {
        match self {
            Self::Float(_) => None,
            Self::Quantized(quantized) => Some(quantized),
        }
    }

    /// The same weight with `f` applied to the float parameter; a quantized matrix stays.
    fn map_float(self, f: impl FnOnce(Param<Tensor<2>>) -> Param<Tensor<2>>) -> Self {
        match self {
            Self::Float(values) => Self::Float(f(values)),
            quantized => quantized,
        }
    }
}

/// The float variant is a parameter under the field's own name, as an `Option<Param>` would
/// be (burn's derive for an enum would add the variant's name to the path); a quantized matrix
/// is no parameter: optimizers and stores pass it by.
impl Module for Weight {
    fn collect_devices(&self, devices: Vec<Device>) -> Vec<Device> {
        match self {
            Self::Float(values) => Module::collect_devices(values, devices),
            Self::Quantized(_) => devices,
        }
    }

    fn fork(self, device: &Device) -> Self {
        self.map_float(|values| Module::fork(values, device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.map_float(|values| Module::to_device(values, device))
    }

    fn train(self) -> Self {
        self.map_float(Module::train)
    }

    fn valid(&self) -> Self {
        self.clone().map_float(|values| Module::valid(&values))
    }

    fn materialize(self) -> Self {
        self.map_float(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        if let Self::Float(values) = self {
            Module::visit(values, visitor);
        }
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        self.map_float(|values| Module::map(values, mapper))
    }
}

impl ModuleDisplayDefault for Weight {
    fn content(&self, content: Content) -> Option<Content> {
        match self {
            Self::Float(values) => ModuleDisplayDefault::content(values, content),
            Self::Quantized(quantized) => content
                .add_formatted(&format!(
                    "Quantized {{rows: {}, cols: {}}}",
                    quantized.rows(),
                    quantized.cols()
                ))
                .optional(),
        }
    }
}

impl ModuleDisplay for Weight {}

/// A linear map without bias, `y = x W` with `W: [in, out]`.
#[derive(Module, Debug)]
pub struct Linear {
    weight: Weight,
    /// How a quantized weight's products treat their inputs.
    #[module(skip)]
    rounding: ActivationRounding,
}

/// Up to this many input rows (a decoding step) a quantized layer multiplies its codes
/// directly, with inputs rounded to int8 where the layout allows integer dot products and the
/// [`ActivationRounding`] says so ([`QuantizedWeight::matmul_int8_inputs`]).
const DECODE_ROWS: usize = FEW_ROWS;

/// Up to this many input rows (a prompt) on the CPU backend a quantized layer decodes its
/// weights a tile at a time ([`QuantizedWeight::matmul_in_tiles`]); above it (evaluation and
/// calibration batches) one float copy of the whole weight per call feeds the backend's matrix
/// product, a cost those rows repay.
const PROMPT_ROWS: usize = 512;

/// Whether a float product of `rows` rows streams its weight through the few-row kernel
/// ([`rows_times_matrix`]) rather than a general matrix product: inference (no gradient to
/// record) on at most [`FEW_ROWS`] rows.
fn streams_few_rows<const D: usize>(x: &Tensor<D>, rows: usize) -> bool {
    rows <= FEW_ROWS && !x.is_autodiff()
}

impl Linear {
    pub fn new(weight: Param<Tensor<2>>) -> Self {
        Self {
            weight: Weight::Float(weight),
            rounding: ActivationRounding::default(),
        }
    }

    pub fn quantized(weight: impl Into<QuantizedWeight>) -> Self {
        Self {
            weight: Weight::quantized(weight),
            rounding: ActivationRounding::default(),
        }
    }

    /// The float weight `[in, out]`, unless the layer is quantized.
    pub fn float_weight(&self) -> Option<&Param<Tensor<2>>> {
        self.weight.as_float()
    }

    pub fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        self.weight.as_quantized()
    }

    /// The quantized weight when it is in distillery's packed layout.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        self.quantized_weight().and_then(QuantizedWeight::packed)
    }

    pub fn set_activation_rounding(&mut self, rounding: ActivationRounding) {
        self.rounding = rounding;
    }

    /// The same map with a float weight: a quantized weight's dequantized values.
    pub fn to_float(&self, device: &Device) -> Linear {
        let Weight::Quantized(quantized) = &self.weight else {
            return self.clone();
        };
        let weight = in_out_weight(
            &quantized.dequantize(),
            quantized.rows(),
            quantized.cols(),
            device,
        );
        Linear::new(Param::from_tensor(weight))
    }

    /// The weight as `[out, in]` row-major values (Hugging Face's layout), dequantized when the
    /// layer is quantized.
    pub fn weight_out_in(&self) -> Vec<f32> {
        match &self.weight {
            Weight::Float(weight) => weight
                .val()
                .transpose()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("weights are f32"),
            Weight::Quantized(quantized) => quantized.dequantize(),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let x = x.reshape([rows, dims[D - 1]]);
        let y = match &self.weight {
            // One `[rows, in] x [in, out]` product: a batched product would pack the weight once
            // per batch entry, and its weight gradient would be a sum of per-batch products.
            Weight::Float(weight) if streams_few_rows(&x, rows) => {
                rows_times_matrix(x, weight.val())
            }
            Weight::Float(weight) => linear(x, weight.val()),
            Weight::Quantized(quantized) => quantized_product(quantized, x, self.rounding),
        };
        dims[D - 1] = self.d_output();
        y.reshape(dims)
    }

    /// Several layers applied to the same input. Quantized layers rounding their inputs to
    /// int8 share one product ([`QuantizedWeight::matmul_int8_inputs_together`]): one rounding
    /// and one hand-over to the worker threads instead of one per layer.
    pub fn forward_together<const D: usize, const N: usize>(
        linears: [&Linear; N],
        x: Tensor<D>,
    ) -> [Tensor<D>; N] {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let quantized: Option<Vec<&QuantizedWeight>> = linears
            .iter()
            .map(|linear| {
                linear
                    .quantized_weight()
                    .filter(|_| linear.rounds_inputs(rows))
            })
            .collect();
        let Some(quantized) = quantized else {
            // A few rows' float products stream their weights in parallel runs; handed out
            // together, one product's last runs overlap the next one's first, and the worker
            // threads meet once for the group instead of once a matrix.
            let together = streams_few_rows(&x, rows)
                && linears.iter().all(|linear| linear.float_weight().is_some());
            if !together {
                return linears.map(|linear| linear.forward(x.clone()));
            }
            let outputs =
                distillery_workers::map_tasks(N, |index| linears[index].forward(x.clone()));
            return outputs
                .try_into()
                .unwrap_or_else(|_| unreachable!("one output per layer"));
        };
        let device = x.device();
        let inputs = host_values(x.reshape([rows, dims[D - 1]]));
        let mut outputs =
            QuantizedWeight::matmul_int8_inputs_together(&quantized, &inputs, rows).into_iter();
        std::array::from_fn(|index| {
            let mut output_dims = dims;
            output_dims[D - 1] = quantized[index].rows();
            let values = outputs.next().expect("one output per layer");
            device_matrix(values, [rows, quantized[index].rows()], &device).reshape(output_dims)
        })
    }

    /// The map onto the outputs named by `outputs`, in that order, with their weights as they
    /// are here.
    fn with_outputs(&self, outputs: &[usize]) -> Linear {
        let weight = match &self.weight {
            Weight::Float(weight) => {
                let weight = weight.val();
                let outputs = index_tensor(outputs, &weight.device());
                Weight::Float(Param::from_tensor(weight.select(1, outputs)))
            }
            Weight::Quantized(quantized) => Weight::quantized(quantized.select_rows(outputs)),
        };
        Linear {
            weight,
            rounding: self.rounding,
        }
    }

    /// Whether a product over `rows` input rows rounds them to int8.
    fn rounds_inputs(&self, rows: usize) -> bool {
        rounds_inputs(self.rounding, rows)
    }

    pub fn d_input(&self) -> usize {
        match &self.weight {
            Weight::Float(weight) => weight.dims()[0],
            Weight::Quantized(quantized) => quantized.cols(),
        }
    }

    pub fn d_output(&self) -> usize {
        match &self.weight {
            Weight::Float(weight) => weight.dims()[1],
            Weight::Quantized(quantized) => quantized.rows(),
        }
    }
}

fn rounds_inputs(rounding: ActivationRounding, rows: usize) -> bool {
    match rounding {
        ActivationRounding::DecodeSteps => rows <= DECODE_ROWS,
        ActivationRounding::Never => false,
        ActivationRounding::Always => true,
    }
}

fn index_tensor(indices: &[usize], device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = indices.iter().map(|&index| index as i64).collect();
    Tensor::from_data(TensorData::new(values, [indices.len()]), device)
}

/// `x Wᵀ` for a quantized `W` (output channels as rows): `[rows, in]` to `[rows, out]`.
fn quantized_product(
    weight: &QuantizedWeight,
    x: Tensor<2>,
    rounding: ActivationRounding,
) -> Tensor<2> {
    let device = x.device();
    let [rows, cols] = x.dims();
    let outputs = if rounds_inputs(rounding, rows) {
        weight.matmul_int8_inputs(&host_values(x), rows)
    } else if rows <= DECODE_ROWS {
        weight.matmul(&host_values(x), rows)
    } else if rows <= PROMPT_ROWS && is_flex(&device) {
        weight.matmul_in_tiles(&host_values(x), rows)
    } else {
        // `[out, in]` as decoded, used through a transposed view, with no host-side transpose.
        let matrix = device_matrix(weight.dequantize(), [weight.rows(), cols], &device);
        return linear(x, matrix.transpose());
    };
    device_matrix(outputs, [rows, weight.rows()], &device)
}

/// Windows of `seq_len` token ids laid end to end in `tokens`, as a `[windows, seq_len]` batch
/// on `device`: how calibration text reaches a forward pass.
pub fn token_windows(tokens: &[u32], seq_len: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = tokens.iter().map(|&id| i64::from(id)).collect();
    Tensor::from_data(
        TensorData::new(ids, [tokens.len() / seq_len, seq_len]),
        device,
    )
}

/// Row-major host values as a matrix on `device`.
fn device_matrix(values: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn host_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("activations are f32")
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Module, Debug)]
pub struct Llama {
    /// `[vocab, hidden]` floats, or a quantized table of one row per token.
    embed_tokens: Weight,
    /// How the tied output projection of a quantized table treats its inputs.
    #[module(skip)]
    rounding: ActivationRounding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the output projection is the transposed token embedding.
    pub lm_head: Option<Linear>,
    rope: RotaryTables,
    /// Dropout probability on the embeddings and on each residual branch, while training.
    dropout: f64,
    /// Where this forward pass's dropout masks come from; see [`Llama::set_dropout_seed`].
    dropout_seed: u64,
    #[module(skip)]
    config: LlamaConfig,
}

/// Applies the model's dropout to one site of the forward pass when training (on an autodiff
/// device), each site with its own mask.
#[derive(Clone, Copy)]
struct DropoutSites {
    probability: f64,
    seed: u64,
}

impl DropoutSites {
    /// Inference: nothing dropped.
    const NONE: Self = Self {
        probability: 0.0,
        seed: 0,
    };

    fn apply(self, x: Tensor<3>, site: u64) -> Tensor<3> {
        if self.probability == 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let seed = self
            .seed
            .wrapping_add(site.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        dropout(x, self.probability, seed)
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct LlamaOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// When requested: the embedding output followed by each layer's output, each
    /// `[batch, seq, hidden]` (Hugging Face's `output_hidden_states` convention).
    pub hidden_states: Option<Vec<Tensor<3>>>,
}

/// Draws the initial weights from one seeded stream on the host, so the same seed gives the same
/// model on every backend.
struct Initializer {
    rng: ChaCha8Rng,
    device: Device,
}

impl Initializer {
    fn normal(&mut self, shape: [usize; 2], std: f64) -> Param<Tensor<2>> {
        let count = shape[0] * shape[1];
        let mut values = Vec::with_capacity(count);
        // Box-Muller keeps the draw independent of a distribution crate's internals, so a seed
        // means the same weights across dependency upgrades.
        while values.len() < count {
            let u1: f64 = 1.0 - self.rng.random::<f64>();
            let u2: f64 = self.rng.random::<f64>();
            let radius = (-2.0 * u1.ln()).sqrt() * std;
            let angle = 2.0 * std::f64::consts::PI * u2;
            values.push((radius * angle.cos()) as f32);
            values.push((radius * angle.sin()) as f32);
        }
        values.truncate(count);
        Param::from_data(TensorData::new(values, shape), &self.device)
    }

    fn linear(&mut self, d_input: usize, d_output: usize, std: f64) -> Linear {
        Linear::new(self.normal([d_input, d_output], std))
    }
}

/// A linear map's `[in, out]` weight, as burn stores it, from `[out, in]` row-major values
/// (the layout files and quantized rows use). Transposed on the host, not as a tensor view: a
/// strided weight would take another matmul path and change results in their last bits.
pub fn in_out_weight(out_in: &[f32], outputs: usize, inputs: usize, device: &Device) -> Tensor<2> {
    let in_out: Vec<f32> = (0..inputs * outputs)
        .map(|index| out_in[(index % outputs) * inputs + index / outputs])
        .collect();
    Tensor::from_data(TensorData::new(in_out, [inputs, outputs]), device)
}

/// A decoder layer's weights.
#[derive(Debug)]
pub struct LayerWeights {
    pub input_layernorm: Tensor<1>,
    pub post_attention_layernorm: Tensor<1>,
    /// In [`LayerMatrix::ALL`]'s order.
    pub matrices: [Weight; 7],
}

/// Every weight of a model.
#[derive(Debug)]
pub struct LlamaWeights {
    pub embed_tokens: Weight,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor<1>,
    /// `None` when the output projection is the transposed token embedding.
    pub lm_head: Option<Weight>,
}

fn check_shape(path: &str, shape: Vec<usize>, expected: Vec<usize>) -> Result<(), ModelError> {
    if shape == expected {
        Ok(())
    } else {
        Err(ModelError::WeightShape {
            path: path.to_string(),
            shape,
            expected,
        })
    }
}

fn linear_from(
    path: String,
    weight: Weight,
    inputs: usize,
    outputs: usize,
) -> Result<Linear, ModelError> {
    let shape = match &weight {
        Weight::Float(values) => values.dims().to_vec(),
        // Quantized matrices keep output channels as rows.
        Weight::Quantized(quantized) => vec![quantized.cols(), quantized.rows()],
    };
    check_shape(&path, shape, vec![inputs, outputs])?;
    Ok(Linear {
        weight,
        rounding: ActivationRounding::default(),
    })
}

impl Llama {
    /// A freshly initialized model: normal(0, 0.02) weights, residual output projections scaled
    /// by 1/sqrt(2 * layers) as in GPT-2, unit norm gains.
    pub fn new(
        config: &LlamaConfig,
        dropout: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
            return Err(ModelError::InvalidDropout(dropout));
        }
        let mut init = Initializer {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        };
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let kv_width = config.num_key_value_heads * head_dim;
        let residual_std = INIT_STD / (2.0 * config.num_hidden_layers as f64).sqrt();
        let norm = || {
            RmsNormConfig::new(hidden)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };

        let embed_tokens = init.normal([config.vocab_size, hidden], INIT_STD);
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(),
                self_attn: Attention {
                    q_proj: init.linear(hidden, hidden, INIT_STD),
                    k_proj: init.linear(hidden, kv_width, INIT_STD),
                    v_proj: init.linear(hidden, kv_width, INIT_STD),
                    o_proj: init.linear(hidden, hidden, residual_std),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim,
                },
                post_attention_layernorm: norm(),
                mlp: Mlp {
                    gate_proj: init.linear(hidden, config.intermediate_size, INIT_STD),
                    up_proj: init.linear(hidden, config.intermediate_size, INIT_STD),
                    down_proj: init.linear(config.intermediate_size, hidden, residual_std),
                },
            })
            .collect();
        let lm_head =
            (!config.tie_word_embeddings).then(|| init.linear(hidden, config.vocab_size, INIT_STD));

        Ok(Self {
            embed_tokens: Weight::Float(embed_tokens),
            rounding: ActivationRounding::default(),
            layers,
            norm: norm(),
            lm_head,
            rope: RotaryTables::new(
                config.max_position_embeddings,
                head_dim,
                config.rope_theta,
                config.rope_scaling.as_ref(),
                device,
            ),
            dropout,
            dropout_seed: 0,
            config: config.clone(),
        })
    }

    /// A model of `config` with the given weights, checked against the shapes the config
    /// implies; nothing is drawn at random.
    pub fn from_weights(
        config: &LlamaConfig,
        weights: LlamaWeights,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if weights.layers.len() != config.num_hidden_layers {
            return Err(ModelError::WeightShape {
                path: "layers".into(),
                shape: vec![weights.layers.len()],
                expected: vec![config.num_hidden_layers],
            });
        }
        if weights.lm_head.is_some() == config.tie_word_embeddings {
            return Err(ModelError::InvalidConfig {
                field: "tie_word_embeddings",
                reason: format!(
                    "is {} but the weights {} an output projection",
                    config.tie_word_embeddings,
                    if weights.lm_head.is_some() {
                        "hold"
                    } else {
                        "lack"
                    }
                ),
            });
        }
        let hidden = config.hidden_size;
        let norm = |path: String, gain: Tensor<1>| -> Result<RmsNorm, ModelError> {
            check_shape(&path, gain.dims().to_vec(), vec![hidden])?;
            let mut norm = RmsNormConfig::new(hidden)
                .with_epsilon(config.rms_norm_eps)
                .init(device);
            norm.gamma = Param::from_tensor(gain);
            Ok(norm)
        };
        let head_dim = config.head_dim();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (index, layer) in weights.layers.into_iter().enumerate() {
            let [
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
            ] = layer
                .matrices
                .into_iter()
                .zip(LayerMatrix::ALL)
                .map(|(weight, matrix)| {
                    let (inputs, outputs) = matrix.shape(config);
                    linear_from(
                        format!("layers.{index}.{}", matrix.path()),
                        weight,
                        inputs,
                        outputs,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?
                .try_into()
                .expect("seven matrices");
            layers.push(DecoderLayer {
                input_layernorm: norm(
                    format!("layers.{index}.input_layernorm"),
                    layer.input_layernorm,
                )?,
                self_attn: Attention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim,
                },
                post_attention_layernorm: norm(
                    format!("layers.{index}.post_attention_layernorm"),
                    layer.post_attention_layernorm,
                )?,
                mlp: Mlp {
                    gate_proj,
                    up_proj,
                    down_proj,
                },
            });
        }
        let lm_head = weights
            .lm_head
            .map(|head| linear_from("lm_head".into(), head, hidden, config.vocab_size))
            .transpose()?;
        let table = [config.vocab_size, hidden];
        let shape = match &weights.embed_tokens {
            Weight::Float(values) => values.dims().to_vec(),
            Weight::Quantized(quantized) => vec![quantized.rows(), quantized.cols()],
        };
        check_shape("embed_tokens", shape, table.to_vec())?;
        Ok(Self {
            embed_tokens: weights.embed_tokens,
            rounding: ActivationRounding::default(),
            layers,
            norm: norm("norm".into(), weights.norm)?,
            lm_head,
            rope: RotaryTables::new(
                config.max_position_embeddings,
                head_dim,
                config.rope_theta,
                config.rope_scaling.as_ref(),
                device,
            ),
            dropout: 0.0,
            dropout_seed: 0,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the model computes on.
    pub fn device(&self) -> Device {
        self.rope.device()
    }

    /// The float token embedding `[vocab, hidden]`, unless it is quantized.
    pub fn embedding(&self) -> Option<&Param<Tensor<2>>> {
        self.embed_tokens.as_float()
    }

    pub fn set_embedding(&mut self, table: Param<Tensor<2>>) {
        self.embed_tokens = Weight::Float(table);
    }

    pub fn quantized_embedding(&self) -> Option<&QuantizedWeight> {
        self.embed_tokens.as_quantized()
    }

    /// The quantized table when it is in distillery's packed layout.
    pub fn packed_embedding(&self) -> Option<&PackedMatrix> {
        self.quantized_embedding().and_then(QuantizedWeight::packed)
    }

    /// The model with a quantized token embedding and output head dequantized to floats.
    pub fn with_float_embedding_and_head(&self) -> Llama {
        let mut model = self.clone();
        let device = model.device();
        if model.quantized_embedding().is_some() {
            let [vocab, hidden] = [self.config.vocab_size, self.config.hidden_size];
            model.set_embedding(Param::from_data(
                TensorData::new(model.embedding_values(), [vocab, hidden]),
                &device,
            ));
        }
        if let Some(head) = model.lm_head.as_mut() {
            *head = head.to_float(&device);
        }
        model
    }

    /// The model with every quantized weight dequantized to floats.
    pub fn dequantized(&self) -> Llama {
        let mut model = self.with_float_embedding_and_head();
        let device = model.device();
        for layer in &mut model.layers {
            for matrix in LayerMatrix::ALL {
                let linear = layer.matrix_mut(matrix);
                *linear = linear.to_float(&device);
            }
        }
        model
    }

    /// Sets how every quantized product of the model treats its inputs.
    pub fn set_activation_rounding(&mut self, rounding: ActivationRounding) {
        self.rounding = rounding;
        for layer in &mut self.layers {
            for matrix in LayerMatrix::ALL {
                layer.matrix_mut(matrix).set_activation_rounding(rounding);
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.set_activation_rounding(rounding);
        }
    }

    pub fn activation_rounding(&self) -> ActivationRounding {
        self.rounding
    }

    /// Whether any weight is quantized (so the activation rounding matters).
    pub fn is_quantized(&self) -> bool {
        self.quantized_embedding().is_some()
            || self
                .linears()
                .iter()
                .any(|(_, linear)| linear.quantized_weight().is_some())
    }

    /// Replaces the token embedding (and, when tied, the output projection) by a quantized
    /// table with one row per token.
    pub fn set_packed_embedding(&mut self, table: impl Into<QuantizedWeight>) {
        self.embed_tokens = Weight::quantized(table);
    }

    /// The token embedding as `[vocab, hidden]` row-major values, dequantized when quantized.
    pub fn embedding_values(&self) -> Vec<f32> {
        match &self.embed_tokens {
            Weight::Float(table) => host_values(table.val()),
            Weight::Quantized(quantized) => quantized.dequantize(),
        }
    }

    /// `[batch, seq, hidden]` embeddings of `tokens`.
    pub fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        match &self.embed_tokens {
            Weight::Float(table) => embedding(table.val(), tokens),
            Weight::Quantized(quantized) => {
                let [batch, seq] = tokens.dims();
                let ids: Vec<usize> = tokens
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .expect("token ids are integers")
                    .into_iter()
                    .map(|id| id as usize)
                    .collect();
                Tensor::from_data(
                    TensorData::new(quantized.gather_rows(&ids), [batch, seq, quantized.cols()]),
                    &self.device(),
                )
            }
        }
    }

    /// Logits `[batch, seq, vocab]` of final hidden states `x` (after the final norm).
    pub fn project(&self, x: Tensor<3>) -> Tensor<3> {
        if let Some(head) = &self.lm_head {
            return head.forward(x);
        }
        let [batch, seq, hidden] = x.dims();
        let x = x.reshape([batch * seq, hidden]);
        let logits = match &self.embed_tokens {
            Weight::Float(table) if batch * seq <= FEW_ROWS && !x.is_autodiff() => {
                rows_times_matrix(x, table.val().transpose())
            }
            Weight::Float(table) => linear(x, table.val().transpose()),
            Weight::Quantized(quantized) => quantized_product(quantized, x, self.rounding),
        };
        logits.reshape([batch, seq, self.config.vocab_size])
    }

    /// The model with an output head that scores only `tokens`, in that order: logits
    /// `[batch, seq, tokens.len()]` whose entry `i` is token `tokens[i]`'s logit under the
    /// whole head, with its bits on up to [`FEW_ROWS`] rows (a speculative draft's shortlist,
    /// [`crate::Draft`], whose passes give the head one row).
    pub fn with_head_over(mut self, tokens: &[u32]) -> Result<Llama, ModelError> {
        let vocab = self.config.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&token| token as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { token, vocab });
        }
        let rows: Vec<usize> = tokens.iter().map(|&token| token as usize).collect();
        let head = match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.with_outputs(&rows),
            (None, Weight::Float(table)) => {
                let table = table.val();
                let rows = index_tensor(&rows, &table.device());
                // The chosen rows of the table, used through a transposed view as `project`
                // uses the whole table.
                Linear::new(Param::from_tensor(table.select(0, rows).transpose()))
            }
            (None, Weight::Quantized(table)) => Linear {
                weight: Weight::quantized(table.select_rows(&rows)),
                rounding: self.rounding,
            },
        };
        self.lm_head = Some(head);
        Ok(self)
    }

    /// The output projection `[hidden, vocab]` when its weight is float (the `lm_head`'s, or
    /// the transposed embedding table when they are tied): what a chunked head
    /// ([`distillery_kernels::head_losses`]) multiplies [`Llama::final_hidden`] by.
    pub fn float_head(&self) -> Option<Tensor<2>> {
        match &self.lm_head {
            Some(head) => head.float_weight().map(Param::val),
            None => self.embedding().map(|table| table.val().transpose()),
        }
    }

    /// Every linear layer under its module path (`layers.0.self_attn.q_proj`, `lm_head`), in
    /// the order the forward pass reaches them.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut linears = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            for (name, linear) in layer.linears() {
                linears.push((format!("layers.{index}.{name}"), linear));
            }
        }
        if let Some(head) = &self.lm_head {
            linears.push(("lm_head".into(), head));
        }
        linears
    }

    /// The linear layer at a path [`Llama::linears`] names.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        if path == "lm_head" {
            return self.lm_head.as_mut();
        }
        let (index, name) = path.strip_prefix("layers.")?.split_once('.')?;
        self.layers
            .get_mut(index.parse::<usize>().ok()?)?
            .linear_mut(name)
    }

    pub fn rotary_tables(&self) -> &RotaryTables {
        &self.rope
    }

    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        normalize(&self.norm, x)
    }

    /// Seeds the dropout masks of the next forward passes. A training loop sets it from the
    /// run's seed and the step, so the masks of a resumed run are the ones it would have drawn.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` starting at position 0.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(tokens, None, false).logits
    }

    /// The full forward pass.
    ///
    /// With a cache, `tokens` continue the cached sequence: their positions start at the cache's
    /// length, they attend to every cached position, and their keys and values are appended, so
    /// one new token costs a pass over one position. The caller keeps the total length within
    /// `max_position_embeddings`.
    pub fn forward_with(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
        output_hidden_states: bool,
    ) -> LlamaOutput {
        let (x, hidden_states) = self.decoder(tokens, cache, output_hidden_states);
        LlamaOutput {
            logits: self.project(self.final_norm(x)),
            hidden_states,
        }
    }

    /// The final hidden states `[batch, seq, hidden]` (after the final norm) for token ids
    /// `[batch, seq]` starting at position 0: the forward pass without the output head.
    pub fn final_hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.final_norm(self.decoder(tokens, None, false).0)
    }

    /// Logits `[batch, rows, vocab]` of the last `rows` positions of a pass that continues
    /// `cache` (all positions' keys and values enter it). Only those rows meet the head, as in
    /// llama.cpp: the head's product for a prompt's other positions is work nobody reads (a
    /// fifth of SmolLM2's 254-token prompt pass). A product over at most [`FEW_ROWS`] rows is a
    /// decoding step's, so a quantized head then takes the step's activation rounding.
    pub fn forward_last(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
        rows: usize,
    ) -> Tensor<3> {
        let (x, _) = self.decoder(tokens, cache, false);
        let [_, seq, _] = x.dims();
        assert!(
            (1..=seq).contains(&rows),
            "{rows} rows of a {seq}-position pass"
        );
        self.project(self.final_norm(x.narrow(1, seq - rows, rows)))
    }

    /// The embedding and every layer: the last layer's output `[batch, seq, hidden]`, and on
    /// request the embedding's and each layer's.
    fn decoder(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        output_hidden_states: bool,
    ) -> (Tensor<3>, Option<Vec<Tensor<3>>>) {
        let start = cache.as_ref().map_or(0, |cache| cache.len());
        let [_, seq] = tokens.dims();
        assert!(
            start + seq <= self.rope.max_positions(),
            "sequence of {} positions exceeds max_position_embeddings = {}",
            start + seq,
            self.rope.max_positions()
        );

        let dropout = DropoutSites {
            probability: self.dropout,
            seed: self.dropout_seed,
        };
        let mut x = dropout.apply(self.embed(tokens), 0);
        let mut hidden_states = output_hidden_states.then(|| vec![x.clone()]);
        for (index, layer) in self.layers.iter().enumerate() {
            let kv = match cache.as_deref_mut() {
                Some(cache) => LayerKv::Shared(cache.layer_mut(index)),
                None => LayerKv::Fresh,
            };
            let sites = (2 * index as u64 + 1, 2 * index as u64 + 2);
            x = layer.forward(x, &self.rope, kv, dropout, sites);
            if let Some(states) = hidden_states.as_mut() {
                states.push(x.clone());
            }
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        (x, hidden_states)
    }

    /// Logits `[rows, seq, vocab]` of several sequences continued together: row `i` of
    /// `tokens` `[rows, seq]` continues `caches[i]` from that cache's length, so sequences of
    /// different lengths share every matrix product while each attends to its own history.
    /// Up to [`FEW_ROWS`] rows, each row's logits have the bits a pass over it alone gives.
    pub fn forward_rows(&self, tokens: Tensor<2, Int>, caches: &mut [KvCache]) -> Tensor<3> {
        let [rows, seq] = tokens.dims();
        assert_eq!(rows, caches.len(), "one cache per row");
        for cache in caches.iter() {
            assert!(
                cache.len() + seq <= self.rope.max_positions(),
                "sequence of {} positions exceeds max_position_embeddings = {}",
                cache.len() + seq,
                self.rope.max_positions()
            );
        }
        // [rows, seq, hidden]
        let mut x = self.embed(tokens);
        for (index, layer) in self.layers.iter().enumerate() {
            let kv = LayerKv::PerRow(
                caches
                    .iter_mut()
                    .map(|cache| cache.layer_mut(index))
                    .collect(),
            );
            x = layer.forward(x, &self.rope, kv, DropoutSites::NONE, (0, 0));
        }
        for cache in caches.iter_mut() {
            cache.advance(seq);
        }
        self.project(self.final_norm(x))
    }
}

impl DecoderLayer {
    /// The layer's linear maps under their paths inside the layer, in forward order.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        LayerMatrix::ALL.map(|matrix| (matrix.path(), self.matrix(matrix)))
    }

    pub fn matrix(&self, matrix: LayerMatrix) -> &Linear {
        match matrix {
            LayerMatrix::Query => &self.self_attn.q_proj,
            LayerMatrix::Key => &self.self_attn.k_proj,
            LayerMatrix::Value => &self.self_attn.v_proj,
            LayerMatrix::Output => &self.self_attn.o_proj,
            LayerMatrix::Gate => &self.mlp.gate_proj,
            LayerMatrix::Up => &self.mlp.up_proj,
            LayerMatrix::Down => &self.mlp.down_proj,
        }
    }

    pub fn matrix_mut(&mut self, matrix: LayerMatrix) -> &mut Linear {
        match matrix {
            LayerMatrix::Query => &mut self.self_attn.q_proj,
            LayerMatrix::Key => &mut self.self_attn.k_proj,
            LayerMatrix::Value => &mut self.self_attn.v_proj,
            LayerMatrix::Output => &mut self.self_attn.o_proj,
            LayerMatrix::Gate => &mut self.mlp.gate_proj,
            LayerMatrix::Up => &mut self.mlp.up_proj,
            LayerMatrix::Down => &mut self.mlp.down_proj,
        }
    }

    /// The linear map at a path [`DecoderLayer::linears`] names.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        LayerMatrix::from_path(name).map(|matrix| self.matrix_mut(matrix))
    }

    /// The layer's forward pass before its first group of matrices: the attention block's
    /// input, the residual stream normalized.
    pub fn begin(&self, x: Tensor<3>) -> LayerProgress {
        LayerProgress {
            group: 0,
            input: normalize(&self.input_layernorm, x.clone()),
            residual: x,
        }
    }

    /// Runs the next group of matrices, and what follows it up to the next group's input, over
    /// whole sequences from position 0 and without dropout, as GPTQ calibration does between
    /// quantizing one group and reading the next one's input.
    pub fn advance(&self, progress: LayerProgress, rope: &RotaryTables) -> LayerProgress {
        self.step(progress, rope, LayerKv::Fresh, DropoutSites::NONE, (0, 0))
    }

    /// One step of the forward pass; `kv` serves the attention group, the first.
    fn step(
        &self,
        progress: LayerProgress,
        rope: &RotaryTables,
        kv: LayerKv,
        dropout: DropoutSites,
        (attention_site, mlp_site): (u64, u64),
    ) -> LayerProgress {
        let LayerProgress {
            group,
            residual,
            input,
        } = progress;
        let (residual, input) = match group {
            // q, k, v: the heads' context, o_proj's input.
            0 => (residual, self.self_attn.context_with(input, rope, kv)),
            // o: the residual stream after attention, and its normalization, the MLP's input.
            1 => {
                let attended = self.self_attn.o_proj.forward(input);
                let x = residual + dropout.apply(attended, attention_site);
                (x.clone(), normalize(&self.post_attention_layernorm, x))
            }
            // gate, up: the gated activation, down_proj's input.
            2 => (residual, self.mlp.gated(input)),
            // down: the layer's output.
            3 => {
                let transformed = self.mlp.down_proj.forward(input);
                let x = residual + dropout.apply(transformed, mlp_site);
                (x.clone(), x)
            }
            _ => panic!("every group of the layer has run"),
        };
        LayerProgress {
            group: group + 1,
            residual,
            input,
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RotaryTables,
        kv: LayerKv,
        dropout: DropoutSites,
        sites: (u64, u64),
    ) -> Tensor<3> {
        let attended = self.step(self.begin(x), rope, kv, dropout, sites);
        let done = (1..LayerMatrix::SEQUENTIAL_GROUPS.len()).fold(attended, |progress, _| {
            self.step(progress, rope, LayerKv::Fresh, dropout, sites)
        });
        done.output()
    }
}

/// A decoder layer's forward pass stopped where one group of its matrices
/// ([`LayerMatrix::SEQUENTIAL_GROUPS`]) reads its input. The forward pass and GPTQ calibration
/// both advance it, so calibration sees exactly the inputs inference computes.
#[derive(Debug, Clone)]
pub struct LayerProgress {
    /// The group about to run, an index into [`LayerMatrix::SEQUENTIAL_GROUPS`].
    group: usize,
    /// The residual stream the running block adds to, `[batch, seq, hidden]`.
    residual: Tensor<3>,
    /// What the group reads, `[batch, seq, features]`; the layer's output once every group
    /// has run.
    input: Tensor<3>,
}

impl LayerProgress {
    /// The group about to run, an index into [`LayerMatrix::SEQUENTIAL_GROUPS`].
    pub fn group(&self) -> usize {
        self.group
    }

    pub fn input(&self) -> &Tensor<3> {
        &self.input
    }

    /// The layer's output, `[batch, seq, hidden]`.
    pub fn output(self) -> Tensor<3> {
        assert_eq!(
            self.group,
            LayerMatrix::SEQUENTIAL_GROUPS.len(),
            "the layer's output once every group has run"
        );
        self.input
    }
}

impl Attention {
    /// The heads' outputs, concatenated `[batch, seq, heads * head_dim]`: the input of `o_proj`.
    fn context_with(&self, x: Tensor<3>, rope: &RotaryTables, kv: LayerKv) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        // [batch, seq, count * head_dim] -> [batch, count, seq, head_dim]
        let heads = |projected: Tensor<3>, count: usize| {
            projected
                .reshape([batch, seq, count, self.head_dim])
                .swap_dims(1, 2)
        };
        // [batch, seq, hidden] -> [batch, seq, heads * head_dim] and twice
        // [batch, seq, kv_heads * head_dim]
        let [query, key, value] =
            Linear::forward_together([&self.q_proj, &self.k_proj, &self.v_proj], x);
        // [batch, heads, seq, head_dim]
        let query = heads(query, self.num_heads);
        // [batch, kv_heads, seq, head_dim]
        let key = heads(key, self.num_kv_heads);
        // [batch, kv_heads, seq, head_dim]
        let value = heads(value, self.num_kv_heads);
        // [batch, heads, seq, head_dim]
        let attended = match kv {
            LayerKv::Fresh => causal_attention(rope.apply(query, 0), rope.apply(key, 0), value),
            LayerKv::Shared(cache) => attend_after(cache, rope, query, key, value),
            // Each sequence attends to its own history, so the rows run in parallel.
            LayerKv::PerRow(mut caches) => {
                let mut rows = vec![None; caches.len()];
                distillery_workers::for_each_chunk_pair_mut(
                    (&mut caches, 1),
                    (&mut rows, 1),
                    |row, cache, attended| {
                        let of_row = |tensor: &Tensor<4>| tensor.clone().narrow(0, row, 1);
                        attended[0] = Some(attend_after(
                            cache[0],
                            rope,
                            of_row(&query),
                            of_row(&key),
                            of_row(&value),
                        ));
                    },
                );
                Tensor::cat(rows.into_iter().flatten().collect(), 0)
            }
        };
        // [batch, seq, heads * head_dim]
        attended
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim])
    }
}

/// Attention of new positions that continue `cache`: rotated to the positions from the
/// cache's length on, their keys and values appended to it.
fn attend_after(
    cache: &mut LayerCache,
    rope: &RotaryTables,
    query: Tensor<4>,
    key: Tensor<4>,
    value: Tensor<4>,
) -> Tensor<4> {
    let start = cache.len();
    // [batch, kv_heads, start + seq, head_dim] each: the history and the new positions
    let (key, value) = cache.append(rope.apply(key, start), value);
    // [batch, heads, seq, head_dim]
    causal_attention(rope.apply(query, start), key, value)
}

impl Mlp {
    /// `silu(gate(x)) * up(x)`: the input of `down_proj`.
    fn gated(&self, x: Tensor<3>) -> Tensor<3> {
        // [batch, seq, hidden] -> [batch, seq, intermediate] twice
        let [gate, up] = Linear::forward_together([&self.gate_proj, &self.up_proj], x);
        // [batch, seq, intermediate]
        swiglu(gate, up)
    }
}

/// burn's `RmsNorm` holds the gain; the fused kernel computes the normalization.
fn normalize(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    rms_norm(x, norm.gamma.val(), norm.epsilon)
}
