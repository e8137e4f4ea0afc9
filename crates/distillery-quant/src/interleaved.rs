//! 4-bit matrices with their rows interleaved eight at a time, and the AVX2 kernel that reads
//! them: GGUF's Q4_0 (llama.cpp repacks Q4_0 at load time on such CPUs for the same reason)
//! and distillery's own 4-bit codes in groups of whole blocks. A row-major kernel spends most of its instructions per block on work that does not touch the
//! codes: a scale to load and convert and a sum across lanes per row. With eight rows side by
//! side, one broadcast input word meets eight rows' codes, eight scales convert in one
//! instruction, and the eight rows' sums stay in one register's lanes; the bytes are still one
//! stream.
//!
//! Each block holds 16 bytes of a row's codes for 32 input columns, two codes a byte (which
//! code goes with which column is the caller's: the inputs come in the matching order). A
//! group of eight rows stores, weight group after weight group, a tile: the eight rows'
//! half-precision scales, their minima where the layout has them (Q4_1: `x = d q + m`), then
//! for each block of the weight group the eight rows' codes in words of [`WORD`] bytes: the
//! first word of each row in turn, then the second, and so on.

use std::ops::Range;

use crate::cpu::{KernelFamily, kernel_family};

/// Rows a group interleaves.
pub(crate) const GROUP_ROWS: usize = 8;

/// Bytes of one row's codes in a block.
pub(crate) const BLOCK_CODES: usize = 16;

/// Bytes of a row's codes that sit together in a tile.
const WORD: usize = 4;

/// Eight rows' half-precision numbers: their scales, or their minima.
const HALVES: usize = GROUP_ROWS * 2;

/// One block of eight rows' codes.
const BLOCK_TILE: usize = GROUP_ROWS * BLOCK_CODES;

/// The shape of an interleaved matrix's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Blocks a row.
    pub blocks: usize,
    /// Blocks a scale covers.
    pub blocks_per_group: usize,
    /// Whether each row and group has a minimum besides its scale.
    pub minima: bool,
}

impl Shape {
    pub(crate) fn groups(self) -> usize {
        self.blocks / self.blocks_per_group
    }

    /// Where a tile's codes start: after its scales and minima.
    fn tile_codes(self) -> usize {
        HALVES * (1 + usize::from(self.minima))
    }

    /// One weight group of eight rows: their scales, minima and codes.
    pub(crate) fn tile_bytes(self) -> usize {
        self.tile_codes() + self.blocks_per_group * BLOCK_TILE
    }

    /// Eight rows.
    pub(crate) fn group_bytes(self) -> usize {
        self.groups() * self.tile_bytes()
    }

    fn tile(self, row: usize, group: usize) -> usize {
        (row / GROUP_ROWS) * self.group_bytes() + group * self.tile_bytes()
    }

    /// Where the scale (`which` 0) or minimum (1) of row `row` and weight group `group`
    /// starts.
    fn half_offset(self, row: usize, group: usize, which: usize) -> usize {
        self.tile(row, group) + which * HALVES + 2 * (row % GROUP_ROWS)
    }

    /// Where byte `byte` of row `row`'s codes in block `block` sits.
    fn code_offset(self, row: usize, block: usize, byte: usize) -> usize {
        self.tile(row, block / self.blocks_per_group)
            + self.tile_codes()
            + (block % self.blocks_per_group) * BLOCK_TILE
            + (byte / WORD) * GROUP_ROWS * WORD
            + (row % GROUP_ROWS) * WORD
            + byte % WORD
    }

