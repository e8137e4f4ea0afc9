//! The training loop: one loop for every objective (next-token prediction here; distillation
//! plugs in its own [`Objective`]), with checkpoints, exact resume, validation and logging.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
use distillery_config::ExperimentConfig;
use distillery_data::{TokenSplits, ValidationWindows, WindowSampler};
use distillery_model::Llama;

use crate::checkpoint::{
    self, BEST_DIR, BestValidation, CheckpointError, Progress, RUN_CONFIG_FILE,
};
use crate::eval::{EvalMetrics, batch_tensors, evaluate};
use crate::loss::cross_entropy;
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWSettings};
use crate::report::{Reporter, StepReport};
use crate::schedule::LrSchedule;
use crate::seeds::{Stream, derive_seed};
use crate::{RunData, TrainError, device_for, prepare_data};

/// What the model is trained to minimize on one micro-batch.
pub trait Objective {
    /// A one-element loss tensor whose graph reaches `model`'s parameters.
    fn loss(&mut self, model: &Llama, inputs: Tensor<2, Int>, targets: Tensor<2, Int>)
    -> Tensor<1>;
}

/// Next-token cross-entropy on the corpus.
pub struct NextTokenObjective;

impl Objective for NextTokenObjective {
    fn loss(
        &mut self,
        model: &Llama,
        inputs: Tensor<2, Int>,
        targets: Tensor<2, Int>,
    ) -> Tensor<1> {
        cross_entropy(model.forward(inputs), targets)
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
    ) -> (Llama, StepStats) {
        let train = &self.config.train;
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        for micro in 0..train.grad_accum {
            let batch = sampler.next_batch(&self.splits.train, train.batch_size);
            let (inputs, targets) = batch_tensors(&batch, &self.autodiff_device);
            let dropout_index = (step * train.grad_accum + micro) as u64;
            model.set_dropout_seed(derive_seed(
                self.config.run.seed,
                Stream::Dropout,
                dropout_index,
            ));
            let loss = self.objective.loss(&model, inputs, targets);
            let scaled = loss.clone().div_scalar(train.grad_accum as f64);
            let grads = GradientsParams::from_grads(scaled.backward(), &model);
            accumulator.accumulate(&model, grads);
            loss_sum += f64::from(loss.into_scalar::<f32>());
        }
        let mut grads = accumulator.grads();
        let lr = self.schedule.lr(step);
        let (model, update) = optimizer.step(model, &mut grads, lr, train.grad_clip);
        let stats = StepStats {
            loss: loss_sum / train.grad_accum as f64,
            lr,
            grad_norm: update.grad_norm,
            tokens: train.grad_accum * train.batch_size * self.config.data.seq_len,
        };
        (model, stats)
    }
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

/// The newest complete checkpoint of a run: its newest step directory or `best/`, whichever
/// is further along.
fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let newest_step = checkpoint::step_checkpoints(run_dir)?.pop();
    let best = run_dir.join(BEST_DIR);
    if best.exists() {
        let best_step = checkpoint::read_progress(&best)?.step;
        // `best/` is a copy of a step directory when they share a step; prefer the original.
        if newest_step
            .as_ref()
            .is_none_or(|(step, _)| best_step > *step)
        {
            return Ok(Some(best));
        }
    }
    Ok(newest_step.map(|(_, path)| path))
}

