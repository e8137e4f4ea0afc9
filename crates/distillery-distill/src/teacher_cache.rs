//! The offline teacher: its top-k logits for every position of every training window a run
//! will draw, computed once so that distillation need not run the teacher.
//!
//! File layout: the 8-byte magic `DSTLTOPK`, the header's length (u64, little-endian), the
//! header as JSON, then one record per micro-batch of the run's window schedule, in order. A
//! record holds `batch_size * seq_len` rows (window-major); a row holds `top_k` token ids
//! (`id_bytes` each, little-endian), their `top_k` logits (f32, little-endian), largest first,
//! then one f32: the log-sum-exp at the header's temperature of the logits of every other token
//! (the rest), [`EMPTY_REST`] when there is none. The logits are the teacher's raw logits,
//! before any temperature; with the rest they give the teacher's distribution over `top_k + 1`
//! outcomes, so a student learns how much mass the teacher leaves outside its top k.
//!
//! The window sampler draws micro-batches one after another whatever the run's length, so a
//! shorter run's schedule is the start of a longer one's: a run reads any cache of its schedule
//! that holds at least its micro-batches, and one cache serves students of several lengths.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use distillery_config::ExperimentConfig;
use distillery_data::WindowSampler;
use distillery_run::RunData;
use distillery_run::seeds::{Stream, derive_seed};
use distillery_train::batch_tensors;

use crate::DistillError;
use crate::teacher::Teacher;

pub const TEACHER_CACHE_FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"DSTLTOPK";

/// The rest's log-sum-exp when the top k cover the vocabulary: softmax gives it zero mass,
/// while staying finite keeps `0 * log 0` terms at zero instead of NaN.
pub const EMPTY_REST: f32 = -1e9;

/// What a teacher cache was computed from. A cache is used only when every field matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherCacheHeader {
    pub format_version: u32,
    pub teacher_checkpoint: PathBuf,
    /// sha256 of the teacher's weights file.
    pub teacher_sha256: String,
    pub tokenizer_sha256: String,
    pub corpus_sha256: String,
    /// The run's window schedule: the seed of its data order, the split and the batch shape.
    pub seed: u64,
    pub validation_fraction: f64,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Records the cache holds; a run of fewer reads the first ones.
    pub micro_batches: u64,
    pub top_k: usize,
    /// The temperature of each row's rest (the run's `distill.temperature`).
    pub temperature: f64,
    /// Width of the rows the ids index (the student's vocabulary).
    pub vocab_size: usize,
    pub id_bytes: usize,
}

impl TeacherCacheHeader {
    /// The header of the cache `config` trains from, taught by `teacher`.
    pub fn for_run(config: &ExperimentConfig, data: &RunData, teacher: &Teacher) -> Self {
        let vocab_size = data.llama.vocab_size;
        let settings = config.distill.clone().unwrap_or_default();
        Self {
            format_version: TEACHER_CACHE_FORMAT,
            teacher_checkpoint: teacher.directory().to_path_buf(),
            teacher_sha256: teacher.weights_sha256().to_string(),
            tokenizer_sha256: data.tokenizer.sha256().to_string(),
            corpus_sha256: data.corpus_sha256.clone(),
            seed: config.run.seed,
            validation_fraction: config.data.validation_fraction,
            seq_len: config.data.seq_len,
            batch_size: config.train.batch_size,
            micro_batches: (config.train.steps * config.train.grad_accum) as u64,
            top_k: settings.top_k.min(vocab_size),
            temperature: settings.temperature,
            vocab_size,
            id_bytes: if vocab_size <= 1 << 16 { 2 } else { 4 },
        }
    }

    fn row_bytes(&self) -> u64 {
        (self.top_k * (self.id_bytes + 4) + 4) as u64
    }

    fn record_bytes(&self) -> u64 {
        (self.batch_size * self.seq_len) as u64 * self.row_bytes()
    }

