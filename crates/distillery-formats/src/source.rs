//! Pretrained models as a run's source (`model.from`, `teacher.from`): a GGUF file or a Hugging
//! Face Llama folder, its architecture and its tokenizer, and the model itself.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use distillery_model::{Llama, LlamaConfig};

use crate::gguf::{self, GgufFile, GgufVocabulary};
use crate::hf;

/// The file name of the tokenizer a pretrained model carries, in the folder beside it.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct SourceError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl ToString) -> SourceError {
    SourceError {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A pretrained model's architecture and where its tokenizer lies as a `tokenizer.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainedSource {
    pub architecture: LlamaConfig,
    pub tokenizer: PathBuf,
}

/// Whether `path` names a GGUF file rather than a folder.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|extension| extension == "gguf")
}

/// The folder a GGUF file's tokenizer is written to: `models/x.gguf` has `models/x.tokenizer/`.
pub fn gguf_tokenizer_dir(path: &Path) -> PathBuf {
    path.with_extension("tokenizer")
}

pub fn read_gguf(path: &Path) -> Result<GgufFile, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| error(path, e))?;
    gguf::read(bytes).map_err(|e| error(path, e))
}

/// Reads a pretrained model's architecture and finds its tokenizer. A GGUF file's tokenizer is
/// rebuilt from its metadata and written as `tokenizer.json` and `tokenizer_config.json` into
/// [`gguf_tokenizer_dir`] (rewritten only when they differ), so the rest of distillery uses it
/// like any tokenizer.
pub fn read_source(path: &Path) -> Result<PretrainedSource, SourceError> {
    if path.is_dir() {
        let architecture = hf::read_config(path).map_err(|e| error(path, e.message))?;
        let tokenizer = path.join(TOKENIZER_FILE);
        if !tokenizer.is_file() {
            return Err(error(path, format!("holds no {TOKENIZER_FILE}")));
        }
        return Ok(PretrainedSource {
            architecture,
            tokenizer,
        });
    }
    if !is_gguf(path) {
        return Err(error(
            path,
            "is neither a GGUF file (.gguf) nor a Hugging Face model folder",
        ));
    }
    let file = read_gguf(path)?;
    let architecture = gguf::architecture(&file).map_err(|e| error(path, e))?;
    let dir = gguf_tokenizer_dir(path);
    write_tokenizer(&file, &dir).map_err(|e| error(path, e))?;
    Ok(PretrainedSource {
        architecture,
        tokenizer: dir.join(TOKENIZER_FILE),
    })
}

/// Writes the tokenizer of a GGUF file into `dir`, unless the same files are already there.
fn write_tokenizer(file: &GgufFile, dir: &Path) -> Result<(), String> {
    let files = gguf::tokenizer_from_gguf(file).map_err(|e| e.to_string())?;
    let pretty = |json: &serde_json::Value| {
        serde_json::to_string_pretty(json)
            .expect("json serializes")
            .into_bytes()
    };
    let contents = [
        (TOKENIZER_FILE, pretty(&files.tokenizer)),
        (TOKENIZER_CONFIG_FILE, pretty(&files.config)),
    ];
    let unchanged = contents
        .iter()
        .all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|old| old == *bytes));
    if unchanged {
        return Ok(());
    }
    hf::write_folder(dir, &contents, true).map_err(|e| e.to_string())
}

/// Loads a pretrained model: a GGUF file (its quantized matrices kept in their blocks) or a
/// Hugging Face Llama folder.
pub fn load_pretrained(path: &Path, device: &Device) -> Result<Llama, SourceError> {
    if path.is_dir() {
        return hf::import(path, device).map_err(|e| error(path, e.message));
    }
    let file = read_gguf(path)?;
    gguf::import(&file, device).map_err(|e| error(path, e))
}

/// The GGUF vocabulary of the `tokenizer.json` at `path`, with the special tokens, flags and
/// chat template of the `tokenizer_config.json` beside it. Without one, `default_eos` serves as
/// end (and beginning) of sequence.
pub fn tokenizer_vocabulary(
    path: &Path,
    default_eos: Option<u32>,
) -> Result<GgufVocabulary, SourceError> {
    let read_json = |path: &Path| -> Result<serde_json::Value, SourceError> {
        let text = std::fs::read_to_string(path).map_err(|e| error(path, e))?;
        serde_json::from_str(&text).map_err(|e| error(path, format!("not JSON: {e}")))
    };
    let tokenizer = read_json(path)?;
    let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
    let config = config_path
        .is_file()
        .then(|| read_json(&config_path))
        .transpose()?;
    gguf::vocabulary_from_tokenizer_json(&tokenizer, config.as_ref(), default_eos)
        .map_err(|e| error(path, e))
}

/// A GGUF file and its model, refused unless the file tokenizes as `vocabulary` does: a model
/// evaluated or trained against another tokenizer would be silently wrong.
pub fn load_gguf_for(
    path: &Path,
    vocabulary: &GgufVocabulary,
    device: &Device,
) -> Result<(GgufFile, Llama), SourceError> {
    let file = read_gguf(path)?;
    gguf::check_same_vocabulary(&file, vocabulary).map_err(|e| {
        error(
            path,
            format!("tokenizes differently from the run's tokenizer: {e}"),
        )
    })?;
    let model = gguf::import(&file, device).map_err(|e| error(path, e))?;
    Ok((file, model))
}
