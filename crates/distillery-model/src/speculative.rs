//! Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a small draft model that
//! shares the model's vocabulary proposes a few tokens one at a time, and the model checks them
//! all in one forward pass. Each drafted token is accepted with probability `min(1, p/q)` (`p`
//! the model's probability of it, `q` the draft's, both after the same temperature, top-k and
//! top-p as plain sampling); the first rejected one is replaced by a draw from the normalized
//! `max(0, p − q)`, and when every draft is accepted the pass's last position gives one more
//! token. The tokens then follow the model's own distribution; greedy decoding (temperature 0,
//! where both distributions put all their mass on one token) gives exactly the model's greedy
//! tokens (on the CPU backend, where a checking pass computes each of its few positions with
//! the bits a single-token step gives it). Both KV caches roll back in place to the accepted
//! length.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::generate::{Distribution, GenerationConfig, check_prompt, last_logits};
use crate::{Generation, KvCache, Llama, ModelError, SamplingConfig, StopReason};

/// How many tokens the draft proposes per pass of the model (fewer near the token limit or
/// the end of either context).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DraftLength {
    /// Always this many.
    Fixed(usize),
    /// Between 1 and this many: two more after a pass that keeps every draft, one fewer after
    /// a rejection (the schedule of transformers' assisted generation), so an unsure draft
    /// wastes fewer tokens and a sure one runs ahead.
    Adaptive(usize),
    /// Up to `most`, stopping before a position where the draft's most likely token has less
    /// than `min_probability` (its softmax at temperature 1), as llama.cpp's `n_max` and
    /// `p_min` do: the model then checks fewer positions, or takes a plain step, where the
    /// draft is unsure. The stop depends on the draft alone, so the output's distribution is
    /// still the model's.
    Confident { most: usize, min_probability: f32 },
}

impl DraftLength {
    /// The most tokens a pass drafts.
    pub fn most(self) -> usize {
        match self {
            Self::Fixed(tokens) | Self::Adaptive(tokens) | Self::Confident { most: tokens, .. } => {
                tokens
            }
        }
    }

    /// The probability below which drafting stops, when it does.
    pub fn min_probability(self) -> Option<f32> {
        match self {
            Self::Confident {
                min_probability, ..
            } => Some(min_probability),
            Self::Fixed(_) | Self::Adaptive(_) => None,
        }
    }

    /// The next pass's length after `accepted` of `drafted` tokens were kept.
    fn next(self, current: usize, drafted: usize, accepted: usize) -> usize {
        match self {
            Self::Fixed(tokens) | Self::Confident { most: tokens, .. } => tokens,
            Self::Adaptive(most) if accepted == drafted => (current + 2).min(most),
            Self::Adaptive(_) => current.saturating_sub(1).max(1),
        }
    }

    /// Whether drafting stops before a position where the draft's head gives `logits`.
    fn stops_at(self, draft: &Draft, logits: &[f32], vocab: usize) -> bool {
        match self {
            Self::Confident {
                min_probability, ..
            } => draft.top_probability(logits, vocab) < min_probability,
            Self::Fixed(_) | Self::Adaptive(_) => false,
        }
    }
}

/// What the draft did, by position in the draft: how often a token was drafted there and how
/// often it was kept (a token after a rejected one counts as drafted, not kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DraftStats {
    /// Forward passes of the model after the prompt's, each checking one draft.
    pub model_passes: usize,
    pub proposed: Vec<usize>,
    pub accepted: Vec<usize>,
    /// Seconds the draft spent proposing tokens (a forward pass of it per drafted token).
    pub draft_seconds: f64,
    /// Seconds the model spent in its checking passes (those after the prompt's).
    pub check_seconds: f64,
}

impl DraftStats {
    /// Accepted drafted tokens over proposed ones.
    pub fn acceptance_rate(&self) -> f64 {
        let proposed: usize = self.proposed.iter().sum();
        let accepted: usize = self.accepted.iter().sum();
        accepted as f64 / proposed.max(1) as f64
    }

