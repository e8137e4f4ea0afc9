//! Next-token losses and metrics, computed in f32.

use burn::tensor::{Int, Tensor};
use distillery_kernels::{HeadTeacher, RowWeights, head_losses};
use distillery_model::Llama;

/// Mean next-token cross-entropy over the counted positions.
///
/// `logits`: `[batch, seq, vocab]`; `targets`: `[batch, seq]` token ids; `mask`: `[batch, seq]`,
/// 1 where a position counts and 0 where not (`None`: all count). Returns a one-element tensor,
/// differentiable with respect to `logits`.
pub fn cross_entropy(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    masked_mean(token_cross_entropy(logits, targets), mask)
}

/// The mean of `[batch, seq]` values over the counted positions; none counted gives 0, not NaN.
pub fn masked_mean(per_position: Tensor<2>, mask: Option<Tensor<2>>) -> Tensor<1> {
    match mask {
        None => per_position.mean(),
        Some(mask) => per_position
            .mul(mask.clone())
            .sum()
            .div(mask.sum().clamp_min(1.0)),
    }
}

/// A next-token loss and its two terms, each a mean over the counted positions.
pub struct LossTerms {
    /// `(1 - alpha) · ce + alpha · kd`, differentiable.
    pub total: Tensor<1>,
    /// Cross-entropy on the labels.
    pub ce: Tensor<1>,
    /// The divergence from the teacher.
    pub kd: Tensor<1>,
}

/// `model`'s next-token loss on `inputs`, `(1 - alpha) · ce + alpha · kd` with the divergence
/// from `teacher` at `temperature`, taken through the output head a chunk of positions at a
/// time ([`head_losses`]): never more than one chunk of the `[tokens, vocab]` logits, their
/// gradient in the same buffer. `None` when the model's output head is quantized. Shapes as
/// [`cross_entropy`]'s.
pub fn head_loss_terms(
    model: &Llama,
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    mask: Option<Tensor<2>>,
    teacher: HeadTeacher,
    alpha: f64,
    temperature: f64,
) -> Option<LossTerms> {
    let weight = model.float_head()?;
    let [batch, seq] = targets.dims();
    let rows = batch * seq;
    let hidden = model.final_hidden(inputs);
    let width = hidden.dims()[2];
    let device = hidden.device();
    // A masked mean is a weighted sum: each counted position weighs 1 / counted.
    let counted = match &mask {
        Some(mask) => mask.clone().reshape([rows]).inner(),
        None => Tensor::ones([rows], &device).inner(),
    };
    let position_weights = counted.clone().div(counted.sum().clamp_min(1.0));
    let losses = head_losses(
        hidden.reshape([rows, width]),
        weight,
        targets.reshape([rows]),
        teacher,
        RowWeights {
            cross_entropy: position_weights.clone().mul_scalar(1.0 - alpha),
            divergence: position_weights.mul_scalar(alpha),
        },
        temperature,
    );
    Some(LossTerms {
        total: losses.total,
        ce: masked_mean(losses.cross_entropy.reshape([batch, seq]), mask.clone()),
        kd: masked_mean(losses.divergence.reshape([batch, seq]), mask),
    })
}

/// `model`'s mean next-token cross-entropy on `inputs` over the counted positions: through the
/// chunked output head ([`head_loss_terms`]), or from whole logits when the head is quantized.
pub fn next_token_loss(
    model: &Llama,
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    let terms = head_loss_terms(
        model,
        inputs.clone(),
        targets.clone(),
        mask.clone(),
        HeadTeacher::Labels,
        0.0,
        1.0,
    );
    match terms {
        Some(terms) => terms.total,
        None => cross_entropy(model.forward(inputs), targets, mask),
    }
}

/// Next-token cross-entropy of each position, `[batch, seq]`.
pub fn token_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, seq, vocab] = logits.dims();
    distillery_kernels::cross_entropy_rows(
        logits.reshape([batch * seq, vocab]),
        targets.reshape([batch * seq]),
    )
    .reshape([batch, seq])
}

