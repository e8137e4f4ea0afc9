use burn::tensor::{Device, Int, Tensor, TensorData};
use distillery_data::{TokenBatch, ValidationWindows};
use distillery_model::Llama;
use serde::{Deserialize, Serialize};

use distillery_kernels::head_scores;

use crate::loss::{masked_mean, prediction_hits, token_cross_entropy};

/// Validation metrics over every counted target of the validation windows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Share of counted positions whose most likely token is the target.
    pub accuracy: f64,
    pub tokens: usize,
}

/// Token ids of a batch as `[batch, seq]` input and target tensors.
pub fn batch_tensors(batch: &TokenBatch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    let tensor = |ids: &[u32]| {
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(ids, shape), device)
    };
    (tensor(&batch.inputs), tensor(&batch.targets))
}

/// A batch's mask, `[batch, seq]`: 1 where the target counts, 0 where not; `None` when all
/// count.
pub fn batch_mask(batch: &TokenBatch, device: &Device) -> Option<Tensor<2>> {
    batch.counted.as_ref().map(|counted| {
        let values: Vec<f32> = counted
            .iter()
            .map(|&counts| f32::from(u8::from(counts)))
            .collect();
        Tensor::from_data(
            TensorData::new(values, [batch.batch_size, batch.seq_len]),
            device,
        )
    })
}

/// One fixed pass over the validation windows. `model` should be in evaluation mode
/// (`model.valid()`), so no graph is recorded and dropout is off.
pub fn evaluate(
    model: &Llama,
    windows: &ValidationWindows,
    batch_size: usize,
    device: &Device,
) -> EvalMetrics {
    evaluate_windows(model, windows, batch_size, device, None)
}

/// [`evaluate`], also returning each position's most likely next token, window after window.
pub fn evaluate_with_predictions(
    model: &Llama,
    windows: &ValidationWindows,
    batch_size: usize,
    device: &Device,
) -> (EvalMetrics, Vec<u32>) {
    let mut predictions = Vec::new();
    let metrics = evaluate_windows(model, windows, batch_size, device, Some(&mut predictions));
    (metrics, predictions)
}

/// Each position's next-token cross-entropy and most likely token, `[batch, seq]` each: through
/// the output head a chunk at a time when it is float ([`head_scores`]), else from whole logits.
fn scores(
    model: &Llama,
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
) -> (Tensor<2>, Tensor<2, Int>) {
    let [batch, seq] = targets.dims();
    let Some(weight) = model.float_head() else {
        let logits = model.forward(inputs);
        let predicted = logits.clone().argmax(2).squeeze_dim(2);
        return (token_cross_entropy(logits, targets), predicted);
    };
    let hidden = model.final_hidden(inputs);
    let width = hidden.dims()[2];
    let (losses, predicted) = head_scores(
        hidden.reshape([batch * seq, width]),
        weight,
        targets.reshape([batch * seq]),
    );
    (
        losses.reshape([batch, seq]),
        predicted.reshape([batch, seq]),
    )
}

fn evaluate_windows(
    model: &Llama,
    windows: &ValidationWindows,
    batch_size: usize,
    device: &Device,
    mut predictions: Option<&mut Vec<u32>>,
) -> EvalMetrics {
    let mut loss_sum = 0.0;
    let mut correct = 0;
    let mut tokens = 0;
    for batch in windows.batches(batch_size) {
        let (inputs, targets) = batch_tensors(&batch, device);
        let mask = batch_mask(&batch, device);
        let (losses, predicted) = scores(model, inputs, targets.clone());
        let loss: f32 = masked_mean(losses, mask.clone()).into_scalar();
        if let Some(predictions) = predictions.as_deref_mut() {
            let predicted: Vec<i64> = predicted
                .clone()
                .into_data()
                .convert::<i64>()
                .try_into_vec()
                .expect("token ids are integers");
            predictions.extend(predicted.into_iter().map(|id| id as u32));
        }
        let (hits, counted) = prediction_hits(predicted, targets, mask);
        loss_sum += loss as f64 * counted as f64;
        correct += hits;
        tokens += counted;
    }
    let loss = loss_sum / tokens as f64;
    EvalMetrics {
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / tokens as f64,
        tokens,
    }
}
