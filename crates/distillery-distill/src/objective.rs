//! Distillation as an objective of the shared training loop.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use distillery_config::{DistillConfig, DistillLoss};
use distillery_data::ValidationWindows;
use distillery_model::Llama;
use distillery_train::{ObjectiveLoss, TrainError, batch_tensors, evaluate};

use crate::DistillError;
use crate::cache::{LEFT_OUT_LOGIT, TeacherCacheReader, dense_logits};
use crate::init::student_from_teacher;
use crate::losses::{cross_entropy, distillation_divergence, distillation_loss, mix, reverse_kl};
use crate::teacher::Teacher;

pub struct DistillObjective {
    /// Validates, and teaches when no cache is given.
    teacher: Teacher,
    /// The teacher's top-k logits for each training micro-batch.
    cache: Option<TeacherCacheReader>,
    settings: DistillConfig,
    /// Teacher layers a fresh student starts from; random initialization when `None`.
    init_layers: Option<Vec<usize>>,
}

impl DistillObjective {
    pub fn new(
        teacher: Teacher,
        cache: Option<TeacherCacheReader>,
        settings: DistillConfig,
        init_layers: Option<Vec<usize>>,
    ) -> Self {
        Self {
            teacher,
            cache,
            settings,
            init_layers,
        }
    }

    /// The loss from the cached top-k teacher logits. The teacher is renormalized over its k
    /// tokens. The forward KL reads them directly; the other divergences spread them over the
    /// vocabulary (the rest at [`LEFT_OUT_LOGIT`]), and the reverse KL renormalizes the
    /// student over the k tokens too, since outside the teacher's support it is unbounded.
    fn cached_loss(
        &mut self,
        student: Tensor<3>,
        targets: Tensor<2, Int>,
        micro_batch: u64,
    ) -> Result<ObjectiveLoss, DistillError> {
        let cache = self.cache.as_mut().expect("called with a cache");
        let (ids, logits) = cache.read(micro_batch)?;
        let k = cache.header().top_k;
        let [batch, seq, vocab] = student.dims();
        let device = self.teacher.device();
        let settings = &self.settings;
        let terms = match settings.loss {
            DistillLoss::ForwardKl => {
                let rows = batch * seq;
                let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, k]), device);
                let teacher = Tensor::<2>::from_data(TensorData::new(logits, [rows, k]), device);
                let ce = cross_entropy(student.clone(), targets, None);
                let kd = distillery_kernels::sparse_forward_kl_rows(
                    student.reshape([rows, vocab]),
                    ids,
                    teacher,
                    settings.temperature,
                )
                .mean();
                mix(ce, kd, settings.alpha)
            }
            DistillLoss::ReverseKl if k < vocab => {
                let dense = dense_logits(&ids, &logits, k, vocab);
                let left_out: Vec<bool> =
                    dense.iter().map(|&logit| logit == LEFT_OUT_LOGIT).collect();
                let left_out = Tensor::<3, Bool>::from_data(
                    TensorData::new(left_out, [batch, seq, vocab]),
                    &student.device(),
                );
                let teacher =
                    Tensor::<3>::from_data(TensorData::new(dense, [batch, seq, vocab]), device);
                let ce = cross_entropy(student.clone(), targets, None);
                let kd = reverse_kl(
                    student.mask_fill(left_out, LEFT_OUT_LOGIT),
                    teacher,
                    settings.temperature,
                    None,
                );
                mix(ce, kd, settings.alpha)
            }
            DistillLoss::ReverseKl | DistillLoss::Jsd => {
                let dense = dense_logits(&ids, &logits, k, vocab);
                let teacher =
                    Tensor::<3>::from_data(TensorData::new(dense, [batch, seq, vocab]), device);
                distillation_loss(student, teacher, targets, settings, None)
            }
        };
        Ok(ObjectiveLoss {
            total: terms.total,
            terms: vec![("train/ce", terms.ce), ("train/kd", terms.kd)],
        })
    }
}

