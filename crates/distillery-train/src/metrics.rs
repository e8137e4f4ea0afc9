//! Scalar metrics, written to `metrics.jsonl` and to TensorBoard event files.
//!
//! `metrics.jsonl` is the record of the run. A resumed run keeps its lines up to the step it
//! resumes from and rebuilds the event files from them, so each TensorBoard curve holds every
//! step exactly once, however often the run was interrupted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tensorboard_rs::event_file_writer::EventFileWriter;

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct MetricsError {
    pub path: PathBuf,
    pub message: String,
}

/// Scalars logged together at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: usize,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    #[serde(flatten)]
    pub values: BTreeMap<String, f64>,
}

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TENSORBOARD_DIR: &str = "tb";

pub struct MetricsLog {
    jsonl: std::fs::File,
    jsonl_path: PathBuf,
    tensorboard: Option<EventFileWriter>,
}

impl MetricsLog {
    /// Opens the run's metrics. Records after `resume_step` are dropped; without a resume step
    /// any earlier log of the same run name is discarded.
    pub fn open(
        experiment_dir: &Path,
        tensorboard: bool,
        resume_step: Option<usize>,
    ) -> Result<Self, MetricsError> {
        let jsonl_path = experiment_dir.join(METRICS_FILE);
        let failure = |path: &Path| {
            let path = path.to_path_buf();
            move |error: std::io::Error| MetricsError {
                path,
                message: error.to_string(),
            }
        };
        std::fs::create_dir_all(experiment_dir).map_err(failure(experiment_dir))?;
        let kept = match resume_step {
            Some(step) => read_records(&jsonl_path)?
                .into_iter()
                .filter(|record| record.step <= step)
                .collect(),
            None => Vec::new(),
        };
        let mut text = String::new();
        for record in &kept {
            text.push_str(&serde_json::to_string(record).expect("records serialize"));
            text.push('\n');
        }
        std::fs::write(&jsonl_path, text).map_err(failure(&jsonl_path))?;

        let tb_dir = experiment_dir.join(TENSORBOARD_DIR);
        if tb_dir.exists() {
            std::fs::remove_dir_all(&tb_dir).map_err(failure(&tb_dir))?;
        }
        let tensorboard = if tensorboard {
            std::fs::create_dir_all(&tb_dir).map_err(failure(&tb_dir))?;
            let mut writer = EventFileWriter::new(&tb_dir);
            for record in &kept {
                write_event(&mut writer, record);
            }
            writer.flush();
            Some(writer)
        } else {
            None
        };
        let jsonl = std::fs::OpenOptions::new()
            .append(true)
            .open(&jsonl_path)
            .map_err(failure(&jsonl_path))?;
        Ok(Self {
            jsonl,
            jsonl_path,
            tensorboard,
        })
    }

    pub fn log(&mut self, step: usize, values: &[(&str, f64)]) -> Result<(), MetricsError> {
        let record = MetricRecord {
            step,
            wall_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |elapsed| elapsed.as_secs_f64()),
            values: values
                .iter()
                .map(|(name, value)| (name.to_string(), *value))
                .collect(),
        };
        let mut line = serde_json::to_string(&record).expect("records serialize");
        line.push('\n');
        self.jsonl
            .write_all(line.as_bytes())
            .map_err(|error| MetricsError {
                path: self.jsonl_path.clone(),
                message: error.to_string(),
            })?;
        if let Some(writer) = self.tensorboard.as_mut() {
            write_event(writer, &record);
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), MetricsError> {
        if let Some(writer) = self.tensorboard.as_mut() {
            writer.flush();
        }
        self.jsonl.flush().map_err(|error| MetricsError {
            path: self.jsonl_path.clone(),
            message: error.to_string(),
        })
    }
}

fn write_event(writer: &mut EventFileWriter, record: &MetricRecord) {
    for (tag, value) in &record.values {
        let mut event = tensorboard_proto::event::Event::new();
        event.set_wall_time(record.wall_time);
        event.set_step(record.step as i64);
        event.set_summary(tensorboard_rs::summary::scalar(tag, *value as f32));
        writer.add_event(&event);
    }
}

/// Reads `metrics.jsonl`; a missing file is an empty log. A torn last line (the process was
/// killed mid-write) is dropped.
pub fn read_records(path: &Path) -> Result<Vec<MetricRecord>, MetricsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(MetricsError {
                path: path.to_path_buf(),
                message: error.to_string(),
            });
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if index + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(error) => {
                return Err(MetricsError {
                    path: path.to_path_buf(),
                    message: format!("line {}: {error}", index + 1),
                });
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keeps_records_up_to_the_checkpoint_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), true, None).unwrap();
        for step in 1..=5 {
            log.log(step, &[("train/loss", step as f64)]).unwrap();
        }
        log.flush().unwrap();
        drop(log);

        let mut log = MetricsLog::open(dir.path(), true, Some(3)).unwrap();
        log.log(4, &[("train/loss", 40.0)]).unwrap();
        log.flush().unwrap();
        drop(log);

        let records = read_records(&dir.path().join(METRICS_FILE)).unwrap();
        let steps: Vec<usize> = records.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(records[3].values["train/loss"], 40.0);
        let event_files = std::fs::read_dir(dir.path().join(TENSORBOARD_DIR))
            .unwrap()
            .count();
        assert_eq!(event_files, 1);
    }

    #[test]
    fn torn_last_line_is_dropped_but_corruption_inside_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(
            &path,
            "{\"step\":1,\"wall_time\":0.0,\"a\":1.0}\n{\"step\":2,\"wa",
        )
        .unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 1);
        std::fs::write(&path, "garbage\n{\"step\":1,\"wall_time\":0.0}\n").unwrap();
        let error = read_records(&path).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
    }
}
