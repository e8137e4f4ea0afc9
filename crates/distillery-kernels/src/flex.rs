//! The fused operations on burn-flex tensors: forward passes that keep what their backward
//! passes need, and the backward passes.
//!
//! Work is split into fixed blocks of rows (never by thread count), so results are the same
//! whatever the number of threads: a resumed run stays bit-identical.

use burn::backend::DType;
use burn::tensor::{Bytes, Shape};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use crate::rows;

/// Rows per parallel task.
const ROW_BLOCK: usize = 32;
/// Elements per parallel task for element-wise kernels.
const ELEMENT_BLOCK: usize = 1 << 14;

fn contiguous_f32(tensor: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(tensor.dtype(), DType::F32, "fused kernels take f32 tensors");
    match tensor.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(tensor.to_contiguous().storage::<f32>().to_vec()),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

fn shape_of(tensor: &FlexTensor) -> Shape {
    tensor.layout().shape().clone()
}

fn last_dim(tensor: &FlexTensor) -> usize {
    let shape = tensor.layout().shape();
    shape[shape.num_dims() - 1]
}

/// Token ids as indices, from whichever integer type the backend stores them in.
fn indices(tensor: &FlexTensor, bound: usize) -> Vec<usize> {
    let tensor = tensor.to_contiguous();
    let values: Vec<i64> = match tensor.dtype() {
        DType::I64 => tensor.storage::<i64>().to_vec(),
        DType::I32 => tensor.storage::<i32>().iter().map(|&v| v as i64).collect(),
        DType::U32 => tensor.storage::<u32>().iter().map(|&v| v as i64).collect(),
        dtype => panic!("token ids must be integers, got {dtype:?}"),
    };
    values
        .into_iter()
        .map(|value| {
            assert!(
                (0..bound as i64).contains(&value),
                "token id {value} is outside the vocabulary of {bound}"
            );
            value as usize
        })
        .collect()
}

/// Token ids as a `[ids]` tensor of the integer type `dtype`, as [`indices`] reads them.
fn token_ids(ids: &[usize], dtype: DType) -> FlexTensor {
    let bytes = match dtype {
        DType::I64 => Bytes::from_elems(ids.iter().map(|&id| id as i64).collect::<Vec<_>>()),
        DType::I32 => Bytes::from_elems(ids.iter().map(|&id| id as i32).collect::<Vec<_>>()),
        DType::U32 => Bytes::from_elems(ids.iter().map(|&id| id as u32).collect::<Vec<_>>()),
        dtype => panic!("token ids must be integers, got {dtype:?}"),
    };
    FlexTensor::new(bytes, Layout::contiguous(Shape::new([ids.len()])), dtype)
}

/// Per-row cross-entropy of `[rows, vocab]` logits; returns the losses `[rows]` and the
/// log-sum-exps `[rows]`.
pub fn cross_entropy(logits: &FlexTensor, targets: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let vocab = last_dim(logits);
    let values = contiguous_f32(logits);
    let rows = values.len() / vocab;
    let targets = indices(targets, vocab);
    let mut losses = vec![0.0; rows];
    let mut lse = vec![0.0; rows];
    values
        .par_chunks(ROW_BLOCK * vocab)
        .zip(targets.par_chunks(ROW_BLOCK))
        .zip(losses.par_chunks_mut(ROW_BLOCK))
        .zip(lse.par_chunks_mut(ROW_BLOCK))
        .for_each(|(((logits, targets), losses), lse)| {
            rows::cross_entropy(logits, targets, vocab, losses, lse)
        });
    (
        tensor(losses, Shape::new([rows])),
        tensor(lse, Shape::new([rows])),
    )
}

/// The gradient `[rows, vocab]` of [`cross_entropy`]'s losses with respect to the logits, from
/// the losses' gradient `[rows]` and the log-sum-exps `[rows]` the forward pass returned.
pub fn cross_entropy_backward(
    logits: &FlexTensor,
    targets: &FlexTensor,
    log_sum_exps: &FlexTensor,
    gradient: &FlexTensor,
) -> FlexTensor {
    let vocab = last_dim(logits);
    let values = contiguous_f32(logits);
    let targets = indices(targets, vocab);
    let lse = contiguous_f32(log_sum_exps);
    let gradient = contiguous_f32(gradient);
    let mut output = vec![0.0; values.len()];
    output
        .par_chunks_mut(ROW_BLOCK * vocab)
        .zip(values.par_chunks(ROW_BLOCK * vocab))
        .zip(targets.par_chunks(ROW_BLOCK))
        .zip(lse.par_chunks(ROW_BLOCK))
        .zip(gradient.par_chunks(ROW_BLOCK))
        .for_each(|((((output, logits), targets), lse), gradient)| {
            rows::cross_entropy_backward(logits, targets, lse, gradient, vocab, output)
        });
    tensor(output, shape_of(logits))
}

/// Logits a chunk of the output head holds at a time (64 MiB of f32) unless that is fewer than
/// [`HEAD_CHUNK_MIN_ROWS`] rows.
#[cfg(not(test))]
const HEAD_CHUNK_ELEMENTS: usize = 1 << 24;
/// The fewest rows a chunk of the output head takes. Each chunk's products pack the whole head
/// weight again (gemm has no packed operand to reuse): a 49k x 576 head measured 6-12% slower
/// a training step in chunks of 320 rows than whole (4 x 256 rows, AMD EPYC Zen 3, 2 threads),
/// and as fast in one chunk of 1,024.
#[cfg(not(test))]
const HEAD_CHUNK_MIN_ROWS: usize = 1024;
// The unit tests take chunks of one row block, so that their small heads run through several.
#[cfg(test)]
const HEAD_CHUNK_ELEMENTS: usize = 1;
#[cfg(test)]
const HEAD_CHUNK_MIN_ROWS: usize = ROW_BLOCK;

/// What [`head_losses`] computes beside the losses.
#[derive(Clone, Copy)]
pub struct HeadRequests {
    pub hidden_gradient: bool,
    pub weight_gradient: bool,
    /// Each row's most likely token.
    pub predictions: bool,
}

/// [`head_losses`]'s results: the weighted total `[1]`, the per-row losses `[rows]`, and what
/// else was asked for.
pub struct HeadLossOutputs {
    pub total: FlexTensor,
    pub cross_entropy: FlexTensor,
    pub divergence: FlexTensor,
    pub hidden_gradient: Option<FlexTensor>,
    pub weight_gradient: Option<FlexTensor>,
    /// `[rows]` token ids, of the targets' integer type.
    pub predictions: Option<FlexTensor>,
}

/// The teacher of [`head_losses`] with its ids read.
enum ChunkTeacher<'a> {
    Labels,
    Dense {
        hidden: &'a FlexTensor,
        weight: &'a FlexTensor,
    },
    Sparse {
        ids: Vec<usize>,
        log_probs: std::borrow::Cow<'a, [f32]>,
        k: usize,
    },
}

/// A block of rows' teacher in one chunk: what [`rows::forward_kl`] and
/// [`rows::sparse_forward_kl`] read, and [`rows::head_gradient`] after them.
enum TeacherBlock<'a> {
    Labels,
    Dense(&'a [f32]),
    Sparse {
        ids: &'a [usize],
        log_probs: &'a [f32],
    },
}

