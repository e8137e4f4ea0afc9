//! Helpers shared by the end-to-end tests: an isolated workspace per test and readers for what
//! the binary writes.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn repo_path(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
        .canonicalize()
        .unwrap_or_else(|error| panic!("{relative}: {error}"))
        .display()
        .to_string()
}

/// A temporary directory holding one test's checkpoints and experiment outputs. The token
/// cache is shared between tests: it is written atomically and keyed by its inputs.
pub struct Workspace {
    pub root: PathBuf,
    pub checkpoints: PathBuf,
    pub experiments: PathBuf,
    _dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Self {
            checkpoints: root.join("checkpoints"),
            experiments: root.join("experiments"),
            root,
            _dir: dir,
        }
    }

    pub fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_distillery"));
        command.args(args).current_dir(&self.root);
        command
    }

    /// `--set` arguments that point a run at this workspace and the shipped data.
    pub fn common_settings(&self, run_name: &str) -> Vec<String> {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("token-cache");
        [
            format!("run.name={run_name}"),
            format!("run.checkpoint_dir={}", self.checkpoints.display()),
            format!("run.experiment_dir={}", self.experiments.display()),
            format!("data.corpus={}", repo_path("datasets/tinyshakespeare.txt")),
            format!(
                "data.tokenizer={}",
                repo_path("datasets/shakespeare-bpe-2048.json")
            ),
            format!("data.cache_dir={}", cache.display()),
        ]
        .into_iter()
        .flat_map(|setting| ["--set".to_string(), setting])
        .collect()
    }

    /// `train configs/tiny-test.toml` in this workspace, with extra `--set` settings.
    pub fn train_args(&self, run_name: &str, settings: &[&str]) -> Vec<String> {
        let mut args = vec!["train".to_string(), repo_path("configs/tiny-test.toml")];
        args.extend(self.common_settings(run_name));
        for setting in settings {
            args.extend(["--set".to_string(), setting.to_string()]);
        }
        args
    }

    /// Runs the binary, expecting success; returns its standard output.
    pub fn run_ok(&self, args: &[String]) -> String {
        let output = self.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "distillery {} failed: {stderr}",
            args.join(" ")
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs the binary, expecting failure; returns its exit code and standard error.
    pub fn run_err(&self, args: &[String]) -> (i32, String) {
        let output = self.command(args).output().unwrap();
        assert!(
            !output.status.success(),
            "distillery {} succeeded unexpectedly",
            args.join(" ")
        );
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Starts `distillery args`, waits until `marker` exists (a checkpoint the run writes), waits
/// `extra_delay_ms` more, and kills the process with SIGKILL.
pub fn kill_after(workspace: &Workspace, args: &[String], marker: &Path, extra_delay_ms: u64) {
    let mut child = workspace
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint at {}",
            marker.display()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(extra_delay_ms));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before SIGKILL");
}

/// Asserts that two burnpack model files hold bit-identical tensors.
pub fn assert_same_tensors(expected: &Path, actual: &Path) {
    let expected = model_tensors(expected);
    let actual = model_tensors(actual);
    assert_eq!(expected.len(), actual.len());
    for (name, bytes) in &expected {
        assert!(
            actual.get(name) == Some(bytes),
            "tensor {name} differs after SIGKILL and resume"
        );
    }
}

/// Every tensor of a burnpack file, by name, as raw bytes.
pub fn model_tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    burn_pack::Reader::from_file_exact(path)
        .unwrap()
        .into_tensors()
        .unwrap()
        .into_iter()
        .map(|tensor| {
            let (name, _, _, _, bytes) = tensor.into_parts().unwrap();
            (name, bytes.to_vec())
        })
        .collect()
}

/// Every tensor of an f32 burnpack file, by name, as values.
pub fn model_f32_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    model_tensors(path)
        .into_iter()
        .map(|(name, bytes)| {
            let values = bytes
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// `(step, value)` of one metric in a run's `metrics.jsonl`.
pub fn metric_series(experiment_dir: &Path, tag: &str) -> Vec<(u64, f64)> {
    read_jsonl(&experiment_dir.join("metrics.jsonl"))
        .iter()
        .filter_map(|record| {
            let value = record.get(tag)?.as_f64()?;
            Some((record["step"].as_u64().unwrap(), value))
        })
        .collect()
}

/// Every file under `root` with its contents' hash.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, format!("{:x}", Sha256::digest(&bytes)));
            }
        }
    }
    files
}

/// The digest record distillery keeps for a checkpoint file.
pub fn digest(bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "bytes": bytes.len(),
        "sha256": format!("{:x}", Sha256::digest(bytes)),
    })
}
