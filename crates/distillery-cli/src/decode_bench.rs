//! `distillery bench generate`: how fast each model decodes, one token at a time with its KV
//! cache, as a deployed model runs.

use std::time::Instant;

use distillery_formats::load::{self, LoadedModel, ModelKind};
use distillery_model::{
    DraftLength, DraftStats, Generation, GenerationConfig, Llama, SamplingConfig, StopReason,
    generate_batch_streaming, generate_streaming, generate_with_draft,
};

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeReport {
    pub model: String,
    /// Seconds from opening the file to a model ready to compute.
    pub load_seconds: f64,
    /// The family of kernels the quantized products ran, by its `KernelFamily::name`.
    pub kernels: &'static str,
    pub bits_per_weight: f64,
    /// Bytes the weights take in memory as the model computes with them.
    pub weight_bytes: usize,
    pub prompt_tokens: usize,
    /// Median time to read the prompt and produce the first token.
    pub prefill_ms: f64,
    pub new_tokens: usize,
    /// Tokens per second after the first one (median over the runs).
    pub decode_tokens_per_sec: f64,
    /// The decode speed over that of the float model this one was quantized from, when that
    /// model was measured alongside (a float model's own is 1).
    pub decode_vs_float: Option<f64>,
    pub runs: usize,
    /// The process's resident memory after the runs, how much of it lay in mappings that asked
    /// for 2 MiB pages and how much the kernel gave them (Linux only).
    pub resident: Option<ResidentMemory>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ResidentMemory {
    pub bytes: u64,
    /// [`distillery_formats::huge_pages::advised_resident_bytes`] of the whole process.
    pub advised_for_huge_pages: u64,
    pub in_huge_pages: u64,
}

impl ResidentMemory {
    /// This process's, from `/proc/self/smaps`; `None` where the kernel does not say.
    pub fn of_this_process() -> Option<Self> {
        Some(Self::from_smaps(
            &std::fs::read_to_string("/proc/self/smaps").ok()?,
        ))
    }

    fn from_smaps(smaps: &str) -> Self {
        let mappings = distillery_formats::huge_pages::mappings(smaps);
        Self {
            bytes: mappings.iter().map(|mapping| mapping.resident_bytes).sum(),
            advised_for_huge_pages: distillery_formats::huge_pages::advised_resident_bytes(
                &mappings,
            ),
            in_huge_pages: mappings.iter().map(|mapping| mapping.huge_page_bytes).sum(),
        }
    }
}

/// Bytes of `model`'s weights: f32 parameters plus the quantized matrices as they sit in
/// memory.
pub fn weight_bytes(model: &Llama) -> usize {
    use burn::module::Module;
    let quantized = model
        .linears()
        .into_iter()
        .filter_map(|(_, linear)| linear.quantized_weight())
        .chain(model.quantized_embedding())
        .map(|matrix| matrix.memory_bytes())
        .sum::<usize>();
    4 * model.num_params() + quantized
}

/// Greedy decoding of exactly `new_tokens` tokens: what every measurement here times (a chat
/// answer's measurement adds the stop tokens that end its turn).
pub fn greedy(new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: new_tokens,
        sampling: SamplingConfig::default(),
        stop_tokens: Vec::new(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Greedy generation of `new_tokens` after `prompt` with each model, `runs` rounds after one
/// warm-up run each. Each run times its own first token (the prefill) and the rest (the decode
/// rate), so the two never come from different runs. Every round runs every model in turn, so
/// a busy moment of a shared machine slows them alike instead of skewing one model's figures.
/// `load_seconds[i]` is how long model `i` took from its file to ready, reported beside it.
pub fn bench_decode(
    models: &[LoadedModel],
    load_seconds: &[f64],
    prompt: &[u32],
    new_tokens: usize,
    runs: usize,
) -> anyhow::Result<Vec<DecodeReport>> {
    for loaded in models {
        let context = loaded.model.config().max_position_embeddings;
        anyhow::ensure!(
            new_tokens >= 2 && prompt.len() + new_tokens <= context,
            "{} prompt tokens and {new_tokens} new tokens must fit the context of {} ({context}) \
             (and at least 2 new tokens are timed)",
            prompt.len(),
            loaded.describe()
        );
    }
    let config = greedy(new_tokens);
    // Seconds to the first token and from it to the last.
    let run = |model: &Llama| -> anyhow::Result<(f64, f64)> {
        let started = Instant::now();
        let mut first_token = None;
        let generation = generate_streaming(model, prompt, &config, |_| {
            first_token.get_or_insert_with(Instant::now);
        })?;
        let finished = Instant::now();
        anyhow::ensure!(
            generation.tokens.len() == new_tokens,
            "generation stopped early"
        );
        let first_token = first_token.unwrap_or(finished);
        Ok((
            (first_token - started).as_secs_f64(),
            (finished - first_token).as_secs_f64(),
        ))
    };
    for loaded in models {
        run(&loaded.model)?;
    }
    let mut prefill = vec![Vec::new(); models.len()];
    let mut decode = vec![Vec::new(); models.len()];
    for _ in 0..runs.max(1) {
        for (index, loaded) in models.iter().enumerate() {
            let (first, rest) = run(&loaded.model)?;
            prefill[index].push(first * 1e3);
            decode[index].push((new_tokens - 1) as f64 / rest);
        }
    }
    let speeds: Vec<f64> = decode.into_iter().map(median).collect();
    let resident = ResidentMemory::of_this_process();
    Ok(models
        .iter()
        .enumerate()
        .zip(load_seconds)
        .zip(prefill)
        .map(|(((index, loaded), &load_seconds), prefill)| DecodeReport {
            model: loaded.describe(),
            load_seconds,
            kernels: distillery_quant::cpu::kernel_family().name(),
            bits_per_weight: loaded.bits_per_weight,
            weight_bytes: weight_bytes(&loaded.model),
            prompt_tokens: prompt.len(),
            prefill_ms: median(prefill),
            new_tokens,
            decode_tokens_per_sec: speeds[index],
            decode_vs_float: float_source(models, index).map(|float| speeds[index] / speeds[float]),
            runs: runs.max(1),
            resident,
        })
        .collect())
}

/// The index of the float model `models[index]` is, or was quantized from, among `models`.
fn float_source(models: &[LoadedModel], index: usize) -> Option<usize> {
    let loaded = &models[index];
    if loaded.is_float() {
        return Some(index);
    }
    let ModelKind::Quantized { record, .. } = &loaded.kind else {
        return None;
    };
    let source = std::fs::canonicalize(record["source_checkpoint"].as_str()?).ok()?;
    models.iter().position(|model| {
        model.is_float() && std::fs::canonicalize(&model.path).is_ok_and(|path| path == source)
    })
}

pub fn markdown_table(reports: &[DecodeReport]) -> String {
    let mut table = String::from(
        "| model | load | bits/weight | weights in memory | prefill | decode | decode vs its float \
         model |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for report in reports {
        let versus_float = report
            .decode_vs_float
            .map_or("–".to_string(), |ratio| format!("{ratio:.2}x"));
        table.push_str(&format!(
            "| {} | {:.2} s | {:.2} | {:.2} MB | {:.1} ms ({} tokens) | {:.0} tokens/s | {} |\n",
            report.model,
            report.load_seconds,
            report.bits_per_weight,
            report.weight_bytes as f64 / 1e6,
            report.prefill_ms,
            report.prompt_tokens,
            report.decode_tokens_per_sec,
            versus_float,
        ));
    }
    table.push_str(&format!(
        "\nkernels: {} (this CPU's best: {}; DISTILLERY_KERNELS={} chooses a lower family)\n",
        distillery_quant::cpu::kernel_family().name(),
        distillery_quant::cpu::KernelFamily::detected().name(),
        distillery_quant::cpu::KernelFamily::names("|")
    ));
    if let Some(resident) = reports.last().and_then(|report| report.resident) {
        table.push_str(&format!(
            "memory: {:.0} of {:.0} MB resident in 2 MiB pages, {:.0} MB asked for them \
             ({}=0 keeps 4 KiB pages)\n",
            resident.in_huge_pages as f64 / 1e6,
            resident.bytes as f64 / 1e6,
            resident.advised_for_huge_pages as f64 / 1e6,
            distillery_formats::huge_pages::HUGE_PAGES_VARIABLE
        ));
    }
    table
}

/// One model decoding alone and with a draft (speculative decoding), greedy, in the same
/// rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DraftReport {
    pub model: String,
    pub draft: String,
    /// Tokens drafted per pass (the most, when adaptive).
    pub draft_tokens: usize,
    pub adaptive: bool,
    /// Drafting stops before a position the draft is less sure of than this.
    pub p_min: Option<f32>,
    /// Prompts decoded one after another, and their tokens and new tokens in all.
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// New tokens over the whole generations' time, prompts included (median over the runs),
    /// for the model alone and with the draft.
    pub alone_tokens_per_sec: f64,
    pub drafted_tokens_per_sec: f64,
    pub speedup: f64,
    pub acceptance_rate: f64,
    /// Accepted over proposed, at each position of a draft.
    pub acceptance_by_position: Vec<f64>,
    /// New tokens per pass of the model after each prompt's.
    pub tokens_per_pass: f64,
    /// Milliseconds of the draft's forward pass for one drafted token, of one checking pass
    /// of the model (its pending token and the drafts), and of one token of the model alone
    /// (its whole generation's time over its new tokens): a pass costs the drafts' and the
    /// check's time, against the tokens per pass times the model's own.
    pub draft_token_ms: f64,
    pub check_ms: f64,
    pub alone_token_ms: f64,
    pub runs: usize,
}

/// Greedy generation (`config`: [`greedy`], with or without stop tokens) after each of
/// `prompts` by `model` alone and with `draft` proposing `length` tokens per pass, the prompts
/// one after another, `runs` rounds after a warm-up of each, the two alternating. The drafted
/// output must equal the model's own, token for token; rates and acceptance are over all the
/// prompts.
pub fn bench_draft(
    model: &LoadedModel,
    draft: &crate::models::LoadedDraft,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    runs: usize,
    length: DraftLength,
    vocab: usize,
) -> anyhow::Result<DraftReport> {
    let alone = || -> anyhow::Result<(f64, Vec<Generation>)> {
        let started = Instant::now();
        let outputs = prompts
            .iter()
            .map(|prompt| Ok(generate_streaming(&model.model, prompt, config, |_| {})?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((started.elapsed().as_secs_f64(), outputs))
    };
    let drafted = || -> anyhow::Result<(f64, Vec<Vec<u32>>, DraftStats)> {
        let started = Instant::now();
        let mut all_stats = DraftStats::default();
        let mut outputs = Vec::new();
        for prompt in prompts {
            let (generation, stats) = generate_with_draft(
                &model.model,
                &draft.draft,
                prompt,
                config,
                length,
                vocab,
                |_| {},
            )?;
            all_stats.add(&stats);
            outputs.push(generation.tokens);
        }
        Ok((started.elapsed().as_secs_f64(), outputs, all_stats))
    };
    let (_, generations) = alone()?;
    for (prompt, generation) in prompts.iter().zip(&generations) {
        anyhow::ensure!(
            generation.stop != StopReason::ContextFull,
            "generation stopped early: {} prompt tokens and {} new tokens must fit {}'s context",
            prompt.len(),
            config.max_new_tokens,
            model.describe()
        );
    }
    let reference: Vec<Vec<u32>> = generations
        .into_iter()
        .map(|generation| generation.tokens)
        .collect();
    let new_tokens: usize = reference.iter().map(Vec::len).sum();
    drafted()?;
    let (mut alone_speeds, mut drafted_speeds) = (Vec::new(), Vec::new());
    let mut last_stats = DraftStats::default();
    for _ in 0..runs.max(1) {
        let (seconds, _) = alone()?;
        alone_speeds.push(new_tokens as f64 / seconds);
        let (seconds, tokens, stats) = drafted()?;
        anyhow::ensure!(
            tokens == reference,
            "with the draft {} the model's greedy output changed (on the CPU backend a checking \
             pass computes each position as a single step does; other backends' batched \
             products may round differently)",
            draft.description
        );
        drafted_speeds.push(new_tokens as f64 / seconds);
        last_stats = stats;
    }
    let (alone, with_draft) = (median(alone_speeds), median(drafted_speeds));
    Ok(DraftReport {
        model: model.describe(),
        draft: draft.description.clone(),
        draft_tokens: length.most(),
        adaptive: matches!(length, DraftLength::Adaptive(_)),
        p_min: length.min_probability(),
        prompts: prompts.len(),
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        new_tokens,
        alone_tokens_per_sec: alone,
        drafted_tokens_per_sec: with_draft,
        speedup: with_draft / alone,
        acceptance_rate: last_stats.acceptance_rate(),
        acceptance_by_position: last_stats.acceptance_by_position(),
        tokens_per_pass: last_stats.tokens_per_pass(new_tokens, prompts.len()),
        draft_token_ms: 1e3 * last_stats.seconds_per_draft_token(),
        check_ms: 1e3 * last_stats.seconds_per_check(),
        alone_token_ms: 1e3 / alone,
        runs: runs.max(1),
    })
}

pub fn draft_table(reports: &[DraftReport]) -> String {
    let mut table = String::from(
        "| model | draft | drafted tokens (most) | alone | with the draft | speed-up | accepted | by \
         position | tokens per pass | draft token | checking pass | model token |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for report in reports {
        let by_position: Vec<String> = report
            .acceptance_by_position
            .iter()
            .map(|rate| format!("{:.0}%", 100.0 * rate))
            .collect();
        table.push_str(&format!(
            "| {} | {} | {}{} | {:.0} tokens/s | {:.0} tokens/s | {:.2}x | {:.1}% | {} | {:.2} | \
             {:.2} ms | {:.2} ms | {:.2} ms |\n",
            report.model,
            report.draft,
            report.draft_tokens,
            match (report.adaptive, report.p_min) {
                (true, _) => ", adaptive".to_string(),
                (false, Some(p_min)) => format!(", p-min {p_min}"),
                (false, None) => String::new(),
            },
            report.alone_tokens_per_sec,
            report.drafted_tokens_per_sec,
            report.speedup,
            100.0 * report.acceptance_rate,
            by_position.join(", "),
            report.tokens_per_pass,
            report.draft_token_ms,
            report.check_ms,
            report.alone_token_ms,
        ));
    }
    if let Some(first) = reports.first() {
        table.push_str(&format!(
            "\ngreedy, {} new tokens after {} prompt{} of {} tokens in all, one after another; \
             tokens/s over the whole generations, prompts included; the drafted output equals the \
             model's own in every run; the last three columns are the last run's mean times of a \
             drafted token, of a checking pass and of a token of the model alone\n",
            first.new_tokens,
            first.prompts,
            if first.prompts == 1 { "" } else { "s" },
            first.prompt_tokens,
        ));
    }
    table
}

/// One model decoding several prompts one after another and as one batch, greedy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchReport {
    pub model: String,
    pub batch: usize,
    /// The prompts' lengths, different so the batch holds sequences at different positions.
    pub prompt_tokens: Vec<usize>,
    /// New tokens per prompt.
    pub new_tokens: usize,
    /// New tokens of all prompts over the whole time, prompts included (median over the
    /// runs), decoded one prompt after another and together.
    pub alone_tokens_per_sec: f64,
    pub batched_tokens_per_sec: f64,
    /// Each sequence's own rate in the batch: the batch's over the batch size.
    pub per_sequence_tokens_per_sec: f64,
    pub speedup: f64,
    /// The same without the prompts' reading, as llama.cpp's `llama-bench` times generation:
    /// the tokens after each prompt's first over the time after it, one prompt after another
    /// (each prompt's reading subtracted) and in the batch (from the moment every prompt has
    /// been read and has its first token).
    pub alone_decode_tokens_per_sec: f64,
    pub batched_decode_tokens_per_sec: f64,
    pub decode_speedup: f64,
    pub runs: usize,
}

/// `batch` consecutive pieces of `validation`, each a token shorter than the one before (down
/// to half of `prompt_tokens`, then again from the top), so a batch's sequences sit at
/// different positions.
pub fn batch_prompts(
    validation: &[u32],
    batch: usize,
    prompt_tokens: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(
        batch >= 1 && prompt_tokens >= 1 && batch * prompt_tokens <= validation.len(),
        "a batch of {batch} prompts of up to {prompt_tokens} tokens must fit the validation \
         split's {} tokens",
        validation.len()
    );
    Ok((0..batch)
        .map(|index| {
            let length = prompt_tokens - index % prompt_tokens.div_ceil(2);
            let start = index * prompt_tokens;
            validation[start..start + length].to_vec()
        })
        .collect())
}

/// A batch's decoding is timed after each prompt's first token, which comes with its reading:
/// it takes a second one.
pub fn check_batch_tokens(new_tokens: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        new_tokens >= 2,
        "--new-tokens must be at least 2 to time a batch's decoding (each prompt's first token \
         comes with its reading)"
    );
    Ok(())
}

/// Greedy generation of `new_tokens` after each of `prompts` by `model`, one prompt after
/// another and as one batch, `runs` rounds after a warm-up of each, the two alternating. Each
/// batched output must equal the prompt's own, token for token.
pub fn bench_batch(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    runs: usize,
) -> anyhow::Result<BatchReport> {
    check_batch_tokens(new_tokens)?;
    let config = greedy(new_tokens);
    // Each run gives its whole time, the time spent reading the prompts (up to each prompt's
    // first token), and the outputs.
    let alone = || -> anyhow::Result<(f64, f64, Vec<Vec<u32>>)> {
        let started = Instant::now();
        let mut reading = 0.0;
        let mut outputs = Vec::new();
        for prompt in prompts {
            let prompt_started = Instant::now();
            let mut first_token_at = None;
            let generation = generate_streaming(&model.model, prompt, &config, |_| {
                first_token_at.get_or_insert_with(|| prompt_started.elapsed().as_secs_f64());
            })?;
            reading += first_token_at.unwrap_or_default();
            outputs.push(generation.tokens);
        }
        Ok((started.elapsed().as_secs_f64(), reading, outputs))
    };
    let batched = || -> anyhow::Result<(f64, f64, Vec<Vec<u32>>)> {
        let started = Instant::now();
        let (mut first_tokens, mut reading) = (0, 0.0);
        let outputs = generate_batch_streaming(&model.model, prompts, &config, |_, _| {
            first_tokens += 1;
            if first_tokens == prompts.len() {
                reading = started.elapsed().as_secs_f64();
            }
        })?
        .into_iter()
        .map(|generation| generation.tokens)
        .collect();
        Ok((started.elapsed().as_secs_f64(), reading, outputs))
    };
    let (_, _, reference) = alone()?;
    anyhow::ensure!(
        reference.iter().all(|tokens| tokens.len() == new_tokens),
        "generation stopped early: the prompts and {new_tokens} new tokens must fit {}'s context",
        model.describe()
    );
    batched()?;
    let total = (new_tokens * prompts.len()) as f64;
    let decoded = ((new_tokens - 1) * prompts.len()) as f64;
    let (mut alone_speeds, mut batched_speeds) = (Vec::new(), Vec::new());
    let (mut alone_decode_speeds, mut batched_decode_speeds) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (seconds, reading, _) = alone()?;
        alone_speeds.push(total / seconds);
        alone_decode_speeds.push(decoded / (seconds - reading));
        let (seconds, reading, outputs) = batched()?;
        anyhow::ensure!(
            outputs == reference,
            "decoded in a batch, {}'s greedy output changed",
            model.describe()
        );
        batched_speeds.push(total / seconds);
        batched_decode_speeds.push(decoded / (seconds - reading));
    }
    let (alone, together) = (median(alone_speeds), median(batched_speeds));
    let (alone_decode, together_decode) =
        (median(alone_decode_speeds), median(batched_decode_speeds));
    Ok(BatchReport {
        model: model.describe(),
        batch: prompts.len(),
        prompt_tokens: prompts.iter().map(Vec::len).collect(),
        new_tokens,
        alone_tokens_per_sec: alone,
        batched_tokens_per_sec: together,
        per_sequence_tokens_per_sec: together / prompts.len() as f64,
        speedup: together / alone,
        alone_decode_tokens_per_sec: alone_decode,
        batched_decode_tokens_per_sec: together_decode,
        decode_speedup: together_decode / alone_decode,
        runs: runs.max(1),
    })
}

pub fn batch_table(reports: &[BatchReport]) -> String {
    let mut table = String::from(
        "| model | batch | one prompt at a time | batched | per sequence | speed-up | decoding one \
         at a time | decoding batched | decoding speed-up |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for report in reports {
        table.push_str(&format!(
            "| {} | {} | {:.0} tokens/s | {:.0} tokens/s | {:.1} tokens/s | {:.2}x | {:.0} tokens/s \
             | {:.0} tokens/s | {:.2}x |\n",
            report.model,
            report.batch,
            report.alone_tokens_per_sec,
            report.batched_tokens_per_sec,
            report.per_sequence_tokens_per_sec,
            report.speedup,
            report.alone_decode_tokens_per_sec,
            report.batched_decode_tokens_per_sec,
            report.decode_speedup,
        ));
    }
    if let Some(first) = reports.first() {
        table.push_str(&format!(
            "\ngreedy, {} new tokens after each of {} prompts of {:?} tokens; tokens/s of all \
             prompts over the whole generation, prompts included; decoding: the tokens after each \
             prompt's first over the time after it (the prompts' reading left out); each batched \
             output equals the prompt's own in every run\n",
            first.new_tokens, first.batch, first.prompt_tokens,
        ));
    }
    table
}

/// The prompt and new tokens of a standard decoding measurement: 32 and 128, or what a shorter
/// context holds.
pub fn standard_lengths(context: usize) -> (usize, usize) {
    let prompt_tokens = (context / 4).clamp(1, 32);
    (prompt_tokens, (context - prompt_tokens).min(128))
}

/// An instance's generated tokens per second for `distillery cost --measure`, and a sentence
/// saying how they were measured: greedy decoding after the start of the validation split
/// ([`standard_lengths`]), by the model alone, with a draft, or over a batch of prompts.
pub fn measure_throughput(
    config: &distillery_config::ExperimentConfig,
    model: &std::path::Path,
    draft: &crate::models::DraftArgs,
    batch: Option<usize>,
) -> anyhow::Result<(f64, String)> {
    const RUNS: usize = 3;
    let data = distillery_run::prepare_data(config)?;
    let validation = &data.splits.validation;
    let (loaded, load_seconds) = load::load_model_timed(config, model, &data.tokenizer)?;
    let (prompt_tokens, new_tokens) =
        standard_lengths(loaded.model.config().max_position_embeddings);
    let machine =
        distillery_run::backend_description(&config.run, &distillery_run::device_for(&config.run)?);
    let prompt = &validation[..prompt_tokens.min(validation.len())];
    let draft = draft.resolve_beside_batch(config, batch)?;
    if let Some(settings) = &draft {
        let draft = crate::models::into_draft(
            load::load_model(config, &settings.path, &data.tokenizer)?,
            settings.vocabulary,
            &data.tokenizer,
            || Ok(data.splits.train.tokens.clone()),
            &[],
        )?;
        let report = bench_draft(
            &loaded,
            &draft,
            &[prompt.to_vec()],
            &greedy(new_tokens),
            RUNS,
            settings.length,
            data.tokenizer.vocab_size(),
        )?;
        let how = format!(
            "measured: greedy speculative decoding of {} with the draft {} ({:.1}% of drafted \
             tokens accepted) on {machine}",
            report.model,
            report.draft,
            100.0 * report.acceptance_rate
        );
        return Ok((report.drafted_tokens_per_sec, how));
    }
    if let Some(batch) = batch {
        let prompts = batch_prompts(validation, batch, prompt_tokens)?;
        let report = bench_batch(&loaded, &prompts, new_tokens, RUNS)?;
        let how = format!(
            "measured: greedy decoding of {} prompts together by {} on {machine}",
            report.batch, report.model
        );
        return Ok((report.batched_tokens_per_sec, how));
    }
    let reports = bench_decode(
        std::slice::from_ref(&loaded),
        &[load_seconds],
        prompt,
        new_tokens,
        RUNS,
    )?;
    let how = format!(
        "measured: greedy decoding of {} on {machine}",
        loaded.describe()
    );
    Ok((reports[0].decode_tokens_per_sec, how))
}
