//! Fused kernels for the operations that dominate training a small Llama on the CPU.
//!
//! burn-flex runs causal attention under autodiff as a dozen separate operations (scores,
//! mask, max, exp, sum, divide, and each one's backward), and log-softmax, SiLU and RMSNorm
//! likewise. The functions here compute each operation, forward and backward, in one
//! multi-threaded, vectorized pass over the data, as burn backend extensions for burn-flex.
//! On every other backend they compose burn's own differentiable operations, with the same
//! mathematics (tests compare the two).

mod autodiff;
mod flex;
mod lanes;
pub mod rows;

pub use rows::AdamWStep;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, DispatchDevice, ExtensionType, backend_extension};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::kind::Autodiff;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor};

/// The operations as a backend extension: implemented for burn-flex and for autodiff over it.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// Per-row cross-entropy of `[rows, vocab]` logits against `[rows]` target ids.
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Per-row `T^2 * KL(softmax(teacher / T) || softmax(student / T))` of `[rows, vocab]`
    /// logits; differentiable with respect to the student's only.
    fn fused_forward_kl(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self>;
    /// As `fused_forward_kl` over `k + 1` outcomes: the tokens `ids` `[rows, k]` and the rest
    /// of the vocabulary, the teacher given as log-probabilities `[rows, k + 1]`.
    fn fused_sparse_forward_kl(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self>;
    /// `silu(gate) * up`.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// RMS normalization over the last dimension, times `gain`.
    fn fused_rms_norm(x: FloatTensor<Self>, gain: FloatTensor<Self>, eps: f32)
    -> FloatTensor<Self>;
    /// Causal scaled dot-product attention with grouped key/value heads.
    fn fused_causal_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Inverted dropout with a mask that is a pure function of `seed` and the element index.
    fn fused_dropout(x: FloatTensor<Self>, probability: f32, seed: u64) -> FloatTensor<Self>;
    /// `x W` of `[rows, in]` inputs and an `[in, out]` weight (a transposed view of an
    /// `[out, in]` table too): a linear layer's product, differentiable with respect to both.
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The output head and the next-token losses of its logits, chunk by chunk: per row of
    /// `hidden` `[rows, width]` times `weight` `[width, vocab]`, the cross-entropy on `targets`
    /// and the divergence from `teacher`. Returns the weighted total
    /// `sum(ce_scales * ce + kl_scales * divergence)` `[1]`, differentiable with respect to
    /// `hidden` and `weight`, and the per-row cross-entropies and divergences `[rows]`, which
    /// are not.
    fn fused_head_losses(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        ce_scales: FloatTensor<Self>,
        #[extension_type] teacher: HeadTeacherTensors<Self>,
        kl_scales: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Rotary embedding (rotate-half layout) at positions `start..`.
    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self>;
}

/// The teacher a [`head_losses`] row is held to, as backend tensors.
#[derive(ExtensionType)]
pub enum HeadTeacherTensors<B: Backend> {
    Labels,
    Dense {
        hidden: FloatTensor<B>,
        weight: FloatTensor<B>,
    },
    Sparse {
        ids: IntTensor<B>,
        log_probs: FloatTensor<B>,
    },
}

/// A parameter and its AdamW moments, updated together.
#[derive(ExtensionType)]
pub struct AdamWTensors<B: Backend> {
    pub parameter: FloatTensor<B>,
    pub first: FloatTensor<B>,
    pub second: FloatTensor<B>,
}

/// The optimizer update as a backend extension; it runs outside autodiff, on plain tensors.
#[backend_extension(Flex)]
pub trait FusedOptimizerOps: Backend {
    fn fused_adamw(
        #[extension_type] tensors: AdamWTensors<Self>,
        gradient: FloatTensor<Self>,
        step: AdamWStep,
    ) -> AdamWTensors<Self>;
}

/// Inference-only operations: they run outside autodiff, on plain tensors.
#[backend_extension(Flex)]
pub trait FusedInferenceOps: Backend {
    /// Per row of the output head `hidden` `[rows, width]` x `weight` `[width, vocab]`: the
    /// cross-entropy on `targets` `[rows]` and the most likely token, as [`head_losses`]
    /// computes them, a chunk of logits at a time.
    fn fused_head_scores(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, IntTensor<Self>);
    /// `x W` for a few rows `x` `[rows, in]` and a weight `[in, out]`.
    fn fused_rows_times_matrix(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Whether `device` computes on burn-flex, directly or under autodiff.
pub fn is_flex(device: &Device) -> bool {
    // Which other variants exist depends on the backends compiled in.
    #[allow(unreachable_patterns)]
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        _ => false,
    }
}

fn fused<const D: usize>(tensor: &Tensor<D>) -> bool {
    tensor.dtype() == DType::F32 && is_flex(&tensor.device())
}

/// Per-row next-token cross-entropy: `logits` `[rows, vocab]`, `targets` `[rows]`; returns
/// `[rows]` losses, differentiable with respect to `logits`.
pub fn cross_entropy_rows(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if fused(&logits) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_cross_entropy(
            logits.into_dispatch(),
            targets.into_dispatch(),
        ));
    }
    composed::cross_entropy_rows(logits, targets)
}

/// Per-row distillation divergence `T^2 * KL(softmax(teacher / T) || softmax(student / T))`:
/// `student` and `teacher` `[rows, vocab]`; returns `[rows]`. Differentiable with respect to
/// `student`; the teacher's logits are constants.
pub fn forward_kl_rows(student: Tensor<2>, teacher: Tensor<2>, temperature: f64) -> Tensor<1> {
    let teacher = if student.is_autodiff() {
        teacher.detach().autodiff()
    } else {
        teacher.inner()
    };
    if fused(&student) && teacher.dtype() == DType::F32 {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_forward_kl(
            student.into_dispatch(),
            teacher.into_dispatch(),
            (1.0 / temperature) as f32,
        ));
    }
    composed::forward_kl_rows(student, teacher, temperature)
}