    /// Tokens per pass of the model after each prompt's, for `generations` generations of
    /// `tokens` tokens in all (each prompt's pass gives its first): what one pass of the model
    /// buys.
    pub fn tokens_per_pass(&self, tokens: usize, generations: usize) -> f64 {
        tokens.saturating_sub(generations) as f64 / self.model_passes.max(1) as f64
    }

    /// Kept over drafted tokens at each position of a draft.
    pub fn acceptance_by_position(&self) -> Vec<f64> {
        self.proposed
            .iter()
            .zip(&self.accepted)
            .map(|(&proposed, &accepted)| accepted as f64 / proposed.max(1) as f64)
            .collect()
    }

    /// Mean seconds of the draft's forward pass for one drafted token.
    pub fn seconds_per_draft_token(&self) -> f64 {
        self.draft_seconds / self.proposed.iter().sum::<usize>().max(1) as f64
    }

    /// Mean seconds of one checking pass of the model.
    pub fn seconds_per_check(&self) -> f64 {
        self.check_seconds / self.model_passes.max(1) as f64
    }

    /// Takes in what the draft did in another generation: the counts and times of both.
    pub fn add(&mut self, other: &DraftStats) {
        let positions = self.proposed.len().max(other.proposed.len());
        self.proposed.resize(positions, 0);
        self.accepted.resize(positions, 0);
        for (position, (&proposed, &accepted)) in
            other.proposed.iter().zip(&other.accepted).enumerate()
        {
            self.proposed[position] += proposed;
            self.accepted[position] += accepted;
        }
        self.model_passes += other.model_passes;
        self.draft_seconds += other.draft_seconds;
        self.check_seconds += other.check_seconds;
    }

    fn record(&mut self, position: usize, accepted: bool) {
        if self.proposed.len() <= position {
            self.proposed.resize(position + 1, 0);
            self.accepted.resize(position + 1, 0);
        }
        self.proposed[position] += 1;
        self.accepted[position] += usize::from(accepted);
    }
}

/// A draft model and the tokens its head scores: every token, or a shortlist of those it is
/// likely to propose (FR-Spec, Zhao et al. 2025). A small draft that shares its model's
/// 49k-token embedding spends most of a drafted token in that head; a shortlist of the few
/// thousand tokens that make up nearly all text cuts it to a fraction. The model still checks
/// every token: a shortlist decides only what the draft can propose, so greedy output stays the
/// model's own and sampled output follows the model's distribution (the draft's distribution
/// is then the shortlist's, and zero elsewhere).
#[derive(Debug, Clone)]
pub struct Draft {
    model: Llama,
    /// The token of each output of the model's head, when it scores a shortlist.
    shortlist: Option<Vec<u32>>,
}

impl Draft {
    /// `model` scoring every token.
    pub fn new(model: Llama) -> Self {
        Self {
            model,
            shortlist: None,
        }
    }

