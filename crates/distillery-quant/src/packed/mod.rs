//! Quantized weight matrices in the form layers compute with: their storage here, their
//! products with float inputs and their GPTQ file layout in the submodules.
//!
//! In memory each output channel's codes form one little-endian bit stream along the input
//! dimension (see [`crate::pack`]), kept as bytes, so a channel decodes from contiguous bytes.
//! GPTQ files hold the same streams transposed: `qweight[word, out]`, zeros packed along the
//! output dimension, f16 scales, and the group of every input column.

mod gptq_layout;
mod products;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::f16::{f16_to_f32, f32_to_f16};
use crate::gptq::QuantizedMatrix;
use crate::int8_inputs::BLOCK;
use crate::interleaved::{self, BLOCK_CODES, GROUP_ROWS, Layout, Shape};
use crate::pack::{code_at, pack_bits};

pub use gptq_layout::GptqTensors;

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
    /// `rows x groups` half-precision bits: every scale is a half-precision number (see
    /// [`crate::grid`]), as GPTQ files store it, so keeping the bits loses nothing and halves
    /// the scales' share of what a decoding step reads.
    scales: Vec<u16>,
    /// `rows x groups`, or one row of `groups` that every channel shares (symmetric grids put
    /// every zero at the middle code): then the zero points cost a decoding step no reads.
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
    /// When the rows are [interleaved](interleaved) for the kernel of [`Layout::Packed`],
    /// their shape: then `stream` holds the interleaved rows with their scales, and `scales`
    /// is empty.
    interleaved: Option<Shape>,
}