/// [`forward_kl_rows`] against a teacher known on its top-k tokens and on the mass of the rest:
/// the divergence over `k + 1` outcomes, each of the `ids` (`[rows, k]`) and the rest of the
/// vocabulary together. `teacher` holds the teacher's log-probabilities of those outcomes at
/// `temperature` (`[rows, k + 1]`, the rest last); the student's are its softmax at the same
/// temperature summed the same way ([`coarse_log_probs`]). Returns `[rows]`, times `T^2`.
pub fn sparse_forward_kl_rows(
    student: Tensor<2>,
    ids: Tensor<2, Int>,
    teacher: Tensor<2>,
    temperature: f64,
) -> Tensor<1> {
    let (ids, teacher) = if student.is_autodiff() {
        (ids.autodiff(), teacher.detach().autodiff())
    } else {
        (ids.inner(), teacher.inner())
    };
    if fused(&student) && teacher.dtype() == DType::F32 {
        return Tensor::from_dispatch(
            <burn::backend::Dispatch as FusedOps>::fused_sparse_forward_kl(
                student.into_dispatch(),
                ids.into_dispatch(),
                teacher.into_dispatch(),
                (1.0 / temperature) as f32,
            ),
        );
    }
    composed::sparse_forward_kl_rows(student, ids, teacher, temperature)
}

/// The student's log-probabilities at `temperature` of the `k + 1` outcomes of
/// [`sparse_forward_kl_rows`]: each of `ids` (`[rows, k]`), then the rest of the vocabulary
/// (about -1e9 when the ids cover it). Returns `[rows, k + 1]`, differentiable.
pub fn coarse_log_probs(student: Tensor<2>, ids: Tensor<2, Int>, temperature: f64) -> Tensor<2> {
    let [rows, vocab] = student.dims();
    let k = ids.dims()[1];
    let device = student.device();
    let ids = if student.is_autodiff() {
        ids.autodiff()
    } else {
        ids.inner()
    };
    // [rows, vocab]
    let log_q = log_softmax(student.div_scalar(temperature), 1);
    // [rows, vocab], true at the cached ids
    let cached = Tensor::<2>::zeros([rows, vocab], &device)
        .scatter(
            1,
            ids.clone(),
            Tensor::ones([rows, k], &device),
            IndexingUpdateOp::Assign,
        )
        .equal_elem(1.0);
    // A finite fill keeps a row whose ids cover the vocabulary free of NaN.
    let rest = log_q.clone().mask_fill(cached, -1e9);
    // [rows, 1]
    let max = rest.clone().max_dim(1).detach();
    // [rows, 1]
    let rest = max.clone() + (rest - max).exp().sum_dim(1).log();
    // [rows, k] and [rows, 1] -> [rows, k + 1]
    Tensor::cat(vec![log_q.gather(1, ids), rest], 1)
}

