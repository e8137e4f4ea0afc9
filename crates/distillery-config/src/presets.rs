//! Named model shapes. The vocabulary size is not part of a preset: it comes from the tokenizer.

use crate::ModelSection;

pub const PRESET_NAMES: [&str; 3] = ["llama-tiny", "shakespeare-teacher", "shakespeare-student"];

pub fn preset(name: &str) -> Option<ModelSection> {
    match name {
        "llama-tiny" => Some(llama_tiny()),
        "shakespeare-teacher" => Some(shakespeare_teacher()),
        "shakespeare-student" => Some(shakespeare_student()),
        _ => None,
    }
}

/// Seconds to train on two cores: for tests.
fn llama_tiny() -> ModelSection {
    shape(32, 64, 2, 4, 2, 64, true)
}

/// About 4.3M parameters with a 2048-token vocabulary.
fn shakespeare_teacher() -> ModelSection {
    shape(256, 704, 4, 4, 4, 256, false)
}

/// About 0.9M parameters with a 2048-token vocabulary: a quarter of the teacher's size.
fn shakespeare_student() -> ModelSection {
    shape(128, 352, 2, 4, 4, 256, false)
}

fn shape(
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
) -> ModelSection {
    ModelSection {
        from: None,
        preset: None,
        vocab_size: None,
        hidden_size: Some(hidden_size),
        intermediate_size: Some(intermediate_size),
        num_hidden_layers: Some(num_hidden_layers),
        num_attention_heads: Some(num_attention_heads),
        num_key_value_heads: Some(num_key_value_heads),
        max_position_embeddings: Some(max_position_embeddings),
        rms_norm_eps: Some(1e-5),
        rope_theta: Some(10000.0),
        tie_word_embeddings: Some(tie_word_embeddings),
        rope_scaling: None,
        dropout: 0.0,
    }
}
