//! Uniform quantization grids: `bits`-bit codes `q` in `0..=2^bits - 1` standing for
//! `scale * (q - zero)`, with one grid per output channel and group of input columns.

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
    /// `[-absmax, absmax]`; asymmetric ones cover `[min(values, 0), max(values, 0)]`.
    pub fn fit(values: impl IntoIterator<Item = f32>, bits: u32, symmetric: bool) -> Self {
        let max_code = (1u32 << bits) - 1;
        let (mut low, mut high) = values
            .into_iter()
            .fold((0.0f32, 0.0f32), |(low, high), value| {
                (low.min(value), high.max(value))
            });
        if symmetric {
            high = high.max(-low);
            low = -high;
        }
        if low == 0.0 && high == 0.0 {
            low = -1.0;
            high = 1.0;
        }
        let scale = (high - low) / max_code as f32;
        let zero = if symmetric {
            max_code.div_ceil(2)
        } else {
            (-low / scale).round() as u32
        };
        Self {
            scale,
            zero,
            max_code,
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

/// Symmetric int8 of one output channel: `value ≈ scale * code`, codes in `-127..=127`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Channel {
    pub scale: f32,
    pub codes: Vec<i8>,
}

/// Absmax int8 quantization of one channel (or one group of it).
pub fn int8_absmax(values: &[f32]) -> Int8Channel {
    let absmax = values
        .iter()
        .fold(0.0f32, |max, value| max.max(value.abs()));
    let scale = if absmax == 0.0 { 1.0 } else { absmax / 127.0 };
    let codes = values
        .iter()
        .map(|value| (value / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    Int8Channel { scale, codes }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn symmetric_grid_centres_zero() {
        let grid = Grid::fit([-0.5, 1.5], 4, true);
        assert_eq!(grid.zero, 8);
        assert!((grid.scale - 3.0 / 15.0).abs() < 1e-7);
        assert_eq!(grid.round(0.0), 0.0);
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
                assert!(
                    error <= grid.scale / 2.0 + 1e-6,
                    "{bits} bits: {value} -> {error}"
                );
            }
        }
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
        let channel = int8_absmax(&values);
        assert!((channel.scale - 0.01).abs() < 1e-7);
        assert_eq!(channel.codes[1], -127);
        for (value, code) in values.iter().zip(&channel.codes) {
            assert!((*code as f32 * channel.scale - value).abs() <= channel.scale / 2.0 + 1e-7);
        }
    }
}
