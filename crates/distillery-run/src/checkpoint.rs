//! Checkpoint directories: `step-NNNNNNN/` and `best/` under a run's checkpoint directory.
//!
//! Each holds the weights (`model.bpk`, burnpack, with their `config.json`), the optimizer
//! moments (`optimizer.bpk`), the resolved run config (`run.toml`) and, written last, the
//! progress record (`progress.json`) with the size and SHA-256 of every other file. A directory
//! is assembled under a temporary name and renamed into place, so a visible checkpoint is
//! always complete, and a damaged file is detected before anything is loaded from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use distillery_config::ExperimentConfig;
use distillery_data::WindowSampler;
use distillery_model::{Llama, LlamaConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MODEL_FILE: &str = "model.bpk";
pub const MODEL_CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
pub const RUN_CONFIG_FILE: &str = "run.toml";
pub const PROGRESS_FILE: &str = "progress.json";
pub const BEST_DIR: &str = "best";
const STEP_PREFIX: &str = "step-";
const FORMAT_VERSION: u32 = 1;

/// A problem with a checkpoint, naming the file or directory at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

impl CheckpointError {
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestValidation {
    pub loss: f64,
    pub step: usize,
}

/// Where a run stands after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub format_version: u32,
    pub step: usize,
    pub tokens_seen: u64,
    /// The training window sampler, random stream included.
    pub sampler: WindowSampler,
    pub best: Option<BestValidation>,
    /// Hash of the settings that decide the weights (see `ExperimentConfig::trajectory_sha256`).
    pub trajectory_sha256: String,
    pub tokenizer_sha256: String,
    /// What the objective learns from besides the config (a distillation teacher's weights);
    /// see the training objective's fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective_fingerprint: Option<String>,
    /// Size and hash of every other file in the directory.
    #[serde(default)]
    pub files: BTreeMap<String, FileDigest>,
}

impl Progress {
    pub fn new(
        step: usize,
        tokens_seen: u64,
        sampler: WindowSampler,
        best: Option<BestValidation>,
        config: &ExperimentConfig,
        tokenizer_sha256: &str,
        objective_fingerprint: Option<String>,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            tokens_seen,
            sampler,
            best,
            trajectory_sha256: config.trajectory_sha256(),
            tokenizer_sha256: tokenizer_sha256.to_string(),
            objective_fingerprint,
            files: BTreeMap::new(),
        }
    }
}

pub fn step_dir_name(step: usize) -> String {
    format!("{STEP_PREFIX}{step:07}")
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::file(path, error.to_string())
}

/// Writes a complete checkpoint to `destination`, replacing an older one there;
/// `save_optimizer` writes the optimizer's moments to the path it is given.
pub fn write_checkpoint(
    destination: &Path,
    model: &Llama,
    save_optimizer: &dyn Fn(&Path) -> Result<(), CheckpointError>,
    run_config: &ExperimentConfig,
    mut progress: Progress,
) -> Result<(), CheckpointError> {
    let staging = staging_dir(destination)?;
    model
        .clone()
        .save_file(staging.join(MODEL_FILE))
        .map_err(|error| CheckpointError::file(&staging.join(MODEL_FILE), error.to_string()))?;
    save_optimizer(&staging.join(OPTIMIZER_FILE))?;
    let model_config =
        serde_json::to_string_pretty(model.config()).expect("model configs serialize");
    write_file(&staging.join(MODEL_CONFIG_FILE), model_config.as_bytes())?;
    write_file(
        &staging.join(RUN_CONFIG_FILE),
        run_config.to_toml().as_bytes(),
    )?;
    for name in [
        MODEL_FILE,
        OPTIMIZER_FILE,
        MODEL_CONFIG_FILE,
        RUN_CONFIG_FILE,
    ] {
        progress
            .files
            .insert(name.to_string(), digest(&staging.join(name))?);
    }
    let record = serde_json::to_string_pretty(&progress).expect("progress serializes");
    write_file(&staging.join(PROGRESS_FILE), record.as_bytes())?;
    publish(&staging, destination)
}

