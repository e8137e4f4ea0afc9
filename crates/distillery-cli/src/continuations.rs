//! `distillery continuations`: a model's own continuations of prompts from the training split,
//! or its answers to chat messages, written as JSON Lines that `[data] format = "jsonl"` reads
//! (and, for answers, `format = "chat"`). A speculative draft distilled on
//! the text its model writes (DistillSpec's on-policy data) learns to propose what the model
//! will accept; a draft distilled on the corpus learns the corpus, which an instruction-tuned
//! model stops writing within a few tokens.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use distillery_data::TextTokenizer;
use distillery_data::chat::Message;

use distillery_formats::load;
use distillery_model::{Generation, GenerationConfig};

use crate::ConfigArgs;
use crate::models::{self, Activations, SamplingArgs};

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
    /// A file of user messages, one per line (empty lines skipped), each answered through the
    /// model's chat template (after `--system`, if given) instead of a window of the training
    /// split continued; each answer stops at the template's end-of-turn token, and its line
    /// also holds the conversation (`messages`).
    #[arg(long, conflicts_with_all = ["num_prompts", "prompt_tokens"])]
    chat: Option<PathBuf>,
    /// A system message before each chat message.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// Prompts decoded together (one pass over the weights serves the whole batch).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// How quantized matrices treat their activations: the arithmetic the model will serve
    /// with, whose text a draft should learn.
    #[arg(long, value_enum, default_value_t)]
    activations: Activations,
}

pub fn run(args: ContinuationsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let config = args.config.load()?;
    let data = distillery_run::prepare_data(&config)?;
    let mut stop_tokens: Vec<u32> = data.tokenizer.eos_token_id().into_iter().collect();
    let (prompts, users) = match &args.chat {
        None => (
            spaced_prompts(&data.splits.train, args.num_prompts, args.prompt_tokens)
                .context("--num-prompts and --prompt-tokens over the training split")?,
            Vec::new(),
        ),
        Some(path) => {
            let users: Vec<String> = models::non_blank_lines(path, "chat message")?
                .iter()
                .map(|line| line.trim().to_string())
                .collect();
            let (prompts, end_of_turn) =
                crate::generate::chat_prompts(&data.tokenizer, args.system.as_deref(), &users)?;
            stop_tokens.extend(end_of_turn);
            (prompts, users)
        }
    };
    let mut model = load::load_model(&config, &args.checkpoint, &data.tokenizer)?;
    models::apply_activations(std::slice::from_mut(&mut model), args.activations);
    let settings = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.config(),
        stop_tokens,
    };
    let started = Instant::now();
    let mut lines = String::new();
    let mut new_tokens = 0;
    let mut done = 0;
    for batch in prompts.chunks(args.batch) {
        let generations = distillery_model::generate_batch(&model.model, batch, &settings)?;
        for (prompt, generation) in batch.iter().zip(&generations) {
            let line = match &args.chat {
                None => {
                    continuation_line(&data.tokenizer, prompt, generation.tokens_without_stop())?
                }
                Some(_) => answer_line(
                    &data.tokenizer,
                    prompt,
                    args.system.as_deref(),
                    &users[done],
                    generation,
                )?,
            };
            new_tokens += generation.tokens_without_stop().len();
            lines.push_str(&line.to_string());
            lines.push('\n');
            done += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{done}/{} prompts continued, {:.1} new tokens/s, about {:.0} s left",
            prompts.len(),
            new_tokens as f64 / seconds,
            seconds / done as f64 * (prompts.len() - done) as f64
        );
    }
    distillery_data::write_atomically(&args.out, lines.as_bytes())?;
    let source = match &args.chat {
        None => format!(
            "continuations ({new_tokens} new tokens after {} prompt tokens each) of {}'s training \
             split",
            args.prompt_tokens,
            config.corpus().path.display()
        ),
        Some(path) => format!(
            "answers ({new_tokens} new tokens) to the chat messages of {}",
            path.display()
        ),
    };
    println!(
        "wrote {} {source} by {} to {} in {:.0} s",
        prompts.len(),
        args.checkpoint.display(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A window of the training split and the model's continuation, as `text` and `prompt`.
fn continuation_line(
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    continuation: &[u32],
) -> anyhow::Result<serde_json::Value> {
    // Decoded as one sequence: a tokenizer that drops a leading space from what it decodes
    // would otherwise join the prompt's last word to the continuation's first.
    let text = tokenizer.decode(&[prompt, continuation].concat())?;
    let prompt = tokenizer.decode(prompt)?;
    Ok(serde_json::json!({ "text": text, "prompt": prompt }))
}

/// A chat message and the model's answer: `text`, the rendered conversation with the answer's
/// closing token (so that a draft learns to end its turn where the model does), `prompt`, and
/// `messages`, the turns `[data] format = "chat"` reads.
fn answer_line(
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    system: Option<&str>,
    user: &str,
    answer: &Generation,
) -> anyhow::Result<serde_json::Value> {
    let text = tokenizer.decode(&[prompt, &answer.tokens].concat())?;
    let content = tokenizer.decode(answer.tokens_without_stop())?;
    let messages = crate::generate::conversation(
        system,
        [
            Message::new("user", user),
            Message::new("assistant", &content),
        ],
    );
    Ok(serde_json::json!({
        "text": text,
        "prompt": tokenizer.decode(prompt)?,
        "messages": messages,
    }))
}

/// `count` windows of `length` tokens, the first at the split's start, the others spread
/// evenly up to its end, so the prompts sample the whole split.
pub fn spaced_prompts(split: &[u32], count: usize, length: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    anyhow::ensure!(
        count >= 1 && length >= 1 && length <= split.len(),
        "{count} prompts of {length} tokens: at least one prompt of at least one token is needed, \
         each within the split's {} tokens",
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
