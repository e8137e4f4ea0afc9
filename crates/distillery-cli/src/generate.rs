//! `distillery generate`: continue a prompt, or answer a chat message through the model's chat
//! template.

use std::path::PathBuf;

use distillery_data::TextTokenizer;
use distillery_data::chat::{ChatTemplate, Message};
use distillery_formats::load;
use distillery_model::{DraftLength, Generation, GenerationConfig, StopReason};

use crate::ConfigArgs;
use crate::models::{self, Activations, DraftArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// A checkpoint, run directory, quantized folder or GGUF file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, required_unless_present_any = ["chat", "prompts"], conflicts_with_all = ["chat", "prompts"])]
    prompt: Option<String>,
    /// A file of prompts, one per line (empty lines skipped), continued together in one batch;
    /// each continuation is the one `--prompt` gives it alone.
    #[arg(long, conflicts_with = "chat")]
    prompts: Option<PathBuf>,
    /// A user message, answered through the model's chat template; generation stops at the
    /// template's end-of-turn token.
    #[arg(long)]
    chat: Option<String>,
    /// A system message before the chat message.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
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

/// `turns` after `system`'s message, if any.
pub fn conversation(
    system: Option<&str>,
    turns: impl IntoIterator<Item = Message>,
) -> Vec<Message> {
    system
        .map(|system| Message::new("system", system))
        .into_iter()
        .chain(turns)
        .collect()
}

/// The tokens that ask `tokenizer`'s chat template for the assistant's answer to each of
/// `users` (after `system`, if any), and the template's end-of-turn token, at which the
/// answers stop.
pub fn chat_prompts(
    tokenizer: &TextTokenizer,
    system: Option<&str>,
    users: &[String],
) -> anyhow::Result<(Vec<Vec<u32>>, Option<u32>)> {
    let template = ChatTemplate::of(tokenizer)?;
    let prompts = users
        .iter()
        .map(|user| {
            let messages = conversation(system, [Message::new("user", user)]);
            Ok(tokenizer.encode(&template.render(&messages, true)?)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((prompts, template.end_of_turn()?))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    let draft_settings = args.draft.resolve(&config)?;
    anyhow::ensure!(
        args.prompts.is_none() || draft_settings.is_none(),
        "--prompts decodes its prompts as one batch, without a draft: drop --draft or the \
         config's generate.draft"
    );
    let mut loaded = vec![load::load_model(&config, &args.checkpoint, &tokenizer)?];
    if let Some(settings) = &draft_settings {
        loaded.push(load::load_model(&config, &settings.path, &tokenizer)?);
    }
    models::apply_activations(&mut loaded, args.activations);
    let mut stop_tokens: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    let settings = |stop_tokens: Vec<u32>| GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.config(),
        stop_tokens,
    };
    if let Some(path) = &args.prompts {
        let prompts = models::non_blank_lines(path, "prompt")?;
        let ids = prompts
            .iter()
            .map(|prompt| tokenizer.encode_prompt(prompt))
            .collect::<Result<Vec<_>, _>>()?;
        let generations =
            distillery_model::generate_batch(&loaded[0].model, &ids, &settings(stop_tokens))?;
        let mut reports = Vec::new();
        for ((prompt, ids), generation) in prompts.iter().zip(&ids).zip(&generations) {
            let text = tokenizer.decode(generation.tokens_without_stop())?;
            if args.json {
                reports.push(report(&text, generation, ids.len()));
            } else {
                println!("{prompt}{text}\n");
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        return Ok(());
    }
    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(prompt), _) => tokenizer.encode_prompt(prompt)?,
        (None, Some(chat)) => {
            let (prompts, end_of_turn) = chat_prompts(
                &tokenizer,
                args.system.as_deref(),
                std::slice::from_ref(chat),
            )?;
            stop_tokens.extend(end_of_turn);
            prompts.into_iter().next().expect("one prompt a message")
        }
        (None, None) => unreachable!("clap requires --prompt, --prompts or --chat"),
    };
    let draft = match &draft_settings {
        Some(draft_settings) => Some((
            models::into_draft(
                loaded.pop().expect("the draft was loaded last"),
                draft_settings.vocabulary,
                &tokenizer,
                || Ok(distillery_run::prepare_data(&config)?.splits.train.tokens),
                &stop_tokens,
            )?,
            draft_settings.length,
        )),
        None => None,
    };
    let settings = settings(stop_tokens);
    let model = &loaded[0].model;
    let (generation, draft_stats) = match &draft {
        Some((draft, length)) => {
            let (generation, stats) = distillery_model::generate_with_draft(
                model,
                &draft.draft,
                &prompt_ids,
                &settings,
                *length,
                tokenizer.vocab_size(),
                |_| {},
            )?;
            eprintln!("{}", describe_draft(&stats, generation.tokens.len()));
            (generation, Some((stats, *length, &draft.draft)))
        }
        None => (
            distillery_model::generate(model, &prompt_ids, &settings)?,
            None,
        ),
    };
    let text = tokenizer.decode(generation.tokens_without_stop())?;
    if args.json {
        let mut report = report(&text, &generation, prompt_ids.len());
        if let Some((stats, length, draft)) = &draft_stats {
            report["draft"] = serde_json::json!({
                "draft_tokens": length.most(),
                "adaptive": matches!(length, DraftLength::Adaptive(_)),
                "p_min": length.min_probability(),
                "proposable_tokens": draft.proposable_tokens(tokenizer.vocab_size()),
                "model_passes": stats.model_passes,
                "proposed_by_position": stats.proposed,
                "accepted_by_position": stats.accepted,
                "acceptance_rate": stats.acceptance_rate(),
                "tokens_per_pass": stats.tokens_per_pass(generation.tokens.len(), 1),
                "draft_seconds": stats.draft_seconds,
                "check_seconds": stats.check_seconds,
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

/// A generation as `--json` prints it: the text, every generated token id (the stop token
/// included) and why generation stopped.
fn report(text: &str, generation: &Generation, prompt_tokens: usize) -> serde_json::Value {
    let stop = match generation.stop {
        StopReason::EndOfSequence => "stop token",
        StopReason::TokenLimit => "max_new_tokens",
        StopReason::ContextFull => "context full",
    };
    serde_json::json!({
        "text": text,
        "tokens": generation.tokens,
        "prompt_tokens": prompt_tokens,
        "stop": stop,
    })
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
        stats.tokens_per_pass(tokens, 1),
        stats.model_passes
    )
}
