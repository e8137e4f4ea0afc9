//! The corpora users bring: a text file, a folder of files, JSON Lines with a text field, and
//! chat JSON Lines rendered with the tokenizer's chat template. Each file, line or conversation
//! is a document; documents are joined by the tokenizer's end-of-sequence token. Chat marks the
//! tokens of the assistant's turns, the only ones a loss counts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::{ChatTemplate, Message};
use crate::{DataError, TextTokenizer};

/// How the corpus's files are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// UTF-8 text; each file is one document.
    #[default]
    Text,
    /// JSON Lines; each line is an object whose text field is one document.
    Jsonl,
    /// JSON Lines; each line is an object with `messages`, a list of `role`/`content` turns,
    /// rendered with the tokenizer's chat template. Only the assistant's turns count as targets.
    Chat,
}

/// Where a corpus is and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    /// A file, or a folder whose files (recursively, hidden ones left out) are read in the
    /// order of their paths.
    pub path: PathBuf,
    pub format: CorpusFormat,
    /// The field of a JSON Lines object that holds its text.
    pub text_field: String,
}

impl Corpus {
    /// A text file or a folder of text files.
    pub fn text(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            format: CorpusFormat::Text,
            text_field: String::new(),
        }
    }

    /// What decides the tokens besides the files and the tokenizer, for the token cache.
    pub fn reading(&self) -> String {
        match self.format {
            CorpusFormat::Text => "text".into(),
            CorpusFormat::Jsonl => format!("jsonl, text field {:?}", self.text_field),
            CorpusFormat::Chat => "chat, assistant tokens counted".into(),
        }
    }
}

/// A corpus's files: paths and bytes, in reading order.
pub struct CorpusFiles {
    files: Vec<(PathBuf, Vec<u8>)>,
    single_file: bool,
}

impl CorpusFiles {
    /// Reads every file of `corpus`.
    pub fn read(corpus: &Path) -> Result<Self, DataError> {
        let io_error = |path: &Path, source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => DataError::MissingFile {
                what: "corpus",
                path: path.to_path_buf(),
            },
            _ => DataError::Io {
                path: path.to_path_buf(),
                source,
            },
        };
        let metadata = std::fs::metadata(corpus).map_err(|source| io_error(corpus, source))?;
        if !metadata.is_dir() {
            let bytes = std::fs::read(corpus).map_err(|source| io_error(corpus, source))?;
            return Ok(Self {
                files: vec![(corpus.to_path_buf(), bytes)],
                single_file: true,
            });
        }
        let mut paths = Vec::new();
        let mut folders = vec![corpus.to_path_buf()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).map_err(|source| io_error(&folder, source))? {
                let entry = entry.map_err(|source| io_error(&folder, source))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                if path.is_dir() {
                    folders.push(path);
                } else {
                    paths.push(path);
                }
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(DataError::Corpus {
                path: corpus.to_path_buf(),
                message: "the folder holds no files".into(),
            });
        }
        let files = paths
            .into_iter()
            .map(|path| {
                let bytes = std::fs::read(&path).map_err(|source| io_error(&path, source))?;
                Ok((path, bytes))
            })
            .collect::<Result<_, DataError>>()?;
        Ok(Self {
            files,
            single_file: false,
        })
    }

    /// sha256 of a single file's bytes; for a folder, of each file's path (relative to the
    /// folder), length and bytes, so renaming or reordering files changes it too.
    pub fn sha256(&self, root: &Path) -> String {
        if self.single_file {
            return crate::hex_sha256(&self.files[0].1);
        }
        let mut hasher = Sha256::new();
        for (path, bytes) in &self.files {
            let name = path.strip_prefix(root).unwrap_or(path);
            hasher.update(name.to_string_lossy().as_bytes());
            hasher.update([0]);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        crate::tokenizer::hex_digest(hasher)
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, bytes)| bytes.len() as u64).sum()
    }
}

/// A corpus as token ids, and for chat which of them count as targets.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedCorpus {
    pub tokens: Vec<u32>,
    /// `counted[i]`: whether predicting token `i` counts in the loss; `None` when every token
    /// does.
    pub counted: Option<Vec<bool>>,
}

