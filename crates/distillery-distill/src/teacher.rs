//! The frozen teacher: a distillery checkpoint loaded for inference only.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use distillery_config::{TeacherCheckpoint, TeacherConfig};
use distillery_data::TextTokenizer;
use distillery_model::{Llama, LlamaConfig};
use distillery_run::checkpoint;

use crate::DistillError;

/// A teacher held on a plain (non-autodiff) device in evaluation mode: its forward passes record
/// no graph, its parameters never reach an optimizer, and dropout is off.
pub struct Teacher {
    model: Llama,
    device: Device,
    directory: PathBuf,
    /// The training step of a distillery checkpoint; `None` for a Hugging Face folder.
    step: Option<usize>,
    /// The sha256 of the weights file (of each shard, space-separated).
    weights_sha256: String,
    /// The student's vocabulary size when the teacher's logits are cut to it.
    logits_width: Option<usize>,
}

impl Teacher {
    /// Loads the teacher `config` names (a distillery checkpoint or a Hugging Face folder),
    /// checking that it was trained with `tokenizer` and that its vocabulary fits the
    /// student's.
    pub fn load(
        config: &TeacherConfig,
        tokenizer: &TextTokenizer,
        student: &LlamaConfig,
        device: &Device,
    ) -> Result<Self, DistillError> {
        let (model, directory, step, weights_sha256) =
            match (&config.checkpoint, &config.from, &config.hf_dir) {
                (Some(checkpoint), _, _) => {
                    load_checkpoint(checkpoint, config.select, tokenizer, device)?
                }
                (None, None, Some(dir)) => load_hf(dir, tokenizer, device)?,
                (None, Some(path), _) if path.is_dir() => load_hf(path, tokenizer, device)?,
                (None, Some(path), _) => load_gguf(path, tokenizer, device)?,
                (None, None, _) => {
                    return Err(DistillError::Teacher {
                        path: PathBuf::new(),
                        message: "set teacher.checkpoint, teacher.from or teacher.hf_dir".into(),
                    });
                }
            };
        let logits_width = logits_width(
            model.config().vocab_size,
            student.vocab_size,
            tokenizer.vocab_size(),
        )
        .map_err(|message| DistillError::Teacher {
            path: directory.clone(),
            message,
        })?;
        Ok(Self {
            model: model.valid(),
            device: device.clone(),
            directory,
            step,
            weights_sha256,
            logits_width,
        })
    }

    /// The teacher's logits for `inputs` (on any device), cut to the student's vocabulary:
    /// `[batch, seq, student vocab]`, on the teacher's plain device.
    pub fn logits(&self, inputs: Tensor<2, Int>) -> Tensor<3> {
        let logits = self.model.forward(inputs.inner());
        match self.logits_width {
            Some(width) => {
                let [batch, seq, _] = logits.dims();
                logits.slice([0..batch, 0..seq, 0..width])
            }
            None => logits,
        }
    }

    /// The teacher's final hidden states for `inputs` `[batch * seq, hidden]` and its output
    /// head `[hidden, student vocab]` (cut as [`Teacher::logits`] cuts them), so that its
    /// logits can be computed a chunk of positions at a time; `None` when its head is
    /// quantized.
    pub fn head_inputs(&self, inputs: Tensor<2, Int>) -> Option<(Tensor<2>, Tensor<2>)> {
        let weight = self.model.float_head()?;
        let weight = match self.logits_width {
            Some(width) => weight.narrow(1, 0, width),
            None => weight,
        };
        let hidden = self.model.final_hidden(inputs.inner());
        let [batch, seq, width] = hidden.dims();
        Some((hidden.reshape([batch * seq, width]), weight))
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub fn step(&self) -> Option<usize> {
        self.step
    }

    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }
}

type LoadedTeacher = (Llama, PathBuf, Option<usize>, String);

