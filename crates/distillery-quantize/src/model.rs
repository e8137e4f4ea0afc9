//! Quantizing every matrix of a model. GPTQ calibrates block by block: each decoder layer sees
//! the outputs of the already-quantized layers before it, and inside a layer each group of
//! sublayers (q,k,v → o → gate,up → down) sees the outputs of the already-quantized ones, so
//! memory holds one layer's activations and one Hessian at a time.

use burn::tensor::Tensor;
use distillery_config::{QuantizeConfig, QuantizeMethod};
use distillery_model::rope::RotaryTables;
use distillery_model::{DecoderLayer, LayerMatrix, LayerProgress, Linear, Llama, token_windows};
use distillery_quant::settings;
use distillery_quant::{
    GptqSettings, Hessian, PackedMatrix, PreparedHessian, QuantError, QuantSettings,
    QuantizedMatrix, gptq, int8_absmax, round_to_nearest,
};

use crate::QuantizeError;

/// Calibration windows run through the model this many at a time.
const CALIBRATION_BATCH: usize = 16;

/// How to quantize, resolved from a `[quantize]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    pub method: QuantizeMethod,
    /// Every matrix's grids, and how GPTQ runs when it is the method.
    pub gptq: GptqSettings,
    pub true_sequential: bool,
    pub quantize_embeddings: bool,
    pub quantize_lm_head: bool,
}

impl From<&QuantizeConfig> for QuantizeOptions {
    fn from(config: &QuantizeConfig) -> Self {
        Self {
            method: config.method,
            gptq: config.gptq_settings(),
            true_sequential: config.true_sequential,
            quantize_embeddings: config.quantize_embeddings,
            quantize_lm_head: config.quantize_lm_head,
        }
    }
}

impl QuantizeOptions {
    fn settings(&self) -> &QuantSettings {
        &self.gptq.quant
    }

    /// Round-to-nearest (or absmax int8) of one `rows x cols` matrix.
    fn round(
        &self,
        weights: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<QuantizedMatrix, QuantError> {
        match self.method {
            QuantizeMethod::Int8 => int8_absmax(weights, rows, cols, self.settings().group_size),
            QuantizeMethod::Rtn | QuantizeMethod::Gptq => {
                round_to_nearest(weights, rows, cols, self.settings())
            }
        }
    }
}

/// Calibration inputs: `windows` sequences of `seq_len` token ids, row-major.
pub struct Calibration {
    pub tokens: Vec<u32>,
    pub seq_len: usize,
}

/// What happened to one matrix.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MatrixOutcome {
    /// Module path: `layers.0.self_attn.q_proj`, `lm_head`, `embed_tokens`.
    pub name: String,
    /// GPTQ only: the dampening that made the Hessian invertible, when more than asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damp_percent_used: Option<f64>,
}

/// Where quantization stands, for a progress display.
pub struct Progress<'a> {
    /// The matrix about to be quantized.
    pub name: &'a str,
    pub done: usize,
    pub total: usize,
}