/// Copies a verified checkpoint directory to `destination` (used for `best/`).
pub fn copy_checkpoint(source: &Path, destination: &Path) -> Result<(), CheckpointError> {
    let staging = staging_dir(destination)?;
    for entry in std::fs::read_dir(source).map_err(io_error(source))? {
        let entry = entry.map_err(io_error(source))?;
        let target = staging.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(io_error(&target))?;
    }
    publish(&staging, destination)
}

fn staging_dir(destination: &Path) -> Result<PathBuf, CheckpointError> {
    let parent = destination.parent().unwrap_or(Path::new("."));
    let name = destination
        .file_name()
        .map_or_else(|| "checkpoint".into(), |name| name.to_string_lossy());
    let staging = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_error(&staging))?;
    Ok(staging)
}

/// Moves a finished staging directory into place. An existing destination is first moved
/// aside, so at every moment either the old or the new checkpoint is complete on disk.
fn publish(staging: &Path, destination: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(staging).map_err(io_error(staging))? {
        let path = entry.map_err(io_error(staging))?.path();
        std::fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(io_error(&path))?;
    }
    let retired = destination.with_file_name(format!(
        ".old-{}",
        destination
            .file_name()
            .map_or_else(|| "checkpoint".into(), |name| name.to_string_lossy())
    ));
    if destination.exists() {
        if retired.exists() {
            std::fs::remove_dir_all(&retired).map_err(io_error(&retired))?;
        }
        std::fs::rename(destination, &retired).map_err(io_error(destination))?;
    }
    std::fs::rename(staging, destination).map_err(io_error(destination))?;
    if retired.exists() {
        std::fs::remove_dir_all(&retired).map_err(io_error(&retired))?;
    }
    if let Some(parent) = destination.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(parent))?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    std::fs::write(path, bytes).map_err(io_error(path))
}

fn digest(path: &Path) -> Result<FileDigest, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    Ok(FileDigest {
        bytes: bytes.len() as u64,
        sha256: Sha256::digest(&bytes)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
    })
}

/// Reads and checks a checkpoint's progress record and the files it lists.
pub fn read_progress(dir: &Path) -> Result<Progress, CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::file(dir, "is not a checkpoint directory"));
    }
    let path = dir.join(PROGRESS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|error| {
        CheckpointError::file(&path, format!("cannot read the progress record: {error}"))
    })?;
    let progress: Progress = serde_json::from_str(&text).map_err(|error| {
        CheckpointError::file(&path, format!("corrupt progress record: {error}"))
    })?;
    if progress.format_version != FORMAT_VERSION {
        return Err(CheckpointError::file(
            &path,
            format!(
                "progress record has format version {}, this build reads {FORMAT_VERSION}",
                progress.format_version
            ),
        ));
    }
    for required in [MODEL_FILE, MODEL_CONFIG_FILE] {
        if !progress.files.contains_key(required) {
            return Err(CheckpointError::file(
                &path,
                format!("corrupt progress record: it lists no {required}"),
            ));
        }
    }
    for (name, expected) in &progress.files {
        let file = dir.join(name);
        let actual = digest(&file)?;
        if actual.bytes != expected.bytes {
            return Err(CheckpointError::file(
                &file,
                format!(
                    "has {} bytes, the checkpoint recorded {} (truncated or replaced)",
                    actual.bytes, expected.bytes
                ),
            ));
        }
        if actual.sha256 != expected.sha256 {
            return Err(CheckpointError::file(
                &file,
                "does not match the SHA-256 recorded in progress.json (corrupted)",
            ));
        }
    }
    Ok(progress)
}

