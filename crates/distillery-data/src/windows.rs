//! Training and validation windows over a token stream.

use std::sync::Arc;

use burn_dataset::{Dataset, DatasetError};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// `seq_len + 1` consecutive tokens: inputs are the first `seq_len`, targets the last `seq_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenWindow {
    pub tokens: Vec<u32>,
    /// Whether each token counts as a target; `None` when all do.
    pub counted: Option<Vec<bool>>,
}

/// A batch of windows, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Whether each target counts in the loss; `None` when all do.
    pub counted: Option<Vec<bool>>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl TokenBatch {
    pub fn from_windows(windows: &[TokenWindow]) -> Self {
        let seq_len = windows[0].tokens.len() - 1;
        let mut inputs = Vec::with_capacity(windows.len() * seq_len);
        let mut targets = Vec::with_capacity(windows.len() * seq_len);
        for window in windows {
            inputs.extend_from_slice(&window.tokens[..seq_len]);
            targets.extend_from_slice(&window.tokens[1..]);
        }
        let counted = windows
            .iter()
            .map(|window| window.counted.as_ref().map(|counted| &counted[1..]))
            .collect::<Option<Vec<_>>>()
            .map(|rows| rows.concat());
        Self {
            inputs,
            targets,
            counted,
            batch_size: windows.len(),
            seq_len,
        }
    }
}

/// A stretch of the corpus's tokens and, for corpora that count only some targets (chat), which
/// of them count. Reads as its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    pub tokens: Arc<[u32]>,
    pub counted: Option<Arc<[bool]>>,
}

impl TokenSpan {
    /// Tokens that all count.
    pub fn new(tokens: &[u32]) -> Self {
        Self {
            tokens: tokens.into(),
            counted: None,
        }
    }

    /// `len` tokens from `start`, with their counts.
    fn window(&self, start: usize, len: usize) -> TokenWindow {
        TokenWindow {
            tokens: self.tokens[start..start + len].to_vec(),
            counted: self
                .counted
                .as_ref()
                .map(|counted| counted[start..start + len].to_vec()),
        }
    }
}

impl std::ops::Deref for TokenSpan {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        &self.tokens
    }
}

/// The corpus's tokens split into a training head and a validation tail.
#[derive(Debug, Clone)]
pub struct TokenSplits {
    pub train: TokenSpan,
    pub validation: TokenSpan,
}

impl TokenSplits {
    /// Keeps the last `validation_fraction` of the tokens for validation; both parts must hold
    /// at least one window of `seq_len + 1` tokens, and, when only some tokens count, at least
    /// one counted target.
    pub fn new(
        tokens: &[u32],
        counted: Option<&[bool]>,
        validation_fraction: f64,
        seq_len: usize,
    ) -> Result<Self, DataError> {
        let validation_len = (tokens.len() as f64 * validation_fraction).round() as usize;
        let train_len = tokens.len() - validation_len.min(tokens.len());
        let needed = seq_len + 1;
        if train_len < needed || validation_len < needed {
            return Err(DataError::CorpusTooSmall {
                tokens: tokens.len(),
                train: train_len,
                validation: validation_len,
                needed,
            });
        }
        let span = |range: std::ops::Range<usize>, split| {
            let counted: Option<Arc<[bool]>> = counted.map(|counted| counted[range.clone()].into());
            // The first token of a split is never a target.
            if counted
                .as_ref()
                .is_some_and(|counted| !counted[1..].contains(&true))
            {
                return Err(DataError::NothingCounted { split });
            }
            Ok(TokenSpan {
                tokens: tokens[range].into(),
                counted,
            })
        };
        Ok(Self {
            train: span(0..train_len, "training")?,
            validation: span(train_len..tokens.len(), "validation")?,
        })
    }
}

/// Draws training windows at uniformly random offsets from a seeded stream whose state is
/// saved with each checkpoint, so a resumed run draws exactly the windows it would have drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSampler {
    rng: ChaCha8Rng,
    seq_len: usize,
}

impl WindowSampler {
    pub fn new(seed: u64, seq_len: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seq_len,
        }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn next_batch(&mut self, span: &TokenSpan, batch_size: usize) -> TokenBatch {
        let last_start = span.len() - (self.seq_len + 1);
        let windows: Vec<TokenWindow> = (0..batch_size)
            .map(|_| {
                let start = self.rng.random_range(0..=last_start);
                span.window(start, self.seq_len + 1)
            })
            .collect();
        TokenBatch::from_windows(&windows)
    }
}

/// Non-overlapping consecutive windows over the validation tail: the same pass every time.
#[derive(Debug, Clone)]
pub struct ValidationWindows {
    tokens: TokenSpan,
    seq_len: usize,
    limit: Option<usize>,
}

impl ValidationWindows {
    /// `limit` caps the number of windows (the first ones are kept).
    pub fn new(tokens: TokenSpan, seq_len: usize, limit: Option<usize>) -> Self {
        Self {
            tokens,
            seq_len,
            limit,
        }
    }