/// Quantizes `model` in place as `options` say. GPTQ needs `calibration`.
pub fn quantize_model(
    model: &mut Llama,
    options: &QuantizeOptions,
    calibration: Option<&Calibration>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<MatrixOutcome>, QuantizeError> {
    check_storable(model, options)?;
    let total = model.linears().len()
        - usize::from(model.lm_head.is_some() && !options.quantize_lm_head)
        + usize::from(options.quantize_embeddings);
    let mut quantizer = Quantizer {
        options,
        outcomes: Vec::new(),
        total,
        progress,
    };
    if options.quantize_embeddings {
        quantizer.embedding(model)?;
    }
    match (options.method, calibration) {
        (QuantizeMethod::Gptq, Some(calibration)) => quantizer.gptq_blocks(model, calibration)?,
        (QuantizeMethod::Gptq, None) => {
            return Err(QuantizeError::Settings(
                "GPTQ needs calibration inputs".into(),
            ));
        }
        _ => {
            let paths: Vec<String> = model
                .linears()
                .into_iter()
                .map(|(path, _)| path)
                .filter(|path| path != "lm_head" || options.quantize_lm_head)
                .collect();
            for path in paths {
                quantizer.round_linear(model, &path)?;
            }
        }
    }
    Ok(quantizer.outcomes)
}

/// GPTQ files pack whole 32-bit words of codes along each matrix's inputs and of zeros along
/// its outputs; a model that cannot be stored is refused before any work.
fn check_storable(model: &Llama, options: &QuantizeOptions) -> Result<(), QuantizeError> {
    let config = model.config();
    let mut shapes: Vec<(String, usize, usize)> = model
        .linears()
        .into_iter()
        .filter(|(path, _)| path != "lm_head" || options.quantize_lm_head)
        .map(|(path, linear)| (path, linear.d_input(), linear.d_output()))
        .collect();
    if options.quantize_embeddings {
        shapes.push(("embed_tokens".into(), config.hidden_size, config.vocab_size));
    }
    let quant = options.settings();
    for (name, inputs, outputs) in shapes {
        settings::check_storable(quant.bits, quant.group_size, inputs, outputs).map_err(
            |source| QuantizeError::Layer {
                layer: name,
                source: source.into(),
            },
        )?;
    }
    Ok(())
}

struct Quantizer<'a> {
    options: &'a QuantizeOptions,
    outcomes: Vec<MatrixOutcome>,
    total: usize,
    progress: &'a mut dyn FnMut(Progress),
}

