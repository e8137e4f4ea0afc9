//! A quantized weight matrix in the layout it came in, behind one set of products: distillery's
//! own packed codes (int8, round-to-nearest, GPTQ) or ggml's blocks from a GGUF file.

use crate::ggml::BlockMatrix;
use crate::packed::PackedMatrix;

/// A `rows x cols` (output x input) quantized matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedWeight {
    Packed(PackedMatrix),
    Blocks(BlockMatrix),
}

impl From<PackedMatrix> for QuantizedWeight {
    fn from(matrix: PackedMatrix) -> Self {
        Self::Packed(matrix)
    }
}

impl From<BlockMatrix> for QuantizedWeight {
    fn from(matrix: BlockMatrix) -> Self {
        Self::Blocks(matrix)
    }
}

/// How quantized products treat their inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActivationRounding {
    /// Products over a few rows (decoding steps, and the head over a prompt's last position)
    /// round inputs to int8 per 32 columns, as llama.cpp does; prompts and batches take exact
    /// f32 inputs.
    #[default]
    DecodeSteps,
    /// Exact f32 inputs everywhere: the stored weights' own arithmetic.
    Never,
    /// Inputs rounded to int8 per 32 columns everywhere, prompts and batches too: llama.cpp's
    /// arithmetic for quantized matrices.
    Always,
}

impl ActivationRounding {
    /// A sentence naming the arithmetic, for the output of commands that compute with it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::DecodeSteps => {
                "quantized matrices take activations rounded to int8 per 32 columns (llama.cpp's \
                 arithmetic) on single-token steps and exact f32 activations on prompts"
            }
            Self::Never => "quantized matrices take exact f32 activations",
            Self::Always => {
                "quantized matrices take activations rounded to int8 per 32 columns \
                 (llama.cpp's arithmetic) on every token"
            }
        }
    }
}

impl QuantizedWeight {
    pub fn rows(&self) -> usize {
        match self {
            Self::Packed(matrix) => matrix.rows(),
            Self::Blocks(matrix) => matrix.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Packed(matrix) => matrix.cols(),
            Self::Blocks(matrix) => matrix.cols(),
        }
    }

    /// distillery's packed codes, unless the matrix is in ggml blocks.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Packed(matrix) => Some(matrix),
            Self::Blocks(_) => None,
        }
    }

    pub fn blocks(&self) -> Option<&BlockMatrix> {
        match self {
            Self::Packed(_) => None,
            Self::Blocks(matrix) => Some(matrix),
        }
    }

    /// Bytes the matrix takes in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Self::Packed(matrix) => matrix.memory_bytes(),
            Self::Blocks(matrix) => matrix.memory_bytes(),
        }
    }

    /// All weights, `rows x cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Self::Packed(matrix) => matrix.dequantize(),
            Self::Blocks(matrix) => matrix.dequantize(),
        }
    }

    /// The rows named by `ids`, concatenated: an embedding lookup.
    pub fn gather_rows(&self, ids: &[usize]) -> Vec<f32> {
        match self {
            Self::Packed(matrix) => matrix.gather_rows(ids),
            Self::Blocks(matrix) => matrix.gather_rows(ids),
        }
    }

    /// The matrix of the rows named by `ids`, in that order, stored as they are here: each
    /// output of its products has the bits of that row's output here.
    pub fn select_rows(&self, ids: &[usize]) -> QuantizedWeight {
        match self {
            Self::Packed(matrix) => matrix.select_rows(ids).into(),
            Self::Blocks(matrix) => matrix.select_rows(ids).into(),
        }
    }

    /// `x Wᵀ` for a few input rows (`count x cols`), exact f32 inputs: `count x rows`.
    pub fn matmul(&self, x: &[f32], count: usize) -> Vec<f32> {
        match self {
            Self::Packed(matrix) => matrix.matmul(x, count),
            Self::Blocks(matrix) => matrix.matmul(x, count),
        }
    }

    /// `x Wᵀ` for many input rows, exact f32 inputs, a tile of channels decoded at a time.
    pub fn matmul_in_tiles(&self, x: &[f32], count: usize) -> Vec<f32> {
        match self {
            Self::Packed(matrix) => matrix.matmul_in_tiles(x, count),
            Self::Blocks(matrix) => matrix.matmul_in_tiles(x, count),
        }
    }

    /// `x Wᵀ` with inputs rounded to int8 per 32 columns where the layout has integer
    /// kernels, exact inputs otherwise.
    pub fn matmul_int8_inputs(&self, x: &[f32], count: usize) -> Vec<f32> {
        match self {
            Self::Packed(matrix) => matrix.matmul_int8_inputs(x, count),
            Self::Blocks(matrix) => matrix.matmul_int8_inputs(x, count),
        }
    }

    /// Several matrices applied to the same input with int8-rounded inputs; matrices of one
    /// layout share the rounding and one parallel region.
    pub fn matmul_int8_inputs_together(
        matrices: &[&QuantizedWeight],
        x: &[f32],
        count: usize,
    ) -> Vec<Vec<f32>> {
        let packed: Option<Vec<&PackedMatrix>> =
            matrices.iter().map(|matrix| matrix.packed()).collect();
        if let Some(packed) = packed {
            return PackedMatrix::matmul_int8_inputs_together(&packed, x, count);
        }
        let blocks: Option<Vec<&BlockMatrix>> =
            matrices.iter().map(|matrix| matrix.blocks()).collect();
        if let Some(blocks) = blocks {
            return BlockMatrix::matmul_int8_inputs_together(&blocks, x, count);
        }
        matrices
            .iter()
            .map(|matrix| matrix.matmul_int8_inputs(x, count))
            .collect()
    }
}
