//! Autoregressive generation with a KV cache and seeded sampling.

use burn::tensor::{Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use distillery_kernels::FEW_ROWS;

use crate::{KvCache, Llama, ModelError};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |field, reason: String| Err(ModelError::InvalidSampling { field, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if self.top_k == Some(0) {
            return invalid("top_k", "must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return invalid("top_p", format!("must be in (0, 1], got {p}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops after emitting any of these tokens (end of sequence, end of turn).
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfSequence,
    TokenLimit,
    /// The model's `max_position_embeddings` was reached.
    ContextFull,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens only, without the prompt.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

impl Generation {
    /// The new tokens without the stop token that ended them: the text to show.
    pub fn tokens_without_stop(&self) -> &[u32] {
        match self.stop {
            StopReason::EndOfSequence => &self.tokens[..self.tokens.len() - 1],
            _ => &self.tokens,
        }
    }
}

/// Continues `prompt`: one forward pass over the prompt, then one position per new token.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    config: &GenerationConfig,
) -> Result<Generation, ModelError> {
    generate_streaming(model, prompt, config, |_| {})
}

/// [`generate`], handing each new token to `on_token` as soon as it is chosen.
pub fn generate_streaming(
    model: &Llama,
    prompt: &[u32],
    config: &GenerationConfig,
    on_token: impl FnMut(u32) + Send,
) -> Result<Generation, ModelError> {
    config.sampling.validate()?;
    check_prompt(model, prompt)?;

    // Quantized layers split each product over rayon's threads. Decoding on one of them makes
    // every split a work-stealing fork instead of a hand-over that puts this thread to sleep
    // and wakes it again, which at one token's matrices costs as much as the arithmetic.
    rayon::scope(|_| decode(model, prompt, config, on_token))
}

/// Several prompts continued together, each exactly as [`generate`] continues it alone (its
/// own cache, positions and seeded sampler): each prompt is read on its own, then every
/// decoding step runs the unfinished sequences through the model together, up to
/// [`FEW_ROWS`] at a time, so one pass over the weights serves several tokens. A sequence that
/// stops leaves the batch. The generations come back in the prompts' order.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Generation>, ModelError> {
    generate_batch_streaming(model, prompts, config, |_, _| {})
}

/// [`generate_batch`], handing each new token to `on_token` with its prompt's index as soon as
/// it is chosen: every prompt's first token (each prompt read on its own) before any second.
pub fn generate_batch_streaming(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_token: impl FnMut(usize, u32) + Send,
) -> Result<Vec<Generation>, ModelError> {
    config.sampling.validate()?;
    for prompt in prompts {
        check_prompt(model, prompt)?;
    }
    Ok(rayon::scope(|_| {
        decode_batch(model, prompts, config, on_token)
    }))
}

/// A sequence being decoded, alone or in a batch: its cache, its sampler and what it has
/// generated.
struct Sequence {
    cache: KvCache,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    stop: Option<StopReason>,
}

impl Sequence {
    /// A sequence about to read a prompt of `prompt_tokens` tokens (which fits the context).
    fn new(model: &Llama, prompt_tokens: usize, config: &GenerationConfig) -> Self {
        let context = model.config().max_position_embeddings;
        let positions = (prompt_tokens + config.max_new_tokens).min(context);
        Self {
            cache: KvCache::with_capacity(model.layers.len(), positions),
            rng: ChaCha8Rng::seed_from_u64(config.sampling.seed),
            tokens: Vec::new(),
            stop: (config.max_new_tokens == 0).then_some(StopReason::TokenLimit),
        }
    }

    /// Takes `token` and stops at a stop token, at the token limit, or when the next position
    /// would not fit the context.
    fn push(&mut self, token: u32, config: &GenerationConfig, context: usize) {
        self.tokens.push(token);
        self.stop = if config.stop_tokens.contains(&token) {
            Some(StopReason::EndOfSequence)
        } else if self.tokens.len() == config.max_new_tokens {
            Some(StopReason::TokenLimit)
        } else if self.cache.len() + 1 > context {
            Some(StopReason::ContextFull)
        } else {
            None
        };
    }

    fn finish(self) -> Generation {
        Generation {
            tokens: self.tokens,
            stop: self.stop.expect("a finished sequence has stopped"),
        }
    }
}

fn decode_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Vec<Generation> {
    let context = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    let mut sequences: Vec<Sequence> = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            let mut sequence = Sequence::new(model, prompt.len(), config);
            if sequence.stop.is_none() {
                let last = last_logits(model, prompt, &mut sequence.cache, 1);
                let token = sample_token(&last, &config.sampling, &mut sequence.rng);
                on_token(index, token);
                sequence.push(token, config, context);
            }
            sequence
        })
        .collect();
    loop {
        let running: Vec<usize> = (0..sequences.len())
            .filter(|&index| sequences[index].stop.is_none())
            .collect();
        if running.is_empty() {
            break;
        }
        for group in running.chunks(FEW_ROWS) {
            let ids: Vec<i64> = group
                .iter()
                .map(|&index| i64::from(*sequences[index].tokens.last().expect("a first token")))
                .collect();
            let tokens = Tensor::<2, Int>::from_data(
                TensorData::new(ids, [group.len(), 1]),
                &model.device(),
            );
            let mut caches: Vec<KvCache> = group
                .iter()
                .map(|&index| std::mem::take(&mut sequences[index].cache))
                .collect();
            let logits = model
                .forward_rows(tokens, &mut caches)
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("float logits convert to f32");
            for ((&index, cache), row) in group.iter().zip(caches).zip(logits.chunks(vocab)) {
                let sequence = &mut sequences[index];
                sequence.cache = cache;
                let token = sample_token(row, &config.sampling, &mut sequence.rng);
                on_token(index, token);
                sequence.push(token, config, context);
            }
        }
    }
    sequences.into_iter().map(Sequence::finish).collect()
}

/// A prompt `model` can continue: not empty, within its context, every id in its vocabulary.
pub(crate) fn check_prompt(model: &Llama, prompt: &[u32]) -> Result<(), ModelError> {
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if prompt.len() > context {
        return Err(ModelError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(&token) = prompt.iter().find(|&&token| token as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange { token, vocab });
    }
    Ok(())
}

fn decode(
    model: &Llama,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, ModelError> {
    let context = model.config().max_position_embeddings;
    let mut sequence = Sequence::new(model, prompt.len(), config);
    let mut next_input = prompt.to_vec();
    while sequence.stop.is_none() {
        let last = last_logits(model, &next_input, &mut sequence.cache, 1);
        let token = sample_token(&last, &config.sampling, &mut sequence.rng);
        on_token(token);
        sequence.push(token, config, context);
        next_input = vec![token];
    }
    Ok(sequence.finish())
}

/// The logits of the last `rows` positions of one forward pass over `input` that continues
/// `cache`, one row of the model's vocabulary after another.
pub(crate) fn last_logits(
    model: &Llama,
    input: &[u32],
    cache: &mut KvCache,
    rows: usize,
) -> Vec<f32> {
    let ids: Vec<i64> = input.iter().map(|&id| i64::from(id)).collect();
    let tokens =
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, input.len()]), &model.device());
    model
        .forward_last(tokens, Some(cache), rows)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float logits convert to f32")
}

