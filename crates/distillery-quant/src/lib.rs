//! Post-training weight quantization: absmax int8, round-to-nearest and GPTQ, as pure
//! functions on weight matrices; the packed form quantized layers compute with; the GPTQ
//! storage layout.

pub mod cpu;
pub mod f16;
pub mod ggml;
pub mod gptq;
pub mod grid;
pub mod int8_inputs;
mod interleaved;
mod linalg;
pub mod pack;
pub mod packed;
mod products;
pub mod settings;
pub mod weight;

pub use gptq::{
    GptqSettings, Hessian, PreparedHessian, QuantSettings, QuantizedMatrix, gptq, int8_absmax,
    round_to_nearest,
};
pub use grid::Grid;

#[cfg(test)]
mod test_support {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `rows x cols` values uniform in [-1, 1) from `seed`.
    pub fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    /// Every kernel (one per family) gives each input its products with `rows` rows with the
    /// same bits alone and among one to all of `inputs` at once, and the same bits as the first
    /// kernel. `run(kernel, inputs, out)` writes `out[row * inputs.len() + input]`.
    pub fn assert_each_input_keeps_its_bits<K, T>(
        kernels: &[K],
        inputs: &[T],
        rows: usize,
        run: impl Fn(&K, &[T], &mut [f32]),
        what: &str,
    ) {
        let bits = |products: &[Vec<f32>]| -> Vec<Vec<u32>> {
            products
                .iter()
                .map(|outs| outs.iter().map(|out| out.to_bits()).collect())
                .collect()
        };
        let mut first = None;
        for (family, kernel) in kernels.iter().enumerate() {
            let alone: Vec<Vec<f32>> = inputs
                .iter()
                .map(|input| {
                    let mut out = vec![0.0; rows];
                    run(kernel, std::slice::from_ref(input), &mut out);
                    out
                })
                .collect();
            let together = |count| {
                let mut out = vec![0.0; rows * count];
                run(kernel, &inputs[..count], &mut out);
                out
            };
            let what = format!("{what}, family {family}");
            assert_inputs_keep_their_bits(&alone, together, &what);
            let alone = bits(&alone);
            assert_eq!(&alone, first.get_or_insert_with(|| alone.clone()), "{what}");
        }
    }

    /// For one to `alone.len()` inputs at once, the products `together(count)` gives
    /// (`out[row * count + input]`) have the bits `alone[input][row]` each input has alone.
    pub fn assert_inputs_keep_their_bits(
        alone: &[Vec<f32>],
        together: impl Fn(usize) -> Vec<f32>,
        what: &str,
    ) {
        for count in 1..=alone.len() {
            let products = together(count);
            for (row, outs) in products.chunks_exact(count).enumerate() {
                for (input, out) in outs.iter().enumerate() {
                    assert_eq!(
                        out.to_bits(),
                        alone[input][row].to_bits(),
                        "{what}: row {row}, input {input} of {count}"
                    );
                }
            }
        }
    }
}
pub use ggml::{BlockMatrix, GgmlType};
pub use packed::{GptqTensors, PackedMatrix};
pub use weight::{ActivationRounding, QuantizedWeight};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error("the Hessian is {hessian}x{hessian} for a matrix of {cols} input columns")]
    HessianSize { hessian: usize, cols: usize },
    #[error(
        "the layer's Hessian is not positive definite even with damp_percent = {damp_percent}; \
         its calibration inputs are degenerate"
    )]
    NotPositiveDefinite { damp_percent: f64 },
    #[error("malformed GPTQ tensors: {0}")]
    Layout(String),
}
