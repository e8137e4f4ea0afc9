//! Quantized weight matrices in the form layers compute with, and their GPTQ file layout.
//!
//! In memory each output channel's codes form one little-endian bit stream along the input
//! dimension (see [`crate::pack`]), kept as bytes, so a channel decodes from contiguous bytes. GPTQ files hold the same
//! streams transposed: `qweight[word, out]`, zeros packed along the output dimension, f16
//! scales, and the group of every input column.

use std::ops::Range;
use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::QuantError;
use crate::f16::{f16_to_f32, f32_to_f16};
use crate::gptq::QuantizedMatrix;
use crate::int8_inputs::{self, ChannelDots, ChannelRun, Int8Inputs};
use crate::pack::{code_at, pack_bits, unpack_bits};
use crate::products::{channel_major, dot, in_tiles, together, transposed};

/// A `rows x cols` (output x input) quantized matrix: `w = scale * (code - zero)` with one
/// scale and zero per output channel and group of input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    bits: u32,
    groups: usize,
    /// Whole 32-bit words' worth of bytes per channel, as GPTQ files pack them.
    bytes_per_row: usize,
    /// `rows x bytes_per_row`.
    stream: Vec<u8>,
    /// `rows x groups`.
    scales: Vec<f32>,
    /// `rows x groups`.
    zeros: Vec<u8>,
    /// The group of each input column.
    group_index: Vec<u32>,
    /// When the columns' groups are scattered (act-order), the codes are stored with columns
    /// sorted by group, so each group is again one run of consecutive codes and the fast
    /// products apply: stored position `k` holds column `order[k]`. Products permute their
    /// inputs the same way; rows and files come back in column order.
    order: Option<Vec<u32>>,
    /// When every group is one run of consecutive stored codes of one length (the last may be
    /// shorter), the run's length: found once, used by every product.
    run_size: Option<usize>,
}

/// A quantized matrix as GPTQ (AutoGPTQ's v1 format) stores it; `rows` are output channels.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    pub bits: u32,
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
    /// `[cols * bits / 32, rows]`, row-major.
    pub qweight: Vec<u32>,
    /// `[groups, rows * bits / 32]`: each group's zeros minus one, packed along the outputs.
    pub qzeros: Vec<u32>,
    /// `[groups, rows]` half-precision bit patterns.
    pub scales: Vec<u16>,
    /// `[cols]`.
    pub g_idx: Vec<u32>,
}

impl GptqTensors {
    /// The shapes of `qweight`, `qzeros`, `scales` and `g_idx`, in that order.
    pub fn shapes(&self) -> [Vec<usize>; 4] {
        let bits = self.bits as usize;
        [
            vec![self.cols * bits / 32, self.rows],
            vec![self.groups, self.rows * bits / 32],
            vec![self.groups, self.rows],
            vec![self.cols],
        ]
    }
}

