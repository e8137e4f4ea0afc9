//! Rotary position embeddings in the rotate-half layout.
//!
//! Hugging Face Llama checkpoints rotate the pair `(x[i], x[i + d/2])`; burn's `RotaryEncoding`
//! and llama.cpp rotate adjacent pairs `(x[2i], x[2i + 1])`. distillery keeps Hugging Face's
//! layout inside the model, so its weights are Hugging Face's weights; the q/k row permutation to
//! the adjacent-pair layout happens only when a file in that layout is written or read.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use crate::config::RopeScaling;

/// Cosine and sine tables for every position up to the model's context length.
#[derive(Module, Debug)]
pub struct RotaryTables {
    /// `[positions, head_dim]`: each frequency's cosine, repeated for both halves.
    cos: Tensor<2>,
    /// `[positions, head_dim]`: each frequency's sine, negated on the first half, so that
    /// `rotate_half(x) * sin == swap_halves(x) * sin_signed`.
    sin_signed: Tensor<2>,
}

impl RotaryTables {
    pub fn new(
        max_positions: usize,
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: &Device,
    ) -> Self {
        let half = head_dim / 2;
        let frequencies: Vec<f64> = (0..half)
            .map(|i| {
                let frequency = theta.powf(-2.0 * i as f64 / head_dim as f64);
                scaling.map_or(frequency, |scaling| scaling.scale(i, frequency))
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin_signed = Vec::with_capacity(max_positions * head_dim);
        for position in 0..max_positions {
            let angles: Vec<f64> = frequencies
                .iter()
                .map(|frequency| position as f64 * frequency)
                .collect();
            for sign in [-1.0, 1.0] {
                cos.extend(angles.iter().map(|angle| angle.cos() as f32));
                sin_signed.extend(angles.iter().map(|angle| (sign * angle.sin()) as f32));
            }
        }
        let shape = [max_positions, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin_signed: Tensor::from_data(TensorData::new(sin_signed, shape), device),
        }
    }

    pub fn device(&self) -> Device {
        self.cos.device()
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose first token sits at position
    /// `start`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        distillery_kernels::rotary(x, self.cos.clone(), self.sin_signed.clone(), start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    #[test]
    fn position_zero_is_identity() {
        let tables = RotaryTables::new(8, 4, 10000.0, None, &device());
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &device(),
        );
        let rotated = tables.apply(x.clone(), 0);
        rotated
            .into_data()
            .assert_approx_eq::<f32>(&x.into_data(), Default::default());
    }

    #[test]
    fn rotates_first_and_second_half_as_pairs() {
        // head_dim 4: frequencies 1 and 1/100 with theta = 10000.
        let tables = RotaryTables::new(8, 4, 10000.0, None, &device());
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &device(),
        );
        let rotated: Vec<f32> = tables.apply(x, 3).into_data().try_into_vec().unwrap();
        let (a0, a1) = (3.0f64, 3.0f64 / 100.0);
        // Pairs are (x0, x2) at angle a0 and (x1, x3) at angle a1.
        let expected = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (got, want) in rotated.iter().zip(expected) {
            assert!(
                (*got as f64 - want).abs() < 1e-5,
                "{rotated:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn offset_matches_slice_of_full_sequence() {
        let tables = RotaryTables::new(16, 8, 500.0, None, &device());
        let values: Vec<f32> = (0..2 * 3 * 10 * 8)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(values, [2, 3, 10, 8]), &device());
        let full = tables.apply(x.clone(), 0).narrow(2, 6, 4);
        let tail = tables.apply(x.narrow(2, 6, 4), 6);
        full.into_data()
            .assert_approx_eq::<f32>(&tail.into_data(), Default::default());
    }

    /// Rotary pair `i`'s frequency: its angle at position 1.
    fn frequency(tables: &RotaryTables, i: usize) -> f64 {
        let row = |table: &Tensor<2>| -> Vec<f32> {
            table
                .clone()
                .narrow(0, 1, 1)
                .into_data()
                .try_to_vec()
                .unwrap()
        };
        let (cos, sin) = (row(&tables.cos), row(&tables.sin_signed));
        // The second half of the sine table holds the sines unsigned.
        f64::from(sin[cos.len() / 2 + i]).atan2(f64::from(cos[i]))
    }

    #[test]
    fn scaled_frequencies_follow_transformers() {
        let plain = RotaryTables::new(4, 8, 10000.0, None, &device());
        let linear = RotaryTables::new(
            4,
            8,
            10000.0,
            Some(&RopeScaling::Linear { factor: 4.0 }),
            &device(),
        );
        for i in 0..4 {
            let ratio = frequency(&plain, i) / frequency(&linear, i);
            assert!((ratio - 4.0).abs() < 1e-3, "pair {i}: {ratio}");
        }
        // Llama 3.1's settings on a context of 64: wavelengths 2 pi, 2 pi 10, 2 pi 100 and
        // 2 pi 1000. The shortest stays (below 64 / 4), the longest is divided by 8 (above
        // 64 / 1), the one between is interpolated.
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        assert_eq!(llama3.scale(0, 1.0), 1.0);
        assert_eq!(llama3.scale(0, 0.001), 0.001 / 8.0);
        let smooth = (64.0 / (2.0 * std::f64::consts::PI * 10.0) - 1.0) / 3.0;
        let expected = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        assert!((llama3.scale(0, 0.1) - expected).abs() < 1e-15);
        // Per-pair factors divide each pair's frequency by its own.
        let factors = RopeScaling::Factors {
            factors: vec![1.0, 2.0, 4.0, 8.0],
        };
        let scaled = RotaryTables::new(4, 8, 10000.0, Some(&factors), &device());
        for (i, factor) in [1.0, 2.0, 4.0, 8.0].into_iter().enumerate() {
            let ratio = frequency(&plain, i) / frequency(&scaled, i);
            assert!((ratio - factor).abs() < 1e-3, "pair {i}: {ratio}");
        }
    }
}
