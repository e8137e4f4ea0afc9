//! Tokenizers between GGUF metadata (`tokenizer.ggml.*`) and Hugging Face's `tokenizer.json`
//! and `tokenizer_config.json`.
//!
//! GGUF names the tokenizer model (`gpt2`: byte-level BPE from tokens and merges; `llama`:
//! SentencePiece BPE with byte fallback, from tokens and scores) and, for `gpt2`, the
//! pre-tokenizer by name (`tokenizer.ggml.pre`); llama.cpp splits text with that name's
//! regular expressions, one after the other, keeping unmatched stretches as pieces. The same
//! splits are `Split` pre-tokenizers with the `Isolated` behaviour in `tokenizers`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value as Json, json};

use super::container::{GgufFile, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tokenizer: {0}")]
pub struct VocabError(pub String);

fn error<T>(message: impl Into<String>) -> Result<T, VocabError> {
    Err(VocabError(message.into()))
}

/// GGUF token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

const GPT2_WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_WORDS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_WORDS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The regular expressions Llama 3's and Qwen 2's `tokenizer.json` write, which llama.cpp
/// spells without the case-insensitive group.
const LLAMA3_WORDS_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_WORDS_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A pre-tokenizer llama.cpp knows by name: its regular expressions, applied in order.
struct PreTokenizer {
    names: &'static [&'static str],
    regexes: &'static [&'static str],
    /// Whether a whole word found in the vocabulary is taken as one token before any merge
    /// (Llama 3's BPE).
    ignore_merges: bool,
}

const PRE_TOKENIZERS: [PreTokenizer; 5] = [
    PreTokenizer {
        names: &["default"],
        regexes: &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_WORDS,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["gpt-2", "phi-2", "mpt", "olmo"],
        regexes: &[GPT2_WORDS],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["llama-bpe", "llama3", "llama-v3"],
        regexes: &[LLAMA3_WORDS],
        ignore_merges: true,
    },
    PreTokenizer {
        names: &["qwen2"],
        regexes: &[QWEN2_WORDS],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
        ],
        regexes: &[r"\p{N}", GPT2_WORDS],
        ignore_merges: false,
    },
];

fn pre_tokenizer(name: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|pre| pre.names.contains(&name))
}