    /// `rows` rows (a multiple of eight) interleaved: `halves(row, group)` is a scale's and
    /// (where the shape has minima) a minimum's half-precision bits, `codes(row, block)` a
    /// block's code bytes.
    pub(crate) fn interleave<'a>(
        self,
        rows: usize,
        halves: impl Fn(usize, usize) -> [u16; 2],
        codes: impl Fn(usize, usize) -> &'a [u8],
    ) -> Vec<u8> {
        debug_assert!(rows.is_multiple_of(GROUP_ROWS));
        let mut out = vec![0; rows / GROUP_ROWS * self.group_bytes()];
        for row in 0..rows {
            for group in 0..self.groups() {
                let halves = halves(row, group);
                for (which, half) in halves.iter().enumerate().take(1 + usize::from(self.minima)) {
                    let at = self.half_offset(row, group, which);
                    out[at..at + 2].copy_from_slice(&half.to_le_bytes());
                }
            }
            for block in 0..self.blocks {
                for (byte, &value) in codes(row, block)[..BLOCK_CODES].iter().enumerate() {
                    out[self.code_offset(row, block, byte)] = value;
                }
            }
        }
        out
    }

    /// Row `row`'s scale of weight group `group` and its minimum (0 without minima), as
    /// half-precision bits.
    pub(crate) fn halves(self, bytes: &[u8], row: usize, group: usize) -> [u16; 2] {
        std::array::from_fn(|which| {
            if which > usize::from(self.minima) {
                return 0;
            }
            let at = self.half_offset(row, group, which);
            u16::from_le_bytes([bytes[at], bytes[at + 1]])
        })
    }

    /// Row `row`'s code bytes, block after block, into `out`.
    pub(crate) fn row_codes(self, bytes: &[u8], row: usize, out: &mut Vec<u8>) {
        out.clear();
        let group = &bytes[self.tile(row, 0)..][..self.group_bytes()];
        let first = self.tile_codes() + (row % GROUP_ROWS) * WORD;
        // Tile by tile and word by word, rather than each byte's offset computed anew: exact
        // products on interleaved rows gather every row this way.
        for tile in group.chunks_exact(self.tile_bytes()) {
            for block in tile[first..].chunks(BLOCK_TILE).take(self.blocks_per_group) {
                for word in block.chunks(GROUP_ROWS * WORD) {
                    out.extend_from_slice(&word[..WORD]);
                }
            }
        }
    }

    /// Row `row`'s scales, group after group, as half-precision bits, into `out`.
    pub(crate) fn row_scales(self, bytes: &[u8], row: usize, out: &mut Vec<u16>) {
        out.clear();
        let group = &bytes[self.tile(row, 0)..][..self.group_bytes()];
        let at = 2 * (row % GROUP_ROWS);
        out.extend(
            group
                .chunks_exact(self.tile_bytes())
                .map(|tile| u16::from_le_bytes([tile[at], tile[at + 1]])),
        );
    }

    /// Row `row`'s code bytes of block `block`.
    pub(crate) fn codes(self, bytes: &[u8], row: usize, block: usize) -> [u8; BLOCK_CODES] {
        let first = self.code_offset(row, block, 0);
        let mut codes = [0; BLOCK_CODES];
        for (word, codes) in codes.chunks_exact_mut(WORD).enumerate() {
            let at = first + word * GROUP_ROWS * WORD;
            codes.copy_from_slice(&bytes[at..at + WORD]);
        }
        codes
    }
}

/// Inputs in 32-value blocks rounded to int8, as the kernel meets them.
pub(crate) struct KernelInputs<'a> {
    /// Each block's 32 values: those that meet the low nibbles of a block's code bytes
    /// `0..16` in turn, then those that meet their high nibbles.
    pub values: &'a [i8],
    /// Each block's scale.
    pub scales: &'a [f32],
    /// Each block's `scale · Σ values`, divided by `sum_factor`.
    pub sums: &'a [f32],
    /// What `sums` are multiplied by to give the inputs' sums.
    pub sum_factor: f32,
    pub zeros: Zeros<'a>,
}

/// The code that stands for 0 in each weight group.
#[derive(Clone, Copy)]
pub(crate) enum Zeros<'a> {
    /// One for every group (Q4_0's 8).
    All(f32),
    /// One a group, the same for every row.
    Shared(&'a [u8]),
}

/// Groups of eight interleaved rows of `shape` against each of several inputs:
/// `out[i * inputs + j]` is row `i`'s
/// `Σ_group scale · Σ_block input_scale · ((codes - zero) · values) + minimum · Σ inputs`
/// with input `j`; `rows` holds `out.len() / (8 · inputs)` groups.
pub(crate) type InterleavedDot = fn(rows: &[u8], Shape, &[KernelInputs], out: &mut [f32]);

