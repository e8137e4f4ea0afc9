//! A weight matrix kept in ggml's blocks as a GGUF file stores them: one row of blocks per
//! output channel, or for Q4_0 and Q4_1 where the CPU has a kernel for it, rows interleaved
//! eight at a time. Rows decode on the fly; the float matrix never exists whole.

use std::borrow::Cow;
use std::ops::Range;

use super::blocks::{self, PIECE, PieceScales, decode_piece, pieces_per_block};
use super::kernels::{RoundedInputs, blocks_dot, pieces_dot, prepare_lanes};
use super::types::GgmlType;
use crate::QuantError;
use crate::interleaved::{self, BLOCK_CODES, GROUP_ROWS, Layout, Shape};
use crate::products::{dot, in_tiles, input_major, together};

/// A `rows x cols` (output x input) matrix of one ggml type.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMatrix {
    kind: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// `rows x row_bytes`: each channel's blocks, in file order unless `interleaved`.
    bytes: Vec<u8>,
    /// When the rows are [interleaved](interleaved) for the kernel of [`Layout::Ggml`], their
    /// shape.
    interleaved: Option<Shape>,
}

impl BlockMatrix {
    /// The matrix whose rows of `kind` blocks `bytes` holds. The type must be readable and
    /// quantized in blocks or half precision, and `bytes` exactly `rows` rows of `cols` values.
    pub fn new(
        kind: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, QuantError> {
        let layout = |message: String| Err(QuantError::Layout(message));
        if !kind.is_readable() || kind == GgmlType::F32 {
            return layout(format!("{kind} matrices are not kept in blocks"));
        }
        let Some(row_bytes) = kind.row_bytes(cols) else {
            return layout(format!(
                "rows of {cols} values are not whole {kind} blocks of {}",
                kind.block_values()
            ));
        };
        if rows.checked_mul(row_bytes) != Some(bytes.len()) {
            return layout(format!(
                "{} bytes for {rows} rows of {cols} {kind} values ({row_bytes} bytes a row)",
                bytes.len()
            ));
        }
        let interleaved = interleaved_shape(kind, cols).filter(|_| {
            rows.is_multiple_of(GROUP_ROWS) && interleaved::kernel(Layout::Ggml).is_some()
        });
        let bytes = match interleaved {
            Some(shape) => interleave_blocks(shape, kind, &bytes, rows),
            None => bytes,
        };
        Ok(Self {
            kind,
            rows,
            cols,
            row_bytes,
            bytes,
            interleaved,
        })
    }

    pub fn kind(&self) -> GgmlType {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks, row after row, as a GGUF file stores them.
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        if self.interleaved.is_none() {
            return Cow::Borrowed(&self.bytes);
        }
        Cow::Owned(
            (0..self.rows)
                .flat_map(|row| self.row(row).into_owned())
                .collect(),
        )
    }

    pub fn memory_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Channel `row`'s blocks, in file order.
    fn row(&self, row: usize) -> Cow<'_, [u8]> {
        if let Some(shape) = self.interleaved {
            let mut bytes = vec![0; self.row_bytes];
            let block_bytes = self.kind.block_bytes();
            for (block, bytes) in bytes.chunks_exact_mut(block_bytes).enumerate() {
                interleaved_block(shape, &self.bytes, row, block, bytes);
            }
            return Cow::Owned(bytes);
        }
        Cow::Borrowed(&self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes])
    }

    /// Channel `row`'s weights, as ggml dequantizes them.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let Some(shape) = self.interleaved else {
            return blocks::dequantize(self.kind, &self.row(row), out);
        };
        // Block by block: prompts decode every row of a matrix.
        let mut bytes = [0; LARGEST_INTERLEAVED_BLOCK];
        let bytes = &mut bytes[..self.kind.block_bytes()];
        for (block, out) in out.chunks_exact_mut(PIECE).enumerate() {
            interleaved_block(shape, &self.bytes, row, block, bytes);
            blocks::dequantize(self.kind, bytes, out);
        }
    }

    /// All weights, `rows x cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut weights = vec![0.0; self.rows * self.cols];
        for (row, out) in weights.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(row, out);
        }
        weights
    }

    /// The rows named by `ids`, concatenated: an embedding lookup.
    pub fn gather_rows(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = vec![0.0; ids.len() * self.cols];
        for (&id, values) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            self.dequantize_row(id, values);
        }
        out
    }

    /// The matrix of the rows named by `ids`, in that order, with their blocks unchanged.
    pub fn select_rows(&self, ids: &[usize]) -> Self {
        let bytes = ids
            .iter()
            .flat_map(|&id| self.row(id).into_owned())
            .collect();
        Self::new(self.kind, ids.len(), self.cols, bytes)
            .expect("whole rows of a valid matrix form a valid matrix")
    }

    /// `x Wᵀ` for `count` input rows `x` (`count x cols`) with exact f32 inputs and the
    /// dequantized weights: `count x rows`.
    pub fn matmul(&self, x: &[f32], count: usize) -> Vec<f32> {
        let cols = self.cols;
        input_major((self.rows, cols), count, |rows, outs| {
            let mut weights = vec![0.0; cols];
            for (row, out) in rows.zip(outs.chunks_exact_mut(count)) {
                self.dequantize_row(row, &mut weights);
                for (input, value) in x.chunks_exact(cols).zip(out.iter_mut()) {
                    *value = dot(input, &weights);
                }
            }
        })
    }

    /// [`Self::matmul`] for many input rows: tiles of channels decoded to floats meet every
    /// input row while in cache.
    pub fn matmul_in_tiles(&self, x: &[f32], count: usize) -> Vec<f32> {
        in_tiles(self.rows, self.cols, x, count, |row, out| {
            self.dequantize_row(row, out)
        })
    }

    /// Whether products can round their inputs to int8 ([`Self::matmul_int8_inputs`]): the
    /// block-quantized types, not half precision.
    pub fn has_integer_pieces(&self) -> bool {
        self.kind.is_block_quantized()
    }

    /// `x Wᵀ` with each input row rounded to int8 per 32 columns (one f32 scale each), as
    /// llama.cpp rounds activations for its quantized matrices, and multiplied with the
    /// weights' codes in integer sums; the scales and minima apply in floats. Half-precision
    /// matrices take exact inputs.
    pub fn matmul_int8_inputs(&self, x: &[f32], count: usize) -> Vec<f32> {
        if !self.has_integer_pieces() {
            return self.matmul(x, count);
        }
        let inputs = RoundedInputs::of(x, self.cols, count);
        prepare_lanes(self.kind, &inputs);
        input_major((self.rows, self.cols), count, |rows, outs| {
            self.channels_int8(rows, &inputs, outs)
        })
    }

    /// Several matrices of the same input width applied to the same int8-rounded inputs in
    /// one parallel region: `outputs[m]` is `x W_mᵀ`.
    pub fn matmul_int8_inputs_together(
        matrices: &[&BlockMatrix],
        x: &[f32],
        count: usize,
    ) -> Vec<Vec<f32>> {
        let Some(cols) = matrices.first().map(|matrix| matrix.cols) else {
            return Vec::new();
        };
        if matrices
            .iter()
            .any(|matrix| matrix.cols != cols || !matrix.has_integer_pieces())
        {
            return matrices
                .iter()
                .map(|matrix| matrix.matmul_int8_inputs(x, count))
                .collect();
        }
        let inputs = RoundedInputs::of(x, cols, count);
        for matrix in matrices {
            prepare_lanes(matrix.kind, &inputs);
        }
        let shapes: Vec<(usize, usize)> = matrices
            .iter()
            .map(|matrix| (matrix.rows, matrix.cols))
            .collect();
        together(&shapes, count, |matrix, rows, outs| {
            matrices[matrix].channels_int8(rows, &inputs, outs)
        })
    }

    /// Channels `rows`, each against every input: `outs[channel * inputs + input]`. The 32-value
    /// block types are read as stored where the kernel family has kernels for them; otherwise
    /// each channel's pieces are decoded once into small signed codes and their scales, which
    /// every input then meets in integer dot products: one kernel for every block format.
    fn channels_int8(&self, rows: Range<usize>, rounded: &RoundedInputs, outs: &mut [f32]) {
        let inputs = rounded.rows();
        let count = inputs.len();
        if let (Some(shape), Some(dot)) = (self.interleaved, interleaved::kernel(Layout::Ggml)) {
            let zero = if shape.minima { 0.0 } else { 8.0 };
            let input = |index: usize| inputs[index].for_interleaved(zero);
            return interleaved::channels(dot, &self.bytes, shape, rows, count, input, outs);
        }
        if let Some(dot) = blocks_dot(self.kind) {
            let bytes = &self.bytes[rows.start * self.row_bytes..rows.end * self.row_bytes];
            return dot(bytes, self.row_bytes, rounded, outs);
        }
        let dot = pieces_dot();
        let mut codes = vec![0i8; self.cols];
        let mut scales = vec![PieceScales::default(); self.cols / PIECE];
        for (row, out) in rows.zip(outs.chunks_exact_mut(count)) {
            self.decode_pieces(row, &mut codes, &mut scales);
            for (input, value) in inputs.iter().zip(out.iter_mut()) {
                *value = dot(&codes, &scales, input);
            }
        }
    }

    /// Channel `row`'s codes and piece scales.
    fn decode_pieces(&self, row: usize, codes: &mut [i8], scales: &mut [PieceScales]) {
        let bytes = self.row(row);
        // One loop per type, so each inlines its own piece decoder.
        match self.kind {
            GgmlType::Q4_0 => decode_row_pieces(GgmlType::Q4_0, &bytes, codes, scales),
            GgmlType::Q4_1 => decode_row_pieces(GgmlType::Q4_1, &bytes, codes, scales),
            GgmlType::Q5_0 => decode_row_pieces(GgmlType::Q5_0, &bytes, codes, scales),
            GgmlType::Q5_1 => decode_row_pieces(GgmlType::Q5_1, &bytes, codes, scales),
            GgmlType::Q8_0 => decode_row_pieces(GgmlType::Q8_0, &bytes, codes, scales),
            GgmlType::Q2K => decode_row_pieces(GgmlType::Q2K, &bytes, codes, scales),
            GgmlType::Q3K => decode_row_pieces(GgmlType::Q3K, &bytes, codes, scales),
            GgmlType::Q4K => decode_row_pieces(GgmlType::Q4K, &bytes, codes, scales),
            GgmlType::Q5K => decode_row_pieces(GgmlType::Q5K, &bytes, codes, scales),
            GgmlType::Q6K => decode_row_pieces(GgmlType::Q6K, &bytes, codes, scales),
            other => unreachable!("{other} has no integer pieces"),
        }
    }
}