/// The names of the pre-tokenizers distillery reads, for error messages.
fn known_pre_tokenizers() -> String {
    PRE_TOKENIZERS
        .iter()
        .flat_map(|pre| pre.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The `pre_tokenizer` of a `tokenizer.json` for llama.cpp's pre-tokenizer `name`.
fn pre_tokenizer_json(pre: &PreTokenizer) -> Json {
    let mut steps: Vec<Json> = pre.regexes.iter().map(|regex| split(regex)).collect();
    steps.push(byte_level(false));
    json!({"type": "Sequence", "pretokenizers": steps})
}

/// llama.cpp's name of the pre-tokenizer a `tokenizer.json` describes: one distillery wrote,
/// or one of the forms Hugging Face's own files take (GPT-2's byte level, SmolLM's digits
/// then byte level, Llama 3's and Qwen 2's regular expressions).
fn pre_tokenizer_name(pre_tokenizer: &Json) -> Option<&'static str> {
    for pre in &PRE_TOKENIZERS {
        if *pre_tokenizer == pre_tokenizer_json(pre) {
            return Some(pre.names[0]);
        }
    }
    let is_byte_level = |step: &Json, use_regex: bool| {
        step["type"] == "ByteLevel" && step["use_regex"].as_bool().unwrap_or(true) == use_regex
    };
    if is_byte_level(pre_tokenizer, true) {
        return Some("gpt-2");
    }
    let steps = pre_tokenizer["pretokenizers"].as_array()?;
    match steps.as_slice() {
        [digits, level]
            if digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && is_byte_level(level, true) =>
        {
            Some("smollm")
        }
        [words, level] if words["type"] == "Split" && is_byte_level(level, false) => {
            match words["pattern"]["Regex"].as_str()? {
                LLAMA3_WORDS_HF | LLAMA3_WORDS => Some("llama-bpe"),
                QWEN2_WORDS_HF | QWEN2_WORDS => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A tokenizer read from a GGUF file, as Hugging Face files.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: Json,
    /// `tokenizer_config.json`: the special tokens, whether BOS and EOS are added, and the
    /// chat template.
    pub config: Json,
}

fn metadata_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>, VocabError> {
    match file.value(key) {
        None => Ok(None),
        Some(value) => match value.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            // llama.cpp writes -1 (as an unsigned integer's wrap-around) for "none".
            Some(id) if id == u64::from(u32::MAX) => Ok(None),
            _ => error(format!(
                "`{key}` = {value:?} is not a token id of the {vocab}-token vocabulary"
            )),
        },
    }
}

/// Rebuilds the tokenizer a GGUF file describes.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<TokenizerFiles, VocabError> {
    let string = |key: &str| file.value(key).and_then(Value::as_str);
    let Some(model) = string("tokenizer.ggml.model") else {
        return error("the file has no `tokenizer.ggml.model`");
    };
    let tokens = file
        .value("tokenizer.ggml.tokens")
        .and_then(Value::as_strings)
        .ok_or_else(|| VocabError("`tokenizer.ggml.tokens` is missing or not strings".into()))?;
    let vocab = tokens.len();
    let token_types: Vec<i32> = match file.value("tokenizer.ggml.token_type") {
        None => vec![token_type::NORMAL; vocab],
        Some(value) => value
            .as_integers()
            .filter(|types| types.len() == vocab)
            .map(|types| types.into_iter().map(|t| t as i32).collect())
            .ok_or_else(|| {
                VocabError(format!(
                    "`tokenizer.ggml.token_type` is not {vocab} integers, one per token"
                ))
            })?,
    };
    let id = |key: &str| metadata_id(file, key, vocab);
    let specials = Specials {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
    };
    let flag = |key: &str, default: bool| match file.value(key) {
        None => Ok(default),
        Some(value) => value
            .as_bool()
            .ok_or_else(|| VocabError(format!("`{key}` is not a bool"))),
    };
    let (model_json, pre_json, normalizer, decoder, default_bos) = match model {
        "gpt2" => {
            let pre_name = string("tokenizer.ggml.pre").unwrap_or("default");
            let Some(pre) = pre_tokenizer(pre_name) else {
                return error(format!(
                    "pre-tokenizer `tokenizer.ggml.pre` = \"{pre_name}\" is not one distillery \
                     reads ({})",
                    known_pre_tokenizers()
                ));
            };
            let merges = file
                .value("tokenizer.ggml.merges")
                .and_then(Value::as_strings)
                .ok_or_else(|| {
                    VocabError("`tokenizer.ggml.merges` is missing or not strings".into())
                })?;
            let merges = merges
                .iter()
                .map(|merge| {
                    merge
                        .split_once(' ')
                        .map(|(left, right)| json!([left, right]))
                        .ok_or_else(|| VocabError(format!("merge \"{merge}\" is not two tokens")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre.ignore_merges,
                "vocab": vocab_json(&tokens), "merges": merges,
            });
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (model, pre_tokenizer_json(pre), Json::Null, decoder, false)
        }
        "llama" => {
            let scores = file
                .value("tokenizer.ggml.scores")
                .and_then(Value::as_floats)
                .filter(|scores| scores.len() == vocab)
                .ok_or_else(|| {
                    VocabError(format!(
                        "a SentencePiece (`llama`) vocabulary needs `tokenizer.ggml.scores`, \
                         {vocab} floats"
                    ))
                })?;
            let Some(unk) = specials.unk.or_else(|| {
                tokens
                    .iter()
                    .position(|&t| t == "<unk>")
                    .map(|id| id as u32)
            }) else {
                return error("a SentencePiece vocabulary needs an unknown token");
            };
            let model = json!({
                "type": "BPE", "dropout": null, "unk_token": tokens[unk as usize],
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab_json(&tokens),
                "merges": sentencepiece_merges(&tokens, &token_types, &scores)?
                    .into_iter()
                    .map(|(left, right)| json!([tokens[left], tokens[right]]))
                    .collect::<Vec<_>>(),
            });
            let mut normalizers = Vec::new();
            if flag("tokenizer.ggml.add_space_prefix", true)? {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]});
            let normalizer = json!({"type": "Sequence", "normalizers": normalizers});
            (model, Json::Null, normalizer, decoder, true)
        }
        other => {
            return error(format!(
                "tokenizer model `tokenizer.ggml.model` = \"{other}\" is not one distillery reads \
                 (gpt2, llama)"
            ));
        }
    };
    let add_bos = flag("tokenizer.ggml.add_bos_token", default_bos)?;
    let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
    let added_tokens: Vec<Json> = token_types
        .iter()
        .enumerate()
        .filter(|(_, kind)| matches!(**kind, token_type::CONTROL | token_type::USER_DEFINED))
        .map(|(id, &kind)| {
            json!({
                "id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == token_type::CONTROL,
            })
        })
        .collect();
    let post_processor = post_processor(&tokens, &specials, add_bos, add_eos)?;
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_json,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    });
    let token = |id: Option<u32>| id.map(|id| tokens[id as usize]);
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": token(specials.bos),
        "eos_token": token(specials.eos),
        "unk_token": token(specials.unk),
        "pad_token": token(specials.pad),
    });
    if let Some(template) = string("tokenizer.chat_template") {
        config["chat_template"] = template.into();
    }
    Ok(TokenizerFiles { tokenizer, config })
}

struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

fn vocab_json(tokens: &[&str]) -> Json {
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        // A token spelled twice keeps its first id, as llama.cpp's text-to-id map does.
        vocab.entry(token.to_string()).or_insert(json!(id));
    }
    Json::Object(vocab)
}

/// BOS and EOS added around every encoding, when the file says so.
fn post_processor(
    tokens: &[&str],
    specials: &Specials,
    add_bos: bool,
    add_eos: bool,
) -> Result<Json, VocabError> {
    if !add_bos && !add_eos {
        return Ok(
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        );
    }
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    let mut add = |which: &str, id: Option<u32>, single: &mut Vec<Json>| {
        let Some(id) = id else {
            return error(format!("the file adds a {which} token but names none"));
        };
        let token = tokens[id as usize];
        single.push(json!({"SpecialToken": {"id": token, "type_id": 0}}));
        special_tokens.insert(
            token.to_string(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
        Ok(())
    };
    if add_bos {
        add("BOS", specials.bos, &mut single)?;
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if add_eos {
        add("EOS", specials.eos, &mut single)?;
    }
    let pair: Vec<Json> = single
        .iter()
        .cloned()
        .chain(single.iter().map(|item| match item.get("Sequence") {
            Some(_) => json!({"Sequence": {"id": "B", "type_id": 1}}),
            None => item.clone(),
        }))
        .collect();
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}),
    )
}

/// The longest piece split into merges: SentencePiece's pieces are at most 16 characters by
/// default, and a longer one costs time quadratic in its length.
const MAX_SPLIT_BYTES: usize = 256;

/// The merges of a SentencePiece BPE vocabulary, as pairs of token ids: every split of a
/// normal or user-defined token into two tokens, the highest-scoring merged token first, as
/// llama.cpp merges the adjacent pair whose concatenation scores highest. A vocabulary that
/// splits into far more merges than real ones do is refused rather than built.
fn sentencepiece_merges(
    tokens: &[&str],
    token_types: &[i32],
    scores: &[f32],
) -> Result<Vec<(usize, usize)>, VocabError> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(id, &token)| (token, id))
        .collect();
    let limit = 16 * tokens.len() + (1 << 16);
    let mut merges = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let mergeable = matches!(
            token_types[id],
            token_type::NORMAL | token_type::USER_DEFINED
        );
        if !mergeable || token.len() > MAX_SPLIT_BYTES {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((scores[id], id, l, r));
            }
        }
        if merges.len() > limit {
            return error(format!(
                "the SentencePiece vocabulary splits into more than {limit} merges"
            ));
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    Ok(merges
        .into_iter()
        .map(|(_, _, left, right)| (left, right))
        .collect())
}

