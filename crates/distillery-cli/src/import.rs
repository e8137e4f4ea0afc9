//! `distillery import`: a pretrained model (a Hugging Face folder or a GGUF file) as a step-0
//! checkpoint of the config's run.

use std::path::PathBuf;

use distillery_data::TextTokenizer;
use distillery_formats::source;

use crate::ConfigArgs;

#[derive(clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// A Hugging Face Llama folder: config.json, model.safetensors (or shards with their index;
    /// f32, f16 or bf16), tokenizer.json.
    #[arg(long, required_unless_present = "gguf", conflicts_with = "gguf")]
    hf_dir: Option<PathBuf>,
    /// A GGUF file of the llama architecture; its quantized matrices are dequantized to f32.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The checkpoint directory to create.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let tokenizer = TextTokenizer::load(&config.data.tokenizer)?;
    if args.out.exists() {
        anyhow::bail!(
            "{}: already exists; choose another directory",
            args.out.display()
        );
    }
    let device = distillery_run::device_for(&config.run)?;
    let (source_path, model) = match (&args.hf_dir, &args.gguf) {
        (Some(dir), _) => {
            let theirs_path = dir.join(source::TOKENIZER_FILE);
            let theirs = TextTokenizer::load(&theirs_path)?;
            if theirs.sha256() != tokenizer.sha256() {
                anyhow::bail!(
                    "{}: another tokenizer than the config's {}; the checkpoint would record the \
                     wrong one",
                    theirs_path.display(),
                    config.data.tokenizer.display()
                );
            }
            (dir, distillery_formats::hf::import(dir, &device)?)
        }
        (None, Some(file_path)) => {
            let vocabulary =
                source::tokenizer_vocabulary(&config.data.tokenizer, tokenizer.eos_token_id())?;
            let (_, model) = source::load_gguf_for(file_path, &vocabulary, &device)?;
            // A checkpoint holds float parameters: the blocks become their dequantized values.
            (file_path, model.dequantized())
        }
        (None, None) => unreachable!("clap requires --hf-dir or --gguf"),
    };
    distillery_train::write_initial_checkpoint(&config, &model, tokenizer.sha256(), &args.out)?;
    println!(
        "imported {} ({} parameters) into {}",
        source_path.display(),
        model.config().num_parameters(),
        args.out.display()
    );
    Ok(())
}
