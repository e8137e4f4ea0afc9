//! The integer kernels of the block formats: the one every format shares (one channel's pieces,
//! decoded to small signed codes and per-half scales, against one input row rounded to int8 per
//! piece), and, for the 32-value block types, kernels that read the stored blocks directly.

use std::sync::OnceLock;

use super::blocks::{PIECE, PieceScales};
use super::types::GgmlType;
use crate::int8_inputs::round_block;
use crate::interleaved::{KernelInputs, Zeros};

/// One input row rounded to int8 per piece of 32 columns.
#[derive(Clone)]
pub(crate) struct PieceInputs {
    values: Vec<i8>,
    /// Each value plus 128, unsigned: VNNI's unsigned operand, met by Q8_0's signed codes.
    offset_values: Vec<u8>,
    scales: Vec<f32>,
    /// Each half piece's `scale · Σ values`: what a minimum multiplies.
    half_sums: Vec<f32>,
    /// Each piece's `scale · Σ values`.
    sums: Vec<f32>,
}

impl PieceInputs {
    pub(crate) fn new(input: &[f32]) -> Self {
        let pieces = input.len() / PIECE;
        let mut values = Vec::with_capacity(input.len());
        let mut scales = Vec::with_capacity(pieces);
        let mut half_sums = Vec::with_capacity(2 * pieces);
        let mut sums = Vec::with_capacity(pieces);
        for columns in input.chunks_exact(PIECE) {
            let mut block = [0i8; PIECE];
            let scale = round_block(columns.try_into().expect("a piece"), &mut block);
            let mut piece_sum = 0;
            for half in block.chunks_exact(PIECE / 2) {
                let sum: i32 = half.iter().map(|&value| i32::from(value)).sum();
                half_sums.push(scale * sum as f32);
                piece_sum += sum;
            }
            sums.push(scale * piece_sum as f32);
            values.extend(block);
            scales.push(scale);
        }
        Self {
            offset_values: values.iter().map(|&value| value as u8 ^ 0x80).collect(),
            values,
            scales,
            half_sums,
            sums,
        }
    }

    /// The inputs as the [interleaved](crate::interleaved) kernel meets Q4_0 and Q4_1 codes
    /// (`zero` is the code for 0: Q4_0's 8, Q4_1's 0): a code byte's low nibble is value `j`
    /// of its block, its high nibble value `j + 16`.
    pub(crate) fn for_interleaved(&self, zero: f32) -> KernelInputs<'_> {
        KernelInputs {
            values: &self.values,
            scales: &self.scales,
            sums: &self.sums,
            sum_factor: 1.0,
            zeros: Zeros::All(zero),
        }
    }

    /// The input as these integers stand for it.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        self.values
            .chunks_exact(PIECE)
            .zip(&self.scales)
            .flat_map(|(values, &scale)| values.iter().map(move |&value| scale * f32::from(value)))
            .collect()
    }
}

/// The input rows of one product rounded to int8 per piece and, once a kernel asks for them
/// so, side by side in lanes: built once for every thread's channels.
pub(crate) struct RoundedInputs {
    rows: Vec<PieceInputs>,
    lanes: OnceLock<Vec<InputLanes>>,
    tile_lanes: OnceLock<Vec<InputLanes>>,
}

impl RoundedInputs {
    pub(crate) fn new(rows: Vec<PieceInputs>) -> Self {
        Self {
            rows,
            lanes: OnceLock::new(),
            tile_lanes: OnceLock::new(),
        }
    }

    /// The first `count` rows of `x`, `cols` values each.
    pub(crate) fn of(x: &[f32], cols: usize, count: usize) -> Self {
        Self::new(
            x.chunks_exact(cols)
                .take(count)
                .map(PieceInputs::new)
                .collect(),
        )
    }

    pub(crate) fn rows(&self) -> &[PieceInputs] {
        &self.rows
    }

    /// The rows in sets of [`LANES`], laid out for the VNNI kernels.
    fn lanes(&self) -> &[InputLanes] {
        self.lanes.get_or_init(|| {
            let layout = if self.rows.len() <= LANES / 2 {
                LaneLayout::Pairs
            } else {
                LaneLayout::Across
            };
            self.sets(layout)
        })
    }

    /// The rows in sets of [`LANES`], laid out as the tile products' second operand.
    fn tile_lanes(&self) -> &[InputLanes] {
        self.tile_lanes.get_or_init(|| self.sets(LaneLayout::Tiles))
    }

    fn sets(&self, layout: LaneLayout) -> Vec<InputLanes> {
        self.rows
            .chunks(LANES)
            .map(|inputs| InputLanes::new(inputs, layout))
            .collect()
    }
}

/// How [`InputLanes`] holds its inputs' values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LaneLayout {
    /// Two lanes an input, signed, with each block's start: up to four inputs.
    Pairs,
    /// One lane an input, each value plus 128.
    Across,
    /// One lane an input, signed: row `r` of a block's 8 x 32 bytes holds each input's values
    /// `4r..4r + 4`, the layout of the tile products' second operand.
    Tiles,
}

/// Up to [`LANES`] inputs side by side, as the kernels that broadcast a row's codes meet them
/// and as the tile products read them. Each block's inputs come in steps of 32 bytes, lanes of
/// four values:
/// - [`LaneLayout::Pairs`]: each input takes two lanes, lane `2j` input `j`'s even words of four
///   values, lane `2j + 1` its odd ones, so a broadcast of eight codes meets them all in one
///   instruction; the values are signed, to meet codes plus 128, and `starts` holds each
///   block's `−128 · Σ values` in an input's first lane (0 in its second) to take the 128 off;
/// - [`LaneLayout::Across`]: one lane each, holding all its words, each value plus 128 (to meet
///   the signed codes);
/// - [`LaneLayout::Tiles`]: one lane each, the values signed.
///
/// Then each block's input scales, in each of an input's lanes. Lanes past the inputs hold
/// zeros.
pub(crate) struct InputLanes {
    lanes_per_input: usize,
    values: Vec<u8>,
    starts: Vec<i32>,
    scales: Vec<f32>,
}

/// The 32-bit lanes of a 256-bit register.
pub(crate) const LANES: usize = 8;

impl InputLanes {
    fn new(inputs: &[PieceInputs], layout: LaneLayout) -> Self {
        assert!((1..=LANES).contains(&inputs.len()));
        assert!(layout != LaneLayout::Pairs || inputs.len() <= LANES / 2);
        let lanes_per_input = if layout == LaneLayout::Pairs { 2 } else { 1 };
        let signed = layout != LaneLayout::Across;
        let with_starts = layout == LaneLayout::Pairs;
        let pieces = inputs[0].scales.len();
        let block_bytes = PIECE * LANES / lanes_per_input;
        let mut values = vec![if signed { 0 } else { 0x80 }; pieces * block_bytes];
        let mut starts = vec![0; if with_starts { pieces * LANES } else { 0 }];
        let mut scales = vec![0.0f32; pieces * LANES];
        for (input_index, input) in inputs.iter().enumerate() {
            assert_eq!(input.scales.len(), pieces);
            let first_lane = input_index * lanes_per_input;
            for piece in 0..pieces {
                let block = &mut values[piece * block_bytes..][..block_bytes];
                for word in 0..PIECE / 4 {
                    let (step, lane) =
                        (word / lanes_per_input, first_lane + word % lanes_per_input);
                    let lane_bytes = &mut block[(step * LANES + lane) * 4..][..4];
                    let source = piece * PIECE + word * 4..piece * PIECE + word * 4 + 4;
                    if signed {
                        for (byte, &value) in lane_bytes.iter_mut().zip(&input.values[source]) {
                            *byte = value as u8;
                        }
                    } else {
                        lane_bytes.copy_from_slice(&input.offset_values[source]);
                    }
                }
                let at = piece * LANES + first_lane;
                if with_starts {
                    let sum: i32 = input.values[piece * PIECE..][..PIECE]
                        .iter()
                        .map(|&value| i32::from(value))
                        .sum();
                    starts[at] = -128 * sum;
                }
                scales[at..at + lanes_per_input].fill(input.scales[piece]);
            }
        }
        Self {
            lanes_per_input,
            values,
            starts,
            scales,
        }
    }
}

