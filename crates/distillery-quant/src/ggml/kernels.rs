//! The integer kernel every block format shares: one channel's pieces, decoded to small signed
//! codes and per-half scales, against one input row rounded to int8 per piece.

use super::blocks::{PIECE, PieceScales};
use crate::int8_inputs::round_block;

/// One input row rounded to int8 per piece of 32 columns.
pub(crate) struct PieceInputs {
    values: Vec<i8>,
    scales: Vec<f32>,
    /// Each half piece's `scale · Σ values`: what a minimum multiplies.
    half_sums: Vec<f32>,
}

impl PieceInputs {
    pub(crate) fn new(input: &[f32]) -> Self {
        let pieces = input.len() / PIECE;
        let mut values = Vec::with_capacity(input.len());
        let mut scales = Vec::with_capacity(pieces);
        let mut half_sums = Vec::with_capacity(2 * pieces);
        for columns in input.chunks_exact(PIECE) {
            let mut block = [0i8; PIECE];
            let scale = round_block(columns, &mut block);
            for half in block.chunks_exact(PIECE / 2) {
                let sum: i32 = half.iter().map(|&value| i32::from(value)).sum();
                half_sums.push(scale * sum as f32);
            }
            values.extend(block);
            scales.push(scale);
        }
        Self {
            values,
            scales,
            half_sums,
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
mod x86 {
    use std::arch::x86_64::*;

    use super::{PIECE, PieceInputs, PieceScales};
    use crate::int8_inputs::x86::horizontal_sum;

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