impl PackedMatrix {
    pub fn from_quantized(matrix: &QuantizedMatrix) -> Self {
        let (rows, cols, bits) = (matrix.rows, matrix.cols, matrix.bits);
        let groups = matrix.groups();
        let bytes_per_row = 4 * (cols * bits as usize).div_ceil(32);
        let mut stream = Vec::with_capacity(rows * bytes_per_row);
        let mut scales = vec![0.0; rows * groups];
        let mut zeros = vec![0; rows * groups];
        for row in 0..rows {
            let codes: Vec<u32> = matrix.codes[row * cols..(row + 1) * cols]
                .iter()
                .map(|&code| u32::from(code))
                .collect();
            stream.extend(
                pack_bits(&codes, bits)
                    .into_iter()
                    .flat_map(u32::to_le_bytes),
            );
            for group in 0..groups {
                let grid = matrix.grids[group * rows + row];
                scales[row * groups + group] = grid.scale;
                zeros[row * groups + group] = grid.zero as u8;
            }
        }
        Self {
            rows,
            cols,
            bits,
            groups,
            bytes_per_row,
            stream,
            scales,
            zeros,
            group_index: matrix.group_index.clone(),
            order: None,
            run_size: None,
        }
        .with_groups_in_runs()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn group_index(&self) -> &[u32] {
        &self.group_index
    }

    /// Whether this is symmetric absmax int8 (zero 128) in consecutive groups of `size` columns:
    /// then ggml's Q8_0 blocks of 32 (absmax / 127 scales) hold exactly these codes.
    pub fn is_int8_in_groups_of(&self, size: usize) -> bool {
        self.bits == 8
            && self.zeros.iter().all(|&zero| zero == 128)
            && self.cols.is_multiple_of(size)
            && self
                .group_index
                .iter()
                .enumerate()
                .all(|(col, &group)| group as usize == col / size)
    }

    /// Bytes this matrix takes in memory.
    pub fn memory_bytes(&self) -> usize {
        self.stream.len()
            + 4 * self.scales.len()
            + self.zeros.len()
            + 4 * self.group_index.len()
            + self.order.as_ref().map_or(0, |order| 4 * order.len())
    }

    /// Bytes the GPTQ tensors of this matrix take in a file.
    pub fn stored_bytes(&self) -> usize {
        let bits = self.bits as usize;
        4 * (self.cols * bits).div_ceil(32) * self.rows
            + 4 * self.groups * (self.rows * bits).div_ceil(32)
            + 2 * self.groups * self.rows
            + 4 * self.cols
    }

    /// Output channel `row`'s weights, one per input column; `aligned` is the matrix's
    /// [`Self::word_aligned_group_size`].
    /// `scratch` holds the stored order of an act-order row.
    fn dequantize_row(
        &self,
        row: usize,
        out: &mut [f32],
        aligned: Option<usize>,
        scratch: &mut Vec<f32>,
    ) {
        let Some(order) = &self.order else {
            return self.decode_stored_row(row, out, aligned);
        };
        scratch.resize(self.cols, 0.0);
        self.decode_stored_row(row, scratch, aligned);
        for (&col, &value) in order.iter().zip(scratch.iter()) {
            out[col as usize] = value;
        }
    }

    /// Output channel `row`'s weights in stored order.
    fn decode_stored_row(&self, row: usize, out: &mut [f32], aligned: Option<usize>) {
        let scales = &self.scales[row * self.groups..(row + 1) * self.groups];
        let zeros = &self.zeros[row * self.groups..(row + 1) * self.groups];
        if let Some(size) = aligned {
            let bytes = self.channel_bytes(row);
            let bits = self.bits as usize;
            for (group, values) in out.chunks_mut(size).enumerate() {
                let start = group * size * bits / 8;
                let zero = f32::from(zeros[group]);
                decode_byte_aligned(&bytes[start..], self.bits, scales[group], zero, values);
            }
            return;
        }
        if let Some(size) = self.run_size.filter(|size| self.bits == 3 && size % 8 == 0) {
            let bytes = self.channel_bytes(row);
            for (group, values) in out.chunks_mut(size).enumerate() {
                let zero = f32::from(zeros[group]);
                decode_triples(&bytes[group * size * 3 / 8..], scales[group], zero, values);
            }
            return;
        }
        for (position, value) in out.iter_mut().enumerate() {
            let code = self.stored_code(row, position) as f32;
            let group = self.group_index[self.column(position)] as usize;
            *value = scales[group] * (code - f32::from(zeros[group]));
        }
    }

    /// The code at stored position `position` of channel `row`.
    fn stored_code(&self, row: usize, position: usize) -> u32 {
        code_at(self.channel_bytes(row), self.bits, position)
    }

    /// The input column at stored position `position`.
    fn column(&self, position: usize) -> usize {
        self.order
            .as_ref()
            .map_or(position, |order| order[position] as usize)
    }

    /// Stores the codes with columns sorted by group when the groups are scattered.
    fn with_groups_in_runs(mut self) -> Self {
        if !self.group_index.is_sorted() {
            self.sort_groups_into_runs();
        }
        self.run_size = self.scan_group_runs();
        self
    }

    fn sort_groups_into_runs(&mut self) {
        let mut order: Vec<u32> = (0..self.cols as u32).collect();
        order.sort_by_key(|&col| self.group_index[col as usize]);
        let mut stream = Vec::with_capacity(self.stream.len());
        for row in 0..self.rows {
            let codes: Vec<u32> = order
                .iter()
                .map(|&col| self.stored_code(row, col as usize))
                .collect();
            stream.extend(
                pack_bits(&codes, self.bits)
                    .into_iter()
                    .flat_map(u32::to_le_bytes),
            );
        }
        self.stream = stream;
        self.order = Some(order);
    }

    /// `x` (`count` rows of `cols` inputs) in stored column order.
    fn inputs_in_stored_order<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.order {
            None => std::borrow::Cow::Borrowed(x),
            Some(order) => x
                .chunks_exact(self.cols)
                .flat_map(|input| order.iter().map(|&col| input[col as usize]))
                .collect(),
        }
    }