/// `Σ_piece input_scale · Σ_half scale · (codes · inputs) + bias · Σ inputs` over one
/// channel's decoded pieces.
pub(crate) type PiecesDot = fn(&[i8], &[PieceScales], &PieceInputs) -> f32;

/// The fastest [`PiecesDot`] of the [kernel family](crate::cpu::kernel_family) in use.
pub(crate) fn pieces_dot() -> PiecesDot {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernel_family() >= crate::cpu::KernelFamily::Avx2 {
        return x86::pieces_dot;
    }
    pieces_dot_portable
}

/// What the piece kernel computes over channels' rows of stored blocks (Q4_0, Q4_1, Q5_0,
/// Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) against each of several inputs, reading the blocks as they
/// are: a decode step meets every weight once, so decoding pieces into memory first would cost
/// as much as the products. The rows are consecutive, `row_bytes` each; `out[i * inputs + j]`
/// is row `i`'s product with input `j`.
pub(crate) type BlocksDot = fn(rows: &[u8], row_bytes: usize, &RoundedInputs, out: &mut [f32]);

/// The [`BlocksDot`] of the [kernel family](crate::cpu::kernel_family) in use for `kind`;
/// `None` where only the piece kernel serves it.
pub(crate) fn blocks_dot(kind: GgmlType) -> Option<BlocksDot> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::{KernelFamily, kernel_family};
        if kernel_family() >= KernelFamily::Amx && kind == GgmlType::Q8_0 {
            return Some(tiles::q8_0_products);
        }
        if kernel_family() >= KernelFamily::Avx512Vnni {
            return x86::blocks_dot::<true>(kind);
        }
        if kernel_family() >= KernelFamily::Avx2 {
            return x86::blocks_dot::<false>(kind);
        }
    }
    let _ = kind;
    None
}

/// Lays out `rounded`'s lanes now, on the calling thread, where `kind`'s kernel meets the
/// inputs in lanes or tiles. Laid out by the first task that asked, they kept the other
/// threads' first tasks waiting on the lock, and each product paid for waking them.
pub(crate) fn prepare_lanes(kind: GgmlType, rounded: &RoundedInputs) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::{KernelFamily, kernel_family};
        let (q8_0, count) = (kind == GgmlType::Q8_0, rounded.rows().len());
        if kernel_family() >= KernelFamily::Amx && tiles::on_tiles(q8_0, count) {
            rounded.tile_lanes();
        } else if kernel_family() >= KernelFamily::Avx512Vnni && x86::in_lanes(q8_0, count) {
            rounded.lanes();
        }
    }
    let _ = (kind, rounded);
}