impl Quantizer<'_> {
    fn announce(&mut self, name: &str) {
        (self.progress)(Progress {
            name,
            done: self.outcomes.len(),
            total: self.total,
        });
    }

    fn embedding(&mut self, model: &mut Llama) -> Result<(), QuantizeError> {
        self.announce("embed_tokens");
        let config = model.config();
        let (rows, cols) = (config.vocab_size, config.hidden_size);
        let matrix = self
            .options
            .round(&model.embedding_values(), rows, cols)
            .map_err(|source| layer_error("embed_tokens", source))?;
        model.set_packed_embedding(PackedMatrix::from_quantized(&matrix));
        self.outcomes.push(MatrixOutcome {
            name: "embed_tokens".into(),
            damp_percent_used: None,
        });
        Ok(())
    }

    fn round_linear(&mut self, model: &mut Llama, path: &str) -> Result<(), QuantizeError> {
        self.announce(path);
        let linear = model.linear_mut(path).expect("paths come from the model");
        let (rows, cols) = (linear.d_output(), linear.d_input());
        let matrix = self
            .options
            .round(&linear.weight_out_in(), rows, cols)
            .map_err(|source| layer_error(path, source))?;
        *linear = Linear::quantized(PackedMatrix::from_quantized(&matrix));
        self.outcomes.push(MatrixOutcome {
            name: path.into(),
            damp_percent_used: None,
        });
        Ok(())
    }

    fn gptq_linear(
        &mut self,
        linear: &mut Linear,
        path: &str,
        hessian: &PreparedHessian,
    ) -> Result<(), QuantizeError> {
        self.announce(path);
        let (rows, cols) = (linear.d_output(), linear.d_input());
        let matrix = gptq(
            &linear.weight_out_in(),
            rows,
            cols,
            hessian,
            &self.options.gptq,
        )
        .map_err(|source| layer_error(path, source))?;
        *linear = Linear::quantized(PackedMatrix::from_quantized(&matrix));
        let retried = hessian.damp_percent() != self.options.gptq.damp_percent;
        self.outcomes.push(MatrixOutcome {
            name: path.into(),
            damp_percent_used: retried.then_some(hessian.damp_percent()),
        });
        Ok(())
    }

    /// `hessian` made ready for GPTQ; `first` names the first matrix it serves in an error.
    fn prepare(&self, hessian: &Hessian, first: &str) -> Result<PreparedHessian, QuantizeError> {
        PreparedHessian::new(hessian, &self.options.gptq)
            .map_err(|source| layer_error(first, source))
    }

    fn gptq_blocks(
        &mut self,
        model: &mut Llama,
        calibration: &Calibration,
    ) -> Result<(), QuantizeError> {
        let device = model.device();
        let seq_len = calibration.seq_len;
        let mut hidden: Vec<Tensor<3>> = calibration
            .tokens
            .chunks(CALIBRATION_BATCH * seq_len)
            .map(|chunk| model.embed(token_windows(chunk, seq_len, &device)))
            .collect();
        let rope = model.rotary_tables().clone();
        for index in 0..model.layers.len() {
            let prefix = format!("layers.{index}");
            hidden = self.gptq_layer(&mut model.layers[index], &prefix, &rope, hidden)?;
        }
        if self.options.quantize_lm_head {
            let normalized: Vec<Tensor<3>> =
                hidden.into_iter().map(|x| model.final_norm(x)).collect();
            if let Some(head) = model.lm_head.as_mut() {
                let prepared = self.prepare(&hessian_of(&normalized), "lm_head")?;
                self.gptq_linear(head, "lm_head", &prepared)?;
            }
        }
        Ok(())
    }

    /// One decoder layer, each group of its matrices calibrated on its inputs as the layer's
    /// own forward pass computes them on the calibration windows: true-sequential quantizes a
    /// group before the next group's inputs are computed, otherwise every input comes from the
    /// float layer. Returns the quantized layer's outputs, the next layer's inputs.
    fn gptq_layer(
        &mut self,
        layer: &mut DecoderLayer,
        prefix: &str,
        rope: &RotaryTables,
        hidden: Vec<Tensor<3>>,
    ) -> Result<Vec<Tensor<3>>, QuantizeError> {
        let sequential = self.options.true_sequential;
        let mut progress: Vec<LayerProgress> =
            hidden.iter().map(|x| layer.begin(x.clone())).collect();
        let mut hessians = Vec::new();
        for (index, group) in LayerMatrix::SEQUENTIAL_GROUPS.into_iter().enumerate() {
            let inputs: Vec<Tensor<3>> = progress.iter().map(|p| p.input().clone()).collect();
            let hessian = hessian_of(&inputs);
            if sequential {
                self.gptq_group(layer, prefix, group, &hessian)?;
            } else {
                hessians.push(hessian);
            }
            // Without true-sequential, the float layer's own output is of no use: the next
            // layer reads the quantized one's, computed below.
            let last = index + 1 == LayerMatrix::SEQUENTIAL_GROUPS.len();
            if sequential || !last {
                progress = progress
                    .into_iter()
                    .map(|p| layer.advance(p, rope))
                    .collect();
            }
        }
        if !sequential {
            for (group, hessian) in LayerMatrix::SEQUENTIAL_GROUPS.into_iter().zip(&hessians) {
                self.gptq_group(layer, prefix, group, hessian)?;
            }
            // The next layer reads the quantized layer's outputs.
            progress = hidden
                .into_iter()
                .map(|x| {
                    let start = layer.begin(x);
                    LayerMatrix::SEQUENTIAL_GROUPS
                        .iter()
                        .fold(start, |p, _| layer.advance(p, rope))
                })
                .collect();
        }
        Ok(progress.into_iter().map(LayerProgress::output).collect())
    }

    /// Quantizes one group of a layer's matrices, which share their inputs' `hessian`.
    fn gptq_group(
        &mut self,
        layer: &mut DecoderLayer,
        prefix: &str,
        matrices: &[LayerMatrix],
        hessian: &Hessian,
    ) -> Result<(), QuantizeError> {
        let first = format!("{prefix}.{}", matrices[0].path());
        let prepared = self.prepare(hessian, &first)?;
        for &matrix in matrices {
            let path = format!("{prefix}.{}", matrix.path());
            self.gptq_linear(layer.matrix_mut(matrix), &path, &prepared)?;
        }
        Ok(())
    }
}

/// `2/N Σ x xᵀ` over every position of `inputs` (`[batch, seq, features]` each), one matrix
/// product per tensor on the model's device.
fn hessian_of(inputs: &[Tensor<3>]) -> Hessian {
    let size = inputs.first().map_or(0, |x| x.dims()[2]);
    let mut hessian = Hessian::new(size);
    for x in inputs {
        let [batch, seq, features] = x.dims();
        let rows = x.clone().reshape([batch * seq, features]);
        let gram = rows.clone().transpose().matmul(rows);
        let sum: Vec<f64> = gram.into_data().iter::<f32>().map(f64::from).collect();
        hessian.add_outer_products(&sum, batch * seq);
    }
    hessian
}

