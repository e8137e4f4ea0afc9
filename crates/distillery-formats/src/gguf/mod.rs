//! GGUF, the file format llama.cpp runs: the container, the `llama` architecture's mapping to
//! distillery's model, and the tokenizer the file carries.

mod container;
mod export;
mod llama;
mod vocab;

pub use container::{
    ALIGNMENT, Array, GgufError, GgufFile, GgufTensor, TensorData, TensorInfo, Value, read,
    read_metadata, write,
};
pub use export::{GgufExportError, export, requantization_note};
pub use llama::{
    GgufContents, GgufModelError, architecture, gguf_name, hf_name_of, import, llama_contents,
};
pub use vocab::{
    GgufVocabulary, TokenizerFiles, VocabError, check_same_vocabulary, token_type,
    tokenizer_from_gguf, vocabulary_from_tokenizer_json,
};
