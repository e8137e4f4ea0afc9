//! The extension's implementations: burn-flex runs the kernels; autodiff over a backend with the
//! kernels records each operation as one node whose backward pass is one kernel call.

use burn::backend::Flex;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, unary};

use crate::flex::HeadRequests;
use crate::{
    AdamWTensors, FusedInferenceOps, FusedOps, FusedOptimizerOps, HeadTeacherTensors, flex,
    rows::AdamWStep,
};

/// Forward passes that return what the backward pass needs, and the backward passes.
pub trait FusedKernels: Backend {
    /// Losses and log-sum-exps.
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        log_sum_exps: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Losses and the student's and teacher's log-sum-exps at the temperature.
    fn forward_kl_forward(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    fn forward_kl_backward(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        student_lse: FloatTensor<Self>,
        teacher_lse: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self>;
    /// Losses and the student's log-sum-exps over its rows and over the uncached rest.
    fn sparse_forward_kl_forward(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    #[allow(clippy::too_many_arguments)]
    fn sparse_forward_kl_backward(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        student_lse: FloatTensor<Self>,
        student_rest_lse: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self>;
    /// The output head's losses, and the gradients of their total asked for.
    #[allow(clippy::too_many_arguments)]
    fn head_losses_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        ce_scales: FloatTensor<Self>,
        teacher: HeadTeacherTensors<Self>,
        kl_scales: FloatTensor<Self>,
        inverse_temperature: f32,
        requests: HeadRequests,
    ) -> HeadLossOutputs<Self>;
    /// `tensor` times the one value of `factor`.
    fn scaled(tensor: FloatTensor<Self>, factor: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The product of two matrices, strided views included.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Output and inverse RMS per row.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        inverse_rms: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Output and attention probabilities.
    fn attention_forward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    fn attention_backward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        probabilities: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Also the backward pass: the mask scales the gradient as it scaled the input.
    fn dropout_forward(x: FloatTensor<Self>, probability: f32, seed: u64) -> FloatTensor<Self>;
    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self>;
    fn rotary_backward(
        gradient: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self>;
}

/// What [`FusedKernels::head_losses_forward`] returns.
pub struct HeadLossOutputs<B: Backend> {
    pub total: FloatTensor<B>,
    pub cross_entropy: FloatTensor<B>,
    pub divergence: FloatTensor<B>,
    pub hidden_gradient: Option<FloatTensor<B>>,
    pub weight_gradient: Option<FloatTensor<B>>,
    pub predictions: Option<IntTensor<B>>,
}

impl FusedKernels for Flex {
    fn head_losses_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        ce_scales: FloatTensor<Self>,
        teacher: HeadTeacherTensors<Self>,
        kl_scales: FloatTensor<Self>,
        inverse_temperature: f32,
        requests: HeadRequests,
    ) -> HeadLossOutputs<Self> {
        let outputs = flex::head_losses(
            &hidden,
            &weight,
            &targets,
            &ce_scales,
            &teacher,
            &kl_scales,
            inverse_temperature,
            requests,
        );
        HeadLossOutputs {
            total: outputs.total,
            cross_entropy: outputs.cross_entropy,
            divergence: outputs.divergence,
            hidden_gradient: outputs.hidden_gradient,
            weight_gradient: outputs.weight_gradient,
            predictions: outputs.predictions,
        }
    }

    fn scaled(tensor: FloatTensor<Self>, factor: FloatTensor<Self>) -> FloatTensor<Self> {
        flex::scaled(tensor, &factor)
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::cross_entropy(&logits, &targets)
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        log_sum_exps: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex::cross_entropy_backward(&logits, &targets, &log_sum_exps, &gradient)
    }

    fn forward_kl_forward(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex::forward_kl(&student, &teacher, inverse_temperature)
    }

    fn forward_kl_backward(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        student_lse: FloatTensor<Self>,
        teacher_lse: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        flex::forward_kl_backward(
            &student,
            &teacher,
            &student_lse,
            &teacher_lse,
            &gradient,
            inverse_temperature,
        )
    }

    fn sparse_forward_kl_forward(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex::sparse_forward_kl(&student, &ids, &teacher, inverse_temperature)
    }

    fn sparse_forward_kl_backward(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        student_lse: FloatTensor<Self>,
        student_rest_lse: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        flex::sparse_forward_kl_backward(
            &student,
            &ids,
            &teacher,
            &student_lse,
            &student_rest_lse,
            &gradient,
            inverse_temperature,
        )
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        flex::matmul(&lhs, &rhs)
    }

    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        flex::swiglu(&gate, &up)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::swiglu_backward(&gate, &up, &gradient)
    }

    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::rms_norm(&x, &gain, eps)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        inverse_rms: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::rms_norm_backward(&x, &gain, &inverse_rms, &gradient)
    }

    fn attention_forward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex::causal_attention(&query, &key, &value)
    }

    fn attention_backward(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        probabilities: FloatTensor<Self>,
        gradient: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex::causal_attention_backward(&query, &key, &value, &probabilities, &gradient)
    }

    fn dropout_forward(x: FloatTensor<Self>, probability: f32, seed: u64) -> FloatTensor<Self> {
        flex::dropout(&x, probability, seed)
    }

    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        flex::rotary(&x, &cos, &sin_signed, start)
    }

