//! Products of a packed matrix with float inputs: few rows straight from the codes, many rows
//! tile by tile, and decoding rows rounded to int8 and multiplied in integers.

use std::ops::Range;
use std::sync::Arc;

use multiversion::multiversion;

use super::PackedMatrix;
use crate::f16::f16_to_f32;
use crate::int8_inputs::{self, ChannelDots, ChannelRun, Int8Inputs};
use crate::interleaved::{self, Layout};
use crate::products::{dot, in_tiles, input_major, together};

impl PackedMatrix {
    /// `x Wᵀ` for `count` input rows `x` (`count x cols`): `count x rows`. The float matrix
    /// never exists whole. With consecutive word-aligned groups of 2, 4 or 8 bits, each
    /// channel's group contributes `scale * (x · codes - zero * Σx)`, the dot product read
    /// straight from the packed bytes: the inputs are split once into one array per code
    /// position within a byte, so the k-th byte's codes meet their inputs at index k of every
    /// array. Otherwise each channel is decoded into a scratch row.
    pub fn matmul(&self, x: &[f32], count: usize) -> Vec<f32> {
        let x = &*self.inputs_in_stored_order(x);
        let (cols, groups, bits) = (self.cols, self.groups, self.bits as usize);
        // Interleaved rows decode straight from their tiles faster than they gather into a
        // stream for the phases.
        let grouped = self
            .word_aligned_group_size()
            .filter(|_| self.interleaved.is_none());
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
        // `buffers` holds an interleaved row's codes and scales, gathered once a row.
        let channel_outputs = |row: usize,
                               scratch: &mut Vec<f32>,
                               buffers: &mut (Vec<u8>, Vec<u16>),
                               out: &mut [f32]| {
            let Some(size) = grouped else {
                scratch.resize(cols, 0.0);
                self.decode_stored_row(row, scratch, None);
                for (input, value) in x.chunks_exact(cols).zip(out.iter_mut()) {
                    *value = dot(input, scratch);
                }
                return;
            };
            let (bytes, scales) = self.channel(row, &mut buffers.0, &mut buffers.1);
            let row_groups = RowGroups {
                bytes,
                bits: self.bits,
                group_bytes: size * bits / 8,
                scales,
            };
            let zeros = self.channel_zeros(row);
            for (index, value) in out.iter_mut().enumerate() {
                let phases = &phases[index * phases_per_input..(index + 1) * phases_per_input];
                let sums = &group_sums[index * groups..(index + 1) * groups];
                *value = code_dot(&row_groups, phases, self.bytes_per_row)
                    - zero_terms(row_groups.scales, zeros, sums);
            }
        };
        input_major((self.rows, self.cols), count, |rows, outs| {
            let (mut scratch, mut buffers) = (Vec::new(), (Vec::new(), Vec::new()));
            for (row, out) in rows.zip(outs.chunks_exact_mut(count)) {
                channel_outputs(row, &mut scratch, &mut buffers, out);
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
        input_major((self.rows, self.cols), count, |rows, outs| {
            product.channels(rows, outs)
        })
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
        // The interleaved kernel meets each block's inputs on their own.
        let input_grouping = if self.interleaved.is_some() {
            1
        } else {
            blocks_per_group
        };
        let shared = previous.filter(|previous| {
            let other = previous.matrix;
            (other.bits, previous.input_grouping) == (self.bits, input_grouping)
                && other.order.is_none()
                && self.order.is_none()
        });
        let inputs = match shared {
            Some(previous) => Arc::clone(&previous.inputs),
            None => Arc::new(
                self.inputs_in_stored_order(x)
                    .chunks_exact(self.cols)
                    .take(count)
                    .map(|input| Int8Inputs::new(input, self.bits, input_grouping))
                    .collect(),
            ),
        };
        Some(IntegerProduct {
            matrix: self,
            blocks_per_group,
            input_grouping,
            inputs,
            channel_dots: int8_inputs::channel_dots(self.bits),
        })
    }

    /// The group size when [`Self::matmul_int8_inputs`] can multiply in integers.
    pub(super) fn integer_group_size(&self) -> Option<usize> {
        let size = self.run_size?;
        let fits = matches!(self.bits, 3 | 4 | 8)
            && size.is_multiple_of(int8_inputs::BLOCK)
            && self.cols.is_multiple_of(int8_inputs::BLOCK);
        fits.then_some(size)
    }
}

/// An int8-input product in progress: one matrix and its rounded inputs.
struct IntegerProduct<'a> {
    matrix: &'a PackedMatrix,
    blocks_per_group: usize,
    /// The blocks a group the inputs were rounded for (their order and sums).
    input_grouping: usize,
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
        let interleaved_dot = interleaved::kernel(Layout::Packed);
        if let (Some(shape), Some(dot)) = (matrix.interleaved, interleaved_dot) {
            let input = |index: usize| self.inputs[index].for_interleaved(&matrix.zeros);
            let stream = &matrix.stream;
            return interleaved::channels(dot, stream, shape, rows, count, input, outs);
        }
        let run = ChannelRun {
            bytes: &matrix.stream
                [rows.start * matrix.bytes_per_row..rows.end * matrix.bytes_per_row],
            row_bytes: matrix.bytes_per_row,
            scales: &matrix.scales[rows.start * groups..rows.end * groups],
            zeros: &matrix.zeros[rows.start * matrix.zero_stride()..],
            zero_stride: matrix.zero_stride(),
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
fn zero_terms(scales: &[u16], zeros: &[u8], input_sums: &[f32]) -> f32 {
    scales
        .iter()
        .zip(zeros)
        .zip(input_sums)
        .map(|((&scale, &zero), &sum)| f16_to_f32(scale) * f32::from(zero) * sum)
        .sum()
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
    /// Half-precision bits.
    scales: &'a [u16],
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
        let scale = f16_to_f32(scale);
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
    use crate::f16::f16_to_f32;
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
            let scale = f16_to_f32(scale);
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