fn layer_error(layer: &str, source: QuantError) -> QuantizeError {
    QuantizeError::Layer {
        layer: layer.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, TensorData};
    use distillery_model::LlamaConfig;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn shape(tie_word_embeddings: bool) -> LlamaConfig {
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
            tie_word_embeddings,
            rope_scaling: None,
        }
    }

    /// The options of a `[quantize]` section as a user writes it, in groups of 16 columns.
    fn options(method: QuantizeMethod, bits: u32) -> QuantizeOptions {
        let method = match method {
            QuantizeMethod::Int8 => "int8",
            QuantizeMethod::Rtn => "rtn",
            QuantizeMethod::Gptq => "gptq",
        };
        let section: QuantizeConfig = toml::from_str(&format!(
            "method = \"{method}\"\nbits = {bits}\ngroup_size = 16\nsym = false\n\
             block_size = 8\nquantize_lm_head = true"
        ))
        .unwrap();
        QuantizeOptions::from(&section)
    }

    fn with_group_size(mut options: QuantizeOptions, group_size: Option<usize>) -> QuantizeOptions {
        options.gptq.quant.group_size = group_size;
        options
    }

    /// Token streams with structure (a repeating random walk), so layer inputs are correlated.
    fn calibration(windows: usize, seq_len: usize, seed: u64) -> Calibration {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut token = 0u32;
        let tokens = (0..windows * seq_len)
            .map(|_| {
                token = (token + rng.random_range(0..5u32)) % 64;
                token
            })
            .collect();
        Calibration { tokens, seq_len }
    }

    /// Mean squared difference of two models' logits on the calibration windows.
    fn logit_error(a: &Llama, b: &Llama, calibration: &Calibration) -> f64 {
        let device = a.device();
        let input = || token_windows(&calibration.tokens, calibration.seq_len, &device);
        let difference = a.forward(input()) - b.forward(input());
        f64::from(
            (difference.clone() * difference)
                .mean()
                .into_scalar::<f32>(),
        )
    }

    fn quantized(
        model: &Llama,
        options: &QuantizeOptions,
        calibration: Option<&Calibration>,
    ) -> (Llama, Vec<MatrixOutcome>) {
        let mut model = model.clone();
        let mut seen = Vec::new();
        let outcomes = quantize_model(&mut model, options, calibration, &mut |progress| {
            seen.push((progress.name.to_string(), progress.done, progress.total));
        })
        .unwrap();
        assert_eq!(seen.len(), outcomes.len());
        assert!(seen.iter().all(|(_, _, total)| *total == outcomes.len()));
        (model, outcomes)
    }

    #[test]
    fn gptq_quantizes_every_matrix_and_beats_round_to_nearest() {
        let device = Device::flex();
        let model = Llama::new(&shape(false), 0.0, 3, &device).unwrap();
        let calibration = calibration(32, 16, 1);
        for true_sequential in [true, false] {
            let gptq_options = QuantizeOptions {
                true_sequential,
                ..options(QuantizeMethod::Gptq, 2)
            };
            let (gptq_model, outcomes) = quantized(&model, &gptq_options, Some(&calibration));
            assert_eq!(outcomes.len(), 2 * 7 + 1);
            assert_eq!(outcomes[0].name, "layers.0.self_attn.q_proj");
            assert_eq!(outcomes[14].name, "lm_head");
            assert!(
                gptq_model
                    .linears()
                    .iter()
                    .all(|(_, linear)| linear.packed().is_some())
            );
            let (rtn_model, _) = quantized(&model, &options(QuantizeMethod::Rtn, 2), None);
            let gptq_error = logit_error(&model, &gptq_model, &calibration);
            let rtn_error = logit_error(&model, &rtn_model, &calibration);
            assert!(
                gptq_error < 0.9 * rtn_error,
                "true_sequential {true_sequential}: GPTQ {gptq_error} vs RTN {rtn_error}"
            );
        }
    }

    #[test]
    fn quantized_logits_do_not_depend_on_how_many_rows_a_product_takes() {
        // 40 windows of 16 tokens put 640 rows through each product (the whole weight decoded
        // once); one window 16 rows (decoded a tile at a time); one token 1 row (integer dot
        // products with int8 inputs, so only close).
        let device = Device::flex();
        let model = Llama::new(&shape(false), 0.0, 6, &device).unwrap();
        let rtn = with_group_size(options(QuantizeMethod::Rtn, 4), Some(32));
        let (quantized_model, _) = quantized(&model, &rtn, None);
        let calibration = calibration(40, 16, 3);
        let ids: Vec<i64> = calibration.tokens.iter().map(|&id| i64::from(id)).collect();
        let logits = |ids: &[i64], windows: usize| -> Vec<f32> {
            let input = TensorData::new(ids.to_vec(), [windows, ids.len() / windows]);
            let output = quantized_model.forward(Tensor::<2, Int>::from_data(input, &device));
            output.into_data().try_into_vec().unwrap()
        };
        let batch = logits(&ids, 40);
        let windows: Vec<f32> = ids
            .chunks(16)
            .flat_map(|window| logits(window, 1))
            .collect();
        let tokens: Vec<f32> = ids.iter().flat_map(|&id| logits(&[id], 1)).collect();
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(worst(&batch, &windows) < 1e-4);
        // Each token alone starts a sequence, so compare with the first positions only.
        let firsts: Vec<f32> = batch
            .chunks(16 * 64)
            .flat_map(|window| window[..64].to_vec())
            .collect();
        let first_tokens: Vec<f32> = tokens
            .chunks(16 * 64)
            .flat_map(|window| window[..64].to_vec())
            .collect();
        let spread = firsts.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        assert!(worst(&firsts, &first_tokens) < 0.05 * spread);
        assert!(
            worst(&firsts, &first_tokens) > 0.0,
            "decoding rounds its inputs to int8"
        );
    }

    #[test]
    fn int8_with_a_quantized_tied_embedding_stays_close_to_float() {
        let device = Device::flex();
        let model = Llama::new(&shape(true), 0.0, 4, &device).unwrap();
        let int8 = QuantizeOptions {
            quantize_embeddings: true,
            quantize_lm_head: false,
            ..with_group_size(options(QuantizeMethod::Int8, 8), None)
        };
        let (quantized_model, outcomes) = quantized(&model, &int8, None);
        assert_eq!(outcomes.len(), 1 + 2 * 7);
        assert_eq!(outcomes[0].name, "embed_tokens");
        assert!(quantized_model.embedding().is_none());
        let packed = quantized_model.packed_embedding().unwrap();
        assert_eq!((packed.rows(), packed.cols(), packed.bits()), (64, 32, 8));
        let calibration = calibration(2, 16, 2);
        let error = logit_error(&model, &quantized_model, &calibration);
        let (rtn4, _) = quantized(
            &model,
            &QuantizeOptions {
                quantize_embeddings: true,
                quantize_lm_head: false,
                ..options(QuantizeMethod::Rtn, 4)
            },
            None,
        );
        let error4 = logit_error(&model, &rtn4, &calibration);
        assert!(error < error4 / 50.0, "int8 {error} vs 4-bit {error4}");
    }

    #[test]
    fn unusable_settings_are_errors_naming_the_layer() {
        let device = Device::flex();
        let mut model = Llama::new(&shape(false), 0.0, 5, &device).unwrap();
        let error = quantize_model(
            &mut model,
            &options(QuantizeMethod::Gptq, 4),
            None,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(error.to_string().contains("calibration"), "{error}");
        // k_proj has 16 outputs: 3-bit zeros need multiples of 32.
        let error = quantize_model(
            &mut model,
            &options(QuantizeMethod::Rtn, 3),
            None,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("layers.0.self_attn.k_proj: 32 inputs x 16 outputs"),
            "{error}"
        );
        let wide_groups = with_group_size(options(QuantizeMethod::Rtn, 4), Some(48));
        let error = quantize_model(&mut model, &wide_groups, None, &mut |_| {}).unwrap_err();
        assert!(
            error.to_string().contains("wider than the 32 input"),
            "{error}"
        );
        assert!(
            model
                .linears()
                .iter()
                .all(|(_, linear)| linear.packed().is_none()),
            "refused settings leave the model untouched"
        );
    }
}
