//! Integer dot products for decoding: the input vector rounded to int8 in blocks of 32
//! columns (one f32 scale each, as llama.cpp rounds activations for its quantized matrices),
//! multiplied with the 3-, 4- or 8-bit weight codes in 32-bit integer sums, which are exact; only
//! the block and group scales are applied in floating point.

use crate::f16::f16_to_f32;
use crate::interleaved::{KernelInputs, Zeros};
use crate::pack::code_at;

/// Columns sharing one input scale; a weight group of a multiple of this size holds whole
/// blocks, and a block's codes fill one 256-bit register at 8 bits and half of one at 4.
pub const BLOCK: usize = 32;

/// One input row rounded to int8 per block of [`BLOCK`] columns.
#[derive(Debug, Clone)]
pub struct Int8Inputs {
    /// Column order.
    values: Vec<i8>,
    /// At 4 bits, the same values in the order the x86 kernel meets the codes: for each pair of
    /// blocks of a group, both blocks' even columns (low nibbles of 32 code bytes), then both
    /// blocks' odd columns (high nibbles), and for a group's last unpaired block its even then
    /// its odd columns. Other widths meet them in column order.
    nibble_order: Option<Vec<i8>>,
    scales: Vec<f32>,
    /// Each block's scale four times: two blocks' worth scales the eight lanes of one sum.
    lane_scales: Vec<f32>,
    /// `Σ_block scale · Σ values` over each weight group's blocks, an eighth of it: what a
    /// group's zero point takes off each of a sum's eight lanes.
    group_lane_sums: Vec<f32>,
}

impl Int8Inputs {
    /// `input.len()` must be a multiple of [`BLOCK`]; the weights' groups hold
    /// `blocks_per_group` blocks.
    pub fn new(input: &[f32], bits: u32, blocks_per_group: usize) -> Self {
        debug_assert!(input.len().is_multiple_of(BLOCK));
        let blocks = input.len() / BLOCK;
        let mut values = Vec::with_capacity(input.len());
        let mut scales = Vec::with_capacity(blocks);
        let mut group_lane_sums = vec![0.0; blocks.div_ceil(blocks_per_group)];
        for (index, columns) in input.chunks_exact(BLOCK).enumerate() {
            let mut block = [0i8; BLOCK];
            let scale = round_block(columns.try_into().expect("a block"), &mut block);
            let sum: i32 = block.iter().map(|&value| i32::from(value)).sum();
            values.extend(block);
            scales.push(scale);
            group_lane_sums[index / blocks_per_group] += scale * sum as f32 / 8.0;
        }
        let nibble_order = (bits == 4).then(|| nibble_order(&values, blocks, blocks_per_group));
        Self {
            values,
            nibble_order,
            lane_scales: scales.iter().flat_map(|&scale| [scale; 4]).collect(),
            scales,
            group_lane_sums,
        }
    }

    /// The values in the order the x86 kernel meets the codes.
    #[cfg(target_arch = "x86_64")]
    fn kernel_order(&self) -> &[i8] {
        self.nibble_order.as_deref().unwrap_or(&self.values)
    }

    /// The inputs as the [interleaved](crate::interleaved) kernel meets 4-bit codes whose
    /// zero points are `zeros`: inputs made with one block a group, so that each block's even
    /// columns (a code byte's low nibbles) come before its odd ones.
    pub(crate) fn for_interleaved<'a>(&'a self, zeros: &'a [u8]) -> KernelInputs<'a> {
        KernelInputs {
            values: self.nibble_order.as_deref().unwrap_or(&self.values),
            scales: &self.scales,
            sums: &self.group_lane_sums,
            // A lane sum is an eighth of the inputs' sum.
            sum_factor: 8.0,
            zeros: Zeros::Shared(zeros),
        }
    }

    /// The input as these integers stand for it.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(values, &scale)| values.iter().map(move |&value| scale * f32::from(value)))
            .collect()
    }
}

/// One block rounded to int8 against its absolute maximum (ties to even, which has a vector
/// instruction); returns the block's scale. Non-finite inputs round to 0.
pub(crate) fn round_block(columns: &[f32; BLOCK], out: &mut [i8; BLOCK]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernel_family() >= crate::cpu::KernelFamily::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::round_block(columns, out) };
    }
    round_block_portable(columns, out)
}