    /// All weights, `rows x cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let aligned = self.word_aligned_group_size();
        let mut weights = vec![0.0; self.rows * self.cols];
        weights
            .par_chunks_mut(self.cols)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (row, out)| {
                self.dequantize_row(row, out, aligned, scratch)
            });
        weights
    }

    /// The rows named by `ids`, concatenated: an embedding lookup.
    pub fn gather_rows(&self, ids: &[usize]) -> Vec<f32> {
        let aligned = self.word_aligned_group_size();
        let mut scratch = Vec::new();
        let mut out = vec![0.0; ids.len() * self.cols];
        for (&id, values) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            self.dequantize_row(id, values, aligned, &mut scratch);
        }
        out
    }

    /// When every group is one run of consecutive stored codes of one length (the last may be
    /// shorter) that starts on a word boundary, the run's length.
    fn word_aligned_group_size(&self) -> Option<usize> {
        let size = self.run_size?;
        let bits = self.bits as usize;
        (32 % bits == 0 && (size * bits).is_multiple_of(32)).then_some(size)
    }

    fn scan_group_runs(&self) -> Option<usize> {
        let group_at = |position: usize| self.group_index[self.column(position)] as usize;
        let size = (0..self.cols)
            .take_while(|&position| group_at(position) == 0)
            .count();
        (size > 0 && (0..self.cols).all(|position| group_at(position) == position / size))
            .then_some(size)
    }

    fn channel_bytes(&self, row: usize) -> &[u8] {
        &self.stream[row * self.bytes_per_row..(row + 1) * self.bytes_per_row]
    }

    /// `x Wᵀ` for `count` input rows `x` (`count x cols`): `count x rows`. The float matrix
    /// never exists whole. With consecutive word-aligned groups of 2, 4 or 8 bits, each
    /// channel's group contributes `scale * (x · codes - zero * Σx)`, the dot product read
    /// straight from the packed bytes: the inputs are split once into one array per code
    /// position within a byte, so the k-th byte's codes meet their inputs at index k of every
    /// array. Otherwise each channel is decoded into a scratch row.
    pub fn matmul(&self, x: &[f32], count: usize) -> Vec<f32> {
        let x = &*self.inputs_in_stored_order(x);
        let (cols, groups, bits) = (self.cols, self.groups, self.bits as usize);
        let grouped = self.word_aligned_group_size();
        let codes_per_byte = 8 / bits;
        let phases: Vec<f32> = match grouped {
            Some(_) => x
                .chunks_exact(cols)
                .flat_map(|input| split_by_code_position(input, codes_per_byte, self.bytes_per_row))
                .collect(),
            None => Vec::new(),
        };
        let group_sums: Vec<f32> = match grouped {
            Some(size) => x
                .chunks_exact(cols)
                .flat_map(|input| input.chunks(size).map(|part| part.iter().sum::<f32>()))
                .collect(),
            None => Vec::new(),
        };
        let phases_per_input = codes_per_byte * self.bytes_per_row;
        let code_dot = scaled_code_dot();
        let channel_outputs = |row: usize, scratch: &mut Vec<f32>, out: &mut [f32]| {
            let Some(size) = grouped else {
                scratch.resize(cols, 0.0);
                self.decode_stored_row(row, scratch, None);
                for (input, value) in x.chunks_exact(cols).zip(out.iter_mut()) {
                    *value = dot(input, scratch);
                }
                return;
            };
            let row_groups = RowGroups {
                bytes: self.channel_bytes(row),
                bits: self.bits,
                group_bytes: size * bits / 8,
                scales: &self.scales[row * groups..(row + 1) * groups],
            };
            let zeros = &self.zeros[row * groups..(row + 1) * groups];
            for (index, value) in out.iter_mut().enumerate() {
                let phases = &phases[index * phases_per_input..(index + 1) * phases_per_input];
                let sums = &group_sums[index * groups..(index + 1) * groups];
                *value = code_dot(&row_groups, phases, self.bytes_per_row)
                    - zero_terms(row_groups.scales, zeros, sums);
            }
        };
        self.by_channel(count, |rows, scratch, outs| {
            for (row, out) in rows.zip(outs.chunks_exact_mut(count)) {
                channel_outputs(row, scratch, out);
            }
        })
    }

    /// `x Wᵀ` for many input rows (a prompt, an evaluation batch), exactly with the stored
    /// weights: each task decodes a tile of channels to floats and multiplies every input row
    /// with it while the tile is in cache, so the float matrix never exists whole and each
    /// decoded weight serves all rows.
    pub fn matmul_in_tiles(&self, x: &[f32], count: usize) -> Vec<f32> {
        let x = &*self.inputs_in_stored_order(x);
        let aligned = self.word_aligned_group_size();
        in_tiles(self.rows, self.cols, x, count, |row, weights| {
            self.decode_stored_row(row, weights, aligned)
        })
    }

    /// `x Wᵀ` like [`Self::matmul`], but for decoding: when the matrix holds 3-, 4- or 8-bit codes
    /// in consecutive groups of whole 32-column blocks, each input row is first rounded to
    /// int8 per block ([`Int8Inputs`]) and multiplied in integers, as llama.cpp does. The
    /// result is exactly `x̂ Wᵀ` for the rounded `x̂` (up to float summation order); other
    /// layouts compute exactly.
    pub fn matmul_int8_inputs(&self, x: &[f32], count: usize) -> Vec<f32> {
        let Some(product) = self.integer_product(x, count, None) else {
            return self.matmul(x, count);
        };
        self.by_channel(count, |rows, _, outs| product.channels(rows, outs))
    }

    /// [`Self::matmul_int8_inputs`] of several matrices with the same inputs (q, k and v; gate
    /// and up), their channels spread over the threads in one go rather than one hand-over per
    /// matrix. Each matrix's outputs, `count x rows`.
    pub fn matmul_int8_inputs_together(
        matrices: &[&PackedMatrix],
        x: &[f32],
        count: usize,
    ) -> Vec<Vec<f32>> {
        let mut products: Vec<IntegerProduct> = Vec::with_capacity(matrices.len());
        for matrix in matrices {
            let Some(product) = matrix.integer_product(x, count, products.last()) else {
                return matrices
                    .iter()
                    .map(|matrix| matrix.matmul_int8_inputs(x, count))
                    .collect();
            };
            products.push(product);
        }
        let shapes: Vec<(usize, usize)> = matrices
            .iter()
            .map(|matrix| (matrix.rows, matrix.cols))
            .collect();
        together(&shapes, count, |matrix, rows, outs| {
            products[matrix].channels(rows, outs)
        })
    }

    /// The rounded inputs an int8-input product needs, when the matrix's layout allows one:
    /// those of `previous`, a product of the same `x`, when this matrix rounds them alike.
    fn integer_product<'a>(
        &'a self,
        x: &[f32],
        count: usize,
        previous: Option<&IntegerProduct>,
    ) -> Option<IntegerProduct<'a>> {
        let size = self.integer_group_size()?;
        let blocks_per_group = size / int8_inputs::BLOCK;
        let shared = previous.filter(|previous| {
            let other = previous.matrix;
            (other.bits, previous.blocks_per_group) == (self.bits, blocks_per_group)
                && other.order.is_none()
                && self.order.is_none()
        });
        let inputs = match shared {
            Some(previous) => Arc::clone(&previous.inputs),
            None => Arc::new(
                self.inputs_in_stored_order(x)
                    .chunks_exact(self.cols)
                    .take(count)
                    .map(|input| Int8Inputs::new(input, self.bits, blocks_per_group))
                    .collect(),
            ),
        };
        Some(IntegerProduct {
            matrix: self,
            blocks_per_group,
            inputs,
            channel_dots: int8_inputs::channel_dots(self.bits),
        })
    }

    /// The group size when [`Self::matmul_int8_inputs`] can multiply in integers.
    fn integer_group_size(&self) -> Option<usize> {
        let size = self.run_size?;
        let fits = matches!(self.bits, 3 | 4 | 8)
            && size.is_multiple_of(int8_inputs::BLOCK)
            && self.cols.is_multiple_of(int8_inputs::BLOCK);
        fits.then_some(size)
    }

    /// `count x rows` outputs from `channel_outputs(rows, scratch, outputs of those channels)`.
    fn by_channel(
        &self,
        count: usize,
        channel_outputs: impl Fn(Range<usize>, &mut Vec<f32>, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let work = self.rows * self.cols * count;
        let by_channel = channel_major(self.rows, work, count, channel_outputs);
        if count == 1 {
            return by_channel;
        }
        transposed(&by_channel, self.rows, count)
    }

    /// The GPTQ tensors: whole 32-bit words of codes along the inputs and of zeros along the
    /// outputs, which needs both widths to be multiples of `32 / gcd(32, bits)`.
    pub fn to_gptq(&self) -> Result<GptqTensors, QuantError> {
        let bits = self.bits as usize;
        for (what, width) in [("input", self.cols), ("output", self.rows)] {
            if !(width * bits).is_multiple_of(32) {
                return Err(QuantError::Settings(format!(
                    "{width} {what} channels of {bits} bits do not fill whole 32-bit words"
                )));
            }
        }
        let packed_rows = self.cols * bits / 32;
        let mut qweight = vec![0u32; packed_rows * self.rows];
        for row in 0..self.rows {
            let words: Vec<u32> = match &self.order {
                None => self
                    .channel_bytes(row)
                    .chunks_exact(4)
                    .map(|word| u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
                    .collect(),
                Some(order) => {
                    let mut codes = vec![0u32; self.cols];
                    for (position, &col) in order.iter().enumerate() {
                        codes[col as usize] = self.stored_code(row, position);
                    }
                    pack_bits(&codes, self.bits)
                }
            };
            for (packed_row, word) in words.into_iter().enumerate() {
                qweight[packed_row * self.rows + row] = word;
            }
        }
        let max_code = (1u32 << bits) - 1;
        let mut qzeros = Vec::with_capacity(self.groups * self.rows * bits / 32);
        let mut scales = Vec::with_capacity(self.groups * self.rows);
        for group in 0..self.groups {
            let stored: Vec<u32> = (0..self.rows)
                .map(|row| (u32::from(self.zeros[row * self.groups + group]) - 1) & max_code)
                .collect();
            qzeros.extend(pack_bits(&stored, self.bits));
            scales.extend(
                (0..self.rows).map(|row| f32_to_f16(self.scales[row * self.groups + group])),
            );
        }
        Ok(GptqTensors {
            bits: self.bits,
            rows: self.rows,
            cols: self.cols,
            groups: self.groups,
            qweight,
            qzeros,
            scales,
            g_idx: self.group_index.clone(),
        })
    }

    /// Checks every length, index and value of GPTQ tensors read from a file.
    pub fn from_gptq(tensors: &GptqTensors) -> Result<Self, QuantError> {
        let GptqTensors {
            bits,
            rows,
            cols,
            groups,
            ..
        } = *tensors;
        let invalid = |message: String| Err(QuantError::Layout(message));
        if ![2, 3, 4, 8].contains(&bits) {
            return invalid(format!("bits = {bits} (2, 3, 4 or 8)"));
        }
        let width = bits as usize;
        if rows == 0 || cols == 0 || groups == 0 || groups > cols {
            return invalid(format!("{rows} outputs, {cols} inputs and {groups} groups"));
        }
        if !(cols * width).is_multiple_of(32) || !(rows * width).is_multiple_of(32) {
            return invalid(format!(
                "{rows} x {cols} of {bits} bits do not fill whole 32-bit words"
            ));
        }
        let expected = [
            cols * width / 32 * rows,
            groups * rows * width / 32,
            groups * rows,
            cols,
        ];
        let actual = [
            tensors.qweight.len(),
            tensors.qzeros.len(),
            tensors.scales.len(),
            tensors.g_idx.len(),
        ];
        for ((name, expected), actual) in ["qweight", "qzeros", "scales", "g_idx"]
            .iter()
            .zip(expected)
            .zip(actual)
        {
            if expected != actual {
                return invalid(format!(
                    "{name} holds {actual} values where {rows} outputs x {cols} inputs at \
                     {bits} bits in {groups} groups need {expected}"
                ));
            }
        }
        if let Some(&group) = tensors
            .g_idx
            .iter()
            .find(|&&group| group as usize >= groups)
        {
            return invalid(format!("g_idx names group {group} of {groups}"));
        }
        let max_code = (1u32 << bits) - 1;
        let bytes_per_row = cols * width / 8;
        let mut stream = vec![0u8; rows * bytes_per_row];
        for (index, &word) in tensors.qweight.iter().enumerate() {
            let (packed_row, row) = (index / rows, index % rows);
            let at = row * bytes_per_row + 4 * packed_row;
            stream[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        let mut scales = vec![0.0; rows * groups];
        let mut zeros = vec![0; rows * groups];
        let zero_words = rows * width / 32;
        for group in 0..groups {
            let stored = unpack_bits(
                &tensors.qzeros[group * zero_words..(group + 1) * zero_words],
                bits,
                rows,
            );
            for row in 0..rows {
                let scale = f16_to_f32(tensors.scales[group * rows + row]);
                if !(scale.is_finite() && scale > 0.0) {
                    return invalid(format!(
                        "scale {scale} of output {row} in group {group} is not a positive number"
                    ));
                }
                scales[row * groups + group] = scale;
                zeros[row * groups + group] = ((stored[row] + 1) & max_code) as u8;
            }
        }
        Ok(Self {
            rows,
            cols,
            bits,
            groups,
            bytes_per_row,
            stream,
            scales,
            zeros,
            group_index: tensors.g_idx.clone(),
            order: None,
            run_size: None,
        }
        .with_groups_in_runs())
    }
}

/// An int8-input product in progress: one matrix and its rounded inputs.
struct IntegerProduct<'a> {
    matrix: &'a PackedMatrix,
    blocks_per_group: usize,
    /// Shared by the products of one input with matrices that round it alike.
    inputs: Arc<Vec<Int8Inputs>>,
    channel_dots: ChannelDots,
}

impl IntegerProduct<'_> {
    /// Output channels `rows`' values, `rows.len() x inputs` row-major.
    fn channels(&self, rows: Range<usize>, outs: &mut [f32]) {
        let matrix = self.matrix;
        let groups = matrix.groups;
        let count = self.inputs.len();
        let run = ChannelRun {
            bytes: &matrix.stream
                [rows.start * matrix.bytes_per_row..rows.end * matrix.bytes_per_row],
            row_bytes: matrix.bytes_per_row,
            scales: &matrix.scales[rows.start * groups..rows.end * groups],
            zeros: &matrix.zeros[rows.start * groups..rows.end * groups],
            groups,
            bits: matrix.bits,
            blocks_per_group: self.blocks_per_group,
        };
        if count == 1 {
            return (self.channel_dots)(&run, &self.inputs[0], outs);
        }
        let mut dots = vec![0.0; rows.len()];
        for (index, input) in self.inputs.iter().enumerate() {
            (self.channel_dots)(&run, input, &mut dots);
            for (offset, &dot) in dots.iter().enumerate() {
                outs[offset * count + index] = dot;
            }
        }
    }
}

/// `Σ_group scale · zero · Σ inputs`: what the zero points take off a channel's code products.
fn zero_terms(scales: &[f32], zeros: &[u8], input_sums: &[f32]) -> f32 {
    scales
        .iter()
        .zip(zeros)
        .zip(input_sums)
        .map(|((&scale, &zero), &sum)| scale * f32::from(zero) * sum)
        .sum()
}

/// `scale * (code - zero)` for the 2-, 4- or 8-bit codes of a byte-aligned stream.
fn decode_byte_aligned(bytes: &[u8], bits: u32, scale: f32, zero: f32, out: &mut [f32]) {
    match bits {
        8 => decode_codes::<1>(bytes, scale, zero, out),
        4 => decode_codes::<2>(bytes, scale, zero, out),
        _ => decode_codes::<4>(bytes, scale, zero, out),
    }
}

/// [`decode_byte_aligned`] with `PER_BYTE` codes a byte known when compiling, so the byte loop
/// unrolls into shifts and masks that vectorize.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn decode_codes<const PER_BYTE: usize>(bytes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    let bits = 8 / PER_BYTE as u32;
    let mask = ((1u16 << bits) - 1) as u8;
    let (whole, tail) = out.split_at_mut(out.len() / PER_BYTE * PER_BYTE);
    for (values, &byte) in whole.chunks_exact_mut(PER_BYTE).zip(bytes) {
        for (position, value) in values.iter_mut().enumerate() {
            let code = (byte >> (position as u32 * bits)) & mask;
            *value = scale * (f32::from(code) - zero);
        }
    }
    if let Some(&byte) = bytes.get(whole.len() / PER_BYTE) {
        for (position, value) in tail.iter_mut().enumerate() {
            let code = (byte >> (position as u32 * bits)) & mask;
            *value = scale * (f32::from(code) - zero);
        }
    }
}

