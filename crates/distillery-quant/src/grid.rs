//! Uniform quantization grids: `bits`-bit codes `q` in `0..=2^bits - 1` standing for
//! `scale * (q - zero)`, with one grid per output channel and group of input columns.
//!
//! Scales are always half-precision numbers, because GPTQ files store them as f16: the model
//! that is evaluated right after quantization is then exactly the one that is saved.

use crate::f16::round_to_f16;

/// The smallest positive half-precision number: a scale never rounds to zero.
const SMALLEST_F16: f32 = 5.960_464_5e-8;

/// Ranges [`Grid::fit_clipped`] tries, in 1% steps (the reference's `grid = 100`,
/// `maxshrink = 0.8`).
const CLIP_STEPS: usize = 80;

/// The error norm [`Grid::fit_clipped`] minimizes (the reference's `norm = 2.4`).
const CLIP_ERROR_NORM: f32 = 2.4;

/// The grid of one output channel over one group of input columns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub scale: f32,
    /// The code that stands for 0.
    pub zero: u32,
    /// The largest code, `2^bits - 1`.
    pub max_code: u32,
}

impl Grid {
    /// The grid that covers `values` with `bits`-bit codes. It always contains 0, so zero weights
    /// stay exactly zero. Symmetric grids centre 0 at code `2^(bits-1)` and cover
    /// `[-absmax, absmax]`; asymmetric ones cover `[min(values, 0), max(values, 0)]` with the
    /// zero at code 1 or above, because GPTQ's v1 files store `zero - 1` and cannot hold -1.
    pub fn fit(values: impl IntoIterator<Item = f32>, bits: u32, symmetric: bool) -> Self {
        let (low, high) = range(values);
        Self::spanning(low, high, bits, symmetric)
    }

    /// The grid among [`Grid::fit`]'s range shrunk by 0%, 1%, ... 79% (clipping the largest
    /// values) that rounds `values` with the least `Σ |error|^2.4`: the `mse` search of the
    /// reference GPTQ code, which trades a few clipped outliers for finer steps everywhere else.
    pub fn fit_clipped(values: &[f32], bits: u32, symmetric: bool) -> Self {
        let (low, high) = range(values.iter().copied());
        let mut best = Self::spanning(low, high, bits, symmetric);
        let mut best_error = best.rounding_error(values);
        for step in 1..CLIP_STEPS {
            let shrink = 1.0 - step as f32 / 100.0;
            let candidate = Self::spanning(low * shrink, high * shrink, bits, symmetric);
            let error = candidate.rounding_error(values);
            if error < best_error {
                best = candidate;
                best_error = error;
            }
        }
        best
    }

    fn rounding_error(&self, values: &[f32]) -> f32 {
        values
            .iter()
            .map(|&value| (self.round(value) - value).abs().powf(CLIP_ERROR_NORM))
            .sum()
    }

    fn spanning(low: f32, high: f32, bits: u32, symmetric: bool) -> Self {
        let max_code = (1u32 << bits) - 1;
        let (mut low, mut high) = (low, high);
        if symmetric {
            high = high.max(-low);
            low = -high;
        }
        if low == 0.0 && high == 0.0 {
            low = -1.0;
            high = 1.0;
        }
        if symmetric {
            return Self {
                scale: half_scale((high - low) / max_code as f32),
                zero: max_code.div_ceil(2),
                max_code,
            };
        }
        let scale = half_scale((high - low) / max_code as f32);
        let zero = (-low / scale).round().min(max_code as f32) as u32;
        if zero >= 1 {
            return Self {
                scale,
                zero,
                max_code,
            };
        }
        Self {
            scale: half_scale(high / (max_code - 1) as f32),
            zero: 1,
            max_code,
        }
    }

    /// Symmetric absmax int8 as an 8-bit grid: `value ≈ scale * (code - 128)` with
    /// `scale = absmax / 127`, so codes stay in `1..=255` and stand for -127..=127.
    pub fn absmax_int8(values: impl IntoIterator<Item = f32>) -> Self {
        let absmax = values
            .into_iter()
            .fold(0.0f32, |max, value| max.max(value.abs()));
        let scale = if absmax == 0.0 { 1.0 } else { absmax / 127.0 };
        Self {
            scale: half_scale(scale),
            zero: 128,
            max_code: 255,
        }
    }

    /// The code nearest to `value`, clamped to the grid.
    pub fn encode(&self, value: f32) -> u32 {
        let code = (value / self.scale).round() + self.zero as f32;
        code.clamp(0.0, self.max_code as f32) as u32
    }

    pub fn decode(&self, code: u32) -> f32 {
        self.scale * (code as f32 - self.zero as f32)
    }

    /// `value` moved to the nearest point of the grid.
    pub fn round(&self, value: f32) -> f32 {
        self.decode(self.encode(value))
    }
}