impl distillery_train::Objective for DistillObjective {
    fn loss(
        &mut self,
        model: &Llama,
        inputs: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        micro_batch: u64,
    ) -> Result<ObjectiveLoss, TrainError> {
        if self.cache.is_some() {
            return self
                .cached_loss(model.forward(inputs), targets, micro_batch)
                .map_err(|error| match error {
                    DistillError::Cache { path, message } => TrainError::Run { path, message },
                    other => TrainError::Run {
                        path: self.teacher.directory().to_path_buf(),
                        message: other.to_string(),
                    },
                });
        }
        let teacher = self.teacher.logits(inputs.clone());
        let terms = distillation_loss(
            model.forward(inputs),
            teacher,
            targets,
            &self.settings,
            None,
        );
        Ok(ObjectiveLoss {
            total: terms.total,
            terms: vec![("train/ce", terms.ce), ("train/kd", terms.kd)],
        })
    }

    fn fingerprint(&self) -> Option<String> {
        Some(format!(
            "teacher weights sha256 {}",
            self.teacher.weights_sha256()
        ))
    }

    fn description(&self) -> Option<String> {
        let settings = &self.settings;
        let divergence = match settings.loss {
            DistillLoss::ForwardKl => "forward KL".to_string(),
            DistillLoss::ReverseKl => "reverse KL".to_string(),
            DistillLoss::Jsd => format!("JSD (beta {})", settings.beta),
        };
        let init = match &self.init_layers {
            Some(layers) => format!("; student starts from teacher layers {layers:?}"),
            None => String::new(),
        };
        let source = match &self.cache {
            Some(cache) => format!(", top-{} logits cached", cache.header().top_k),
            None => String::new(),
        };
        let origin = match self.teacher.step() {
            Some(step) => format!("step {step}"),
            None => "Hugging Face folder".into(),
        };
        Some(format!(
            "teacher {} ({origin}, {} parameters{source}); loss {:.2} x cross-entropy + {:.2} x {divergence} at temperature {}{init}",
            self.teacher.directory().display(),
            self.teacher.model().config().num_parameters(),
            1.0 - settings.alpha,
            settings.alpha,
            settings.temperature,
        ))
    }

    fn initial_model(&self, model: Llama) -> Llama {
        match &self.init_layers {
            Some(layers) => student_from_teacher(model, self.teacher.model(), layers),
            None => model,
        }
    }

    fn start_metrics(
        &mut self,
        validation: &ValidationWindows,
        batch_size: usize,
    ) -> Vec<(&'static str, f64)> {
        let metrics = evaluate(
            self.teacher.model(),
            validation,
            batch_size,
            self.teacher.device(),
        );
        vec![
            ("teacher/val_loss", metrics.loss),
            ("teacher/val_accuracy", metrics.accuracy),
        ]
    }

    fn validation_metrics(
        &mut self,
        model: &Llama,
        validation: &ValidationWindows,
        batch_size: usize,
    ) -> Vec<(&'static str, f64)> {
        let mut divergence_sum = 0.0;
        let mut agreeing = 0i64;
        let mut positions = 0usize;
        for batch in validation.batches(batch_size) {
            let (inputs, _) = batch_tensors(&batch, self.teacher.device());
            let student = model.forward(inputs.clone());
            let teacher = self.teacher.logits(inputs);
            let count = batch.batch_size * batch.seq_len;
            let divergence: f32 =
                distillation_divergence(student.clone(), teacher.clone(), &self.settings, None)
                    .into_scalar();
            divergence_sum += f64::from(divergence) * count as f64;
            agreeing += student
                .argmax(2)
                .equal(teacher.argmax(2))
                .int()
                .sum()
                .into_scalar::<i64>();
            positions += count;
        }
        vec![
            ("val/kd", divergence_sum / positions as f64),
            ("val/teacher_agreement", agreeing as f64 / positions as f64),
        ]
    }
}