    /// The fields that differ from `other`, as `field: this -> other`.
    fn differences(&self, other: &Self) -> Vec<String> {
        let mine = serde_json::to_value(self).expect("headers serialize");
        let theirs = serde_json::to_value(other).expect("headers serialize");
        mine.as_object()
            .expect("headers are objects")
            .iter()
            .filter(|(key, value)| theirs.get(key.as_str()) != Some(*value))
            .map(|(key, value)| format!("{key}: {value} -> {}", theirs[key.as_str()]))
            .collect()
    }
}

/// Where the cache of `teacher`'s logits on `config`'s corpus lives: next to the token cache,
/// named after the teacher's weights. Runs with another window schedule share the path and
/// find the cache refused until they rebuild it.
pub fn cache_path(config: &ExperimentConfig, data: &RunData, teacher: &Teacher) -> PathBuf {
    let token_cache = distillery_data::cache_path(
        &config.data.corpus,
        &data.tokenizer,
        &config.token_cache_dir(),
    );
    let teacher_id: String = teacher.weights_sha256().chars().take(12).collect();
    let mut name = token_cache.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".teacher-{teacher_id}.topk"));
    token_cache.with_file_name(name)
}

/// The cache's order of a row's tokens, as (id, logit): larger logit first, then smaller id.
/// [`top_k`] keeps the first k in it and [`rest_log_sum_exp`] sums the ones after them.
fn rank(a: (u32, f32), b: (u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `k` largest logits of `row` with their token ids, largest first (ties: smaller id
/// first). One pass in id order: a logit joins the list only when it beats the smallest one
/// kept, which after the first few hundred tokens of a 49k row almost none do.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    for (id, &logit) in row.iter().enumerate() {
        let token = (id as u32, logit);
        if top.len() == k && rank(token, top[k - 1]).is_gt() {
            continue;
        }
        let at = top.partition_point(|&kept| rank(kept, token).is_lt());
        top.insert(at, token);
        top.truncate(k);
    }
    top
}

/// `log sum exp(logit / temperature)` over the tokens of `row` not in `top` (the rest, which
/// [`rank`] puts after `top`'s last), each term taken relative to the rest's largest logit and
/// summed in f64, so a rest far below the top k keeps its digits; [`EMPTY_REST`] when `top`
/// covers the row or the rest has no finite logit.
pub fn rest_log_sum_exp(row: &[f32], top: &[(u32, f32)], temperature: f64) -> f32 {
    if top.len() >= row.len() {
        return EMPTY_REST;
    }
    let rest = || {
        row.iter()
            .enumerate()
            .map(|(id, &logit)| (id as u32, logit))
            .filter(|&token| top.last().is_none_or(|&last| rank(token, last).is_gt()))
            .map(|(_, logit)| logit)
    };
    let max = rest().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return EMPTY_REST;
    }
    let scale = (1.0 / temperature) as f32;
    let sum: f64 = rest()
        .map(|logit| f64::from(distillery_kernels::rows::exp((logit - max) * scale)))
        .sum();
    (f64::from(max) / temperature + sum.ln()) as f32
}

/// One cache row: `top_k` ids (`id_bytes` each), their logits, then the rest's log-sum-exp.
fn encode_row(row: &[f32], header: &TeacherCacheHeader, out: &mut Vec<u8>) {
    let top = top_k(row, header.top_k);
    for &(id, _) in &top {
        out.extend_from_slice(&id.to_le_bytes()[..header.id_bytes]);
    }
    for &(_, logit) in &top {
        out.extend_from_slice(&logit.to_le_bytes());
    }
    out.extend_from_slice(&rest_log_sum_exp(row, &top, header.temperature).to_le_bytes());
}

/// Rows of teacher logits that one parallel task of [`build`] encodes.
const ENCODE_ROWS: usize = 32;

