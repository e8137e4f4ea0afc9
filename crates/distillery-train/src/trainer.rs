//! The training loop: one loop for every objective (next-token prediction here; distillation
//! plugs in its own [`Objective`]), with checkpoints, exact resume, validation and logging.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
use distillery_config::ExperimentConfig;
use distillery_data::{TokenSplits, ValidationWindows, WindowSampler};
use distillery_model::Llama;
use distillery_run::checkpoint::{self, BEST_DIR, BestValidation, Progress, RUN_CONFIG_FILE};
use distillery_run::seeds::{Stream, derive_seed};
use distillery_run::{RunData, device_for, prepare_data};

use crate::TrainError;
use crate::eval::{EvalMetrics, batch_mask, batch_tensors, evaluate};
use crate::loss::next_token_loss;
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWSettings};
use crate::progress::{Reporter, StepReport};
use crate::schedule::LrSchedule;

/// What the model is trained to minimize on one micro-batch.
pub struct ObjectiveLoss {
    /// A one-element loss tensor whose graph reaches the model's parameters.
    pub total: Tensor<1>,
    /// Named terms of the loss with their metric names (`train/ce`).
    pub terms: Vec<(&'static str, Tensor<1>)>,
}

/// One micro-batch of a run's window schedule, as tensors on the training device.
pub struct MicroBatch {
    /// `[batch, seq]` token ids.
    pub inputs: Tensor<2, Int>,
    /// `[batch, seq]`: the inputs shifted by one.
    pub targets: Tensor<2, Int>,
    /// `[batch, seq]`: 1 where a target counts in the loss, 0 where not; `None` when all count.
    pub mask: Option<Tensor<2>>,
    /// 0-based index in the schedule: `step * grad_accum + micro`.
    pub index: u64,
}

/// What a run trains its model to do. One training loop serves every objective.
pub trait Objective {
    /// The loss on one micro-batch of the run's window schedule.
    fn loss(&mut self, model: &Llama, batch: MicroBatch) -> Result<ObjectiveLoss, TrainError>;

    /// Identifies what the objective learns from beyond the config (a teacher's weights), so
    /// that a resumed run is refused when that changed.
    fn fingerprint(&self) -> Option<String> {
        None
    }

    /// A line for the run's log saying what the objective is made of.
    fn description(&self) -> Option<String> {
        None
    }

    /// The weights a fresh run starts from, given the freshly initialized `model`.
    fn initial_model(&self, model: Llama) -> Llama {
        model
    }