/// What a tokenizer contributes to a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocabulary {
    /// `gpt2` or `llama`.
    pub model: &'static str,
    /// llama.cpp's pre-tokenizer name, for `gpt2`.
    pub pre: Option<&'static str>,
    /// Token strings by id.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// BPE merges as `"left right"`, in priority order (`gpt2`).
    pub merges: Vec<String>,
    /// Token scores (`llama`): higher merges first.
    pub scores: Option<Vec<f32>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub chat_template: Option<String>,
}

impl GgufVocabulary {
    /// The `tokenizer.*` metadata entries.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let mut metadata = vec![(
            "tokenizer.ggml.model".to_string(),
            Value::String(self.model.into()),
        )];
        if let Some(pre) = self.pre {
            metadata.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        }
        metadata.push((
            "tokenizer.ggml.tokens".into(),
            Value::strings(self.tokens.clone()),
        ));
        metadata.push((
            "tokenizer.ggml.token_type".into(),
            Value::i32s(self.token_types.clone()),
        ));
        if let Some(scores) = &self.scores {
            metadata.push(("tokenizer.ggml.scores".into(), Value::f32s(scores.clone())));
        }
        if !self.merges.is_empty() {
            metadata.push((
                "tokenizer.ggml.merges".into(),
                Value::strings(self.merges.clone()),
            ));
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos_token_id),
            ("tokenizer.ggml.eos_token_id", self.eos_token_id),
            ("tokenizer.ggml.unknown_token_id", self.unknown_token_id),
            ("tokenizer.ggml.padding_token_id", self.padding_token_id),
        ] {
            if let Some(id) = id {
                metadata.push((key.into(), Value::U32(id)));
            }
        }
        metadata.push((
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(self.add_bos_token),
        ));
        metadata.push((
            "tokenizer.ggml.add_eos_token".into(),
            Value::Bool(self.add_eos_token),
        ));
        if let Some(template) = &self.chat_template {
            metadata.push((
                "tokenizer.chat_template".into(),
                Value::String(template.clone()),
            ));
        }
        metadata
    }
}

