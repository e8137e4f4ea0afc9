//! Distillation as an objective of the shared training loop.

use burn::tensor::{Int, Tensor, TensorData};
use distillery_config::{DistillConfig, DistillLoss};
use distillery_data::ValidationWindows;
use distillery_kernels::HeadTeacher;
use distillery_model::Llama;
use distillery_train::loss::{
    LossTerms, cross_entropy, head_loss_terms, masked_mean, next_token_hits, next_token_loss,
};
use distillery_train::{
    MicroBatch, ObjectiveLoss, TrainError, batch_mask, batch_tensors, evaluate,
};

use crate::DistillError;
use crate::init::{TeacherStart, select_from_teacher, student_from_teacher};
use crate::losses::{distillation_divergence, distillation_loss, divergence_of_log_probs, mix};
use crate::teacher::Teacher;
use crate::teacher_cache::TeacherCacheReader;

pub struct DistillObjective {
    /// Validates, and teaches when no cache is given.
    teacher: Teacher,
    /// The teacher's top-k logits for each training micro-batch.
    cache: Option<TeacherCacheReader>,
    settings: DistillConfig,
    /// What a fresh student takes from the teacher; random initialization when `None`.
    start: Option<TeacherStart>,
}

impl DistillObjective {
    pub fn new(
        teacher: Teacher,
        cache: Option<TeacherCacheReader>,
        settings: DistillConfig,
        start: Option<TeacherStart>,
    ) -> Self {
        Self {
            teacher,
            cache,
            settings,
            start,
        }
    }

    /// The loss from the cached teacher: its distribution over `k + 1` outcomes (its top k
    /// tokens and the rest of the vocabulary), against the student's softmax summed the same
    /// way. The forward KL runs as one fused pass over the student's logits.
    fn cached_loss(
        &mut self,
        student: Tensor<3>,
        targets: Tensor<2, Int>,
        mask: Option<Tensor<2>>,
        micro_batch: u64,
    ) -> Result<ObjectiveLoss, DistillError> {
        let (ids, teacher) = self.cached_rows(micro_batch)?;
        let k = ids.dims()[1];
        let [batch, seq, vocab] = student.dims();
        let rows = batch * seq;
        let settings = &self.settings;
        let ce = cross_entropy(student.clone(), targets, mask.clone());
        let student = student.reshape([rows, vocab]);
        let kd =
            match settings.loss {
                DistillLoss::ForwardKl => masked_mean(
                    distillery_kernels::sparse_forward_kl_rows(
                        student,
                        ids,
                        teacher,
                        settings.temperature,
                    )
                    .reshape([batch, seq]),
                    mask,
                ),
                DistillLoss::ReverseKl | DistillLoss::Jsd => divergence_of_log_probs(
                    distillery_kernels::coarse_log_probs(student, ids, settings.temperature)
                        .reshape([batch, seq, k + 1]),
                    teacher.reshape([batch, seq, k + 1]),
                    settings,
                    mask,
                ),
            };
        let terms = mix(ce, kd, settings.alpha);
        Ok(ObjectiveLoss {
            total: terms.total,
            terms: vec![("train/ce", terms.ce), ("train/kd", terms.kd)],
        })
    }

    /// The cached teacher's rows of a micro-batch: token ids `[rows, k]` and the teacher's
    /// log-probabilities of their `k + 1` outcomes at the temperature `[rows, k + 1]`.
    fn cached_rows(
        &mut self,
        micro_batch: u64,
    ) -> Result<(Tensor<2, Int>, Tensor<2>), DistillError> {
        let cache = self.cache.as_mut().expect("called with a cache");
        let cached = cache.read(micro_batch)?;
        let k = cache.header().top_k;
        let rows = cached.ids.len() / k;
        let device = self.teacher.device();
        let ids: Vec<i64> = cached.ids.iter().map(|&id| i64::from(id)).collect();
        let ids = Tensor::from_data(TensorData::new(ids, [rows, k]), device);
        let log_probs = Tensor::from_data(
            TensorData::new(cached.log_probs(self.settings.temperature), [rows, k + 1]),
            device,
        );
        Ok((ids, log_probs))
    }

