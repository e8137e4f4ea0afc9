//! Knowledge distillation: a frozen teacher's temperature-softened predictions teach a smaller
//! student inside the shared training loop.

pub mod init;
pub mod losses;
mod objective;
pub mod teacher;
pub mod teacher_cache;

use std::path::PathBuf;

use distillery_config::{ExperimentConfig, StudentInit, TeacherSource};
use distillery_run::{
    CheckpointError, RunData, RunError, calibration_windows, device_for, prepare_data,
};
use distillery_train::{TrainError, TrainOptions, TrainOutcome};

use crate::teacher_cache::{TeacherCacheHeader, TeacherCacheReader};

pub use objective::DistillObjective;
pub use teacher::Teacher;

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// The config cannot drive a distillation run; `key` names the setting at fault.
    #[error("{origin}: `{key}`: {message}")]
    Config {
        origin: String,
        key: String,
        message: String,
    },
    #[error("teacher {}: {message}", path.display())]
    Teacher { path: PathBuf, message: String },
    #[error("teacher cache {}: {message}", path.display())]
    Cache { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// The run's shared errors reach a distillation as they reach training.
impl From<RunError> for DistillError {
    fn from(error: RunError) -> Self {
        Self::Train(TrainError::Run(error))
    }
}

/// The teacher and distillation settings of `config`, checked against the student;
/// `origin` names the config in errors.
pub fn objective_for(
    config: &ExperimentConfig,
    origin: &str,
) -> Result<DistillObjective, DistillError> {
    objective_with_data(config, origin, &prepare_data(config)?)
}

/// [`objective_for`] with the run's data already prepared.
fn objective_with_data(
    config: &ExperimentConfig,
    origin: &str,
    data: &RunData,
) -> Result<DistillObjective, DistillError> {
    let config_error = |key: &str, message: String| DistillError::Config {
        origin: origin.to_string(),
        key: key.to_string(),
        message,
    };
    let teacher_config = config.teacher.as_ref().ok_or_else(|| {
        config_error(
            "teacher",
            "is missing: distillation needs a [teacher] section with `checkpoint`".into(),
        )
    })?;
    let student = &data.llama;
    let teacher = Teacher::load(
        teacher_config,
        &data.tokenizer,
        student,
        &device_for(&config.run).map_err(TrainError::from)?,
    )?;
    let student_settings = config.student.clone().unwrap_or_default();
    let start = match student_settings.init {
        StudentInit::Random => None,
        StudentInit::FromTeacher => {
            let teacher_shape = teacher.model().config();
            let layers = student_settings.teacher_layers.unwrap_or_else(|| {
                init::default_teacher_layers(
                    teacher_shape.num_hidden_layers,
                    student.num_hidden_layers,
                )
            });
            init::check_from_teacher(student, teacher_shape, &layers)
                .map_err(|message| config_error("student.init", message))?;
            let calibration = if init::is_narrower(student, teacher_shape) {
                calibration_windows(
                    &data.splits.train,
                    init::TeacherStart::CALIBRATION_WINDOWS,
                    config.data.seq_len,
                    config.run.seed,
                )
            } else {
                Vec::new()
            };
            Some(init::TeacherStart {
                layers,
                calibration,
                seq_len: config.data.seq_len,
            })
        }
    };
    let settings = config.distill.clone().unwrap_or_default();
    let cache = match settings.teacher {
        TeacherSource::Live => None,
        TeacherSource::Cached => {
            let header = TeacherCacheHeader::for_run(config, data, &teacher);
            Some(TeacherCacheReader::open(
                &teacher_cache::cache_path(config, data, &teacher),
                &header,
            )?)
        }
    };
    Ok(DistillObjective::new(teacher, cache, settings, start))
}

/// A run's teacher cache, and whether [`write_teacher_cache`] found it already written.
pub struct PreparedTeacherCache {
    pub path: PathBuf,
    pub header: TeacherCacheHeader,
    pub reused: bool,
}

/// Runs `config`'s teacher over every training window of `config`'s run and writes its top-k
/// logits to the run's teacher cache; `progress` hears `(done, total)` micro-batches. A cache
/// already written for exactly this run is kept: building one for a real teacher takes many
/// minutes, and the header pins everything its logits depend on.
pub fn write_teacher_cache(
    config: &ExperimentConfig,
    origin: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PreparedTeacherCache, DistillError> {
    let teacher_config = config
        .teacher
        .as_ref()
        .ok_or_else(|| DistillError::Config {
            origin: origin.to_string(),
            key: "teacher".into(),
            message: "is missing: a teacher cache needs a [teacher] section with `checkpoint`"
                .into(),
        })?;
    let data = prepare_data(config)?;
    let teacher = Teacher::load(
        teacher_config,
        &data.tokenizer,
        &data.llama,
        &device_for(&config.run).map_err(TrainError::from)?,
    )?;
    let header = TeacherCacheHeader::for_run(config, &data, &teacher);
    let path = teacher_cache::cache_path(config, &data, &teacher);
    let reused =
        TeacherCacheReader::open(&path, &header).is_ok_and(|cache| cache.header() == &header);
    if !reused {
        let total = header.micro_batches;
        teacher_cache::build(&path, &header, &data, &teacher, &mut |done| {
            progress(done, total)
        })?;
    }
    Ok(PreparedTeacherCache {
        path,
        header,
        reused,
    })
}

/// Trains `config`'s student against its teacher in the shared training loop.
pub fn distill(
    config: &ExperimentConfig,
    origin: &str,
    options: &TrainOptions,
) -> Result<TrainOutcome, DistillError> {
    let mut objective = objective_for(config, origin)?;
    Ok(distillery_train::train(config, options, &mut objective)?)
}

/// How a checkpoint's predictions compare with `config`'s teacher on the validation split.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TeacherComparison {
    /// The configured divergence from the teacher (`val/kd`).
    pub kd: f64,
    /// Share of validation positions where the checkpoint's top-1 token is the teacher's.
    pub teacher_agreement: f64,
}

pub fn compare_with_teacher(
    config: &ExperimentConfig,
    origin: &str,
    checkpoint: &std::path::Path,
) -> Result<TeacherComparison, DistillError> {
    let data = prepare_data(config)?;
    let mut objective = objective_with_data(config, origin, &data)?;
    let (_, _, model) = distillery_run::load_for_inference(config, checkpoint, &data.tokenizer)?;
    let windows = distillery_data::ValidationWindows::new(
        data.splits.validation.clone(),
        config.data.seq_len,
        config.eval.max_windows,
    );
    let metrics = distillery_train::Objective::validation_metrics(
        &mut objective,
        &model,
        &windows,
        config.eval_batch_size(),
    );
    let value = |name: &str| {
        metrics
            .iter()
            .find(|(metric, _)| *metric == name)
            .map_or(f64::NAN, |(_, value)| *value)
    };
    Ok(TeacherComparison {
        kd: value("val/kd"),
        teacher_agreement: value("val/teacher_agreement"),
    })
}
