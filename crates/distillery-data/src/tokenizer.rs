use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::{DataError, write_atomically};

/// The special token byte-level BPE tokenizers trained here reserve for end of text (GPT-2's).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Names other tokenizers use for their end-of-sequence token, tried in order.
const EOS_CANDIDATES: [&str; 3] = [END_OF_TEXT, "</s>", "<|end_of_text|>"];

/// The settings Hugging Face keeps beside `tokenizer.json` in `tokenizer_config.json`: which
/// tokens begin and end a sequence, whether a prompt starts with the beginning one, and the
/// chat template.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSettings {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
}

/// The name of the settings file Hugging Face keeps beside `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

impl TokenizerSettings {
    /// The `tokenizer_config.json` beside `tokenizer`, when there is one.
    fn beside(tokenizer: &Path) -> Result<Option<Self>, DataError> {
        let path = tokenizer.with_file_name(TOKENIZER_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DataError::Io { path, source }),
        };
        let invalid = |message: String| DataError::Tokenizer {
            path: path.clone(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        // Transformers writes a special token as its text or as an `AddedToken` object.
        let token = |key: &str| -> Result<Option<String>, DataError> {
            match &json[key] {
                serde_json::Value::Null => Ok(None),
                serde_json::Value::String(text) => Ok(Some(text.clone())),
                other => other["content"]
                    .as_str()
                    .map(|text| Some(text.to_string()))
                    .ok_or_else(|| invalid(format!("`{key}` is not a token"))),
            }
        };
        // A list of named templates: the default one serves chat.
        let chat_template = match &json["chat_template"] {
            serde_json::Value::Null => None,
            serde_json::Value::String(template) => Some(template.clone()),
            serde_json::Value::Array(templates) => templates
                .iter()
                .find(|entry| entry["name"] == "default")
                .and_then(|entry| entry["template"].as_str())
                .map(str::to_string),
            _ => return Err(invalid("`chat_template` is not a template".into())),
        };
        Ok(Some(Self {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            add_bos_token: json["add_bos_token"].as_bool().unwrap_or(false),
            chat_template,
        }))
    }
}

/// A Hugging Face tokenizer plus the hash that identifies it in token caches and checkpoints.
pub struct TextTokenizer {
    inner: Tokenizer,
    sha256: String,
    settings: Option<TokenizerSettings>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads any Hugging Face `tokenizer.json`, and the `tokenizer_config.json` beside it when
    /// there is one.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        if !path.is_file() {
            return Err(DataError::MissingFile {
                what: "tokenizer",
                path: path.to_path_buf(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|error| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
        let mut tokenizer = Self::from_tokenizer(inner, path)?;
        tokenizer.settings = TokenizerSettings::beside(path)?;
        for (key, token) in tokenizer.settings.iter().flat_map(|settings| {
            [
                ("bos_token", &settings.bos_token),
                ("eos_token", &settings.eos_token),
            ]
        }) {
            if let Some(token) = token
                && tokenizer.inner.token_to_id(token).is_none()
            {
                return Err(DataError::Tokenizer {
                    path: path.with_file_name(TOKENIZER_CONFIG_FILE),
                    message: format!("`{key}` \"{token}\" is not in the vocabulary"),
                });
            }
        }
        Ok(tokenizer)
    }

    /// Trains a byte-level BPE tokenizer (GPT-2's pre-tokenizer, no normalizer) on a text file.
    pub fn train_bpe(corpus: &Path, vocab_size: usize) -> Result<Self, DataError> {
        if !corpus.is_file() {
            return Err(DataError::MissingFile {
                what: "corpus",
                path: corpus.to_path_buf(),
            });
        }
        let alphabet = ByteLevel::alphabet();
        let minimum = alphabet.len() + 1;
        if vocab_size < minimum {
            return Err(DataError::VocabTooSmall {
                requested: vocab_size,
                minimum,
            });
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(alphabet.into_iter().collect())
            .build()
            .into();
        let byte_level = ByteLevel::new(false, false, true);
        let mut inner = Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));
        let corpus_name = corpus.to_string_lossy().into_owned();
        inner
            .train_from_files(&mut trainer, vec![corpus_name])
            .map_err(|error| DataError::Tokenizer {
                path: corpus.to_path_buf(),
                message: format!("training failed: {error}"),
            })?;
        Self::from_tokenizer(inner, corpus)
    }

    fn from_tokenizer(inner: Tokenizer, origin: &Path) -> Result<Self, DataError> {
        let canonical = inner
            .to_string(false)
            .map_err(|error| DataError::Tokenizer {
                path: origin.to_path_buf(),
                message: error.to_string(),
            })?;
        let sha256 = hex_sha256(canonical.as_bytes());
        Ok(Self {
            inner,
            sha256,
            settings: None,
        })
    }

    /// Writes `tokenizer.json` (pretty-printed, as Hugging Face does), replacing any old file
    /// only once the new one is complete.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|error| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: error.to_string(),
            })?;
        write_atomically(path, json.as_bytes())
    }

    /// SHA-256 of the tokenizer's canonical (compact) JSON: two files that differ only in
    /// formatting are the same tokenizer.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Vocabulary size including added (special) tokens: the model's minimum `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-sequence token: `tokenizer_config.json`'s, or the first of the usual names
    /// the vocabulary has.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self
            .settings
            .as_ref()
            .and_then(|settings| settings.eos_token.as_deref())
        {
            Some(token) => self.inner.token_to_id(token),
            None => EOS_CANDIDATES
                .iter()
                .find_map(|token| self.inner.token_to_id(token)),
        }
    }

    /// The beginning-of-sequence token `tokenizer_config.json` names.
    pub fn bos_token_id(&self) -> Option<u32> {
        let token = self.settings.as_ref()?.bos_token.as_deref()?;
        self.inner.token_to_id(token)
    }

    /// `tokenizer_config.json`'s settings, when the tokenizer has one.
    pub fn settings(&self) -> Option<&TokenizerSettings> {
        self.settings.as_ref()
    }

    /// Token ids of a prompt: the text, after the beginning-of-sequence token when the
    /// tokenizer's settings add one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let mut ids = Vec::new();
        if self
            .settings
            .as_ref()
            .is_some_and(|settings| settings.add_bos_token)
            && let Some(bos) = self.bos_token_id()
        {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Whether `id` is a special (added, control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|token| token.special)
    }

    /// The text of token `id` as the vocabulary spells it (byte-level tokens in their mapped
    /// form), or `None` outside the vocabulary.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| DataError::Encode(error.to_string()))
    }

    /// The ids of `text` and the byte offset in `text` where each token starts.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), DataError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|error| DataError::Encode(error.to_string()))?;
        let starts = encoding
            .get_offsets()
            .iter()
            .map(|&(start, _)| start)
            .collect();
        Ok((encoding.get_ids().to_vec(), starts))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|error| DataError::Encode(error.to_string()))
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The sha256 of `bytes` as lowercase hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    hex_digest(Sha256::new().chain_update(bytes))
}