impl PackedMatrix {
    pub fn from_quantized(matrix: &QuantizedMatrix) -> Self {
        let (rows, cols, bits) = (matrix.rows, matrix.cols, matrix.bits);
        let groups = matrix.groups();
        let bytes_per_row = 4 * (cols * bits as usize).div_ceil(32);
        let mut stream = Vec::with_capacity(rows * bytes_per_row);
        let mut scales = vec![0; rows * groups];
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
                scales[row * groups + group] = f32_to_f16(grid.scale);
                zeros[row * groups + group] = grid.zero as u8;
            }
        }
        Self::from_channels(
            (rows, cols, bits),
            stream,
            scales,
            zeros,
            matrix.group_index.clone(),
        )
    }

    /// A `rows x cols` matrix of `bits`-bit codes from each channel's packed bytes (`stream`,
    /// the same count per channel), a scale and a zero per channel and group (`scales`, `zeros`,
    /// channel-major) and the group of every input column; scattered groups are sorted into
    /// runs.
    fn from_channels(
        (rows, cols, bits): (usize, usize, u32),
        stream: Vec<u8>,
        scales: Vec<u16>,
        zeros: Vec<u8>,
        group_index: Vec<u32>,
    ) -> Self {
        let groups = scales.len() / rows;
        let shared = zeros
            .chunks_exact(groups.max(1))
            .all(|row| row == &zeros[..groups]);
        let zeros = if shared {
            zeros[..groups].to_vec()
        } else {
            zeros
        };
        Self {
            rows,
            cols,
            bits,
            groups,
            bytes_per_row: stream.len() / rows,
            stream,
            scales,
            zeros,
            group_index,
            order: None,
            run_size: None,
            interleaved: None,
        }
        .with_groups_in_runs()
        .with_rows_interleaved()
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
            + 2 * self.scales.len()
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
        let zeros = self.channel_zeros(row);
        if let Some(shape) = self.interleaved {
            // Straight from the tiles, a block's codes at a time: prompts decode every row.
            for (block, values) in out.chunks_exact_mut(BLOCK).enumerate() {
                let group = block / shape.blocks_per_group;
                let scale = f16_to_f32(shape.halves(&self.stream, row, group)[0]);
                let codes = shape.codes(&self.stream, row, block);
                decode_byte_aligned(&codes, self.bits, scale, f32::from(zeros[group]), values);
            }
            return;
        }
        let (mut code_buffer, mut scale_buffer) = (Vec::new(), Vec::new());
        let (bytes, scales) = self.channel(row, &mut code_buffer, &mut scale_buffer);
        if let Some(size) = aligned {
            let bits = self.bits as usize;
            for (group, values) in out.chunks_mut(size).enumerate() {
                let start = group * size * bits / 8;
                let zero = f32::from(zeros[group]);
                let scale = f16_to_f32(scales[group]);
                decode_byte_aligned(&bytes[start..], self.bits, scale, zero, values);
            }
            return;
        }
        if let Some(size) = self.run_size.filter(|size| self.bits == 3 && size % 8 == 0) {
            for (group, values) in out.chunks_mut(size).enumerate() {
                let zero = f32::from(zeros[group]);
                let scale = f16_to_f32(scales[group]);
                decode_triples(&bytes[group * size * 3 / 8..], scale, zero, values);
            }
            return;
        }
        for (position, value) in out.iter_mut().enumerate() {
            let code = code_at(bytes, self.bits, position) as f32;
            let group = self.group_index[self.column(position)] as usize;
            *value = f16_to_f32(scales[group]) * (code - f32::from(zeros[group]));
        }
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

    /// Interleaves 4-bit rows in groups of whole blocks with zero points every row shares,
    /// where the CPU has the kernel for them (act-order matrices too: their stored order has
    /// groups in runs).
    fn with_rows_interleaved(mut self) -> Self {
        let Some(size) = self.run_size else {
            return self;
        };
        let fits = self.bits == 4
            && self.zero_stride() == 0
            && size.is_multiple_of(BLOCK)
            && self.cols.is_multiple_of(size)
            && self.rows.is_multiple_of(GROUP_ROWS)
            && interleaved::kernel(Layout::Packed).is_some();
        if !fits {
            return self;
        }
        let shape = Shape {
            blocks: self.cols / BLOCK,
            blocks_per_group: size / BLOCK,
            minima: false,
        };
        let (stream, scales, groups) = (&self.stream, &self.scales, self.groups);
        let bytes_per_row = self.bytes_per_row;
        self.stream = shape.interleave(
            self.rows,
            |row, group| [scales[row * groups + group], 0],
            |row, block| &stream[row * bytes_per_row + block * BLOCK_CODES..],
        );
        self.scales = Vec::new();
        self.interleaved = Some(shape);
        self
    }

    fn sort_groups_into_runs(&mut self) {
        let mut order: Vec<u32> = (0..self.cols as u32).collect();
        order.sort_by_key(|&col| self.group_index[col as usize]);
        let mut stream = Vec::with_capacity(self.stream.len());
        let (mut code_buffer, mut scale_buffer) = (Vec::new(), Vec::new());
        for row in 0..self.rows {
            let (bytes, _) = self.channel(row, &mut code_buffer, &mut scale_buffer);
            let codes: Vec<u32> = order
                .iter()
                .map(|&col| code_at(bytes, self.bits, col as usize))
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
    fn inputs_in_stored_order<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match &self.order {
            None => Cow::Borrowed(x),
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

    /// The matrix of the rows named by `ids`, in that order, with their codes, scales and
    /// zeros unchanged.
    pub fn select_rows(&self, ids: &[usize]) -> Self {
        let (mut code_buffer, mut scale_buffer) = (Vec::new(), Vec::new());
        let mut stream = Vec::with_capacity(ids.len() * self.bytes_per_row);
        let mut scales = Vec::with_capacity(ids.len() * self.groups);
        let mut zeros = Vec::with_capacity(ids.len() * self.groups);
        for &id in ids {
            let (codes, channel_scales) = self.channel(id, &mut code_buffer, &mut scale_buffer);
            stream.extend_from_slice(&codes[..self.bytes_per_row]);
            scales.extend_from_slice(channel_scales);
            zeros.extend_from_slice(self.channel_zeros(id));
        }
        if self.zero_stride() == 0 {
            zeros.truncate(self.groups);
        }
        // The codes stay in stored order, so the column order and group runs carry over.
        Self {
            rows: ids.len(),
            stream,
            scales,
            zeros,
            interleaved: None,
            ..self.clone()
        }
        .with_rows_interleaved()
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

    /// How far apart consecutive channels' zero points lie: 0 when every channel shares them.
    fn zero_stride(&self) -> usize {
        if self.zeros.len() == self.groups {
            0
        } else {
            self.groups
        }
    }

    /// Output channel `row`'s zero point in each group.
    fn channel_zeros(&self, row: usize) -> &[u8] {
        let start = row * self.zero_stride();
        &self.zeros[start..start + self.groups]
    }

    /// Output channel `row`'s codes (one bit stream) and scales (half-precision bits, one a
    /// group): borrowed from rows in file order, gathered into `codes` and `scales` from
    /// interleaved ones, so a caller that reads many rows reuses its buffers.
    fn channel<'a>(
        &'a self,
        row: usize,
        codes: &'a mut Vec<u8>,
        scales: &'a mut Vec<u16>,
    ) -> (&'a [u8], &'a [u16]) {
        let Some(shape) = self.interleaved else {
            return (
                &self.stream[row * self.bytes_per_row..(row + 1) * self.bytes_per_row],
                &self.scales[row * self.groups..(row + 1) * self.groups],
            );
        };
        shape.row_codes(&self.stream, row, codes);
        shape.row_scales(&self.stream, row, scales);
        (codes, scales)
    }

    /// Output channel `row`'s scale of group `group`, as half-precision bits.
    fn scale_bits(&self, row: usize, group: usize) -> u16 {
        match self.interleaved {
            Some(shape) => shape.halves(&self.stream, row, group)[0],
            None => self.scales[row * self.groups + group],
        }
    }
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
