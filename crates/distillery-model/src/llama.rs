//! The Llama decoder (Touvron et al. 2023; reference: Hugging Face `modeling_llama.py`).
//!
//! Parameter paths mirror Hugging Face's names without the `model.` prefix
//! (`layers.0.self_attn.q_proj.weight`), so the name table at each file boundary stays short.
//! Linear weights are stored `[in, out]` (burn's layout); Hugging Face's `[out, in]` is a
//! transpose at the file boundary.

use burn::module::{Module, Param};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use distillery_kernels::{causal_attention, dropout, rms_norm, swiglu};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::rope::RotaryTables;
use crate::{KvCache, LlamaConfig, ModelError};

/// Standard deviation of every weight matrix at initialization (GPT-2 and Hugging Face Llama's
/// `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// A linear map without bias, `y = x W` with `W: [in, out]`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        // One `[rows, in] x [in, out]` product: a batched product would pack the weight once
        // per batch entry, and its weight gradient would be a sum of per-batch products.
        let y = linear(x.reshape([rows, dims[D - 1]]), self.weight.val(), None);
        dims[D - 1] = self.d_output();
        y.reshape(dims)
    }

    pub fn d_input(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn d_output(&self) -> usize {
        self.weight.dims()[1]
    }
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
    pub embed_tokens: Param<Tensor<2>>,
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
        Linear {
            weight: self.normal([d_input, d_output], std),
        }
    }
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
            embed_tokens,
            layers,
            norm: norm(),
            lm_head,
            rope: RotaryTables::new(
                config.max_position_embeddings,
                head_dim,
                config.rope_theta,
                device,
            ),
            dropout,
            dropout_seed: 0,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
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
        mut cache: Option<&mut KvCache>,
        output_hidden_states: bool,
    ) -> LlamaOutput {
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
        let mut x = dropout.apply(embedding(self.embed_tokens.val(), tokens), 0);
        let mut hidden_states = output_hidden_states.then(|| vec![x.clone()]);
        for (index, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|cache| cache.layer_mut(index));
            let sites = (2 * index as u64 + 1, 2 * index as u64 + 2);
            x = layer.forward(x, &self.rope, start, layer_cache, dropout, sites);
            if let Some(states) = hidden_states.as_mut() {
                states.push(x.clone());
            }
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }

        let x = normalize(&self.norm, x);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                let [batch, seq, hidden] = x.dims();
                x.reshape([batch * seq, hidden])
                    .matmul(self.embed_tokens.val().transpose())
                    .reshape([batch, seq, self.config.vocab_size])
            }
        };
        LlamaOutput {
            logits,
            hidden_states,
        }
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RotaryTables,
        start: usize,
        cache: Option<&mut crate::cache::LayerCache>,
        dropout: DropoutSites,
        (attention_site, mlp_site): (u64, u64),
    ) -> Tensor<3> {
        let attended = self.self_attn.forward(
            normalize(&self.input_layernorm, x.clone()),
            rope,
            start,
            cache,
        );
        let x = x + dropout.apply(attended, attention_site);
        let transformed = self
            .mlp
            .forward(normalize(&self.post_attention_layernorm, x.clone()));
        x + dropout.apply(transformed, mlp_site)
    }
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RotaryTables,
        start: usize,
        cache: Option<&mut crate::cache::LayerCache>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let heads = |projection: &Linear, count: usize| {
            projection
                .forward(x.clone())
                .reshape([batch, seq, count, self.head_dim])
                .swap_dims(1, 2)
        };
        let query = rope.apply(heads(&self.q_proj, self.num_heads), start);
        let key = rope.apply(heads(&self.k_proj, self.num_kv_heads), start);
        let value = heads(&self.v_proj, self.num_kv_heads);
        let (key, value) = match cache {
            Some(cache) => cache.append(key, value),
            None => (key, value),
        };
        let context = causal_attention(query, key, value);
        let context = context
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(context)
    }
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gated = swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}

/// burn's `RmsNorm` holds the gain; the fused kernel computes the normalization.
fn normalize(norm: &RmsNorm, x: Tensor<3>) -> Tensor<3> {
    rms_norm(x, norm.gamma.val(), norm.epsilon)
}
