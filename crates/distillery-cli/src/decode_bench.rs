//! `distillery bench generate`: how fast each model decodes, one token at a time with its KV
//! cache, as a deployed model runs.

use std::time::Instant;

use distillery_model::{GenerationConfig, Llama, SamplingConfig, generate};

use crate::models::LoadedModel;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub bits_per_weight: f64,
    /// Bytes the weights take in memory as the model computes with them.
    pub weight_bytes: usize,
    pub prompt_tokens: usize,
    /// Median time to read the prompt and produce the first token.
    pub prefill_ms: f64,
    pub new_tokens: usize,
    /// Tokens per second after the first one (median over the runs).
    pub decode_tokens_per_sec: f64,
    pub runs: usize,
}

/// Bytes of `model`'s weights: f32 parameters plus the packed matrices as they sit in memory.
fn weight_bytes(model: &Llama) -> usize {
    use burn::module::Module;
    let packed = model
        .linears()
        .into_iter()
        .filter_map(|(_, linear)| linear.packed())
        .chain(model.packed_embedding())
        .map(|matrix| matrix.memory_bytes())
        .sum::<usize>();
    4 * model.num_params() + packed
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Greedy generation of `new_tokens` after `prompt`, `runs` times after one warm-up run: the
/// prefill is timed by generating one token, the decode rate from the rest.
pub fn bench_decode(
    loaded: &LoadedModel,
    prompt: &[u32],
    new_tokens: usize,
    runs: usize,
) -> anyhow::Result<DecodeReport> {
    let model = &loaded.model;
    let context = model.config().max_position_embeddings;
    anyhow::ensure!(
        new_tokens >= 2 && prompt.len() + new_tokens <= context,
        "{} prompt tokens and {new_tokens} new tokens must fit the model's context of {context} \
         (and at least 2 new tokens are timed)",
        prompt.len()
    );
    let run = |count: usize| -> anyhow::Result<f64> {
        let config = GenerationConfig {
            max_new_tokens: count,
            sampling: SamplingConfig::default(),
            eos_token_id: None,
        };
        let started = Instant::now();
        let generation = generate(model, prompt, &config)?;
        anyhow::ensure!(generation.tokens.len() == count, "generation stopped early");
        Ok(started.elapsed().as_secs_f64())
    };
    run(new_tokens)?;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..runs.max(1) {
        let first = run(1)?;
        let all = run(new_tokens)?;
        prefill.push(first * 1e3);
        decode.push((new_tokens - 1) as f64 / (all - first).max(f64::EPSILON));
    }
    Ok(DecodeReport {
        model: loaded.describe(),
        bits_per_weight: loaded.bits_per_weight,
        weight_bytes: weight_bytes(model),
        prompt_tokens: prompt.len(),
        prefill_ms: median(prefill),
        new_tokens,
        decode_tokens_per_sec: median(decode),
        runs: runs.max(1),
    })
}

pub fn markdown_table(reports: &[DecodeReport]) -> String {
    let mut table = String::from(
        "| model | bits/weight | weights in memory | prefill | decode |\n|---|---:|---:|---:|---:|\n",
    );
    for report in reports {
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} MB | {:.1} ms ({} tokens) | {:.0} tokens/s |\n",
            report.model,
            report.bits_per_weight,
            report.weight_bytes as f64 / 1e6,
            report.prefill_ms,
            report.prompt_tokens,
            report.decode_tokens_per_sec,
        ));
    }
    table
}
