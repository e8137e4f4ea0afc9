//! The token cache: a corpus encoded once, as little-endian ids plus a JSON header that records
//! what produced them, so a cache made from another corpus or tokenizer is rebuilt rather than
//! silently reused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tokenizer::hex_sha256;
use crate::{DataError, TextTokenizer, write_atomically};

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheHeader {
    pub format_version: u32,
    pub tokenizer_sha256: String,
    pub corpus_sha256: String,
    pub corpus_bytes: u64,
    pub vocab_size: usize,
    /// Bytes per id: 2 (u16) when the vocabulary fits, else 4 (u32).
    pub id_bytes: usize,
    pub num_tokens: usize,
    pub tokens_sha256: String,
}

/// What happened when a cache was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    Reused,
    Built,
    /// The existing cache did not match; the reason says which input changed.
    Rebuilt(String),
}

#[derive(Debug)]
pub struct TokenCache {
    pub tokens: Vec<u32>,
    pub header: TokenCacheHeader,
    pub path: PathBuf,
    pub status: CacheStatus,
}

/// The cache file for `corpus` under `tokenizer`, inside `cache_dir`.
///
/// The tokenizer's hash is part of the name, so switching tokenizers back and forth keeps both
/// caches instead of rebuilding each time.
pub fn cache_path(corpus: &Path, tokenizer: &TextTokenizer, cache_dir: &Path) -> PathBuf {
    let name = corpus
        .file_name()
        .map_or_else(|| "corpus".into(), |name| name.to_string_lossy());
    cache_dir.join(format!("{name}.{}.tokens", &tokenizer.sha256()[..12]))
}