fn start_state(
    config: &ExperimentConfig,
    data: &RunData,
    resume: &Resume,
    device: &Device,
) -> Result<StartState, TrainError> {
    let run_dir = config.run_checkpoint_dir();
    let source = match resume {
        Resume::Fresh => {
            if latest_checkpoint(&run_dir)?.is_some() {
                return Err(TrainError::Run {
                    path: run_dir,
                    message: "already holds checkpoints of this run; pass --resume to \
                              continue it, or choose another run.name"
                        .into(),
                });
            }
            let model = Llama::new(
                &data.llama,
                config.model.dropout,
                derive_seed(config.run.seed, Stream::Init, 0),
                device,
            )?;
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
        Resume::Latest => latest_checkpoint(&run_dir)?.ok_or_else(|| TrainError::Run {
            path: run_dir.clone(),
            message: "holds no checkpoint to resume from".into(),
        })?,
        Resume::From(path) => checkpoint::resolve_checkpoint(path)?,
    };

    let progress = checkpoint::read_progress(&source)?;
    if progress.trajectory_sha256 != config.trajectory_sha256() {
        let saved_path = source.join(RUN_CONFIG_FILE);
        let differences = distillery_config::load(&saved_path, &[])
            .map(|saved| saved.trajectory_differences(config).join("; "))
            .unwrap_or_else(|error| format!("(cannot read the saved config: {error})"));
        return Err(TrainError::Run {
            path: source,
            message: format!(
                "was written with different settings, so resuming would not continue the same \
                 run: {differences}"
            ),
        });
    }
    if progress.tokenizer_sha256 != data.tokenizer.sha256() {
        return Err(TrainError::Run {
            path: source,
            message: format!(
                "was trained with another tokenizer than {}",
                config.data.tokenizer.display()
            ),
        });
    }
    let model = checkpoint::load_model(&source, Some(&data.llama), config.model.dropout, device)?;
    let optimizer = checkpoint::load_optimizer(&source, adamw_settings(config), &model, device)?;
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
    let device = device_for(config.run.backend);
    let data = prepare_data(config)?;
    let start = start_state(config, &data, &options.resume, &device)?;
    let run_dir = config.run_checkpoint_dir();
    let experiment_dir = config.run_experiment_dir();
    let resume_step = start.resumed_from.as_ref().map(|_| start.step);
    let mut metrics = MetricsLog::open(&experiment_dir, config.log.tensorboard, resume_step)?;
    distillery_data::write_atomically(
        &experiment_dir.join("config.toml"),
        config.to_toml().as_bytes(),
    )?;
    std::fs::create_dir_all(&run_dir).map_err(|error| TrainError::Run {
        path: run_dir.clone(),
        message: error.to_string(),
    })?;
    checkpoint::tidy(&run_dir)?;

    let total_steps = config.train.steps;
    let reporter = Reporter::new(start.step, total_steps, config.log.every);
    reporter.note(&format!(
        "run {}: {} parameters, backend {}, {} training / {} validation tokens ({})",
        config.run.name,
        data.llama.num_parameters(),
        crate::backend_description(config.run.backend),
        data.splits.train.len(),
        data.splits.validation.len(),
        data.cache_note,
    ));
    match &start.resumed_from {
        Some(path) => reporter.note(&format!(
            "resumed from {} at step {}",
            path.display(),
            start.step
        )),
        None => reporter.note("starting from freshly initialized weights"),
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
    let StartState {
        model,
        mut optimizer,
        mut sampler,
        step: first_step,
        mut tokens_seen,
        mut best,
        ..
    } = start;
    let mut model = model.train();
    let started = Instant::now();
    let mut tokens_this_run = 0usize;
    let mut last_validation = None;
    let mut step = first_step;
    while step < total_steps {
        let step_started = Instant::now();
        let (updated, stats) = runner.run(model, &mut optimizer, &mut sampler, step);
        model = updated;
        step += 1;
        tokens_seen += stats.tokens as u64;
        tokens_this_run += stats.tokens;
        let tokens_per_sec = stats.tokens as f64 / step_started.elapsed().as_secs_f64();
        metrics.log(
            step,
            &[
                ("train/loss", stats.loss),
                ("train/lr", stats.lr),
                ("train/grad_norm", stats.grad_norm),
                ("train/tokens_per_sec", tokens_per_sec),
            ],
        )?;
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
            let result = evaluate(
                &model.valid(),
                &validation,
                config.eval_batch_size(),
                &device,
            );
            metrics.log(
                step,
                &[
                    ("val/loss", result.loss),
                    ("val/ppl", result.perplexity),
                    ("val/accuracy", result.accuracy),
                ],
            )?;
            reporter.note(&format!(
                "step {step}: validation loss {:.4}, perplexity {:.2}, accuracy {:.4}",
                result.loss, result.perplexity, result.accuracy
            ));
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
            );
            let step_dir = run_dir.join(checkpoint::step_dir_name(step));
            if checkpoint_due {
                checkpoint::write_checkpoint(&step_dir, &model, &optimizer, config, progress)?;
                checkpoint::prune(&run_dir, config.checkpoint.keep)?;
                if improved {
                    checkpoint::copy_checkpoint(&step_dir, &run_dir.join(BEST_DIR))?;
                }
            } else {
                checkpoint::write_checkpoint(
                    &run_dir.join(BEST_DIR),
                    &model,
                    &optimizer,
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
