//! Distillation losses: divergences between temperature-softened teacher and student
//! distributions, and their mix with cross-entropy on the labels.
//!
//! Shapes: logits are `[batch, seq, vocab]` (student and teacher alike), targets `[batch, seq]`
//! token ids, and the optional mask `[batch, seq]` holds 1 where a position counts and 0 where it
//! is padding. Every loss is a one-element f32 tensor: the per-position divergence averaged over
//! the counted positions. Only the student's logits receive gradients; the teacher's are
//! treated as constants.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};
use distillery_config::{DistillConfig, DistillLoss};
use distillery_train::loss::{cross_entropy, masked_mean};

/// KL(teacher_T ‖ student_T) · T² (Hinton et al. 2015). The T² factor keeps the gradient's
/// scale independent of the temperature.
pub fn forward_kl(
    student: Tensor<3>,
    teacher: Tensor<3>,
    temperature: f64,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    let [batch, seq, vocab] = student.dims();
    let per_position = distillery_kernels::forward_kl_rows(
        student.reshape([batch * seq, vocab]),
        teacher.reshape([batch * seq, vocab]),
        temperature,
    );
    masked_mean(per_position.reshape([batch, seq]), mask)
}

/// KL(student_T ‖ teacher_T) · T² (MiniLLM): mode-seeking, the student is not pushed to cover
/// teacher modes it cannot represent.
pub fn reverse_kl(
    student: Tensor<3>,
    teacher: Tensor<3>,
    temperature: f64,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    let student = softened_log_probs(student, temperature);
    let teacher = softened_log_probs(teacher.detach(), temperature);
    masked_mean(kl_per_position(student, teacher), mask).mul_scalar(temperature * temperature)
}

/// Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024) · T²:
/// `beta · KL(t ‖ m) + (1 - beta) · KL(s ‖ m)` with the mixture `m = beta · t + (1 - beta) · s`.
/// `beta` must lie in (0, 1).
pub fn jsd(
    student: Tensor<3>,
    teacher: Tensor<3>,
    temperature: f64,
    beta: f64,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    let student = softened_log_probs(student, temperature);
    let teacher = softened_log_probs(teacher.detach(), temperature);
    masked_mean(jsd_per_position(student, teacher, beta), mask)
        .mul_scalar(temperature * temperature)
}

/// The configured divergence between student and teacher.
pub fn distillation_divergence(
    student: Tensor<3>,
    teacher: Tensor<3>,
    settings: &DistillConfig,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    match settings.loss {
        DistillLoss::ForwardKl => forward_kl(student, teacher, settings.temperature, mask),
        DistillLoss::ReverseKl => reverse_kl(student, teacher, settings.temperature, mask),
        DistillLoss::Jsd => jsd(student, teacher, settings.temperature, settings.beta, mask),
    }
}

/// The configured divergence between distributions the student and the teacher give as
/// log-probabilities at the temperature (`[batch, seq, outcomes]`, such as the `k + 1`
/// outcomes of a cached teacher), times T².
pub fn divergence_of_log_probs(
    student: Tensor<3>,
    teacher: Tensor<3>,
    settings: &DistillConfig,
    mask: Option<Tensor<2>>,
) -> Tensor<1> {
    let teacher = teacher.detach();
    let per_position = match settings.loss {
        DistillLoss::ForwardKl => kl_per_position(teacher, student),
        DistillLoss::ReverseKl => kl_per_position(student, teacher),
        DistillLoss::Jsd => jsd_per_position(student, teacher, settings.beta),
    };
    masked_mean(per_position, mask).mul_scalar(settings.temperature * settings.temperature)
}

/// A distillation loss and its two terms.
pub struct DistillTerms {
    /// `(1 - alpha) · ce + alpha · kd`.
    pub total: Tensor<1>,
    /// Cross-entropy of the student on the labels.
    pub ce: Tensor<1>,
    /// The divergence from the teacher.
    pub kd: Tensor<1>,
}

pub fn distillation_loss(
    student: Tensor<3>,
    teacher: Tensor<3>,
    targets: Tensor<2, Int>,
    settings: &DistillConfig,
    mask: Option<Tensor<2>>,
) -> DistillTerms {
    let ce = cross_entropy(student.clone(), targets, mask.clone());
    let kd = distillation_divergence(student, teacher, settings, mask);
    mix(ce, kd, settings.alpha)
}

/// `(1 - alpha) · ce + alpha · kd`.
pub fn mix(ce: Tensor<1>, kd: Tensor<1>, alpha: f64) -> DistillTerms {
    let total = ce
        .clone()
        .mul_scalar(1.0 - alpha)
        .add(kd.clone().mul_scalar(alpha));
    DistillTerms { total, ce, kd }
}