/// The kernel where the kernel family has one for `layout`. Without one, matrices keep
/// their rows in file order.
pub(crate) fn kernel(layout: Layout) -> Option<InterleavedDot> {
    let family = kernel_family();
    #[cfg(target_arch = "x86_64")]
    {
        if family == KernelFamily::Avx2 {
            return Some(x86::dot::<false>);
        }
        if family > KernelFamily::Avx2 && layout == Layout::Ggml {
            return Some(x86::dot::<true>);
        }
    }
    let _ = (family, layout);
    None
}

/// Channels `rows` of a matrix of interleaved rows (`bytes`, all of them) against each of
/// `count` inputs (`input(index)`): `outs[channel * count + index]`. Whole groups of eight run;
/// a task's channels start at multiples of eight unless a matrix before this one in a product
/// of several has a row count that is not, and then only the channels of `rows` are kept.
pub(crate) fn channels<'a>(
    dot: InterleavedDot,
    bytes: &[u8],
    shape: Shape,
    rows: Range<usize>,
    count: usize,
    input: impl Fn(usize) -> KernelInputs<'a>,
    outs: &mut [f32],
) {
    let groups = rows.start / GROUP_ROWS..rows.end.div_ceil(GROUP_ROWS);
    let bytes = &bytes[groups.start * shape.group_bytes()..groups.end * shape.group_bytes()];
    let skipped = rows.start - groups.start * GROUP_ROWS;
    let inputs: Vec<KernelInputs> = (0..count).map(input).collect();
    if skipped == 0 && rows.len() == groups.len() * GROUP_ROWS {
        return dot(bytes, shape, &inputs, outs);
    }
    let mut whole_groups = vec![0.0; groups.len() * GROUP_ROWS * count];
    dot(bytes, shape, &inputs, &mut whole_groups);
    outs.copy_from_slice(&whole_groups[skipped * count..(skipped + rows.len()) * count]);
}