/// What [`head_losses`] holds the student's rows to beside their labels.
#[derive(Clone)]
pub enum HeadTeacher {
    /// Nothing: cross-entropy on the labels alone.
    Labels,
    /// The forward KL to a teacher given by its final hidden states `[rows, width]` and its
    /// output head `[width, vocab]`: its logits are computed chunk by chunk too.
    Dense {
        hidden: Tensor<2>,
        weight: Tensor<2>,
    },
    /// The forward KL over `k + 1` outcomes to a cached teacher ([`sparse_forward_kl_rows`]):
    /// token `ids` `[rows, k]` and the teacher's log-probabilities at the temperature
    /// `[rows, k + 1]`, the rest of the vocabulary last.
    Sparse {
        ids: Tensor<2, Int>,
        log_probs: Tensor<2>,
    },
}

/// How much each row's two losses weigh in [`head_losses`]'s total: `[rows]` each.
pub struct RowWeights {
    pub cross_entropy: Tensor<1>,
    pub divergence: Tensor<1>,
}

/// [`head_losses`]'s results.
pub struct HeadLosses {
    /// `sum(weights.cross_entropy * cross_entropy + weights.divergence * divergence)`, `[1]`:
    /// the only differentiable output.
    pub total: Tensor<1>,
    /// Per-row cross-entropy on the targets, `[rows]`, for metrics.
    pub cross_entropy: Tensor<1>,
    /// Per-row `T^2 * KL(teacher || student)` at the temperature (zeros with
    /// [`HeadTeacher::Labels`]), `[rows]`, for metrics.
    pub divergence: Tensor<1>,
}

/// The output head `hidden` `[rows, width]` x `weight` `[width, vocab]` and the losses of its
/// logits: per row the cross-entropy on `targets` `[rows]` and the forward KL to `teacher` at
/// `temperature` (times `T^2`), weighted by `weights` and summed. On burn-flex the logits are
/// computed a chunk of rows at a time (64 MiB, at least 1,024 rows), each chunk's logits and
/// their gradient in one buffer (the gradient taken in the forward pass, scaled in the backward
/// one), so no more than one chunk of the student's logits, and one of a live teacher's, is
/// ever held; elsewhere burn's operations over whole logits.
pub fn head_losses(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    teacher: HeadTeacher,
    weights: RowWeights,
    temperature: f64,
) -> HeadLosses {
    // Everything but the student's hidden states and head is a constant of the graph they
    // are in (or of none).
    let autodiff = hidden.is_autodiff() || weight.is_autodiff();
    let targets = constant(targets, autodiff);
    let ce_scales = constant(weights.cross_entropy, autodiff);
    let kl_scales = constant(weights.divergence, autodiff);
    let teacher = match teacher {
        HeadTeacher::Labels => HeadTeacher::Labels,
        HeadTeacher::Dense { hidden, weight } => HeadTeacher::Dense {
            hidden: constant(hidden, autodiff),
            weight: constant(weight, autodiff),
        },
        HeadTeacher::Sparse { ids, log_probs } => HeadTeacher::Sparse {
            ids: constant(ids, autodiff),
            log_probs: constant(log_probs, autodiff),
        },
    };
    let teacher_f32 = match &teacher {
        HeadTeacher::Labels => true,
        HeadTeacher::Dense { hidden, weight } => {
            hidden.dtype() == DType::F32 && weight.dtype() == DType::F32
        }
        HeadTeacher::Sparse { log_probs, .. } => log_probs.dtype() == DType::F32,
    };
    if fused(&hidden) && weight.dtype() == DType::F32 && teacher_f32 {
        let teacher = match teacher {
            HeadTeacher::Labels => HeadTeacherTensors::Labels,
            HeadTeacher::Dense { hidden, weight } => HeadTeacherTensors::Dense {
                hidden: hidden.into_dispatch(),
                weight: weight.into_dispatch(),
            },
            HeadTeacher::Sparse { ids, log_probs } => HeadTeacherTensors::Sparse {
                ids: ids.into_dispatch(),
                log_probs: log_probs.into_dispatch(),
            },
        };
        let (total, cross_entropy, divergence) =
            <burn::backend::Dispatch as FusedOps>::fused_head_losses(
                hidden.into_dispatch(),
                weight.into_dispatch(),
                targets.into_dispatch(),
                ce_scales.into_dispatch(),
                teacher,
                kl_scales.into_dispatch(),
                (1.0 / temperature) as f32,
            );
        return HeadLosses {
            total: Tensor::from_dispatch(total),
            cross_entropy: Tensor::from_dispatch(cross_entropy),
            divergence: Tensor::from_dispatch(divergence),
        };
    }
    composed::head_losses(
        hidden,
        weight,
        targets,
        teacher,
        RowWeights {
            cross_entropy: ce_scales,
            divergence: kl_scales,
        },
        temperature,
    )
}