/// How many counted positions' most likely token is the target: `(correct, counted)`.
pub fn next_token_hits(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Option<Tensor<2>>,
) -> (usize, usize) {
    prediction_hits(logits.argmax(2).squeeze_dim(2), targets, mask)
}

/// How many counted positions' `predicted` token `[batch, seq]` is the target:
/// `(correct, counted)`.
pub fn prediction_hits(
    predicted: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    mask: Option<Tensor<2>>,
) -> (usize, usize) {
    let [batch, seq] = predicted.dims();
    let hits = predicted.equal(targets).float();
    match mask {
        None => (hits.sum().into_scalar::<f32>() as usize, batch * seq),
        Some(mask) => (
            (hits * mask.clone()).sum().into_scalar::<f32>() as usize,
            mask.sum().into_scalar::<f32>() as usize,
        ),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn logits(values: Vec<f32>, shape: [usize; 3]) -> Tensor<3> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    fn targets(values: Vec<i64>, shape: [usize; 2]) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        // Position 1: logits (0, ln 2, 0), target 1: p = 2/4, loss ln 2.
        // Position 2: logits (ln 3, 0, 0), target 2: p = 1/5, loss ln 5.
        let logits = logits(vec![0.0, 2f32.ln(), 0.0, 3f32.ln(), 0.0, 0.0], [1, 2, 3]);
        let loss: f32 = cross_entropy(logits, targets(vec![1, 2], [1, 2]), None).into_scalar();
        let expected = (2f32.ln() + 5f32.ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let loss: f32 = cross_entropy(
            logits(vec![0.25; 2 * 3 * 7], [2, 3, 7]),
            targets(vec![0, 1, 2, 3, 4, 5], [2, 3]),
            None,
        )
        .into_scalar();
        assert!((loss - 7f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradient_is_softmax_minus_one_hot_over_positions() {
        let device = Device::flex().autodiff();
        let values = vec![0.0, 2f32.ln(), 0.0, 3f32.ln(), 0.0, 0.0];
        let logits =
            Tensor::<3>::from_data(TensorData::new(values, [1, 2, 3]), &device).require_grad();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2], [1, 2]), &device);
        let grads = cross_entropy(logits.clone(), targets, None).backward();
        let gradient: Vec<f32> = logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec()
            .unwrap();
        let expected = [
            0.25 / 2.0,
            (0.5 - 1.0) / 2.0,
            0.25 / 2.0,
            0.6 / 2.0,
            0.2 / 2.0,
            (0.2 - 1.0) / 2.0,
        ];
        for (got, want) in gradient.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{gradient:?}");
        }
    }

    #[test]
    fn a_mask_counts_only_its_positions() {
        // The same two positions as above: ln 2 and ln 5; only the second counts.
        let logits = logits(vec![0.0, 2f32.ln(), 0.0, 3f32.ln(), 0.0, 0.0], [1, 2, 3]);
        let mask =
            Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0], [1, 2]), &Device::flex());
        let loss: f32 = cross_entropy(
            logits.clone(),
            targets(vec![1, 2], [1, 2]),
            Some(mask.clone()),
        )
        .into_scalar();
        assert!((loss - 5f32.ln()).abs() < 1e-6, "{loss}");
        // Position 1's argmax (1) is its target, position 2's (0) is not.
        assert_eq!(
            next_token_hits(logits, targets(vec![1, 2], [1, 2]), Some(mask)),
            (0, 1)
        );
    }

    #[test]
    fn hits_count_argmax_matches() {
        let logits = logits(vec![0.0, 1.0, 0.5, 2.0, 0.0, 0.0], [1, 2, 3]);
        assert_eq!(
            next_token_hits(logits.clone(), targets(vec![1, 0], [1, 2]), None),
            (2, 2)
        );
        assert_eq!(
            next_token_hits(logits.clone(), targets(vec![2, 0], [1, 2]), None),
            (1, 2)
        );
    }
}
