//! Integer dot products for decoding: the input vector rounded to int8 in blocks of 32
//! columns (one f32 scale each, as llama.cpp rounds activations for its quantized matrices),
//! multiplied with the 4- or 8-bit weight codes in 32-bit integer sums, which are exact; only
//! the block and group scales are applied in floating point.

/// Columns sharing one input scale; a weight group of a multiple of this size holds whole
/// blocks, and a block's codes fill one 256-bit register at 8 bits and half of one at 4.
pub const BLOCK: usize = 32;

/// One input row rounded to int8 per block, laid out in the order the codes unpack: at 8
/// bits column order, at 4 bits each block's even columns (low nibbles) then its odd columns
/// (high nibbles).
#[derive(Debug, Clone)]
pub struct Int8Inputs {
    values: Vec<i8>,
    scales: Vec<f32>,
    /// `scale * Σ values` of each block: what the zero points multiply.
    sums: Vec<f32>,
}

impl Int8Inputs {
    /// `input.len()` must be a multiple of [`BLOCK`].
    pub fn new(input: &[f32], bits: u32) -> Self {
        debug_assert!(input.len().is_multiple_of(BLOCK));
        let blocks = input.len() / BLOCK;
        let mut values = vec![0i8; input.len()];
        let mut scales = Vec::with_capacity(blocks);
        let mut sums = Vec::with_capacity(blocks);
        for (block, (columns, out)) in input
            .chunks_exact(BLOCK)
            .zip(values.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let absmax = columns
                .iter()
                .fold(0.0f32, |max, value| max.max(value.abs()));
            let scale = absmax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (column, &value) in columns.iter().enumerate() {
                let slot = if bits == 4 {
                    column / 2 + (column % 2) * (BLOCK / 2)
                } else {
                    column
                };
                let rounded = (value * inverse).round().clamp(-127.0, 127.0) as i8;
                out[slot] = rounded;
                sum += i32::from(rounded);
            }
            scales.push(scale);
            sums.push(scale * sum as f32);
            debug_assert_eq!(scales.len(), block + 1);
        }
        Self {
            values,
            scales,
            sums,
        }
    }

    /// The input as these integers stand for it, in column order.
    pub fn dequantize(&self, bits: u32) -> Vec<f32> {
        let mut out = vec![0.0; self.values.len()];
        for (block, (values, columns)) in self
            .values
            .chunks_exact(BLOCK)
            .zip(out.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            for (column, value) in columns.iter_mut().enumerate() {
                let slot = if bits == 4 {
                    column / 2 + (column % 2) * (BLOCK / 2)
                } else {
                    column
                };
                *value = self.scales[block] * f32::from(values[slot]);
            }
        }
        out
    }

    /// `Σ scale · Σ values` over the blocks `blocks`.
    pub fn block_sums(&self, blocks: std::ops::Range<usize>) -> f32 {
        self.sums[blocks].iter().sum()
    }
}

/// One output channel: its packed codes (`bits * BLOCK / 8` bytes a block) and one scale per
/// group of `blocks_per_group` blocks.
pub struct ChannelCodes<'a> {
    pub bytes: &'a [u8],
    pub bits: u32,
    pub blocks_per_group: usize,
    pub scales: &'a [f32],
}

/// `Σ_group scale · Σ_block input_scale · (codes · inputs)`: the channel's dot product with
/// the rounded inputs, zero points left out.
pub fn channel_dot(channel: &ChannelCodes, inputs: &Int8Inputs) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has just been found to support every feature the kernel uses.
        return unsafe { x86::channel_dot(channel, inputs) };
    }
    channel_dot_portable(channel, inputs)
}

fn block_codes(channel: &ChannelCodes, block: usize) -> [u8; BLOCK] {
    let mut codes = [0u8; BLOCK];
    if channel.bits == 8 {
        codes.copy_from_slice(&channel.bytes[block * BLOCK..(block + 1) * BLOCK]);
    } else {
        let bytes = &channel.bytes[block * BLOCK / 2..(block + 1) * BLOCK / 2];
        for (index, &byte) in bytes.iter().enumerate() {
            codes[index] = byte & 0xF;
            codes[index + BLOCK / 2] = byte >> 4;
        }
    }
    codes
}

fn channel_dot_portable(channel: &ChannelCodes, inputs: &Int8Inputs) -> f32 {
    let blocks = inputs.scales.len();
    let mut total = 0.0f32;
    for (group, &scale) in channel.scales.iter().enumerate() {
        let first = group * channel.blocks_per_group;
        let mut group_sum = 0.0f32;
        for block in first..(first + channel.blocks_per_group).min(blocks) {
            let values = &inputs.values[block * BLOCK..(block + 1) * BLOCK];
            let products: i32 = block_codes(channel, block)
                .iter()
                .zip(values)
                .map(|(&code, &value)| i32::from(code) * i32::from(value))
                .sum();
            group_sum += inputs.scales[block] * products as f32;
        }
        total += scale * group_sum;
    }
    total
}