/// Per row of the output head `hidden` `[rows, width]` x `weight` `[width, vocab]`, outside
/// autodiff: the cross-entropy on `targets` `[rows]` and the most likely token (the first of
/// equal logits), `[rows]` each. On burn-flex a chunk of logits at a time, as
/// [`head_losses`] computes them; elsewhere from whole logits.
pub fn head_scores(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
) -> (Tensor<1>, Tensor<1, Int>) {
    let (hidden, weight, targets) = (hidden.inner(), weight.inner(), targets.inner());
    if fused(&hidden) && weight.dtype() == DType::F32 {
        let (losses, predictions) =
            <burn::backend::Dispatch as FusedInferenceOps>::fused_head_scores(
                hidden.into_dispatch(),
                weight.into_dispatch(),
                targets.into_dispatch(),
            );
        return (
            Tensor::from_dispatch(losses),
            Tensor::from_dispatch(predictions),
        );
    }
    let logits = linear(hidden, weight);
    let predictions = logits.clone().argmax(1).squeeze_dim(1);
    (cross_entropy_rows(logits, targets), predictions)
}

/// `tensor` outside any graph, on the autodiff device when `autodiff`.
fn constant<const D: usize, K: Autodiff>(tensor: Tensor<D, K>, autodiff: bool) -> Tensor<D, K> {
    let tensor = tensor.inner();
    if autodiff { tensor.autodiff() } else { tensor }
}

/// `silu(gate) * up`, the gated activation of a SwiGLU feed-forward block.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if fused(&gate) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_swiglu(
            gate.into_dispatch(),
            up.into_dispatch(),
        ));
    }
    composed::swiglu(gate, up)
}

/// `x W` for `[rows, in]` inputs and an `[in, out]` weight: a linear layer's product. burn-flex
/// 0.22's own matmul fills a byte buffer with zeros and then copies it into an aligned one, two
/// passes over every product on one thread while the others wait; here gemm writes the result
/// in place, with the same call and thread split, so the bits are the same.
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    if fused(&x) && weight.dtype() == DType::F32 {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
        ));
    }
    composed::linear(x, weight)
}

/// `x / sqrt(mean(x^2) + eps) * gain` over the last dimension.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gain: Tensor<1>, eps: f64) -> Tensor<D> {
    if fused(&x) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_rms_norm(
            x.into_dispatch(),
            gain.into_dispatch(),
            eps as f32,
        ));
    }
    composed::rms_norm(x, gain, eps)
}

/// Causal attention `softmax(q k^T / sqrt(head_dim)) v`.
///
/// `query`: `[batch, heads, queries, head_dim]`; `key`, `value`:
/// `[batch, kv_heads, keys, head_dim]` with `kv_heads` dividing `heads` (each key/value head
/// serves consecutive query heads) and `keys >= queries`: the queries are the last positions,
/// so with a cache they attend to every earlier position.
pub fn causal_attention(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Tensor<4> {
    if fused(&query) {
        return Tensor::from_dispatch(
            <burn::backend::Dispatch as FusedOps>::fused_causal_attention(
                query.into_dispatch(),
                key.into_dispatch(),
                value.into_dispatch(),
            ),
        );
    }
    composed::causal_attention(query, key, value)
}

/// Inverted dropout: each element is zeroed with probability `probability`, the rest scaled by
/// `1 / (1 - probability)`. On burn-flex the mask is a pure function of `seed` and the element's
/// index, the same on every run; elsewhere it is drawn from the device's generator seeded
/// with `seed`.
pub fn dropout<const D: usize>(x: Tensor<D>, probability: f64, seed: u64) -> Tensor<D> {
    if probability == 0.0 {
        return x;
    }
    if fused(&x) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_dropout(
            x.into_dispatch(),
            probability as f32,
            seed,
        ));
    }
    composed::dropout(x, probability, seed)
}

