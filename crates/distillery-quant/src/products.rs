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

/// `count x rows` values of a `(rows, cols)` matrix applied to `count` inputs, from
/// `channel_outputs(channels, outs)`, which writes the outputs of `channels` channel by channel
/// (`outs[channel * count + input]`): [`together`] for one matrix.
pub(crate) fn input_major(
    shape: (usize, usize),
    count: usize,
    channel_outputs: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut outputs = together(&[shape], count, |_, channels, outs| {
        channel_outputs(channels, outs)
    });
    outputs.pop().expect("one matrix's outputs")
}

/// Runs of `rows` channels spread over threads when `work` multiply-adds are enough to pay
/// for it, `run(channels)` for each. The runs are equal (whole groups of
/// [interleaved](crate::interleaved) rows) and as many as a multiple of the threads, so that
/// no thread is left with a last run while the others wait (576 channels in runs of 128 kept
/// one of two threads busy a third longer than the other).
fn for_each_run(rows: usize, work: usize, run: impl Fn(Range<usize>) + Sync) {
    let tasks = if work < PARALLEL_WORK {
        1
    } else {
        (rows / CHANNELS_PER_TASK)
            .max(1)
            .next_multiple_of(rayon::current_num_threads())
    };
    let task_channels = rows.div_ceil(tasks).next_multiple_of(GROUP_ROWS);
    distillery_workers::for_each_task(rows.div_ceil(task_channels.max(1)), |task| {
        let first = task * task_channels;
        run(first..rows.min(first + task_channels));
    });
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
    let mut outputs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(rows, _)| vec![0.0f32; count * rows])
        .collect();
    let destinations: Vec<SharedOutput> = outputs
        .iter_mut()
        .map(|output| SharedOutput(output.as_mut_ptr()))
        .collect();
    for_each_run(rows, work, |range| {
        let mut row = range.start;
        while row < range.end {
            let matrix = starts.partition_point(|&start| start <= row) - 1;
            let end = range.end.min(starts[matrix + 1]);
            let local = row - starts[matrix]..end - starts[matrix];
            // SAFETY: the runs are disjoint, so each task writes only its own columns of the
            // matrix's output, which outlives the tasks.
            unsafe {
                destinations[matrix].write_columns(local, shapes[matrix].0, count, |local, outs| {
                    channels(matrix, local, outs)
                })
            };
            row = end;
        }
    });
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

/// A `count x rows` result buffer parallel tasks write disjoint columns of.
struct SharedOutput(*mut f32);

// SAFETY: every task writes its own columns only, and the buffer outlives the tasks.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }

    /// Columns `channels` of the `count x rows` buffer from `channel_outputs(channels, outs)`,
    /// which writes them channel by channel (`outs[i * count + input]` for channel
    /// `channels.start + i`): with one input straight into the buffer, where the columns are
    /// one run, otherwise turned around from a run of the task's own while it is in cache.
    /// Turned around whole on one thread, a step's products left the other thread waiting (a
    /// head of 49,152 channels against eight inputs is 1.5 MB of results).
    ///
    /// # Safety
    /// The buffer holds `count x rows` values, `channels` lies below `rows`, and no other
    /// thread touches these columns meanwhile.
    unsafe fn write_columns(
        &self,
        channels: Range<usize>,
        rows: usize,
        count: usize,
        channel_outputs: impl FnOnce(Range<usize>, &mut [f32]),
    ) {
        assert!(channels.end <= rows);
        if count == 1 {
            // SAFETY: with one input the columns are the run `channels` of the buffer, which
            // the caller vouches for.
            let run =
                unsafe { std::slice::from_raw_parts_mut(self.at(channels.start), channels.len()) };
            return channel_outputs(channels, run);
        }
        let mut by_channel = vec![0.0f32; channels.len() * count];
        channel_outputs(channels.clone(), &mut by_channel);
        for input in 0..count {
            let values = by_channel[input..].iter().step_by(count);
            for (channel, &value) in channels.clone().zip(values) {
                // SAFETY: `input * rows + channel` lies inside the buffer (checked above and
                // vouched for by the caller), in a column no other thread touches.
                unsafe { *self.at(input * rows + channel) = value };
            }
        }
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
    use super::{PARALLEL_WORK, input_major, together};

    /// Channel `c`'s output for input `i` as the tests' channel functions write it.
    fn marked(matrix: usize, channel: usize, input: usize) -> f32 {
        (matrix * 1_000_000 + channel * 100 + input) as f32
    }

    /// Every value lands at its input and channel, on one thread and over runs on several,
    /// with one input and several, and channel counts that are no multiple of a run.
    #[test]
    fn each_output_lands_at_its_input_and_channel() {
        for (rows, count) in [(3, 1), (37, 5), (1000, 1), (1000, 8), (1237, 17)] {
            // One column keeps the work on one thread; PARALLEL_WORK columns spread it.
            for cols in [1, PARALLEL_WORK] {
                let out = input_major((rows, cols), count, |channels, outs| {
                    for (channel, outs) in channels.zip(outs.chunks_exact_mut(count)) {
                        for (input, out) in outs.iter_mut().enumerate() {
                            *out = marked(0, channel, input);
                        }
                    }
                });
                for input in 0..count {
                    for row in 0..rows {
                        assert_eq!(out[input * rows + row], marked(0, row, input));
                    }
                }
            }
        }
    }

    /// Matrices taken together each get their own outputs, runs crossing from one matrix
    /// into the next included.
    #[test]
    fn matrices_together_each_get_their_outputs() {
        let shapes = [(300, 64), (77, 64), (1000, 64)];
        for count in [1, 3, 8] {
            let outputs = together(&shapes, count, |matrix, channels, outs| {
                for (channel, outs) in channels.zip(outs.chunks_exact_mut(count)) {
                    for (input, out) in outs.iter_mut().enumerate() {
                        *out = marked(matrix, channel, input);
                    }
                }
            });
            for (matrix, (output, &(rows, _))) in outputs.iter().zip(&shapes).enumerate() {
                assert_eq!(output.len(), rows * count);
                for input in 0..count {
                    for row in 0..rows {
                        assert_eq!(output[input * rows + row], marked(matrix, row, input));
                    }
                }
            }
        }
    }
}
