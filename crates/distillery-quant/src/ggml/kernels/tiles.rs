//! Q8_0 products with several inputs on Intel AMX: one tile product multiplies 16 channels'
//! codes of a block (a tile loaded straight from the stored rows, a row's stride apart) with
//! up to eight inputs' values of that block, 4,096 multiply-adds in one instruction where the
//! VNNI kernel needs 128. With the integer sums that cheap, a batch's or a speculative check's
//! product costs about what one input's does: reading the weights.
//!
//! Each channel's float operations are [`q8_0_rows_across`](super::x86)'s, in its order, on the
//! same exact integer block sums, so every input keeps the bits it has alone.

use std::arch::asm;
use std::arch::x86_64::*;

use super::x86::{
    GROUP, after_group_block, after_rest_block, halves_of, lanes_total, leading_words,
};
use super::{InputLanes, LANES, PIECE, RoundedInputs};
use crate::ggml::GgmlType;

/// Channels a tile product covers: a tile's most rows.
const CHANNELS: usize = 16;

/// Bytes of a Q8_0 block: a half-precision scale, then 32 signed codes.
const BLOCK_BYTES: usize = 34;

/// Bytes of a tile row of inputs or of sums: eight 32-bit lanes.
const LANE_BYTES: usize = LANES * 4;

/// Inputs from which a Q8_0 product runs on tiles. Up to four, the VNNI kernel that meets
/// them in pairs of lanes was as fast (`step_products`: 8.7-9.1 ms against 9.4 at four).
const TILES_FROM: usize = 5;

/// Whether a product with `count` inputs runs on tiles.
pub(super) const fn on_tiles(q8_0: bool, count: usize) -> bool {
    q8_0 && count >= TILES_FROM
}

/// The tiles' shapes, as `ldtilecfg` reads them: tile 0 the integer sums (16 channels by eight
/// inputs), tile 1 a block's codes (16 channels by 32 columns), tile 2 a block's inputs (eight
/// rows of four columns by eight inputs). Two blocks at once in two sets of tiles, so that one's
/// product runs while the other's sums are stored, stayed within the machine's spread
/// (`step_products`, eight inputs: 12.4-13.3 ms against 12.6-13.6 one block at a time).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const SHAPES: TileConfig = {
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
    };
    config.rows[0] = CHANNELS as u8;
    config.bytes_per_row[0] = LANE_BYTES as u16;
    config.rows[1] = CHANNELS as u8;
    config.bytes_per_row[1] = PIECE as u16;
    config.rows[2] = (PIECE / 4) as u8;
    config.bytes_per_row[2] = LANE_BYTES as u16;
    config
};