/// Rotary position embedding in the rotate-half layout: `x` `[batch, heads, seq, head_dim]` at
/// positions `start..start + seq`; `cos` and `sin_signed` are `[positions, head_dim]` tables
/// (the sine negated on the first half).
pub fn rotary(x: Tensor<4>, cos: Tensor<2>, sin_signed: Tensor<2>, start: usize) -> Tensor<4> {
    if fused(&x) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_rotary(
            x.into_dispatch(),
            cos.into_dispatch(),
            sin_signed.into_dispatch(),
            start,
        ));
    }
    composed::rotary(x, cos, sin_signed, start)
}

/// Input rows up to which [`rows_times_matrix`] streams the weight once for all of them; a
/// decode step has one, a speculative decoding check a few.
pub const FEW_ROWS: usize = 8;

/// `x W` for a few rows `x` `[rows, in]` (at most [`FEW_ROWS`]) and a weight `W` `[in, out]`,
/// outside autodiff (a decode step's product, or the check of a few drafted tokens). On
/// burn-flex one threaded pass streams the weight from memory (a general matrix product would
/// pack it first, which for a few rows costs more than the product), and each row's result has
/// the bits it has alone; elsewhere burn's product.
pub fn rows_times_matrix(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    assert!(x.dims()[0] <= FEW_ROWS, "a few rows");
    if fused(&x) && !x.is_autodiff() && !weight.is_autodiff() && weight.dtype() == DType::F32 {
        return Tensor::from_dispatch(
            <burn::backend::Dispatch as FusedInferenceOps>::fused_rows_times_matrix(
                x.into_dispatch(),
                weight.into_dispatch(),
            ),
        );
    }
    x.matmul(weight)
}

/// One AdamW update of a flattened parameter: returns the new parameter and moments, none of
/// them tracked by autodiff.
pub fn adamw(
    parameter: Tensor<1>,
    gradient: Tensor<1>,
    first: Tensor<1>,
    second: Tensor<1>,
    step: AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (parameter, gradient) = (parameter.inner(), gradient.inner());
    let (first, second) = (first.inner(), second.inner());
    if fused(&parameter) {
        let tensors = AdamWTensors {
            parameter: parameter.into_dispatch(),
            first: first.into_dispatch(),
            second: second.into_dispatch(),
        };
        let updated = <burn::backend::Dispatch as FusedOptimizerOps>::fused_adamw(
            tensors,
            gradient.into_dispatch(),
            step,
        );
        return (
            Tensor::from_dispatch(updated.parameter),
            Tensor::from_dispatch(updated.first),
            Tensor::from_dispatch(updated.second),
        );
    }
    composed::adamw(parameter, gradient, first, second, step)
}

/// The same operations from burn's differentiable primitives: the path on every backend but
/// burn-flex, and the reference the fused kernels are tested against.
pub mod composed {
    use super::*;

    pub fn cross_entropy_rows(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let rows = targets.dims()[0];
        // [rows, vocab] -> [rows, 1]
        let picked = log_softmax(logits, 1).gather(1, targets.reshape([rows, 1]));
        // [rows]
        picked.reshape([rows]).neg()
    }

    pub fn forward_kl_rows(student: Tensor<2>, teacher: Tensor<2>, temperature: f64) -> Tensor<1> {
        let rows = student.dims()[0];
        // [rows, vocab]
        let student = log_softmax(student.div_scalar(temperature), 1);
        // [rows, vocab]
        let teacher = log_softmax(teacher.detach().div_scalar(temperature), 1);
        // [rows, 1]
        let kl = teacher.clone().exp().mul(teacher.sub(student)).sum_dim(1);
        // [rows]
        kl.reshape([rows]).mul_scalar(temperature * temperature)
    }

    pub fn sparse_forward_kl_rows(
        student: Tensor<2>,
        ids: Tensor<2, Int>,
        teacher: Tensor<2>,
        temperature: f64,
    ) -> Tensor<1> {
        let rows = student.dims()[0];
        // [rows, k + 1]
        let student = coarse_log_probs(student, ids, temperature);
        // [rows, k + 1]
        let teacher = teacher.detach();
        // [rows, 1]
        let kl = teacher.clone().exp().mul(teacher.sub(student)).sum_dim(1);
        // [rows]
        kl.reshape([rows]).mul_scalar(temperature * temperature)
    }

