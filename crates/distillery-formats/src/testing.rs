//! What the format tests share: a model's logits on given tokens.

use burn::tensor::{Device, Int, Tensor, TensorData};
use distillery_model::Llama;

/// The logits of `model` for `ids` shaped `[batch, length]`, flattened.
pub(crate) fn logits(model: &Llama, ids: Vec<i64>, shape: [usize; 2]) -> Vec<f32> {
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, shape), &Device::flex());
    model
        .forward(tokens)
        .into_data()
        .try_into_vec::<f32>()
        .expect("logits are f32")
}