fn load_checkpoint(
    path: &Path,
    select: TeacherCheckpoint,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<LoadedTeacher, DistillError> {
    let directory = select_checkpoint(path, select)?;
    let progress = checkpoint::read_progress(&directory)?;
    if progress.tokenizer_sha256 != tokenizer.sha256() {
        return Err(another_tokenizer(
            directory,
            &progress.tokenizer_sha256,
            tokenizer,
        ));
    }
    let model = checkpoint::load_model(&directory, None, 0.0, device)?;
    let weights_sha256 = progress
        .files
        .get(checkpoint::MODEL_FILE)
        .map(|digest| digest.sha256.clone())
        .ok_or_else(|| DistillError::Teacher {
            path: directory.clone(),
            message: format!(
                "its progress record lists no digest of {}",
                checkpoint::MODEL_FILE
            ),
        })?;
    Ok((model, directory, Some(progress.step), weights_sha256))
}

fn load_hf(
    dir: &Path,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<LoadedTeacher, DistillError> {
    let teacher_error = |path: &Path, message: String| DistillError::Teacher {
        path: path.to_path_buf(),
        message,
    };
    let tokenizer_path = dir.join("tokenizer.json");
    let theirs = TextTokenizer::load(&tokenizer_path)
        .map_err(|error| teacher_error(&tokenizer_path, error.to_string()))?;
    if theirs.sha256() != tokenizer.sha256() {
        return Err(another_tokenizer(
            dir.to_path_buf(),
            theirs.sha256(),
            tokenizer,
        ));
    }
    let model = distillery_formats::hf::import(dir, device)
        .map_err(|error| teacher_error(&error.path, error.message))?;
    // One file's digest, or the shards' digests in index order.
    let digests = distillery_formats::hf::weight_files(dir)
        .map_err(|error| teacher_error(&error.path, error.message))?
        .iter()
        .map(|file| {
            std::fs::read(file)
                .map(|bytes| distillery_data::hex_sha256(&bytes))
                .map_err(|error| teacher_error(file, error.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((model, dir.to_path_buf(), None, digests.join(" ")))
}

/// A GGUF teacher, dequantized once: a live teacher runs every training batch through every
/// matrix, which float weights serve fastest.
fn load_gguf(
    path: &Path,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<LoadedTeacher, DistillError> {
    let teacher_error = |message: String| DistillError::Teacher {
        path: path.to_path_buf(),
        message,
    };
    // The file carries its tokenizer as GGUF metadata: it must tokenize as the student's does.
    let student_json: serde_json::Value = tokenizer
        .inner()
        .to_string(false)
        .ok()
        .and_then(|json| serde_json::from_str(&json).ok())
        .ok_or_else(|| teacher_error("the student's tokenizer does not serialize".into()))?;
    let vocabulary = distillery_formats::gguf::vocabulary_from_tokenizer_json(
        &student_json,
        None,
        tokenizer.eos_token_id(),
    )
    .map_err(|error| teacher_error(format!("the student's tokenizer: {error}")))?;
    let (_, model) = distillery_formats::source::load_gguf_for(path, &vocabulary, device)
        .map_err(|error| teacher_error(error.message))?;
    let bytes = std::fs::read(path).map_err(|error| teacher_error(error.to_string()))?;
    let weights_sha256 = distillery_data::hex_sha256(&bytes);
    Ok((
        model.dequantized(),
        path.to_path_buf(),
        None,
        weights_sha256,
    ))
}

fn another_tokenizer(path: PathBuf, theirs: &str, ours: &TextTokenizer) -> DistillError {
    DistillError::Teacher {
        path,
        message: format!(
            "was trained with another tokenizer (sha256 {theirs}) than the student's (sha256 {}); \
             teacher and student must share one tokenizer",
            ours.sha256()
        ),
    }
}

/// The checkpoint directory a teacher path names: a checkpoint directory itself, or a run
/// directory's `best/` or newest checkpoint.
fn select_checkpoint(path: &Path, select: TeacherCheckpoint) -> Result<PathBuf, DistillError> {
    if path.join(checkpoint::PROGRESS_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(DistillError::Teacher {
            path: path.to_path_buf(),
            message: "does not exist (teacher.checkpoint names a run or checkpoint directory)"
                .into(),
        });
    }
    let chosen = match select {
        TeacherCheckpoint::Best => {
            let best = path.join(checkpoint::BEST_DIR);
            best.join(checkpoint::PROGRESS_FILE)
                .is_file()
                .then_some(best)
        }
        TeacherCheckpoint::Latest => checkpoint::latest_checkpoint(path)?,
    };
    chosen.ok_or_else(|| DistillError::Teacher {
        path: path.to_path_buf(),
        message: match select {
            TeacherCheckpoint::Best => "has no best/ checkpoint (set teacher.select = \"latest\" \
                                        or name a step directory)"
                .into(),
            TeacherCheckpoint::Latest => "holds no checkpoint".into(),
        },
    })
}

/// How wide the teacher's logits are made to match the student's: `None` when they already
/// match, `Some(student_vocab)` when the teacher's extra rows are padding (ids the tokenizer
/// never produces), and an error otherwise.
fn logits_width(
    teacher_vocab: usize,
    student_vocab: usize,
    tokenizer_vocab: usize,
) -> Result<Option<usize>, String> {
    if teacher_vocab == student_vocab {
        Ok(None)
    } else if teacher_vocab > student_vocab && student_vocab >= tokenizer_vocab {
        Ok(Some(student_vocab))
    } else if teacher_vocab > student_vocab {
        Err(format!(
            "the teacher's vocabulary ({teacher_vocab}) is larger than the student's \
             ({student_vocab}) by more than padding: the tokenizer has {tokenizer_vocab} tokens"
        ))
    } else {
        Err(format!(
            "the teacher's vocabulary ({teacher_vocab}) is smaller than the student's \
             ({student_vocab}); the teacher has no predictions for the student's extra ids"
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    fn shape(vocab_size: usize, tie_word_embeddings: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings,
            rope_scaling: None,
        }
    }

    /// A teacher of 40 logits whose last 8 are padding for a student of 32.
    fn padded_teacher(device: &Device) -> Teacher {
        Teacher {
            model: Llama::new(&shape(40, true), 0.5, 3, device)
                .unwrap()
                .valid(),
            device: device.clone(),
            directory: PathBuf::new(),
            step: None,
            weights_sha256: String::new(),
            logits_width: Some(32),
        }
    }

    fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
        tensor.into_data().try_into_vec::<f32>().unwrap()
    }

    #[test]
    fn the_chunked_head_gives_the_distillation_loss_and_gradients_of_whole_logits() {
        use distillery_config::DistillConfig;
        use distillery_kernels::HeadTeacher;
        use distillery_train::loss::head_loss_terms;

        use crate::losses::distillation_loss;

        let device = Device::flex();
        let teacher = padded_teacher(&device);
        let autodiff = device.clone().autodiff();
        let settings = DistillConfig {
            temperature: 2.0,
            alpha: 0.6,
            ..DistillConfig::default()
        };
        let inputs = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 7, 2, 3, 9, 31, 0], [2, 4]),
            &autodiff,
        );
        let targets = Tensor::<2, Int>::from_data(
            TensorData::new(vec![5i64, 7, 2, 3, 9, 31, 0, 4], [2, 4]),
            &autodiff,
        );
        // The last position of each sequence is padding.
        let mask = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], [2, 4]),
            &autodiff,
        );
        for tied in [true, false] {
            let student = Llama::new(&shape(32, tied), 0.0, 11, &autodiff).unwrap();
            let (hidden, weight) = teacher.head_inputs(inputs.clone()).unwrap();
            let chunked = head_loss_terms(
                &student,
                inputs.clone(),
                targets.clone(),
                Some(mask.clone()),
                HeadTeacher::Dense { hidden, weight },
                settings.alpha,
                settings.temperature,
            )
            .unwrap();
            let whole = distillation_loss(
                student.forward(inputs.clone()),
                teacher.logits(inputs.clone()),
                targets.clone(),
                &settings,
                Some(mask.clone()),
            );
            let chunked_gradients = chunked.total.clone().backward();
            let whole_gradients = whole.total.clone().backward();
            let table = student.embedding().unwrap().val();
            let mut pairs = vec![
                ("total", values(chunked.total), values(whole.total)),
                ("ce", values(chunked.ce), values(whole.ce)),
                ("kd", values(chunked.kd), values(whole.kd)),
                (
                    "embedding gradient",
                    values(table.grad(&chunked_gradients).unwrap()),
                    values(table.grad(&whole_gradients).unwrap()),
                ),
            ];
            if !tied {
                let head = student.float_head().unwrap();
                pairs.push((
                    "head gradient",
                    values(head.grad(&chunked_gradients).unwrap()),
                    values(head.grad(&whole_gradients).unwrap()),
                ));
            }
            for (name, chunked, whole) in pairs {
                assert_eq!(chunked.len(), whole.len(), "{name}");
                for (a, b) in chunked.iter().zip(&whole) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "tied {tied}, {name}: chunked {a} vs whole {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn teacher_forward_records_no_graph_and_ignores_dropout() {
        let device = Device::flex();
        let teacher = padded_teacher(&device);
        // The student's batch lives on the autodiff device; the teacher's answer must not.
        let inputs = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 7, 2, 3, 9], [2, 3]),
            &device.clone().autodiff(),
        );
        let first = teacher.logits(inputs.clone());
        assert!(!first.is_autodiff());
        assert_eq!(first.dims(), [2, 3, 32]);
        assert!(!teacher.model.embedding().unwrap().val().is_autodiff());
        let second = teacher.logits(inputs);
        assert_eq!(
            first.into_data().try_to_vec::<f32>().unwrap(),
            second.into_data().try_to_vec::<f32>().unwrap(),
            "dropout 0.5 must not act on the teacher"
        );
    }

    #[test]
    fn equal_vocabularies_need_no_cut() {
        assert_eq!(logits_width(2048, 2048, 2048), Ok(None));
        assert_eq!(logits_width(2112, 2112, 2048), Ok(None));
    }

    #[test]
    fn teacher_padding_rows_are_cut_to_the_student() {
        assert_eq!(logits_width(2112, 2048, 2048), Ok(Some(2048)));
        assert_eq!(logits_width(4096, 2064, 2050), Ok(Some(2064)));
    }

    #[test]
    fn real_vocabulary_differences_are_refused() {
        let larger = logits_width(4096, 2048, 4000).unwrap_err();
        assert!(larger.contains("more than padding"), "{larger}");
        let smaller = logits_width(2048, 2112, 2048).unwrap_err();
        assert!(smaller.contains("smaller than the student's"), "{smaller}");
    }
}