    pub fn head_losses(
        hidden: Tensor<2>,
        weight: Tensor<2>,
        targets: Tensor<1, Int>,
        teacher: HeadTeacher,
        weights: RowWeights,
        temperature: f64,
    ) -> HeadLosses {
        let logits = linear(hidden, weight);
        let rows = logits.dims()[0];
        let cross_entropy = cross_entropy_rows(logits.clone(), targets);
        let divergence = match teacher {
            HeadTeacher::Labels => Tensor::zeros([rows], &logits.device()),
            HeadTeacher::Dense { hidden, weight } => {
                forward_kl_rows(logits, linear(hidden, weight), temperature)
            }
            HeadTeacher::Sparse { ids, log_probs } => {
                sparse_forward_kl_rows(logits, ids, log_probs, temperature)
            }
        };
        let total = (cross_entropy.clone() * weights.cross_entropy).sum()
            + (divergence.clone() * weights.divergence).sum();
        HeadLosses {
            total,
            cross_entropy: cross_entropy.detach(),
            divergence: divergence.detach(),
        }
    }

    pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        silu(gate) * up
    }

    pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
        x.matmul(weight)
    }

    pub fn dropout<const D: usize>(x: Tensor<D>, probability: f64, seed: u64) -> Tensor<D> {
        x.device().seed(seed);
        let keep = 1.0 - probability;
        let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
        x * mask.div_scalar(keep)
    }

    pub fn rms_norm<const D: usize>(x: Tensor<D>, gain: Tensor<1>, eps: f64) -> Tensor<D> {
        let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
        (x / rms) * gain.unsqueeze()
    }

    pub fn causal_attention(query: Tensor<4>, key: Tensor<4>, value: Tensor<4>) -> Tensor<4> {
        // query [batch, heads, queries, head_dim]; key, value [batch, kv_heads, keys, head_dim]
        let groups = query.dims()[1] / key.dims()[1];
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        // key, value repeated to [batch, heads, keys, head_dim]; the result
        // [batch, heads, queries, head_dim]
        attention(
            query,
            repeat_kv(key, groups),
            repeat_kv(value, groups),
            None,
            None,
            options,
        )
    }

    pub fn rotary(x: Tensor<4>, cos: Tensor<2>, sin_signed: Tensor<2>, start: usize) -> Tensor<4> {
        let [_, _, seq, head_dim] = x.dims();
        let half = head_dim / 2;
        let positions = start..start + seq;
        // [1, 1, seq, head_dim]
        let cos = cos.slice([positions.clone()]).unsqueeze::<4>();
        // [1, 1, seq, head_dim]
        let sin = sin_signed.slice([positions]).unsqueeze::<4>();
        // [batch, heads, seq, head_dim], the two halves exchanged
        let swapped = Tensor::cat(
            vec![
                x.clone().narrow(3, half, half),
                x.clone().narrow(3, 0, half),
            ],
            3,
        );
        x * cos + swapped * sin
    }

    pub fn adamw(
        parameter: Tensor<1>,
        gradient: Tensor<1>,
        first: Tensor<1>,
        second: Tensor<1>,
        step: AdamWStep,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let gradient = gradient.mul_scalar(step.grad_scale);
        let first = first.mul_scalar(step.beta1) + gradient.clone().mul_scalar(1.0 - step.beta1);
        let second = second.mul_scalar(step.beta2) + gradient.square().mul_scalar(1.0 - step.beta2);
        let direction = first.clone().div_scalar(step.first_correction)
            / second
                .clone()
                .div_scalar(step.second_correction)
                .sqrt()
                .add_scalar(step.eps);
        let parameter = parameter.mul_scalar(step.decay) - direction.mul_scalar(step.lr);
        (parameter, first, second)
    }

    /// `[batch, kv_heads, seq, dim]` to `[batch, kv_heads * groups, seq, dim]`, each key/value
    /// head repeated for the `groups` consecutive query heads it serves.
    fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
        if groups == 1 {
            return x;
        }
        let [batch, kv_heads, seq, head_dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, seq, head_dim])
            .reshape([batch, kv_heads * groups, seq, head_dim])
    }
}

#[cfg(test)]
mod tests;