/// [`round_block`] in plain Rust: the compiler keeps the saturating conversion to i8 value by
/// value, so the x86 kernels take the vector form, which gives the same bytes.
fn round_block_portable(columns: &[f32; BLOCK], out: &mut [i8; BLOCK]) -> f32 {
    // Lane-wise maxima first: a chain of maxima through one value does not vectorize.
    let mut lanes = [0.0f32; 16];
    for chunk in columns.chunks_exact(16) {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(value.abs());
        }
    }
    let absmax = lanes.iter().fold(0.0f32, |max, &lane| max.max(lane));
    let scale = absmax / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (value, &column) in out.iter_mut().zip(columns) {
        *value = (column * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// The blocks of each group, paired from the group's start, as [`Int8Inputs::nibble_order`]
/// lays them out at 4 bits.
fn block_runs(blocks: usize, blocks_per_group: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..blocks)
        .step_by(blocks_per_group)
        .flat_map(move |first| {
            let end = (first + blocks_per_group).min(blocks);
            (first..end)
                .step_by(2)
                .map(move |block| (block, (end - block).min(2)))
        })
}

fn nibble_order(values: &[i8], blocks: usize, blocks_per_group: usize) -> Vec<i8> {
    let mut ordered = Vec::with_capacity(values.len());
    for (first, count) in block_runs(blocks, blocks_per_group) {
        let run = &values[first * BLOCK..(first + count) * BLOCK];
        for parity in 0..2 {
            for block in run.chunks_exact(BLOCK) {
                ordered.extend(block.iter().skip(parity).step_by(2));
            }
        }
    }
    ordered
}

/// Consecutive output channels of one matrix, as the matrix stores them: each channel's packed
/// codes (`bits * BLOCK / 8` bytes a block) in `row_bytes` bytes, and `groups` scales (their
/// half-precision bits) and zero points a channel, a group being `blocks_per_group` blocks.
pub struct ChannelRun<'a> {
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    pub scales: &'a [u16],
    /// Each channel's `groups` zero points, `zero_stride` apart (0: all channels share one row).
    pub zeros: &'a [u8],
    pub zero_stride: usize,
    pub groups: usize,
    pub bits: u32,
    pub blocks_per_group: usize,
}

impl<'a> ChannelRun<'a> {
    fn channel(&self, index: usize) -> ChannelCodes<'a> {
        let groups = index * self.groups..(index + 1) * self.groups;
        ChannelCodes {
            bytes: &self.bytes[index * self.row_bytes..(index + 1) * self.row_bytes],
            bits: self.bits,
            blocks_per_group: self.blocks_per_group,
            scales: &self.scales[groups],
            zeros: &self.zeros[index * self.zero_stride..][..self.groups],
        }
    }
}

/// One channel of a [`ChannelRun`].
struct ChannelCodes<'a> {
    bytes: &'a [u8],
    bits: u32,
    blocks_per_group: usize,
    scales: &'a [u16],
    zeros: &'a [u8],
}

/// `Σ_group scale · Σ_block input_scale · ((codes - zero) · inputs)` of each channel of a run
/// with the rounded inputs: `out[c]` for channel `c`. The codes meet the inputs in integers;
/// the zero points are taken off each group's float sum.
pub type ChannelDots = fn(&ChannelRun, &Int8Inputs, &mut [f32]);

/// The fastest [`ChannelDots`] of the [kernel family](crate::cpu::kernel_family) in use for
/// `bits`-bit codes, chosen once per product.
pub fn channel_dots(bits: u32) -> ChannelDots {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::{KernelFamily, kernel_family};
        if kernel_family() >= KernelFamily::Avx512Vnni {
            if bits != 3 {
                return x86::vnni_channel_dots;
            }
            if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vbmi") {
                return x86::vbmi_channel_dots;
            }
        }
        if kernel_family() >= KernelFamily::Avx2 && bits != 3 {
            return x86::avx2_channel_dots;
        }
    }
    channel_dots_portable
}

fn channel_dots_portable(run: &ChannelRun, inputs: &Int8Inputs, out: &mut [f32]) {
    for (index, value) in out.iter_mut().enumerate() {
        *value = channel_dot_portable(&run.channel(index), inputs);
    }
}