/// `scale * (code - zero)` for 3-bit codes starting on a byte boundary: each 3 bytes hold 8
/// codes, cut out of one 24-bit word.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn decode_triples(bytes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    let (whole, tail) = out.split_at_mut(out.len() / 8 * 8);
    for (values, triple) in whole.chunks_exact_mut(8).zip(bytes.chunks_exact(3)) {
        let word = u32::from_le_bytes([triple[0], triple[1], triple[2], 0]);
        for (position, value) in values.iter_mut().enumerate() {
            let code = (word >> (3 * position)) & 7;
            *value = scale * (code as f32 - zero);
        }
    }
    for (position, value) in tail.iter_mut().enumerate() {
        let code = code_at(&bytes[whole.len() * 3 / 8..], 3, position);
        *value = scale * (code as f32 - zero);
    }
}

/// One input row as `codes_per_byte` arrays of `bytes` entries: array `p` holds the inputs of
/// the codes at position `p` of each byte (`input[k * codes_per_byte + p]`), zero past the end.
fn split_by_code_position(input: &[f32], codes_per_byte: usize, bytes: usize) -> Vec<f32> {
    let mut phases = vec![0.0; codes_per_byte * bytes];
    for (col, &value) in input.iter().enumerate() {
        phases[(col % codes_per_byte) * bytes + col / codes_per_byte] = value;
    }
    phases
}

