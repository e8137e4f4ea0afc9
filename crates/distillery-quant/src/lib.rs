//! Post-training weight quantization: absmax int8, round-to-nearest and GPTQ, as pure
//! functions on weight matrices, plus the GPTQ storage layout.

pub mod gptq;
pub mod grid;
mod linalg;
pub mod pack;

pub use gptq::{
    GptqOutcome, GptqSettings, Hessian, QuantSettings, QuantizedMatrix, gptq, round_to_nearest,
};
pub use grid::{Grid, Int8Channel, int8_absmax};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{0}")]
    Settings(String),
    #[error(
        "the layer's Hessian is not positive definite even with damp_percent = {damp_percent}; \
         its calibration inputs are degenerate"
    )]
    NotPositiveDefinite { damp_percent: f64 },
}
