//! Text to token windows: tokenizers, the token cache and the seeded window sampler.

pub mod chat;
mod corpus;
#[cfg(test)]
mod testing;
mod token_cache;
mod tokenizer;
mod windows;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use corpus::{Corpus, CorpusFiles, CorpusFormat, EncodedCorpus};
pub use token_cache::{
    CacheStatus, TokenCache, TokenCacheHeader, cache_path, load_or_build, read_token_cache,
};
pub use tokenizer::{
    END_OF_TEXT, TOKENIZER_CONFIG_FILE, TextTokenizer, TokenizerSettings, default_tokenizer_path,
    hex_sha256,
};
pub use windows::{
    TokenBatch, TokenSpan, TokenSplits, TokenWindow, ValidationWindows, WindowSampler,
};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{what} file {} does not exist", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("token cache {}: {message}", path.display())]
    Cache { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("chat: {0}")]
    Chat(String),
    #[error(
        "a byte-level BPE vocabulary needs at least {minimum} entries (256 bytes and <|endoftext|>), got {requested}"
    )]
    VocabTooSmall { requested: usize, minimum: usize },
    #[error("validation window {index} requested, but there are only {windows} windows")]
    WindowOutOfRange { index: usize, windows: usize },
    #[error("corpus {} is not UTF-8 text", .0.display())]
    NotUtf8(PathBuf),
    #[error("corpus {}: {message}", path.display())]
    Corpus { path: PathBuf, message: String },
    #[error("{}, line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "the {split} split has no token that counts as a target (chat corpora count only the          assistant's turns)"
    )]
    NothingCounted { split: &'static str },
    #[error(
        "the corpus has {tokens} tokens: {train} for training and {validation} for validation, but each split needs at least one window of {needed}"
    )]
    CorpusTooSmall {
        tokens: usize,
        train: usize,
        validation: usize,
        needed: usize,
    },
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`, so
/// readers see the old file or the complete new one, never a prefix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let io_error = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // Readable by others like any file the user writes (a temp file starts as 0600).
    let mut temporary = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(directory)
        .map_err(io_error)?;
    temporary.write_all(bytes).map_err(io_error)?;
    temporary.as_file().sync_all().map_err(io_error)?;
    temporary
        .persist(path)
        .map_err(|error| io_error(error.error))?;
    Ok(())
}
