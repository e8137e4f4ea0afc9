//! `distillery tokenizer`: train a byte-level BPE tokenizer, or encode a text with one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use distillery_data::TextTokenizer;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on a text file.
    Train {
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the token ids of a text, as JSON: with a tokenizer.json, or the tokenizer a GGUF
    /// file carries (written beside it as model.from does).
    Encode {
        /// A tokenizer.json, or a GGUF file.
        #[arg(long)]
        tokenizer: PathBuf,
        /// The text; or --file.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// A UTF-8 text file to encode.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub fn run(command: TokenizerCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenizerCommand::Train {
            corpus,
            vocab_size,
            out,
        } => {
            let tokenizer = TextTokenizer::train_bpe(&corpus, vocab_size)?;
            tokenizer
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} tokens, sha256 {})",
                out.display(),
                tokenizer.vocab_size(),
                tokenizer.sha256()
            );
        }
        TokenizerCommand::Encode {
            tokenizer,
            text,
            file,
        } => {
            let path = if distillery_formats::source::is_gguf(&tokenizer) {
                distillery_formats::source::read_source(&tokenizer)?.tokenizer
            } else {
                tokenizer
            };
            let tokenizer = TextTokenizer::load(&path)?;
            let text = match (text, file) {
                (Some(text), _) => text,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                (None, None) => unreachable!("clap requires --text or --file"),
            };
            println!("{}", serde_json::to_string(&tokenizer.encode(&text)?)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