    /// Metrics logged once, at step 0 of a fresh run.
    fn start_metrics(
        &mut self,
        _validation: &ValidationWindows,
        _batch_size: usize,
    ) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// Metrics of `model` (in evaluation mode) logged next to the validation loss.
    fn validation_metrics(
        &mut self,
        _model: &Llama,
        _validation: &ValidationWindows,
        _batch_size: usize,
    ) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// Next-token cross-entropy on the corpus.
pub struct NextTokenObjective;

impl Objective for NextTokenObjective {
    fn loss(&mut self, model: &Llama, batch: MicroBatch) -> Result<ObjectiveLoss, TrainError> {
        let total = next_token_loss(model, batch.inputs, batch.targets, batch.mask);
        Ok(ObjectiveLoss {
            total,
            terms: Vec::new(),
        })
    }
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A new run; refused when the run already has checkpoints.
    Fresh,
    /// The run's newest complete checkpoint.
    Latest,
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    From(PathBuf),
}

pub struct TrainOptions {
    pub resume: Resume,
    /// Set (by a Ctrl-C handler) to stop after the current step, saving a checkpoint.
    pub interrupt: Arc<AtomicBool>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_validation: EvalMetrics,
    pub best: Option<BestValidation>,
    pub checkpoint_dir: PathBuf,
    /// Mean training throughput of this invocation.
    pub tokens_per_sec: f64,
}

#[derive(Debug, Clone)]
pub enum TrainOutcome {
    Completed(TrainSummary),
    /// Stopped by the interrupt flag after saving `checkpoint`.
    Interrupted {
        step: usize,
        checkpoint: PathBuf,
    },
}

/// Everything needed to take optimizer steps; shared by training and the throughput bench.
pub(crate) struct StepRunner<'a> {
    pub config: &'a ExperimentConfig,
    pub splits: &'a TokenSplits,
    pub autodiff_device: Device,
    pub schedule: LrSchedule,
    pub objective: &'a mut dyn Objective,
}

pub(crate) struct StepStats {
    pub loss: f64,
    /// The objective's named loss terms, averaged over the micro-batches.
    pub terms: Vec<(&'static str, f64)>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

impl StepRunner<'_> {
    /// Takes the optimizer step with 0-based index `step`.
    pub fn run(
        &mut self,
        mut model: Llama,
        optimizer: &mut AdamW,
        sampler: &mut WindowSampler,
        step: usize,
    ) -> Result<(Llama, StepStats), TrainError> {
        let train = &self.config.train;
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        let mut terms: Vec<(&'static str, f64)> = Vec::new();
        for micro in 0..train.grad_accum {
            let batch = sampler.next_batch(&self.splits.train, train.batch_size);
            let (inputs, targets) = batch_tensors(&batch, &self.autodiff_device);
            let mask = batch_mask(&batch, &self.autodiff_device);
            let micro_batch = (step * train.grad_accum + micro) as u64;
            model.set_dropout_seed(derive_seed(
                self.config.run.seed,
                Stream::Dropout,
                micro_batch,
            ));
            let loss = self.objective.loss(
                &model,
                MicroBatch {
                    inputs,
                    targets,
                    mask,
                    index: micro_batch,
                },
            )?;
            let scaled = loss.total.clone().div_scalar(train.grad_accum as f64);
            let grads = GradientsParams::from_grads(scaled.backward(), &model);
            accumulator.accumulate(&model, grads);
            loss_sum += f64::from(loss.total.into_scalar::<f32>());
            for (index, (name, term)) in loss.terms.into_iter().enumerate() {
                let value = f64::from(term.into_scalar::<f32>()) / train.grad_accum as f64;
                match terms.get_mut(index) {
                    Some((_, sum)) => *sum += value,
                    None => terms.push((name, value)),
                }
            }
        }
        let mut grads = accumulator.grads();
        let lr = self.schedule.lr(step);
        let (model, update) = optimizer.step(model, &mut grads, lr, train.grad_clip);
        let stats = StepStats {
            loss: loss_sum / train.grad_accum as f64,
            terms,
            lr,
            grad_norm: update.grad_norm,
            tokens: train.grad_accum * train.batch_size * self.config.data.seq_len,
        };
        Ok((model, stats))
    }
}

/// Writes `model` as the step-0 checkpoint a run of `config` would start from (fresh optimizer
/// moments, the run's first data order), so imported weights can be evaluated, distilled from,
/// exported, or trained further with `--resume PATH`.
pub fn write_initial_checkpoint(
    config: &ExperimentConfig,
    model: &Llama,
    tokenizer_sha256: &str,
    destination: &std::path::Path,
) -> Result<(), TrainError> {
    let progress = Progress::new(
        0,
        0,
        WindowSampler::new(
            derive_seed(config.run.seed, Stream::DataOrder, 0),
            config.data.seq_len,
        ),
        None,
        config,
        tokenizer_sha256,
        None,
    );
    let optimizer = AdamW::new(adamw_settings(config));
    checkpoint::write_checkpoint(
        destination,
        model,
        &|path| optimizer.save(path),
        config,
        progress,
    )?;
    Ok(())
}

pub(crate) fn adamw_settings(config: &ExperimentConfig) -> AdamWSettings {
    AdamWSettings {
        beta1: config.train.beta1,
        beta2: config.train.beta2,
        eps: config.train.eps,
        weight_decay: config.train.weight_decay,
    }
}

pub(crate) fn schedule(config: &ExperimentConfig) -> LrSchedule {
    LrSchedule {
        peak: config.train.lr,
        floor: config.train.min_lr,
        warmup_steps: config.train.warmup_steps,
        total_steps: config.train.steps,
    }
}

/// The state a run continues from.
struct StartState {
    model: Llama,
    optimizer: AdamW,
    sampler: WindowSampler,
    step: usize,
    tokens_seen: u64,
    best: Option<BestValidation>,
    resumed_from: Option<PathBuf>,
}

fn start_state(
    config: &ExperimentConfig,
    data: &RunData,
    resume: &Resume,
    device: &Device,
    objective: &dyn Objective,
) -> Result<StartState, TrainError> {
    let run_dir = config.run_checkpoint_dir();
    let source = match resume {
        Resume::Fresh => {
            if checkpoint::latest_checkpoint(&run_dir)?.is_some() {
                return Err(TrainError::Path {
                    path: run_dir,
                    message: "already holds checkpoints of this run; pass --resume to \
                              continue it, or choose another run.name"
                        .into(),
                });
            }
            let model = objective.initial_model(Llama::new(
                &data.llama,
                config.model.dropout,
                derive_seed(config.run.seed, Stream::Init, 0),
                device,
            )?);
            return Ok(StartState {
                model,
                optimizer: AdamW::new(adamw_settings(config)),
                sampler: WindowSampler::new(
                    derive_seed(config.run.seed, Stream::DataOrder, 0),
                    config.data.seq_len,
                ),
                step: 0,
                tokens_seen: 0,
                best: None,
                resumed_from: None,
            });
        }
        Resume::Latest => {
            checkpoint::latest_checkpoint(&run_dir)?.ok_or_else(|| TrainError::Path {
                path: run_dir.clone(),
                message: "holds no checkpoint to resume from".into(),
            })?
        }
        Resume::From(path) => checkpoint::resolve_checkpoint(path)?,
    };

    let progress = checkpoint::read_progress(&source)?;
    if progress.trajectory_sha256 != config.trajectory_sha256() {
        let saved_path = source.join(RUN_CONFIG_FILE);
        let differences = distillery_config::load(&saved_path, &[])
            .map(|saved| saved.trajectory_differences(config).join("; "))
            .unwrap_or_else(|error| format!("(cannot read the saved config: {error})"));
        return Err(TrainError::Path {
            path: source,
            message: format!(
                "was written with different settings, so resuming would not continue the same \
                 run: {differences}"
            ),
        });
    }
    distillery_run::check_trained_tokenizer(config, &source, &progress, &data.tokenizer)?;
    if progress.objective_fingerprint != objective.fingerprint() {
        return Err(TrainError::Path {
            path: source,
            message: format!(
                "was trained against {}, this run against {}: resuming would not continue \
                 the same run",
                describe_fingerprint(progress.objective_fingerprint.as_deref()),
                describe_fingerprint(objective.fingerprint().as_deref()),
            ),
        });
    }
    let model = checkpoint::load_model(&source, Some(&data.llama), config.model.dropout, device)?;
    let optimizer = AdamW::load(
        adamw_settings(config),
        &source.join(checkpoint::OPTIMIZER_FILE),
        &model,
        device,
    )?;
    Ok(StartState {
        model,
        optimizer,
        sampler: progress.sampler,
        step: progress.step,
        tokens_seen: progress.tokens_seen,
        best: progress.best,
        resumed_from: Some(source),
    })
}

/// Trains `config`'s model with `objective`.
pub fn train(
    config: &ExperimentConfig,
    options: &TrainOptions,
    objective: &mut dyn Objective,
) -> Result<TrainOutcome, TrainError> {
    let device = device_for(&config.run)?;
    let data = prepare_data(config)?;
    let start = start_state(config, &data, &options.resume, &device, objective)?;
    let run_dir = config.run_checkpoint_dir();
    let experiment_dir = config.run_experiment_dir();
    let resume_step = start.resumed_from.as_ref().map(|_| start.step);
    let mut metrics = MetricsLog::open(&experiment_dir, config.log.tensorboard, resume_step)?;
    distillery_data::write_atomically(
        &experiment_dir.join("config.toml"),
        config.to_toml().as_bytes(),
    )?;
    std::fs::create_dir_all(&run_dir).map_err(|error| TrainError::Path {
        path: run_dir.clone(),
        message: error.to_string(),
    })?;
    checkpoint::tidy(&run_dir)?;

    let total_steps = config.train.steps;
    let reporter = Reporter::new(start.step, total_steps, config.log.every);
    reporter.note(&format!(
        "run {}: {} parameters, {} training / {} validation tokens ({})",
        config.run.name,
        data.llama.num_parameters(),
        data.splits.train.len(),
        data.splits.validation.len(),
        data.cache_note,
    ));
    if let Some(description) = objective.description() {
        reporter.note(&description);
    }
    match &start.resumed_from {
        Some(path) => reporter.note(&format!(
            "resumed from {} at step {}",
            path.display(),
            start.step
        )),
        None => reporter.note(&format!(
            "starting at step 0: no checkpoint of this run in {}",
            run_dir.display()
        )),
    }

    let autodiff_device = device.clone().autodiff();
    let validation = ValidationWindows::new(
        data.splits.validation.clone(),
        config.data.seq_len,
        config.eval.max_windows,
    );
    let mut runner = StepRunner {
        config,
        splits: &data.splits,
        autodiff_device,
        schedule: schedule(config),
        objective,
    };
    let fresh_run = start.resumed_from.is_none();
    let StartState {
        model,
        mut optimizer,
        mut sampler,
        step: first_step,
        mut tokens_seen,
        mut best,
        ..
    } = start;
    if fresh_run {
        let initial = runner
            .objective
            .start_metrics(&validation, config.eval_batch_size());
        if !initial.is_empty() {
            metrics.log(0, &initial)?;
            reporter.note(&describe_metrics(&initial));
        }
    }
    let mut model = model.train();
    let started = Instant::now();
    let mut tokens_this_run = 0usize;
    let mut last_validation = None;
    let mut step = first_step;
    while step < total_steps {
        let step_started = Instant::now();
        let (updated, stats) = runner.run(model, &mut optimizer, &mut sampler, step)?;
        model = updated;
        step += 1;
        tokens_seen += stats.tokens as u64;
        tokens_this_run += stats.tokens;
        let tokens_per_sec = stats.tokens as f64 / step_started.elapsed().as_secs_f64();
        let mut step_metrics = vec![("train/loss", stats.loss)];
        step_metrics.extend(stats.terms.iter().copied());
        step_metrics.extend([
            ("train/lr", stats.lr),
            ("train/grad_norm", stats.grad_norm),
            ("train/tokens_per_sec", tokens_per_sec),
        ]);
        metrics.log(step, &step_metrics)?;
        reporter.step(&StepReport {
            step,
            loss: stats.loss,
            lr: stats.lr,
            tokens_per_sec,
        });
        if !stats.loss.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: stats.loss,
            });
        }

