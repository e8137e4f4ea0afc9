//! Post-training quantization of a whole model: absmax int8, round-to-nearest and GPTQ
//! calibrated block by block, saved as a GPTQ-layout folder that distillery evaluates, runs and
//! exports like any other model.

mod model;
mod run;

pub use model::{Calibration, MatrixOutcome, Progress, QuantizeOptions, quantize_model};
pub use run::{QuantizeOutcome, quantize_run};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("{layer}: {source}")]
    Layer {
        layer: String,
        source: distillery_quant::QuantError,
    },
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Run(#[from] distillery_run::RunError),
    #[error(transparent)]
    Data(#[from] distillery_data::DataError),
    #[error(transparent)]
    Files(#[from] distillery_formats::hf::HfError),
    #[error(transparent)]
    Source(#[from] distillery_formats::source::SourceError),
}