pub fn read_model_config(dir: &Path) -> Result<LlamaConfig, CheckpointError> {
    let path = dir.join(MODEL_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let config: LlamaConfig = serde_json::from_str(&text)
        .map_err(|error| CheckpointError::file(&path, format!("invalid model config: {error}")))?;
    config
        .validate()
        .map_err(|error| CheckpointError::file(&path, error.to_string()))?;
    Ok(config)
}

/// Loads a checkpoint's weights; `expected`, when given, must equal the stored architecture.
pub fn load_model(
    dir: &Path,
    expected: Option<&LlamaConfig>,
    dropout: f64,
    device: &Device,
) -> Result<Llama, CheckpointError> {
    read_progress(dir)?;
    let config = read_model_config(dir)?;
    if let Some(expected) = expected
        && expected != &config
    {
        return Err(CheckpointError::file(
            &dir.join(MODEL_CONFIG_FILE),
            format!(
                "the checkpoint's model differs from the config's: {}",
                shape_differences(&config, expected).join(", ")
            ),
        ));
    }
    let path = dir.join(MODEL_FILE);
    let model = Llama::new(&config, dropout, 0, device)
        .map_err(|error| CheckpointError::file(&dir.join(MODEL_CONFIG_FILE), error.to_string()))?;
    model
        .try_load_file(&path)
        .map_err(|error| CheckpointError::file(&path, error.to_string()))
}

fn shape_differences(stored: &LlamaConfig, expected: &LlamaConfig) -> Vec<String> {
    let stored = serde_json::to_value(stored).expect("configs serialize");
    let expected = serde_json::to_value(expected).expect("configs serialize");
    let (Some(stored), Some(expected)) = (stored.as_object(), expected.as_object()) else {
        return Vec::new();
    };
    stored
        .iter()
        .filter(|(key, value)| expected.get(*key) != Some(*value))
        .map(|(key, value)| {
            let wanted = expected
                .get(key)
                .map_or_else(|| "(none)".to_string(), |v| v.to_string());
            format!("{key} is {value} in the checkpoint, {wanted} in the config")
        })
        .collect()
}

/// Step checkpoint directories of a run, oldest first.
pub fn step_checkpoints(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
    if !run_dir.exists() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(run_dir).map_err(io_error(run_dir))? {
        let entry = entry.map_err(io_error(run_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(STEP_PREFIX)
            .and_then(|digits| digits.parse::<usize>().ok())
        {
            steps.push((step, entry.path()));
        }
    }
    steps.sort();
    Ok(steps)
}

/// Deletes all but the newest `keep` step checkpoints.
pub fn prune(run_dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let steps = step_checkpoints(run_dir)?;
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in &steps[..excess] {
        std::fs::remove_dir_all(path).map_err(io_error(path))?;
    }
    Ok(())
}

/// Clears what an interrupted write left in a run directory: unfinished `.tmp-*` staging
/// directories are deleted; a `.old-NAME` directory is moved back to `NAME` when the process
/// stopped between retiring `NAME` and publishing its replacement, and deleted otherwise.
pub fn tidy(run_dir: &Path) -> Result<(), CheckpointError> {
    if !run_dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(run_dir).map_err(io_error(run_dir))? {
        let path = entry.map_err(io_error(run_dir))?.path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".tmp-") {
            std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
        } else if let Some(original) = name.strip_prefix(".old-") {
            let destination = run_dir.join(original);
            if destination.exists() {
                std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
            } else {
                std::fs::rename(&path, &destination).map_err(io_error(&path))?;
            }
        }
    }
    Ok(())
}

/// Resolves what `distillery eval --checkpoint` and later stages accept: a checkpoint
/// directory, or a run directory (its `best/`, else its newest step).
/// The newest complete checkpoint of a run: its newest step directory or `best/`, whichever
/// is further along.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let newest_step = step_checkpoints(run_dir)?.pop();
    let best = run_dir.join(BEST_DIR);
    if best.exists() {
        let best_step = read_progress(&best)?.step;
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

pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(PROGRESS_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if path.join(BEST_DIR).join(PROGRESS_FILE).exists() {
        return Ok(path.join(BEST_DIR));
    }
    match step_checkpoints(path)?.pop() {
        Some((_, newest)) => Ok(newest),
        None => Err(CheckpointError::file(
            path,
            "holds no checkpoint (no progress.json here, in best/ or in a step-* directory)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_restores_a_retired_checkpoint_and_drops_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        for name in [
            ".old-best",
            ".tmp-step-0000010-123",
            "step-0000010",
            ".old-step-0000010",
        ] {
            std::fs::create_dir(run.join(name)).unwrap();
            std::fs::write(run.join(name).join("marker"), name).unwrap();
        }
        tidy(run).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(run)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["best", "step-0000010"]);
        assert_eq!(
            std::fs::read_to_string(run.join("best/marker")).unwrap(),
            ".old-best"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("step-0000010/marker")).unwrap(),
            "step-0000010"
        );
    }
}