        let interrupted = options.interrupt.load(Ordering::SeqCst);
        let finished = step == total_steps;
        let mut improved = false;
        if step.is_multiple_of(config.eval.every) || finished {
            let evaluated = model.valid();
            let result = evaluate(&evaluated, &validation, config.eval_batch_size(), &device);
            let extra = runner.objective.validation_metrics(
                &evaluated,
                &validation,
                config.eval_batch_size(),
            );
            let mut validation_metrics = vec![
                ("val/loss", result.loss),
                ("val/ppl", result.perplexity),
                ("val/accuracy", result.accuracy),
            ];
            validation_metrics.extend(extra.iter().copied());
            metrics.log(step, &validation_metrics)?;
            let mut note = format!(
                "step {step}: validation loss {:.4}, perplexity {:.2}, accuracy {:.4}",
                result.loss, result.perplexity, result.accuracy
            );
            if !extra.is_empty() {
                note.push_str(", ");
                note.push_str(&describe_metrics(&extra));
            }
            reporter.note(&note);
            if best.is_none_or(|best| result.loss < best.loss) {
                best = Some(BestValidation {
                    loss: result.loss,
                    step,
                });
                improved = true;
            }
            last_validation = Some((step, result));
        }
        if step.is_multiple_of(config.log.every) {
            metrics.flush()?;
        }