fn channel_dot_portable(channel: &ChannelCodes, inputs: &Int8Inputs) -> f32 {
    let blocks = inputs.scales.len();
    let mut total = 0.0f32;
    for (group, &scale) in channel.scales.iter().enumerate() {
        let first = group * channel.blocks_per_group;
        let mut group_sum = 0.0f32;
        for block in first..(first + channel.blocks_per_group).min(blocks) {
            let columns = block * BLOCK..(block + 1) * BLOCK;
            let products: i32 = inputs.values[columns.clone()]
                .iter()
                .zip(columns)
                .map(|(&value, column)| {
                    code_at(channel.bytes, channel.bits, column) as i32 * i32::from(value)
                })
                .sum();
            group_sum += inputs.scales[block] * products as f32;
        }
        let zero_part = 8.0 * f32::from(channel.zeros[group]) * inputs.group_lane_sums[group];
        total += f16_to_f32(scale) * (group_sum - zero_part);
    }
    total
}

/// With AVX-512 VNNI one `vpdpbusd` multiplies 32 unsigned codes with 32 signed inputs and sums
/// them in fours into eight 32-bit lanes: at 8 bits one block, at 4 bits the low or the high
/// nibbles of two blocks' 32 bytes, four lanes a block.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::round_block`] in four registers: the absolute maximum as the portable form
    /// finds it (a NaN never wins), each value times the inverse scale rounded to nearest even,
    /// clamped to ±127, NaN lanes zeroed, converted (exactly: the values are whole) and packed
    /// to bytes in column order.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn round_block(columns: &[f32; BLOCK], out: &mut [i8; BLOCK]) -> f32 {
        // SAFETY: 32 floats, four registers of eight.
        let values: [__m256; 4] =
            std::array::from_fn(|at| unsafe { _mm256_loadu_ps(columns.as_ptr().add(8 * at)) });
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let mut maxima = _mm256_setzero_ps();
        for value in values {
            // Where the first operand is NaN `vmaxps` keeps the second.
            maxima = _mm256_max_ps(_mm256_and_ps(value, magnitude), maxima);
        }
        let halves = _mm_max_ps(
            _mm256_castps256_ps128(maxima),
            _mm256_extractf128_ps::<1>(maxima),
        );
        let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
        let absmax = _mm_cvtss_f32(_mm_max_ss(pairs, _mm_movehdup_ps(pairs)));
        let scale = absmax / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let integers = values.map(|value| {
            let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(value, _mm256_set1_ps(inverse)),
            );
            let clamped = _mm256_min_ps(
                _mm256_max_ps(rounded, _mm256_set1_ps(-127.0)),
                _mm256_set1_ps(127.0),
            );
            let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(rounded, rounded);
            _mm256_cvtps_epi32(_mm256_and_ps(clamped, ordered))
        });
        // The packs interleave the registers' 128-bit halves: four-byte words 0, 4, 1, 5, ...
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(integers[0], integers[1]),
            _mm256_packs_epi32(integers[2], integers[3]),
        );
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), ordered) };
        scale
    }

    use super::{BLOCK, ChannelCodes, ChannelRun, Int8Inputs};
    use crate::f16::f16_to_f32;

    /// Bytes past the row being read whose cache lines are asked for meanwhile: on an Intel
    /// Xeon the hardware prefetcher alone left the rows' loads waiting on memory.
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache lines [`PREFETCH_AHEAD`] bytes past the start of row `index` of
    /// `rows` (rows of `row_bytes` bytes, read one after another), a row's worth of them.
    #[inline(always)]
    pub(crate) fn prefetch_row_ahead(rows: &[u8], row_bytes: usize, index: usize) {
        let ahead = index * row_bytes + PREFETCH_AHEAD;
        for at in (ahead..rows.len().min(ahead + row_bytes)).step_by(64) {
            // SAFETY: `at` is below `rows.len()`, so the pointer stays inside `rows`; a prefetch
            // reads nothing into the program and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(rows.as_ptr().add(at).cast()) };
        }
    }

    /// Only handed out by [`super::channel_dots`] once the CPU's features have been checked.
    pub(super) fn vnni_channel_dots(run: &ChannelRun, inputs: &Int8Inputs, out: &mut [f32]) {
        // SAFETY: `super::channel_dots` returns this function only when the CPU has AVX2, FMA,
        // F16C, AVX-512 VNNI and VL.
        unsafe { vnni::dots(run, inputs, out) }
    }

    /// Only handed out by [`super::channel_dots`] once the CPU's features have been checked.
    pub(super) fn vbmi_channel_dots(run: &ChannelRun, inputs: &Int8Inputs, out: &mut [f32]) {
        for (index, value) in out.iter_mut().enumerate() {
            prefetch_row_ahead(run.bytes, run.row_bytes, index);
            let channel = &run.channel(index);
            // SAFETY: `super::channel_dots` returns this function only when the CPU also has
            // AVX-512 BW and VBMI.
            *value = unsafe { triple_channel_dot(channel, inputs) };
        }
    }

    /// Only handed out by [`super::channel_dots`] once the CPU has AVX2, FMA and F16C.
    pub(super) fn avx2_channel_dots(run: &ChannelRun, inputs: &Int8Inputs, out: &mut [f32]) {
        // SAFETY: `super::channel_dots` returns this function only when the CPU has AVX2, FMA
        // and F16C.
        unsafe { avx2::dots(run, inputs, out) }
    }

    /// The 4- and 8-bit kernels of one instruction family, from one body: `$quad_sums` gives
    /// eight 32-bit lanes each summing four unsigned codes times signed inputs, and 8-bit codes
    /// go in less `$byte_offset` (which joins the zero point).
    ///
    /// Channels are taken one after another: each channel's codes are one run of bytes and
    /// consecutive channels continue it, a single stream through memory. (Taking four
    /// channels at once to share the input loads made four streams and ran slower.)
    macro_rules! integer_kernels {
        ($features:literal, $quad_sums:ident, $byte_offset:expr) => {
            use super::*;

            #[target_feature(enable = $features)]
            pub(super) fn dots(run: &ChannelRun, inputs: &Int8Inputs, out: &mut [f32]) {
                let blocks = inputs.scales.len();
                assert!(inputs.kernel_order().len() >= blocks * BLOCK);
                assert!(inputs.lane_scales.len() >= blocks * 4);
                for (index, value) in out.iter_mut().enumerate() {
                    prefetch_row_ahead(run.bytes, run.row_bytes, index);
                    let channel = &run.channel(index);
                    assert!(channel.bytes.len() >= blocks * BLOCK * channel.bits as usize / 8);
                    let groups = blocks.div_ceil(channel.blocks_per_group);
                    assert!(channel.scales.len() >= groups && channel.zeros.len() >= groups);
                    assert!(inputs.group_lane_sums.len() >= groups);
                    let sums = match (channel.bits, channel.blocks_per_group) {
                        (8, 1) => groups_of_one_block::<8>(channel, inputs, blocks),
                        (_, 1) => groups_of_one_block::<4>(channel, inputs, blocks),
                        (8, _) => byte_codes(channel, inputs, blocks, 0),
                        _ => nibble_codes(channel, inputs, blocks, 0),
                    };
                    *value = horizontal_sum(sums);
                }
            }

            /// Groups of one block (32 columns, the usual group size): a group's scale and
            /// zero point would cost more than its codes' products, so eight blocks go
            /// together, as the GGUF blocks do: their integer sums meet in one register and
            /// meet the eight scales, zero points and inputs' sums in a few vector
            /// instructions. The blocks after the last eight go as in any group size.
            /// [`dots`] checked every bound.
            #[target_feature(enable = $features)]
            fn groups_of_one_block<const BITS: u32>(
                channel: &ChannelCodes,
                inputs: &Int8Inputs,
                blocks: usize,
            ) -> __m256 {
                const RUN: usize = 8;
                let ordered = inputs.kernel_order();
                let offset = if BITS == 8 { $byte_offset } else { 0.0 };
                let mut total = _mm256_setzero_ps();
                for first in (0..blocks / RUN).map(|run| run * RUN) {
                    let sums: [__m256i; RUN] = std::array::from_fn(|index| {
                        let block = first + index;
                        // SAFETY: `dots` checked that every block's codes and inputs exist.
                        unsafe {
                            let values =
                                _mm256_loadu_si256(ordered.as_ptr().add(block * BLOCK).cast());
                            let codes = channel
                                .bytes
                                .as_ptr()
                                .add(block * BLOCK * BITS as usize / 8);
                            if BITS == 8 {
                                byte_sums(_mm256_loadu_si256(codes.cast()), values)
                            } else {
                                let packed = _mm_loadu_si128(codes.cast());
                                let nibbles = _mm256_and_si256(
                                    _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                                    _mm256_set1_epi8(0xF),
                                );
                                $quad_sums(nibbles, values)
                            }
                        }
                    });
                    // SAFETY: `dots` checked that every block's scale, zero point, input scale
                    // and input sum exist.
                    let (scales, zeros, input_scales, input_sums) = unsafe {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(
                                channel.scales.as_ptr().add(first).cast(),
                            )),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                channel.zeros.as_ptr().add(first).cast(),
                            ))),
                            _mm256_loadu_ps(inputs.scales.as_ptr().add(first)),
                            _mm256_loadu_ps(inputs.group_lane_sums.as_ptr().add(first)),
                        )
                    };
                    total = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(lane_per_vector(sums)),
                        _mm256_mul_ps(scales, input_scales),
                        total,
                    );
                    // A group's lane sum is an eighth of its inputs' sum.
                    let zero_parts = _mm256_mul_ps(
                        _mm256_mul_ps(scales, _mm256_set1_ps(8.0)),
                        _mm256_sub_ps(zeros, _mm256_set1_ps(offset)),
                    );
                    total = _mm256_fnmadd_ps(zero_parts, input_sums, total);
                }
                let rest = blocks / RUN * RUN;
                let rest = if BITS == 8 {
                    byte_codes(channel, inputs, blocks, rest)
                } else {
                    nibble_codes(channel, inputs, blocks, rest)
                };
                _mm256_add_ps(total, rest)
            }

            /// 8-bit codes from block `start` on (the start of a group): one block of 32 codes
            /// a step. [`dots`] checked every bound.
            #[target_feature(enable = $features)]
            fn byte_codes(
                channel: &ChannelCodes,
                inputs: &Int8Inputs,
                blocks: usize,
                start: usize,
            ) -> __m256 {
                let ordered = inputs.kernel_order();
                let mut total = _mm256_setzero_ps();
                for first in (start..blocks).step_by(channel.blocks_per_group) {
                    let group = first / channel.blocks_per_group;
                    let mut group_sum = _mm256_setzero_ps();
                    for block in first..(first + channel.blocks_per_group).min(blocks) {
                        // SAFETY: `dots` checked that every block's 32 codes and inputs exist.
                        let (codes, values) = unsafe {
                            (
                                _mm256_loadu_si256(
                                    channel.bytes.as_ptr().add(block * BLOCK).cast(),
                                ),
                                _mm256_loadu_si256(ordered.as_ptr().add(block * BLOCK).cast()),
                            )
                        };
                        let products = byte_sums(codes, values);
                        group_sum = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(products),
                            _mm256_set1_ps(inputs.scales[block]),
                            group_sum,
                        );
                    }
                    total = group_total(channel, inputs, group, $byte_offset, group_sum, total);
                }
                total
            }

            /// 4-bit codes from block `start` on (the start of a group): two blocks' 32 code
            /// bytes a step, low nibbles against the blocks' even columns and high nibbles
            /// against their odd ones. [`dots`] checked every bound.
            #[target_feature(enable = $features)]
            fn nibble_codes(
                channel: &ChannelCodes,
                inputs: &Int8Inputs,
                blocks: usize,
                start: usize,
            ) -> __m256 {
                let ordered = inputs.kernel_order();
                let nibbles = _mm256_set1_epi8(0xF);
                let mut total = _mm256_setzero_ps();
                for first in (start..blocks).step_by(channel.blocks_per_group) {
                    let group = first / channel.blocks_per_group;
                    let end = (first + channel.blocks_per_group).min(blocks);
                    let mut group_sum = _mm256_setzero_ps();
                    let mut block = first;
                    while block + 2 <= end {
                        // SAFETY: `dots` checked that both blocks' 32 code bytes, 64 inputs
                        // and 8 lane scales exist.
                        let (packed, even, odd, lane_scales) = unsafe {
                            let values = ordered.as_ptr().add(block * BLOCK);
                            (
                                _mm256_loadu_si256(
                                    channel.bytes.as_ptr().add(block * BLOCK / 2).cast(),
                                ),
                                _mm256_loadu_si256(values.cast()),
                                _mm256_loadu_si256(values.add(BLOCK).cast()),
                                _mm256_loadu_ps(inputs.lane_scales.as_ptr().add(block * 4)),
                            )
                        };
                        let low = _mm256_and_si256(packed, nibbles);
                        let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibbles);
                        let sums = _mm256_add_epi32($quad_sums(low, even), $quad_sums(high, odd));
                        group_sum =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), lane_scales, group_sum);
                        block += 2;
                    }
                    if block < end {
                        // SAFETY: as above, for one block's 16 code bytes and 32 inputs.
                        let (packed, values) = unsafe {
                            (
                                _mm_loadu_si128(
                                    channel.bytes.as_ptr().add(block * BLOCK / 2).cast(),
                                ),
                                _mm256_loadu_si256(ordered.as_ptr().add(block * BLOCK).cast()),
                            )
                        };
                        let nibbles = _mm256_castsi256_si128(nibbles);
                        let low = _mm_and_si128(packed, nibbles);
                        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibbles);
                        let sums = $quad_sums(_mm256_set_m128i(high, low), values);
                        let scale = _mm256_set1_ps(inputs.scales[block]);
                        group_sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, group_sum);
                    }
                    total = group_total(channel, inputs, group, 0.0, group_sum, total);
                }
                total
            }
        };
    }

    /// With AVX-512 VNNI: one `vpdpbusd` a step, codes as stored.
    mod vnni {
        integer_kernels!("avx2,fma,f16c,avx512vnni,avx512vl", quad_sums, 0.0);

        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        fn quad_sums(codes: __m256i, values: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, values)
        }

        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        fn byte_sums(codes: __m256i, values: __m256i) -> __m256i {
            quad_sums(codes, values)
        }
    }

    /// With AVX2: `vpmaddubsw` multiplies unsigned codes with signed inputs into pairs of
    /// 16-bit sums (15 · 127 · 2 fits), `vpmaddwd` adds the pairs. 8-bit codes go in as
    /// `code - 128` through the sign trick, since a pair of 8-bit codes times inputs could
    /// exceed 16 bits.
    mod avx2 {
        integer_kernels!("avx2,fma,f16c", quad_sums, 128.0);

        #[target_feature(enable = "avx2,fma")]
        fn quad_sums(codes: __m256i, values: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(codes, values), _mm256_set1_epi16(1))
        }

        #[target_feature(enable = "avx2,fma")]
        fn byte_sums(codes: __m256i, values: __m256i) -> __m256i {
            let centered = _mm256_xor_si256(codes, _mm256_set1_epi8(i8::MIN));
            quad_sums(
                _mm256_sign_epi8(centered, centered),
                _mm256_sign_epi8(values, centered),
            )
        }
    }

    /// 3-bit codes: a block's 32 codes are 12 bytes. A byte permute gives each code a 16-bit
    /// lane holding the two bytes its bits lie in, a per-lane shift and mask cut it out.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vbmi,avx512vnni,avx512vl")]
    fn triple_channel_dot(channel: &ChannelCodes, inputs: &Int8Inputs) -> f32 {
        let blocks = inputs.scales.len();
        let block_bytes = BLOCK * 3 / 8;
        assert!(channel.bytes.len() >= blocks * block_bytes);
        let groups = blocks.div_ceil(channel.blocks_per_group);
        assert!(channel.scales.len() >= groups && channel.zeros.len() >= groups);
        assert!(inputs.group_lane_sums.len() >= groups);
        let ordered = inputs.kernel_order();
        assert!(ordered.len() >= blocks * BLOCK);
        let mut byte_of_lane = [0u8; 64];
        let mut shift_of_lane = [0u16; 32];
        for lane in 0..32 {
            let first_bit = 3 * lane;
            byte_of_lane[2 * lane] = (first_bit / 8) as u8;
            byte_of_lane[2 * lane + 1] = (first_bit / 8 + 1) as u8;
            shift_of_lane[lane] = (first_bit % 8) as u16;
        }
        // SAFETY: both arrays are 64 bytes.
        let (byte_of_lane, shift_of_lane) = unsafe {
            (
                _mm512_loadu_si512(byte_of_lane.as_ptr().cast()),
                _mm512_loadu_si512(shift_of_lane.as_ptr().cast()),
            )
        };
        let code_mask = _mm512_set1_epi16(7);
        let mut total = _mm256_setzero_ps();
        for group in 0..groups {
            let first = group * channel.blocks_per_group;
            let mut group_sum = _mm256_setzero_ps();
            for block in first..(first + channel.blocks_per_group).min(blocks) {
                // SAFETY: the asserts above keep the block's 12 code bytes (a masked load reads
                // no others) and its 32 inputs in bounds.
                let (packed, values) = unsafe {
                    (
                        _mm_maskz_loadu_epi8(
                            0x0FFF,
                            channel.bytes.as_ptr().add(block * block_bytes).cast(),
                        ),
                        _mm256_loadu_si256(ordered.as_ptr().add(block * BLOCK).cast()),
                    )
                };
                let windows = _mm512_permutexvar_epi8(byte_of_lane, _mm512_zextsi128_si512(packed));
                let codes = _mm512_and_si512(_mm512_srlv_epi16(windows, shift_of_lane), code_mask);
                let products = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    _mm512_cvtepi16_epi8(codes),
                    values,
                );
                group_sum = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(products),
                    _mm256_set1_ps(inputs.scales[block]),
                    group_sum,
                );
            }
            total = group_total(channel, inputs, group, 0.0, group_sum, total);
        }
        horizontal_sum(total)
    }

    /// `total + scale · (group_sum - (zero - offset) · inputs)` for one group whose sums are
    /// of `code - offset` times the inputs: its zero point's share, less the offset's, taken
    /// off each of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn group_total(
        channel: &ChannelCodes,
        inputs: &Int8Inputs,
        group: usize,
        offset: f32,
        group_sum: __m256,
        total: __m256,
    ) -> __m256 {
        let zero_part = (f32::from(channel.zeros[group]) - offset) * inputs.group_lane_sums[group];
        let group_sum = _mm256_sub_ps(group_sum, _mm256_set1_ps(zero_part));
        let scale = f16_to_f32(channel.scales[group]);
        _mm256_fmadd_ps(_mm256_set1_ps(scale), group_sum, total)
    }

    /// Eight vectors' lane sums as the eight lanes of one.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn lane_per_vector(vectors: [__m256i; 8]) -> __m256i {
        let [a, b, c, d, e, f, g, h] = vectors;
        // Each addition of pairs halves the lanes per vector, within 128-bit halves.
        let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        let efgh = _mm256_hadd_epi32(_mm256_hadd_epi32(e, f), _mm256_hadd_epi32(g, h));
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(abcd, efgh),
            _mm256_permute2x128_si256::<0x31>(abcd, efgh),
        )
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn horizontal_sum(sums: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::f16::f32_to_f16;
    use crate::test_support::random_matrix;

    /// The vector rounding gives the portable one's bytes and scale, ties, the clamp's edge,
    /// zeros, infinities and NaN included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_rounding_gives_the_portable_bytes() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut blocks: Vec<[f32; BLOCK]> = random_matrix(8, BLOCK, 31)
            .chunks_exact(BLOCK)
            .map(|block| block.try_into().unwrap())
            .collect();
        // Ties at every half step against an absolute maximum of 127.
        blocks.push(std::array::from_fn(|at| {
            if at == 0 { 127.0 } else { at as f32 - 15.5 }
        }));
        blocks.push(std::array::from_fn(|at| -(at as f32) * 4.0));
        blocks.push([0.0; BLOCK]);
        blocks.push([-0.0; BLOCK]);
        let mut specials: [f32; BLOCK] = std::array::from_fn(|at| at as f32 - 16.0);
        specials[3] = f32::NAN;
        blocks.push(specials);
        specials[7] = f32::INFINITY;
        blocks.push(specials);
        blocks.push([f32::NAN; BLOCK]);
        for block in &blocks {
            let (mut portable, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            let scale = round_block_portable(block, &mut portable);
            // SAFETY: the CPU has AVX2 and FMA.
            let vector_scale = unsafe { x86::round_block(block, &mut vector) };
            assert_eq!(portable, vector, "{block:?}");
            assert_eq!(scale.to_bits(), vector_scale.to_bits(), "{block:?}");
        }
    }

    #[test]
    fn inputs_round_to_int8_within_half_a_step_per_block() {
        let input = random_matrix(1, 96, 21);
        for bits in [3, 4, 8] {
            let rounded = Int8Inputs::new(&input, bits, 3);
            let restored = rounded.dequantize();
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
            // Groups of three blocks: the whole input is one group.
            let expected: f32 = restored.iter().sum();
            assert!((8.0 * rounded.group_lane_sums[0] - expected).abs() < 1e-4);
        }
    }

    #[test]
    fn every_kernel_sums_codes_times_rounded_inputs() {
        // Eleven blocks: groups of one block go eight at a time, then three one by one.
        const COLUMNS: usize = 11 * BLOCK;
        let input = random_matrix(1, COLUMNS, 22);
        let all_scales = [0.5f32, -1.25, 0.75, 2.0];
        // Six channels, codes and zero points from a fixed pattern per channel, in groups of
        // one to four blocks: paired blocks, a group's last unpaired block and a short last
        // group.
        let channel_count = 6;
        for bits in [3u32, 4, 8] {
            for blocks_per_group in 1..=4 {
                let groups = (COLUMNS / BLOCK).div_ceil(blocks_per_group);
                let row_bytes = COLUMNS * bits as usize / 8;
                let bytes: Vec<u8> = (0..channel_count)
                    .flat_map(|channel| {
                        (0..row_bytes).map(move |index| (index * 73 + 11 + 29 * channel) as u8)
                    })
                    .collect();
                let scales: Vec<u16> = (0..channel_count)
                    .flat_map(|channel| {
                        (0..groups).map(move |group| f32_to_f16(all_scales[(group + channel) % 4]))
                    })
                    .collect();
                let zeros: Vec<u8> = (0..channel_count)
                    .flat_map(|channel| {
                        (0..groups)
                            .map(move |group| ((5 * group + 3 * channel) % (1 << bits)) as u8)
                    })
                    .collect();
                // Each channel its own zero points, then every channel the first one's.
                for shared_zeros in [false, true] {
                    let run = ChannelRun {
                        bytes: &bytes,
                        row_bytes,
                        scales: &scales,
                        zeros: &zeros,
                        zero_stride: if shared_zeros { 0 } else { groups },
                        groups,
                        bits,
                        blocks_per_group,
                    };
                    let rounded = Int8Inputs::new(&input, bits, blocks_per_group);
                    let restored = rounded.dequantize();
                    let mask = (1u32 << bits) - 1;
                    let mut portable = vec![0.0; channel_count];
                    channel_dots_portable(&run, &rounded, &mut portable);
                    let mut selected = vec![0.0; channel_count];
                    channel_dots(bits)(&run, &rounded, &mut selected);
                    // The AVX2 kernel too, where it is not the one selected.
                    let mut avx2 = selected.clone();
                    #[cfg(target_arch = "x86_64")]
                    if bits != 3
                        && crate::cpu::KernelFamily::detected() >= crate::cpu::KernelFamily::Avx2
                    {
                        x86::avx2_channel_dots(&run, &rounded, &mut avx2);
                    }
                    for index in 0..channel_count {
                        let channel = run.channel(index);
                        let terms: Vec<f32> = (0..COLUMNS)
                            .map(|column| {
                                let start = column * bits as usize;
                                let bytes = channel.bytes;
                                let next = bytes.get(start / 8 + 1).copied().unwrap_or(0);
                                let window =
                                    u32::from(u16::from_le_bytes([bytes[start / 8], next]));
                                let code = (window >> (start % 8)) & mask;
                                let group = column / (blocks_per_group * BLOCK);
                                let zero_row = if shared_zeros { 0 } else { index * groups };
                                let weight = f16_to_f32(channel.scales[group])
                                    * (code as f32 - f32::from(zeros[zero_row + group]));
                                weight * restored[column]
                            })
                            .collect();
                        let expected: f32 = terms.iter().sum();
                        let bound = 1e-6 * terms.iter().map(|term| term.abs()).sum::<f32>();
                        for (kernel, got) in [
                            ("portable", portable[index]),
                            ("selected", selected[index]),
                            ("avx2", avx2[index]),
                        ] {
                            assert!(
                                (got - expected).abs() < bound,
                                "{kernel}, {bits} bits, {blocks_per_group} blocks a group, channel \
                             {index}, zeros shared {shared_zeros}: {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }
}