impl ChunkTeacher<'_> {
    /// The teacher of `rows` (rows of the whole batch), the `block`-th block of its chunk, whose
    /// logits a dense teacher holds in `chunk_logits`.
    fn block<'a>(
        &'a self,
        chunk_logits: &'a [f32],
        block: usize,
        rows: std::ops::Range<usize>,
        vocab: usize,
    ) -> TeacherBlock<'a> {
        match self {
            ChunkTeacher::Labels => TeacherBlock::Labels,
            ChunkTeacher::Dense { .. } => TeacherBlock::Dense(
                &chunk_logits[block * ROW_BLOCK * vocab..][..rows.len() * vocab],
            ),
            ChunkTeacher::Sparse { ids, log_probs, k } => TeacherBlock::Sparse {
                ids: &ids[rows.start * k..rows.end * k],
                log_probs: &log_probs[rows.start * (k + 1)..rows.end * (k + 1)],
            },
        }
    }
}

/// Rows `start..start + count` of `hidden` times `weight` into `logits` (`count x vocab`).
fn chunk_logits(
    hidden: &FlexTensor,
    weight: &FlexTensor,
    start: usize,
    count: usize,
    logits: &mut Vec<f32>,
) {
    let ((rows, width), (_, vocab)) = (matrix_dims(hidden), matrix_dims(weight));
    assert!(
        start + count <= rows,
        "rows {start}..{} of {rows}",
        start + count
    );
    logits.clear();
    logits.reserve(count * vocab);
    let strides = matrix_strides(hidden);
    // SAFETY: rows `start..start + count` of `hidden` lie in its storage, as does `weight`, and
    // `logits` has room for the `count x vocab` values gemm writes, all of them.
    unsafe {
        gemm(
            (count, vocab, width),
            logits.as_mut_ptr(),
            (vocab as isize, 1),
            matrix_start(hidden).offset(start as isize * strides.0),
            strides,
            matrix_start(weight),
            matrix_strides(weight),
            1.0,
            false,
            gemm::Parallelism::Rayon(0),
        );
        logits.set_len(count * vocab);
    }
}

/// Per-row statistics of a block of rows of one chunk.
struct BlockLosses {
    cross_entropy: Vec<f32>,
    log_sum_exps: Vec<f32>,
    divergence: Vec<f32>,
    student_lse: Vec<f32>,
    /// The teacher's log-sum-exp at the temperature (a dense teacher), or the student's over
    /// the uncached rest of the vocabulary (a cached one).
    second_lse: Vec<f32>,
    /// Each row's most likely token, when asked for.
    predictions: Vec<usize>,
}