    /// `model` scoring only `tokens`, each at most once.
    pub fn with_shortlist(model: Llama, tokens: Vec<u32>) -> Result<Self, ModelError> {
        let mut seen = std::collections::HashSet::new();
        if let Some(&token) = tokens.iter().find(|&&token| !seen.insert(token)) {
            return Err(ModelError::InvalidConfig {
                field: "draft shortlist",
                reason: format!("names token {token} twice"),
            });
        }
        if tokens.is_empty() {
            return Err(ModelError::InvalidConfig {
                field: "draft shortlist",
                reason: "is empty".into(),
            });
        }
        Ok(Self {
            model: model.with_head_over(&tokens)?,
            shortlist: Some(tokens),
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// How many tokens the draft can propose, of a tokenizer's `vocab`.
    pub fn proposable_tokens(&self, vocab: usize) -> usize {
        self.shortlist.as_ref().map_or(vocab, Vec::len)
    }

    /// The probability of the draft's most likely token under the softmax of its head's
    /// `logits` (over token ids below `vocab`) at temperature 1.
    fn top_probability(&self, logits: &[f32], vocab: usize) -> f32 {
        let logits = match &self.shortlist {
            None => &logits[..vocab],
            Some(_) => logits,
        };
        let most = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = logits
            .iter()
            .map(|&logit| f64::from(logit - most).exp())
            .sum();
        (1.0 / total) as f32
    }

    /// The draft's distribution from its head's `logits` at one position, over token ids below
    /// `vocab`.
    fn distribution(
        &self,
        logits: &[f32],
        vocab: usize,
        sampling: &SamplingConfig,
    ) -> Distribution {
        match &self.shortlist {
            None => Distribution::of(&logits[..vocab], sampling),
            Some(tokens) => Distribution::of(logits, sampling).renamed(tokens),
        }
    }
}

/// The `size` token ids below `vocab` most frequent in `text`, most frequent first (ties to the
/// lower id): a draft's shortlist from the text it learned.
pub fn most_frequent_tokens(text: &[u32], vocab: usize, size: usize) -> Vec<u32> {
    let mut counts = vec![0usize; vocab];
    for &token in text {
        if let Some(count) = counts.get_mut(token as usize) {
            *count += 1;
        }
    }
    let mut tokens: Vec<u32> = (0..vocab as u32).collect();
    tokens.sort_by(|a, b| counts[*b as usize].cmp(&counts[*a as usize]).then(a.cmp(b)));
    tokens.truncate(size);
    tokens
}

/// Continues `prompt` with `model`, `draft` proposing `length` tokens per pass of the model.
/// The two must share a tokenizer; their vocabularies may differ by padding rows past `vocab`,
/// the tokenizer's size, which neither samples. Returns the tokens and what the
/// draft did.
pub fn generate_with_draft(
    model: &Llama,
    draft: &Draft,
    prompt: &[u32],
    config: &GenerationConfig,
    length: DraftLength,
    vocab: usize,
    on_token: impl FnMut(u32) + Send,
) -> Result<(Generation, DraftStats), ModelError> {
    config.sampling.validate()?;
    // A checking pass covers the drafts and the token before them; up to FEW_ROWS positions
    // it computes each one as a single-token step does.
    let most = distillery_kernels::FEW_ROWS - 1;
    if !(1..=most).contains(&length.most()) {
        return Err(ModelError::InvalidSampling {
            field: "draft_tokens",
            reason: format!("must be between 1 and {most}, got {}", length.most()),
        });
    }
    if let DraftLength::Confident {
        min_probability, ..
    } = length
        && !(0.0..=1.0).contains(&min_probability)
    {
        return Err(ModelError::InvalidSampling {
            field: "draft_p_min",
            reason: format!("must be in [0, 1], got {min_probability}"),
        });
    }
    for (which, checked) in [("model", model), ("draft", draft.model())] {
        let rows = checked.config().vocab_size;
        if rows < vocab {
            return Err(ModelError::InvalidConfig {
                field: "vocab_size",
                reason: format!("of the {which} is {rows}, fewer than the tokenizer's {vocab}"),
            });
        }
    }
    let padding = draft
        .shortlist
        .iter()
        .flatten()
        .find(|&&token| token as usize >= vocab);
    if let Some(&token) = padding {
        return Err(ModelError::TokenOutOfRange { token, vocab });
    }
    check_prompt(model, prompt)?;
    check_prompt(draft.model(), prompt)?;
    // As in plain generation: on a rayon worker every product's split is a fork.
    rayon::scope(|_| decode(model, draft, prompt, config, length, vocab, on_token))
}

fn decode(
    model: &Llama,
    draft: &Draft,
    prompt: &[u32],
    config: &GenerationConfig,
    length: DraftLength,
    vocab: usize,
    mut on_token: impl FnMut(u32),
) -> Result<(Generation, DraftStats), ModelError> {
    let sampling = &config.sampling;
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let model_context = model.config().max_position_embeddings;
    let draft_context = draft.model().config().max_position_embeddings;
    // A pass's rejected drafts are written past the kept positions and then overwritten, never
    // past the last position the generation can reach.
    let reserve = |context: usize| (prompt.len() + config.max_new_tokens).min(context);
    let mut model_cache = KvCache::with_capacity(model.layers.len(), reserve(model_context));
    let mut draft_cache =
        KvCache::with_capacity(draft.model().layers.len(), reserve(draft_context));
    let mut stats = DraftStats::default();
    let finished = |tokens, stop| Ok((Generation { tokens, stop }, DraftStats::default()));
    if config.max_new_tokens == 0 {
        return finished(Vec::new(), StopReason::TokenLimit);
    }
    // The prompt's pass alone, as plain generation makes it, so that every later pass of the
    // model is a few rows long and computes as its single-token steps do.
    let first = last_logits(model, prompt, &mut model_cache, 1);
    let first = Distribution::of(&first[..vocab], sampling).draw(&mut rng);
    on_token(first);
    let mut tokens = vec![first];
    if config.stop_tokens.contains(&first) {
        return finished(tokens, StopReason::EndOfSequence);
    }
    // Tokens chosen but not yet fed to each model.
    let mut model_pending = vec![first];
    let mut draft_pending = [prompt, &[first]].concat();
    let mut draft_length = length.most();
    let stop = 'decoding: loop {
        let remaining = config.max_new_tokens - tokens.len();
        if remaining == 0 {
            break StopReason::TokenLimit;
        }
        let model_start = model_cache.len() + model_pending.len();
        if model_start > model_context {
            break StopReason::ContextFull;
        }
        // Drafting k tokens feeds the draft its pending tokens and k - 1 drafts; the model
        // checks them after its own pending ones. Near either context's end, or the token
        // limit, the draft proposes fewer (none: a plain step of the model).
        let draft_room =
            (draft_context + 1).saturating_sub(draft_cache.len() + draft_pending.len());
        let planned = draft_length
            .min(remaining - 1)
            .min(model_context - model_start)
            .min(draft_room);

        let mut proposals = Vec::with_capacity(planned);
        let mut draft_distributions = Vec::with_capacity(planned);
        let draft_start = draft_cache.len();
        let mut input = std::mem::take(&mut draft_pending);
        let fed_before = input.len();
        let drafting = std::time::Instant::now();
        for index in 0..planned {
            let logits = last_logits(draft.model(), &input, &mut draft_cache, 1);
            if length.stops_at(draft, &logits, vocab) {
                break;
            }
            let distribution = draft.distribution(&logits, vocab, sampling);
            let token = distribution.draw(&mut rng);
            proposals.push(token);
            draft_distributions.push(distribution);
            if index + 1 < planned {
                input = vec![token];
            }
        }
        stats.draft_seconds += drafting.elapsed().as_secs_f64();
        let drafted = proposals.len();
        if planned == 0 {
            draft_pending = input;
        }

        let model_before = model_cache.len();
        let mut checked = std::mem::take(&mut model_pending);
        let model_fed = checked.len();
        checked.extend(&proposals);
        let checking = std::time::Instant::now();
        let logits = last_logits(model, &checked, &mut model_cache, drafted + 1);
        stats.check_seconds += checking.elapsed().as_secs_f64();
        let rows: Vec<&[f32]> = logits
            .chunks_exact(model.config().vocab_size)
            .map(|row| &row[..vocab])
            .collect();
        stats.model_passes += 1;

        let mut emitted = Vec::with_capacity(drafted + 1);
        let mut accepted = 0;
        for ((&token, guess), &logits) in proposals.iter().zip(&draft_distributions).zip(&rows) {
            let target = Distribution::of(logits, sampling);
            let (p, q) = (target.probability(token), guess.probability(token));
            if rng.random::<f64>() * q < p {
                emitted.push(token);
                accepted += 1;
            } else {
                emitted.push(target.residual(guess).draw(&mut rng));
                break;
            }
        }
        if accepted == drafted {
            emitted.push(Distribution::of(rows[drafted], sampling).draw(&mut rng));
        }
        for position in 0..drafted {
            stats.record(position, position < accepted);
        }
        if drafted > 0 {
            draft_length = length.next(draft_length, drafted, accepted);
        }

        // The model keeps its pending tokens and the accepted drafts; the draft keeps what it
        // was fed of those.
        model_cache.truncate(model_before + model_fed + accepted);
        model_pending = vec![*emitted.last().expect("a pass emits a token")];
        if planned > 0 {
            // The draft was fed back every draft but the last of a full plan; a draft that
            // stopped early was fed its last one too, before stopping.
            let fed_drafts = drafted.min(planned - 1);
            let kept = accepted.min(fed_drafts);
            draft_cache.truncate(draft_start + fed_before + kept);
            draft_pending = emitted[kept..].to_vec();
        } else {
            draft_pending.extend(&emitted);
        }
        for token in emitted {
            tokens.push(token);
            on_token(token);
            if config.stop_tokens.contains(&token) {
                break 'decoding StopReason::EndOfSequence;
            }
        }
    };
    Ok((Generation { tokens, stop }, stats))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::{LlamaConfig, SamplingConfig, generate};

    /// Two generations' stats add position by position, the shorter draft's missing positions
    /// counting nothing, and the passes and times add up.
    #[test]
    fn stats_of_generations_add_by_draft_position() {
        let mut total = DraftStats {
            model_passes: 2,
            proposed: vec![3],
            accepted: vec![2],
            draft_seconds: 0.5,
            check_seconds: 1.0,
        };
        total.add(&DraftStats {
            model_passes: 3,
            proposed: vec![2, 1],
            accepted: vec![1, 1],
            draft_seconds: 0.25,
            check_seconds: 2.0,
        });
        assert_eq!(total.proposed, [5, 1]);
        assert_eq!(total.accepted, [3, 1]);
        assert_eq!(total.model_passes, 5);
        assert_eq!((total.draft_seconds, total.check_seconds), (0.75, 3.0));
        assert_eq!(total.acceptance_rate(), 4.0 / 6.0);
        // 12 tokens of two generations: 10 after their prompts' passes, over 5 passes.
        assert_eq!(total.tokens_per_pass(12, 2), 2.0);
        assert_eq!(DraftStats::default().tokens_per_pass(0, 3), 0.0);
    }

    fn config(vocab_size: usize, layers: usize, hidden_size: usize, context: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: 2 * hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: context,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }

    fn settings(max_new_tokens: usize, temperature: f32, seed: u64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens,
            sampling: SamplingConfig {
                temperature,
                seed,
                ..SamplingConfig::default()
            },
            stop_tokens: Vec::new(),
        }
    }

    #[test]
    fn greedy_drafts_give_the_models_own_greedy_tokens() {
        let device = Device::flex();
        let model = Llama::new(&config(40, 2, 32, 24), 0.0, 5, &device).unwrap();
        let other = Llama::new(&config(40, 1, 16, 24), 0.0, 9, &device).unwrap();
        // A shortlist of a quarter of the tokens: most of the model's are not among them.
        let shortlist = Draft::with_shortlist(other.clone(), (0..10).map(|i| 4 * i + 1).collect());
        let drafts = [
            ("itself", Draft::new(model.clone())),
            ("another model", Draft::new(other.clone())),
            ("another model's shortlist", shortlist.unwrap()),
        ];
        for (name, draft) in &drafts {
            for case in 0..6u32 {
                let prompt: Vec<u32> = (0..1 + case % 5).map(|i| (7 * i + 3 * case) % 40).collect();
                // The longest runs reach the end of the context.
                let new_tokens = if case % 2 == 0 { 12 } else { 30 };
                let plain = generate(&model, &prompt, &settings(new_tokens, 0.0, 0)).unwrap();
                let confident = |min_probability| DraftLength::Confident {
                    most: 4,
                    min_probability,
                };
                let lengths = [1, 2, 3, 5].map(DraftLength::Fixed).into_iter().chain([
                    DraftLength::Adaptive(7),
                    confident(0.03),
                    confident(0.1),
                ]);
                for length in lengths {
                    let (drafted, stats) = generate_with_draft(
                        &model,
                        draft,
                        &prompt,
                        &settings(new_tokens, 0.0, 0),
                        length,
                        40,
                        |_| {},
                    )
                    .unwrap();
                    assert_eq!(
                        drafted, plain,
                        "draft {name}, prompt {prompt:?}, {length:?} drafted tokens"
                    );
                    // A confident draft may be too unsure to draft at all.
                    let proposed: usize = stats.proposed.iter().sum();
                    if *name == "itself" && proposed > 0 {
                        assert_eq!(stats.acceptance_rate(), 1.0);
                        assert!(stats.tokens_per_pass(drafted.tokens.len(), 1) > 1.0);
                    }
                }
            }
        }
    }

    /// 40 greedy tokens of a model with a 40-token vocabulary after a three-token prompt.
    fn greedy_after_a_prompt(
        model: &Llama,
        draft: &Draft,
        length: DraftLength,
    ) -> (Generation, DraftStats) {
        let settings = settings(40, 0.0, 0);
        generate_with_draft(model, draft, &[3, 1, 4], &settings, length, 40, |_| {}).unwrap()
    }

    #[test]
    fn an_adaptive_draft_shrinks_after_rejections_and_grows_after_acceptance() {
        let device = Device::flex();
        let model = Llama::new(&config(40, 2, 32, 64), 0.0, 5, &device).unwrap();
        let other = Llama::new(&config(40, 1, 16, 64), 0.0, 9, &device).unwrap();
        let run = |draft: &Llama, length| {
            greedy_after_a_prompt(&model, &Draft::new(draft.clone()), length).1
        };
        // An unrelated draft is mostly rejected: adaptive passes draft fewer tokens.
        let (fixed, adaptive) = (
            run(&other, DraftLength::Fixed(5)),
            run(&other, DraftLength::Adaptive(5)),
        );
        let drafted = |stats: &DraftStats| stats.proposed.iter().sum::<usize>();
        assert!(
            drafted(&adaptive) * fixed.model_passes < drafted(&fixed) * adaptive.model_passes,
            "fixed {fixed:?}, adaptive {adaptive:?}"
        );
        // The model as its own draft keeps every token: the length stays at its most.
        let own = run(&model, DraftLength::Adaptive(5));
        assert_eq!(own.proposed.len(), 5);
        assert_eq!(own.acceptance_rate(), 1.0);
    }

    /// A confident draft drafts what a fixed one does while it is sure enough, nothing where
    /// it never is, and in between stops where it is unsure: fewer drafts, and among them a
    /// larger share kept.
    #[test]
    fn a_confident_draft_stops_where_it_is_unsure() {
        let device = Device::flex();
        let model = Llama::new(&config(40, 2, 32, 64), 0.0, 5, &device).unwrap();
        let draft = Draft::new(Llama::new(&config(40, 1, 16, 64), 0.0, 9, &device).unwrap());
        let run = |length| greedy_after_a_prompt(&model, &draft, length);
        let confident = |min_probability| {
            run(DraftLength::Confident {
                most: 3,
                min_probability,
            })
        };
        let (plain, fixed) = run(DraftLength::Fixed(3));
        let (always, always_stats) = confident(0.0);
        assert_eq!((&always, &always_stats.proposed), (&plain, &fixed.proposed));
        let (never, never_stats) = confident(1.0);
        assert_eq!(never, plain);
        assert_eq!(never_stats.proposed.iter().sum::<usize>(), 0);
        assert_eq!(never_stats.model_passes, 39, "one plain step a token");
        // A fresh draft's probabilities over 40 tokens lie near 1/40: a threshold among them.
        let (between, between_stats) = confident(0.03);
        assert_eq!(between, plain);
        let proposed = |stats: &DraftStats| stats.proposed.iter().sum::<usize>();
        assert!(
            (1..proposed(&fixed)).contains(&proposed(&between_stats)),
            "{between_stats:?} against {fixed:?}"
        );
    }

    #[test]
    fn the_drafts_and_the_checks_time_is_what_the_generation_spent_on_them() {
        let device = Device::flex();
        let model = Llama::new(&config(40, 2, 32, 64), 0.0, 5, &device).unwrap();
        let draft = Llama::new(&config(40, 1, 16, 64), 0.0, 9, &device).unwrap();
        let started = std::time::Instant::now();
        let (generation, stats) = generate_with_draft(
            &model,
            &Draft::new(draft),
            &[3, 1, 4],
            &settings(30, 0.0, 0),
            DraftLength::Fixed(3),
            40,
            |_| {},
        )
        .unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(generation.tokens.len(), 30);
        assert!(
            stats.draft_seconds > 0.0 && stats.check_seconds > 0.0,
            "{stats:?}"
        );
        assert!(
            stats.draft_seconds + stats.check_seconds < elapsed,
            "{stats:?}, {elapsed} s"
        );
        let drafted: usize = stats.proposed.iter().sum();
        assert_eq!(
            stats.seconds_per_draft_token(),
            stats.draft_seconds / drafted as f64
        );
        assert_eq!(
            stats.seconds_per_check(),
            stats.check_seconds / stats.model_passes as f64
        );
    }

    /// Each position's token frequencies over `runs` seeded generations of three tokens (the
    /// first comes from the prompt's pass, the others from drafts).
    fn frequencies(runs: u64, vocab: usize, generate: impl Fn(u64) -> Vec<u32>) -> Vec<Vec<f64>> {
        let mut counts = vec![vec![0.0; vocab]; 3];
        for seed in 0..runs {
            for (position, token) in generate(seed).into_iter().enumerate() {
                counts[position][token as usize] += 1.0 / runs as f64;
            }
        }
        counts
    }

    fn total_variation(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
    }

    /// Freshly initialized models' logits are nearly flat; a low temperature makes their
    /// distributions peaked, and different.
    const TEMPERATURE: f32 = 0.05;

    #[test]
    fn sampled_drafts_follow_the_models_distribution() {
        let device = Device::flex();
        let vocab = 8;
        let model = Llama::new(&config(vocab, 2, 32, 16), 0.0, 3, &device).unwrap();
        let draft = Llama::new(&config(vocab, 1, 16, 16), 0.0, 11, &device).unwrap();
        let prompt = [1, 5, 2];
        let runs = 6000;
        let plain = frequencies(runs, vocab, |seed| {
            generate(&model, &prompt, &settings(3, TEMPERATURE, seed))
                .unwrap()
                .tokens
        });
        let drafts_own = frequencies(runs, vocab, |seed| {
            generate(&draft, &prompt, &settings(3, TEMPERATURE, seed))
                .unwrap()
                .tokens
        });
        let speculative = |draft: &Draft, offset: u64| {
            frequencies(runs, vocab, |seed| {
                let settings = settings(3, TEMPERATURE, seed + offset);
                generate_with_draft(
                    &model,
                    draft,
                    &prompt,
                    &settings,
                    DraftLength::Fixed(2),
                    vocab,
                    |_| {},
                )
                .unwrap()
                .0
                .tokens
            })
        };
        // The shortlist leaves out the model's most likely first token, which the model then
        // gives only through rejections.
        let most_likely = (0..vocab)
            .max_by(|&a, &b| plain[0][a].total_cmp(&plain[0][b]))
            .unwrap() as u32;
        let shortlist: Vec<u32> = (0..vocab as u32)
            .filter(|&token| token != most_likely)
            .take(5)
            .collect();
        let drafts = [
            ("whole", Draft::new(draft.clone()), runs),
            (
                "shortlist",
                Draft::with_shortlist(draft.clone(), shortlist).unwrap(),
                2 * runs,
            ),
        ];
        for (name, draft, offset) in &drafts {
            let speculative = speculative(draft, *offset);
            for position in 0..3 {
                // Two samples of 6,000 from one distribution over 8 tokens differ by about
                // 0.02; drawing a rejected token's replacement from the model's distribution
                // instead of the residual one puts the second position 0.08 away.
                let apart = total_variation(&plain[position], &speculative[position]);
                assert!(apart < 0.045, "{name} draft, position {position}: {apart}");
            }
        }
        // The test can tell: the draft's own distribution is far from the model's.
        let draft_apart = total_variation(&plain[0], &drafts_own[0]);
        assert!(
            draft_apart > 0.15,
            "the draft is too close to tell: {draft_apart}"
        );
    }

    #[test]
    fn unusable_settings_are_errors() {
        let device = Device::flex();
        let model = Llama::new(&config(40, 1, 16, 24), 0.0, 1, &device).unwrap();
        let narrow = Llama::new(&config(30, 1, 16, 24), 0.0, 1, &device).unwrap();
        let run = |draft: &Draft, draft_tokens| {
            let draft_tokens = DraftLength::Fixed(draft_tokens);
            generate_with_draft(
                &model,
                draft,
                &[1, 2],
                &settings(4, 0.0, 0),
                draft_tokens,
                40,
                |_| {},
            )
            .map(|_| ())
        };
        let itself = Draft::new(model.clone());
        let unsure = generate_with_draft(
            &model,
            &itself,
            &[1, 2],
            &settings(4, 0.0, 0),
            DraftLength::Confident {
                most: 3,
                min_probability: 1.5,
            },
            40,
            |_| {},
        );
        assert!(matches!(
            unsure,
            Err(ModelError::InvalidSampling {
                field: "draft_p_min",
                ..
            })
        ));
        for draft_tokens in [0, 8] {
            assert!(matches!(
                run(&itself, draft_tokens),
                Err(ModelError::InvalidSampling {
                    field: "draft_tokens",
                    ..
                })
            ));
        }
        assert!(matches!(
            run(&Draft::new(narrow), 2),
            Err(ModelError::InvalidConfig {
                field: "vocab_size",
                ..
            })
        ));
        // The draft's 50 rows hold 10 of padding past the tokenizer's 40 tokens.
        let padded = Llama::new(&config(50, 1, 16, 24), 0.0, 1, &device).unwrap();
        let shortlist = Draft::with_shortlist(padded, vec![3, 45]).unwrap();
        assert!(matches!(
            run(&shortlist, 2),
            Err(ModelError::TokenOutOfRange {
                token: 45,
                vocab: 40
            })
        ));
        for (tokens, reason) in [(vec![3, 7, 3], "twice"), (vec![], "empty")] {
            let error = Draft::with_shortlist(model.clone(), tokens).unwrap_err();
            assert!(error.to_string().contains(reason), "{error}");
        }
        assert!(matches!(
            Draft::with_shortlist(model.clone(), vec![40]),
            Err(ModelError::TokenOutOfRange { token: 40, .. })
        ));
    }

    #[test]
    fn the_most_frequent_tokens_come_first_ties_to_the_lower_id() {
        // Counts: 5 three times, 2 and 7 twice, 0 once; 9 is past the vocabulary.
        let text = [7, 5, 2, 9, 5, 0, 7, 2, 5];
        assert_eq!(most_frequent_tokens(&text, 8, 3), [5, 2, 7]);
        // Tokens the text never uses follow, by id.
        assert_eq!(most_frequent_tokens(&text, 8, 6), [5, 2, 7, 0, 1, 3]);
    }
}
