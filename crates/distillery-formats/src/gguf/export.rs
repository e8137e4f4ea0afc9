//! A model written as a `llama` GGUF file that llama.cpp runs, its tokenizer embedded.

use std::path::{Path, PathBuf};

use distillery_model::Llama;
use distillery_quant::QuantizedWeight;
use distillery_quant::ggml::GgmlType;

use super::container::write;
use super::llama::llama_contents;
use super::vocab::GgufVocabulary;

#[derive(Debug, thiserror::Error)]
pub enum GgufExportError {
    #[error("{}: already exists; choose another file", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Contents(#[from] super::llama::GgufModelError),
    #[error(transparent)]
    File(#[from] super::container::GgufError),
    #[error(transparent)]
    Write(#[from] distillery_data::DataError),
}

/// Writes `model` to `out` (atomically) with its weight matrices as `weights` blocks and
/// `vocabulary` as its tokenizer. An existing file is an error unless `replace`.
pub fn export(
    model: &Llama,
    name: &str,
    vocabulary: &GgufVocabulary,
    weights: GgmlType,
    out: &Path,
    replace: bool,
) -> Result<(), GgufExportError> {
    if out.exists() && !replace {
        return Err(GgufExportError::Exists(out.to_path_buf()));
    }
    let (metadata, tensors) = llama_contents(model, name, vocabulary, weights)?;
    distillery_data::write_atomically(out, &write(&metadata, &tensors)?)?;
    Ok(())
}

/// What becomes of a quantized model's matrices in a GGUF file of `weights` blocks, in words;
/// `None` for a float model or an f32 file.
pub fn requantization_note(model: &Llama, weights: GgmlType) -> Option<String> {
    let quantized: Vec<&QuantizedWeight> = model
        .linears()
        .into_iter()
        .filter_map(|(_, linear)| linear.quantized_weight())
        .chain(model.quantized_embedding())
        .collect();
    if quantized.is_empty() || weights == GgmlType::F32 {
        return None;
    }
    let unchanged = quantized.iter().all(|matrix| match matrix {
        QuantizedWeight::Blocks(blocks) => blocks.kind() == weights,
        QuantizedWeight::Packed(packed) => {
            weights == GgmlType::Q8_0 && packed.is_int8_in_groups_of(GgmlType::Q8_0.block_values())
        }
    });
    Some(if unchanged {
        format!("the quantized matrices map onto {weights} blocks unchanged")
    } else {
        format!(
            "the quantized matrices are requantized to {weights} from their dequantized weights \
             (matrices already in {weights} blocks, and int8 with group_size = 32 for Q8_0, keep \
             their codes)"
        )
    })
}
