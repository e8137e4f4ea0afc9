//! ggml's tensor types and block formats, as llama.cpp's GGUF files store weights, and the
//! matrices that keep those blocks for computing.

mod blocks;
mod kernels;
mod matrix;
mod types;

pub use blocks::{
    PIECE, PieceScales, decode_piece, dequantize, pieces_per_block, quantize_q4_0, quantize_q8_0,
};
pub use matrix::BlockMatrix;
pub use types::{GgmlType, QK_K};