/// `(min(values, 0), max(values, 0))`.
fn range(values: impl IntoIterator<Item = f32>) -> (f32, f32) {
    values
        .into_iter()
        .fold((0.0f32, 0.0f32), |(low, high), value| {
            (low.min(value), high.max(value))
        })
}

fn half_scale(scale: f32) -> f32 {
    round_to_f16(scale).max(SMALLEST_F16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::f16::f32_to_f16;

    #[test]
    fn asymmetric_grid_spans_min_to_max_and_keeps_zero_exact() {
        let grid = Grid::fit([-1.0, 0.5, 2.0], 2, false);
        assert_eq!(grid.max_code, 3);
        assert!((grid.scale - 1.0).abs() < 1e-7);
        assert_eq!(grid.zero, 1);
        assert_eq!(grid.round(0.0), 0.0);
        assert_eq!(grid.round(2.0), 2.0);
        assert_eq!(grid.round(-1.0), -1.0);
        assert_eq!(grid.round(0.4), 0.0);
        assert_eq!(grid.round(7.0), 2.0, "values beyond the range clamp");
    }

    #[test]
    fn nonnegative_groups_keep_the_zero_at_code_one() {
        let grid = Grid::fit([0.0, 1.0, 3.0], 2, false);
        assert_eq!(grid.zero, 1);
        assert!((grid.scale - 1.5).abs() < 1e-7);
        assert_eq!(grid.round(3.0), 3.0);
        assert_eq!(grid.round(0.0), 0.0);
    }

    #[test]
    fn symmetric_grid_centres_zero() {
        let grid = Grid::fit([-0.5, 1.5], 4, true);
        assert_eq!(grid.zero, 8);
        assert!((grid.scale - 3.0 / 15.0).abs() < 1e-4);
        assert_eq!(grid.round(0.0), 0.0);
    }

    #[test]
    fn scales_are_half_precision_numbers() {
        for bits in [2, 3, 4, 8] {
            let grid = Grid::fit([-0.123_456, 0.654_321], bits, false);
            assert_eq!(round_to_f16(grid.scale), grid.scale);
            assert_ne!(f32_to_f16(grid.scale), 0);
        }
        let tiny = Grid::fit([1e-12, -1e-12], 8, true);
        assert!(tiny.scale > 0.0);
    }

    #[test]
    fn rounding_error_is_at_most_half_a_step_inside_the_range() {
        for bits in [2, 3, 4, 8] {
            let values: Vec<f32> = (0..200)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let grid = Grid::fit(values.iter().copied(), bits, false);
            for &value in &values {
                let error = (grid.round(value) - value).abs();
                // The f16 scale may shrink the range by one part in 2^11.
                let bound = grid.scale / 2.0 + value.abs() * 1e-3;
                assert!(error <= bound, "{bits} bits: {value} -> {error}");
            }
        }
    }

    #[test]
    fn clipping_search_never_rounds_worse_and_clips_outliers() {
        // Values in ±0.5 and one outlier: a full-range 3-bit grid spends its steps on it.
        let mut values: Vec<f32> = (0..127)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
            .collect();
        values.push(1.0);
        for symmetric in [true, false] {
            for bits in [2, 3, 4] {
                let plain = Grid::fit(values.iter().copied(), bits, symmetric);
                let clipped = Grid::fit_clipped(&values, bits, symmetric);
                assert!(clipped.rounding_error(&values) <= plain.rounding_error(&values));
                assert_eq!(clipped.round(0.0), 0.0);
            }
            let plain = Grid::fit(values.iter().copied(), 3, symmetric);
            let clipped = Grid::fit_clipped(&values, 3, symmetric);
            assert!(clipped.scale < plain.scale, "the range shrank");
            assert!(clipped.rounding_error(&values) < plain.rounding_error(&values));
        }
        // Evenly spread values leave nothing to clip.
        let even: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
        assert_eq!(
            Grid::fit_clipped(&even, 4, false),
            Grid::fit(even.iter().copied(), 4, false)
        );
    }

    #[test]
    fn all_zero_groups_get_a_usable_grid() {
        let grid = Grid::fit([0.0, 0.0], 4, false);
        assert!(grid.scale > 0.0);
        assert_eq!(grid.round(0.0), 0.0);
    }

    #[test]
    fn int8_round_trip_is_within_half_a_step() {
        let values = [0.3, -1.27, 0.0, 0.9999, -0.02];
        let grid = Grid::absmax_int8(values);
        assert!((grid.scale - 0.01).abs() < 1e-5);
        assert_eq!(grid.encode(-1.27), 1, "-127 sits at code 1");
        assert_eq!(grid.encode(0.0), 128);
        for value in values {
            assert!((grid.round(value) - value).abs() <= grid.scale / 2.0 + 1e-5);
        }
    }
}