/// One output channel's packed codes, cut into groups of `group_bytes` bytes (the last may be
/// shorter) with one scale each.
struct RowGroups<'a> {
    bytes: &'a [u8],
    bits: u32,
    group_bytes: usize,
    scales: &'a [f32],
}

/// Lanes of independent partial sums: two AVX-512 registers of f32, enough to hide the adds'
/// latency, and one chunk covers a 128-column group of 2-bit codes.
const LANES: usize = 32;

/// The fastest function of the [kernel family](crate::cpu::kernel_family) in use for
/// `Σ_group scale · (codes · inputs)` over one
/// channel's 2-, 4- or 8-bit codes, whose byte `k` holds the codes of inputs
/// `phases[p * stride + k]` (position `p` in the byte, lowest bits first), chosen once per
/// product. Codes are widened to floats in registers, never stored, and the partial sums stay
/// in lanes across groups, reduced once per channel.
fn scaled_code_dot() -> fn(&RowGroups, &[f32], usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernel_family() >= crate::cpu::KernelFamily::Avx2 {
        return x86::avx2_scaled_code_dot;
    }
    scaled_code_dot_portable
}

/// [`scaled_code_dot`]'s function for any CPU, in a shape compilers vectorize.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn scaled_code_dot_portable(row: &RowGroups, phases: &[f32], stride: usize) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut tails = 0.0f32;
    let codes_per_byte = 8 / row.bits as usize;
    let mask = ((1u16 << row.bits) - 1) as u8;
    for (group, &scale) in row.scales.iter().enumerate() {
        let first = group * row.group_bytes;
        let last = (first + row.group_bytes).min(row.bytes.len());
        let bytes = &row.bytes[first..last];
        let mut group_lanes = [0.0f32; LANES];
        let mut group_tail = 0.0f32;
        for position in 0..codes_per_byte {
            let inputs = &phases[position * stride + first..position * stride + last];
            let shift = position as u32 * row.bits;
            let (byte_chunks, input_chunks) =
                (bytes.chunks_exact(LANES), inputs.chunks_exact(LANES));
            group_tail += byte_chunks
                .remainder()
                .iter()
                .zip(input_chunks.remainder())
                .map(|(&byte, &input)| f32::from((byte >> shift) & mask) * input)
                .sum::<f32>();
            for (bytes, inputs) in byte_chunks.zip(input_chunks) {
                for lane in 0..LANES {
                    group_lanes[lane] += f32::from((bytes[lane] >> shift) & mask) * inputs[lane];
                }
            }
        }
        for lane in 0..LANES {
            lanes[lane] += scale * group_lanes[lane];
        }
        tails += scale * group_tail;
    }
    lanes.iter().sum::<f32>() + tails
}