        let checkpoint_due =
            step.is_multiple_of(config.checkpoint.every) || finished || interrupted;
        if checkpoint_due || improved {
            metrics.flush()?;
            let progress = Progress::new(
                step,
                tokens_seen,
                sampler.clone(),
                best,
                config,
                data.tokenizer.sha256(),
                runner.objective.fingerprint(),
            );
            let step_dir = run_dir.join(checkpoint::step_dir_name(step));
            if checkpoint_due {
                checkpoint::write_checkpoint(
                    &step_dir,
                    &model,
                    &|path| optimizer.save(path),
                    config,
                    progress,
                )?;
                checkpoint::prune(&run_dir, config.checkpoint.keep)?;
                if improved {
                    checkpoint::copy_checkpoint(&step_dir, &run_dir.join(BEST_DIR))?;
                }
            } else {
                checkpoint::write_checkpoint(
                    &run_dir.join(BEST_DIR),
                    &model,
                    &|path| optimizer.save(path),
                    config,
                    progress,
                )?;
            }
            if interrupted && !finished {
                reporter.finish();
                return Ok(TrainOutcome::Interrupted {
                    step,
                    checkpoint: step_dir,
                });
            }
        }
    }
    reporter.finish();
    metrics.flush()?;

    let final_validation = match last_validation {
        Some((at, result)) if at == step => result,
        _ => evaluate(
            &model.valid(),
            &validation,
            config.eval_batch_size(),
            &device,
        ),
    };
    let elapsed = started.elapsed().as_secs_f64();
    Ok(TrainOutcome::Completed(TrainSummary {
        steps: step,
        final_validation,
        best,
        checkpoint_dir: run_dir,
        tokens_per_sec: if tokens_this_run > 0 {
            tokens_this_run as f64 / elapsed
        } else {
            0.0
        },
    }))
}

/// `name value` pairs for the log, e.g. `val/kd 0.4210, val/teacher_agreement 0.6120`.
fn describe_metrics(metrics: &[(&str, f64)]) -> String {
    metrics
        .iter()
        .map(|(name, value)| format!("{name} {value:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_fingerprint(fingerprint: Option<&str>) -> String {
    fingerprint.map_or_else(|| "nothing beyond its config".into(), str::to_string)
}
