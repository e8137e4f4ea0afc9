//! Progress on the terminal: an `indicatif` bar when stderr is a terminal, otherwise one plain
//! line every `log.every` steps (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_sec: f64,
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    total_steps: usize,
    plain_every: usize,
    started: std::time::Instant,
    start_step: usize,
}

impl Reporter {
    pub fn new(start_step: usize, total_steps: usize, plain_every: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total_steps as u64),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("the template is valid"),
            );
            bar.set_position(start_step as u64);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            bar,
            total_steps,
            plain_every,
            started: std::time::Instant::now(),
            start_step,
        }
    }

    pub fn step(&self, report: &StepReport) {
        let message = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            report.loss, report.lr, report.tokens_per_sec
        );
        match &self.bar {
            Some(bar) => {
                bar.set_message(message);
                bar.set_position(report.step as u64);
            }
            None if report.step.is_multiple_of(self.plain_every)
                || report.step == self.total_steps =>
            {
                let done = report.step - self.start_step;
                let elapsed = self.started.elapsed().as_secs_f64();
                let remaining = (self.total_steps - report.step) as f64 * elapsed / done as f64;
                eprintln!(
                    "step {}/{} {message} eta {}",
                    report.step,
                    self.total_steps,
                    format_duration(remaining)
                );
            }
            None => {}
        }
    }

    /// A line that stays visible above the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn format_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    format!(
        "{}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}
