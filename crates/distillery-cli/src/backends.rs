//! `distillery devices` and `distillery bench backend`: what a machine offers and whether a
//! backend computes what the cpu backend does, for a machine that has the binary but no
//! toolchain (the GPU bundle's check runs both).

use std::process::ExitCode;

use distillery_run::list_devices;
use distillery_train::{BackendCheck, check_against_cpu};

use crate::{ConfigArgs, print_report};

pub fn devices(json: bool) -> anyhow::Result<()> {
    let backends = list_devices();
    if json {
        println!("{}", serde_json::to_string_pretty(&backends)?);
        return Ok(());
    }
    for backend in backends {
        match backend.unavailable {
            Some(reason) => println!("{}: none ({reason})", backend.backend),
            None => {
                for (index, device) in backend.devices.iter().enumerate() {
                    println!("{} device {index}: {device}", backend.backend);
                }
            }
        }
    }
    Ok(())
}

pub fn check(config: &ConfigArgs, json: bool) -> anyhow::Result<ExitCode> {
    let config = config.load()?;
    let scratch = tempfile::tempdir()?;
    let check = check_against_cpu(&config, scratch.path())?;
    print_report(json, &check, |check| format!("{}\n", describe(check)))?;
    if check.failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: {} disagrees with cpu: {}",
        check.backend,
        check.failures.join("; ")
    );
    Ok(ExitCode::FAILURE)
}

fn describe(check: &BackendCheck) -> String {
    format!(
        "{} against cpu: logits differ by at most {:.2e}; after one training step the training \
         loss by {:.2e} ({:.6} vs {:.6}), the validation loss by {:.2e} ({:.6} vs {:.6}), the \
         weights by at most {:.2e} ({})",
        check.device,
        check.logit_difference,
        check.train_loss.difference(),
        check.train_loss.backend,
        check.train_loss.cpu,
        check.validation_loss.difference(),
        check.validation_loss.backend,
        check.validation_loss.cpu,
        check.weight_difference,
        check.weight_with_largest_difference,
    )
}