fn softened_log_probs(logits: Tensor<3>, temperature: f64) -> Tensor<3> {
    log_softmax(logits.div_scalar(temperature), 2)
}

/// `sum_v p_v (log p_v - log q_v)` per position, from log-probabilities: `[batch, seq]`.
fn kl_per_position(log_p: Tensor<3>, log_q: Tensor<3>) -> Tensor<2> {
    log_p
        .clone()
        .exp()
        .mul(log_p.sub(log_q))
        .sum_dim(2)
        .squeeze_dim(2)
}

/// `beta · KL(t ‖ m) + (1 - beta) · KL(s ‖ m)` per position, from log-probabilities.
fn jsd_per_position(student: Tensor<3>, teacher: Tensor<3>, beta: f64) -> Tensor<2> {
    let mixture = log_add_exp(
        teacher.clone().add_scalar(beta.ln()),
        student.clone().add_scalar((1.0 - beta).ln()),
    );
    kl_per_position(teacher, mixture.clone())
        .mul_scalar(beta)
        .add(kl_per_position(student, mixture).mul_scalar(1.0 - beta))
}

/// `log(exp(a) + exp(b))` without overflow or underflow.
fn log_add_exp(a: Tensor<3>, b: Tensor<3>) -> Tensor<3> {
    let larger = a.clone().max_pair(b.clone());
    let smaller = a.min_pair(b);
    larger.clone().add(smaller.sub(larger).exp().log1p())
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn tensor3(values: &[f32], shape: [usize; 3], device: &Device) -> Tensor<3> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
    }

    fn scalar(loss: Tensor<1>) -> f64 {
        f64::from(loss.into_scalar::<f32>())
    }

    fn softmax(logits: &[f64], temperature: f64) -> Vec<f64> {
        let scaled: Vec<f64> = logits.iter().map(|l| l / temperature).collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scaled.iter().map(|l| (l - max).exp()).sum();
        scaled.iter().map(|l| (l - max).exp() / sum).collect()
    }

    fn kl(p: &[f64], q: &[f64]) -> f64 {
        p.iter().zip(q).map(|(p, q)| p * (p / q).ln()).sum()
    }

    const STUDENT: [f32; 6] = [1.0, 0.0, -1.0, 0.5, 0.5, 2.0];
    const TEACHER: [f32; 6] = [2.0, -1.0, 0.0, 0.0, 1.0, 1.0];

    /// Per-position student and teacher distributions at temperature `t`, by hand in f64.
    fn distributions(t: f64) -> Vec<(Vec<f64>, Vec<f64>)> {
        let as_f64 = |values: &[f32]| values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        (0..2)
            .map(|position| {
                let range = position * 3..position * 3 + 3;
                (
                    softmax(&as_f64(&STUDENT[range.clone()]), t),
                    softmax(&as_f64(&TEACHER[range]), t),
                )
            })
            .collect()
    }

    fn pair(device: &Device) -> (Tensor<3>, Tensor<3>) {
        (
            tensor3(&STUDENT, [1, 2, 3], device),
            tensor3(&TEACHER, [1, 2, 3], device),
        )
    }

    #[test]
    fn forward_and_reverse_kl_match_hand_computation() {
        let device = Device::flex();
        let t = 2.0;
        let hand = distributions(t);
        let forward_expected = hand.iter().map(|(s, q)| kl(q, s)).sum::<f64>() / 2.0 * t * t;
        let reverse_expected = hand.iter().map(|(s, q)| kl(s, q)).sum::<f64>() / 2.0 * t * t;
        let (student, teacher) = pair(&device);
        let forward = scalar(forward_kl(student.clone(), teacher.clone(), t, None));
        let reverse = scalar(reverse_kl(student, teacher, t, None));
        assert!(
            (forward - forward_expected).abs() < 1e-5,
            "{forward} vs {forward_expected}"
        );
        assert!(
            (reverse - reverse_expected).abs() < 1e-5,
            "{reverse} vs {reverse_expected}"
        );
        assert!(
            (forward - reverse).abs() > 1e-3,
            "the two directions differ here"
        );
    }

    #[test]
    fn jsd_matches_hand_computation() {
        let device = Device::flex();
        let (t, beta) = (1.5, 0.3);
        let expected = distributions(t)
            .iter()
            .map(|(s, q)| {
                let mixture: Vec<f64> = q
                    .iter()
                    .zip(s)
                    .map(|(q, s)| beta * q + (1.0 - beta) * s)
                    .collect();
                beta * kl(q, &mixture) + (1.0 - beta) * kl(s, &mixture)
            })
            .sum::<f64>()
            / 2.0
            * t
            * t;
        let (student, teacher) = pair(&device);
        let got = scalar(jsd(student, teacher, t, beta, None));
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn identical_logits_give_zero_divergence() {
        let device = Device::flex();
        let logits = tensor3(&STUDENT, [1, 2, 3], &device);
        for loss in [
            forward_kl(logits.clone(), logits.clone(), 2.0, None),
            reverse_kl(logits.clone(), logits.clone(), 2.0, None),
            jsd(logits.clone(), logits.clone(), 2.0, 0.5, None),
        ] {
            assert!(scalar(loss).abs() < 1e-6);
        }
    }

    #[test]
    fn masked_positions_do_not_count() {
        let device = Device::flex();
        let (student, teacher) = pair(&device);
        let mask = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0], [1, 2]), &device);
        let hand = distributions(1.0);
        let expected = kl(&hand[1].1, &hand[1].0);
        let got = scalar(forward_kl(student, teacher, 1.0, Some(mask)));
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn mix_weighs_cross_entropy_and_divergence_by_alpha() {
        let device = Device::flex();
        let (student, teacher) = pair(&device);
        let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 2], [1, 2]), &device);
        let settings = DistillConfig {
            loss: DistillLoss::ForwardKl,
            temperature: 2.0,
            alpha: 0.25,
            ..DistillConfig::default()
        };
        let terms = distillation_loss(student, teacher, targets, &settings, None);
        let hand = distributions(1.0);
        let ce_expected = (-hand[0].0[0].ln() - hand[1].0[2].ln()) / 2.0;
        let (total, ce, kd) = (scalar(terms.total), scalar(terms.ce), scalar(terms.kd));
        assert!((ce - ce_expected).abs() < 1e-5, "{ce} vs {ce_expected}");
        assert!((total - (0.75 * ce + 0.25 * kd)).abs() < 1e-6);
    }

    /// The gradient of T² · KL(t_T ‖ s_T) with respect to the student's logits is
    /// T · (softmax(s / T) - softmax(t / T)) per position: the T² factor cancels the 1/T² the
    /// softening puts on the gradient, leaving it of the same order at every temperature.
    #[test]
    fn forward_kl_gradient_is_t_times_probability_difference() {
        let device = Device::flex().autodiff();
        for t in [1.0, 2.0, 4.0] {
            let (student, teacher) = pair(&device);
            let student = student.require_grad();
            let grads = forward_kl(student.clone(), teacher, t, None).backward();
            let gradient: Vec<f32> = student
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_into_vec()
                .unwrap();
            let hand = distributions(t);
            for position in 0..2 {
                let (s, q) = &hand[position];
                for v in 0..3 {
                    let expected = t * (s[v] - q[v]) / 2.0;
                    let got = f64::from(gradient[position * 3 + v]);
                    assert!((got - expected).abs() < 1e-5, "T={t}: {got} vs {expected}");
                }
            }
        }
    }

    /// Central finite differences of each loss against the gradient autodiff returns.
    #[test]
    fn gradients_match_finite_differences() {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        let targets = vec![0i64, 2];
        let settings = |loss| DistillConfig {
            loss,
            temperature: 2.0,
            alpha: 0.5,
            beta: 0.4,
            ..DistillConfig::default()
        };
        let evaluate = |values: &[f32], loss, device: &Device| {
            let targets =
                Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [1, 2]), device);
            distillation_loss(
                tensor3(values, [1, 2, 3], device),
                tensor3(&TEACHER, [1, 2, 3], device),
                targets,
                &settings(loss),
                None,
            )
            .total
        };
        for loss in [
            DistillLoss::ForwardKl,
            DistillLoss::ReverseKl,
            DistillLoss::Jsd,
        ] {
            let student = tensor3(&STUDENT, [1, 2, 3], &device).require_grad();
            let targets =
                Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [1, 2]), &device);
            let grads = distillation_loss(
                student.clone(),
                tensor3(&TEACHER, [1, 2, 3], &device),
                targets,
                &settings(loss),
                None,
            )
            .total
            .backward();
            let analytic: Vec<f32> = student
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_into_vec()
                .unwrap();
            let step = 1e-2f32;
            for index in 0..STUDENT.len() {
                let mut up = STUDENT;
                up[index] += step;
                let mut down = STUDENT;
                down[index] -= step;
                let numeric = (scalar(evaluate(&up, loss, &plain))
                    - scalar(evaluate(&down, loss, &plain)))
                    / (2.0 * f64::from(step));
                let got = f64::from(analytic[index]);
                assert!(
                    (got - numeric).abs() < 1e-3,
                    "{loss:?}, logit {index}: autodiff {got} vs finite difference {numeric}"
                );
            }
        }
    }
}
