//! The Llama model: one definition for training, evaluation, generation and export.
//!
//! No file or network I/O lives here; formats and checkpoints map onto these modules elsewhere.

mod config;
pub mod generate;
mod kv_cache;
mod llama;
mod matrices;
pub mod rope;
mod speculative;

pub use config::{LlamaConfig, RopeScaling};
pub use generate::{
    Generation, GenerationConfig, SamplingConfig, StopReason, generate, generate_batch,
    generate_batch_streaming, generate_streaming,
};
pub use kv_cache::KvCache;
pub use llama::{
    Attention, DecoderLayer, INIT_STD, LayerProgress, LayerWeights, Linear, Llama, LlamaOutput,
    LlamaWeights, Mlp, Weight, in_out_weight, token_windows,
};
pub use matrices::LayerMatrix;
pub use speculative::{Draft, DraftLength, DraftStats, generate_with_draft, most_frequent_tokens};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("dropout must be in [0, 1), got {0}")]
    InvalidDropout(f64),
    #[error("sampling: `{field}` {reason}")]
    InvalidSampling { field: &'static str, reason: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens, more than the model's context of {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("weight `{path}` has shape {shape:?}; the config implies {expected:?}")]
    WeightShape {
        path: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::tensor::{Device, Int, Tensor, TensorData};

    use super::*;

    fn config(tie_word_embeddings: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 24,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings,
            rope_scaling: None,
        }
    }

    fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
    }

    fn flat(tensor: Tensor<3>) -> Vec<f32> {
        tensor.into_data().try_into_vec().unwrap()
    }

    #[test]
    fn cached_decoding_matches_full_forward() {
        let device = Device::flex();
        for tie in [false, true] {
            let model = Llama::new(&config(tie), 0.0, 3, &device).unwrap();
            let ids: Vec<i64> = (0..12).map(|i| (i * 7 + 3) % 50).collect();
            let full = flat(model.forward(tokens(&ids, &device)));

            // A growing cache reallocates twice on the way (5, 10, 20 positions); a reserved
            // one never does.
            for (kind, mut cache) in [
                ("growing", KvCache::new(2)),
                ("reserved", KvCache::with_capacity(2, ids.len())),
            ] {
                let mut pieces = flat(
                    model
                        .forward_with(tokens(&ids[..5], &device), Some(&mut cache), false)
                        .logits,
                );
                for &id in &ids[5..] {
                    let step = model.forward_with(tokens(&[id], &device), Some(&mut cache), false);
                    pieces.extend(flat(step.logits));
                }
                assert_eq!(cache.len(), ids.len());
                assert_eq!(full.len(), pieces.len());
                let worst = full
                    .iter()
                    .zip(&pieces)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "tied={tie}, {kind}: cached logits differ by {worst}"
                );
            }
        }
    }

    /// A pass that projects only its last rows gives those rows' logits of the full pass, and
    /// still caches every position: the next step continues as after a full pass.
    #[test]
    fn passes_over_the_last_rows_give_the_full_passes_logits_and_cache_every_position() {
        let device = Device::flex();
        let vocab = config(false).vocab_size;
        for tie in [false, true] {
            let model = Llama::new(&config(tie), 0.0, 5, &device).unwrap();
            let ids: Vec<i64> = (0..13).map(|i| (i * 5 + 2) % 50).collect();
            let full = flat(model.forward(tokens(&ids, &device)));
            for rows in [1, 3, 12] {
                let mut cache = KvCache::new(2);
                let last = model.forward_last(tokens(&ids[..12], &device), Some(&mut cache), rows);
                assert_eq!(last.dims(), [1, rows, vocab]);
                assert_eq!(cache.len(), 12);
                let step = model.forward_last(tokens(&ids[12..], &device), Some(&mut cache), 1);
                let got = [flat(last), flat(step)].concat();
                let want = &full[(12 - rows) * vocab..];
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() < 1e-4, "tied={tie}, rows={rows}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn layers_advanced_group_by_group_compute_the_forward_pass_bit_for_bit() {
        let device = Device::flex();
        let model = Llama::new(&config(false), 0.0, 4, &device).unwrap();
        let ids: Vec<i64> = (0..10).map(|i| (i * 11 + 5) % 50).collect();
        let mut x = model.embed(tokens(&ids, &device));
        for layer in &model.layers {
            let mut progress = layer.begin(x);
            let mut widths = Vec::new();
            for group in LayerMatrix::SEQUENTIAL_GROUPS {
                assert_eq!(progress.input().dims()[2], group[0].shape(model.config()).0);
                widths.push(progress.input().dims()[2]);
                progress = layer.advance(progress, model.rotary_tables());
            }
            assert_eq!(widths, [32, 32, 32, 48], "q/k/v, o, gate/up, down inputs");
            x = progress.output();
        }
        let stepped = flat(model.project(model.final_norm(x)));
        assert_eq!(stepped, flat(model.forward(tokens(&ids, &device))));
    }

    #[test]
    fn float_layers_applied_together_give_each_layers_own_product() {
        let device = Device::flex();
        let model = Llama::new(&config(false), 0.0, 3, &device).unwrap();
        let linears = model.layers[0].linears().map(|(_, linear)| linear);
        let [query, key, value] = [linears[0], linears[1], linears[2]];
        // A decode step's row, a checking pass's few, and a prompt's many.
        for rows in [1, 4, 12] {
            let values: Vec<f32> = (0..rows * 32)
                .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let x = Tensor::<3>::from_data(TensorData::new(values, [1, rows, 32]), &device);
            let together = Linear::forward_together([query, key, value], x.clone());
            for (linear, output) in [query, key, value].into_iter().zip(together) {
                assert_eq!(flat(output), flat(linear.forward(x.clone())), "{rows} rows");
            }
        }
    }

    #[test]
    fn logits_and_hidden_states_have_documented_shapes() {
        let device = Device::flex();
        let model = Llama::new(&config(false), 0.0, 1, &device).unwrap();
        let input = Tensor::<2, Int>::from_data(
            TensorData::new((0..14).collect::<Vec<i64>>(), [2, 7]),
            &device,
        );
        let output = model.forward_with(input, None, true);
        assert_eq!(output.logits.dims(), [2, 7, 50]);
        let states = output.hidden_states.unwrap();
        assert_eq!(states.len(), 3);
        assert!(states.iter().all(|state| state.dims() == [2, 7, 32]));
    }

    #[test]
    fn later_tokens_do_not_change_earlier_logits() {
        let device = Device::flex();
        let model = Llama::new(&config(false), 0.0, 5, &device).unwrap();
        let short = flat(model.forward(tokens(&[1, 2, 3], &device)));
        let long = flat(model.forward(tokens(&[1, 2, 3, 40, 41], &device)));
        for (a, b) in short.iter().zip(&long[..short.len()]) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn initial_loss_is_near_uniform() {
        // With std 0.02 weights the first loss sits near ln(vocab); N(0, 1) embeddings put it
        // far above.
        let device = Device::flex();
        let config = LlamaConfig {
            vocab_size: 512,
            ..config(false)
        };
        let model = Llama::new(&config, 0.0, 11, &device).unwrap();
        let ids: Vec<i64> = (0..20).map(|i| (i * 37) % 512).collect();
        let logits = model.forward(tokens(&ids, &device));
        let log_probs = burn::tensor::activation::log_softmax(logits, 2);
        let mean_log_prob: f32 = log_probs.mean().into_scalar();
        let uniform = (512f32).ln();
        assert!(
            (-mean_log_prob - uniform).abs() < 0.05,
            "loss {} vs ln(vocab) {uniform}",
            -mean_log_prob
        );
    }

    #[test]
    fn same_seed_same_weights_and_different_seed_differs() {
        let device = Device::flex();
        let weights = |seed| {
            Llama::new(&config(false), 0.0, seed, &device)
                .unwrap()
                .layers[1]
                .mlp
                .down_proj
                .float_weight()
                .unwrap()
                .val()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        };
        assert_eq!(weights(9), weights(9));
        assert_ne!(weights(9), weights(10));
        let values = weights(9);
        let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        let expected = (INIT_STD / 2.0) as f32;
        assert!((std - expected).abs() < 0.15 * expected, "std {std}");
    }

    #[test]
    fn dropout_applies_only_in_training_and_follows_its_seed() {
        let device = Device::flex();
        let mut model = Llama::new(&config(false), 0.2, 4, &device).unwrap().train();
        let autodiff = device.clone().autodiff();
        let ids = [3i64, 9, 27, 31, 2];
        let logits = |model: &Llama| flat(model.forward(tokens(&ids, &autodiff)));
        model.set_dropout_seed(1);
        let first = logits(&model);
        assert_eq!(first, logits(&model));
        model.set_dropout_seed(2);
        let second = logits(&model);
        assert_ne!(first, second);
        // Evaluation mode (no autodiff) never drops.
        let eval = model.valid();
        let plain = flat(eval.forward(tokens(&ids, &device)));
        let without = Llama::new(&config(false), 0.0, 4, &device).unwrap();
        assert_eq!(plain, flat(without.forward(tokens(&ids, &device))));
    }

    #[test]
    fn quantized_layers_compute_with_their_dequantized_weights() {
        let device = Device::flex();
        let mut model = Llama::new(&config(false), 0.0, 8, &device).unwrap();
        let mut reference = Llama::new(&config(false), 0.0, 8, &device).unwrap();
        let settings = distillery_quant::QuantSettings {
            bits: 4,
            group_size: Some(16),
            symmetric: false,
            clip_search: false,
        };
        let paths: Vec<String> = model.linears().into_iter().map(|(path, _)| path).collect();
        for path in &paths {
            let linear = model.linear_mut(path).unwrap();
            let (rows, cols) = (linear.d_output(), linear.d_input());
            let matrix =
                distillery_quant::round_to_nearest(&linear.weight_out_in(), rows, cols, &settings)
                    .unwrap();
            let packed = distillery_quant::PackedMatrix::from_quantized(&matrix);
            let out_in = packed.dequantize();
            let dequantized: Vec<f32> = (0..rows * cols)
                .map(|index| out_in[(index % rows) * cols + index / rows])
                .collect();
            *linear = Linear::quantized(packed);
            *reference.linear_mut(path).unwrap() = Linear::new(burn::module::Param::from_data(
                TensorData::new(dequantized, [cols, rows]),
                &device,
            ));
        }
        // Quantized weights are no longer float parameters.
        let quantized: usize = model
            .linears()
            .iter()
            .map(|(_, linear)| linear.d_input() * linear.d_output())
            .sum();
        assert_eq!(
            model.num_params(),
            config(false).num_parameters() - quantized
        );
        // One row decodes on the fly; a long sequence goes through a dequantized copy.
        for length in [1, 20] {
            let ids: Vec<i64> = (0..length).map(|i| (i * 11 + 2) % 50).collect();
            let quantized = flat(model.forward(tokens(&ids, &device)));
            let float = flat(reference.forward(tokens(&ids, &device)));
            let worst = quantized
                .iter()
                .zip(&float)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{length} tokens: logits differ by {worst}");
        }
        // Dequantized, the model is the reference: the same float weights, the same logits.
        assert!(model.is_quantized());
        let dequantized = model.dequantized();
        assert!(!dequantized.is_quantized());
        let ids: Vec<i64> = (0..12).map(|i| (i * 3 + 1) % 50).collect();
        assert_eq!(
            flat(dequantized.forward(tokens(&ids, &device))),
            flat(reference.forward(tokens(&ids, &device)))
        );
    }

    /// A head over some tokens gives each of them the logit the whole head gives it, whether
    /// the head is the tied table or its own matrix, float or quantized: bit for bit on the
    /// few rows of decoding steps (int8 inputs where quantized), up to the general product's
    /// rounding on a prompt.
    #[test]
    fn a_head_over_some_tokens_gives_their_logits_of_the_whole_head() {
        let device = Device::flex();
        let chosen: Vec<u32> = vec![41, 3, 17, 0, 49, 8, 30];
        for tie in [true, false] {
            for quantized in [false, true] {
                let mut model = Llama::new(&config(tie), 0.0, 4, &device).unwrap();
                if quantized {
                    let table = model.embedding_values();
                    let matrix = distillery_quant::int8_absmax(&table, 50, 32, Some(16)).unwrap();
                    model.set_packed_embedding(distillery_quant::PackedMatrix::from_quantized(
                        &matrix,
                    ));
                    if let Some(head) = model.lm_head.as_mut() {
                        let matrix =
                            distillery_quant::int8_absmax(&head.weight_out_in(), 50, 32, None)
                                .unwrap();
                        *head = Linear::quantized(distillery_quant::PackedMatrix::from_quantized(
                            &matrix,
                        ));
                    }
                }
                let shortlisted = model.clone().with_head_over(&chosen).unwrap();
                let what = format!("tied {tie}, quantized {quantized}");
                for length in [1, distillery_kernels::FEW_ROWS as i64, 12] {
                    let ids: Vec<i64> = (0..length).map(|i| (i * 13 + 5) % 50).collect();
                    let whole = flat(model.forward(tokens(&ids, &device)));
                    let part = shortlisted.forward(tokens(&ids, &device));
                    assert_eq!(part.dims(), [1, length as usize, chosen.len()], "{what}");
                    let want: Vec<f32> = whole
                        .chunks_exact(50)
                        .flat_map(|row| chosen.iter().map(|&token| row[token as usize]))
                        .collect();
                    let part = flat(part);
                    if length <= distillery_kernels::FEW_ROWS as i64 {
                        assert_eq!(part, want, "{what}, {length} tokens");
                    }
                    for (got, want) in part.iter().zip(&want) {
                        assert!((got - want).abs() < 1e-5, "{what}: {got} vs {want}");
                    }
                }
            }
        }
        let model = Llama::new(&config(true), 0.0, 4, &device).unwrap();
        assert!(matches!(
            model.with_head_over(&[3, 50]),
            Err(ModelError::TokenOutOfRange {
                token: 50,
                vocab: 50
            })
        ));
    }

    #[test]
    fn a_quantized_tied_embedding_serves_lookup_and_output() {
        let device = Device::flex();
        let mut model = Llama::new(&config(true), 0.0, 9, &device).unwrap();
        let table = model.embedding_values();
        let matrix = distillery_quant::int8_absmax(&table, 50, 32, None).unwrap();
        let packed = distillery_quant::PackedMatrix::from_quantized(&matrix);
        let dequantized = packed.dequantize();
        model.set_packed_embedding(packed);
        assert!(model.embedding().is_none());
        assert_eq!(model.embedding_values(), dequantized);
        let mut reference = Llama::new(&config(true), 0.0, 9, &device).unwrap();
        reference.set_embedding(burn::module::Param::from_data(
            TensorData::new(dequantized, [50, 32]),
            &device,
        ));
        // More rows than a decoding step, so the head computes with exact float inputs.
        let ids: Vec<i64> = (0..12).map(|i| (i * 17 + 4) % 50).collect();
        let worst = flat(model.forward(tokens(&ids, &device)))
            .iter()
            .zip(&flat(reference.forward(tokens(&ids, &device))))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "logits differ by {worst}");
    }

    /// The parameter paths checkpoints and optimizer moments are keyed by, and the float
    /// parameters counted: a quantized weight is none of them.
    #[test]
    fn float_weights_are_parameters_under_their_field_names_and_quantized_ones_are_not() {
        #[derive(Default)]
        struct Paths {
            path: Vec<String>,
            found: Vec<(String, usize)>,
        }
        impl burn::module::ModuleVisitor for Paths {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                self.found
                    .push((self.path.join("."), param.shape().num_elements()));
            }
        }
        let paths = |model: &Llama| {
            let mut visitor = Paths::default();
            model.visit(&mut visitor);
            visitor.found
        };
        let device = Device::flex();
        let mut model = Llama::new(&config(false), 0.0, 2, &device).unwrap();
        let float = paths(&model);
        assert_eq!(float[0], ("embed_tokens".to_string(), 50 * 32));
        assert_eq!(
            float[2],
            ("layers.0.self_attn.q_proj.weight".to_string(), 32 * 32)
        );
        assert_eq!(float.last().unwrap().0, "lm_head.weight");
        assert_eq!(
            model.num_params(),
            float.iter().map(|(_, n)| n).sum::<usize>()
        );

        let table = model.embedding_values();
        let matrix = distillery_quant::int8_absmax(&table, 50, 32, None).unwrap();
        model.set_packed_embedding(distillery_quant::PackedMatrix::from_quantized(&matrix));
        let q_proj = &mut model.layers[0].self_attn.q_proj;
        let matrix = distillery_quant::int8_absmax(&q_proj.weight_out_in(), 32, 32, None).unwrap();
        *q_proj = Linear::quantized(distillery_quant::PackedMatrix::from_quantized(&matrix));
        let quantized = paths(&model);
        let gone: Vec<&str> = float
            .iter()
            .filter(|entry| !quantized.contains(entry))
            .map(|(path, _)| path.as_str())
            .collect();
        assert_eq!(gone, ["embed_tokens", "layers.0.self_attn.q_proj.weight"]);
        assert_eq!(quantized.len(), float.len() - 2);
        assert_eq!(
            model.num_params(),
            quantized.iter().map(|(_, n)| n).sum::<usize>()
        );
    }

    /// A model's weights handed back to [`Llama::from_weights`] make the same model; a shape
    /// the config does not imply is refused naming the weight.
    #[test]
    fn models_assemble_from_their_weights() {
        let device = Device::flex();
        for tie in [false, true] {
            let config = config(tie);
            let model = Llama::new(&config, 0.0, 6, &device).unwrap();
            let weights = |model: &Llama| LlamaWeights {
                embed_tokens: Weight::float(model.embedding().unwrap().val()),
                layers: model
                    .layers
                    .iter()
                    .map(|layer| LayerWeights {
                        input_layernorm: layer.input_layernorm.gamma.val(),
                        post_attention_layernorm: layer.post_attention_layernorm.gamma.val(),
                        matrices: LayerMatrix::ALL.map(|matrix| {
                            Weight::float(layer.matrix(matrix).float_weight().unwrap().val())
                        }),
                    })
                    .collect(),
                norm: model.norm.gamma.val(),
                lm_head: model
                    .lm_head
                    .as_ref()
                    .map(|head| Weight::float(head.float_weight().unwrap().val())),
            };
            let assembled = Llama::from_weights(&config, weights(&model), &device).unwrap();
            let ids: Vec<i64> = (0..9).map(|i| (i * 13 + 5) % 50).collect();
            assert_eq!(
                flat(assembled.forward(tokens(&ids, &device))),
                flat(model.forward(tokens(&ids, &device)))
            );
            let mut wrong = weights(&model);
            wrong.layers[1].matrices[6] = Weight::float(Tensor::zeros([3, 32], &device));
            let error = Llama::from_weights(&config, wrong, &device)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("layers.1.mlp.down_proj") && error.contains("[48, 32]"),
                "{error}"
            );
        }
    }

    #[test]
    fn parameter_count_matches_config() {
        let device = Device::flex();
        for tie in [false, true] {
            let config = config(tie);
            let model = Llama::new(&config, 0.0, 0, &device).unwrap();
            assert_eq!(model.num_params(), config.num_parameters());
        }
    }

    #[test]
    fn greedy_generation_is_reproducible_and_stops_at_limits() {
        let device = Device::flex();
        let model = Llama::new(&config(true), 0.0, 2, &device).unwrap();
        let generation_config = GenerationConfig {
            max_new_tokens: 6,
            sampling: SamplingConfig::default(),
            stop_tokens: Vec::new(),
        };
        let first = generate(&model, &[1, 2, 3], &generation_config).unwrap();
        assert_eq!(first.tokens.len(), 6);
        assert_eq!(first.stop, StopReason::TokenLimit);
        assert_eq!(
            first,
            generate(&model, &[1, 2, 3], &generation_config).unwrap()
        );
        let mut streamed = Vec::new();
        let streaming = generate_streaming(&model, &[1, 2, 3], &generation_config, |token| {
            streamed.push(token)
        })
        .unwrap();
        assert_eq!((&streaming, &streamed), (&first, &first.tokens));

        // The greedy continuation equals repeatedly taking the argmax of an uncached forward.
        let mut sequence: Vec<i64> = vec![1, 2, 3];
        for _ in 0..6 {
            let logits = flat(model.forward(tokens(&sequence, &device)));
            let last = &logits[logits.len() - 50..];
            let best = (0..50)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
                .unwrap();
            sequence.push(best as i64);
        }
        let expected: Vec<u32> = sequence[3..].iter().map(|&id| id as u32).collect();
        assert_eq!(first.tokens, expected);

        let eos = first.tokens[1];
        let stopped = generate(
            &model,
            &[1, 2, 3],
            &GenerationConfig {
                stop_tokens: vec![eos],
                ..generation_config.clone()
            },
        )
        .unwrap();
        let stop_at = first.tokens.iter().position(|&t| t == eos).unwrap();
        assert_eq!(stopped.tokens, first.tokens[..=stop_at]);
        assert_eq!(stopped.stop, StopReason::EndOfSequence);

        let long = generate(
            &model,
            &[1; 20],
            &GenerationConfig {
                max_new_tokens: 100,
                ..generation_config
            },
        )
        .unwrap();
        assert_eq!(long.stop, StopReason::ContextFull);
        assert_eq!(long.tokens.len(), 24 - 20 + 1);
    }

    #[test]
    fn bad_prompts_are_errors() {
        let device = Device::flex();
        let model = Llama::new(&config(true), 0.0, 2, &device).unwrap();
        let config = GenerationConfig {
            max_new_tokens: 1,
            sampling: SamplingConfig::default(),
            stop_tokens: Vec::new(),
        };
        assert!(matches!(
            generate(&model, &[], &config),
            Err(ModelError::EmptyPrompt)
        ));
        assert!(matches!(
            generate(&model, &[50], &config),
            Err(ModelError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            generate(&model, &[1; 25], &config),
            Err(ModelError::PromptTooLong { .. })
        ));
    }
}
