//! `distillery generate`: continue a prompt, or answer a chat message through the model's chat
//! template.

use std::path::PathBuf;

use distillery_data::chat::{ChatTemplate, Message};
use distillery_model::{GenerationConfig, SamplingConfig, StopReason};

use crate::ConfigArgs;
use crate::models::{self, Activations, DraftArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// A checkpoint, run directory, quantized folder or GGUF file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, answered through the model's chat template; generation stops at the
    /// template's end-of-turn token.
    #[arg(long)]
    chat: Option<String>,
    /// A system message before the chat message.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How quantized matrices treat their activations.
    #[arg(long, value_enum, default_value_t)]
    activations: Activations,
    #[command(flatten)]
    draft: DraftArgs,
    /// Print the answer as JSON: the text, every generated token id (the stop token included)
    /// and why generation stopped.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let tokenizer = distillery_data::TextTokenizer::load(&config.data.tokenizer)?;
    let mut loaded = vec![models::load_model(&config, &args.checkpoint, &tokenizer)?];
    if let Some(draft) = &args.draft.draft {
        loaded.push(models::load_model(&config, draft, &tokenizer)?);
    }
    models::apply_activations(&mut loaded, args.activations);
    let mut stop_tokens: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(prompt), _) => tokenizer.encode_prompt(prompt)?,
        (None, Some(chat)) => {
            let template = ChatTemplate::of(&tokenizer)?;
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", chat));
            stop_tokens.extend(template.end_of_turn()?);
            tokenizer.encode(&template.render(&messages, true)?)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let settings = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens,
    };
    let model = &loaded[0].model;
    let (generation, draft_stats) = match loaded.get(1) {
        None => (
            distillery_model::generate(model, &prompt_ids, &settings)?,
            None,
        ),
        Some(draft) => {
            let (generation, stats) = distillery_model::generate_with_draft(
                model,
                &draft.model,
                &prompt_ids,
                &settings,
                args.draft.length(),
                tokenizer.vocab_size(),
                |_| {},
            )?;
            eprintln!("{}", describe_draft(&stats, generation.tokens.len()));
            (generation, Some(stats))
        }
    };
    let mut tokens = generation.tokens.as_slice();
    if generation.stop == StopReason::EndOfSequence {
        tokens = &tokens[..tokens.len() - 1];
    }
    let text = tokenizer.decode(tokens)?;
    if args.json {
        let stop = match generation.stop {
            StopReason::EndOfSequence => "stop token",
            StopReason::TokenLimit => "max_new_tokens",
            StopReason::ContextFull => "context full",
        };
        let mut report = serde_json::json!({
            "text": text,
            "tokens": generation.tokens,
            "prompt_tokens": prompt_ids.len(),
            "stop": stop,
        });
        if let Some(stats) = &draft_stats {
            report["draft"] = serde_json::json!({
                "draft_tokens": args.draft.draft_tokens,
                "adaptive": args.draft.adaptive_draft,
                "model_passes": stats.model_passes,
                "proposed_by_position": stats.proposed,
                "accepted_by_position": stats.accepted,
                "acceptance_rate": stats.acceptance_rate(),
                "tokens_per_pass": stats.tokens_per_pass(generation.tokens.len()),
            });
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &args.prompt {
        Some(prompt) => println!("{prompt}{text}"),
        None => println!("{text}"),
    }
    Ok(())
}

/// One line on what the draft did: acceptance overall and by position, tokens per model pass.
fn describe_draft(stats: &distillery_model::DraftStats, tokens: usize) -> String {
    let by_position: Vec<String> = stats
        .acceptance_by_position()
        .iter()
        .map(|rate| format!("{:.0}%", 100.0 * rate))
        .collect();
    format!(
        "draft: {:.1}% of drafted tokens accepted (by position: {}), {:.2} tokens per pass of \
         the model ({} passes after the prompt)",
        100.0 * stats.acceptance_rate(),
        by_position.join(", "),
        stats.tokens_per_pass(tokens),
        stats.model_passes
    )
}