/// A `kind` matrix of `cols` columns as [interleaved](interleaved) rows, where the type has
/// the layout: a block's scale, its minimum (Q4_1), then its 16 bytes of codes, a byte's low
/// nibble for value `j` and its high one for value `j + 16`.
fn interleaved_shape(kind: GgmlType, cols: usize) -> Option<Shape> {
    let minima = match kind {
        GgmlType::Q4_0 => false,
        GgmlType::Q4_1 => true,
        _ => return None,
    };
    Some(Shape {
        blocks: cols / PIECE,
        blocks_per_group: 1,
        minima,
    })
}

/// The bytes of a Q4_1 block, the larger of the two interleaved types.
const LARGEST_INTERLEAVED_BLOCK: usize = 20;

/// `rows` rows of `kind` blocks (`bytes`, file order), interleaved as `shape`.
fn interleave_blocks(shape: Shape, kind: GgmlType, bytes: &[u8], rows: usize) -> Vec<u8> {
    let block_bytes = kind.block_bytes();
    let block = |row: usize, block: usize| &bytes[(row * shape.blocks + block) * block_bytes..];
    let half = |block: &[u8], at: usize| u16::from_le_bytes([block[at], block[at + 1]]);
    shape.interleave(
        rows,
        |row, group| {
            let block = block(row, group);
            [
                half(block, 0),
                if shape.minima { half(block, 2) } else { 0 },
            ]
        },
        |row, at| &block(row, at)[block_bytes - BLOCK_CODES..],
    )
}