/// The GGUF vocabulary of a byte-level or SentencePiece BPE `tokenizer.json`, with the special
/// tokens, flags and chat template of its `tokenizer_config.json` when there is one. Without
/// one, `default_eos` serves as end (and, as GPT-2 uses it, beginning) of sequence.
pub fn vocabulary_from_tokenizer_json(
    tokenizer: &Json,
    config: Option<&Json>,
    default_eos: Option<u32>,
) -> Result<GgufVocabulary, VocabError> {
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        return error(format!(
            "a {} tokenizer cannot be written to GGUF; BPE expected",
            model["type"]
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| VocabError("the tokenizer has no vocab".into()))?;
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| VocabError(format!("the id of \"{token}\" is not a number")))?;
        by_id.insert(id, token.clone());
    }
    let mut kinds: BTreeMap<u64, i32> = BTreeMap::new();
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"]
            .as_u64()
            .ok_or_else(|| VocabError("an added token has no id".into()))?;
        let content = added["content"]
            .as_str()
            .ok_or_else(|| VocabError("an added token has no content".into()))?;
        by_id.insert(id, content.to_string());
        let kind = if added["special"].as_bool() == Some(true) {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        };
        kinds.insert(id, kind);
    }
    let count = by_id.len() as u64;
    if by_id.keys().copied().ne(0..count) {
        return error("the token ids are not contiguous from 0");
    }
    let tokens: Vec<String> = by_id.into_values().collect();
    let id_of = |token: &str| tokens.iter().position(|t| t == token).map(|id| id as u32);
    let config_token = |key: &str| -> Result<Option<u32>, VocabError> {
        let Some(config) = config else {
            return Ok(None);
        };
        let token = match &config[key] {
            Json::Null => return Ok(None),
            Json::String(token) => token.as_str(),
            other => match other["content"].as_str() {
                Some(token) => token,
                None => return error(format!("tokenizer_config.json: `{key}` is not a token")),
            },
        };
        id_of(token).map(Some).ok_or_else(|| {
            VocabError(format!(
                "tokenizer_config.json: `{key}` \"{token}\" is not in the vocabulary"
            ))
        })
    };
    let config_flag = |key: &str, default: bool| {
        config
            .and_then(|config| config[key].as_bool())
            .unwrap_or(default)
    };
    let sentencepiece = model["byte_fallback"] == true;
    let unknown = model["unk_token"].as_str().and_then(id_of);
    let token_types = (0..count)
        .map(|id| {
            let token = &tokens[id as usize];
            match kinds.get(&id) {
                Some(&kind) => kind,
                None if Some(id as u32) == unknown => token_type::UNKNOWN,
                None if sentencepiece && is_byte_token(token) => token_type::BYTE,
                None => token_type::NORMAL,
            }
        })
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| VocabError("the tokenizer has no merges".into()))?
        .iter()
        .map(|merge| match merge {
            Json::String(pair) => Ok(pair.clone()),
            Json::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            _ => error("a merge is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let eos = config_token("eos_token")?.or(default_eos);
    let bos = match config {
        Some(_) => config_token("bos_token")?,
        None => eos,
    };
    let (model_name, pre, merges, scores) = if sentencepiece {
        let scores = scores_from_merges(&tokens, &merges);
        ("llama", None, Vec::new(), Some(scores))
    } else {
        let Some(pre) = pre_tokenizer_name(&tokenizer["pre_tokenizer"]) else {
            return error(format!(
                "its pre-tokenizer {} is none llama.cpp knows by name ({})",
                tokenizer["pre_tokenizer"],
                known_pre_tokenizers()
            ));
        };
        ("gpt2", Some(pre), merges, None)
    };
    let unknown_token_id = config_token("unk_token")?.or(unknown);
    let padding_token_id = config_token("pad_token")?;
    Ok(GgufVocabulary {
        model: model_name,
        pre,
        tokens,
        token_types,
        merges,
        scores,
        bos_token_id: bos,
        eos_token_id: eos,
        unknown_token_id,
        padding_token_id,
        add_bos_token: config_flag("add_bos_token", sentencepiece),
        add_eos_token: config_flag("add_eos_token", false),
        chat_template: config
            .and_then(|config| config["chat_template"].as_str())
            .map(str::to_string),
    })
}

/// Checks that a GGUF file tokenizes as `vocabulary` does: the same tokenizer model and
/// pre-tokenizer, the same token for every id and the same merges. The error names the first
/// difference.
pub fn check_same_vocabulary(
    file: &GgufFile,
    vocabulary: &GgufVocabulary,
) -> Result<(), VocabError> {
    let string = |key: &str| file.value(key).and_then(Value::as_str);
    let model = string("tokenizer.ggml.model").unwrap_or("(none)");
    if model != vocabulary.model {
        return error(format!(
            "the file's tokenizer model is {model}, the tokenizer's {}",
            vocabulary.model
        ));
    }
    if vocabulary.model == "gpt2" {
        let pre = string("tokenizer.ggml.pre").unwrap_or("default");
        if Some(pre) != vocabulary.pre {
            return error(format!(
                "the file's pre-tokenizer is {pre}, the tokenizer's {}",
                vocabulary.pre.unwrap_or("(none)")
            ));
        }
    }
    let tokens = file
        .value("tokenizer.ggml.tokens")
        .and_then(Value::as_strings)
        .unwrap_or_default();
    if let Some(id) = (0..tokens.len().max(vocabulary.tokens.len()))
        .find(|&id| tokens.get(id).copied() != vocabulary.tokens.get(id).map(String::as_str))
    {
        return error(format!(
            "token {id} is {:?} in the file and {:?} in the tokenizer",
            tokens.get(id),
            vocabulary.tokens.get(id)
        ));
    }
    // SentencePiece vocabularies merge by score: the order both sets of scores give.
    let (merges, theirs): (Vec<String>, Vec<String>) = match &vocabulary.scores {
        Some(scores) => {
            let file_scores = file
                .value("tokenizer.ggml.scores")
                .and_then(Value::as_floats)
                .filter(|file_scores| file_scores.len() == tokens.len())
                .ok_or_else(|| {
                    VocabError("the file's `tokenizer.ggml.scores` are missing".into())
                })?;
            let file_types: Vec<i32> = file
                .value("tokenizer.ggml.token_type")
                .and_then(Value::as_integers)
                .filter(|types| types.len() == tokens.len())
                .map(|types| types.into_iter().map(|kind| kind as i32).collect())
                .unwrap_or_else(|| vec![token_type::NORMAL; tokens.len()]);
            let spell = |merges: Vec<(usize, usize)>| -> Vec<String> {
                merges
                    .into_iter()
                    .map(|(left, right)| format!("{} {}", tokens[left], tokens[right]))
                    .collect()
            };
            (
                spell(sentencepiece_merges(&tokens, &file_types, &file_scores)?),
                spell(sentencepiece_merges(
                    &tokens,
                    &vocabulary.token_types,
                    scores,
                )?),
            )
        }
        None => (
            file.value("tokenizer.ggml.merges")
                .and_then(Value::as_strings)
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string)
                .collect(),
            vocabulary.merges.clone(),
        ),
    };
    if let Some(index) =
        (0..merges.len().max(theirs.len())).find(|&index| merges.get(index) != theirs.get(index))
    {
        return error(format!(
            "merge {index} is {:?} in the file and {:?} in the tokenizer",
            merges.get(index),
            theirs.get(index)
        ));
    }
    Ok(())
}

fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// SentencePiece scores that merge in the order `merges` lists: the first merge producing a
/// token gives it its rank, negated; tokens no merge produces score below every merged one.
fn scores_from_merges(tokens: &[String], merges: &[String]) -> Vec<f32> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(id, token)| (token.as_str(), id))
        .collect();
    let floor = -(merges.len() as f32) - 1.0;
    let mut scores = vec![floor; tokens.len()];
    for (rank, merge) in merges.iter().enumerate().rev() {
        let merged: String = merge.split(' ').collect();
        if let Some(&id) = ids.get(merged.as_str()) {
            scores[id] = -(rank as f32);
        }
    }
    scores
}