/// The AVX2 kernel: 16 bytes of codes at a time, each code position shifted and masked out of
/// the bytes, widened to eight-lane floats and fused-multiply-added onto its inputs.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::RowGroups;
    use crate::int8_inputs::x86::horizontal_sum;

    /// Only handed out by [`super::scaled_code_dot`] once the CPU's features have been checked.
    pub(super) fn avx2_scaled_code_dot(row: &RowGroups, phases: &[f32], stride: usize) -> f32 {
        // SAFETY: `super::scaled_code_dot` returns this function only when the CPU has AVX2
        // and FMA.
        unsafe { scaled_code_dot(row, phases, stride) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn scaled_code_dot(row: &RowGroups, phases: &[f32], stride: usize) -> f32 {
        let bits = row.bits as usize;
        let mask = _mm_set1_epi8(((1u16 << bits) - 1) as u8 as i8);
        let mut total = _mm256_setzero_ps();
        let mut tails = 0.0f32;
        for (group, &scale) in row.scales.iter().enumerate() {
            let first = group * row.group_bytes;
            let last = (first + row.group_bytes).min(row.bytes.len());
            let bytes = &row.bytes[first..last];
            let whole = bytes.len() - bytes.len() % 16;
            let mut low_sums = _mm256_setzero_ps();
            let mut high_sums = _mm256_setzero_ps();
            let mut group_tail = 0.0f32;
            for position in 0..8 / bits {
                let inputs = &phases[position * stride + first..position * stride + last];
                let shift = position * bits;
                let shift_count = _mm_cvtsi32_si128(shift as i32);
                for start in (0..whole).step_by(16) {
                    // SAFETY: `start + 16 <= whole <= bytes.len() == inputs.len()`.
                    let (packed, low_inputs, high_inputs) = unsafe {
                        (
                            _mm_loadu_si128(bytes.as_ptr().add(start).cast()),
                            _mm256_loadu_ps(inputs.as_ptr().add(start)),
                            _mm256_loadu_ps(inputs.as_ptr().add(start + 8)),
                        )
                    };
                    // A 16-bit shift pulls the next byte's bits into each byte's top; the mask,
                    // narrower than 8 - shift bits, drops them.
                    let codes = _mm_and_si128(_mm_srl_epi16(packed, shift_count), mask);
                    let low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
                    let high =
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)));
                    low_sums = _mm256_fmadd_ps(low, low_inputs, low_sums);
                    high_sums = _mm256_fmadd_ps(high, high_inputs, high_sums);
                }
                let code_mask = ((1u16 << bits) - 1) as u8;
                group_tail += bytes[whole..]
                    .iter()
                    .zip(&inputs[whole..])
                    .map(|(&byte, &input)| f32::from((byte >> shift) & code_mask) * input)
                    .sum::<f32>();
            }
            let group_sums = _mm256_add_ps(low_sums, high_sums);
            total = _mm256_fmadd_ps(_mm256_set1_ps(scale), group_sums, total);
            tails += scale * group_tail;
        }
        horizontal_sum(total) + tails
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gptq::{QuantSettings, int8_absmax, round_to_nearest};
    use crate::products::TILE_CHANNELS;
    use crate::test_support::random_matrix;

    fn quantized(
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: Option<usize>,
    ) -> QuantizedMatrix {
        let settings = QuantSettings {
            bits,
            group_size,
            symmetric: false,
            clip_search: false,
        };
        round_to_nearest(
            &random_matrix(rows, cols, u64::from(bits)),
            rows,
            cols,
            &settings,
        )
        .unwrap()
    }

    #[test]
    fn packed_matrices_decode_exactly_what_was_quantized() {
        // 100 columns end on a short group that is not a whole number of bytes of codes.
        for bits in [2, 3, 4, 8] {
            for cols in [96, 100] {
                for group_size in [None, Some(32), Some(40)] {
                    let matrix = quantized(32, cols, bits, group_size);
                    let packed = PackedMatrix::from_quantized(&matrix);
                    assert_eq!(packed.dequantize(), matrix.dequantize(), "{bits} bits");
                }
            }
        }
    }

    #[test]
    fn matmul_and_gather_agree_with_the_dequantized_matrix() {
        // 3 bits straddle words and act-order scatters groups: channels decode whole; 4 and 8
        // bits in groups of 16 (and a short last group) go group by group.
        for (bits, cols, group_index) in [
            (3, 64, None),
            (4, 64, None),
            (8, 72, None),
            (
                4,
                64,
                Some((0..64u32).map(|col| col % 4).collect::<Vec<_>>()),
            ),
            (
                3,
                64,
                Some((0..64u32).map(|col| (col * 5 + 2) % 4).collect::<Vec<_>>()),
            ),
        ] {
            let mut matrix = quantized(40, cols, bits, Some(16));
            if let Some(group_index) = group_index {
                matrix.group_index = group_index;
            }
            check_matmul(&PackedMatrix::from_quantized(&matrix));
        }
        // Two whole tiles of channels and a part of one.
        check_matmul(&PackedMatrix::from_quantized(&quantized(
            2 * TILE_CHANNELS + 9,
            64,
            4,
            Some(32),
        )));
    }

    fn check_matmul(packed: &PackedMatrix) {
        let (rows, cols, count) = (packed.rows(), packed.cols(), 3);
        let weights = packed.dequantize();
        let x = random_matrix(count, cols, 99);
        for y in [packed.matmul(&x, count), packed.matmul_in_tiles(&x, count)] {
            for sample in 0..count {
                for row in 0..rows {
                    let expected: f32 = (0..cols)
                        .map(|col| x[sample * cols + col] * weights[row * cols + col])
                        .sum();
                    let got = y[sample * rows + row];
                    assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
                }
            }
        }
        assert_eq!(
            packed.gather_rows(&[3, 0]),
            [&weights[3 * cols..4 * cols], &weights[..cols]].concat()
        );
    }

    #[test]
    fn int8_input_products_are_the_rounded_inputs_times_the_weights() {
        let count = 3;
        for (bits, group_size) in [
            (3, Some(32)),
            (3, Some(64)),
            (4, Some(32)),
            (4, Some(64)),
            (8, Some(32)),
            (8, None),
        ] {
            let packed = PackedMatrix::from_quantized(&quantized(40, 128, bits, group_size));
            assert!(packed.integer_group_size().is_some());
            let weights = packed.dequantize();
            let x = random_matrix(count, 128, 98);
            let y = packed.matmul_int8_inputs(&x, count);
            let exact = packed.matmul(&x, count);
            for (sample, input) in x.chunks_exact(128).enumerate() {
                let blocks_per_group = group_size.unwrap_or(128) / int8_inputs::BLOCK;
                let rounded = Int8Inputs::new(input, bits, blocks_per_group).dequantize();
                for row in 0..40 {
                    let expected: f32 = (0..128)
                        .map(|col| rounded[col] * weights[row * 128 + col])
                        .sum();
                    let got = y[sample * 40 + row];
                    assert!(
                        (got - expected).abs() < 1e-4,
                        "{bits} bits: {got} vs {expected}"
                    );
                    // Rounding the inputs moves each product by at most half an input step per
                    // column: a bound, and a check that the inputs were rounded at all.
                    let step_bound: f32 = (0..128)
                        .map(|col| weights[row * 128 + col].abs() * (1.0 / 254.0))
                        .sum();
                    assert!((got - exact[sample * 40 + row]).abs() <= step_bound);
                }
            }
        }
        // 2-bit codes and groups of 16 columns have no integer kernel: exact products.
        for (bits, group_size) in [(2, Some(32)), (4, Some(16))] {
            let packed = PackedMatrix::from_quantized(&quantized(40, 128, bits, group_size));
            let x = random_matrix(count, 128, 97);
            assert_eq!(
                packed.matmul_int8_inputs(&x, count),
                packed.matmul(&x, count)
            );
        }
    }

    #[test]
    fn products_together_equal_products_one_by_one() {
        let x = random_matrix(2, 128, 95);
        // The first two round their inputs alike and share them.
        let integer = [
            PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32))),
            PackedMatrix::from_quantized(&quantized(48, 128, 4, Some(32))),
            PackedMatrix::from_quantized(&quantized(40, 128, 4, Some(64))),
            PackedMatrix::from_quantized(&quantized(96, 128, 8, None)),
        ];
        // Groups of 16 have no integer kernel: every matrix is then computed on its own.
        let mixed = [
            PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32))),
            PackedMatrix::from_quantized(&quantized(32, 128, 4, Some(16))),
        ];
        for matrices in [&integer[..], &mixed[..]] {
            let references: Vec<&PackedMatrix> = matrices.iter().collect();
            let together = PackedMatrix::matmul_int8_inputs_together(&references, &x, 2);
            for (matrix, outputs) in matrices.iter().zip(together) {
                assert_eq!(outputs, matrix.matmul_int8_inputs(&x, 2));
            }
        }
    }

    #[test]
    fn act_order_matrices_compute_like_their_groups_in_runs() {
        // Column c = 4j + g of the scattered matrix is column 32g + j of the consecutive one:
        // its group is c % 4, and sorting by group gives back the consecutive order.
        let (rows, cols) = (32, 128);
        let spread = |col: usize| 32 * (col % 4) + col / 4;
        for bits in [3, 4, 8] {
            let consecutive = quantized(rows, cols, bits, Some(32));
            let mut scattered = consecutive.clone();
            for row in 0..rows {
                for col in 0..cols {
                    scattered.codes[row * cols + col] = consecutive.codes[row * cols + spread(col)];
                }
            }
            scattered.group_index = (0..cols as u32).map(|col| col % 4).collect();
            let (consecutive, scattered) = (
                PackedMatrix::from_quantized(&consecutive),
                PackedMatrix::from_quantized(&scattered),
            );
            let x = random_matrix(2, cols, 96);
            let x_scattered: Vec<f32> = (0..2 * cols)
                .map(|index| x[index / cols * cols + spread(index % cols)])
                .collect();
            assert_eq!(
                scattered.matmul_int8_inputs(&x_scattered, 2),
                consecutive.matmul_int8_inputs(&x, 2),
                "{bits} bits"
            );
            assert_eq!(scattered.matmul(&x_scattered, 2), consecutive.matmul(&x, 2));
            let weights = consecutive.dequantize();
            let expected: Vec<f32> = (0..rows * cols)
                .map(|index| weights[index / cols * cols + spread(index % cols)])
                .collect();
            assert_eq!(scattered.dequantize(), expected);
            let tensors = scattered.to_gptq().unwrap();
            assert_eq!(tensors.g_idx, scattered.group_index);
            assert_eq!(PackedMatrix::from_gptq(&tensors).unwrap(), scattered);
            check_matmul(&scattered);
        }
    }

    #[test]
    fn gptq_tensors_round_trip_and_store_zeros_minus_one() {
        for bits in [2, 3, 4, 8] {
            let packed = PackedMatrix::from_quantized(&quantized(32, 64, bits, Some(32)));
            let tensors = packed.to_gptq().unwrap();
            assert_eq!(tensors.qweight.len(), 64 * bits as usize / 32 * 32);
            assert_eq!(PackedMatrix::from_gptq(&tensors).unwrap(), packed);
        }
        // One output channel's grid with zero 8 stores 7 in its nibble.
        let int8 = int8_absmax(&random_matrix(32, 32, 4), 32, 32, None).unwrap();
        let tensors = PackedMatrix::from_quantized(&int8).to_gptq().unwrap();
        assert_eq!(tensors.qzeros[0], 0x7f7f_7f7f, "zero 128 is stored as 127");
    }

    #[test]
    fn qweight_packs_each_output_channel_along_the_inputs() {
        // 32 outputs of 8 inputs at 4 bits: output `o` has codes (o + i) % 16, so its one word
        // of qweight holds nibbles o, o + 1, ..., o + 7 from the low end.
        let (rows, cols) = (32, 8);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|index| ((index / cols + index % cols) % 16) as u8)
            .collect();
        let grid = crate::Grid {
            scale: 1.0,
            zero: 8,
            max_code: 15,
        };
        let matrix = QuantizedMatrix {
            rows,
            cols,
            bits: 4,
            codes,
            grids: vec![grid; rows],
            group_index: vec![0; cols],
        };
        let tensors = PackedMatrix::from_quantized(&matrix).to_gptq().unwrap();
        assert_eq!(tensors.shapes()[0], vec![1, 32]);
        assert_eq!(tensors.qweight[0], 0x7654_3210);
        assert_eq!(tensors.qweight[1], 0x8765_4321);
        assert_eq!(tensors.qweight[9], 0x0FED_CBA9);
        assert_eq!(tensors.qzeros, vec![0x7777_7777; 4], "zero 8 stored as 7");
        assert_eq!(tensors.scales, vec![0x3c00; 32]);
    }

    #[test]
    fn malformed_gptq_tensors_are_errors() {
        let good = PackedMatrix::from_quantized(&quantized(32, 64, 4, Some(32)))
            .to_gptq()
            .unwrap();
        let cases: Vec<(GptqTensors, &str)> = vec![
            (
                GptqTensors {
                    bits: 5,
                    ..good.clone()
                },
                "bits = 5",
            ),
            (
                GptqTensors {
                    qweight: good.qweight[1..].to_vec(),
                    ..good.clone()
                },
                "qweight holds",
            ),
            (
                GptqTensors {
                    g_idx: vec![2; 64],
                    ..good.clone()
                },
                "g_idx names group 2",
            ),
            (
                GptqTensors {
                    scales: vec![0x7c00; good.scales.len()],
                    ..good.clone()
                },
                "not a positive number",
            ),
            (
                GptqTensors {
                    cols: 63,
                    ..good.clone()
                },
                "whole 32-bit words",
            ),
        ];
        for (tensors, message) in cases {
            let error = PackedMatrix::from_gptq(&tensors).unwrap_err().to_string();
            assert!(error.contains(message), "{error}");
        }
    }

    #[test]
    fn int8_in_blocks_of_32_is_recognized() {
        let weights = random_matrix(4, 64, 12);
        let by_32 = PackedMatrix::from_quantized(&int8_absmax(&weights, 4, 64, Some(32)).unwrap());
        assert!(by_32.is_int8_in_groups_of(32));
        let per_row = PackedMatrix::from_quantized(&int8_absmax(&weights, 4, 64, None).unwrap());
        assert!(!per_row.is_int8_in_groups_of(32));
        let rtn8 = PackedMatrix::from_quantized(&quantized(4, 64, 8, Some(32)));
        assert!(!rtn8.is_int8_in_groups_of(32), "asymmetric zeros");
    }

    #[test]
    fn stored_bytes_count_every_gptq_tensor() {
        let packed = PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32)));
        let tensors = packed.to_gptq().unwrap();
        let bytes = 4 * (tensors.qweight.len() + tensors.qzeros.len() + tensors.g_idx.len())
            + 2 * tensors.scales.len();
        assert_eq!(packed.stored_bytes(), bytes);
    }
}