/// The output head `hidden` `[rows, width]` x `weight` `[width, vocab]` and the losses of its
/// logits, a chunk of rows at a time (see [`crate::head_losses`]). The gradients of the total
/// with respect to `hidden` and `weight` are taken chunk by chunk from the chunk's logits,
/// overwritten in place by their gradient; the weight's is laid out as the weight is (a
/// transposed `[vocab, width]` table's gradient is a transposed `[vocab, width]` table).
#[allow(clippy::too_many_arguments)]
pub fn head_losses(
    hidden: &FlexTensor,
    weight: &FlexTensor,
    targets: &FlexTensor,
    ce_scales: &FlexTensor,
    teacher: &crate::HeadTeacherTensors<burn::backend::Flex>,
    kl_scales: &FlexTensor,
    inverse_temperature: f32,
    requests: HeadRequests,
) -> HeadLossOutputs {
    let ((rows, width), (inner, vocab)) = (matrix_dims(hidden), matrix_dims(weight));
    assert_eq!(
        width, inner,
        "[{rows}, {width}] hidden states and a [{inner}, {vocab}] head"
    );
    let targets_dtype = targets.dtype();
    let targets = indices(targets, vocab);
    let ce_scales = contiguous_f32(ce_scales);
    let kl_scales = contiguous_f32(kl_scales);
    assert_eq!(
        (targets.len(), ce_scales.len(), kl_scales.len()),
        (rows, rows, rows)
    );
    let teacher = match teacher {
        crate::HeadTeacherTensors::Labels => ChunkTeacher::Labels,
        crate::HeadTeacherTensors::Dense { hidden, weight } => {
            let ((teacher_rows, teacher_width), (inner, teacher_vocab)) =
                (matrix_dims(hidden), matrix_dims(weight));
            assert_eq!(
                (teacher_rows, teacher_width, teacher_vocab),
                (rows, inner, vocab),
                "the teacher's hidden states and head against the student's"
            );
            ChunkTeacher::Dense { hidden, weight }
        }
        crate::HeadTeacherTensors::Sparse { ids, log_probs } => {
            let k = last_dim(ids);
            let log_probs = contiguous_f32(log_probs);
            assert_eq!(log_probs.len(), rows * (k + 1), "k + 1 outcomes per row");
            ChunkTeacher::Sparse {
                ids: indices(ids, vocab),
                log_probs,
                k,
            }
        }
    };
    let chunk_rows = (HEAD_CHUNK_ELEMENTS / vocab / ROW_BLOCK * ROW_BLOCK).max(HEAD_CHUNK_MIN_ROWS);
    let mut logits: Vec<f32> = Vec::new();
    let mut teacher_logits: Vec<f32> = Vec::new();
    let mut cross_entropy = vec![0.0f32; rows];
    let mut divergence = vec![0.0f32; rows];
    let mut predictions: Vec<usize> =
        Vec::with_capacity(if requests.predictions { rows } else { 0 });
    let mut hidden_gradient: Vec<f32> = Vec::with_capacity(if requests.hidden_gradient {
        rows * width
    } else {
        0
    });
    let mut weight_gradient: Vec<f32> = Vec::with_capacity(if requests.weight_gradient {
        width * vocab
    } else {
        0
    });
    // A `[width, vocab]` view of a `[vocab, width]` table gets its gradient in the table's
    // layout, so the view's backward pass hands the table a contiguous gradient.
    let weight_gradient_strides = if matrix_strides(weight) == (1, width as isize) {
        (1, width as isize)
    } else {
        (vocab as isize, 1)
    };
    let hidden_strides = matrix_strides(hidden);
    let weight_strides = matrix_strides(weight);
    let weight_transposed = (weight_strides.1, weight_strides.0);
    for (chunk, start) in (0..rows).step_by(chunk_rows).enumerate() {
        let count = chunk_rows.min(rows - start);
        chunk_logits(hidden, weight, start, count, &mut logits);
        if let ChunkTeacher::Dense { hidden, weight } = &teacher {
            chunk_logits(hidden, weight, start, count, &mut teacher_logits);
        }
        let blocks: Vec<BlockLosses> = logits
            .par_chunks(ROW_BLOCK * vocab)
            .enumerate()
            .map(|(block, student)| {
                let first = start + block * ROW_BLOCK;
                let block_rows = student.len() / vocab;
                let range = first..first + block_rows;
                let mut losses = BlockLosses {
                    cross_entropy: vec![0.0; block_rows],
                    log_sum_exps: vec![0.0; block_rows],
                    divergence: vec![0.0; block_rows],
                    student_lse: vec![0.0; block_rows],
                    second_lse: vec![0.0; block_rows],
                    predictions: Vec::new(),
                };
                if requests.predictions {
                    losses.predictions = student.chunks_exact(vocab).map(rows::argmax).collect();
                }
                rows::cross_entropy(
                    student,
                    &targets[range.clone()],
                    vocab,
                    &mut losses.cross_entropy,
                    &mut losses.log_sum_exps,
                );
                match teacher.block(&teacher_logits, block, range.clone(), vocab) {
                    TeacherBlock::Labels => {}
                    TeacherBlock::Dense(teacher) => rows::forward_kl(
                        student,
                        teacher,
                        vocab,
                        inverse_temperature,
                        &mut losses.divergence,
                        &mut losses.student_lse,
                        &mut losses.second_lse,
                    ),
                    TeacherBlock::Sparse { ids, log_probs } => rows::sparse_forward_kl(
                        rows::SparseRows {
                            student,
                            ids,
                            teacher: log_probs,
                            vocab,
                            inverse_temperature,
                        },
                        &mut losses.divergence,
                        &mut losses.student_lse,
                        &mut losses.second_lse,
                    ),
                }
                losses
            })
            .collect();
        for (block, losses) in blocks.iter().enumerate() {
            let first = start + block * ROW_BLOCK;
            let range = first..first + losses.cross_entropy.len();
            cross_entropy[range.clone()].copy_from_slice(&losses.cross_entropy);
            divergence[range].copy_from_slice(&losses.divergence);
            predictions.extend_from_slice(&losses.predictions);
        }
        if !requests.hidden_gradient && !requests.weight_gradient {
            continue;
        }
        logits
            .par_chunks_mut(ROW_BLOCK * vocab)
            .zip(blocks.par_iter())
            .enumerate()
            .for_each(|(block, (student, losses))| {
                let first = start + block * ROW_BLOCK;
                let block_rows = student.len() / vocab;
                let range = first..first + block_rows;
                let divergence = match teacher.block(&teacher_logits, block, range.clone(), vocab) {
                    TeacherBlock::Labels => rows::DivergenceRows::None,
                    TeacherBlock::Dense(teacher) => rows::DivergenceRows::Dense {
                        teacher,
                        student_lse: &losses.student_lse,
                        teacher_lse: &losses.second_lse,
                    },
                    TeacherBlock::Sparse { ids, log_probs } => rows::DivergenceRows::Sparse {
                        ids,
                        teacher: log_probs,
                        student_lse: &losses.student_lse,
                        student_rest_lse: &losses.second_lse,
                    },
                };
                rows::head_gradient(
                    student,
                    vocab,
                    &targets[range.clone()],
                    &losses.log_sum_exps,
                    &ce_scales[range.clone()],
                    divergence,
                    &kl_scales[range],
                    inverse_temperature,
                );
            });
        if requests.hidden_gradient {
            // SAFETY: rows `start..start + count` of the `rows x width` gradient are in its
            // capacity and written whole; `logits` holds `count x vocab` gradients.
            unsafe {
                gemm(
                    (count, width, vocab),
                    hidden_gradient.as_mut_ptr().add(start * width),
                    (width as isize, 1),
                    logits.as_ptr(),
                    (vocab as isize, 1),
                    matrix_start(weight),
                    weight_transposed,
                    1.0,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        if requests.weight_gradient {
            // SAFETY: the `width x vocab` gradient is in its capacity, written whole by the
            // first chunk and added to by the others.
            unsafe {
                gemm(
                    (width, vocab, count),
                    weight_gradient.as_mut_ptr(),
                    weight_gradient_strides,
                    matrix_start(hidden).offset(start as isize * hidden_strides.0),
                    (hidden_strides.1, hidden_strides.0),
                    logits.as_ptr(),
                    (vocab as isize, 1),
                    1.0,
                    chunk > 0,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }
    let total: f64 = (0..rows)
        .map(|row| {
            f64::from(ce_scales[row]) * f64::from(cross_entropy[row])
                + f64::from(kl_scales[row]) * f64::from(divergence[row])
        })
        .sum();
    let hidden_gradient = requests.hidden_gradient.then(|| {
        // SAFETY: every chunk wrote its rows.
        unsafe { hidden_gradient.set_len(rows * width) };
        tensor(hidden_gradient, Shape::new([rows, width]))
    });
    let weight_gradient = requests.weight_gradient.then(|| {
        // SAFETY: the first chunk wrote every element.
        unsafe { weight_gradient.set_len(width * vocab) };
        FlexTensor::new(
            Bytes::from_elems(weight_gradient),
            Layout::new(
                Shape::new([width, vocab]),
                vec![weight_gradient_strides.0, weight_gradient_strides.1],
                0,
            ),
            DType::F32,
        )
    });
    let predictions = requests
        .predictions
        .then(|| token_ids(&predictions, targets_dtype));
    HeadLossOutputs {
        total: tensor(vec![total as f32], Shape::new([1])),
        cross_entropy: tensor(cross_entropy, Shape::new([rows])),
        divergence: tensor(divergence, Shape::new([rows])),
        hidden_gradient,
        weight_gradient,
        predictions,
    }
}

/// Per row of the output head: the cross-entropy on `targets` and the most likely token,
/// from [`head_losses`] with no teacher and no gradient.
pub fn head_scores(
    hidden: &FlexTensor,
    weight: &FlexTensor,
    targets: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let unweighted = tensor(vec![0.0; matrix_dims(hidden).0], shape_of(targets));
    let outputs = head_losses(
        hidden,
        weight,
        targets,
        &unweighted,
        &crate::HeadTeacherTensors::Labels,
        &unweighted,
        1.0,
        HeadRequests {
            hidden_gradient: false,
            weight_gradient: false,
            predictions: true,
        },
    );
    let predictions = outputs.predictions.expect("predictions were asked for");
    (outputs.cross_entropy, predictions)
}

/// `tensor` times the one value of `factor`: a loss's gradient scaled by the gradient that
/// reaches the loss, in place when the caller alone holds it.
pub fn scaled(mut tensor: FlexTensor, factor: &FlexTensor) -> FlexTensor {
    let factor = contiguous_f32(factor)[0];
    if factor == 1.0 {
        return tensor;
    }
    // Every stored value is one of the tensor's (a transposed table's gradient too), unless it
    // is a view into a larger buffer.
    if tensor.bytes().len() != tensor.layout().num_elements() * std::mem::size_of::<f32>() {
        tensor = standalone(tensor);
    }
    tensor
        .storage_mut::<f32>()
        .par_chunks_mut(ELEMENT_BLOCK)
        .for_each(|values| {
            for value in values {
                *value *= factor;
            }
        });
    tensor
}

pub fn swiglu(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let (g, u) = (contiguous_f32(gate), contiguous_f32(up));
    let mut output = vec![0.0; g.len()];
    output
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(g.par_chunks(ELEMENT_BLOCK))
        .zip(u.par_chunks(ELEMENT_BLOCK))
        .for_each(|((output, g), u)| rows::swiglu(g, u, output));
    tensor(output, shape_of(gate))
}

pub fn swiglu_backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    gradient: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let (g, u, d) = (
        contiguous_f32(gate),
        contiguous_f32(up),
        contiguous_f32(gradient),
    );
    let mut gate_gradient = vec![0.0; g.len()];
    let mut up_gradient = vec![0.0; g.len()];
    gate_gradient
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(up_gradient.par_chunks_mut(ELEMENT_BLOCK))
        .zip(g.par_chunks(ELEMENT_BLOCK))
        .zip(u.par_chunks(ELEMENT_BLOCK))
        .zip(d.par_chunks(ELEMENT_BLOCK))
        .for_each(|((((dg, du), g), u), d)| rows::swiglu_backward(g, u, d, dg, du));
    (
        tensor(gate_gradient, shape_of(gate)),
        tensor(up_gradient, shape_of(up)),
    )
}

/// RMS normalization over the last dimension; returns the output and each row's inverse RMS.
pub fn rms_norm(x: &FlexTensor, gain: &FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
    let width = last_dim(x);
    let values = contiguous_f32(x);
    let gain = contiguous_f32(gain);
    let rows = values.len() / width;
    let mut output = vec![0.0; values.len()];
    let mut inverse_rms = vec![0.0; rows];
    output
        .par_chunks_mut(ROW_BLOCK * width)
        .zip(inverse_rms.par_chunks_mut(ROW_BLOCK))
        .zip(values.par_chunks(ROW_BLOCK * width))
        .for_each(|((output, inverse), x)| rows::rms_norm(x, &gain, eps, output, inverse));
    (
        tensor(output, shape_of(x)),
        tensor(inverse_rms, Shape::new([rows])),
    )
}

/// Gradients of [`rms_norm`] with respect to the input and the gain.
pub fn rms_norm_backward(
    x: &FlexTensor,
    gain: &FlexTensor,
    inverse_rms: &FlexTensor,
    gradient: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let width = last_dim(x);
    let values = contiguous_f32(x);
    let gain_values = contiguous_f32(gain);
    let inverse = contiguous_f32(inverse_rms);
    let gradient = contiguous_f32(gradient);
    let mut input_gradient = vec![0.0; values.len()];
    // Each block's gain gradient is summed in block order afterwards: a fixed order.
    let block_gains: Vec<Vec<f32>> = input_gradient
        .par_chunks_mut(ROW_BLOCK * width)
        .zip(values.par_chunks(ROW_BLOCK * width))
        .zip(inverse.par_chunks(ROW_BLOCK))
        .zip(gradient.par_chunks(ROW_BLOCK * width))
        .map(|(((dx, x), inverse), gradient)| {
            let mut gain_gradient = vec![0.0; width];
            rows::rms_norm_backward(x, &gain_values, inverse, gradient, dx, &mut gain_gradient);
            gain_gradient
        })
        .collect();
    let mut gain_gradient = vec![0.0; width];
    for block in block_gains {
        for (total, value) in gain_gradient.iter_mut().zip(block) {
            *total += value;
        }
    }
    (
        tensor(input_gradient, shape_of(x)),
        tensor(gain_gradient, shape_of(gain)),
    )
}

/// Rotary embedding of `[batch, heads, seq, head_dim]` at positions `start..start + seq`.
pub fn rotary(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin_signed: &FlexTensor,
    start: usize,
) -> FlexTensor {
    rotary_map(x, cos, sin_signed, start, rows::rotary)
}

pub fn rotary_backward(
    gradient: &FlexTensor,
    cos: &FlexTensor,
    sin_signed: &FlexTensor,
    start: usize,
) -> FlexTensor {
    rotary_map(gradient, cos, sin_signed, start, rows::rotary_backward)
}

/// A row map `(x, cos, sin_signed, output)`.
type RotaryRowKernel = fn(&[f32], &[f32], &[f32], &mut [f32]);

fn rotary_map(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin_signed: &FlexTensor,
    start: usize,
    kernel: RotaryRowKernel,
) -> FlexTensor {
    let shape = shape_of(x);
    let (seq, head_dim) = (shape[2], shape[3]);
    let values = contiguous_f32(x);
    let (cos, sin) = (contiguous_f32(cos), contiguous_f32(sin_signed));
    let tables = start * head_dim..(start + seq) * head_dim;
    let (cos, sin) = (&cos[tables.clone()], &sin[tables]);
    let mut output = vec![0.0; values.len()];
    // One task per (batch, head) matrix of `seq` rows.
    let matrix = seq * head_dim;
    distillery_workers::for_each_chunk_mut(&mut output, matrix, |index, output| {
        let x = &values[index * matrix..(index + 1) * matrix];
        for (((out, x), cos), sin) in output
            .chunks_exact_mut(head_dim)
            .zip(x.chunks_exact(head_dim))
            .zip(cos.chunks_exact(head_dim))
            .zip(sin.chunks_exact(head_dim))
        {
            kernel(x, cos, sin, out);
        }
    });
    tensor(output, shape)
}

/// Inverted dropout of `x` with probability `probability`, the mask drawn from `seed`.
pub fn dropout(x: &FlexTensor, probability: f32, seed: u64) -> FlexTensor {
    let values = contiguous_f32(x);
    assert!(
        values.len() <= u32::MAX as usize,
        "dropout indexes elements with 32 bits"
    );
    // The 64-bit seed folded into the hash's 32-bit key.
    let key = (seed ^ (seed >> 32)) as u32;
    let threshold = (f64::from(probability) * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    let scale = 1.0 / (1.0 - probability);
    let mut output = vec![0.0; values.len()];
    output
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(values.par_chunks(ELEMENT_BLOCK))
        .enumerate()
        .for_each(|(block, (output, x))| {
            let first = (block * ELEMENT_BLOCK) as u32;
            rows::dropout(x, key, first, threshold, scale, output)
        });
    tensor(output, shape_of(x))
}

/// Parallel tasks of [`rows_times_matrix`], each a run of consecutive weight rows: few, so
/// the partial sums that the runs write and the caller adds back (runs x rows x outputs
/// floats) stay small beside the weight, which at four rows and runs of 32 weight rows they
/// did not; a fixed count, not one a thread, so the bits do not depend on the thread count.
const PRODUCT_RUNS: usize = 8;
/// Outputs per parallel task of [`rows_times_matrix`] on a transposed weight.
const PRODUCT_DOTS: usize = 256;
/// Floats of a transposed weight that [`rows_times_matrix`] has every input row meet at once.
const CACHED_FLOATS: usize = 16 * 1024;
/// Partial sums from which [`rows_times_matrix`] adds its runs' results in parallel.
const PARALLEL_SUMS: usize = 1 << 16;
/// Outputs per parallel task adding the runs' partial sums.
const SUM_BLOCK: usize = 1024;

/// `x W` for a few rows `x` (`[rows, in]`) and `W` (`[in, out]`, or a transposed `[out, in]`
/// table): fixed runs of weight rows in parallel, each read front to back into partial sums
/// of every row of `x` while it is in cache, the partial sums then added in run order. The
/// weight streams from memory in one pass and is never packed; the runs depend neither on the
/// thread count nor on the number of rows, so each row's sums are the bits it gets alone.
pub fn rows_times_matrix(x: &FlexTensor, weight: &FlexTensor) -> FlexTensor {
    let shape = weight.layout().shape();
    let (inputs, outputs) = (shape[0], shape[1]);
    let x = contiguous_f32(x);
    assert!(
        !x.is_empty() && x.len().is_multiple_of(inputs),
        "rows of the weight's inputs"
    );
    let rows = x.len() / inputs;
    // A transposed view of an `[out, in]` table (a tied output head): one dot product an
    // output, each over a contiguous row.
    if weight.layout().strides() == [1, inputs as isize] {
        let start = weight.layout().start_offset();
        let table = &weight.storage::<f32>()[start..start + inputs * outputs];
        // Every row of `x` meets a few table rows (64 KiB) while they sit in the core's own
        // cache, so the table streams from memory once for all of them.
        let cached_rows = (CACHED_FLOATS / inputs).clamp(1, PRODUCT_DOTS);
        let runs =
            distillery_workers::map_tasks(table.len().div_ceil(PRODUCT_DOTS * inputs), |run| {
                let start = run * PRODUCT_DOTS * inputs;
                let table_rows = &table[start..(start + PRODUCT_DOTS * inputs).min(table.len())];
                let width = table_rows.len() / inputs;
                let mut out = vec![0.0f32; rows * width];
                let step = cached_rows * inputs;
                for (first, cached) in table_rows.chunks(step).enumerate() {
                    // The table rows after these, which the task (or the next) reads next.
                    let next = &table[(start + (first + 1) * step).min(table.len())..];
                    let next = &next[..next.len().min(step)];
                    let out = &mut out[first * cached_rows..];
                    rows::rows_dot(&x, inputs, cached, next, out, width);
                }
                out
            });
        let mut out = vec![0.0f32; rows * outputs];
        distillery_workers::for_each_chunk_mut(&mut out, outputs, |row, out| {
            let mut at = 0;
            for run in &runs {
                let width = run.len() / rows;
                out[at..at + width].copy_from_slice(&run[row * width..(row + 1) * width]);
                at += width;
            }
        });
        return tensor(out, Shape::new([rows, outputs]));
    }
    let weight = contiguous_f32(weight);
    // Whole passes of the kernel in every run but the last.
    let run_rows = inputs
        .div_ceil(PRODUCT_RUNS)
        .next_multiple_of(rows::ROWS_PER_PASS);
    let runs = inputs.div_ceil(run_rows);
    let each = rows * outputs;
    let product = |partials: &mut [f32]| {
        // Run by run, each row's partial sums, written whole by the task of the run.
        distillery_workers::for_each_chunk_mut(partials, each, |run, partial| {
            let first_weight = run * run_rows * outputs;
            let run_weight =
                &weight[first_weight..(first_weight + run_rows * outputs).min(weight.len())];
            let columns = run * run_rows..run * run_rows + run_weight.len() / outputs;
            // Each row's columns of this run, in place.
            let x: [&[f32]; crate::FEW_ROWS] = std::array::from_fn(|row| {
                if row < rows {
                    &x[row * inputs..][columns.clone()]
                } else {
                    &[]
                }
            });
            // The weight rows of the next run, asked for while this run's last pass computes.
            let next = weight
                .get((run + 1) * run_rows * outputs..)
                .unwrap_or_default();
            let next = &next[..next.len().min(run_rows * outputs)];
            rows::rows_times_rows(&x[..rows], run_weight, next, partial);
        });
        // The later runs' partial sums added, in run order, into the first run's; over many
        // rows in parallel blocks of outputs (a decode step's one row would spend more handing
        // the blocks out than adding).
        let mut out = partials[..each].to_vec();
        let later = &partials[each..];
        let add_runs = |first: usize, out: &mut [f32]| {
            for partial in later.chunks_exact(each) {
                for (sum, &value) in out.iter_mut().zip(&partial[first..]) {
                    *sum += value;
                }
            }
        };
        if runs * each < PARALLEL_SUMS {
            add_runs(0, &mut out);
        } else {
            distillery_workers::for_each_chunk_mut(&mut out, SUM_BLOCK, |block, out| {
                add_runs(block * SUM_BLOCK, out)
            });
        }
        out
    };
    let out = RUN_SUMS.with(|kept| match kept.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < runs * each {
                kept.resize(runs * each, 0.0);
            }
            product(&mut kept[..runs * each])
        }
        // A product running inside another's tasks on this thread.
        Err(_) => product(&mut vec![0.0; runs * each]),
    });
    tensor(out, Shape::new([rows, outputs]))
}

thread_local! {
    /// The runs' partial sums of [`rows_times_matrix`], kept from one product to the next: a
    /// decode step makes hundreds of products, and clearing fresh partial sums for each cost
    /// more than adding them.
    static RUN_SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `tensor` as the sole view of its own contiguous storage, so `storage_mut` is exactly its
/// elements (copying only when it is a strided or partial view).
fn standalone(input: FlexTensor) -> FlexTensor {
    let elements = input.layout().num_elements();
    let exact = input.layout().contiguous_offsets() == Some((0, elements))
        && input.bytes().len() == elements * std::mem::size_of::<f32>();
    if exact {
        input
    } else {
        tensor(contiguous_f32(&input).into_owned(), shape_of(&input))
    }
}

/// One AdamW update; returns the new parameter and moments. A parameter or moment owned only by
/// the caller is updated in place (a shared one is copied first).
pub fn adamw(
    parameter: FlexTensor,
    gradient: &FlexTensor,
    first: FlexTensor,
    second: FlexTensor,
    step: &rows::AdamWStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let mut parameter = standalone(parameter);
    let gradient = contiguous_f32(gradient);
    let mut first = standalone(first);
    let mut second = standalone(second);
    let first_values = first.storage_mut::<f32>();
    let second_values = second.storage_mut::<f32>();
    parameter
        .storage_mut::<f32>()
        .par_chunks_mut(ELEMENT_BLOCK)
        .zip(gradient.par_chunks(ELEMENT_BLOCK))
        .zip(first_values.par_chunks_mut(ELEMENT_BLOCK))
        .zip(second_values.par_chunks_mut(ELEMENT_BLOCK))
        .for_each(|(((p, g), m), v)| rows::adamw(p, g, m, v, step));
    (parameter, first, second)
}

/// A 4-D tensor's element strides and offset, for reading it in place.
struct Strided<'a> {
    values: &'a [f32],
    offset: usize,
    strides: [isize; 4],
}

impl<'a> Strided<'a> {
    fn new(tensor: &'a FlexTensor) -> Self {
        assert_eq!(tensor.dtype(), DType::F32, "fused kernels take f32 tensors");
        let layout = tensor.layout();
        let strides = layout.strides();
        Self {
            values: tensor.storage::<f32>(),
            offset: layout.start_offset(),
            strides: [strides[0], strides[1], strides[2], strides[3]],
        }
    }

    /// Pointer to matrix `[batch, head]` with its row and column strides.
    fn matrix(&self, batch: usize, head: usize) -> (*const f32, isize, isize) {
        let start = self.offset as isize
            + batch as isize * self.strides[0]
            + head as isize * self.strides[1];
        // SAFETY: `start` is the offset of an element inside the tensor's storage, as the
        // layout's strides address only elements of that storage.
        let pointer = unsafe { self.values.as_ptr().offset(start) };
        (pointer, self.strides[2], self.strides[3])
    }
}

/// Dimensions of one attention call.
#[derive(Clone, Copy)]
struct AttentionShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl AttentionShape {
    fn new(query: &FlexTensor, key: &FlexTensor) -> Self {
        let q = query.layout().shape();
        let k = key.layout().shape();
        assert!(
            q[1].is_multiple_of(k[1]) && q[0] == k[0] && q[3] == k[3] && k[2] >= q[2],
            "attention shapes: queries {q:?}, keys {k:?}"
        );
        Self {
            batch: q[0],
            heads: q[1],
            kv_heads: k[1],
            queries: q[2],
            keys: k[2],
            head_dim: q[3],
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Products of at least this many multiply-adds split their output over the threads: burn-flex's
/// own threshold and split, so that a product has the same bits by either path.
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// `lhs rhs` of two matrices, strided views included (a transposed weight or input), written by
/// gemm straight into the tensor returned.
pub fn matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> FlexTensor {
    let ((m, k), (inner, n)) = (matrix_dims(lhs), matrix_dims(rhs));
    assert_eq!(k, inner, "a [{m}, {k}] matrix times a [{inner}, {n}] one");
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_PRODUCT {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: both operands lie in their tensors' storage as their layouts say; gemm writes
    // every one of the `m x n` outputs without reading them, so `out` is initialized after it.
    unsafe {
        gemm(
            (m, n, k),
            out.as_mut_ptr(),
            (n as isize, 1),
            matrix_start(lhs),
            matrix_strides(lhs),
            matrix_start(rhs),
            matrix_strides(rhs),
            1.0,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    tensor(out, Shape::new([m, n]))
}

fn matrix_dims(matrix: &FlexTensor) -> (usize, usize) {
    let shape = matrix.layout().shape();
    assert_eq!(shape.num_dims(), 2, "a matrix");
    (shape[0], shape[1])
}

fn matrix_strides(matrix: &FlexTensor) -> (isize, isize) {
    let strides = matrix.layout().strides();
    (strides[0], strides[1])
}

fn matrix_start(matrix: &FlexTensor) -> *const f32 {
    let storage = matrix.storage::<f32>();
    assert!(matrix.layout().start_offset() <= storage.len());
    // SAFETY: the offset was checked to lie within the storage.
    unsafe { storage.as_ptr().add(matrix.layout().start_offset()) }
}

/// `dst = beta * lhs x rhs (+ dst when accumulate)`, all matrices given by pointer and
/// (row, column) strides. Without `accumulate`, `dst` is only written, so it may be
/// uninitialized.
///
/// # Safety
/// Every pointer must address a matrix of the given size and strides inside live storage, and
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    beta: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.1,
            dst_strides.0,
            accumulate,
            lhs,
            lhs_strides.1,
            lhs_strides.0,
            rhs,
            rhs_strides.1,
            rhs_strides.0,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A raw pointer that may cross into rayon tasks; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint matrices of the buffer the pointer addresses (see each use).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The element `offset` places on. A method, so closures capture the whole `SendPtr`
    /// rather than its raw-pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Query counts up to which [`causal_attention`] takes each query on its own.
const FEW_QUERIES: usize = crate::FEW_ROWS;

/// Queries [`attend`] takes through the keys together: each tile stops at the keys its last
/// query sees.
const QUERY_TILE: usize = 32;

/// A strided matrix: its first element and its row and column strides.
type StridedMatrix = (*const f32, isize, isize);

/// One head's causal attention of `queries` queries over the first `keys` keys and values,
/// the queries aligned to the last keys, through matrix products: the scores and then
/// probabilities into `p` (`queries x keys`), the weighted values into `out`
/// (`queries x head_dim`).
///
/// # Safety
/// The matrices must address `queries` (query) and `keys` (key, value) rows of `head_dim`
/// values inside live storage.
unsafe fn attend(
    (q_ptr, q_rs, q_cs): StridedMatrix,
    ((k_ptr, k_rs, k_cs), (v_ptr, v_rs, v_cs)): (StridedMatrix, StridedMatrix),
    (queries, keys): (usize, usize),
    head_dim: usize,
    scale: f32,
    p: &mut [f32],
    out: &mut [f32],
) {
    assert!(p.len() >= queries * keys && out.len() >= queries * head_dim);
    // Tiles of queries, each over the keys its last query sees: the scores and weighted sums
    // the mask would zero are never computed (nearly half of them for a prompt without a
    // cache). Each row's softmax and sums cover the same keys in the same order as over all
    // keys, whose masked probabilities are exact zeros.
    let offset = keys - queries;
    for first in (0..queries).step_by(QUERY_TILE) {
        let rows = QUERY_TILE.min(queries - first);
        let visible = offset + first + rows;
        let tile = &mut p[first * keys..(first + rows) * keys];
        // SAFETY: p and out are the caller's own buffers, checked above; the tile's `rows`
        // query rows and the first `visible` key and value rows lie in the views the caller
        // vouches for.
        unsafe {
            // scores = q k^T
            gemm(
                (rows, visible, head_dim),
                tile.as_mut_ptr(),
                (keys as isize, 1),
                q_ptr.offset(first as isize * q_rs),
                (q_rs, q_cs),
                k_ptr,
                (k_cs, k_rs),
                1.0,
                false,
                gemm::Parallelism::None,
            );
        }
        rows::causal_softmax(tile, keys, first, offset, scale);
        // SAFETY: as above.
        unsafe {
            gemm(
                (rows, head_dim, visible),
                out[first * head_dim..].as_mut_ptr(),
                (head_dim as isize, 1),
                tile.as_ptr(),
                (keys as isize, 1),
                v_ptr,
                (v_rs, v_cs),
                1.0,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// The attention of the `heads` query heads that share one key and value head (head `g`'s
/// queries `query_head(g)`, `queries` rows, at most [`FEW_QUERIES`]) on the kernel family's
/// lanes, each query row over the keys it sees (the queries aligned to the last of `keys`),
/// exactly as a decode step at its position computes it: the group's heads together, row by
/// row ([`rows::grouped_query_attention`]). `p` is `heads x queries x keys` (the keys a row does
/// not see left as they are), `out` `heads x queries x head_dim`.
///
/// # Safety
/// Each matrix must address its rows (`queries` for a query head, `keys` for the keys and
/// values) of `head_dim` values inside live storage, with unit column strides and
/// non-negative row strides.
unsafe fn attend_on_lanes(
    (heads, query_head): (usize, impl Fn(usize) -> StridedMatrix),
    ((k_ptr, k_rs, _), (v_ptr, v_rs, _)): (StridedMatrix, StridedMatrix),
    (queries, keys): (usize, usize),
    head_dim: usize,
    scale: f32,
    p: &mut [f32],
    out: &mut [f32],
) {
    assert!(p.len() >= heads * queries * keys && out.len() >= heads * queries * head_dim);
    let rows_span = |stride: isize| (keys - 1) * stride as usize + head_dim;
    // SAFETY: the caller vouches that the `keys` key and value rows lie in live storage; with
    // unit column strides each row is `head_dim` consecutive values, and non-negative row
    // strides put every row within the span from the first.
    let (key_rows, value_rows) = unsafe {
        (
            std::slice::from_raw_parts(k_ptr, rows_span(k_rs)),
            std::slice::from_raw_parts(v_ptr, rows_span(v_rs)),
        )
    };
    let mut query_rows = vec![0.0f32; heads * head_dim];
    let gather_queries = |row: usize, query_rows: &mut [f32]| {
        for (head, query) in query_rows.chunks_exact_mut(head_dim).enumerate() {
            let (q_ptr, q_rs, _) = query_head(head);
            // SAFETY: the caller vouches for the head's `queries` rows of `head_dim`
            // consecutive values.
            query.copy_from_slice(unsafe {
                std::slice::from_raw_parts(q_ptr.offset(row as isize * q_rs), head_dim)
            });
        }
    };
    if queries == 1 {
        // A decode step: each head's probabilities and outputs are one run of `p` and `out`.
        gather_queries(0, &mut query_rows);
        return rows::grouped_query_attention(
            heads,
            &query_rows,
            (key_rows, k_rs as usize),
            (value_rows, v_rs as usize),
            scale,
            &mut p[..heads * keys],
            &mut out[..heads * head_dim],
        );
    }
    let mut probabilities = vec![0.0f32; heads * keys];
    let mut sums = vec![0.0f32; heads * head_dim];
    for row in 0..queries {
        let visible = keys - queries + row + 1;
        gather_queries(row, &mut query_rows);
        let probabilities = &mut probabilities[..heads * visible];
        rows::grouped_query_attention(
            heads,
            &query_rows,
            (key_rows, k_rs as usize),
            (value_rows, v_rs as usize),
            scale,
            probabilities,
            &mut sums,
        );
        for (head, (probabilities, sums)) in probabilities
            .chunks_exact(visible)
            .zip(sums.chunks_exact(head_dim))
            .enumerate()
        {
            let at = head * queries + row;
            p[at * keys..][..visible].copy_from_slice(probabilities);
            out[at * head_dim..][..head_dim].copy_from_slice(sums);
        }
    }
}

/// Causal attention `softmax(q k^T / sqrt(d)) v` over `[batch, heads, queries, head_dim]`
/// queries and `[batch, kv_heads, keys, head_dim]` keys and values (each key/value head serving
/// `heads / kv_heads` consecutive query heads; queries aligned to the last keys). Returns the
/// output and the attention probabilities `[batch, heads, queries, keys]`.
pub fn causal_attention(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = AttentionShape::new(query, key);
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        head_dim,
    } = shape;
    let (q, k, v) = (Strided::new(query), Strided::new(key), Strided::new(value));
    let mut probabilities = vec![0.0f32; batch * heads * queries * keys];
    let mut output = vec![0.0f32; batch * heads * queries * head_dim];
    let offset = keys - queries;
    let scale = shape.scale();
    let groups = shape.groups();
    let (p_matrix, out_matrix) = (queries * keys, queries * head_dim);
    // Row and column strides, the same for every batch entry and head.
    let (q_cs, [k_rs, k_cs], [v_rs, v_cs]) = (
        q.strides[3],
        [k.strides[2], k.strides[3]],
        [v.strides[2], v.strides[3]],
    );
    if queries <= FEW_QUERIES && q_cs == 1 && k_cs == 1 && v_cs == 1 && k_rs >= 0 && v_rs >= 0 {
        // A decode step's query, or a few (a speculative decoding check, a short prompt) each
        // on its own over the keys it sees: one task per key and value head, with the query
        // heads that share it.
        distillery_workers::for_each_chunk_pair_mut(
            (&mut probabilities, groups * p_matrix),
            (&mut output, groups * out_matrix),
            |index, p, out| {
                let (b, kv_head) = (index / kv_heads, index % kv_heads);
                // SAFETY: the views address `queries` and `keys` rows inside their tensors,
                // with the strides checked above (every head's are the tensor's).
                unsafe {
                    attend_on_lanes(
                        (groups, |head| q.matrix(b, kv_head * groups + head)),
                        (k.matrix(b, kv_head), v.matrix(b, kv_head)),
                        (queries, keys),
                        head_dim,
                        scale,
                        p,
                        out,
                    )
                };
            },
        );
    } else {
        distillery_workers::for_each_chunk_pair_mut(
            (&mut probabilities, p_matrix),
            (&mut output, out_matrix),
            |index, p, out| {
                let (b, h) = (index / heads, index % heads);
                let kv_head = h / groups;
                let (q_ptr, q_rs, q_cs) = q.matrix(b, h);
                let keys_values = (k.matrix(b, kv_head), v.matrix(b, kv_head));
                if queries == 1 || queries > FEW_QUERIES {
                    // SAFETY: the views address `queries` and `keys` rows inside their tensors.
                    unsafe {
                        attend(
                            (q_ptr, q_rs, q_cs),
                            keys_values,
                            (queries, keys),
                            head_dim,
                            scale,
                            p,
                            out,
                        )
                    };
                    return;
                }
                // A few queries on strides the lanes do not take: each on its own, over the
                // keys it sees, as a decode step at its position computes it.
                for (row, (p, out)) in p
                    .chunks_exact_mut(keys)
                    .zip(out.chunks_exact_mut(head_dim))
                    .enumerate()
                {
                    let visible = offset + row + 1;
                    // SAFETY: row `row` of the queries and the first `visible` keys lie inside
                    // their tensors.
                    unsafe {
                        attend(
                            (q_ptr.offset(row as isize * q_rs), q_rs, q_cs),
                            keys_values,
                            (1, visible),
                            head_dim,
                            scale,
                            &mut p[..visible],
                            out,
                        )
                    };
                }
            },
        );
    }
    (
        tensor(output, Shape::new([batch, heads, queries, head_dim])),
        tensor(probabilities, Shape::new([batch, heads, queries, keys])),
    )
}

/// Gradients of [`causal_attention`] with respect to the queries, keys and values.
pub fn causal_attention_backward(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
    probabilities: &FlexTensor,
    gradient: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = AttentionShape::new(query, key);
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        head_dim,
    } = shape;
    let groups = shape.groups();
    let scale = shape.scale();
    let (q, k, v) = (Strided::new(query), Strided::new(key), Strided::new(value));
    let p = contiguous_f32(probabilities);
    let grad = contiguous_f32(gradient);
    let mut dq = vec![0.0f32; batch * heads * queries * head_dim];
    let mut dk = vec![0.0f32; batch * kv_heads * keys * head_dim];
    let mut dv = vec![0.0f32; batch * kv_heads * keys * head_dim];
    let dq_ptr = SendPtr(dq.as_mut_ptr());
    let q_matrix = queries * head_dim;
    let p_matrix = queries * keys;
    // One task per key/value head, so the heads sharing it accumulate into its gradients in a
    // fixed order.
    dk.par_chunks_mut(keys * head_dim)
        .zip(dv.par_chunks_mut(keys * head_dim))
        .enumerate()
        .for_each(|(index, (dk, dv))| {
            let (b, kv_head) = (index / kv_heads, index % kv_heads);
            let (k_ptr, k_rs, k_cs) = k.matrix(b, kv_head);
            let (v_ptr, v_rs, v_cs) = v.matrix(b, kv_head);
            let mut dp = vec![0.0f32; p_matrix];
            for h in kv_head * groups..(kv_head + 1) * groups {
                let matrix = b * heads + h;
                let p = &p[matrix * p_matrix..(matrix + 1) * p_matrix];
                let grad = &grad[matrix * q_matrix..(matrix + 1) * q_matrix];
                let (q_ptr, q_rs, q_cs) = q.matrix(b, h);
                let accumulate = h > kv_head * groups;
                // SAFETY: dk, dv, dp are this task's buffers; the dq matrix of query head h
                // belongs to exactly this task (h maps to one kv head); the inputs are
                // read-only.
                unsafe {
                    // dv += p^T grad
                    gemm(
                        (keys, head_dim, queries),
                        dv.as_mut_ptr(),
                        (head_dim as isize, 1),
                        p.as_ptr(),
                        (1, keys as isize),
                        grad.as_ptr(),
                        (head_dim as isize, 1),
                        1.0,
                        accumulate,
                        gemm::Parallelism::None,
                    );
                    // dp = grad v^T
                    gemm(
                        (queries, keys, head_dim),
                        dp.as_mut_ptr(),
                        (keys as isize, 1),
                        grad.as_ptr(),
                        (head_dim as isize, 1),
                        v_ptr,
                        (v_cs, v_rs),
                        1.0,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                rows::softmax_backward(p, &mut dp, keys, scale);
                // SAFETY: as above.
                unsafe {
                    // dq = ds k
                    gemm(
                        (queries, head_dim, keys),
                        dq_ptr.at(matrix * q_matrix),
                        (head_dim as isize, 1),
                        dp.as_ptr(),
                        (keys as isize, 1),
                        k_ptr,
                        (k_rs, k_cs),
                        1.0,
                        false,
                        gemm::Parallelism::None,
                    );
                    // dk += ds^T q
                    gemm(
                        (keys, head_dim, queries),
                        dk.as_mut_ptr(),
                        (head_dim as isize, 1),
                        dp.as_ptr(),
                        (1, keys as isize),
                        q_ptr,
                        (q_rs, q_cs),
                        1.0,
                        accumulate,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
    let kv_shape = Shape::new([batch, kv_heads, keys, head_dim]);
    (
        tensor(dq, Shape::new([batch, heads, queries, head_dim])),
        tensor(dk, kv_shape.clone()),
        tensor(dv, kv_shape),
    )
}

/// Per-row `T^2 * KL(teacher_T || student_T)` of `[rows, vocab]` logits; returns the losses and
/// both log-sum-exps at temperature T.
pub fn forward_kl(
    student: &FlexTensor,
    teacher: &FlexTensor,
    inverse_temperature: f32,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let vocab = last_dim(student);
    let student_values = contiguous_f32(student);
    let teacher_values = contiguous_f32(teacher);
    assert_eq!(
        student_values.len(),
        teacher_values.len(),
        "student and teacher shapes"
    );
    let rows = student_values.len() / vocab;
    let mut losses = vec![0.0; rows];
    let mut student_lse = vec![0.0; rows];
    let mut teacher_lse = vec![0.0; rows];
    student_values
        .par_chunks(ROW_BLOCK * vocab)
        .zip(teacher_values.par_chunks(ROW_BLOCK * vocab))
        .zip(losses.par_chunks_mut(ROW_BLOCK))
        .zip(student_lse.par_chunks_mut(ROW_BLOCK))
        .zip(teacher_lse.par_chunks_mut(ROW_BLOCK))
        .for_each(
            |((((student, teacher), losses), student_lse), teacher_lse)| {
                rows::forward_kl(
                    student,
                    teacher,
                    vocab,
                    inverse_temperature,
                    losses,
                    student_lse,
                    teacher_lse,
                )
            },
        );
    (
        tensor(losses, Shape::new([rows])),
        tensor(student_lse, Shape::new([rows])),
        tensor(teacher_lse, Shape::new([rows])),
    )
}

/// The gradient `[rows, vocab]` of [`forward_kl`]'s losses with respect to the student's
/// logits, from the losses' gradient `[rows]` and both log-sum-exps `[rows]`.
pub fn forward_kl_backward(
    student: &FlexTensor,
    teacher: &FlexTensor,
    student_lse: &FlexTensor,
    teacher_lse: &FlexTensor,
    gradient: &FlexTensor,
    inverse_temperature: f32,
) -> FlexTensor {
    let vocab = last_dim(student);
    let student_values = contiguous_f32(student);
    let teacher_values = contiguous_f32(teacher);
    let student_lse = contiguous_f32(student_lse);
    let teacher_lse = contiguous_f32(teacher_lse);
    let gradient = contiguous_f32(gradient);
    let mut output = vec![0.0; student_values.len()];
    output
        .par_chunks_mut(ROW_BLOCK * vocab)
        .zip(student_values.par_chunks(ROW_BLOCK * vocab))
        .zip(teacher_values.par_chunks(ROW_BLOCK * vocab))
        .zip(student_lse.par_chunks(ROW_BLOCK))
        .zip(teacher_lse.par_chunks(ROW_BLOCK))
        .zip(gradient.par_chunks(ROW_BLOCK))
        .for_each(
            |(((((output, student), teacher), student_lse), teacher_lse), gradient)| {
                rows::forward_kl_backward(
                    student,
                    teacher,
                    student_lse,
                    teacher_lse,
                    gradient,
                    vocab,
                    inverse_temperature,
                    output,
                )
            },
        );
    tensor(output, shape_of(student))
}

/// Per-row `T^2 * KL` over the `k + 1` outcomes of [`rows::sparse_forward_kl`]: `ids`
/// `[rows, k]`, `teacher` log-probabilities `[rows, k + 1]`; returns the losses and the
/// student's log-sum-exps over its row and over the rest.
pub fn sparse_forward_kl(
    student: &FlexTensor,
    ids: &FlexTensor,
    teacher: &FlexTensor,
    inverse_temperature: f32,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let vocab = last_dim(student);
    let k = last_dim(ids);
    let student_values = contiguous_f32(student);
    let teacher_values = contiguous_f32(teacher);
    let ids = indices(ids, vocab);
    let rows = student_values.len() / vocab;
    assert_eq!(teacher_values.len(), rows * (k + 1), "teacher rows");
    let mut losses = vec![0.0; rows];
    let mut student_lse = vec![0.0; rows];
    let mut student_rest_lse = vec![0.0; rows];
    student_values
        .par_chunks(ROW_BLOCK * vocab)
        .zip(ids.par_chunks(ROW_BLOCK * k))
        .zip(teacher_values.par_chunks(ROW_BLOCK * (k + 1)))
        .zip(losses.par_chunks_mut(ROW_BLOCK))
        .zip(student_lse.par_chunks_mut(ROW_BLOCK))
        .zip(student_rest_lse.par_chunks_mut(ROW_BLOCK))
        .for_each(
            |(((((student, ids), teacher), losses), student_lse), student_rest_lse)| {
                rows::sparse_forward_kl(
                    rows::SparseRows {
                        student,
                        ids,
                        teacher,
                        vocab,
                        inverse_temperature,
                    },
                    losses,
                    student_lse,
                    student_rest_lse,
                )
            },
        );
    (
        tensor(losses, Shape::new([rows])),
        tensor(student_lse, Shape::new([rows])),
        tensor(student_rest_lse, Shape::new([rows])),
    )
}

/// The gradient `[rows, vocab]` of [`sparse_forward_kl`]'s losses with respect to the student's
/// logits, from the losses' gradient `[rows]` and the two log-sum-exps `[rows]` it returned.
pub fn sparse_forward_kl_backward(
    student: &FlexTensor,
    ids: &FlexTensor,
    teacher: &FlexTensor,
    student_lse: &FlexTensor,
    student_rest_lse: &FlexTensor,
    gradient: &FlexTensor,
    inverse_temperature: f32,
) -> FlexTensor {
    let vocab = last_dim(student);
    let k = last_dim(ids);
    let student_values = contiguous_f32(student);
    let teacher_values = contiguous_f32(teacher);
    let ids = indices(ids, vocab);
    let student_lse = contiguous_f32(student_lse);
    let student_rest_lse = contiguous_f32(student_rest_lse);
    let gradient = contiguous_f32(gradient);
    let mut output = vec![0.0; student_values.len()];
    output
        .par_chunks_mut(ROW_BLOCK * vocab)
        .zip(student_values.par_chunks(ROW_BLOCK * vocab))
        .zip(ids.par_chunks(ROW_BLOCK * k))
        .zip(teacher_values.par_chunks(ROW_BLOCK * (k + 1)))
        .zip(student_lse.par_chunks(ROW_BLOCK))
        .zip(student_rest_lse.par_chunks(ROW_BLOCK))
        .zip(gradient.par_chunks(ROW_BLOCK))
        .for_each(
            |((((((output, student), ids), teacher), student_lse), student_rest_lse), gradient)| {
                rows::sparse_forward_kl_backward(
                    rows::SparseRows {
                        student,
                        ids,
                        teacher,
                        vocab,
                        inverse_temperature,
                    },
                    student_lse,
                    student_rest_lse,
                    gradient,
                    output,
                )
            },
        );
    tensor(output, shape_of(student))
}