    /// The windows in order, grouped into batches of at most `batch_size`.
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = TokenBatch> + '_ {
        (0..self.len()).step_by(batch_size).map(move |first| {
            let windows: Vec<TokenWindow> = (first..(first + batch_size).min(self.len()))
                .map(|index| self.window(index))
                .collect();
            TokenBatch::from_windows(&windows)
        })
    }

    /// Window `index`, which must be below `len()`.
    fn window(&self, index: usize) -> TokenWindow {
        self.tokens.window(index * self.seq_len, self.seq_len + 1)
    }
}

impl Dataset<TokenWindow> for ValidationWindows {
    fn get(&self, index: usize) -> Result<TokenWindow, DatasetError> {
        if index < self.len() {
            Ok(self.window(index))
        } else {
            Err(DatasetError::new(DataError::WindowOutOfRange {
                index,
                windows: self.len(),
            }))
        }
    }

    fn len(&self) -> usize {
        let available = (self.tokens.len() - 1) / self.seq_len;
        self.limit.map_or(available, |limit| available.min(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(count: u32) -> TokenSpan {
        TokenSpan::new(&(0..count).collect::<Vec<_>>())
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let mut sampler = WindowSampler::new(1, 8);
        let batch = sampler.next_batch(&tokens(100), 3);
        assert_eq!((batch.batch_size, batch.seq_len), (3, 8));
        for row in 0..3 {
            let inputs = &batch.inputs[row * 8..row * 8 + 8];
            let targets = &batch.targets[row * 8..row * 8 + 8];
            assert!(inputs.iter().zip(targets).all(|(i, t)| t == &(i + 1)));
        }
    }

    #[test]
    fn sampler_state_round_trips_and_continues_the_same_stream() {
        let data = tokens(1000);
        let mut uninterrupted = WindowSampler::new(42, 16);
        let mut resumed = WindowSampler::new(42, 16);
        let _ = uninterrupted.next_batch(&data, 4);
        let _ = resumed.next_batch(&data, 4);
        let saved = serde_json::to_string(&resumed).unwrap();
        let mut restored: WindowSampler = serde_json::from_str(&saved).unwrap();
        assert_eq!(
            uninterrupted.next_batch(&data, 4),
            restored.next_batch(&data, 4)
        );
        assert_ne!(
            WindowSampler::new(43, 16).next_batch(&data, 4),
            WindowSampler::new(42, 16).next_batch(&data, 4)
        );
    }

    #[test]
    fn windows_cover_the_whole_range() {
        let data = tokens(20);
        let mut sampler = WindowSampler::new(3, 4);
        let mut seen_first = false;
        let mut seen_last = false;
        for _ in 0..500 {
            let batch = sampler.next_batch(&data, 1);
            seen_first |= batch.inputs[0] == 0;
            seen_last |= batch.targets[3] == 19;
            assert!(batch.targets[3] <= 19);
        }
        assert!(seen_first && seen_last);
    }

    #[test]
    fn validation_windows_are_consecutive_and_fixed() {
        let windows = ValidationWindows::new(tokens(30), 7, None);
        assert_eq!(windows.len(), 4);
        assert_eq!(windows.get(1).unwrap().tokens, (7..15).collect::<Vec<_>>());
        assert!(
            windows
                .get(4)
                .unwrap_err()
                .to_string()
                .contains("4 windows")
        );
        let batches: Vec<TokenBatch> = windows.batches(3).collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1].batch_size, 1);
        assert_eq!(batches[1].inputs[0], 21);
        let limited = ValidationWindows::new(tokens(30), 7, Some(2));
        assert_eq!(limited.len(), 2);
    }

    #[test]
    fn splits_keep_the_tail_for_validation() {
        let splits = TokenSplits::new(&tokens(100), None, 0.1, 8).unwrap();
        assert_eq!(splits.train.len(), 90);
        assert_eq!(splits.validation[0], 90);
        let error = TokenSplits::new(&tokens(50), None, 0.1, 8).unwrap_err();
        assert!(error.to_string().contains("validation"), "{error}");
    }

    #[test]
    fn counted_targets_follow_their_tokens_into_windows_and_batches() {
        // Every third token counts.
        let counted: Vec<bool> = (0..100).map(|index| index % 3 == 0).collect();
        let splits = TokenSplits::new(&tokens(100), Some(&counted), 0.2, 8).unwrap();
        let mut sampler = WindowSampler::new(5, 8);
        let batch = sampler.next_batch(&splits.train, 4);
        let batch_counted = batch.counted.clone().unwrap();
        assert_eq!(batch_counted.len(), 32);
        for (target, counts) in batch.targets.iter().zip(&batch_counted) {
            assert_eq!(*counts, target % 3 == 0, "target {target}");
        }
        let validation = ValidationWindows::new(splits.validation.clone(), 8, None);
        let first = validation.batches(2).next().unwrap();
        assert_eq!(first.targets[0], 81);
        assert_eq!(first.counted.unwrap()[..4], [true, false, false, true]);
        assert!(sampler.next_batch(&tokens(100), 1).counted.is_none());

        let only_training: Vec<bool> = (0..100).map(|index| index < 50).collect();
        let error = TokenSplits::new(&tokens(100), Some(&only_training), 0.2, 8).unwrap_err();
        assert!(error.to_string().contains("validation split"), "{error}");
    }
}