/// With AVX-512 VNNI one `vpdpbusd` multiplies a block's 32 unsigned codes with its 32 signed
/// inputs and sums them in fours into eight 32-bit lanes.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, ChannelCodes, Int8Inputs};

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) fn channel_dot(channel: &ChannelCodes, inputs: &Int8Inputs) -> f32 {
        let blocks = inputs.scales.len();
        let block_bytes = BLOCK * channel.bits as usize / 8;
        assert!(channel.bytes.len() >= blocks * block_bytes);
        assert!(inputs.values.len() >= blocks * BLOCK);
        let nibble = _mm_set1_epi8(0xF);
        let mut total = _mm256_setzero_ps();
        for (group, &scale) in channel.scales.iter().enumerate() {
            let first = group * channel.blocks_per_group;
            let mut group_sum = _mm256_setzero_ps();
            for block in first..(first + channel.blocks_per_group).min(blocks) {
                // SAFETY: the asserts above keep every block's bytes and inputs in bounds.
                let (packed, values) = unsafe {
                    (
                        channel.bytes.as_ptr().add(block * block_bytes),
                        _mm256_loadu_si256(inputs.values.as_ptr().add(block * BLOCK).cast()),
                    )
                };
                let codes = if channel.bits == 8 {
                    // SAFETY: as above, 32 bytes.
                    unsafe { _mm256_loadu_si256(packed.cast()) }
                } else {
                    // SAFETY: as above, 16 bytes.
                    let bytes = unsafe { _mm_loadu_si128(packed.cast()) };
                    let low = _mm_and_si128(bytes, nibble);
                    let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
                    _mm256_set_m128i(high, low)
                };
                let products = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, values);
                group_sum = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(products),
                    _mm256_set1_ps(inputs.scales[block]),
                    group_sum,
                );
            }
            total = _mm256_fmadd_ps(_mm256_set1_ps(scale), group_sum, total);
        }
        let halves = _mm_add_ps(
            _mm256_castps256_ps128(total),
            _mm256_extractf128_ps(total, 1),
        );
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_matrix;

    #[test]
    fn inputs_round_to_int8_within_half_a_step_per_block() {
        let input = random_matrix(1, 96, 21);
        for bits in [4, 8] {
            let rounded = Int8Inputs::new(&input, bits);
            let restored = rounded.dequantize(bits);
            for (block, (original, restored)) in input
                .chunks_exact(BLOCK)
                .zip(restored.chunks_exact(BLOCK))
                .enumerate()
            {
                let step = rounded.scales[block];
                for (a, b) in original.iter().zip(restored) {
                    assert!((a - b).abs() <= step / 2.0 + 1e-7, "{a} vs {b}");
                }
            }
            let all_sums = rounded.block_sums(0..3);
            let expected: f32 = restored.iter().sum();
            assert!((all_sums - expected).abs() < 1e-4);
        }
    }

    #[test]
    fn every_kernel_sums_codes_times_rounded_inputs() {
        let input = random_matrix(1, 128, 22);
        // Codes 0..=255 or 0..=15 from a fixed pattern, groups of two blocks and a short last one.
        for bits in [4u32, 8] {
            let bytes: Vec<u8> = (0..128 * bits as usize / 8)
                .map(|index| (index * 73 + 11) as u8)
                .collect();
            let scales = [0.5f32, -1.25];
            let channel = ChannelCodes {
                bytes: &bytes,
                bits,
                blocks_per_group: 3,
                scales: &scales,
            };
            let rounded = Int8Inputs::new(&input, bits);
            let restored = rounded.dequantize(bits);
            let mask = (1u32 << bits) - 1;
            let terms: Vec<f32> = (0..128)
                .map(|column| {
                    let start = column * bits as usize;
                    let code = (u32::from(bytes[start / 8]) >> (start % 8)) & mask;
                    let scale = scales[column / (3 * BLOCK)];
                    scale * code as f32 * restored[column]
                })
                .collect();
            let expected: f32 = terms.iter().sum();
            let portable = channel_dot_portable(&channel, &rounded);
            let dispatched = channel_dot(&channel, &rounded);
            let bound = 1e-6 * terms.iter().map(|term| term.abs()).sum::<f32>();
            assert!(
                (portable - expected).abs() < bound,
                "{bits}: {portable} vs {expected}"
            );
            assert!(
                (dispatched - expected).abs() < bound,
                "{bits}: {dispatched} vs {expected}"
            );
        }
    }
}