/// Encodes `files` as `corpus` says.
pub fn encode(
    corpus: &Corpus,
    files: &CorpusFiles,
    tokenizer: &TextTokenizer,
) -> Result<EncodedCorpus, DataError> {
    let mut documents: Vec<(Vec<u32>, Option<Vec<bool>>)> = Vec::new();
    let template = match corpus.format {
        CorpusFormat::Chat => Some(ChatTemplate::of(tokenizer)?),
        _ => None,
    };
    for (path, bytes) in &files.files {
        let text = std::str::from_utf8(bytes).map_err(|_| DataError::NotUtf8(path.clone()))?;
        match corpus.format {
            CorpusFormat::Text => documents.push((tokenizer.encode(text)?, None)),
            CorpusFormat::Jsonl | CorpusFormat::Chat => {
                for (index, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let malformed = |message: String| DataError::Line {
                        path: path.clone(),
                        line: index + 1,
                        message,
                    };
                    let object: serde_json::Value = serde_json::from_str(line)
                        .map_err(|error| malformed(format!("is not JSON: {error}")))?;
                    documents.push(match &template {
                        None => {
                            let text =
                                object[corpus.text_field.as_str()].as_str().ok_or_else(|| {
                                    malformed(format!(
                                        "has no string field {:?}",
                                        corpus.text_field
                                    ))
                                })?;
                            (tokenizer.encode(text)?, None)
                        }
                        Some(template) => {
                            let messages = conversation(&object).map_err(&malformed)?;
                            let (tokens, counted) =
                                encode_conversation(template, tokenizer, &messages)
                                    .map_err(|error| malformed(error.to_string()))?;
                            (tokens, Some(counted))
                        }
                    });
                }
            }
        }
    }
    join(documents, tokenizer, &corpus.path)
}

/// The turns of a chat line: `{"messages": [{"role": ..., "content": ...}, ...]}`.
fn conversation(object: &serde_json::Value) -> Result<Vec<Message>, String> {
    let turns = object["messages"]
        .as_array()
        .ok_or("has no list field \"messages\"")?;
    turns
        .iter()
        .enumerate()
        .map(|(index, turn)| {
            let field = |name: &str| {
                turn[name]
                    .as_str()
                    .ok_or_else(|| format!("message {index} has no string field {name:?}"))
            };
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

/// A conversation's tokens and which are the assistant's: each assistant turn is where the
/// rendering of the turns up to it extends the rendering of the turns before it with the
/// generation prompt, as transformers' assistant masks are found; its closing token counts,
/// so the model learns to end its turn.
fn encode_conversation(
    template: &ChatTemplate<'_>,
    tokenizer: &TextTokenizer,
    messages: &[Message],
) -> Result<(Vec<u32>, Vec<bool>), DataError> {
    let rendered = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..index], true)?;
        let through = template.render(&messages[..=index], false)?;
        if !through.starts_with(&before) || !rendered.starts_with(&through) {
            return Err(DataError::Chat(format!(
                "the chat template does not render message {index} (the assistant's) as an \
                 extension of the turns before it, so its tokens cannot be told apart"
            )));
        }
        spans.push(before.len()..through.len());
    }
    let (tokens, starts) = tokenizer.encode_with_offsets(&rendered)?;
    let counted = starts
        .iter()
        .map(|start| spans.iter().any(|span| span.contains(start)))
        .collect();
    Ok((tokens, counted))
}