/// The lowercase hex of what `hasher` has been fed.
pub fn hex_digest(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Where a tokenizer trained for `corpus` is conventionally written.
pub fn default_tokenizer_path(corpus: &Path, vocab_size: usize) -> PathBuf {
    let stem = corpus
        .file_stem()
        .map_or_else(|| "corpus".into(), |stem| stem.to_string_lossy());
    corpus.with_file_name(format!("{stem}-bpe-{vocab_size}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(dir: &Path) -> PathBuf {
        let path = dir.join("corpus.txt");
        let text = "the quick brown fox jumps over the lazy dog.\n".repeat(40)
            + &"ROMEO: wherefore art thou, Romeo?\n".repeat(40);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn trained_tokenizer_round_trips_text_and_reloads_with_same_hash() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = TextTokenizer::train_bpe(&corpus(dir.path()), 300).unwrap();
        assert_eq!(tokenizer.vocab_size(), 300);
        assert_eq!(tokenizer.eos_token_id(), Some(0));

        let text = "ROMEO: the quick fox, wherefore?\n\n  Unseen wörds ✓";
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        // Merges learned from the corpus make frequent words shorter than their bytes.
        assert!(tokenizer.encode("wherefore").unwrap().len() < "wherefore".len());

        let path = dir.path().join("tok.json");
        tokenizer.save(&path).unwrap();
        let reloaded = TextTokenizer::load(&path).unwrap();
        assert_eq!(reloaded.sha256(), tokenizer.sha256());
        assert_eq!(reloaded.encode(text).unwrap(), ids);
    }

    #[test]
    fn too_small_vocabulary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = TextTokenizer::train_bpe(&corpus(dir.path()), 100).unwrap_err();
        assert!(error.to_string().contains("257"), "{error}");
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let error = TextTokenizer::load(&missing).unwrap_err().to_string();
        assert!(error.contains("nope.json"), "{error}");

        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, "{\"model\": 3").unwrap();
        let error = TextTokenizer::load(&broken).unwrap_err().to_string();
        assert!(error.contains("broken.json"), "{error}");
    }
}
