//! The token cache: a corpus encoded once, as little-endian ids plus a JSON header that records
//! what produced them, so a cache made from another corpus or tokenizer is rebuilt rather than
//! silently reused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, CorpusFiles, encode};
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
    /// How the corpus was read ([`Corpus::reading`]).
    #[serde(default = "text_reading")]
    pub reading: String,
    pub vocab_size: usize,
    /// Bytes per id: 2 (u16) when the vocabulary fits, else 4 (u32).
    pub id_bytes: usize,
    pub num_tokens: usize,
    pub tokens_sha256: String,
    /// sha256 of the `.counted` file beside the ids (one byte per token, 1 where it counts
    /// as a target), for corpora that count only some tokens.
    #[serde(default)]
    pub counted_sha256: Option<String>,
}

fn text_reading() -> String {
    "text".into()
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
    /// Whether each token counts as a target; `None` when all do.
    pub counted: Option<Vec<bool>>,
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
    beside(tokens_path, ".json")
}

fn counted_path(tokens_path: &Path) -> PathBuf {
    beside(tokens_path, ".counted")
}

fn beside(tokens_path: &Path, suffix: &str) -> PathBuf {
    let mut name = tokens_path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Opens the token cache of `corpus`, building or rebuilding it when it is missing or stale.
pub fn load_or_build(
    corpus: &Corpus,
    tokenizer: &TextTokenizer,
    cache_dir: &Path,
) -> Result<TokenCache, DataError> {
    let files = CorpusFiles::read(&corpus.path)?;
    let corpus_sha256 = files.sha256(&corpus.path);
    let reading = corpus.reading();
    let path = cache_path(&corpus.path, tokenizer, cache_dir);

    let stale_reason = match read_cache(&path) {
        Ok(Some(cached)) => {
            match staleness(
                &cached.header,
                tokenizer,
                &corpus_sha256,
                files.bytes(),
                &reading,
            ) {
                None => {
                    return Ok(TokenCache {
                        tokens: cached.tokens,
                        counted: cached.counted,
                        header: cached.header,
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

    let encoded = encode(corpus, &files, tokenizer)?;
    let id_bytes = if tokenizer.vocab_size() <= 1 << 16 {
        2
    } else {
        4
    };
    let bytes = encode_ids(&encoded.tokens, id_bytes);
    let counted_bytes: Option<Vec<u8>> = encoded
        .counted
        .as_ref()
        .map(|counted| counted.iter().map(|&counts| u8::from(counts)).collect());
    let header = TokenCacheHeader {
        format_version: FORMAT_VERSION,
        tokenizer_sha256: tokenizer.sha256().to_string(),
        corpus_sha256,
        corpus_bytes: files.bytes(),
        reading,
        vocab_size: tokenizer.vocab_size(),
        id_bytes,
        num_tokens: encoded.tokens.len(),
        tokens_sha256: hex_sha256(&bytes),
        counted_sha256: counted_bytes.as_deref().map(hex_sha256),
    };
    std::fs::create_dir_all(cache_dir).map_err(|source| DataError::Io {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    write_atomically(&path, &bytes)?;
    if let Some(counted_bytes) = &counted_bytes {
        write_atomically(&counted_path(&path), counted_bytes)?;
    }
    // The header goes last: a cache is only trusted once its header vouches for every file.
    let header_json = serde_json::to_string_pretty(&header).expect("header serializes");
    write_atomically(&header_path(&path), header_json.as_bytes())?;
    Ok(TokenCache {
        tokens: encoded.tokens,
        counted: encoded.counted,
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
    let cached = read_cache(path)
        .map_err(&invalid)?
        .ok_or_else(|| DataError::MissingFile {
            what: "token cache",
            path: path.to_path_buf(),
        })?;
    if cached.header.tokenizer_sha256 != tokenizer.sha256() {
        return Err(invalid(format!(
            "was encoded with another tokenizer (sha256 {})",
            cached.header.tokenizer_sha256
        )));
    }
    Ok(cached.tokens)
}

struct CachedTokens {
    header: TokenCacheHeader,
    tokens: Vec<u32>,
    counted: Option<Vec<bool>>,
}

/// `Ok(None)` when there is no cache; `Err(reason)` when one exists but cannot be trusted.
fn read_cache(path: &Path) -> Result<Option<CachedTokens>, String> {
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
    let counted = match &header.counted_sha256 {
        None => None,
        Some(sha256) => {
            let counted_file = counted_path(path);
            let bytes = std::fs::read(&counted_file)
                .map_err(|error| format!("{} is unreadable: {error}", counted_file.display()))?;
            if bytes.len() != header.num_tokens || &hex_sha256(&bytes) != sha256 {
                return Err(format!(
                    "{} does not match its recorded hash",
                    counted_file.display()
                ));
            }
            Some(bytes.iter().map(|&byte| byte == 1).collect())
        }
    };
    Ok(Some(CachedTokens {
        tokens: decode_ids(&bytes, header.id_bytes),
        counted,
        header,
    }))
}

fn staleness(
    header: &TokenCacheHeader,
    tokenizer: &TextTokenizer,
    corpus_sha256: &str,
    corpus_bytes: u64,
    reading: &str,
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
    if header.corpus_sha256 != corpus_sha256 || header.corpus_bytes != corpus_bytes {
        return Some("the corpus changed".into());
    }
    if header.reading != reading {
        return Some(format!(
            "the corpus is read as {reading}, the cache as {}",
            header.reading
        ));
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
        let first = load_or_build(&Corpus::text(&corpus), &tokenizer, &cache_dir).unwrap();
        assert_eq!(first.status, CacheStatus::Built);
        let text = std::fs::read_to_string(&corpus).unwrap();
        assert_eq!(first.tokens, tokenizer.encode(&text).unwrap());
        assert_eq!(
            std::fs::metadata(&first.path).unwrap().len() as usize,
            2 * first.tokens.len()
        );

        let second = load_or_build(&Corpus::text(&corpus), &tokenizer, &cache_dir).unwrap();
        assert_eq!(second.status, CacheStatus::Reused);
        assert_eq!(second.tokens, first.tokens);
    }

    #[test]
    fn an_existing_cache_reads_back_only_under_its_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, tokenizer) = setup(dir.path());
        let cache = load_or_build(&Corpus::text(&corpus), &tokenizer, dir.path()).unwrap();
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
        let first = load_or_build(&Corpus::text(&corpus), &tokenizer, dir.path()).unwrap();
        std::fs::write(&corpus, "to be or not.\n").unwrap();
        let second = load_or_build(&Corpus::text(&corpus), &tokenizer, dir.path()).unwrap();
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
        let first = load_or_build(&Corpus::text(&corpus), &tokenizer, dir.path()).unwrap();
        let mut bytes = std::fs::read(&first.path).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&first.path, bytes).unwrap();
        let second = load_or_build(&Corpus::text(&corpus), &tokenizer, dir.path()).unwrap();
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
        let error = load_or_build(
            &Corpus::text(&dir.path().join("absent.txt")),
            &tokenizer,
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("absent.txt"), "{error}");
    }

    #[test]
    fn counted_targets_are_cached_and_another_reading_rebuilds() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = crate::testing::chatml_tokenizer(dir.path());
        let path = dir.path().join("chat.jsonl");
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "fine thanks"},
        ]});
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let chat = Corpus {
            path: path.clone(),
            format: crate::CorpusFormat::Chat,
            text_field: String::new(),
        };
        let first = load_or_build(&chat, &tokenizer, dir.path()).unwrap();
        assert_eq!(first.status, CacheStatus::Built);
        let counted = first.counted.clone().unwrap();
        assert!(counted.contains(&true) && counted.contains(&false));
        let second = load_or_build(&chat, &tokenizer, dir.path()).unwrap();
        assert_eq!(second.status, CacheStatus::Reused);
        assert_eq!(second.counted, first.counted);

        let as_text = load_or_build(&Corpus::text(&path), &tokenizer, dir.path()).unwrap();
        assert!(
            matches!(&as_text.status, CacheStatus::Rebuilt(reason) if reason.contains("read as text")),
            "{:?}",
            as_text.status
        );
        assert_eq!(as_text.counted, None);
    }

    #[test]
    fn ids_round_trip_through_both_widths() {
        let tokens = vec![0, 1, 65535, 7];
        assert_eq!(decode_ids(&encode_ids(&tokens, 2), 2), tokens);
        let wide = vec![0, 70000, u32::MAX];
        assert_eq!(decode_ids(&encode_ids(&wide, 4), 4), wide);
    }
}