/// The documents in order, an end-of-sequence token between each two (never counted).
fn join(
    documents: Vec<(Vec<u32>, Option<Vec<bool>>)>,
    tokenizer: &TextTokenizer,
    corpus: &Path,
) -> Result<EncodedCorpus, DataError> {
    let separator = if documents.len() > 1 {
        Some(tokenizer.eos_token_id().ok_or_else(|| {
            DataError::Corpus {
                path: corpus.to_path_buf(),
                message: "holds several documents, but the tokenizer has no end-of-sequence \
                      token to separate them"
                    .into(),
            }
        })?)
    } else {
        None
    };
    let masked = documents.iter().any(|(_, counted)| counted.is_some());
    let mut tokens = Vec::new();
    let mut counted = Vec::new();
    for (index, (document_tokens, document_counted)) in documents.into_iter().enumerate() {
        if index > 0
            && let Some(separator) = separator
        {
            tokens.push(separator);
            counted.push(false);
        }
        let length = document_tokens.len();
        tokens.extend(document_tokens);
        counted.extend(document_counted.unwrap_or_else(|| vec![true; length]));
    }
    Ok(EncodedCorpus {
        tokens,
        counted: masked.then_some(counted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::chatml_tokenizer;

    fn encode_folder(
        dir: &Path,
        format: CorpusFormat,
        tokenizer: &TextTokenizer,
    ) -> Result<EncodedCorpus, DataError> {
        let corpus = Corpus {
            path: dir.to_path_buf(),
            format,
            text_field: "text".into(),
        };
        encode(&corpus, &CorpusFiles::read(dir)?, tokenizer)
    }

    #[test]
    fn a_folder_is_its_files_in_path_order_joined_by_the_end_of_sequence_token() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = chatml_tokenizer(dir.path());
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(corpus.join("b")).unwrap();
        std::fs::write(corpus.join("b/two.txt"), "how are you?").unwrap();
        std::fs::write(corpus.join("a.txt"), "hello there").unwrap();
        std::fs::write(corpus.join(".hidden"), "never read").unwrap();
        let encoded = encode_folder(&corpus, CorpusFormat::Text, &tokenizer).unwrap();
        let eos = tokenizer.eos_token_id().unwrap();
        let expected = [
            tokenizer.encode("hello there").unwrap(),
            vec![eos],
            tokenizer.encode("how are you?").unwrap(),
        ]
        .concat();
        assert_eq!(encoded.tokens, expected);
        assert_eq!(encoded.counted, None);

        let files = CorpusFiles::read(&corpus).unwrap();
        std::fs::rename(corpus.join("a.txt"), corpus.join("c.txt")).unwrap();
        let renamed = CorpusFiles::read(&corpus).unwrap();
        assert_ne!(files.sha256(&corpus), renamed.sha256(&corpus));
        assert_eq!(files.bytes(), renamed.bytes());
    }

    #[test]
    fn json_lines_give_one_document_per_line_and_name_a_malformed_line() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = chatml_tokenizer(dir.path());
        let corpus = dir.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let file = corpus.join("rows.jsonl");
        std::fs::write(
            &file,
            "{\"text\": \"hello there\", \"id\": 1}\n\n{\"text\": \"fine thanks\"}\n",
        )
        .unwrap();
        let encoded = encode_folder(&corpus, CorpusFormat::Jsonl, &tokenizer).unwrap();
        let expected = [
            tokenizer.encode("hello there").unwrap(),
            vec![tokenizer.eos_token_id().unwrap()],
            tokenizer.encode("fine thanks").unwrap(),
        ]
        .concat();
        assert_eq!(encoded.tokens, expected);

        std::fs::write(&file, "{\"text\": \"hello\"}\n{\"body\": \"hello\"}\n").unwrap();
        let error = encode_folder(&corpus, CorpusFormat::Jsonl, &tokenizer)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rows.jsonl, line 2"), "{error}");
        assert!(error.contains("\"text\""), "{error}");
        std::fs::write(&file, "{\"text\": \"hello\"}\nnot json\n").unwrap();
        let error = encode_folder(&corpus, CorpusFormat::Jsonl, &tokenizer)
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 2: is not JSON"), "{error}");
    }

    #[test]
    fn chat_counts_exactly_the_assistant_turns_and_their_closing_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = chatml_tokenizer(dir.path());
        let corpus = dir.path().join("chat.jsonl");
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "fine thanks"},
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine"},
        ]});
        std::fs::write(&corpus, format!("{line}\n{line}\n")).unwrap();
        let encoded = encode_folder(&corpus, CorpusFormat::Chat, &tokenizer).unwrap();
        let counted = encoded.counted.clone().unwrap();
        assert_eq!(counted.len(), encoded.tokens.len());
        let mut counted_text = Vec::new();
        let mut run = Vec::new();
        for (&token, &count) in encoded.tokens.iter().zip(&counted) {
            if count {
                run.push(token);
            } else if !run.is_empty() {
                counted_text.push(tokenizer.decode(&std::mem::take(&mut run)).unwrap());
            }
        }
        counted_text.push(tokenizer.decode(&run).unwrap());
        // Both conversations, each with its two assistant turns; every end of turn but the
        // assistant's, the separator between conversations and all other turns are left out.
        assert_eq!(
            counted_text,
            ["fine thanks<|im_end|>\n", "fine<|im_end|>\n"].repeat(2)
        );
        let template = ChatTemplate::of(&tokenizer).unwrap();
        let messages = conversation(&line).unwrap();
        let one = tokenizer
            .encode(&template.render(&messages, false).unwrap())
            .unwrap();
        let eos = tokenizer.eos_token_id().unwrap();
        assert_eq!(encoded.tokens, [one.clone(), vec![eos], one].concat());

        std::fs::write(&corpus, "{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
        let error = encode_folder(&corpus, CorpusFormat::Chat, &tokenizer)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("chat.jsonl, line 1: message 0 has no string field \"content\""),
            "{error}"
        );
    }
}