    fn rotary_backward(
        gradient: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        flex::rotary_backward(&gradient, &cos, &sin_signed, start)
    }
}

impl FusedInferenceOps for Flex {
    fn fused_head_scores(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        flex::head_scores(&hidden, &weight, &targets)
    }

    fn fused_rows_times_matrix(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        flex::rows_times_matrix(&x, &weight)
    }
}

impl FusedOptimizerOps for Flex {
    fn fused_adamw(
        tensors: AdamWTensors<Self>,
        gradient: FloatTensor<Self>,
        step: AdamWStep,
    ) -> AdamWTensors<Self> {
        let (parameter, first, second) = flex::adamw(
            tensors.parameter,
            &gradient,
            tensors.first,
            tensors.second,
            &step,
        );
        AdamWTensors {
            parameter,
            first,
            second,
        }
    }
}

impl FusedOps for Flex {
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::cross_entropy_forward(logits, targets).0
    }

    fn fused_forward_kl(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        Self::forward_kl_forward(student, teacher, inverse_temperature).0
    }

    fn fused_sparse_forward_kl(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        Self::sparse_forward_kl_forward(student, ids, teacher, inverse_temperature).0
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::swiglu_forward(gate, up)
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, gain, eps).0
    }

    fn fused_causal_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::attention_forward(query, key, value).0
    }

    fn fused_dropout(x: FloatTensor<Self>, probability: f32, seed: u64) -> FloatTensor<Self> {
        Self::dropout_forward(x, probability, seed)
    }

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::matmul(x, weight)
    }

    fn fused_head_losses(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        ce_scales: FloatTensor<Self>,
        teacher: HeadTeacherTensors<Self>,
        kl_scales: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = Self::head_losses_forward(
            hidden,
            weight,
            targets,
            ce_scales,
            teacher,
            kl_scales,
            inverse_temperature,
            HeadRequests {
                hidden_gradient: false,
                weight_gradient: false,
                predictions: false,
            },
        );
        (outputs.total, outputs.cross_entropy, outputs.divergence)
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        Self::rotary_forward(x, cos, sin_signed, start)
    }
}

/// Registers each computed gradient with its parent node, when that parent wants one.
macro_rules! register_gradients {
    ($grads:expr, $backend:ty, $parents:expr, [$($gradient:expr),+]) => {
        for (parent, gradient) in $parents.into_iter().zip([$($gradient),+]) {
            if let Some(node) = parent {
                $grads.register::<$backend>(node.id, gradient);
            }
        }
    };
}