fn pieces_dot_portable(codes: &[i8], scales: &[PieceScales], inputs: &PieceInputs) -> f32 {
    let mut total = 0.0f32;
    for (at, (codes, scales)) in codes.chunks_exact(PIECE).zip(scales).enumerate() {
        let values = &inputs.values[at * PIECE..(at + 1) * PIECE];
        let mut halves = [0i32; 2];
        for (half, (codes, values)) in codes
            .chunks_exact(PIECE / 2)
            .zip(values.chunks_exact(PIECE / 2))
            .enumerate()
        {
            halves[half] = codes
                .iter()
                .zip(values)
                .map(|(&code, &value)| i32::from(code) * i32::from(value))
                .sum();
        }
        let products = scales.scale[0] * halves[0] as f32 + scales.scale[1] * halves[1] as f32;
        total += inputs.scales[at] * products
            + scales.bias[0] * inputs.half_sums[2 * at]
            + scales.bias[1] * inputs.half_sums[2 * at + 1];
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod tiles;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{
        BlocksDot, GgmlType, InputLanes, LANES, PIECE, PieceInputs, PieceScales, RoundedInputs,
    };
    use crate::ggml::blocks::scale_min_k4;
    use crate::int8_inputs::x86::{horizontal_sum, lane_per_vector, prefetch_row_ahead};

    /// The block types, as the const parameter of [`row_of_blocks`] and
    /// [`row_of_super_blocks`].
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q5_1: u8 = 3;
    const Q8_0: u8 = 4;
    const Q4_K: u8 = 5;
    const Q5_K: u8 = 6;
    const Q6_K: u8 = 7;

    /// Only called once the CPU is known to have AVX2, FMA and F16C, and with `VNNI` once it
    /// is known to have AVX-512 VNNI and VL as well. The K-quants' super-blocks have one kernel.
    pub(super) fn blocks_dot<const VNNI: bool>(kind: GgmlType) -> Option<BlocksDot> {
        Some(match kind {
            GgmlType::Q4_0 => checked::<Q4_0, VNNI>,
            GgmlType::Q4_1 => checked::<Q4_1, VNNI>,
            GgmlType::Q5_0 => checked::<Q5_0, VNNI>,
            GgmlType::Q5_1 => checked::<Q5_1, VNNI>,
            GgmlType::Q8_0 => checked::<Q8_0, VNNI>,
            GgmlType::Q4K => checked::<Q4_K, false>,
            GgmlType::Q5K => checked::<Q5_K, false>,
            GgmlType::Q6K => checked::<Q6_K, false>,
            _ => return None,
        })
    }

    /// Whether the VNNI kernels meet `count` inputs of a matrix side by side in lanes.
    pub(super) const fn in_lanes(q8_0: bool, count: usize) -> bool {
        q8_0 && count >= ACROSS_FROM
    }

    const fn block_bytes(kind: u8) -> usize {
        match kind {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q4_K => 144,
            Q5_K => 176,
            _ => 210,
        }
    }

    /// Pieces of 32 values in a block.
    const fn block_pieces(kind: u8) -> usize {
        if kind >= Q4_K { 8 } else { 1 }
    }

    /// One row after another: consecutive rows continue one run of bytes, a single stream
    /// through memory. (Taking rows four or two at a time, to share each block's inputs, made
    /// as many streams and ran slower on the bandwidth-bound types.) Each row meets the inputs
    /// [`INPUTS_AT_ONCE`] at a time while its bytes are in cache; with VNNI a Q8_0 row meets
    /// [`ACROSS_FROM`] or more of them side by side in lanes, up to eight at once.
    fn checked<const KIND: u8, const VNNI: bool>(
        rows: &[u8],
        row_bytes: usize,
        rounded: &RoundedInputs,
        out: &mut [f32],
    ) {
        let inputs = rounded.rows();
        let blocks = row_bytes / block_bytes(KIND);
        let pieces = blocks * block_pieces(KIND);
        let count = inputs.len();
        assert!(
            row_bytes == blocks * block_bytes(KIND)
                && rows.len() * count == out.len() * row_bytes
                && inputs.iter().all(|inputs| {
                    inputs.values.len() >= pieces * PIECE
                        && inputs.offset_values.len() >= pieces * PIECE
                        && inputs.scales.len() >= pieces
                        && inputs.half_sums.len() >= 2 * pieces
                        && inputs.sums.len() >= pieces
                })
        );
        if count == 0 {
            return;
        }
        if VNNI && in_lanes(KIND == Q8_0, count) {
            let sets = rounded.lanes();
            if let [lanes] = sets
                && lanes.lanes_per_input == 2
            {
                for (index, (row, out)) in rows
                    .chunks_exact(row_bytes)
                    .zip(out.chunks_exact_mut(count))
                    .enumerate()
                {
                    prefetch_row_ahead(rows, row_bytes, index);
                    // SAFETY: the kernel was handed out for a CPU with VNNI; the lengths were
                    // checked above.
                    let sums = unsafe { q8_0_row_pairs(row, lanes) };
                    for (out, sum) in out.iter_mut().zip(sums.iter().step_by(2)) {
                        *out = *sum;
                    }
                }
                return;
            }
            for (chunk, (rows_together, outs)) in rows
                .chunks(ROWS_ACROSS * row_bytes)
                .zip(out.chunks_mut(ROWS_ACROSS * count))
                .enumerate()
            {
                let first = chunk * ROWS_ACROSS;
                for index in first..first + outs.len() / count {
                    prefetch_row_ahead(rows, row_bytes, index);
                }
                for (set, lanes) in sets.iter().enumerate() {
                    let inputs = set * LANES..(set * LANES + LANES).min(count);
                    // SAFETY: the kernel was handed out for a CPU with VNNI; the lengths were
                    // checked above.
                    unsafe {
                        if rows_together.len() == ROWS_ACROSS * row_bytes {
                            let together: [&[u8]; ROWS_ACROSS] = std::array::from_fn(|row| {
                                &rows_together[row * row_bytes..(row + 1) * row_bytes]
                            });
                            let sums = q8_0_rows_across(together, lanes);
                            for (out, sums) in outs.chunks_exact_mut(count).zip(&sums) {
                                out[inputs.clone()].copy_from_slice(&sums[..inputs.len()]);
                            }
                        } else {
                            let [sums] = q8_0_rows_across([rows_together], lanes);
                            outs[inputs.clone()].copy_from_slice(&sums[..inputs.len()]);
                        }
                    }
                }
            }
            return;
        }
        for (index, (row, out)) in rows
            .chunks_exact(row_bytes)
            .zip(out.chunks_exact_mut(count))
            .enumerate()
        {
            prefetch_row_ahead(rows, row_bytes, index);
            if count == 1 {
                row_against::<KIND, 1, VNNI>(row, inputs, out);
                continue;
            }
            for (inputs, out) in inputs
                .chunks(INPUTS_AT_ONCE)
                .zip(out.chunks_mut(INPUTS_AT_ONCE))
            {
                match inputs.len() {
                    1 => row_against::<KIND, 1, VNNI>(row, inputs, out),
                    2 => row_against::<KIND, 2, VNNI>(row, inputs, out),
                    3 => row_against::<KIND, 3, VNNI>(row, inputs, out),
                    _ => row_against::<KIND, INPUTS_AT_ONCE, VNNI>(row, inputs, out),
                }
            }
        }
    }

    /// Inputs that share one decoding of a row's blocks.
    const INPUTS_AT_ONCE: usize = 4;

    /// One row's products with `N` inputs, each the sum it has alone. [`checked`] checked the
    /// lengths, its caller the kernel family.
    fn row_against<const KIND: u8, const N: usize, const VNNI: bool>(
        row: &[u8],
        inputs: &[PieceInputs],
        out: &mut [f32],
    ) {
        let inputs: [&PieceInputs; N] = std::array::from_fn(|index| &inputs[index]);
        // SAFETY: the kernel was handed out for a CPU with the family's features.
        let sums = unsafe {
            if KIND >= Q4_K {
                row_of_super_blocks::<KIND, N>(row, inputs)
            } else if VNNI {
                row_of_blocks_vnni::<KIND, N>(row, inputs)
            } else {
                row_of_blocks_avx2::<KIND, N>(row, inputs)
            }
        };
        out.copy_from_slice(&sums);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_of_blocks_avx2<const KIND: u8, const N: usize>(
        row: &[u8],
        inputs: [&PieceInputs; N],
    ) -> [f32; N] {
        // SAFETY: this function's features are those the AVX2 kernel needs.
        unsafe { row_of_blocks::<KIND, N, false>(row, inputs) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn row_of_blocks_vnni<const KIND: u8, const N: usize>(
        row: &[u8],
        inputs: [&PieceInputs; N],
    ) -> [f32; N] {
        // SAFETY: this function's features are those the VNNI kernel needs.
        unsafe { row_of_blocks::<KIND, N, true>(row, inputs) }
    }

    /// Blocks a row's kernel takes together.
    pub(super) const GROUP: usize = 8;

    /// Per block: the codes unpacked in registers once for all `N` inputs, then per input one
    /// `vpmaddubsw` and one `vpmaddwd`, or with `VNNI` one `vpdpbusd`. Eight blocks at a time
    /// then share the rest: their eight integer sums meet in one register (a tree of
    /// horizontal additions), their scales are gathered into another, so converting, scaling
    /// and the minima take one instruction per eight blocks instead of several per block.
    /// Q4_0's and Q5_0's codes stay unsigned, their offset of 8 or 16 becoming a minimum of −8
    /// or −16 times the scale: that spares the sign trick of [`dot`], which only Q8_0's
    /// full-range codes need. The blocks after the last eight go one by one. Each input's float
    /// operations are those it has alone, in the same order, so its sum keeps its bits whatever
    /// inputs it shares the row with, and (the integer sums being exact) on either family.
    /// Inlined into a function with the family's features, which closures would not inherit,
    /// so the loops here take none; [`checked`] checked the lengths.
    #[inline(always)]
    unsafe fn row_of_blocks<const KIND: u8, const N: usize, const VNNI: bool>(
        row: &[u8],
        inputs: [&PieceInputs; N],
    ) -> [f32; N] {
        // SAFETY: the caller's function has the family's features; `checked` checked the
        // lengths the loads below rely on.
        unsafe {
            let bytes = block_bytes(KIND);
            let mut totals = [_mm256_setzero_ps(); N];
            let mut groups = row.chunks_exact(GROUP * bytes);
            for (group, blocks) in groups.by_ref().enumerate() {
                let first = group * GROUP;
                let mut codes = [[_mm256_setzero_si256(); 2]; GROUP];
                for (block, codes) in codes.iter_mut().enumerate() {
                    *codes = block_codes::<KIND, VNNI>(&blocks[block * bytes..][..bytes]);
                }
                let leading = leading_words(blocks, bytes);
                let scales = halves_of(leading, false);
                let minima = match KIND {
                    Q4_0 => Some(_mm256_mul_ps(scales, _mm256_set1_ps(-8.0))),
                    Q5_0 => Some(_mm256_mul_ps(scales, _mm256_set1_ps(-16.0))),
                    Q4_1 | Q5_1 => Some(halves_of(leading, true)),
                    _ => None,
                };
                for (inputs, total) in inputs.iter().zip(&mut totals) {
                    let mut sums = [_mm256_setzero_si256(); GROUP];
                    for (block, sums) in sums.iter_mut().enumerate() {
                        *sums = codes_times::<KIND, VNNI>(codes[block], inputs, first + block);
                    }
                    // `checked` made sure the group's input scales and sums exist.
                    let (input_scales, input_sums) = {
                        (
                            _mm256_loadu_ps(inputs.scales.as_ptr().add(first)),
                            _mm256_loadu_ps(inputs.sums.as_ptr().add(first)),
                        )
                    };
                    *total = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(lane_per_vector(sums)),
                        _mm256_mul_ps(scales, input_scales),
                        *total,
                    );
                    if let Some(minima) = minima {
                        *total = _mm256_fmadd_ps(minima, input_sums, *total);
                    }
                }
            }
            let mut rests = [0.0f32; N];
            let done = row.len() / bytes - groups.remainder().len() / bytes;
            for (offset, block) in groups.remainder().chunks_exact(bytes).enumerate() {
                let at = done + offset;
                let scale = half(block, 0);
                let minimum = match KIND {
                    Q4_0 => Some(-8.0 * scale),
                    Q5_0 => Some(-16.0 * scale),
                    Q4_1 | Q5_1 => Some(half(block, 2)),
                    _ => None,
                };
                let codes = block_codes::<KIND, VNNI>(block);
                for (inputs, rest) in inputs.iter().zip(&mut rests) {
                    let products = horizontal_sum(_mm256_cvtepi32_ps(codes_times::<KIND, VNNI>(
                        codes, inputs, at,
                    )));
                    let scaled = scale * inputs.scales[at] * products;
                    *rest += match minimum {
                        Some(minimum) => scaled + minimum * inputs.sums[at],
                        None => scaled,
                    };
                }
            }
            for (total, rest) in totals.iter().zip(&mut rests) {
                *rest += horizontal_sum(*total);
            }
            rests
        }
    }

    /// Inputs from which a Q8_0 row meets them side by side in lanes.
    const ACROSS_FROM: usize = 3;

    /// Rows the lanes kernel takes together.
    const ROWS_ACROSS: usize = 2;

    /// `R` Q8_0 rows' products with five to eight inputs, one lane each, each with the bits
    /// [`row_of_blocks`] gives it alone: the same exact integer block sums, then per input the
    /// same float operations in the same order, only with inputs in lanes where that kernel
    /// has blocks in lanes. Each word of four codes is broadcast against every input's values
    /// in one `vpdpbusd`, so no sum runs across lanes until the row's end. The rows share each
    /// load of the inputs' values: one load a `vpdpbusd` left the loads the bottleneck.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn q8_0_rows_across<const R: usize>(rows: [&[u8]; R], lanes: &InputLanes) -> [[f32; LANES]; R] {
        let bytes = block_bytes(Q8_0);
        let blocks = rows[0].len() / bytes;
        let steps = PIECE / 4;
        assert!(
            lanes.lanes_per_input == 1
                && rows.iter().all(|row| row.len() == rows[0].len())
                && lanes.values.len() >= blocks * PIECE * LANES
                && lanes.scales.len() >= blocks * LANES
        );
        let offset = _mm256_set1_epi8(i8::MIN);
        // Block `at`'s integer sums of each row, lane by lane, from the lanes' `−128 · Σ codes`
        // (block `at` starts at `at * bytes` in each row). Loops rather than array maps, whose
        // closures would not inherit this function's features.
        let block_sums = |at: usize, starts: [__m256i; R]| {
            // Two chains a row, each half as long as one, as `vpdpbusd` waits on its sum.
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for (sums, start) in sums.iter_mut().zip(starts) {
                sums[0] = start;
            }
            for step in 0..steps {
                // SAFETY: the lanes hold every block's steps of inputs (checked above).
                let values = unsafe {
                    _mm256_loadu_si256(
                        lanes
                            .values
                            .as_ptr()
                            .add((at * steps + step) * 4 * LANES)
                            .cast(),
                    )
                };
                for (row, sums) in rows.iter().zip(&mut sums) {
                    let block = &row[at * bytes..(at + 1) * bytes];
                    // SAFETY: a Q8_0 block holds 32 code bytes after its scale.
                    let codes = unsafe {
                        _mm256_set1_epi32(
                            block
                                .as_ptr()
                                .add(2 + 4 * step)
                                .cast::<i32>()
                                .read_unaligned(),
                        )
                    };
                    sums[step % 2] = _mm256_dpbusd_epi32(sums[step % 2], values, codes);
                }
            }
            let mut totals = [_mm256_setzero_si256(); R];
            for (total, [even, odd]) in totals.iter_mut().zip(sums) {
                *total = _mm256_add_epi32(even, odd);
            }
            totals
        };
        let mut totals = [[_mm256_setzero_ps(); GROUP]; R];
        let whole_groups = blocks / GROUP;
        for group in 0..whole_groups {
            let first = group * GROUP;
            let mut offsets = [_mm256_setzero_si256(); R];
            let mut scales = [_mm256_setzero_ps(); R];
            for ((row, offsets), scales) in rows.iter().zip(&mut offsets).zip(&mut scales) {
                let blocks = &row[first * bytes..(first + GROUP) * bytes];
                let mut block_offsets = [_mm256_setzero_si256(); GROUP];
                for (block, block_offsets) in block_offsets.iter_mut().enumerate() {
                    // SAFETY: the group holds eight blocks of 34 bytes.
                    let codes = unsafe {
                        _mm256_loadu_si256(blocks.as_ptr().add(block * bytes + 2).cast())
                    };
                    *block_offsets = _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset, codes);
                }
                *offsets = _mm256_sub_epi32(_mm256_setzero_si256(), lane_per_vector(block_offsets));
                *scales = halves_of(leading_words(blocks, bytes), false);
            }
            for block in 0..GROUP {
                let which = _mm256_set1_epi32(block as i32);
                let mut starts = [_mm256_setzero_si256(); R];
                for (start, offsets) in starts.iter_mut().zip(offsets) {
                    *start = _mm256_permutevar8x32_epi32(offsets, which);
                }
                let sums = block_sums(first + block, starts);
                for ((totals, scales), sums) in totals.iter_mut().zip(scales).zip(sums) {
                    let products = _mm256_cvtepi32_ps(sums);
                    totals[block] = after_group_block(
                        totals[block],
                        scales,
                        block,
                        products,
                        lanes,
                        first + block,
                    );
                }
            }
        }
        let mut rests = [_mm256_setzero_ps(); R];
        for at in whole_groups * GROUP..blocks {
            let mut starts = [_mm256_setzero_si256(); R];
            for (start, row) in starts.iter_mut().zip(rows) {
                // SAFETY: a Q8_0 block holds 32 code bytes after its scale.
                let codes = unsafe { _mm256_loadu_si256(row[at * bytes + 2..].as_ptr().cast()) };
                *start = _mm256_set1_epi32(-horizontal_sum_epi32(_mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    offset,
                    codes,
                )));
            }
            let sums = block_sums(at, starts);
            for ((rests, row), sums) in rests.iter_mut().zip(rows).zip(sums) {
                let block = &row[at * bytes..(at + 1) * bytes];
                *rests = after_rest_block(*rests, block, _mm256_cvtepi32_ps(sums), lanes, at);
            }
        }
        let mut out = [[0.0; LANES]; R];
        for ((out, totals), rests) in out.iter_mut().zip(totals).zip(rests) {
            *out = lanes_total(totals, rests);
        }
        out
    }

    /// Each lane's `rests` plus its eight block positions' totals, added as
    /// [`horizontal_sum`] adds one input's lanes: `((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
    /// (l3 + l7))`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn lanes_total(totals: [__m256; GROUP], rests: __m256) -> [f32; LANES] {
        let [l0, l1, l2, l3, l4, l5, l6, l7] = totals;
        let sums = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(l0, l4), _mm256_add_ps(l2, l6)),
            _mm256_add_ps(_mm256_add_ps(l1, l5), _mm256_add_ps(l3, l7)),
        );
        let mut out = [0.0f32; LANES];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(rests, sums)) };
        out
    }

    /// One Q8_0 row's products with up to four inputs, two lanes each, with the bits
    /// [`row_of_blocks`] gives each alone, as in [`q8_0_rows_across`]. A block's 32 codes plus
    /// 128 are read once and each eight of them broadcast against every input's values in one
    /// `vpdpbusd`. Two blocks go together: their lanes' sums meet in one register, lane `2j`
    /// the first block's sum for input `j`, lane `2j + 1` the second's, so converting and
    /// scaling take one instruction for both.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn q8_0_row_pairs(row: &[u8], lanes: &InputLanes) -> [f32; LANES] {
        const STEPS: usize = PIECE / 8;
        let bytes = block_bytes(Q8_0);
        let blocks = row.len() / bytes;
        assert!(
            lanes.lanes_per_input == 2
                && lanes.values.len() >= blocks * STEPS * 4 * LANES
                && lanes.starts.len() >= blocks * LANES
                && lanes.scales.len() >= blocks * LANES
        );
        // Block `at`'s sums in lanes: an input's two lanes add to its integer sum.
        let block_lanes = |block: &[u8], at: usize| {
            // SAFETY: a Q8_0 block holds 32 code bytes after its scale; the lanes hold every
            // block's steps of inputs and starts (checked above).
            unsafe {
                let codes = _mm256_xor_si256(
                    _mm256_loadu_si256(block.as_ptr().add(2).cast()),
                    _mm256_set1_epi8(i8::MIN),
                );
                let values = |step: usize| {
                    _mm256_loadu_si256(
                        lanes
                            .values
                            .as_ptr()
                            .add((at * STEPS + step) * 4 * LANES)
                            .cast(),
                    )
                };
                let first = _mm256_dpbusd_epi32(
                    _mm256_loadu_si256(lanes.starts.as_ptr().add(at * LANES).cast()),
                    _mm256_permute4x64_epi64::<0b00_00_00_00>(codes),
                    values(0),
                );
                let second = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    _mm256_permute4x64_epi64::<0b01_01_01_01>(codes),
                    values(1),
                );
                let first = _mm256_dpbusd_epi32(
                    first,
                    _mm256_permute4x64_epi64::<0b10_10_10_10>(codes),
                    values(2),
                );
                let second = _mm256_dpbusd_epi32(
                    second,
                    _mm256_permute4x64_epi64::<0b11_11_11_11>(codes),
                    values(3),
                );
                _mm256_add_epi32(first, second)
            }
        };
        // Per pair of blocks `2q, 2q + 1` of a group, the lanes of block positions 2q and 2q + 1.
        let mut totals = [_mm256_setzero_ps(); GROUP / 2];
        let mut groups = row.chunks_exact(GROUP * bytes);
        for (group, blocks) in groups.by_ref().enumerate() {
            let first = group * GROUP;
            let scales = halves_of(leading_words(blocks, bytes), false);
            for (pair, total) in totals.iter_mut().enumerate() {
                let (even, odd) = (2 * pair, 2 * pair + 1);
                let a = block_lanes(&blocks[even * bytes..], first + even);
                let b = block_lanes(&blocks[odd * bytes..], first + odd);
                // Lane 2j: input j's even-block sum; lane 2j + 1: its odd-block sum.
                let crossed =
                    _mm256_shuffle_epi32::<0b10_11_00_01>(_mm256_blend_epi32::<0b1010_1010>(b, a));
                let sums = _mm256_add_epi32(_mm256_blend_epi32::<0b1010_1010>(a, b), crossed);
                let weight_scales = _mm256_permutevar8x32_ps(
                    scales,
                    _mm256_setr_epi32(
                        even as i32,
                        odd as i32,
                        even as i32,
                        odd as i32,
                        even as i32,
                        odd as i32,
                        even as i32,
                        odd as i32,
                    ),
                );
                let input_scales = _mm256_blend_ps::<0b1010_1010>(
                    input_scales(lanes, first + even),
                    input_scales(lanes, first + odd),
                );
                *total = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums),
                    _mm256_mul_ps(weight_scales, input_scales),
                    *total,
                );
            }
        }
        let mut rests = _mm256_setzero_ps();
        let done = blocks - groups.remainder().len() / bytes;
        for (offset_index, block) in groups.remainder().chunks_exact(bytes).enumerate() {
            let at = done + offset_index;
            let sums = block_lanes(block, at);
            let products = _mm256_cvtepi32_ps(_mm256_add_epi32(
                sums,
                _mm256_shuffle_epi32::<0b10_11_00_01>(sums),
            ));
            rests = after_rest_block(rests, block, products, lanes, at);
        }
        // Lane 2j: `(l0 + l4) + (l2 + l6)` of input j's block positions; lane 2j + 1:
        // `(l1 + l5) + (l3 + l7)`, as the one-input kernel adds its lanes.
        let [t01, t23, t45, t67] = totals;
        let halves = _mm256_add_ps(_mm256_add_ps(t01, t45), _mm256_add_ps(t23, t67));
        let sums = _mm256_add_ps(halves, _mm256_permute_ps::<0b10_11_00_01>(halves));
        let mut out = [0.0f32; LANES];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(rests, sums)) };
        out
    }

    /// The first four bytes of each of a group's eight blocks (a block's scale, and a
    /// Q4_1 or Q5_1 block's minimum after it), block `i`'s in lane `i`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn leading_words(blocks: &[u8], bytes: usize) -> __m256i {
        assert!(bytes >= 4 && blocks.len() >= GROUP * bytes);
        // Eight loads rather than one gather: AMD's Zen 4 runs `vpgatherdd` as microcode, and
        // the Q8_0 lanes kernel ran 5% slower in cache with it.
        let word = |block: usize| {
            // SAFETY: the eight words lie inside `blocks` (checked above).
            unsafe {
                blocks
                    .as_ptr()
                    .add(block * bytes)
                    .cast::<i32>()
                    .read_unaligned()
            }
        };
        _mm256_setr_epi32(
            word(0),
            word(1),
            word(2),
            word(3),
            word(4),
            word(5),
            word(6),
            word(7),
        )
    }

    /// Block `at`'s input scales, as the lanes hold them.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn input_scales(lanes: &InputLanes, at: usize) -> __m256 {
        let scales = &lanes.scales[at * LANES..][..LANES];
        // SAFETY: the slice holds the eight floats.
        unsafe { _mm256_loadu_ps(scales.as_ptr()) }
    }

    /// `total` after block `block` of a group of eight Q8_0 blocks whose scales are `scales`
    /// (block `i`'s in lane `i`), lane by lane, as [`row_of_blocks`] adds it for one input:
    /// `products · (scale · input scale) + total`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn after_group_block(
        total: __m256,
        scales: __m256,
        block: usize,
        products: __m256,
        lanes: &InputLanes,
        at: usize,
    ) -> __m256 {
        let input_scales = input_scales(lanes, at);
        let scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(block as i32));
        _mm256_fmadd_ps(products, _mm256_mul_ps(scale, input_scales), total)
    }

    /// `rests` after a Q8_0 block past the row's last whole group, lane by lane, as
    /// [`row_of_blocks`] adds it for one input: `(scale · input scale) · products`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn after_rest_block(
        rests: __m256,
        block: &[u8],
        products: __m256,
        lanes: &InputLanes,
        at: usize,
    ) -> __m256 {
        let scale = _mm256_mul_ps(_mm256_set1_ps(half(block, 0)), input_scales(lanes, at));
        _mm256_add_ps(rests, _mm256_mul_ps(scale, products))
    }

    #[target_feature(enable = "avx2")]
    fn horizontal_sum_epi32(lanes: __m256i) -> i32 {
        let halves = _mm_add_epi32(
            _mm256_castsi256_si128(lanes),
            _mm256_extracti128_si256::<1>(lanes),
        );
        let pairs = _mm_add_epi32(halves, _mm_shuffle_epi32::<0b01_00_11_10>(halves));
        _mm_cvtsi128_si32(_mm_add_epi32(
            pairs,
            _mm_shuffle_epi32::<0b10_11_00_01>(pairs),
        ))
    }

    /// Block `at`'s 32 inputs.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn input_values(inputs: &PieceInputs, at: usize) -> __m256i {
        assert!((at + 1) * PIECE <= inputs.values.len());
        // SAFETY: checked above.
        unsafe { _mm256_loadu_si256(inputs.values.as_ptr().add(at * PIECE).cast()) }
    }

    /// Eight 32-bit words' low (or high) halves, read as f16, as eight floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn halves_of(words: __m256i, high: bool) -> __m256 {
        let order = if high {
            _mm256_setr_epi8(
                2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14,
                15, -1, -1, -1, -1, -1, -1, -1, -1,
            )
        } else {
            _mm256_setr_epi8(
                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13,
                -1, -1, -1, -1, -1, -1, -1, -1,
            )
        };
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(words, order));
        _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
    }

    /// The K-quant super-blocks of 256 values: per super-block the eight sub-block scales (and
    /// minima) are unpacked once, then each 32-value piece's codes are cut from the stored
    /// bits in registers, once for all `N` inputs, and meet each input's values as in
    /// [`row_of_blocks`]. Q6_K scales each 16 values, so its pieces' two halves take two
    /// scales. Each input's float operations are those it has alone, in the same order.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_of_super_blocks<const KIND: u8, const N: usize>(
        row: &[u8],
        inputs: [&PieceInputs; N],
    ) -> [f32; N] {
        let low_nibbles = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [[_mm256_setzero_ps(); 2]; N];
        let mut minima = [0.0f32; N];
        for (index, block) in row.chunks_exact(block_bytes(KIND)).enumerate() {
            let first = index * 8;
            // SAFETY: `checked` made sure the super-block's 256 inputs exist.
            let values = |inputs: &PieceInputs, piece: usize| unsafe {
                _mm256_loadu_si256(inputs.values.as_ptr().add((first + piece) * PIECE).cast())
            };
            if KIND == Q6_K {
                let d = half(block, 208);
                let (low, high, scales) = (&block[..128], &block[128..192], &block[192..208]);
                for part in 0..2 {
                    // SAFETY: 64 bytes of low nibbles and 32 of high pairs per 128 values.
                    let (a, b, pairs) = unsafe {
                        (
                            _mm256_loadu_si256(low[64 * part..].as_ptr().cast()),
                            _mm256_loadu_si256(low[64 * part + 32..].as_ptr().cast()),
                            _mm256_loadu_si256(high[32 * part..].as_ptr().cast()),
                        )
                    };
                    let nibbles = [
                        _mm256_and_si256(a, low_nibbles),
                        _mm256_and_si256(b, low_nibbles),
                        _mm256_and_si256(_mm256_srli_epi16(a, 4), low_nibbles),
                        _mm256_and_si256(_mm256_srli_epi16(b, 4), low_nibbles),
                    ];
                    let mut pairs = pairs;
                    for (quarter, nibbles) in nibbles.into_iter().enumerate() {
                        let piece = 4 * part + quarter;
                        let top =
                            _mm256_slli_epi16(_mm256_and_si256(pairs, _mm256_set1_epi8(3)), 4);
                        pairs = _mm256_srli_epi16(pairs, 2);
                        let codes =
                            _mm256_sub_epi8(_mm256_or_si256(nibbles, top), _mm256_set1_epi8(32));
                        let magnitudes = _mm256_sign_epi8(codes, codes);
                        let (low_scale, high_scale) = (
                            f32::from(scales[2 * piece] as i8),
                            f32::from(scales[2 * piece + 1] as i8),
                        );
                        for (inputs, sums) in inputs.iter().zip(&mut sums) {
                            let products = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                                _mm256_maddubs_epi16(
                                    magnitudes,
                                    _mm256_sign_epi8(values(inputs, piece), codes),
                                ),
                                ones,
                            ));
                            let scale = d * inputs.scales[first + piece];
                            let halves = _mm256_set_m128(
                                _mm_set1_ps(scale * high_scale),
                                _mm_set1_ps(scale * low_scale),
                            );
                            sums[piece % 2] = _mm256_fmadd_ps(products, halves, sums[piece % 2]);
                        }
                    }
                }
                continue;
            }
            let (d, dmin) = (half(block, 0), half(block, 2));
            let (codes, fifth) = match KIND {
                Q5_K => (&block[48..176], Some(&block[16..48])),
                _ => (&block[16..144], None),
            };
            // SAFETY: a Q5_K super-block holds 32 bytes of fifth bits.
            let mut fifth_bits =
                fifth.map(|bits| unsafe { _mm256_loadu_si256(bits.as_ptr().cast()) });
            for pair in 0..4 {
                // SAFETY: 32 bytes of nibbles per 64 values.
                let packed = unsafe { _mm256_loadu_si256(codes[32 * pair..].as_ptr().cast()) };
                let nibbles = [
                    _mm256_and_si256(packed, low_nibbles),
                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles),
                ];
                for (side, mut codes) in nibbles.into_iter().enumerate() {
                    let piece = 2 * pair + side;
                    if let Some(bits) = fifth_bits.as_mut() {
                        let bit = _mm256_and_si256(*bits, _mm256_set1_epi8(1));
                        codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
                        *bits = _mm256_srli_epi16(*bits, 1);
                    }
                    let (scale, minimum) = scale_min_k4(&block[4..16], piece);
                    let (scale, minimum) = (d * f32::from(scale), dmin * f32::from(minimum));
                    for ((inputs, sums), minima) in inputs.iter().zip(&mut sums).zip(&mut minima) {
                        let products = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                            _mm256_maddubs_epi16(codes, values(inputs, piece)),
                            ones,
                        ));
                        let scale = scale * inputs.scales[first + piece];
                        sums[piece % 2] =
                            _mm256_fmadd_ps(products, _mm256_set1_ps(scale), sums[piece % 2]);
                        *minima -= minimum * inputs.sums[first + piece];
                    }
                }
            }
        }
        let mut totals = [0.0; N];
        for ((total, sums), minima) in totals.iter_mut().zip(sums).zip(minima) {
            *total = horizontal_sum(_mm256_add_ps(sums[0], sums[1])) + minima;
        }
        totals
    }

    /// A block's 32 codes as the products meet them: the unsigned operand, and what Q8_0's
    /// signed codes need besides. With AVX2 that is the codes themselves: `vpmaddubsw` takes
    /// their magnitudes and the inputs take their signs. With VNNI `vpdpbusd` takes the codes
    /// as they are against the inputs plus 128, so each lane starts from −128 times its codes'
    /// sum. The other types' codes are unsigned as they stand.
    #[inline(always)]
    unsafe fn block_codes<const KIND: u8, const VNNI: bool>(block: &[u8]) -> [__m256i; 2] {
        // SAFETY: the caller's function has AVX2 (and with `VNNI` AVX-512 VNNI and VL).
        unsafe {
            let codes = match KIND {
                Q4_0 => nibbles(&block[2..18]),
                Q4_1 => nibbles(&block[4..20]),
                Q5_0 => _mm256_or_si256(nibbles(&block[6..22]), fifth_bits(&block[2..6])),
                Q5_1 => _mm256_or_si256(nibbles(&block[8..24]), fifth_bits(&block[4..8])),
                _ => {
                    assert!(block.len() >= 34);
                    let codes = _mm256_loadu_si256(block[2..34].as_ptr().cast());
                    if VNNI {
                        let offsets = _mm256_dpbusd_epi32(
                            _mm256_setzero_si256(),
                            _mm256_set1_epi8(i8::MIN),
                            codes,
                        );
                        return [codes, _mm256_sub_epi32(_mm256_setzero_si256(), offsets)];
                    }
                    return [_mm256_sign_epi8(codes, codes), codes];
                }
            };
            [codes, codes]
        }
    }

    /// Block `at`'s integer products with an input's values, summed into eight lanes.
    #[inline(always)]
    unsafe fn codes_times<const KIND: u8, const VNNI: bool>(
        [codes, extra]: [__m256i; 2],
        inputs: &PieceInputs,
        at: usize,
    ) -> __m256i {
        // SAFETY: as in [`block_codes`].
        unsafe {
            if VNNI && KIND == Q8_0 {
                assert!((at + 1) * PIECE <= inputs.offset_values.len());
                let values =
                    _mm256_loadu_si256(inputs.offset_values.as_ptr().add(at * PIECE).cast());
                return _mm256_dpbusd_epi32(extra, values, codes);
            }
            let values = input_values(inputs, at);
            if VNNI {
                return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, values);
            }
            let values = if KIND == Q8_0 {
                _mm256_sign_epi8(values, extra)
            } else {
                values
            };
            _mm256_madd_epi16(_mm256_maddubs_epi16(codes, values), _mm256_set1_epi16(1))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn half(block: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([block[at], block[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// 16 bytes of nibbles as 32 bytes: the low nibbles (values 0..16), then the high ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles(bytes: &[u8]) -> __m256i {
        assert!(bytes.len() == 16);
        // SAFETY: 16 bytes were checked above.
        let packed = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            _mm256_set1_epi8(0x0f),
        )
    }

    /// A 32-bit little-endian word's bit `j` as 16 in byte `j` (0 where the bit is clear).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fifth_bits(bytes: &[u8]) -> __m256i {
        let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        // Byte `j` takes the word's byte `j / 8`, then keeps bit `j % 8` of it.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(word as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// Only handed out by [`super::pieces_dot`] once the CPU is known to have AVX2 and FMA.
    pub(super) fn pieces_dot(codes: &[i8], scales: &[PieceScales], inputs: &PieceInputs) -> f32 {
        assert!(codes.len() == scales.len() * PIECE && inputs.values.len() >= codes.len());
        // SAFETY: the kernel family was checked; the lengths were checked above.
        unsafe { dot(codes, scales, inputs) }
    }

    /// Each piece's codes meet its inputs in one `vpmaddubsw` (the unsigned operand is the
    /// codes' magnitude, read unsigned so a code of -128 gives 128; the inputs carry the codes'
    /// signs, which is exact because rounding clamps inputs to ±127, so no pair sum exceeds
    /// 32,512) and
    /// one `vpmaddwd`: i32 lanes 0..4 hold the first half's products, 4..8 the second's, which
    /// one multiply-add with the halves' scales folds into float lanes.
    #[target_feature(enable = "avx2,fma")]
    fn dot(codes: &[i8], scales: &[PieceScales], inputs: &PieceInputs) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut sums = _mm256_setzero_ps();
        let mut biases = 0.0f32;
        for (at, piece) in scales.iter().enumerate() {
            // SAFETY: `pieces_dot` checked that piece `at`'s 32 codes and inputs exist.
            let (weights, values) = unsafe {
                (
                    _mm256_loadu_si256(codes.as_ptr().add(at * PIECE).cast()),
                    _mm256_loadu_si256(inputs.values.as_ptr().add(at * PIECE).cast()),
                )
            };
            let pairs = _mm256_maddubs_epi16(
                _mm256_sign_epi8(weights, weights),
                _mm256_sign_epi8(values, weights),
            );
            let products = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            let scale = inputs.scales[at];
            let lane_scales = _mm256_set_m128(
                _mm_set1_ps(piece.scale[1] * scale),
                _mm_set1_ps(piece.scale[0] * scale),
            );
            sums = _mm256_fmadd_ps(products, lane_scales, sums);
            biases += piece.bias[0] * inputs.half_sums[2 * at]
                + piece.bias[1] * inputs.half_sums[2 * at + 1];
        }
        horizontal_sum(sums) + biases
    }
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ggml::blocks::{QUANTIZED_KINDS, decode_piece, pieces_per_block, random_blocks};
    #[cfg(target_arch = "x86_64")]
    use crate::test_support::assert_each_input_keeps_its_bits;

    /// The kernels that read stored blocks give the piece kernel's sums over the same blocks,
    /// for every type they serve, every code (random blocks cover all) and extreme inputs.
    #[test]
    fn block_kernels_equal_the_piece_kernel() {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::KernelFamily::detected() >= crate::cpu::KernelFamily::Avx2 {
            let mut rng = ChaCha8Rng::seed_from_u64(12);
            let mut served = 0;
            for kind in QUANTIZED_KINDS {
                let kernels = block_kernels(kind);
                if kernels.is_empty() {
                    continue;
                }
                served += 1;
                let blocks = 18;
                let row = random_blocks(kind, blocks, &mut rng);
                let mut codes = vec![0i8; blocks * kind.block_values()];
                let mut scales = Vec::new();
                for (index, block) in row.chunks_exact(kind.block_bytes()).enumerate() {
                    for piece in 0..pieces_per_block(kind) {
                        let at = (index * pieces_per_block(kind) + piece) * PIECE;
                        let piece_codes: &mut [i8; PIECE] =
                            (&mut codes[at..at + PIECE]).try_into().unwrap();
                        scales.push(decode_piece(kind, block, piece, piece_codes));
                    }
                }
                let mut input: Vec<f32> = (0..codes.len())
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect();
                input[..PIECE].fill(-1.0);
                input[PIECE..2 * PIECE].fill(1.0);
                let inputs = PieceInputs::new(&input);
                let pieces = pieces_dot_portable(&codes, &scales, &inputs);
                // Six copies of the row, one after another.
                let rows = row.repeat(6);
                for kernel in kernels {
                    let mut out = [0.0f32; 6];
                    kernel(
                        &rows,
                        row.len(),
                        &RoundedInputs::new(vec![inputs.clone()]),
                        &mut out,
                    );
                    for blocks in out {
                        assert!(
                            (blocks - pieces).abs() < 1e-4 * pieces.abs().max(1.0),
                            "{kind}: {blocks} vs {pieces}"
                        );
                    }
                }
            }
            assert_eq!(
                served, 8,
                "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K"
            );
        }
    }

    /// A block kernel's run over `matrix` (rows of `row_bytes`) with some inputs, as
    /// [`assert_each_input_keeps_its_bits`] calls it.
    #[cfg(target_arch = "x86_64")]
    fn blocks_run(
        matrix: &[u8],
        row_bytes: usize,
    ) -> impl Fn(&BlocksDot, &[PieceInputs], &mut [f32]) + '_ {
        move |kernel, inputs, out| {
            kernel(matrix, row_bytes, &RoundedInputs::new(inputs.to_vec()), out)
        }
    }

    /// The block kernels of every family this CPU has: AVX2's, VNNI's and AMX's.
    #[cfg(target_arch = "x86_64")]
    fn block_kernels(kind: GgmlType) -> Vec<BlocksDot> {
        use crate::cpu::KernelFamily;
        let family = KernelFamily::detected();
        let mut kernels = Vec::new();
        if family >= KernelFamily::Avx2 {
            kernels.extend(x86::blocks_dot::<false>(kind));
        }
        if family >= KernelFamily::Avx512Vnni {
            kernels.extend(x86::blocks_dot::<true>(kind));
        }
        if family >= KernelFamily::Amx && kind == GgmlType::Q8_0 {
            kernels.push(tiles::q8_0_products);
        }
        kernels
    }

    /// Q8_0 rows on tiles: whole and partial tiles of 16 channels (40 = 2 x 16 + 8), blocks in
    /// whole groups of eight and after them (50 = 6 x 8 + 2), extreme codes and inputs, one to
    /// eleven inputs (a whole set of eight and a partial one), each with the bits the VNNI
    /// kernel gives it alone.
    #[test]
    fn q8_0_tiles_give_each_input_its_bits_alone() {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::KernelFamily;
            if KernelFamily::detected() < KernelFamily::Amx {
                return;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(17);
            let (rows, blocks) = (40, 50);
            let kind = GgmlType::Q8_0;
            let row_bytes = blocks * kind.block_bytes();
            let mut matrix = random_blocks(kind, rows * blocks, &mut rng);
            matrix[2..2 + PIECE].fill(0x80);
            let inputs: Vec<PieceInputs> = (0..11)
                .map(|index| {
                    let mut input: Vec<f32> = (0..blocks * PIECE)
                        .map(|_| rng.random::<f32>() - 0.5)
                        .collect();
                    if index == 0 {
                        input[..PIECE].fill(-1.0);
                    }
                    PieceInputs::new(&input)
                })
                .collect();
            let kernels = [
                x86::blocks_dot::<true>(kind).expect("a VNNI kernel"),
                tiles::q8_0_products,
            ];
            let run = blocks_run(&matrix, row_bytes);
            assert_each_input_keeps_its_bits(&kernels, &inputs, rows, run, "Q8_0 tiles");
        }
    }

    /// A row's product with an input has the bits it has alone when the row meets several
    /// inputs at once (one to nine of them: whole and partial sets of four), for every type,
    /// with blocks in whole groups of eight and after them, and the same bits on every kernel
    /// family.
    #[test]
    fn an_input_keeps_its_bits_among_others() {
        #[cfg(target_arch = "x86_64")]
        {
            let mut rng = ChaCha8Rng::seed_from_u64(14);
            for kind in QUANTIZED_KINDS {
                let kernels = block_kernels(kind);
                let (rows, blocks) = (3, if kind.block_values() == PIECE { 18 } else { 3 });
                let row_bytes = blocks * kind.block_bytes();
                let matrix = random_blocks(kind, rows * blocks, &mut rng);
                let inputs: Vec<PieceInputs> = (0..9)
                    .map(|_| {
                        let input: Vec<f32> = (0..blocks * kind.block_values())
                            .map(|_| rng.random::<f32>() - 0.5)
                            .collect();
                        PieceInputs::new(&input)
                    })
                    .collect();
                let run = blocks_run(&matrix, row_bytes);
                assert_each_input_keeps_its_bits(&kernels, &inputs, rows, run, &kind.to_string());
            }
        }
    }

    /// Q4_0 and Q4_1 matrices, which keep their rows interleaved on CPUs with this family,
    /// give the row kernel's sums for each of sixteen different rows, extreme inputs included.
    #[test]
    fn interleaved_matrices_equal_the_row_kernel() {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::KernelFamily::detected() >= crate::cpu::KernelFamily::Avx2 {
            let mut rng = ChaCha8Rng::seed_from_u64(13);
            let blocks = 18;
            for kind in [GgmlType::Q4_0, GgmlType::Q4_1] {
                let rows = random_blocks(kind, 16 * blocks, &mut rng);
                let mut input: Vec<f32> = (0..blocks * PIECE)
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect();
                input[..PIECE].fill(-1.0);
                input[PIECE..2 * PIECE].fill(1.0);
                let inputs = PieceInputs::new(&input);
                let mut by_row = [0.0f32; 16];
                let row_kernel = x86::blocks_dot::<false>(kind).unwrap();
                let row_bytes = blocks * kind.block_bytes();
                row_kernel(
                    &rows,
                    row_bytes,
                    &RoundedInputs::new(vec![inputs]),
                    &mut by_row,
                );
                let matrix = crate::ggml::BlockMatrix::new(kind, 16, blocks * PIECE, rows);
                let interleaved = matrix.unwrap().matmul_int8_inputs(&input, 1);
                for (got, want) in interleaved.into_iter().zip(by_row) {
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "{kind}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Interleaved Q4_0 and Q4_1 rows give each input the bits it has alone when they meet
    /// one to nine inputs at once.
    #[test]
    fn interleaved_rows_keep_each_inputs_bits_among_others() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let (rows, blocks) = (16, 18);
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = random_blocks(kind, rows * blocks, &mut rng);
            let matrix = crate::ggml::BlockMatrix::new(kind, rows, blocks * PIECE, bytes).unwrap();
            let x: Vec<f32> = (0..9 * blocks * PIECE)
                .map(|_| rng.random::<f32>() - 0.5)
                .collect();
            let alone: Vec<Vec<f32>> = x
                .chunks_exact(blocks * PIECE)
                .map(|input| matrix.matmul_int8_inputs(input, 1))
                .collect();
            let together = |count| {
                let by_input = matrix.matmul_int8_inputs(&x[..count * blocks * PIECE], count);
                (0..rows * count)
                    .map(|at| by_input[(at % count) * rows + at / count])
                    .collect()
            };
            crate::test_support::assert_inputs_keep_their_bits(&alone, together, &kind.to_string());
        }
    }

    /// Every kernel family this CPU has gives the portable kernel's sums (up to float
    /// summation order), extreme codes (-128 against -127 inputs) included.
    #[test]
    fn every_kernel_equals_the_portable_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let pieces = 24;
        let mut codes: Vec<i8> = (0..pieces * PIECE).map(|_| rng.random()).collect();
        codes[..PIECE].fill(-128);
        let scales: Vec<PieceScales> = (0..pieces)
            .map(|_| PieceScales {
                scale: [rng.random::<f32>(), rng.random::<f32>()],
                bias: [rng.random::<f32>() - 0.5, rng.random::<f32>() - 0.5],
            })
            .collect();
        let mut input: Vec<f32> = (0..pieces * PIECE)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        input[..PIECE].fill(-1.0);
        let inputs = PieceInputs::new(&input);
        let portable = pieces_dot_portable(&codes, &scales, &inputs);
        let expected: f64 = (0..pieces)
            .map(|at| {
                let dot = |half: usize| -> f64 {
                    (half * 16..half * 16 + 16)
                        .map(|j| {
                            f64::from(codes[at * PIECE + j])
                                * f64::from(inputs.values[at * PIECE + j])
                        })
                        .sum()
                };
                f64::from(inputs.scales[at])
                    * (f64::from(scales[at].scale[0]) * dot(0)
                        + f64::from(scales[at].scale[1]) * dot(1))
                    + f64::from(scales[at].bias[0]) * f64::from(inputs.half_sums[2 * at])
                    + f64::from(scales[at].bias[1]) * f64::from(inputs.half_sums[2 * at + 1])
            })
            .sum();
        assert!((f64::from(portable) - expected).abs() < 1e-3 * expected.abs().max(1.0));
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let avx2 = x86::pieces_dot(&codes, &scales, &inputs);
            assert!(
                (avx2 - portable).abs() < 1e-4 * portable.abs().max(1.0),
                "{avx2} vs {portable}"
            );
        }
    }
}
