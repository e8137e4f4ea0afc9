//! Next-token losses and metrics, computed in f32.

use burn::tensor::{Int, Tensor};

/// Mean next-token cross-entropy.
///
/// `logits`: `[batch, seq, vocab]`; `targets`: `[batch, seq]` token ids. Returns a one-element
/// tensor, differentiable with respect to `logits`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    token_cross_entropy(logits, targets).mean()
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

/// How many positions' most likely token is the target: `(correct, positions)`.
pub fn next_token_hits(logits: Tensor<3>, targets: Tensor<2, Int>) -> (usize, usize) {
    let [batch, seq, _] = logits.dims();
    let predicted: Tensor<2, Int> = logits.argmax(2).squeeze_dim(2);
    let correct: i64 = predicted.equal(targets).int().sum().into_scalar();
    (correct as usize, batch * seq)
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
        let loss: f32 = cross_entropy(logits, targets(vec![1, 2], [1, 2])).into_scalar();
        let expected = (2f32.ln() + 5f32.ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let loss: f32 = cross_entropy(
            logits(vec![0.25; 2 * 3 * 7], [2, 3, 7]),
            targets(vec![0, 1, 2, 3, 4, 5], [2, 3]),
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
        let grads = cross_entropy(logits.clone(), targets).backward();
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
    fn hits_count_argmax_matches() {
        let logits = logits(vec![0.0, 1.0, 0.5, 2.0, 0.0, 0.0], [1, 2, 3]);
        assert_eq!(
            next_token_hits(logits.clone(), targets(vec![1, 0], [1, 2])),
            (2, 2)
        );
        assert_eq!(next_token_hits(logits, targets(vec![2, 0], [1, 2])), (1, 2));
    }
}