impl<B: FusedKernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropy;

        impl<B: FusedKernels> Backward<B, 1> for CrossEntropy {
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (logits, targets, log_sum_exps) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |gradient| {
                    B::cross_entropy_backward(logits, targets, log_sum_exps, gradient)
                });
            }
        }

        match CrossEntropy
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let (losses, log_sum_exps) =
                    B::cross_entropy_forward(logits.clone(), targets.clone());
                prep.finish((logits, targets, log_sum_exps), losses)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::cross_entropy_forward(logits.into_primitive(), targets).0)
            }
        }
    }

    fn fused_forward_kl(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ForwardKl(f32);

        impl<B: FusedKernels> Backward<B, 2> for ForwardKl {
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (student, teacher, student_lse, teacher_lse) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                // The teacher's logits are targets: only the student receives a gradient.
                let [student_parent, _] = ops.parents;
                if let Some(node) = student_parent {
                    let student_gradient = B::forward_kl_backward(
                        student,
                        teacher,
                        student_lse,
                        teacher_lse,
                        gradient,
                        self.0,
                    );
                    grads.register::<B>(node.id, student_gradient);
                }
            }
        }

        match ForwardKl(inverse_temperature)
            .prepare::<C>([student.node(), teacher.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (student, teacher) = (student.into_primitive(), teacher.into_primitive());
                let (losses, student_lse, teacher_lse) =
                    B::forward_kl_forward(student.clone(), teacher.clone(), inverse_temperature);
                prep.finish((student, teacher, student_lse, teacher_lse), losses)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::forward_kl_forward(
                    student.into_primitive(),
                    teacher.into_primitive(),
                    inverse_temperature,
                )
                .0,
            ),
        }
    }

    fn fused_sparse_forward_kl(
        student: FloatTensor<Self>,
        ids: IntTensor<Self>,
        teacher: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SparseForwardKl(f32);

        impl<B: FusedKernels> Backward<B, 2> for SparseForwardKl {
            type State = (
                FloatTensor<B>,
                IntTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (student, ids, teacher, student_lse, student_rest_lse) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                // The teacher's log-probabilities are targets: only the student receives a
                // gradient.
                let [student_parent, _] = ops.parents;
                if let Some(node) = student_parent {
                    let student_gradient = B::sparse_forward_kl_backward(
                        student,
                        ids,
                        teacher,
                        student_lse,
                        student_rest_lse,
                        gradient,
                        self.0,
                    );
                    grads.register::<B>(node.id, student_gradient);
                }
            }
        }

        match SparseForwardKl(inverse_temperature)
            .prepare::<C>([student.node(), teacher.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (student, teacher) = (student.into_primitive(), teacher.into_primitive());
                let (losses, student_lse, student_rest_lse) = B::sparse_forward_kl_forward(
                    student.clone(),
                    ids.clone(),
                    teacher.clone(),
                    inverse_temperature,
                );
                prep.finish(
                    (student, ids, teacher, student_lse, student_rest_lse),
                    losses,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::sparse_forward_kl_forward(
                    student.into_primitive(),
                    ids,
                    teacher.into_primitive(),
                    inverse_temperature,
                )
                .0,
            ),
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwiGlu;

        impl<B: FusedKernels> Backward<B, 2> for SwiGlu {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (gate, up) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                let (gate_gradient, up_gradient) = B::swiglu_backward(gate, up, gradient);
                register_gradients!(grads, B, ops.parents, [gate_gradient, up_gradient]);
            }
        }

        match SwiGlu
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let output = B::swiglu_forward(gate.clone(), up.clone());
                prep.finish((gate, up), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu_forward(
                gate.into_primitive(),
                up.into_primitive(),
            )),
        }
    }

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Linear;

        impl<B: FusedKernels> Backward<B, 2> for Linear {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, weight) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                // Each product only for a parent that wants its gradient: a frozen weight's
                // would cost as much as the forward product.
                let [x_parent, weight_parent] = ops.parents;
                if let Some(node) = x_parent {
                    let x_gradient = B::matmul(gradient.clone(), B::float_swap_dims(weight, 0, 1));
                    grads.register::<B>(node.id, x_gradient);
                }
                if let Some(node) = weight_parent {
                    let weight_gradient = B::matmul(B::float_swap_dims(x, 0, 1), gradient);
                    grads.register::<B>(node.id, weight_gradient);
                }
            }
        }

        match Linear
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let output = B::matmul(x.clone(), weight.clone());
                prep.finish((x, weight), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::matmul(x.into_primitive(), weight.into_primitive()))
            }
        }
    }

    fn fused_head_losses(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        ce_scales: FloatTensor<Self>,
        teacher: HeadTeacherTensors<Self>,
        kl_scales: FloatTensor<Self>,
        inverse_temperature: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        /// The gradients were taken in the forward pass, for a total that reaches the loss
        /// with a gradient of one; the backward pass scales them by the gradient that does.
        #[derive(Debug)]
        struct HeadBackward;

        impl<B: FusedKernels> Backward<B, 2> for HeadBackward {
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (hidden_gradient, weight_gradient) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                let [hidden_parent, weight_parent] = ops.parents;
                for (parent, parameter_gradient) in [
                    (hidden_parent, hidden_gradient),
                    (weight_parent, weight_gradient),
                ] {
                    if let (Some(node), Some(parameter_gradient)) = (parent, parameter_gradient) {
                        grads.register::<B>(
                            node.id,
                            B::scaled(parameter_gradient, gradient.clone()),
                        );
                    }
                }
            }
        }

        let requests = HeadRequests {
            hidden_gradient: hidden.is_tracked(),
            weight_gradient: weight.is_tracked(),
            predictions: false,
        };
        let teacher = match teacher {
            HeadTeacherTensors::Labels => HeadTeacherTensors::Labels,
            HeadTeacherTensors::Dense { hidden, weight } => HeadTeacherTensors::Dense {
                hidden: hidden.into_primitive(),
                weight: weight.into_primitive(),
            },
            HeadTeacherTensors::Sparse { ids, log_probs } => HeadTeacherTensors::Sparse {
                ids,
                log_probs: log_probs.into_primitive(),
            },
        };
        let prepared = HeadBackward
            .prepare::<C>([hidden.node(), weight.node()])
            .compute_bound()
            .stateful();
        let outputs = B::head_losses_forward(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            ce_scales.into_primitive(),
            teacher,
            kl_scales.into_primitive(),
            inverse_temperature,
            requests,
        );
        let total = match prepared {
            OpsKind::Tracked(prep) => prep.finish(
                (outputs.hidden_gradient, outputs.weight_gradient),
                outputs.total,
            ),
            OpsKind::UnTracked(prep) => prep.finish(outputs.total),
        };
        (
            total,
            <Self as AutodiffBackend>::from_inner(outputs.cross_entropy),
            <Self as AutodiffBackend>::from_inner(outputs.divergence),
        )
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;

        impl<B: FusedKernels> Backward<B, 2> for RmsNorm {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, gain, inverse_rms) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                let (x_gradient, gain_gradient) =
                    B::rms_norm_backward(x, gain, inverse_rms, gradient);
                register_gradients!(grads, B, ops.parents, [x_gradient, gain_gradient]);
            }
        }

        match RmsNorm
            .prepare::<C>([x.node(), gain.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gain) = (x.into_primitive(), gain.into_primitive());
                let (output, inverse_rms) = B::rms_norm_forward(x.clone(), gain.clone(), eps);
                prep.finish((x, gain, inverse_rms), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rms_norm_forward(x.into_primitive(), gain.into_primitive(), eps).0)
            }
        }
    }

    fn fused_causal_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;

        impl<B: FusedKernels> Backward<B, 3> for Attention {
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (query, key, value, probabilities) = ops.state;
                let gradient = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::attention_backward(query, key, value, probabilities, gradient);
                register_gradients!(grads, B, ops.parents, [dq, dk, dv]);
            }
        }

        match Attention
            .prepare::<C>([query.node(), key.node(), value.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (query, key, value) = (
                    query.into_primitive(),
                    key.into_primitive(),
                    value.into_primitive(),
                );
                let (output, probabilities) =
                    B::attention_forward(query.clone(), key.clone(), value.clone());
                prep.finish((query, key, value, probabilities), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::attention_forward(
                    query.into_primitive(),
                    key.into_primitive(),
                    value.into_primitive(),
                )
                .0,
            ),
        }
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin_signed: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Rotary;

        impl<B: FusedKernels> Backward<B, 1> for Rotary {
            type State = (FloatTensor<B>, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (cos, sin_signed, start) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |gradient| {
                    B::rotary_backward(gradient, cos, sin_signed, start)
                });
            }
        }

        // The tables are constants: only `x` is a parent.
        let (cos, sin_signed) = (cos.into_primitive(), sin_signed.into_primitive());
        match Rotary.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output =
                    B::rotary_forward(x.into_primitive(), cos.clone(), sin_signed.clone(), start);
                prep.finish((cos, sin_signed, start), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary_forward(
                x.into_primitive(),
                cos,
                sin_signed,
                start,
            )),
        }
    }

    fn fused_dropout(x: FloatTensor<Self>, probability: f32, seed: u64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Dropout;

        impl<B: FusedKernels> Backward<B, 1> for Dropout {
            type State = (f32, u64);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (probability, seed) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |gradient| {
                    B::dropout_forward(gradient, probability, seed)
                });
            }
        }

        match Dropout.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                (probability, seed),
                B::dropout_forward(x.into_primitive(), probability, seed),
            ),
            OpsKind::UnTracked(prep) => {
                prep.finish(B::dropout_forward(x.into_primitive(), probability, seed))
            }
        }
    }
}