/// Who asks for the kernel: on AVX-512 CPUs distillery's own 4-bit codes keep the VNNI kernel
/// of their row-major layout (the interleaved kernel has not been measured against it there),
/// while GGUF's Q4_0 and Q4_1 blocks take the interleaved kernel's VNNI form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// GGUF's Q4_0 and Q4_1 blocks.
    Ggml,
    /// distillery's own 4-bit codes.
    Packed,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK_TILE, GROUP_ROWS, HALVES, KernelInputs, Shape, WORD, Zeros};
    use crate::int8_inputs::BLOCK;

    /// Only handed out by [`super::kernel`] once the CPU is known to have AVX2, FMA and F16C,
    /// and with `VNNI` AVX-512 VNNI and VL as well. Each group of eight rows meets the inputs
    /// [`INPUTS_AT_ONCE`] at a time while its bytes are in cache.
    pub(super) fn dot<const VNNI: bool>(
        rows: &[u8],
        shape: Shape,
        inputs: &[KernelInputs],
        out: &mut [f32],
    ) {
        let groups = shape.groups();
        let count = inputs.len();
        assert!(
            shape.blocks_per_group > 0
                && out.len().is_multiple_of(GROUP_ROWS * count.max(1))
                && rows.len() * count == out.len() / GROUP_ROWS * shape.group_bytes()
                && inputs.iter().all(|inputs| {
                    inputs.values.len() >= shape.blocks * BLOCK
                        && inputs.scales.len() >= shape.blocks
                        && inputs.sums.len() >= shape.blocks
                        && match inputs.zeros {
                            Zeros::All(_) => true,
                            Zeros::Shared(zeros) => zeros.len() >= groups,
                        }
                })
        );
        if groups == 0 {
            return out.fill(0.0);
        }
        for (rows, out) in rows
            .chunks_exact(shape.group_bytes())
            .zip(out.chunks_exact_mut(GROUP_ROWS * count))
        {
            if count == 1 {
                eight_rows_against::<1, VNNI>(rows, shape, inputs, out, 1);
                continue;
            }
            for (set, inputs) in inputs.chunks(INPUTS_AT_ONCE).enumerate() {
                let out = &mut out[set * INPUTS_AT_ONCE..];
                match inputs.len() {
                    1 => eight_rows_against::<1, VNNI>(rows, shape, inputs, out, count),
                    2 => eight_rows_against::<2, VNNI>(rows, shape, inputs, out, count),
                    3 => eight_rows_against::<3, VNNI>(rows, shape, inputs, out, count),
                    _ => {
                        eight_rows_against::<INPUTS_AT_ONCE, VNNI>(rows, shape, inputs, out, count)
                    }
                }
            }
        }
    }

    /// [`eight_rows`] in a function with the family's features. [`dot`] checked the lengths,
    /// its caller the kernel family.
    fn eight_rows_against<const N: usize, const VNNI: bool>(
        rows: &[u8],
        shape: Shape,
        inputs: &[KernelInputs],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the kernel was handed out for a CPU with the family's features.
        unsafe {
            if VNNI {
                eight_rows_vnni::<N>(rows, shape, inputs, out, stride);
            } else {
                eight_rows_avx2::<N>(rows, shape, inputs, out, stride);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn eight_rows_avx2<const N: usize>(
        rows: &[u8],
        shape: Shape,
        inputs: &[KernelInputs],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: this function's features are those the AVX2 kernel needs.
        unsafe { eight_rows::<N, false>(rows, shape, inputs, out, stride) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn eight_rows_vnni<const N: usize>(
        rows: &[u8],
        shape: Shape,
        inputs: &[KernelInputs],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: this function's features are those the VNNI kernel needs.
        unsafe { eight_rows::<N, true>(rows, shape, inputs, out, stride) }
    }

    /// Inputs that share one unpacking of a group's codes.
    const INPUTS_AT_ONCE: usize = 4;

    /// Per block of eight rows: each code word of the eight rows, split into its nibbles once,
    /// meets each input's four values, broadcast, in one `vpmaddubsw`; the eight results add
    /// up in 16-bit lanes (a pair of products is at most 2 · 15 · 128 = 3,840 in magnitude,
    /// eight pairs 30,720, so nothing overflows) and one `vpmaddwd` leaves row `i`'s integer
    /// sum in lane `i`. With `VNNI` one `vpdpbusd` per nibble half adds the four products
    /// straight into row `i`'s 32-bit lane: the same exact sum. The codes stay unsigned; their
    /// zero comes off each group's sum through the inputs' sum. Each input's float operations
    /// are those it has alone, in the same order, so its sums keep their bits whatever inputs
    /// it shares the rows with, on either family. `out[i * stride + j]` takes row `i`'s sum
    /// with input `j`. Inlined into a function with the family's features; [`dot`] checked the
    /// lengths.
    #[inline(always)]
    unsafe fn eight_rows<const N: usize, const VNNI: bool>(
        rows: &[u8],
        shape: Shape,
        inputs: &[KernelInputs],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller's function has the family's features; the loads and stores
        // below stay inside the slices whose lengths [`dot`] and the assert check.
        unsafe {
            assert!(inputs.len() == N && N <= stride && out.len() >= (GROUP_ROWS - 1) * stride + N);
            let low_nibbles = _mm256_set1_epi8(0xF);
            let mut totals = [_mm256_setzero_ps(); N];
            for (group, tile) in rows.chunks_exact(shape.tile_bytes()).enumerate() {
                let mut sums = [_mm256_setzero_ps(); N];
                let codes = &tile[shape.tile_codes()..];
                for (offset, codes) in codes.chunks_exact(BLOCK_TILE).enumerate() {
                    let block = group * shape.blocks_per_group + offset;
                    let values: [*const i8; N] = std::array::from_fn(|input| {
                        inputs[input].values[block * BLOCK..(block + 1) * BLOCK].as_ptr()
                    });
                    let mut pairs = [_mm256_setzero_si256(); N];
                    for word in 0..BLOCK / 2 / WORD {
                        // A block's tile holds four 32-byte runs of code words.
                        let codes =
                            _mm256_loadu_si256(codes.as_ptr().add(word * GROUP_ROWS * WORD).cast());
                        let low = _mm256_and_si256(codes, low_nibbles);
                        let high = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low_nibbles);
                        for (values, pairs) in values.iter().zip(&mut pairs) {
                            // Each input's 32 values of the block were sliced above.
                            let (low_values, high_values) = {
                                (
                                    values.add(word * WORD).cast::<i32>().read_unaligned(),
                                    values
                                        .add(BLOCK / 2 + word * WORD)
                                        .cast::<i32>()
                                        .read_unaligned(),
                                )
                            };
                            let (low_values, high_values) = (
                                _mm256_set1_epi32(low_values),
                                _mm256_set1_epi32(high_values),
                            );
                            *pairs = if VNNI {
                                let low = _mm256_dpbusd_epi32(*pairs, low, low_values);
                                _mm256_dpbusd_epi32(low, high, high_values)
                            } else {
                                let low =
                                    _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(low, low_values));
                                _mm256_add_epi16(low, _mm256_maddubs_epi16(high, high_values))
                            };
                        }
                    }
                    for ((inputs, pairs), sums) in inputs.iter().zip(pairs).zip(&mut sums) {
                        let products = if VNNI {
                            pairs
                        } else {
                            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
                        };
                        *sums = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(products),
                            _mm256_set1_ps(inputs.scales[block]),
                            *sums,
                        );
                    }
                }
                // A tile starts with the eight rows' half-precision scales, then (with minima)
                // their minima.
                let scales = _mm256_cvtph_ps(_mm_loadu_si128(tile.as_ptr().cast()));
                let minima = if shape.minima {
                    let halves = _mm_loadu_si128(tile.as_ptr().add(HALVES).cast());
                    Some(_mm256_cvtph_ps(halves))
                } else {
                    None
                };
                let first = group * shape.blocks_per_group;
                for ((inputs, sums), total) in inputs.iter().zip(sums).zip(&mut totals) {
                    let zero = match inputs.zeros {
                        Zeros::All(zero) => zero,
                        Zeros::Shared(zeros) => f32::from(zeros[group]),
                    };
                    let input_sum: f32 = inputs.sums[first..first + shape.blocks_per_group]
                        .iter()
                        .sum();
                    let input_sum = inputs.sum_factor * input_sum;
                    *total = _mm256_fmadd_ps(
                        scales,
                        _mm256_sub_ps(sums, _mm256_set1_ps(zero * input_sum)),
                        *total,
                    );
                    if let Some(minima) = minima {
                        *total = _mm256_fmadd_ps(minima, _mm256_set1_ps(input_sum), *total);
                    }
                }
            }
            if stride == 1 {
                // With one input `out` holds the eight rows' sums side by side.
                return _mm256_storeu_ps(out.as_mut_ptr(), totals[0]);
            }
            for (input, total) in totals.into_iter().enumerate() {
                let mut sums = [0.0; GROUP_ROWS];
                _mm256_storeu_ps(sums.as_mut_ptr(), total);
                for (row, sum) in sums.into_iter().enumerate() {
                    out[row * stride + input] = sum;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kernel families give every input the bits it has alone, with or without minima
    /// and with one to nine inputs at once.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_families_give_each_input_its_own_bits() {
        use rand::{RngExt, SeedableRng};
        use rand_chacha::ChaCha8Rng;

        use crate::cpu::KernelFamily;
        use crate::int8_inputs::BLOCK;
        use crate::test_support::assert_each_input_keeps_its_bits;
        let family = KernelFamily::detected();
        if family < KernelFamily::Avx2 {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let rows = 16;
        for minima in [false, true] {
            let shape = Shape {
                blocks: 6,
                blocks_per_group: 2,
                minima,
            };
            let codes: Vec<u8> = (0..rows * shape.blocks * BLOCK_CODES)
                .map(|_| rng.random())
                .collect();
            let halves: Vec<[u16; 2]> = (0..rows * shape.groups())
                .map(|_| {
                    let half = |rng: &mut ChaCha8Rng| crate::f16::f32_to_f16(rng.random::<f32>());
                    [half(&mut rng), half(&mut rng)]
                })
                .collect();
            let bytes = shape.interleave(
                rows,
                |row, group| halves[row * shape.groups() + group],
                |row, block| &codes[(row * shape.blocks + block) * BLOCK_CODES..],
            );
            let blocks = shape.blocks;
            let values: Vec<Vec<i8>> = (0..9)
                .map(|_| (0..blocks * BLOCK).map(|_| rng.random()).collect())
                .collect();
            let scales: Vec<Vec<f32>> = (0..9)
                .map(|_| (0..blocks).map(|_| rng.random::<f32>()).collect())
                .collect();
            let sums: Vec<Vec<f32>> = (0..9)
                .map(|_| (0..blocks).map(|_| rng.random::<f32>() - 0.5).collect())
                .collect();
            let inputs: Vec<KernelInputs> = (0..9)
                .map(|input| KernelInputs {
                    values: &values[input],
                    scales: &scales[input],
                    sums: &sums[input],
                    sum_factor: 1.0,
                    zeros: Zeros::All(if minima { 0.0 } else { 8.0 }),
                })
                .collect();
            let mut kernels: Vec<InterleavedDot> = vec![x86::dot::<false>];
            if family >= KernelFamily::Avx512Vnni {
                kernels.push(x86::dot::<true>);
            }
            let run = |kernel: &InterleavedDot, inputs: &[KernelInputs], out: &mut [f32]| {
                kernel(&bytes, shape, inputs, out)
            };
            let what = format!("minima {minima}");
            assert_each_input_keeps_its_bits(&kernels, &inputs, rows, run, &what);
        }
    }

    #[test]
    fn every_byte_has_one_place_and_rows_read_back() {
        for minima in [false, true] {
            let (rows, shape) = (
                16,
                Shape {
                    blocks: 6,
                    blocks_per_group: 2,
                    minima,
                },
            );
            let codes: Vec<u8> = (0..rows * shape.blocks * BLOCK_CODES)
                .map(|index| (index * 7 % 251) as u8)
                .collect();
            let halves = |row: usize, group: usize| {
                let scale = (1000 * row + group) as u16;
                [scale, if minima { scale + 500 } else { 0 }]
            };
            let block_codes =
                |row: usize, block: usize| &codes[(row * shape.blocks + block) * BLOCK_CODES..];
            let interleaved = shape.interleave(rows, halves, block_codes);
            let halves_a_row = 1 + usize::from(minima);
            assert_eq!(
                interleaved.len(),
                rows * (shape.groups() * 2 * halves_a_row + shape.blocks * BLOCK_CODES)
            );
            let mut seen = vec![false; interleaved.len()];
            for row in 0..rows {
                for group in 0..shape.groups() {
                    assert_eq!(shape.halves(&interleaved, row, group), halves(row, group));
                    for which in 0..halves_a_row {
                        let at = shape.half_offset(row, group, which);
                        seen[at..at + 2].fill(true);
                    }
                }
                for block in 0..shape.blocks {
                    assert_eq!(
                        shape.codes(&interleaved, row, block),
                        block_codes(row, block)[..BLOCK_CODES]
                    );
                    for byte in 0..BLOCK_CODES {
                        seen[shape.code_offset(row, block, byte)] = true;
                    }
                }
            }
            assert!(seen.into_iter().all(|seen| seen));
            let (mut row_codes, mut row_scales) = (Vec::new(), Vec::new());
            for row in 0..rows {
                shape.row_codes(&interleaved, row, &mut row_codes);
                assert_eq!(
                    row_codes,
                    codes[row * shape.blocks * BLOCK_CODES..][..shape.blocks * BLOCK_CODES]
                );
                shape.row_scales(&interleaved, row, &mut row_scales);
                let scales: Vec<u16> = (0..shape.groups())
                    .map(|group| halves(row, group)[0])
                    .collect();
                assert_eq!(row_scales, scales);
            }
            // Row 9 (the second group's second row), block 3 (the second of weight group 1):
            // its group's tile starts after group 0's three tiles of 16 (or 32, with minima)
            // + 2 * 128 bytes; the scale is the tile's second; its codes follow the scales
            // (and minima) and block 2's 128 bytes, its first word after row 8's.
            let halves_bytes = 16 * halves_a_row;
            let tile = 4 * (halves_bytes + 256);
            assert_eq!(interleaved[tile + 2..tile + 4], 9001u16.to_le_bytes());
            if minima {
                assert_eq!(interleaved[tile + 18..tile + 20], 9501u16.to_le_bytes());
            }
            let first_word = tile + halves_bytes + 128 + 4;
            assert_eq!(
                interleaved[first_word..first_word + 4],
                block_codes(9, 3)[..4]
            );
            assert_eq!(
                interleaved[first_word + 32..first_word + 36],
                block_codes(9, 3)[4..8]
            );
        }
    }
}