/// Picks a token from one position's logits.
pub fn sample_token(logits: &[f32], config: &SamplingConfig, rng: &mut impl rand::Rng) -> u32 {
    Distribution::of(logits, config).draw(rng)
}

/// One position's next-token distribution after temperature, top-k and top-p: the tokens it
/// can pick, most likely first, with their probabilities. Greedy decoding puts all the mass
/// on the first maximum and draws nothing from the generator.
pub(crate) struct Distribution {
    candidates: Vec<u32>,
    probabilities: Vec<f64>,
    greedy: bool,
}

impl Distribution {
    pub(crate) fn of(logits: &[f32], config: &SamplingConfig) -> Self {
        if config.temperature == 0.0 {
            return Self {
                candidates: vec![argmax(logits)],
                probabilities: vec![1.0],
                greedy: true,
            };
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| (id as u32, logit / config.temperature))
            .collect();
        // Descending by logit, ties by id, so the candidate order never depends on the sort's
        // stability.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = config.top_k {
            candidates.truncate(k);
        }
        let max = candidates[0].1;
        let mut probabilities: Vec<f64> = candidates
            .iter()
            .map(|&(_, logit)| ((logit - max) as f64).exp())
            .collect();
        let total: f64 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = config.top_p {
            let mut cumulative = 0.0;
            let keep = probabilities
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= top_p as f64
                })
                .map_or(probabilities.len(), |last| last + 1);
            probabilities.truncate(keep);
            let kept: f64 = probabilities.iter().sum();
            probabilities.iter_mut().for_each(|p| *p /= kept);
        }
        candidates.truncate(probabilities.len());
        Self {
            candidates: candidates.into_iter().map(|(id, _)| id).collect(),
            probabilities,
            greedy: false,
        }
    }

    /// The same distribution over `tokens[i]` where this one names `i`: a shortlist head's
    /// outputs as token ids.
    pub(crate) fn renamed(mut self, tokens: &[u32]) -> Self {
        for candidate in &mut self.candidates {
            *candidate = tokens[*candidate as usize];
        }
        self
    }

    /// A token drawn from the distribution: one uniform draw, walked through the cumulative
    /// probabilities.
    pub(crate) fn draw(&self, rng: &mut impl rand::Rng) -> u32 {
        if self.greedy {
            return self.candidates[0];
        }
        let draw: f64 = rng.random();
        let mut cumulative = 0.0;
        for (index, p) in self.probabilities.iter().enumerate() {
            cumulative += p;
            if draw < cumulative {
                return self.candidates[index];
            }
        }
        self.candidates[self.candidates.len() - 1]
    }

    /// The probability of `token`; 0 outside the candidates.
    pub(crate) fn probability(&self, token: u32) -> f64 {
        self.candidates
            .iter()
            .position(|&candidate| candidate == token)
            .map_or(0.0, |index| self.probabilities[index])
    }

    /// `max(0, self − other)`, normalized: what speculative decoding draws from when it rejects
    /// a token of `other`'s. Only called after such a rejection, where `self` is below `other`
    /// at the rejected token and so above it somewhere else.
    pub(crate) fn residual(&self, other: &Distribution) -> Distribution {
        let size = self
            .candidates
            .iter()
            .chain(&other.candidates)
            .max()
            .map_or(0, |&id| id as usize + 1);
        let mut subtracted = vec![0.0f64; size];
        for (&id, &p) in other.candidates.iter().zip(&other.probabilities) {
            subtracted[id as usize] = p;
        }
        let (candidates, mut probabilities): (Vec<u32>, Vec<f64>) = self
            .candidates
            .iter()
            .zip(&self.probabilities)
            .map(|(&id, &p)| (id, (p - subtracted[id as usize]).max(0.0)))
            .filter(|&(_, p)| p > 0.0)
            .unzip();
        let total: f64 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
        Distribution {
            candidates,
            probabilities,
            greedy: self.greedy,
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in logits.iter().enumerate() {
        if value.total_cmp(&logits[best]).is_gt() {
            best = index;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed: 7,
        }
    }

    fn counts(logits: &[f32], config: &SamplingConfig, draws: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sample_token(logits, config, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let logits = [0.1, 2.0, -1.0, 2.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            sample_token(&logits, &sampling(0.0, None, None), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 0.3, 2.5, 2.4];
        let counts = counts(&logits, &sampling(1.0, Some(1), None), 200);
        assert_eq!(counts, vec![0, 0, 200, 0]);
    }

    #[test]
    fn top_k_excludes_the_tail() {
        let logits = [3.0, 2.9, 2.8, -5.0];
        let counts = counts(&logits, &sampling(1.0, Some(2), None), 2000);
        assert_eq!(counts[2] + counts[3], 0);
        assert!(counts[0] > 0 && counts[1] > 0);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125: p = 0.7 keeps the first two.
        let logits = [2f32.ln() * 2.0, 2f32.ln(), 0.0, 0.0];
        let counts = counts(&logits, &sampling(1.0, None, Some(0.7)), 3000);
        assert_eq!(counts[2] + counts[3], 0);
        // Renormalized: 2/3 and 1/3.
        let share = counts[0] as f64 / 3000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.04, "{counts:?}");
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        // Temperature 2 halves the logits: probabilities proportional to e^0, e^1.
        let logits = [0.0, 2.0];
        let counts = counts(&logits, &sampling(2.0, None, None), 4000);
        let expected = 1.0 / (1.0 + 1f64.exp());
        let share = counts[0] as f64 / 4000.0;
        assert!((share - expected).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = [0.3, 0.2, 0.1, 0.0, -0.1];
        let config = sampling(1.0, None, None);
        assert_eq!(counts(&logits, &config, 50), counts(&logits, &config, 50));
    }

    fn batch_model(seed: u64) -> Llama {
        let config = crate::LlamaConfig {
            vocab_size: 40,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 20,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            rope_scaling: None,
        };
        Llama::new(&config, 0.0, seed, &burn::tensor::Device::flex()).unwrap()
    }

    /// Every matrix and the tied embedding as int8 in groups of 32, computing with int8
    /// activations on decoding steps.
    fn quantized(mut model: Llama) -> Llama {
        let paths: Vec<String> = model.linears().into_iter().map(|(path, _)| path).collect();
        for path in &paths {
            let linear = model.linear_mut(path).unwrap();
            let (rows, cols) = (linear.d_output(), linear.d_input());
            let matrix =
                distillery_quant::int8_absmax(&linear.weight_out_in(), rows, cols, Some(32))
                    .unwrap();
            *linear =
                crate::Linear::quantized(distillery_quant::PackedMatrix::from_quantized(&matrix));
        }
        let table = model.embedding_values();
        let matrix = distillery_quant::int8_absmax(&table, 40, 32, Some(32)).unwrap();
        model.set_packed_embedding(distillery_quant::PackedMatrix::from_quantized(&matrix));
        model.set_activation_rounding(distillery_quant::ActivationRounding::DecodeSteps);
        model
    }

    /// Eleven prompts of different lengths (more than one step's group of rows), some reaching
    /// the end of the context, one stopping at a stop token: each sequence of the batch is
    /// token for token what it is alone, greedy and sampled, float and quantized.
    #[test]
    fn a_batch_decodes_each_prompt_as_it_decodes_alone() {
        let prompts: Vec<Vec<u32>> = (0..11u32)
            .map(|case| (0..1 + case % 6).map(|i| (7 * i + 5 * case) % 40).collect())
            .collect();
        for model in [batch_model(4), quantized(batch_model(4))] {
            for temperature in [0.0, 0.8] {
                let mut config = GenerationConfig {
                    max_new_tokens: 16,
                    sampling: sampling(temperature, None, None),
                    stop_tokens: Vec::new(),
                };
                let alone = |config: &GenerationConfig| -> Vec<Generation> {
                    prompts
                        .iter()
                        .map(|prompt| generate(&model, prompt, config).unwrap())
                        .collect()
                };
                let plain = alone(&config);
                // The last new token of sequence 3's first two distinct ones becomes a stop
                // token: sequence 3 stops there.
                let generated = &plain[3].tokens;
                let first_change = generated
                    .iter()
                    .position(|&token| token != generated[0])
                    .unwrap_or(0);
                config.stop_tokens = vec![generated[first_change]];
                let expected = alone(&config);
                assert_eq!(expected[3].stop, StopReason::EndOfSequence);
                assert_eq!(expected[3].tokens.len(), first_change + 1);
                assert!(
                    expected
                        .iter()
                        .any(|generation| generation.stop == StopReason::ContextFull)
                );
                assert!(
                    expected
                        .iter()
                        .any(|generation| generation.stop == StopReason::TokenLimit)
                );
                let mut streamed = vec![Vec::new(); prompts.len()];
                let mut order = Vec::new();
                let batched =
                    generate_batch_streaming(&model, &prompts, &config, |index, token| {
                        streamed[index].push(token);
                        order.push(index);
                    })
                    .unwrap();
                assert_eq!(
                    batched,
                    expected,
                    "quantized {}, temperature {temperature}",
                    model.is_quantized()
                );
                for (streamed, generation) in streamed.iter().zip(&batched) {
                    assert_eq!(streamed, &generation.tokens);
                }
                // Each prompt's first token, in the prompts' order, before any second.
                assert_eq!(
                    order[..prompts.len()],
                    (0..prompts.len()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn a_batch_refuses_a_prompt_it_cannot_continue() {
        let model = batch_model(1);
        let config = GenerationConfig {
            max_new_tokens: 4,
            sampling: SamplingConfig::default(),
            stop_tokens: Vec::new(),
        };
        let error = generate_batch(&model, &[vec![1, 2], vec![]], &config).unwrap_err();
        assert!(matches!(error, ModelError::EmptyPrompt), "{error}");
        let error = generate_batch(&model, &[vec![1, 41]], &config).unwrap_err();
        assert!(
            matches!(error, ModelError::TokenOutOfRange { token: 41, .. }),
            "{error}"
        );
    }

    #[test]
    fn invalid_settings_are_named() {
        let error = sampling(1.0, None, Some(1.5)).validate().unwrap_err();
        assert!(error.to_string().contains("top_p"), "{error}");
        let error = sampling(-1.0, None, None).validate().unwrap_err();
        assert!(error.to_string().contains("temperature"), "{error}");
    }
}