fn header_path(tokens_path: &Path) -> PathBuf {
    let mut name = tokens_path.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// Opens the token cache of `corpus`, building or rebuilding it when it is missing or stale.
pub fn load_or_build(
    corpus: &Path,
    tokenizer: &TextTokenizer,
    cache_dir: &Path,
) -> Result<TokenCache, DataError> {
    let text = std::fs::read(corpus).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::MissingFile {
            what: "corpus",
            path: corpus.to_path_buf(),
        },
        _ => DataError::Io {
            path: corpus.to_path_buf(),
            source,
        },
    })?;
    let corpus_sha256 = hex_sha256(&text);
    let path = cache_path(corpus, tokenizer, cache_dir);

    let stale_reason = match read_cache(&path) {
        Ok(Some((header, tokens))) => {
            match staleness(&header, tokenizer, &corpus_sha256, text.len()) {
                None => {
                    return Ok(TokenCache {
                        tokens,
                        header,
                        path,
                        status: CacheStatus::Reused,
                    });
                }
                Some(reason) => Some(reason),
            }
        }
        Ok(None) => None,
        Err(reason) => Some(reason),
    };

    let text = String::from_utf8(text).map_err(|_| DataError::NotUtf8(corpus.to_path_buf()))?;
    let tokens = tokenizer.encode(&text)?;
    let id_bytes = if tokenizer.vocab_size() <= 1 << 16 {
        2
    } else {
        4
    };
    let bytes = encode_ids(&tokens, id_bytes);
    let header = TokenCacheHeader {
        format_version: FORMAT_VERSION,
        tokenizer_sha256: tokenizer.sha256().to_string(),
        corpus_sha256,
        corpus_bytes: text.len() as u64,
        vocab_size: tokenizer.vocab_size(),
        id_bytes,
        num_tokens: tokens.len(),
        tokens_sha256: hex_sha256(&bytes),
    };
    std::fs::create_dir_all(cache_dir).map_err(|source| DataError::Io {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    write_atomically(&path, &bytes)?;
    let header_json = serde_json::to_string_pretty(&header).expect("header serializes");
    write_atomically(&header_path(&path), header_json.as_bytes())?;
    Ok(TokenCache {
        tokens,
        header,
        path,
        status: match stale_reason {
            Some(reason) => CacheStatus::Rebuilt(reason),
            None => CacheStatus::Built,
        },
    })
}

/// The ids of an existing token cache (a `.tokens` file with its `.tokens.json` header), which
/// must have been encoded with `tokenizer`.
pub fn read_token_cache(path: &Path, tokenizer: &TextTokenizer) -> Result<Vec<u32>, DataError> {
    let invalid = |message: String| DataError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let (header, tokens) =
        read_cache(path)
            .map_err(&invalid)?
            .ok_or_else(|| DataError::MissingFile {
                what: "token cache",
                path: path.to_path_buf(),
            })?;
    if header.tokenizer_sha256 != tokenizer.sha256() {
        return Err(invalid(format!(
            "was encoded with another tokenizer (sha256 {})",
            header.tokenizer_sha256
        )));
    }
    Ok(tokens)
}

/// `Ok(None)` when there is no cache; `Err(reason)` when one exists but cannot be trusted.
fn read_cache(path: &Path) -> Result<Option<(TokenCacheHeader, Vec<u32>)>, String> {
    let header_file = header_path(path);
    if !path.exists() && !header_file.exists() {
        return Ok(None);
    }
    let header_json = std::fs::read_to_string(&header_file).map_err(|error| {
        format!(
            "its header {} is unreadable: {error}",
            header_file.display()
        )
    })?;
    let header: TokenCacheHeader = serde_json::from_str(&header_json)
        .map_err(|error| format!("its header {} is invalid: {error}", header_file.display()))?;
    let bytes = std::fs::read(path)
        .map_err(|error| format!("{} is unreadable: {error}", path.display()))?;
    if header.id_bytes != 2 && header.id_bytes != 4 {
        return Err(format!("its header has id_bytes = {}", header.id_bytes));
    }
    if bytes.len() != header.num_tokens * header.id_bytes {
        return Err(format!(
            "{} holds {} bytes, its header promises {} tokens of {} bytes",
            path.display(),
            bytes.len(),
            header.num_tokens,
            header.id_bytes
        ));
    }
    if hex_sha256(&bytes) != header.tokens_sha256 {
        return Err(format!(
            "{} does not match its recorded hash",
            path.display()
        ));
    }
    Ok(Some((header.clone(), decode_ids(&bytes, header.id_bytes))))
}

fn staleness(
    header: &TokenCacheHeader,
    tokenizer: &TextTokenizer,
    corpus_sha256: &str,
    corpus_bytes: usize,
) -> Option<String> {
    if header.format_version != FORMAT_VERSION {
        return Some(format!(
            "it has format version {}, this build writes {FORMAT_VERSION}",
            header.format_version
        ));
    }
    if header.tokenizer_sha256 != tokenizer.sha256() {
        return Some("the tokenizer changed".into());
    }
    if header.corpus_sha256 != corpus_sha256 || header.corpus_bytes != corpus_bytes as u64 {
        return Some("the corpus changed".into());
    }
    None
}

fn encode_ids(tokens: &[u32], id_bytes: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(tokens.len() * id_bytes);
    for &token in tokens {
        if id_bytes == 2 {
            bytes.extend_from_slice(&(token as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&token.to_le_bytes());
        }
    }
    bytes
}

fn decode_ids(bytes: &[u8], id_bytes: usize) -> Vec<u32> {
    if id_bytes == 2 {
        bytes
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]) as u32)
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|quad| u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &Path) -> (PathBuf, TextTokenizer) {
        let corpus = dir.join("text.txt");
        std::fs::write(
            &corpus,
            "to be or not to be, that is the question.\n".repeat(30),
        )
        .unwrap();
        let tokenizer = TextTokenizer::train_bpe(&corpus, 280).unwrap();
        (corpus, tokenizer)
    }

    #[test]
    fn cache_is_built_then_reused_and_holds_the_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, tokenizer) = setup(dir.path());
        let cache_dir = dir.path().join("cache");
        let first = load_or_build(&corpus, &tokenizer, &cache_dir).unwrap();
        assert_eq!(first.status, CacheStatus::Built);
        let text = std::fs::read_to_string(&corpus).unwrap();
        assert_eq!(first.tokens, tokenizer.encode(&text).unwrap());
        assert_eq!(
            std::fs::metadata(&first.path).unwrap().len() as usize,
            2 * first.tokens.len()
        );

        let second = load_or_build(&corpus, &tokenizer, &cache_dir).unwrap();
        assert_eq!(second.status, CacheStatus::Reused);
        assert_eq!(second.tokens, first.tokens);
    }

    #[test]
    fn an_existing_cache_reads_back_only_under_its_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, tokenizer) = setup(dir.path());
        let cache = load_or_build(&corpus, &tokenizer, dir.path()).unwrap();
        assert_eq!(
            read_token_cache(&cache.path, &tokenizer).unwrap(),
            cache.tokens
        );
        let other = TextTokenizer::train_bpe(&corpus, 300).unwrap();
        let error = read_token_cache(&cache.path, &other)
            .unwrap_err()
            .to_string();
        assert!(error.contains("another tokenizer"), "{error}");
        let missing = read_token_cache(&dir.path().join("none.tokens"), &tokenizer).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }

    #[test]
    fn changed_corpus_rebuilds_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, tokenizer) = setup(dir.path());
        let first = load_or_build(&corpus, &tokenizer, dir.path()).unwrap();
        std::fs::write(&corpus, "to be or not.\n").unwrap();
        let second = load_or_build(&corpus, &tokenizer, dir.path()).unwrap();
        assert_eq!(
            second.status,
            CacheStatus::Rebuilt("the corpus changed".into())
        );
        assert!(second.tokens.len() < first.tokens.len());
    }

    #[test]
    fn corrupted_ids_are_rebuilt_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, tokenizer) = setup(dir.path());
        let first = load_or_build(&corpus, &tokenizer, dir.path()).unwrap();
        let mut bytes = std::fs::read(&first.path).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&first.path, bytes).unwrap();
        let second = load_or_build(&corpus, &tokenizer, dir.path()).unwrap();
        assert!(
            matches!(&second.status, CacheStatus::Rebuilt(reason) if reason.contains("hash")),
            "{:?}",
            second.status
        );
        assert_eq!(second.tokens, first.tokens);
    }

    #[test]
    fn missing_corpus_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, tokenizer) = setup(dir.path());
        let error = load_or_build(&dir.path().join("absent.txt"), &tokenizer, dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("absent.txt"), "{error}");
    }

    #[test]
    fn ids_round_trip_through_both_widths() {
        let tokens = vec![0, 1, 65535, 7];
        assert_eq!(decode_ids(&encode_ids(&tokens, 2), 2), tokens);
        let wide = vec![0, 70000, u32::MAX];
        assert_eq!(decode_ids(&encode_ids(&wide, 4), 4), wide);
    }
}