#[cfg(test)]
mod tests {
    use tokenizers::Tokenizer;

    use super::*;
    use crate::gguf::container::{GgufTensor, read, write};

    /// A GGUF file holding only `metadata`.
    fn file(metadata: Vec<(String, Value)>) -> GgufFile {
        read(write(&metadata, &[] as &[GgufTensor]).unwrap()).unwrap()
    }

    fn entry(key: &str, value: Value) -> (String, Value) {
        (key.to_string(), value)
    }

    fn strings(items: &[&str]) -> Value {
        Value::strings(items.iter().map(|item| item.to_string()))
    }

    fn encode(files: &TokenizerFiles, text: &str) -> Vec<u32> {
        let tokenizer = Tokenizer::from_bytes(files.tokenizer.to_string()).unwrap();
        tokenizer
            .encode_fast(text, true)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    /// A byte-level vocabulary: the bytes of "a1 b2'" as GPT-2 maps them, merges for "a", "1",
    /// " b" and "'s".
    fn byte_level_file(pre: &str) -> GgufFile {
        file(vec![
            entry("tokenizer.ggml.model", Value::String("gpt2".into())),
            entry("tokenizer.ggml.pre", Value::String(pre.into())),
            entry(
                "tokenizer.ggml.tokens",
                strings(&["<s>", "a", "1", "2", "Ġ", "b", "'", "s", "Ġb", "12", "'s"]),
            ),
            entry(
                "tokenizer.ggml.token_type",
                Value::i32s([3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            ),
            entry("tokenizer.ggml.merges", strings(&["Ġ b", "1 2", "' s"])),
            entry("tokenizer.ggml.bos_token_id", Value::U32(0)),
            entry("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ])
    }

    #[test]
    fn pre_tokenizers_split_as_llama_cpp_names_them() {
        // gpt-2 keeps digit runs together, so "12" merges; smollm splits every digit first.
        let gpt2 = tokenizer_from_gguf(&byte_level_file("gpt-2")).unwrap();
        assert_eq!(encode(&gpt2, "a12 b's"), [1, 9, 8, 10]);
        let smollm = tokenizer_from_gguf(&byte_level_file("smollm")).unwrap();
        assert_eq!(encode(&smollm, "a12 b's"), [1, 2, 3, 8, 10]);
        // The control token is matched in text and spelled back.
        assert_eq!(encode(&gpt2, "<s>a"), [0, 1]);
        let tokenizer = Tokenizer::from_bytes(gpt2.tokenizer.to_string()).unwrap();
        assert_eq!(tokenizer.decode(&[1, 9, 8, 10], false).unwrap(), "a12 b's");
        let error = tokenizer_from_gguf(&byte_level_file("tekken")).unwrap_err();
        assert!(error.0.contains("\"tekken\""), "{error}");
    }

    #[test]
    fn llama3_takes_whole_words_before_merging() {
        // "ab" is in the vocabulary, but no merge makes it: Llama 3's BPE takes it whole.
        let metadata = |pre: &str| {
            file(vec![
                entry("tokenizer.ggml.model", Value::String("gpt2".into())),
                entry("tokenizer.ggml.pre", Value::String(pre.into())),
                entry("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
                entry("tokenizer.ggml.merges", strings(&[])),
            ])
        };
        let llama3 = tokenizer_from_gguf(&metadata("llama-bpe")).unwrap();
        assert_eq!(encode(&llama3, "ab"), [2]);
        let gpt2 = tokenizer_from_gguf(&metadata("gpt-2")).unwrap();
        assert_eq!(encode(&gpt2, "ab"), [0, 1]);
    }

    /// A SentencePiece vocabulary: "▁the" and "▁a" by merges of higher-scoring pieces, bytes
    /// for anything else.
    fn sentencepiece_file(add_bos: bool) -> GgufFile {
        let mut tokens = vec![
            "<unk>", "<s>", "</s>", "▁", "t", "h", "e", "a", "th", "▁th", "▁the", "▁a",
        ];
        let mut types = vec![2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let mut scores = vec![
            0.0f32, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -0.5, -0.4, -0.3, -0.6,
        ];
        let bytes: Vec<String> = (0..=255u8).map(|byte| format!("<0x{byte:02X}>")).collect();
        for byte in &bytes {
            tokens.push(byte);
            types.push(token_type::BYTE);
            scores.push(0.0);
        }
        file(vec![
            entry("tokenizer.ggml.model", Value::String("llama".into())),
            entry("tokenizer.ggml.tokens", strings(&tokens)),
            entry("tokenizer.ggml.token_type", Value::i32s(types)),
            entry("tokenizer.ggml.scores", Value::f32s(scores)),
            entry("tokenizer.ggml.bos_token_id", Value::U32(1)),
            entry("tokenizer.ggml.eos_token_id", Value::U32(2)),
            entry("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            entry("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
        ])
    }

    #[test]
    fn sentencepiece_vocabularies_merge_by_score_and_fall_back_to_bytes() {
        let files = tokenizer_from_gguf(&sentencepiece_file(true)).unwrap();
        // "▁the" is reached through "th" and "▁th"; "é" is not a piece, so its two UTF-8
        // bytes are; BOS comes first.
        let e_acute = [0xc3u32, 0xa9].map(|byte| 12 + byte);
        assert_eq!(encode(&files, "the a"), [1, 10, 11]);
        assert_eq!(encode(&files, "é"), [1, 3, e_acute[0], e_acute[1]]);
        let tokenizer = Tokenizer::from_bytes(files.tokenizer.to_string()).unwrap();
        assert_eq!(
            tokenizer
                .decode(&[1, 10, 11, 3, e_acute[0], e_acute[1]], true)
                .unwrap(),
            "the a é"
        );
        assert_eq!(files.config["bos_token"], "<s>");
        assert_eq!(files.config["add_bos_token"], true);
        let without_bos = tokenizer_from_gguf(&sentencepiece_file(false)).unwrap();
        assert_eq!(encode(&without_bos, "the"), [10]);
    }

    #[test]
    fn vocabularies_convert_back_to_gguf_with_their_pre_tokenizer_and_specials() {
        let files = tokenizer_from_gguf(&byte_level_file("smollm")).unwrap();
        let vocabulary =
            vocabulary_from_tokenizer_json(&files.tokenizer, Some(&files.config), None).unwrap();
        assert_eq!((vocabulary.model, vocabulary.pre), ("gpt2", Some("smollm")));
        assert_eq!(vocabulary.tokens[8], "Ġb");
        assert_eq!(vocabulary.token_types[..2], [3, 1]);
        assert_eq!(vocabulary.merges, ["Ġ b", "1 2", "' s"]);
        assert_eq!(
            (vocabulary.bos_token_id, vocabulary.eos_token_id),
            (Some(0), Some(0))
        );
        // Hugging Face's own spelling of SmolLM's pre-tokenizer is recognized too.
        let mut hf = files.tokenizer.clone();
        hf["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]});
        let vocabulary = vocabulary_from_tokenizer_json(&hf, None, Some(0)).unwrap();
        assert_eq!(vocabulary.pre, Some("smollm"));
        hf["pre_tokenizer"] = json!({"type": "Whitespace"});
        assert!(vocabulary_from_tokenizer_json(&hf, None, Some(0)).is_err());

        // A SentencePiece vocabulary gets scores that merge in the same order.
        let files = tokenizer_from_gguf(&sentencepiece_file(true)).unwrap();
        let vocabulary =
            vocabulary_from_tokenizer_json(&files.tokenizer, Some(&files.config), None).unwrap();
        assert_eq!(vocabulary.model, "llama");
        assert_eq!(vocabulary.token_types[12], token_type::BYTE);
        assert_eq!(vocabulary.token_types[0], token_type::UNKNOWN);
        let rebuilt = tokenizer_from_gguf(&file(vocabulary.metadata())).unwrap();
        for text in ["the a", "tha", "éthe"] {
            assert_eq!(encode(&rebuilt, text), encode(&files, text), "{text}");
        }
    }

    /// A file tokenizes as a vocabulary does when its tokens and merge order agree: for
    /// SentencePiece the order the scores give, whatever the scores' values.
    #[test]
    fn vocabularies_are_compared_token_by_token_and_merge_by_merge() {
        for original in [byte_level_file("smollm"), sentencepiece_file(true)] {
            let files = tokenizer_from_gguf(&original).unwrap();
            let vocabulary =
                vocabulary_from_tokenizer_json(&files.tokenizer, Some(&files.config), None)
                    .unwrap();
            check_same_vocabulary(&original, &vocabulary).unwrap();
            let mut renamed = vocabulary.clone();
            renamed.tokens[5] = "x".into();
            let message = check_same_vocabulary(&original, &renamed).unwrap_err().0;
            assert!(message.contains("token 5"), "{message}");
        }
        // Scores that put "th" above "▁th" merge another way.
        let original = sentencepiece_file(true);
        let files = tokenizer_from_gguf(&original).unwrap();
        let mut reordered =
            vocabulary_from_tokenizer_json(&files.tokenizer, Some(&files.config), None).unwrap();
        reordered.scores.as_mut().unwrap()[8] = 10.0;
        let message = check_same_vocabulary(&original, &reordered).unwrap_err().0;
        assert!(message.contains("merge 0"), "{message}");
        // The gpt-2 pre-tokenizer is not smollm's.
        let files = tokenizer_from_gguf(&byte_level_file("gpt-2")).unwrap();
        let gpt2 = vocabulary_from_tokenizer_json(&files.tokenizer, None, Some(0)).unwrap();
        let message = check_same_vocabulary(&byte_level_file("smollm"), &gpt2)
            .unwrap_err()
            .0;
        assert!(message.contains("pre-tokenizer is smollm"), "{message}");
    }

    #[test]
    fn vocabularies_that_split_into_too_many_merges_are_refused() {
        // "a", "aa", ..., every one a merge of every split: quadratic in the longest token.
        let tokens: Vec<String> = (1..=400).map(|length| "a".repeat(length)).collect();
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let types = vec![token_type::NORMAL; tokens.len()];
        let scores = vec![0.0; tokens.len()];
        let merges =
            sentencepiece_merges(&token_refs[..200], &types[..200], &scores[..200]).unwrap();
        assert_eq!(merges.len(), (1..200).sum::<usize>());
        let limited: Vec<&str> = token_refs[..300].to_vec();
        assert!(sentencepiece_merges(&limited, &types[..300], &scores[..300]).is_ok());
    }
}
