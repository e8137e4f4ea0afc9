//! The file boundary: how distillery's parameters are named and laid out in other tools' files.
//!
//! Names and layouts are converted here and nowhere else, so the model keeps one definition.

mod assembly;
pub mod gguf;
pub mod hf;
pub mod huge_pages;
pub mod load;
pub mod names;
pub mod quantized;
pub mod rope_layout;
pub mod source;
#[cfg(test)]
mod testing;
