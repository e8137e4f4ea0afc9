//! What every quantized layout's products share: spreading output channels over threads,
//! turning channel-major results around, and multiplying many input rows with a tile of
//! channels decoded to floats.

use std::ops::Range;

use multiversion::multiversion;

use crate::interleaved::GROUP_ROWS;

/// Inputs below this many multiply-adds run on one thread: spawning costs more.
pub(crate) const PARALLEL_WORK: usize = 1 << 16;

/// About the output channels one parallel task computes: enough work to outweigh handing it
/// out.
const CHANNELS_PER_TASK: usize = 128;

/// The most output channels [`in_tiles`] decodes at a time: 256 channels of 1,024 inputs are
/// 1 MiB of floats, which stay in a core's L2 cache while every input row meets them.
pub(crate) const TILE_CHANNELS: usize = 256;

/// `rows x count` values from `channel_outputs(rows, outputs of those channels)`, runs of
/// rows spread over threads when `work` multiply-adds are enough to pay for it. The runs are
/// equal (whole groups of [interleaved](crate::interleaved) rows) and as many as a multiple of
/// the threads, so that no thread is left with a last run while the others wait (576 channels
/// in runs of 128 kept one of two threads busy a third longer than the other).
pub(crate) fn channel_major(
    rows: usize,
    work: usize,
    count: usize,
    channel_outputs: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut by_channel = vec![0.0f32; rows * count];
    let tasks = if work < PARALLEL_WORK {
        1
    } else {
        (rows / CHANNELS_PER_TASK)
            .max(1)
            .next_multiple_of(rayon::current_num_threads())
    };
    let task_channels = rows.div_ceil(tasks).next_multiple_of(GROUP_ROWS);
    distillery_workers::for_each_chunk_mut(&mut by_channel, count * task_channels, |task, outs| {
        let first = task * task_channels;
        channel_outputs(first..first + outs.len() / count, outs);
    });
    by_channel
}

/// Several matrices applied to the same `count` inputs in one parallel region, a task's
/// channels running from one matrix into the next: `channels(matrix, rows, outs)` writes the
/// outputs of channels `rows` of matrix `matrix` (`(rows, cols)` in `shapes`) to `outs`,
/// `outs[channel * count + input]`. Each matrix's outputs, `count x rows`.
pub(crate) fn together(
    shapes: &[(usize, usize)],
    count: usize,
    channels: impl Fn(usize, Range<usize>, &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let mut starts = vec![0];
    for &(rows, _) in shapes {
        starts.push(starts.last().copied().unwrap_or(0) + rows);
    }
    let rows = starts[shapes.len()];
    let work = shapes
        .iter()
        .map(|&(rows, cols)| rows * cols)
        .sum::<usize>()
        * count;
    let by_channel = channel_major(rows, work, count, |range, outs| {
        let mut row = range.start;
        while row < range.end {
            let matrix = starts.partition_point(|&start| start <= row) - 1;
            let end = range.end.min(starts[matrix + 1]);
            channels(
                matrix,
                row - starts[matrix]..end - starts[matrix],
                &mut outs[(row - range.start) * count..(end - range.start) * count],
            );
            row = end;
        }
    });
    shapes
        .iter()
        .zip(starts.windows(2))
        .map(|(&(rows, _), range)| {
            transposed(&by_channel[range[0] * count..range[1] * count], rows, count)
        })
        .collect()
}

/// `rows x count` values as `count x rows`: sixteen inputs at a time (a cache line of each
/// channel's values) over every channel, so `by_channel` is read about once and the writes
/// are at most sixteen sequential streams, however many channels and inputs there are.
pub(crate) fn transposed(by_channel: &[f32], rows: usize, count: usize) -> Vec<f32> {
    const INPUTS_AT_ONCE: usize = 16;
    let mut outputs = vec![0.0; count * rows];
    for first in (0..count).step_by(INPUTS_AT_ONCE) {
        let inputs = first..(first + INPUTS_AT_ONCE).min(count);
        for (row, values) in by_channel[..rows * count].chunks_exact(count).enumerate() {
            let column = outputs[first * rows + row..].iter_mut().step_by(rows);
            for (output, &value) in column.zip(&values[inputs.clone()]) {
                *output = value;
            }
        }
    }
    outputs
}

/// `x Wᵀ` for `count` input rows `x` (`count x cols`) and a `rows x cols` matrix `W` whose
/// channels `decode_row(channel, out)` writes as floats: each task decodes a tile of channels
/// and multiplies every input row with it while the tile is in cache, so the float matrix
/// never exists whole and each decoded weight serves all rows. The tiles are sized for a
/// multiple of the threads (then rounded up to whole 16-channel blocks), so few wait on
/// another's last tile, and each writes its columns of the `count x rows` result in place.
pub(crate) fn in_tiles(
    rows: usize,
    cols: usize,
    x: &[f32],
    count: usize,
    decode_row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert!(x.len() >= count * cols);
    let mut out = vec![0.0f32; count * rows];
    let threads = rayon::current_num_threads();
    let tiles = rows.div_ceil(TILE_CHANNELS).next_multiple_of(threads);
    let tile_channels = rows.div_ceil(tiles).next_multiple_of(16);
    let destination = SharedOutput(out.as_mut_ptr());
    distillery_workers::for_each_task(rows.div_ceil(tile_channels), |index| {
        let first = index * tile_channels;
        let channels = tile_channels.min(rows - first);
        let mut tile = vec![0.0; channels * cols];
        for (offset, weights) in tile.chunks_exact_mut(cols).enumerate() {
            decode_row(first + offset, weights);
        }
        // SAFETY: the task writes only columns `first..first + channels` of the
        // `count x rows` result, which no other task writes; `tile` is
        // `channels x cols` and `x` holds `count` rows of `cols`. gemm reads the tile in
        // place, as broadcast operands, and packs only `x`.
        unsafe {
            gemm::gemm(
                count,
                channels,
                cols,
                destination.at(first),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                tile.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    out
}

/// The result buffer tasks of [`in_tiles`] write disjoint columns of.
struct SharedOutput(*mut f32);

// SAFETY: every task writes its own columns only, and the buffer outlives the tasks.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// The dot product of two equally long slices.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler keep a vector register of them.
    let mut sums = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::transposed;

    /// Every value lands at its place, with fewer inputs than a set of sixteen, exactly one
    /// set, and sets and a partial one.
    #[test]
    fn transposing_puts_each_value_at_its_input_and_channel() {
        for (rows, count) in [(3, 1), (37, 5), (37, 16), (5, 17), (37, 40)] {
            let by_channel: Vec<f32> = (0..rows * count).map(|value| value as f32).collect();
            let outputs = transposed(&by_channel, rows, count);
            for input in 0..count {
                for row in 0..rows {
                    assert_eq!(outputs[input * rows + row], (row * count + input) as f32);
                }
            }
        }
    }
}