/// Block `block` of row `row` of rows interleaved as `shape` (`bytes`) into `out`, as a file
/// stores it: the scale, the minimum (Q4_1), the codes.
fn interleaved_block(shape: Shape, bytes: &[u8], row: usize, block: usize, out: &mut [u8]) {
    let halves = shape.halves(bytes, row, block);
    let (halves_out, codes) = out.split_at_mut(out.len() - BLOCK_CODES);
    for (half, out) in halves.iter().zip(halves_out.chunks_exact_mut(2)) {
        out.copy_from_slice(&half.to_le_bytes());
    }
    codes.copy_from_slice(&shape.codes(bytes, row, block));
}

#[inline(always)]
fn decode_row_pieces(kind: GgmlType, bytes: &[u8], codes: &mut [i8], scales: &mut [PieceScales]) {
    let per_block = pieces_per_block(kind);
    let mut pieces = codes.chunks_exact_mut(PIECE).zip(scales.iter_mut());
    for block in bytes.chunks_exact(kind.block_bytes()) {
        for (piece, (codes, scales)) in (0..per_block).zip(pieces.by_ref()) {
            let codes: &mut [i8; PIECE] = codes.try_into().expect("a piece of codes");
            *scales = decode_piece(kind, block, piece, codes);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ggml::blocks::{QUANTIZED_KINDS, random_blocks};
    use crate::ggml::kernels::PieceInputs;

    /// A matrix of random blocks whose half-precision fields hold small positive numbers.
    fn random_matrix(kind: GgmlType, rows: usize, cols: usize, seed: u64) -> BlockMatrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let blocks = rows * cols / kind.block_values();
        BlockMatrix::new(kind, rows, cols, random_blocks(kind, blocks, &mut rng)).unwrap()
    }

    fn inputs(count: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..count * cols)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    /// `x Wᵀ` in f64 from the dequantized weights, each value with the sum of its products'
    /// magnitudes (what float rounding errors scale with).
    fn reference(matrix: &BlockMatrix, x: &[f32], count: usize) -> Vec<(f64, f64)> {
        let weights = matrix.dequantize();
        let cols = matrix.cols();
        let mut out = vec![(0.0, 0.0); count * matrix.rows()];
        for index in 0..count {
            for row in 0..matrix.rows() {
                let products = (0..cols).map(|col| {
                    f64::from(x[index * cols + col]) * f64::from(weights[row * cols + col])
                });
                out[index * matrix.rows() + row] = products
                    .fold((0.0, 0.0), |(sum, size), product| {
                        (sum + product, size + product.abs())
                    });
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[(f64, f64)], what: &str) {
        assert_eq!(got.len(), want.len());
        for (g, (w, size)) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-5 * size.max(1.0),
                "{what}: {g} vs {w}"
            );
        }
    }

    /// Half precision and every block-quantized type.
    fn kinds() -> impl Iterator<Item = GgmlType> {
        std::iter::once(GgmlType::F16).chain(QUANTIZED_KINDS)
    }

    #[test]
    fn exact_products_equal_the_dequantized_weights() {
        for (kind, rows) in kinds().flat_map(|kind| [(kind, 37), (kind, 40)]) {
            let matrix = random_matrix(kind, rows, 512, 1);
            for count in [1, 3, 20] {
                let x = inputs(count, 512, 2);
                let want = reference(&matrix, &x, count);
                for (how, got) in [
                    ("rows", matrix.matmul(&x, count)),
                    ("tiles", matrix.matmul_in_tiles(&x, count)),
                ] {
                    assert_close(&got, &want, &format!("{kind} {how} x{count}"));
                }
            }
        }
    }

    /// The integer product is exactly the rounded inputs times the weights, up to float
    /// summation order.
    #[test]
    fn int8_products_equal_the_rounded_inputs_times_the_weights() {
        for (kind, rows) in kinds().flat_map(|kind| [(kind, 19), (kind, 24)]) {
            let matrix = random_matrix(kind, rows, 512, 3);
            for count in [1, 4] {
                let x = inputs(count, 512, 4);
                let rounded: Vec<f32> = if matrix.has_integer_pieces() {
                    x.chunks_exact(512)
                        .flat_map(|row| PieceInputs::new(row).dequantize())
                        .collect()
                } else {
                    x.clone()
                };
                let want = reference(&matrix, &rounded, count);
                let got = matrix.matmul_int8_inputs(&x, count);
                assert_close(&got, &want, &format!("{kind} x{count}"));
                let together =
                    BlockMatrix::matmul_int8_inputs_together(&[&matrix, &matrix], &x, count);
                assert_eq!(together, vec![got.clone(), got]);
            }
        }
    }

    /// Q4_0 and Q4_1 rows interleaved for the kernel read back in file order, and a task's
    /// channels that start inside a group of eight get the products whole groups give.
    #[test]
    fn interleaved_rows_read_back_and_split_anywhere() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let file = random_blocks(kind, 24 * 4, &mut rng);
            let matrix = BlockMatrix::new(kind, 24, 128, file.clone()).unwrap();
            let has_kernel = interleaved::kernel(Layout::Ggml).is_some();
            assert_eq!(matrix.interleaved.is_some(), has_kernel);
            assert_eq!(*matrix.bytes(), file[..]);
            let twelve_rows = file[..12 * 4 * kind.block_bytes()].to_vec();
            let unaligned = BlockMatrix::new(kind, 12, 128, twelve_rows).unwrap();
            assert!(unaligned.interleaved.is_none());
            let x = inputs(2, 128, 7);
            let whole = matrix.matmul_int8_inputs(&x, 2);
            let rounded = RoundedInputs::of(&x, 128, 2);
            let mut outs = vec![0.0; 13 * 2];
            matrix.channels_int8(5..18, &rounded, &mut outs);
            for (channel, pair) in outs.chunks_exact(2).enumerate() {
                assert_eq!(pair, [whole[5 + channel], whole[24 + 5 + channel]]);
            }
        }
        assert_eq!(LARGEST_INTERLEAVED_BLOCK, GgmlType::Q4_1.block_bytes());
    }

    /// A matrix of chosen rows (interleaved or not, whatever the source was) gives each of
    /// them the products, exact and int8, that the whole matrix gives that row.
    #[test]
    fn selected_rows_keep_their_products() {
        // 16 of 40 rows: the Q4 selections interleave again, from interleaved rows.
        let ids: Vec<usize> = (0..16).map(|index| (index * 7 + 3) % 40).collect();
        for kind in kinds() {
            let matrix = random_matrix(kind, 40, 256, 8);
            let selected = matrix.select_rows(&ids);
            assert_eq!(selected.interleaved.is_some(), matrix.interleaved.is_some());
            for count in [1, 3] {
                let x = inputs(count, 256, 9);
                for (how, whole, part) in [
                    (
                        "exact",
                        matrix.matmul(&x, count),
                        selected.matmul(&x, count),
                    ),
                    (
                        "int8",
                        matrix.matmul_int8_inputs(&x, count),
                        selected.matmul_int8_inputs(&x, count),
                    ),
                ] {
                    let want: Vec<f32> = whole
                        .chunks_exact(40)
                        .flat_map(|outputs| ids.iter().map(|&id| outputs[id]))
                        .collect();
                    assert_eq!(part, want, "{kind} {how} x{count}");
                }
            }
        }
    }

    #[test]
    fn rows_are_gathered_and_layouts_checked() {
        let matrix = random_matrix(GgmlType::Q4_1, 6, 64, 5);
        let all = matrix.dequantize();
        assert_eq!(
            matrix.gather_rows(&[4, 1]),
            [&all[256..320], &all[64..128]].concat()
        );
        assert_eq!(matrix.memory_bytes(), 6 * 2 * 20);
        let error = BlockMatrix::new(GgmlType::Q4K, 2, 64, vec![0; 10]).unwrap_err();
        assert!(error.to_string().contains("whole Q4_K blocks"), "{error}");
        let error = BlockMatrix::new(GgmlType::Q4_0, 2, 64, vec![0; 10]).unwrap_err();
        assert!(error.to_string().contains("10 bytes"), "{error}");
        assert!(BlockMatrix::new(GgmlType::Iq2Xxs, 1, 256, vec![0; 66]).is_err());
    }
}