/// The teacher's rows of a cached micro-batch, `rows` of them.
pub struct CachedRows {
    /// `rows * k` token ids, largest logit first.
    pub ids: Vec<u32>,
    /// Their `rows * k` raw logits.
    pub logits: Vec<f32>,
    /// Each row's log-sum-exp of the rest at the cache's temperature.
    pub rest: Vec<f32>,
}

impl CachedRows {
    /// The teacher's log-probabilities at `temperature` (the cache's) of the `k + 1` outcomes
    /// of each row, the rest last: `rows * (k + 1)` values.
    pub fn log_probs(&self, temperature: f64) -> Vec<f32> {
        let k = self.logits.len() / self.rest.len().max(1);
        let mut out = Vec::with_capacity(self.rest.len() * (k + 1));
        for (logits, &rest) in self.logits.chunks(k).zip(&self.rest) {
            let scaled = logits
                .iter()
                .map(|&logit| f64::from(logit) / temperature)
                .chain(std::iter::once(f64::from(rest)));
            let max = scaled.clone().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + scaled.clone().map(|x| (x - max).exp()).sum::<f64>().ln();
            out.extend(scaled.map(|x| (x - lse) as f32));
        }
        out
    }
}

/// Runs `teacher` over every window of `header`'s schedule and writes the cache to `path`
/// (through a temporary file, so an interrupted build leaves no cache behind). `progress` is
/// told how many micro-batches are done.
pub fn build(
    path: &Path,
    header: &TeacherCacheHeader,
    data: &RunData,
    teacher: &Teacher,
    progress: &mut dyn FnMut(u64),
) -> Result<(), DistillError> {
    let io_error = |error: std::io::Error| DistillError::Cache {
        path: path.to_path_buf(),
        message: error.to_string(),
    };
    remove_abandoned_builds(path);
    let staging = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut out = BufWriter::new(File::create(&staging).map_err(io_error)?);
    let header_json = serde_json::to_vec(header).expect("headers serialize");
    out.write_all(MAGIC).map_err(io_error)?;
    out.write_all(&(header_json.len() as u64).to_le_bytes())
        .map_err(io_error)?;
    out.write_all(&header_json).map_err(io_error)?;

    let mut sampler = WindowSampler::new(
        derive_seed(header.seed, Stream::DataOrder, 0),
        header.seq_len,
    );
    for micro_batch in 0..header.micro_batches {
        let batch = sampler.next_batch(&data.splits.train, header.batch_size);
        let (inputs, _) = batch_tensors(&batch, teacher.device());
        let logits: Vec<f32> = teacher
            .logits(inputs)
            .into_data()
            .try_into_vec()
            .expect("teacher logits are f32");
        let records: Vec<Vec<u8>> = logits
            .par_chunks(ENCODE_ROWS * header.vocab_size)
            .map(|rows| {
                let mut bytes = Vec::with_capacity(ENCODE_ROWS * header.row_bytes() as usize);
                for row in rows.chunks(header.vocab_size) {
                    encode_row(row, header, &mut bytes);
                }
                bytes
            })
            .collect();
        for bytes in &records {
            out.write_all(bytes).map_err(io_error)?;
        }
        progress(micro_batch + 1);
    }
    let file = out
        .into_inner()
        .map_err(|error| io_error(error.into_error()))?;
    file.sync_all().map_err(io_error)?;
    std::fs::rename(&staging, path).map_err(io_error)
}