    /// A distillation error as the training loop reports it: at the cache's path, or else at
    /// the teacher's.
    fn train_error(&self, error: DistillError) -> TrainError {
        match error {
            DistillError::Cache { path, message } => TrainError::Path { path, message },
            other => TrainError::Path {
                path: self.teacher.directory().to_path_buf(),
                message: other.to_string(),
            },
        }
    }

    /// The forward-KL loss through the student's output head a chunk of positions at a time
    /// ([`head_loss_terms`]), the teacher's logits chunked alike (live) or read from the cache;
    /// `None` where that path does not apply (another divergence, or a quantized head).
    fn head_loss(
        &mut self,
        model: &Llama,
        inputs: &Tensor<2, Int>,
        targets: &Tensor<2, Int>,
        mask: &Option<Tensor<2>>,
        micro_batch: u64,
    ) -> Result<Option<LossTerms>, TrainError> {
        if self.settings.loss != DistillLoss::ForwardKl || model.float_head().is_none() {
            return Ok(None);
        }
        let teacher = if self.cache.is_some() {
            let (ids, log_probs) = self
                .cached_rows(micro_batch)
                .map_err(|error| self.train_error(error))?;
            HeadTeacher::Sparse { ids, log_probs }
        } else {
            match self.teacher.head_inputs(inputs.clone()) {
                Some((hidden, weight)) => HeadTeacher::Dense { hidden, weight },
                None => return Ok(None),
            }
        };
        Ok(head_loss_terms(
            model,
            inputs.clone(),
            targets.clone(),
            mask.clone(),
            teacher,
            self.settings.alpha,
            self.settings.temperature,
        ))
    }
}

impl distillery_train::Objective for DistillObjective {
    fn loss(&mut self, model: &Llama, batch: MicroBatch) -> Result<ObjectiveLoss, TrainError> {
        let MicroBatch {
            inputs,
            targets,
            mask,
            index,
        } = batch;
        if self.settings.labels_only() {
            // The teacher does not enter the loss, so it is not run.
            let ce = next_token_loss(model, inputs, targets, mask);
            return Ok(ObjectiveLoss {
                total: ce.clone(),
                terms: vec![("train/ce", ce)],
            });
        }
        if let Some(terms) = self.head_loss(model, &inputs, &targets, &mask, index)? {
            return Ok(ObjectiveLoss {
                total: terms.total,
                terms: vec![("train/ce", terms.ce), ("train/kd", terms.kd)],
            });
        }
        if self.cache.is_some() {
            return self
                .cached_loss(model.forward(inputs), targets, mask, index)
                .map_err(|error| self.train_error(error));
        }
        let teacher = self.teacher.logits(inputs.clone());
        let terms = distillation_loss(
            model.forward(inputs),
            teacher,
            targets,
            &self.settings,
            mask,
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
        let init = match &self.start {
            Some(start) => start.describe(),
            None => String::new(),
        };
        let source = match &self.cache {
            Some(cache) => format!(", top-{} logits cached", cache.header().top_k),
            None => String::new(),
        };
        let origin = match self.teacher.step() {
            Some(step) => format!("step {step}"),
            None if self.teacher.directory().is_file() => "GGUF file".into(),
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
        match &self.start {
            Some(start) => {
                let teacher = self.teacher.model();
                let selection = select_from_teacher(model.config(), teacher, start);
                student_from_teacher(model, teacher, &selection)
            }
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
        let mut agreeing = 0usize;
        let mut positions = 0usize;
        for batch in validation.batches(batch_size) {
            let device = self.teacher.device();
            let (inputs, _) = batch_tensors(&batch, device);
            let mask = batch_mask(&batch, device);
            let student = model.forward(inputs.clone());
            let teacher = self.teacher.logits(inputs);
            let divergence: f32 = distillation_divergence(
                student.clone(),
                teacher.clone(),
                &self.settings,
                mask.clone(),
            )
            .into_scalar();
            // Agreement is next-token accuracy against the teacher's top-1 tokens.
            let teacher_top: Tensor<2, Int> = teacher.argmax(2).squeeze_dim(2);
            let (agreeing_here, counted) = next_token_hits(student, teacher_top, mask);
            divergence_sum += f64::from(divergence) * counted as f64;
            agreeing += agreeing_here;
            positions += counted;
        }
        vec![
            ("val/kd", divergence_sum / positions as f64),
            ("val/teacher_agreement", agreeing as f64 / positions as f64),
        ]
    }
}