/// The [`BlocksDot`](super::BlocksDot) of Q8_0 rows on CPUs of the AMX family: tiles from
/// [`TILES_FROM`] inputs on, the VNNI kernel below.
pub(super) fn q8_0_products(
    rows: &[u8],
    row_bytes: usize,
    rounded: &RoundedInputs,
    out: &mut [f32],
) {
    let count = rounded.rows().len();
    if count < TILES_FROM {
        let vnni = super::x86::blocks_dot::<true>(GgmlType::Q8_0).expect("a Q8_0 kernel");
        return vnni(rows, row_bytes, rounded, out);
    }
    let blocks = row_bytes / BLOCK_BYTES;
    let channels = out.len() / count;
    let sets = rounded.tile_lanes();
    assert!(
        row_bytes == blocks * BLOCK_BYTES
            && rows.len() == channels * row_bytes
            && out.len() == channels * count
            && sets.iter().all(|lanes| {
                lanes.values.len() >= blocks * PIECE * LANES && lanes.scales.len() >= blocks * LANES
            })
    );
    let mut sums = vec![0i32; blocks * CHANNELS * LANES];
    let mut padded = Vec::new();
    // SAFETY: `q8_0_products` is handed out only to CPUs of the AMX family, which have AVX2,
    // FMA, F16C, AVX-512 VNNI and VL, and tiles this process may use.
    unsafe { configure_tiles() };
    for (set, lanes) in sets.iter().enumerate() {
        let first_input = set * LANES;
        let inputs = LANES.min(count - first_input);
        for first in (0..channels).step_by(CHANNELS) {
            let chunk = CHANNELS.min(channels - first);
            let codes = &rows[first * row_bytes..(first + chunk) * row_bytes];
            // A last chunk of fewer than 16 channels is read from a copy padded with zero rows,
            // so no tile load reads past the matrix.
            let codes = if chunk == CHANNELS {
                codes
            } else {
                padded.clear();
                padded.extend_from_slice(codes);
                padded.resize(CHANNELS * row_bytes, 0);
                &padded
            };
            let next = &rows[(first + chunk) * row_bytes..];
            // SAFETY: as above; `codes` holds 16 rows of `blocks` blocks, `lanes` every
            // block's inputs and scales, and `sums` 16 x 8 sums a block (checked above).
            unsafe { block_sums(codes, row_bytes, blocks, lanes, &mut sums, next) };
            for channel in 0..chunk {
                let row = &codes[channel * row_bytes..][..row_bytes];
                // SAFETY: as above.
                let values = unsafe { channel_products(row, blocks, &sums, channel, lanes) };
                let out = &mut out[(first + channel) * count + first_input..][..inputs];
                out.copy_from_slice(&values[..inputs]);
            }
        }
    }
    // SAFETY: the tiles were configured above; releasing them spares the kernel saving them.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Sets the tiles' shapes on this thread.
///
/// # Safety
/// The CPU must have AMX tiles and the process the permission to use them.
unsafe fn configure_tiles() {
    // SAFETY: the caller vouches for AMX; `SHAPES` is a valid palette-1 configuration.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &SHAPES, options(nostack, readonly)) };
}

/// The integer sums of 16 channels' blocks with up to eight inputs: `sums[(block · 16 +
/// channel) · 8 + input]`. The next 16 channels' bytes (the start of `next`) are asked for
/// meanwhile, spread over the blocks.
///
/// # Safety
/// The tiles must be configured ([`configure_tiles`]); `codes` must hold 16 rows of `blocks`
/// Q8_0 blocks, `row_bytes` apart, `lanes` each block's tile inputs and `sums` 16 x 8 sums a
/// block.
#[target_feature(enable = "avx2")]
unsafe fn block_sums(
    codes: &[u8],
    row_bytes: usize,
    blocks: usize,
    lanes: &InputLanes,
    sums: &mut [i32],
    next: &[u8],
) {
    let ahead = next.len().min(CHANNELS * row_bytes);
    let lines_per_block = ahead.div_ceil(64).div_ceil(blocks.max(1));
    for block in 0..blocks {
        for line in block * lines_per_block..(block + 1) * lines_per_block {
            if line * 64 < ahead {
                // SAFETY: inside `next`; a prefetch cannot fault.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(line * 64).cast()) };
            }
        }
        // SAFETY: the caller's guarantees: the codes tile reads 16 rows of 32 bytes from the
        // block's codes (after its 2-byte scale), the inputs tile 8 rows of 32 bytes, the
        // store 16 rows of 32 bytes of `sums`.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{codes} + {row_bytes}*1]",
                "tileloadd tmm2, [{inputs} + {lane_bytes}*1]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tilestored [{sums} + {lane_bytes}*1], tmm0",
                codes = in(reg) codes.as_ptr().add(block * BLOCK_BYTES + 2),
                row_bytes = in(reg) row_bytes,
                inputs = in(reg) lanes.values.as_ptr().add(block * PIECE * LANES),
                lane_bytes = in(reg) LANE_BYTES,
                sums = in(reg) sums.as_mut_ptr().add(block * CHANNELS * LANES),
                options(nostack),
            );
        }
    }
}

/// One channel's products with the set's inputs, lane by lane, from its blocks' integer sums:
/// [`q8_0_rows_across`](super::x86)'s float operations in its order.
///
/// # Safety
/// As [`block_sums`]'s: `row` one of its channels' rows, `sums` its output.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn channel_products(
    row: &[u8],
    blocks: usize,
    sums: &[i32],
    channel: usize,
    lanes: &InputLanes,
) -> [f32; LANES] {
    // SAFETY: the caller's guarantees cover every block's sums and input scales.
    let block_products = |block: usize| unsafe {
        _mm256_cvtepi32_ps(_mm256_loadu_si256(
            sums.as_ptr()
                .add((block * CHANNELS + channel) * LANES)
                .cast(),
        ))
    };
    let mut totals = [_mm256_setzero_ps(); GROUP];
    let groups = blocks / GROUP;
    for group in 0..groups {
        let first = group * GROUP;
        let scales = halves_of(
            leading_words(&row[first * BLOCK_BYTES..], BLOCK_BYTES),
            false,
        );
        for (block, total) in totals.iter_mut().enumerate() {
            let products = block_products(first + block);
            *total = after_group_block(*total, scales, block, products, lanes, first + block);
        }
    }
    let mut rests = _mm256_setzero_ps();
    for block in groups * GROUP..blocks {
        let bytes = &row[block * BLOCK_BYTES..][..BLOCK_BYTES];
        rests = after_rest_block(rests, bytes, block_products(block), lanes, block);
    }
    lanes_total(totals, rests)
}