/// Deletes what killed builds of the cache at `path` left behind (`<stem>.tmp-<pid>`).
fn remove_abandoned_builds(path: &Path) {
    let (Some(directory), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let prefix = format!("{}.tmp-", stem.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(if directory.as_os_str().is_empty() {
        Path::new(".")
    } else {
        directory
    }) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Reads a run's teacher cache, one micro-batch at a time.
pub struct TeacherCacheReader {
    file: File,
    path: PathBuf,
    header: TeacherCacheHeader,
    data_offset: u64,
}

impl TeacherCacheReader {
    /// Opens the cache at `path`, refusing it unless it was made for `expected`'s schedule,
    /// holds at least its micro-batches and every record it promises.
    pub fn open(path: &Path, expected: &TeacherCacheHeader) -> Result<Self, DistillError> {
        let refuse = |message: String| DistillError::Cache {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(|error| {
            refuse(format!(
                "cannot open the teacher cache ({error}); write it with `distillery teacher-cache`"
            ))
        })?;
        let mut prefix = [0u8; 16];
        file.read_exact(&mut prefix)
            .map_err(|_| refuse("is too short to be a teacher cache".into()))?;
        if &prefix[..8] != MAGIC {
            return Err(refuse("is not a distillery teacher cache".into()));
        }
        let header_len = u64::from_le_bytes(prefix[8..].try_into().expect("8 bytes"));
        let file_len = file
            .metadata()
            .map_err(|error| refuse(error.to_string()))?
            .len();
        if header_len > file_len {
            return Err(refuse("has a damaged header".into()));
        }
        let mut header_json = vec![0u8; header_len as usize];
        file.read_exact(&mut header_json)
            .map_err(|_| refuse("has a damaged header".into()))?;
        let header: TeacherCacheHeader = serde_json::from_slice(&header_json)
            .map_err(|error| refuse(format!("has a damaged header: {error}")))?;
        let schedule_start = TeacherCacheHeader {
            micro_batches: expected.micro_batches,
            ..header.clone()
        };
        if &schedule_start != expected {
            return Err(refuse(format!(
                "was made for another run, so its logits are not this run's teacher's: {}; \
                 rebuild it with `distillery teacher-cache`",
                schedule_start.differences(expected).join("; ")
            )));
        }
        if header.micro_batches < expected.micro_batches {
            return Err(refuse(format!(
                "holds the first {} micro-batches of this run's schedule, which draws {}; \
                 rebuild it with `distillery teacher-cache`",
                header.micro_batches, expected.micro_batches
            )));
        }
        let data_offset = 16 + header_len;
        let expected_len = data_offset + header.micro_batches * header.record_bytes();
        if file_len != expected_len {
            return Err(refuse(format!(
                "holds {file_len} bytes where its header promises {expected_len}"
            )));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            header,
            data_offset,
        })
    }

    pub fn header(&self) -> &TeacherCacheHeader {
        &self.header
    }

    /// The rows of micro-batch `index`, `batch_size * seq_len` of them.
    pub fn read(&mut self, index: u64) -> Result<CachedRows, DistillError> {
        let header = &self.header;
        if index >= header.micro_batches {
            return Err(DistillError::Cache {
                path: self.path.clone(),
                message: format!(
                    "holds {} micro-batches; micro-batch {index} was asked for",
                    header.micro_batches
                ),
            });
        }
        let mut record = vec![0u8; header.record_bytes() as usize];
        self.file
            .seek(SeekFrom::Start(
                self.data_offset + index * header.record_bytes(),
            ))
            .and_then(|_| self.file.read_exact(&mut record))
            .map_err(|error| DistillError::Cache {
                path: self.path.clone(),
                message: error.to_string(),
            })?;
        let k = header.top_k;
        let id_width = header.id_bytes;
        let rows = record.len() / header.row_bytes() as usize;
        let mut ids = Vec::with_capacity(rows * k);
        let mut logits = Vec::with_capacity(rows * k);
        let mut rest = Vec::with_capacity(rows);
        let f32_of = |bytes: &[u8]| f32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        for row in record.chunks(header.row_bytes() as usize) {
            let (id_bytes, logit_bytes) = row.split_at(k * id_width);
            let (logit_bytes, rest_bytes) = logit_bytes.split_at(k * 4);
            ids.extend(id_bytes.chunks(id_width).map(|bytes| {
                let mut id = [0u8; 4];
                id[..id_width].copy_from_slice(bytes);
                u32::from_le_bytes(id)
            }));
            logits.extend(logit_bytes.chunks(4).map(f32_of));
            rest.push(f32_of(rest_bytes));
        }
        Ok(CachedRows { ids, logits, rest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_takes_the_largest_logits_largest_first() {
        let row = [0.5, 3.0, -1.0, 3.0, 2.0];
        assert_eq!(top_k(&row, 3), vec![(1, 3.0), (3, 3.0), (4, 2.0)]);
        assert_eq!(top_k(&row, 5).len(), 5);
        assert_eq!(top_k(&row, 5)[4], (2, -1.0));
    }

    /// Rows of a few distinct values, so that ties cross the k-th place.
    fn tied_rows() -> Vec<Vec<f32>> {
        (0..20u32)
            .map(|seed| {
                (0..300u32)
                    .map(|i| {
                        ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 9) as f32
                            * 0.75
                            - 3.0
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn top_k_is_the_head_of_the_row_sorted_by_logit_then_id() {
        for row in tied_rows() {
            let mut sorted: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .map(|(id, &x)| (id as u32, x))
                .collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for k in [0, 1, 7, 64, 299, 300, 400] {
                assert_eq!(top_k(&row, k), sorted[..k.min(300)], "k = {k}");
            }
        }
    }

    #[test]
    fn the_rest_holds_every_token_after_the_top_k_ties_included() {
        for row in tied_rows() {
            for (k, temperature) in [(0, 1.0), (1, 2.0), (64, 1.0), (250, 0.5)] {
                let top = top_k(&row, k);
                let kept: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
                let by_hand: f64 = row
                    .iter()
                    .enumerate()
                    .filter(|(id, _)| !kept.contains(&(*id as u32)))
                    .map(|(_, &x)| (f64::from(x) / temperature).exp())
                    .sum::<f64>()
                    .ln();
                let rest = f64::from(rest_log_sum_exp(&row, &top, temperature));
                assert!(
                    (rest - by_hand).abs() < 1e-5,
                    "k = {k}: {rest} vs {by_hand}"
                );
            }
        }
    }

    #[test]
    fn the_rest_is_the_log_sum_exp_of_the_tokens_outside_the_top_k() {
        let row = [0.5f32, 3.0, -1.0, 3.0, 2.0];
        let top = top_k(&row, 3);
        let by_hand = ((0.5f64 / 2.0).exp() + (-1.0f64 / 2.0).exp()).ln();
        let rest = rest_log_sum_exp(&row, &top, 2.0);
        assert!((f64::from(rest) - by_hand).abs() < 1e-6);
        assert_eq!(rest_log_sum_exp(&row, &top_k(&row, 5), 2.0), EMPTY_REST);
        let masked = [1.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        assert_eq!(
            rest_log_sum_exp(&masked, &top_k(&masked, 1), 1.0),
            EMPTY_REST
        );
    }

    #[test]
    fn cached_rows_give_the_teachers_probabilities_of_the_top_k_and_the_rest() {
        let row = [0.5f32, 3.0, -1.0, 3.0, 2.0];
        let temperature = 2.0;
        let top = top_k(&row, 2);
        let rows = CachedRows {
            ids: top.iter().map(|&(id, _)| id).collect(),
            logits: top.iter().map(|&(_, logit)| logit).collect(),
            rest: vec![rest_log_sum_exp(&row, &top, temperature)],
        };
        let total: f64 = row
            .iter()
            .map(|&x| (f64::from(x) / temperature).exp())
            .sum();
        let p = |x: f32| (f64::from(x) / temperature).exp() / total;
        let expected = [p(3.0), p(3.0), p(0.5) + p(-1.0) + p(2.0)];
        let log_probs = rows.log_probs(temperature);
        assert_eq!(log_probs.len(), 3);
        for (got, want) in log_probs.iter().zip(expected) {
            assert!(
                (f64::from(*got) - want.ln()).abs() < 1e-6,
                "{got} vs {}",
                want.ln()
            );
        }
    }
}
