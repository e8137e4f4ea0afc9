//! `distillery continuations`: a model's own continuations of prompts from the training split,
//! written as JSON Lines that `[data] format = "jsonl"` reads. A speculative draft distilled on
//! the text its model writes (DistillSpec's on-policy data) learns to propose what the model
//! will accept; a draft distilled on the corpus learns the corpus, which an instruction-tuned
//! model stops writing within a few tokens.

use std::path::PathBuf;
use std::time::Instant;

use distillery_formats::load;
use distillery_model::GenerationConfig;

use crate::ConfigArgs;
use crate::models::SamplingArgs;

#[derive(clap::Args)]
pub struct ContinuationsArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The model that writes the continuations (a checkpoint, run directory, quantized folder
    /// or GGUF file).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The JSON Lines file to write: one object per prompt, `text` (the prompt and its
    /// continuation) and `prompt`.
    #[arg(long)]
    out: PathBuf,
    /// How many prompts, taken at evenly spaced places in the training split.
    #[arg(long, default_value_t = 256)]
    num_prompts: usize,
    /// Each prompt's length.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// Prompts decoded together (one pass over the weights serves the whole batch).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(args: ContinuationsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let config = args.config.load()?;
    let data = distillery_run::prepare_data(&config)?;
    let prompts = spaced_prompts(&data.splits.train, args.num_prompts, args.prompt_tokens)?;
    let model = load::load_model(&config, &args.checkpoint, &data.tokenizer)?;
    let settings = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.config(),
        stop_tokens: data.tokenizer.eos_token_id().into_iter().collect(),
    };
    let started = Instant::now();
    let mut lines = String::new();
    let mut new_tokens = 0;
    let mut done = 0;
    for batch in prompts.chunks(args.batch) {
        let generations = distillery_model::generate_batch(&model.model, batch, &settings)?;
        for (prompt, generation) in batch.iter().zip(&generations) {
            let continuation = generation.tokens_without_stop();
            new_tokens += continuation.len();
            // Decoded as one sequence: a tokenizer that drops a leading space from what it
            // decodes would otherwise join the prompt's last word to the continuation's first.
            let text = data.tokenizer.decode(&[prompt, continuation].concat())?;
            let prompt = data.tokenizer.decode(prompt)?;
            lines.push_str(&serde_json::json!({ "text": text, "prompt": prompt }).to_string());
            lines.push('\n');
        }
        done += batch.len();
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{done}/{} prompts continued, {:.1} new tokens/s, about {:.0} s left",
            prompts.len(),
            new_tokens as f64 / seconds,
            seconds / done as f64 * (prompts.len() - done) as f64
        );
    }
    distillery_data::write_atomically(&args.out, lines.as_bytes())?;
    println!(
        "wrote {} continuations ({new_tokens} new tokens after {} prompt tokens each) of {}'s \
         training split by {} to {} in {:.0} s",
        prompts.len(),
        args.prompt_tokens,
        config.corpus().path.display(),
        args.checkpoint.display(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `count` windows of `length` tokens, the first at the split's start, the others spread
/// evenly up to its end, so the prompts sample the whole split.
fn spaced_prompts(split: &[u32], count: usize, length: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(
        count >= 1 && length >= 1 && length <= split.len(),
        "--num-prompts and --prompt-tokens must be at least 1, and a prompt of {length} tokens must \
         fit the training split's {} tokens",
        split.len()
    );
    let last_start = split.len() - length;
    Ok((0..count)
        .map(|index| {
            let start = (index * last_start)
                .checked_div(count - 1)
                .unwrap_or_default();
            split[start..start + length].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_span_the_split_from_its_first_to_its_last_window() {
        let split: Vec<u32> = (0..20).collect();
        let prompts = spaced_prompts(&split, 3, 4).unwrap();
        assert_eq!(
            prompts,
            vec![vec![0, 1, 2, 3], vec![8, 9, 10, 11], vec![16, 17, 18, 19]]
        );
        assert_eq!(spaced_prompts(&split, 1, 20).unwrap(), vec![split.clone()]);
        assert!(spaced_prompts(&split, 2, 21).is_err());
        assert!(spaced_prompts(&split, 0, 4).is_err());
    }
}
