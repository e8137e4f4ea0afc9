//! Row kernels on plain `f32` slices: the arithmetic of every fused operation, free of tensor
//! types so each can be tested against a direct formula.
//!
//! Each function is compiled for AVX-512, AVX2+FMA and the baseline, picked at run time, so the
//! loops vectorize without a machine-specific build. Rows are independent; callers split work
//! by rows, so the result never depends on the number of threads.

use multiversion::multiversion;

use crate::lanes::{LANES, Lanes, with_lanes};

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part exactly representable with few mantissa bits and the remainder
/// (Cody–Waite reduction), so `x - n ln 2` loses no precision.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// The input range whose results are finite normal floats.
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// e^x to about 2 ulp, written without branches or calls so that it vectorizes (Cephes
/// `expf`'s reduction and polynomial). Inputs below -87 give ~1.6e-38 instead of a denormal.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * LOG2_E).round();
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let poly = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    poly * scale
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Running maxima and sums of a row reduction: independent accumulators that the compiler keeps
/// in vector registers (a sum added element by element is one scalar chain of additions),
/// combined in a fixed order, so the result is the same on every instruction set.
const REDUCE_LANES: usize = 16;

/// The largest `x * scale` over `values`.
#[inline(always)]
fn scaled_max(values: &[f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; REDUCE_LANES];
    let chunks = values.chunks_exact(REDUCE_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let chunk: &[f32; REDUCE_LANES] = chunk.try_into().expect("a whole chunk");
        for k in 0..REDUCE_LANES {
            lanes[k] = lanes[k].max(chunk[k] * scale);
        }
    }
    let lanes_max = lanes.iter().fold(f32::NEG_INFINITY, |max, &x| max.max(x));
    tail.iter().fold(lanes_max, |max, &x| max.max(x * scale))
}

/// `N` sums of `term(a[i], b[i])` over paired elements, each in [`REDUCE_LANES`] lanes.
#[inline(always)]
fn paired_sums<const N: usize>(
    a: &[f32],
    b: &[f32],
    term: impl Fn(f32, f32) -> [f32; N],
) -> [f32; N] {
    let mut lanes = [[0.0f32; REDUCE_LANES]; N];
    let (a_chunks, b_chunks) = (a.chunks_exact(REDUCE_LANES), b.chunks_exact(REDUCE_LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (a, b) in a_chunks.zip(b_chunks) {
        let a: &[f32; REDUCE_LANES] = a.try_into().expect("a whole chunk");
        let b: &[f32; REDUCE_LANES] = b.try_into().expect("a whole chunk");
        for k in 0..REDUCE_LANES {
            let terms = term(a[k], b[k]);
            for (lanes, value) in lanes.iter_mut().zip(terms) {
                lanes[k] += value;
            }
        }
    }
    let mut sums = [0.0f32; N];
    for (&a, &b) in a_tail.iter().zip(b_tail) {
        for (sum, value) in sums.iter_mut().zip(term(a, b)) {
            *sum += value;
        }
    }
    for (sum, lanes) in sums.iter_mut().zip(lanes.iter_mut()) {
        let mut width = REDUCE_LANES / 2;
        while width > 0 {
            for k in 0..width {
                lanes[k] += lanes[k + width];
            }
            width /= 2;
        }
        *sum += lanes[0];
    }
    sums
}

/// Scaled, causally masked softmax of each row of `scores` (`rows x columns`), in place.
///
/// Row `i` keeps columns `0..=i + offset` (queries aligned to the end of the keys, as with a
/// cache of `offset` earlier positions); the others become exactly 0.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn causal_softmax(
    scores: &mut [f32],
    columns: usize,
    first_row: usize,
    offset: usize,
    scale: f32,
) {
    for (index, row) in scores.chunks_exact_mut(columns).enumerate() {
        let visible = (first_row + index + offset + 1).min(columns);
        let (kept, masked) = row.split_at_mut(visible);
        // The maximum and the sum in lanes, `exp` in a plain loop: a running maximum or sum
        // carried from element to element would make the whole row one scalar chain.
        let max = scaled_max(kept, scale);
        for value in kept.iter_mut() {
            *value = exp(*value * scale - max);
        }
        let [sum] = paired_sums(kept, kept, |value, _| [value]);
        let inverse = 1.0 / sum;
        for value in kept.iter_mut() {
            *value *= inverse;
        }
        masked.fill(0.0);
    }
}

/// The attention of `heads` query heads that share one key and value head (grouped-query
/// attention), each head's one query over the same key and value rows (row `j` of each at
/// `j * stride`): for head `g`, the softmax of its scaled scores `q_g · k_j` into
/// `probabilities[g * keys..]` (`keys` = `probabilities.len() / heads`) and their weighted sum
/// of the value rows into `out[g * head_dim..]`; `queries` holds the heads' queries one after
/// another. A decode step's query is one row: plain loops over the cached rows, where a general
/// matrix product would first choose blockings and dispatch for a single row, twice a head and
/// layer. The scores and the weighted sum run on the kernel family's lanes, each product fused
/// into its sum: left to the compiler, a score's dot product ran two floats at a time, and the
/// weighted sum went through memory at every row. The heads meet each key and value row
/// together: a head's weighted sum is one chain of dependent additions per block of outputs,
/// which waits on itself, and the heads' chains run side by side. Each head's results have the
/// bits it gets alone.
pub fn grouped_query_attention(
    heads: usize,
    queries: &[f32],
    (keys, key_stride): (&[f32], usize),
    (values, value_stride): (&[f32], usize),
    scale: f32,
    probabilities: &mut [f32],
    out: &mut [f32],
) {
    assert!(heads > 0 && out.len().is_multiple_of(heads));
    let head_dim = out.len() / heads;
    let count = probabilities.len() / heads;
    assert!(count > 0 && probabilities.len() == heads * count && queries.len() == heads * head_dim);
    assert!(keys.len() >= (count - 1) * key_stride + head_dim);
    assert!(values.len() >= (count - 1) * value_stride + head_dim);
    with_lanes!(key_scores(
        queries: &[f32],
        head_dim: usize,
        keys: &[f32],
        key_stride: usize,
        probabilities: &mut [f32],
    ));
    for probabilities in probabilities.chunks_exact_mut(count) {
        causal_softmax(probabilities, count, 0, count - 1, scale);
    }
    let probabilities: &[f32] = probabilities;
    with_lanes!(weighted_values(
        probabilities: &[f32],
        values: &[f32],
        value_stride: usize,
        out: &mut [f32],
        head_dim: usize,
    ));
}

/// Query heads whose scores and weighted sums run together: three heads' sums of four blocks
/// of outputs take twelve of AVX-512's 32 registers. The AVX2 lanes' 24 halves spill a few,
/// and three heads together still decoded faster there than one at a time.
const HEADS_AT_ONCE: usize = 3;

/// `scores[g * count + j] = query_g · keys[j * key_stride..]` for each query of `head_dim`
/// values in `queries`, `count = scores.len() / heads`: each in [`LANES`] lanes added in
/// halves, then the values past the last whole block added after them.
#[inline(always)]
fn key_scores<L: Lanes>(
    queries: &[f32],
    head_dim: usize,
    keys: &[f32],
    key_stride: usize,
    scores: &mut [f32],
) {
    let count = scores.len() / (queries.len() / head_dim);
    for (queries, scores) in queries
        .chunks(HEADS_AT_ONCE * head_dim)
        .zip(scores.chunks_mut(HEADS_AT_ONCE * count))
    {
        match queries.len() / head_dim {
            1 => heads_key_scores::<L, 1>(queries, keys, key_stride, scores),
            2 => heads_key_scores::<L, 2>(queries, keys, key_stride, scores),
            _ => heads_key_scores::<L, HEADS_AT_ONCE>(queries, keys, key_stride, scores),
        }
    }
}

/// [`key_scores`] for `HEADS` queries, each key's blocks loaded once for all of them.
#[inline(always)]
fn heads_key_scores<L: Lanes, const HEADS: usize>(
    queries: &[f32],
    keys: &[f32],
    key_stride: usize,
    scores: &mut [f32],
) {
    let head_dim = queries.len() / HEADS;
    let count = scores.len() / HEADS;
    let queries: [(&[[f32; LANES]], &[f32]); HEADS] =
        std::array::from_fn(|head| queries[head * head_dim..][..head_dim].as_chunks::<LANES>());
    for index in 0..count {
        let key = &keys[index * key_stride..][..head_dim];
        let (key_blocks, key_tail) = key.as_chunks::<LANES>();
        let mut sums = [L::zero(); HEADS];
        for (block, key) in key_blocks.iter().enumerate() {
            let key = L::load(key);
            for (sum, (query_blocks, _)) in sums.iter_mut().zip(&queries) {
                *sum = sum.add_product(L::load(&query_blocks[block]), key);
            }
        }
        for (head, (sum, (_, query_tail))) in sums.into_iter().zip(&queries).enumerate() {
            let tail = query_tail
                .iter()
                .zip(key_tail)
                .fold(0.0f32, |sum, (&query, &key)| query.mul_add(key, sum));
            scores[head * count + index] = sum.sum() + tail;
        }
    }
}

/// Blocks of [`LANES`] outputs whose sums [`weighted_values`] keeps in registers at once, per
/// head.
const VALUE_BLOCKS: usize = 4;

const _: () = assert!(
    VALUE_BLOCKS == 4,
    "weighted_values has a kernel for each count of blocks up to 4"
);

/// `out[g * head_dim..] = Σ_j probabilities[g * count + j] values[j * value_stride..]` for each
/// head `g` (`out.len() / head_dim` of them, `count = probabilities.len() / heads`), every
/// output summed from zero in row order.
#[inline(always)]
fn weighted_values<L: Lanes>(
    probabilities: &[f32],
    values: &[f32],
    value_stride: usize,
    out: &mut [f32],
    head_dim: usize,
) {
    let heads = out.len() / head_dim;
    let count = probabilities.len() / heads;
    for (probabilities, out) in probabilities
        .chunks(HEADS_AT_ONCE * count)
        .zip(out.chunks_mut(HEADS_AT_ONCE * head_dim))
    {
        match probabilities.len() / count {
            1 => heads_weighted_values::<L, 1>(probabilities, values, value_stride, out),
            2 => heads_weighted_values::<L, 2>(probabilities, values, value_stride, out),
            _ => {
                heads_weighted_values::<L, HEADS_AT_ONCE>(probabilities, values, value_stride, out)
            }
        }
    }
}

/// [`weighted_values`] for `HEADS` heads, each value block loaded once for all of them.
#[inline(always)]
fn heads_weighted_values<L: Lanes, const HEADS: usize>(
    probabilities: &[f32],
    values: &[f32],
    value_stride: usize,
    out: &mut [f32],
) {
    let head_dim = out.len() / HEADS;
    let count = probabilities.len() / HEADS;
    let whole = head_dim / LANES * LANES;
    for first in (0..whole).step_by(VALUE_BLOCKS * LANES) {
        let blocks = VALUE_BLOCKS.min((whole - first) / LANES);
        let values = &values[first..];
        match blocks {
            1 => weighted_blocks::<L, 1, HEADS>(probabilities, values, value_stride, out, first),
            2 => weighted_blocks::<L, 2, HEADS>(probabilities, values, value_stride, out, first),
            3 => weighted_blocks::<L, 3, HEADS>(probabilities, values, value_stride, out, first),
            _ => weighted_blocks::<L, 4, HEADS>(probabilities, values, value_stride, out, first),
        }
    }
    for (head, out) in out.chunks_exact_mut(head_dim).enumerate() {
        let probabilities = &probabilities[head * count..][..count];
        for (column, out) in (whole..head_dim).zip(&mut out[whole..]) {
            *out = probabilities
                .iter()
                .enumerate()
                .fold(0.0f32, |sum, (row, &probability)| {
                    probability.mul_add(values[row * value_stride + column], sum)
                });
        }
    }
}

/// [`heads_weighted_values`] for `BLOCKS` blocks of outputs from column `first` of each head's
/// outputs, `values` starting at that column of the first row.
#[inline(always)]
fn weighted_blocks<L: Lanes, const BLOCKS: usize, const HEADS: usize>(
    probabilities: &[f32],
    values: &[f32],
    value_stride: usize,
    out: &mut [f32],
    first: usize,
) {
    let head_dim = out.len() / HEADS;
    let count = probabilities.len() / HEADS;
    let mut sums = [[L::zero(); BLOCKS]; HEADS];
    for row in 0..count {
        let (blocks, _) = values[row * value_stride..][..BLOCKS * LANES].as_chunks::<LANES>();
        let blocks: [L; BLOCKS] = std::array::from_fn(|block| L::load(&blocks[block]));
        for (head, sums) in sums.iter_mut().enumerate() {
            let probability = L::splat(probabilities[head * count + row]);
            for (sum, &block) in sums.iter_mut().zip(&blocks) {
                *sum = sum.add_product(probability, block);
            }
        }
    }
    for (head, sums) in sums.into_iter().enumerate() {
        let (out, _) = out[head * head_dim + first..][..BLOCKS * LANES].as_chunks_mut::<LANES>();
        for (sum, out) in sums.into_iter().zip(out) {
            sum.store(out);
        }
    }
}

/// The gradient through a softmax (then through the score scale), row by row, in place:
/// `ds = p * (dp - sum(p * dp)) * scale`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn softmax_backward(probabilities: &[f32], gradient: &mut [f32], columns: usize, scale: f32) {
    for (p, g) in probabilities
        .chunks_exact(columns)
        .zip(gradient.chunks_exact_mut(columns))
    {
        let [dot] = paired_sums(p, g, |p, g| [p * g]);
        for (g, p) in g.iter_mut().zip(p) {
            *g = p * (*g - dot) * scale;
        }
    }
}

/// Per row of `logits` (`rows x vocab`): the log-sum-exp, and the cross-entropy
/// `log-sum-exp - logit[target]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn cross_entropy(
    logits: &[f32],
    targets: &[usize],
    vocab: usize,
    losses: &mut [f32],
    log_sum_exps: &mut [f32],
) {
    for (((row, &target), loss), lse) in logits
        .chunks_exact(vocab)
        .zip(targets)
        .zip(losses.iter_mut())
        .zip(log_sum_exps.iter_mut())
    {
        let max = scaled_max(row, 1.0);
        let [sum] = paired_sums(row, row, |x, _| [exp(x - max)]);
        *lse = max + sum.ln();
        *loss = *lse - row[target];
    }
}

/// The index of the largest value of `row`, the first of equals.
pub fn argmax(row: &[f32]) -> usize {
    let max = scaled_max(row, 1.0);
    row.iter().position(|&value| value == max).unwrap_or(0)
}

/// Log-sum-exp of `row * inverse_temperature`.
#[inline(always)]
fn scaled_log_sum_exp(row: &[f32], inverse_temperature: f32) -> f32 {
    let max = scaled_max(row, inverse_temperature);
    let [sum] = paired_sums(row, row, |x, _| [exp(x * inverse_temperature - max)]);
    max + sum.ln()
}

/// Per row of `student` and `teacher` logits (`rows x vocab`): the log-sum-exps of both at
/// temperature `1 / inverse_temperature`, and `T^2 * KL(softmax(t / T) || softmax(s / T))`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn forward_kl(
    student: &[f32],
    teacher: &[f32],
    vocab: usize,
    inverse_temperature: f32,
    losses: &mut [f32],
    student_lse: &mut [f32],
    teacher_lse: &mut [f32],
) {
    let t_squared = 1.0 / (inverse_temperature * inverse_temperature);
    for ((((s_row, t_row), loss), s_lse), t_lse) in student
        .chunks_exact(vocab)
        .zip(teacher.chunks_exact(vocab))
        .zip(losses.iter_mut())
        .zip(student_lse.iter_mut())
        .zip(teacher_lse.iter_mut())
    {
        *s_lse = scaled_log_sum_exp(s_row, inverse_temperature);
        *t_lse = scaled_log_sum_exp(t_row, inverse_temperature);
        let offset = *s_lse - *t_lse;
        let t_lse = *t_lse;
        let [kl] = paired_sums(s_row, t_row, |s, t| {
            let log_ratio = (t - s) * inverse_temperature + offset;
            [exp(t * inverse_temperature - t_lse) * log_ratio]
        });
        *loss = kl * t_squared;
    }
}

/// The gradient of [`forward_kl`] with respect to the student's logits:
/// `g * T * (softmax(s / T) - softmax(t / T))`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn forward_kl_backward(
    student: &[f32],
    teacher: &[f32],
    student_lse: &[f32],
    teacher_lse: &[f32],
    gradient: &[f32],
    vocab: usize,
    inverse_temperature: f32,
    output: &mut [f32],
) {
    for (((((s_row, t_row), out), &s_lse), &t_lse), &g) in student
        .chunks_exact(vocab)
        .zip(teacher.chunks_exact(vocab))
        .zip(output.chunks_exact_mut(vocab))
        .zip(student_lse)
        .zip(teacher_lse)
        .zip(gradient)
    {
        let scale = g / inverse_temperature;
        for ((out, &s), &t) in out.iter_mut().zip(s_row).zip(t_row) {
            let p_student = exp(s * inverse_temperature - s_lse);
            let p_teacher = exp(t * inverse_temperature - t_lse);
            *out = scale * (p_student - p_teacher);
        }
    }
}

/// The rows [`sparse_forward_kl`] reads: `student` logits (`rows x vocab`), the cached token
/// `ids` (`rows x k`), and `teacher`, the teacher's log-probabilities at temperature T of
/// `k + 1` outcomes (`rows x (k + 1)`): each cached token, then the rest of the vocabulary.
pub struct SparseRows<'a> {
    pub student: &'a [f32],
    pub ids: &'a [usize],
    pub teacher: &'a [f32],
    pub vocab: usize,
    pub inverse_temperature: f32,
}

/// Per row: `T^2 * KL(p || q)` over the `k + 1` outcomes, `p` the teacher's and `q` the
/// student's softmax at T summed the same way (each cached token, and the rest together), so
/// the student's tail is held to the teacher's tail mass instead of being pushed to zero. Also
/// the student's log-sum-exps at T over its whole row and over the rest, for the backward pass
/// (the latter `-inf` when the ids cover the vocabulary).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn sparse_forward_kl(
    rows: SparseRows<'_>,
    losses: &mut [f32],
    student_lse: &mut [f32],
    student_rest_lse: &mut [f32],
) {
    let SparseRows {
        student,
        ids,
        teacher,
        vocab,
        inverse_temperature,
    } = rows;
    let k = ids.len() / losses.len().max(1);
    let t_squared = 1.0 / (inverse_temperature * inverse_temperature);
    // 1 for the tokens of the rest, 0 for the cached ones: a product instead of a branch keeps
    // the pass over the vocabulary vectorized.
    let mut in_rest = vec![1.0f32; vocab];
    for (((((s_row, row_ids), t_row), loss), s_lse), s_rest) in student
        .chunks_exact(vocab)
        .zip(ids.chunks_exact(k))
        .zip(teacher.chunks_exact(k + 1))
        .zip(losses.iter_mut())
        .zip(student_lse.iter_mut())
        .zip(student_rest_lse.iter_mut())
    {
        let max = scaled_max(s_row, inverse_temperature);
        for &id in row_ids {
            in_rest[id] = 0.0;
        }
        let [total, rest] = paired_sums(s_row, &in_rest, |s, weight| {
            let e = exp(s * inverse_temperature - max);
            [e, e * weight]
        });
        for &id in row_ids {
            in_rest[id] = 1.0;
        }
        *s_lse = max + total.ln();
        *s_rest = max + rest.ln();
        let (t_tokens, t_rest) = t_row.split_at(k);
        let mut kl: f32 = row_ids
            .iter()
            .zip(t_tokens)
            .map(|(&id, &log_p)| exp(log_p) * (log_p - (s_row[id] * inverse_temperature - *s_lse)))
            .sum();
        if rest > 0.0 {
            kl += exp(t_rest[0]) * (t_rest[0] - (*s_rest - *s_lse));
        }
        *loss = kl * t_squared;
    }
}

/// The gradient of [`sparse_forward_kl`] with respect to the student's logits: `g * T` times
/// `q_j - p_j` for a cached token and `q_j * (1 - p_rest / q_rest)` for a token of the rest.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn sparse_forward_kl_backward(
    rows: SparseRows<'_>,
    student_lse: &[f32],
    student_rest_lse: &[f32],
    gradient: &[f32],
    output: &mut [f32],
) {
    let SparseRows {
        student,
        ids,
        teacher,
        vocab,
        inverse_temperature,
    } = rows;
    let k = ids.len() / gradient.len().max(1);
    for (((((s_row, row_ids), t_row), out), (&s_lse, &s_rest)), &g) in student
        .chunks_exact(vocab)
        .zip(ids.chunks_exact(k))
        .zip(teacher.chunks_exact(k + 1))
        .zip(output.chunks_exact_mut(vocab))
        .zip(student_lse.iter().zip(student_rest_lse))
        .zip(gradient)
    {
        let scale = g / inverse_temperature;
        // With no rest there is no token it applies to; the guard keeps exp(+inf) out.
        let p_rest = if s_rest.is_finite() {
            exp(t_row[k])
        } else {
            0.0
        };
        // q_j / q_rest = exp(u_j - rest_lse), at most 1 for a token of the rest.
        for (out, &s) in out.iter_mut().zip(s_row) {
            let u = s * inverse_temperature;
            *out = scale * (exp(u - s_lse) - p_rest * exp(u - s_rest));
        }
        for (&id, &log_p) in row_ids.iter().zip(t_row) {
            out[id] = scale * (exp(s_row[id] * inverse_temperature - s_lse) - exp(log_p));
        }
    }
}

/// The gradient of [`cross_entropy`] with respect to the logits: `g * (softmax - one_hot)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[usize],
    log_sum_exps: &[f32],
    gradient: &[f32],
    vocab: usize,
    output: &mut [f32],
) {
    for ((((row, out), &target), &lse), &g) in logits
        .chunks_exact(vocab)
        .zip(output.chunks_exact_mut(vocab))
        .zip(targets)
        .zip(log_sum_exps)
        .zip(gradient)
    {
        for (out, &x) in out.iter_mut().zip(row) {
            *out = g * exp(x - lse);
        }
        out[target] -= g;
    }
}

/// The teacher's side of a row's loss in [`head_gradient`], beside the cross-entropy on labels.
#[derive(Clone, Copy)]
pub enum DivergenceRows<'a> {
    /// Labels only.
    None,
    /// [`forward_kl`] against the teacher's logits (`rows x vocab`), with the student's and the
    /// teacher's log-sum-exps at the temperature.
    Dense {
        teacher: &'a [f32],
        student_lse: &'a [f32],
        teacher_lse: &'a [f32],
    },
    /// [`sparse_forward_kl`] against cached `ids` (`rows x k`) and the teacher's
    /// log-probabilities of their `k + 1` outcomes (`rows x (k + 1)`), with the student's
    /// log-sum-exps over its row and over the rest.
    Sparse {
        ids: &'a [usize],
        teacher: &'a [f32],
        student_lse: &'a [f32],
        student_rest_lse: &'a [f32],
    },
}

/// Overwrites each row of `logits` (`rows x vocab`) with the gradient, with respect to those
/// logits, of `ce_scale * cross_entropy + kl_scale * divergence` for that row: the sum of
/// [`cross_entropy_backward`] and [`forward_kl_backward`] (or
/// [`sparse_forward_kl_backward`]) in one pass, so a chunk of the output head holds its logits
/// and their gradient in one buffer.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn head_gradient(
    logits: &mut [f32],
    vocab: usize,
    targets: &[usize],
    log_sum_exps: &[f32],
    ce_scales: &[f32],
    divergence: DivergenceRows<'_>,
    kl_scales: &[f32],
    inverse_temperature: f32,
) {
    let rows = targets.len();
    // The logits of a row's cached tokens, read before the row is overwritten.
    let mut cached_logits = Vec::new();
    for (row_index, row) in logits.chunks_exact_mut(vocab).enumerate() {
        let lse = log_sum_exps[row_index];
        let ce_scale = ce_scales[row_index];
        let kl_scale = kl_scales[row_index] / inverse_temperature;
        match divergence {
            DivergenceRows::None => {
                for z in row.iter_mut() {
                    *z = ce_scale * exp(*z - lse);
                }
            }
            DivergenceRows::Dense {
                teacher,
                student_lse,
                teacher_lse,
            } => {
                let t_row = &teacher[row_index * vocab..][..vocab];
                let (s_lse, t_lse) = (student_lse[row_index], teacher_lse[row_index]);
                for (z, &t) in row.iter_mut().zip(t_row) {
                    let s = *z;
                    let p_student = exp(s * inverse_temperature - s_lse);
                    let p_teacher = exp(t * inverse_temperature - t_lse);
                    *z = ce_scale * exp(s - lse) + kl_scale * (p_student - p_teacher);
                }
            }
            DivergenceRows::Sparse {
                ids,
                teacher,
                student_lse,
                student_rest_lse,
            } => {
                let k = ids.len() / rows;
                let row_ids = &ids[row_index * k..][..k];
                let t_row = &teacher[row_index * (k + 1)..][..k + 1];
                let (s_lse, s_rest) = (student_lse[row_index], student_rest_lse[row_index]);
                // With no rest there is no token it applies to; the guard keeps exp(+inf) out.
                let p_rest = if s_rest.is_finite() {
                    exp(t_row[k])
                } else {
                    0.0
                };
                cached_logits.clear();
                cached_logits.extend(row_ids.iter().map(|&id| row[id]));
                for z in row.iter_mut() {
                    let s = *z;
                    let u = s * inverse_temperature;
                    *z = ce_scale * exp(s - lse)
                        + kl_scale * (exp(u - s_lse) - p_rest * exp(u - s_rest));
                }
                for ((&id, &log_p), &s) in row_ids.iter().zip(t_row).zip(&cached_logits) {
                    let p_student = exp(s * inverse_temperature - s_lse);
                    row[id] = ce_scale * exp(s - lse) + kl_scale * (p_student - exp(log_p));
                }
            }
        }
        row[targets[row_index]] -= ce_scale;
    }
}

/// `silu(gate) * up`, element-wise.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn swiglu(gate: &[f32], up: &[f32], output: &mut [f32]) {
    for ((out, &g), &u) in output.iter_mut().zip(gate).zip(up) {
        *out = g * sigmoid(g) * u;
    }
}

/// Gradients of [`swiglu`] with respect to `gate` and `up`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn swiglu_backward(
    gate: &[f32],
    up: &[f32],
    gradient: &[f32],
    gate_gradient: &mut [f32],
    up_gradient: &mut [f32],
) {
    for ((((dg, du), &g), &u), &d) in gate_gradient
        .iter_mut()
        .zip(up_gradient.iter_mut())
        .zip(gate)
        .zip(up)
        .zip(gradient)
    {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

/// RMS normalization of each row: `y = x / sqrt(mean(x^2) + eps) * gain`; also returns each
/// row's `1 / sqrt(mean(x^2) + eps)` for the backward pass.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn rms_norm(x: &[f32], gain: &[f32], eps: f32, output: &mut [f32], inverse_rms: &mut [f32]) {
    let width = gain.len();
    for ((row, out), inverse) in x
        .chunks_exact(width)
        .zip(output.chunks_exact_mut(width))
        .zip(inverse_rms.iter_mut())
    {
        let [sum_of_squares] = paired_sums(row, row, |x, _| [x * x]);
        let mean_square = sum_of_squares / width as f32;
        *inverse = 1.0 / (mean_square + eps).sqrt();
        for ((out, &x), &g) in out.iter_mut().zip(row).zip(gain) {
            *out = x * *inverse * g;
        }
    }
}

/// Gradients of [`rms_norm`]: writes the input gradient and adds this block of rows'
/// contribution to the gain gradient.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn rms_norm_backward(
    x: &[f32],
    gain: &[f32],
    inverse_rms: &[f32],
    gradient: &[f32],
    input_gradient: &mut [f32],
    gain_gradient: &mut [f32],
) {
    let width = gain.len();
    for (((row, grad), dx), &inverse) in x
        .chunks_exact(width)
        .zip(gradient.chunks_exact(width))
        .zip(input_gradient.chunks_exact_mut(width))
        .zip(inverse_rms)
    {
        // With n = x * r and dn = grad * gain: dx = r * (dn - n * mean(dn * n)).
        let mut dot = 0.0;
        for (((&x, &d), &g), dg) in row.iter().zip(grad).zip(gain).zip(gain_gradient.iter_mut()) {
            let normalized = x * inverse;
            *dg += d * normalized;
            dot += d * g * normalized;
        }
        let mean = dot / width as f32;
        for (((dx, &x), &d), &g) in dx.iter_mut().zip(row).zip(grad).zip(gain) {
            *dx = inverse * (d * g - x * inverse * mean);
        }
    }
}

/// Rotary embedding of rows of `head_dim` values in the rotate-half layout:
/// `y = x * cos + swap_halves(x) * sin_signed`, with the tables' rows for consecutive
/// positions. The backward pass is the same map with the roles swapped (see
/// [`rotary_backward`]).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn rotary(x: &[f32], cos: &[f32], sin_signed: &[f32], output: &mut [f32]) {
    let half = x.len() / 2;
    let (x_low, x_high) = x.split_at(half);
    let (out_low, out_high) = output.split_at_mut(half);
    for i in 0..half {
        out_low[i] = x_low[i] * cos[i] + x_high[i] * sin_signed[i];
        out_high[i] = x_high[i] * cos[half + i] + x_low[i] * sin_signed[half + i];
    }
}

/// The gradient of [`rotary`]: `dx = g * cos + swap_halves(g * sin_signed)`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn rotary_backward(gradient: &[f32], cos: &[f32], sin_signed: &[f32], output: &mut [f32]) {
    let half = gradient.len() / 2;
    let (g_low, g_high) = gradient.split_at(half);
    let (out_low, out_high) = output.split_at_mut(half);
    for i in 0..half {
        out_low[i] = g_low[i] * cos[i] + g_high[i] * sin_signed[half + i];
        out_high[i] = g_high[i] * cos[half + i] + g_low[i] * sin_signed[i];
    }
}

/// Whether element `index` survives dropout: a counter-based hash of `(key, index)` (MurmurHash3's
/// finalizer) compared with `threshold = p * 2^32`. The mask is a pure function of its inputs,
/// so the backward pass recomputes it instead of storing it.
#[inline(always)]
fn kept(key: u32, index: u32, threshold: u32) -> bool {
    let mut h = index.wrapping_mul(0x9E37_79B1) ^ key;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h >= threshold
}

/// Inverted dropout of a block whose first element has flat index `first_index`: kept elements
/// are scaled by `scale = 1 / (1 - p)`, dropped ones become 0. Applied to a gradient, it is the
/// backward pass.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn dropout(
    x: &[f32],
    key: u32,
    first_index: u32,
    threshold: u32,
    scale: f32,
    output: &mut [f32],
) {
    for (offset, (out, &x)) in output.iter_mut().zip(x).enumerate() {
        let keep = kept(key, first_index.wrapping_add(offset as u32), threshold);
        *out = if keep { x * scale } else { 0.0 };
    }
}

/// Settings of one AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`, or 1 for parameters that are not decayed.
    pub decay: f32,
    /// `1 - beta1^t` and `1 - beta2^t` for update number `t`.
    pub first_correction: f32,
    pub second_correction: f32,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f32,
}

/// One AdamW update of a block of parameters and their moments, in place, in the same order of
/// operations as the composed update.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub fn adamw(
    parameters: &mut [f32],
    gradient: &[f32],
    first: &mut [f32],
    second: &mut [f32],
    step: &AdamWStep,
) {
    for (((p, &g), m), v) in parameters
        .iter_mut()
        .zip(gradient)
        .zip(first.iter_mut())
        .zip(second.iter_mut())
    {
        let g = g * step.grad_scale;
        *m = *m * step.beta1 + g * (1.0 - step.beta1);
        *v = *v * step.beta2 + g * g * (1.0 - step.beta2);
        let direction =
            (*m / step.first_correction) / ((*v / step.second_correction).sqrt() + step.eps);
        *p = *p * step.decay - direction * step.lr;
    }
}

// `rows_times_rows` dispatches on row counts up to eight.
const _: () = assert!(crate::FEW_ROWS <= 8);

/// Weight rows whose products [`rows_times_rows`] adds into a block of sums at once; a run of
/// whole passes takes its fast path throughout.
pub(crate) const ROWS_PER_PASS: usize = 4;

const _: () = assert!(
    ROWS_PER_PASS == 4,
    "rows_times_rows_of names the four weight rows of a pass"
);

/// `x W` for a few rows `x` (each `run` values, at most 8 rows) and the `run` rows of a
/// row-major `W` they meet (`run x width`), written into `out` (`rows x width`). The weight is
/// read once, front to back, [`ROWS_PER_PASS`] weight rows at a time, and every row of `x`
/// meets each block of those four while it is in registers: the rows after the first cost
/// arithmetic on data at hand, not a second read of the weight back from cache, a block of
/// [`LANES`] columns down the whole run at a time, which cost more than their arithmetic.
/// Meanwhile the lines of the next pass (after the run's last, of `next`: the weight rows read
/// after these, or nothing) are asked for, so memory keeps streaming while the rows compute.
/// A row's block of sums is loaded and stored once for the four. Each sum starts from zero and
/// adds its products in weight-row order, each in one fused multiply-add: the same bits on
/// every instruction set, for any number of rows.
pub fn rows_times_rows(x: &[&[f32]], weight: &[f32], next: &[f32], out: &mut [f32]) {
    assert!(
        (1..=8).contains(&x.len()),
        "{} rows: rows_times_rows takes 1 to 8",
        x.len()
    );
    with_lanes!(rows_times_rows_with(
        x: &[&[f32]],
        weight: &[f32],
        next: &[f32],
        out: &mut [f32],
    ))
}

#[inline(always)]
fn rows_times_rows_with<L: Lanes>(x: &[&[f32]], weight: &[f32], next: &[f32], out: &mut [f32]) {
    let width = out.len() / x.len();
    let groups = x
        .chunks(L::ROWS_AT_ONCE)
        .zip(out.chunks_mut(L::ROWS_AT_ONCE * width));
    for (x, out) in groups {
        match x.len() {
            1 => rows_times_rows_of::<L, 1>(x, weight, next, out),
            2 => rows_times_rows_of::<L, 2>(x, weight, next, out),
            3 => rows_times_rows_of::<L, 3>(x, weight, next, out),
            4 => rows_times_rows_of::<L, 4>(x, weight, next, out),
            5 => rows_times_rows_of::<L, 5>(x, weight, next, out),
            6 => rows_times_rows_of::<L, 6>(x, weight, next, out),
            7 => rows_times_rows_of::<L, 7>(x, weight, next, out),
            _ => rows_times_rows_of::<L, 8>(x, weight, next, out),
        }
    }
}

/// [`rows_times_rows`] for `ROWS` rows at once, into `out`. The first whole pass writes its
/// blocks of sums without reading them, so only what no whole block of it reaches is cleared
/// first: eight runs' partial sums of eight rows are 393 KB for a 1,536-wide weight, and
/// clearing them before every product took 4% of a batch's decoding.
#[inline(always)]
fn rows_times_rows_of<L: Lanes, const ROWS: usize>(
    x: &[&[f32]],
    weight: &[f32],
    next: &[f32],
    out: &mut [f32],
) {
    let width = out.len() / ROWS;
    let run = x[0].len();
    assert!(x.len() == ROWS && weight.len() == run * width && out.len() == ROWS * width);
    let x: [&[f32]; ROWS] = std::array::from_fn(|row| {
        assert_eq!(x[row].len(), run, "rows of one run");
        x[row]
    });
    let blocks = width / LANES * LANES;
    let pass_floats = ROWS_PER_PASS * width;
    if run < ROWS_PER_PASS {
        out.fill(0.0);
    } else {
        for row in out.chunks_exact_mut(width) {
            row[blocks..].fill(0.0);
        }
    }
    let passes = weight.chunks(pass_floats).enumerate();
    for (pass, rows) in passes {
        let first = pass * ROWS_PER_PASS;
        if rows.len() < pass_floats {
            add_weight_rows(&x, first, rows, 0..width, out);
            continue;
        }
        // Four lines of the next pass a block: the whole pass over this one.
        let ahead = match weight.get((pass + 1) * pass_floats..) {
            Some(later) if !later.is_empty() => later,
            _ => next,
        };
        let [w0, w1, w2, w3]: [&[f32]; ROWS_PER_PASS] =
            std::array::from_fn(|row| &rows[row * width..][..width]);
        // Filled in loops: `array::from_fn`'s closure does not inherit the kernel's target
        // features, so each broadcast became a call.
        let mut splats = [[L::zero(); ROWS_PER_PASS]; ROWS];
        for (splats, x) in splats.iter_mut().zip(&x) {
            for (splat, &value) in splats.iter_mut().zip(&x[first..first + ROWS_PER_PASS]) {
                *splat = L::splat(value);
            }
        }
        for start in (0..blocks).step_by(LANES) {
            for line in 0..ROWS_PER_PASS {
                prefetch(ahead, (start * ROWS_PER_PASS / LANES + line) * LINE_FLOATS);
            }
            let block =
                |row: &[f32]| L::load(row[start..start + LANES].try_into().expect("a whole block"));
            let weights = [block(w0), block(w1), block(w2), block(w3)];
            for (row, [x0, x1, x2, x3]) in splats.iter().enumerate() {
                let sums: &mut [f32; LANES] = (&mut out[row * width + start..][..LANES])
                    .try_into()
                    .expect("a whole block");
                let start = if pass == 0 { L::zero() } else { L::load(sums) };
                start
                    .add_product(*x0, weights[0])
                    .add_product(*x1, weights[1])
                    .add_product(*x2, weights[2])
                    .add_product(*x3, weights[3])
                    .store(sums);
            }
        }
        add_weight_rows(&x, first, rows, blocks..width, out);
    }
}

/// Adds onto `out` (`x.len()` rows of sums) the products of `columns` of the consecutive
/// weight `rows` with the inputs of each row of `x` from index `first` on, one weight row after
/// another, each fused into its sum: the order the lanes keep, for the columns or weight rows
/// that make no whole block or pass.
fn add_weight_rows(
    x: &[&[f32]],
    first: usize,
    rows: &[f32],
    columns: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let width = out.len() / x.len();
    for (offset, row) in rows.chunks_exact(width).enumerate() {
        for (x, out) in x.iter().zip(out.chunks_exact_mut(width)) {
            let value = x[first + offset];
            for column in columns.clone() {
                out[column] = value.mul_add(row[column], out[column]);
            }
        }
    }
}

/// Floats in a cache line.
const LINE_FLOATS: usize = 16;

/// Asks the core to bring the cache line holding `values[at]` into its L2 cache, where a later
/// read finds it; nothing when `at` is past the end.
#[inline(always)]
fn prefetch(values: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(value) = values.get(at) {
        // SAFETY: a prefetch only hints at an address, here one inside `values`; it reads
        // nothing into the program and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                (value as *const f32).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, at);
}

/// Rows of `x` that [`rows_dot`] takes through the table together: each has its own running
/// sums, so their additions do not wait on one another, and four rows' sums still fit in
/// AVX2's registers.
const DOT_ROWS: usize = 4;

/// `out[r * out_stride + o] = x_r · rows[o]` for the rows `x_r` of `x` (`inputs` values each)
/// and consecutive table rows of `inputs` values; meanwhile the first rows of `x` ask for
/// `next` (the table rows read after these, or nothing) to be brought into cache, so memory
/// keeps streaming while they compute. Each dot product sums in [`LANES`] fixed lanes (lane `k`
/// takes the products at indices `k mod LANES`), then adds the lanes in a fixed order: the same
/// bits on every instruction set and thread count, and for a row of `x` whatever other rows
/// come with it.
pub fn rows_dot(
    x: &[f32],
    inputs: usize,
    rows: &[f32],
    next: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(inputs > 0 && x.len().is_multiple_of(inputs) && rows.len().is_multiple_of(inputs));
    with_lanes!(rows_dot_with(
        x: &[f32],
        inputs: usize,
        rows: &[f32],
        next: &[f32],
        out: &mut [f32],
        out_stride: usize,
    ))
}

#[inline(always)]
fn rows_dot_with<L: Lanes>(
    x: &[f32],
    inputs: usize,
    rows: &[f32],
    next: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let count = rows.len() / inputs;
    for (group, x) in x.chunks(DOT_ROWS * inputs).enumerate() {
        let out = &mut out[group * DOT_ROWS * out_stride..];
        assert!(out.len() >= (x.len() / inputs - 1) * out_stride + count);
        let next = if group == 0 { next } else { &[] };
        match x.len() / inputs {
            1 => rows_dot_of::<L, 1>(x, rows, next, out, out_stride),
            2 => rows_dot_of::<L, 2>(x, rows, next, out, out_stride),
            3 => rows_dot_of::<L, 3>(x, rows, next, out, out_stride),
            _ => rows_dot_of::<L, 4>(x, rows, next, out, out_stride),
        }
    }
}

const _: () = assert!(
    DOT_ROWS == 4,
    "rows_dot has a kernel for each count of rows up to 4"
);

#[inline(always)]
fn rows_dot_of<L: Lanes, const ROWS: usize>(
    x: &[f32],
    rows: &[f32],
    next: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let inputs = x.len() / ROWS;
    let whole = inputs / LANES;
    let x: [&[f32]; ROWS] = std::array::from_fn(|row| &x[row * inputs..(row + 1) * inputs]);
    // Each row's whole chunks, cut to their count so that the loop indexes them unchecked.
    let chunks: [&[[f32; LANES]]; ROWS] = std::array::from_fn(|row| &x[row].as_chunks().0[..whole]);
    for (index, row) in rows.chunks_exact(inputs).enumerate() {
        let (row_chunks, row_tail) = row.as_chunks::<LANES>();
        let mut sums = [L::zero(); ROWS];
        for (chunk, weights) in row_chunks.iter().enumerate() {
            prefetch(next, index * inputs + chunk * LANES);
            let weights = L::load(weights);
            for (sum, x) in sums.iter_mut().zip(&chunks) {
                *sum = sum.add_product(L::load(&x[chunk]), weights);
            }
        }
        for (row, (sum, x)) in sums.into_iter().zip(x).enumerate() {
            let tail = x[whole * LANES..]
                .iter()
                .zip(row_tail)
                .fold(0.0f32, |sum, (&a, &b)| a.mul_add(b, sum));
            out[row * out_stride + index] = sum.sum() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distillery_quant::cpu::KernelFamily;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let relative = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(relative);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn causal_softmax_matches_the_formula() {
        // 2 rows of 3 columns, one earlier cached position: row 0 sees columns 0..=1.
        let mut scores = vec![1.0, 2.0, 3.0, 0.5, -0.5, 1.5];
        causal_softmax(&mut scores, 3, 0, 1, 2.0);
        let row0 = [2.0f32.exp(), 4.0f32.exp()];
        let total0: f32 = row0.iter().sum();
        let row1 = [1.0f32.exp(), (-1.0f32).exp(), 3.0f32.exp()];
        let total1: f32 = row1.iter().sum();
        let expected = [
            row0[0] / total0,
            row0[1] / total0,
            0.0,
            row1[0] / total1,
            row1[1] / total1,
            row1[2] / total1,
        ];
        for (got, want) in scores.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{scores:?}");
        }
    }

    #[test]
    fn one_query_head_attends_as_the_formula_says_over_strided_rows() {
        // Three keys and values of 2 values each, rows 3 apart (the rows of one head of a
        // cache that interleaves heads), the other values never read.
        let query = [1.0, -2.0];
        let keys = [0.5, 1.0, 9.0, -1.0, 0.25, 9.0, 2.0, 0.0];
        let values = [1.0, 2.0, 9.0, 3.0, -1.0, 9.0, 0.0, 4.0];
        let mut probabilities = [f32::NAN; 3];
        let mut out = [f32::NAN; 2];
        grouped_query_attention(
            1,
            &query,
            (&keys, 3),
            (&values, 3),
            0.5,
            &mut probabilities,
            &mut out,
        );
        // Scores q·k: -1.5, -1.5, 2; halved, then exponentiated and normalized.
        let weights = [(-0.75f32).exp(), (-0.75f32).exp(), 1.0f32.exp()];
        let total: f32 = weights.iter().sum();
        let expected_p = weights.map(|weight| weight / total);
        let expected_out = [
            expected_p[0] + 3.0 * expected_p[1],
            2.0 * expected_p[0] - expected_p[1] + 4.0 * expected_p[2],
        ];
        for (got, want) in probabilities.iter().zip(expected_p) {
            assert!((got - want).abs() < 1e-6, "{probabilities:?}");
        }
        for (got, want) in out.iter().zip(expected_out) {
            assert!((got - want).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn softmax_backward_matches_the_jacobian() {
        let p = [0.2f32, 0.3, 0.5];
        let mut g = [1.0f32, -2.0, 0.5];
        let original = g;
        softmax_backward(&p, &mut g, 3, 0.5);
        for i in 0..3 {
            let mut expected = 0.0;
            for j in 0..3 {
                let jacobian = if i == j {
                    p[i] * (1.0 - p[i])
                } else {
                    -p[i] * p[j]
                };
                expected += jacobian * original[j];
            }
            assert!((g[i] - 0.5 * expected).abs() < 1e-6);
        }
    }

    #[test]
    fn cross_entropy_and_its_gradient_match_hand_values() {
        let logits = [0.0f32, 2f32.ln(), 0.0, 3f32.ln(), 0.0, 0.0];
        let targets = [1, 2];
        let mut losses = [0.0; 2];
        let mut lse = [0.0; 2];
        cross_entropy(&logits, &targets, 3, &mut losses, &mut lse);
        assert!((losses[0] - 2f32.ln()).abs() < 1e-6);
        assert!((losses[1] - 5f32.ln()).abs() < 1e-6);
        let mut gradient = [0.0; 6];
        cross_entropy_backward(&logits, &targets, &lse, &[1.0, 2.0], 3, &mut gradient);
        let expected = [0.25, -0.5, 0.25, 1.2, 0.4, -1.6];
        for (got, want) in gradient.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{gradient:?}");
        }
    }

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let gate = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let up = [0.3f32, -1.2, 2.0, 0.9, -0.4];
        let ones = [1.0f32; 5];
        let mut dg = [0.0; 5];
        let mut du = [0.0; 5];
        swiglu_backward(&gate, &up, &ones, &mut dg, &mut du);
        let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
        for i in 0..5 {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let h = 1e-4;
            let numeric_g = (f(g + h, u) - f(g - h, u)) / (2.0 * h);
            let numeric_u = (f(g, u + h) - f(g, u - h)) / (2.0 * h);
            assert!((dg[i] as f64 - numeric_g).abs() < 1e-4, "gate {i}");
            assert!((du[i] as f64 - numeric_u).abs() < 1e-4, "up {i}");
        }
        let mut out = [0.0; 5];
        swiglu(&gate, &up, &mut out);
        for i in 0..5 {
            assert!((out[i] as f64 - f(gate[i] as f64, up[i] as f64)).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_gradients_match_finite_differences() {
        let x = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75];
        let gain = [1.0f32, 0.5, -2.0];
        let upstream = [0.3f32, -0.7, 1.1, 0.2, 0.9, -0.4];
        let eps = 1e-5;
        let mut y = [0.0; 6];
        let mut inverse = [0.0; 2];
        rms_norm(&x, &gain, eps, &mut y, &mut inverse);
        let mut dx = [0.0; 6];
        let mut dgain = [0.0; 3];
        rms_norm_backward(&x, &gain, &inverse, &upstream, &mut dx, &mut dgain);

        let objective = |x: &[f64], gain: &[f64]| -> f64 {
            x.chunks(3)
                .zip(upstream.chunks(3))
                .map(|(row, up)| {
                    let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / 3.0 + 1e-5).sqrt();
                    (0..3)
                        .map(|j| row[j] * r * gain[j] * up[j] as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = gain.iter().map(|&v| v as f64).collect();
        let h = 1e-5;
        for i in 0..6 {
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (objective(&plus, &g64) - objective(&minus, &g64)) / (2.0 * h);
            assert!(
                (dx[i] as f64 - numeric).abs() < 1e-4,
                "x {i}: {} vs {numeric}",
                dx[i]
            );
        }
        for j in 0..3 {
            let (mut plus, mut minus) = (g64.clone(), g64.clone());
            plus[j] += h;
            minus[j] -= h;
            let numeric = (objective(&x64, &plus) - objective(&x64, &minus)) / (2.0 * h);
            assert!((dgain[j] as f64 - numeric).abs() < 1e-4, "gain {j}");
        }
    }

    #[test]
    fn rotary_backward_is_the_transpose_of_rotary() {
        // <rotary(x), g> == <x, rotary_backward(g)> for any x, g: the two maps are adjoint.
        let x = [0.3f32, -1.2, 0.8, 2.0, -0.5, 1.1];
        let g = [1.0f32, 0.4, -0.7, 0.2, 0.9, -1.3];
        let cos = [0.9f32, 0.5, -0.2, 0.9, 0.5, -0.2];
        let sin = [-0.4f32, -0.8, -0.97, 0.4, 0.8, 0.97];
        let mut y = [0.0; 6];
        rotary(&x, &cos, &sin, &mut y);
        let mut dx = [0.0; 6];
        rotary_backward(&g, &cos, &sin, &mut dx);
        let forward: f32 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
        let backward: f32 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert!((forward - backward).abs() < 1e-5, "{forward} vs {backward}");
        // Pairs (x0, x3): y0 = x0 cos0 - x3 sin, y3 = x3 cos0 + x0 sin.
        assert!((y[0] - (0.3 * 0.9 + 2.0 * -0.4)).abs() < 1e-6);
        assert!((y[3] - (2.0 * 0.9 + 0.3 * 0.4)).abs() < 1e-6);
    }

    #[test]
    fn adamw_matches_the_update_rule() {
        let mut parameters = [1.0f32, -2.0];
        let mut first = [0.1f32, 0.0];
        let mut second = [0.01f32, 0.0];
        let step = AdamWStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            decay: 1.0 - 0.01 * 0.1,
            first_correction: 1.0 - 0.9f32.powi(2),
            second_correction: 1.0 - 0.99f32.powi(2),
            grad_scale: 0.5,
        };
        adamw(
            &mut parameters,
            &[2.0, -4.0],
            &mut first,
            &mut second,
            &step,
        );
        let g = [1.0f64, -2.0];
        let m = [0.9 * 0.1 + 0.1 * g[0], 0.1 * g[1]];
        let v = [0.99 * 0.01 + 0.01 * g[0] * g[0], 0.01 * g[1] * g[1]];
        for i in 0..2 {
            let start = [1.0f64, -2.0][i];
            let direction = (m[i] / (1.0 - 0.81)) / ((v[i] / (1.0 - 0.9801)).sqrt() + 1e-8);
            let expected = start * (1.0 - 0.001) - 0.01 * direction;
            assert!(
                (parameters[i] as f64 - expected).abs() < 1e-6,
                "{parameters:?}"
            );
            assert!((first[i] as f64 - m[i]).abs() < 1e-7);
            assert!((second[i] as f64 - v[i]).abs() < 1e-7);
        }
    }

    /// The kernel families this CPU runs, lowest first.
    fn families_here() -> Vec<KernelFamily> {
        [
            KernelFamily::Portable,
            KernelFamily::Avx2,
            KernelFamily::Avx512Vnni,
        ]
        .into_iter()
        .filter(|&family| family <= KernelFamily::detected())
        .collect()
    }

    /// Each row among up to eight gets, on every kernel family, the bits it gets alone: rows
    /// in one group of broadcasts or split over two, runs with and without whole passes of
    /// four weight rows, whole lane blocks and a tail (37 = 2 x 16 + 5).
    #[test]
    fn a_row_has_the_bits_it_has_alone_among_others_on_every_kernel_family() {
        let inputs = 37;
        let value = |index: usize| ((index * 7919) % 211) as f32 / 105.0 - 1.0;
        for run in [3, 4, 5, 8, 11] {
            let weight: Vec<f32> = (0..run * inputs).map(|index| value(index + 9000)).collect();
            let x: Vec<f32> = (0..8 * run).map(value).collect();
            let rows: Vec<&[f32]> = x.chunks(run).collect();
            let product = |family: KernelFamily, rows: &[&[f32]]| {
                let (x, weight, next) = (rows, &weight[..], &[][..]);
                // Written whole, whatever the buffer held.
                let out = &mut vec![f32::NAN; rows.len() * inputs][..];
                with_lanes!(@in family, rows_times_rows_with(
                    x: &[&[f32]],
                    weight: &[f32],
                    next: &[f32],
                    out: &mut [f32],
                ));
                out.to_vec()
            };
            let alone: Vec<Vec<f32>> = rows
                .iter()
                .map(|row| product(KernelFamily::Portable, &[row]))
                .collect();
            for family in families_here() {
                for count in 1..=8 {
                    let together = product(family, &rows[..count]);
                    for (row, got) in together.chunks(inputs).enumerate() {
                        assert_eq!(
                            got,
                            &alone[row][..],
                            "{family:?}, row {row} of {count}, a run of {run}"
                        );
                    }
                }
            }
            for (row, alone) in alone.iter().enumerate() {
                for (column, &got) in alone.iter().enumerate() {
                    let plain: f32 = (0..run)
                        .map(|k| rows[row][k] * weight[k * inputs + column])
                        .sum();
                    assert!(
                        (got - plain).abs() < 1e-4,
                        "row {row}, column {column}: {got} vs {plain}"
                    );
                }
            }
        }
    }

    fn add_square_onto<L: Lanes>(value: f32, onto: f32, out: &mut [f32; LANES]) {
        L::splat(onto)
            .add_product(L::splat(value), L::splat(value))
            .store(out);
    }

    /// Every family rounds a product and its sum once: (1 + 2^-23)^2 - (1 + 2^-22) is 2^-46
    /// fused, and 0 when the product is rounded first.
    #[test]
    fn every_kernel_family_fuses_its_products_into_their_sums() {
        let (value, onto) = (1.0 + f32::EPSILON, -(1.0 + 2.0 * f32::EPSILON));
        for family in families_here() {
            let out = &mut [f32::NAN; LANES];
            with_lanes!(@in family, add_square_onto(value: f32, onto: f32, out: &mut [f32; LANES]));
            assert_eq!(*out, [f32::EPSILON * f32::EPSILON; LANES], "{family:?}");
        }
    }

    /// The query heads of a group get, together, the scores and weighted values each gets
    /// alone, with every kernel family's lanes the portable lanes' bits, over strided rows,
    /// with one to five blocks of outputs and a tail (37 = 2 x 16 + 5, 83 = 5 x 16 + 3), and
    /// four heads: three together, then one.
    #[test]
    fn query_heads_keep_their_bits_together_and_on_every_kernel_family() {
        let value = |index: usize| ((index * 7919) % 211) as f32 / 105.0 - 1.0;
        let heads = 4;
        for head_dim in [16, 37, 83] {
            let (count, stride) = (9, head_dim + 7);
            let queries: Vec<f32> = (0..heads * head_dim).map(value).collect();
            let keys: Vec<f32> = (0..count * stride)
                .map(|index| value(index + 3000))
                .collect();
            let values: Vec<f32> = (0..count * stride)
                .map(|index| value(index + 6000))
                .collect();
            let probabilities: Vec<f32> = (0..heads * count)
                .map(|index| value(index + 900).abs())
                .collect();
            // The scores and weighted values of the heads `first..first + taken`, together.
            let run = |family: KernelFamily, first: usize, taken: usize| {
                let (key_stride, value_stride) = (stride, stride);
                let queries = &queries[first * head_dim..(first + taken) * head_dim];
                let (keys, values) = (&keys[..], &values[..]);
                let scores = &mut vec![f32::NAN; taken * count][..];
                with_lanes!(@in family, key_scores(
                    queries: &[f32],
                    head_dim: usize,
                    keys: &[f32],
                    key_stride: usize,
                    scores: &mut [f32],
                ));
                let probabilities = &probabilities[first * count..(first + taken) * count];
                let out = &mut vec![f32::NAN; taken * head_dim][..];
                with_lanes!(@in family, weighted_values(
                    probabilities: &[f32],
                    values: &[f32],
                    value_stride: usize,
                    out: &mut [f32],
                    head_dim: usize,
                ));
                (scores.to_vec(), out.to_vec())
            };
            let results: Vec<(Vec<f32>, Vec<f32>)> = families_here()
                .into_iter()
                .map(|family| {
                    let together = run(family, 0, heads);
                    for head in 0..heads {
                        let (scores, out) = run(family, head, 1);
                        assert_eq!(
                            (&scores[..], &out[..]),
                            (
                                &together.0[head * count..][..count],
                                &together.1[head * head_dim..][..head_dim]
                            ),
                            "{family:?}, head_dim {head_dim}, head {head} alone"
                        );
                    }
                    together
                })
                .collect();
            for (family, result) in families_here().iter().zip(&results) {
                assert_eq!(result, &results[0], "{family:?}, head_dim {head_dim}");
            }
            let (scores, out) = &results[0];
            for head in 0..heads {
                for key in 0..count {
                    let got = scores[head * count + key];
                    let plain: f32 = (0..head_dim)
                        .map(|k| queries[head * head_dim + k] * keys[key * stride + k])
                        .sum();
                    assert!(
                        (got - plain).abs() < 1e-4,
                        "score {head}, {key}: {got} vs {plain}"
                    );
                }
                for column in 0..head_dim {
                    let got = out[head * head_dim + column];
                    let plain: f32 = (0..count)
                        .map(|row| {
                            probabilities[head * count + row] * values[row * stride + column]
                        })
                        .sum();
                    assert!(
                        (got - plain).abs() < 1e-4,
                        "output {head}, {column}: {got} vs {plain}"
                    );
                }
            }
        }
    }

    /// Both few-row products give every kernel family the portable lanes' bits, for each count
    /// of rows, with whole lane blocks and a tail (37 = 2 x 16 + 5).
    #[test]
    fn few_row_products_keep_their_bits_on_every_kernel_family() {
        let (inputs, count, run) = (37, 11, 5);
        let value = |index: usize| ((index * 7919) % 211) as f32 / 105.0 - 1.0;
        let table: Vec<f32> = (0..count * inputs)
            .map(|index| value(index + 5000))
            .collect();
        let weight: Vec<f32> = (0..run * inputs).map(|index| value(index + 9000)).collect();
        let next: Vec<f32> = table[inputs..].to_vec();
        for rows_of_x in 1..=8 {
            let dots_x: Vec<f32> = (0..rows_of_x * inputs).map(value).collect();
            let product_x: Vec<f32> = (0..rows_of_x * run).map(value).collect();
            let results: Vec<(Vec<f32>, Vec<f32>)> = families_here()
                .into_iter()
                .map(|family| {
                    let (x, rows, out_stride) = (&dots_x[..], &table[..], count);
                    let next = &next[..];
                    let out = &mut vec![f32::NAN; rows_of_x * count][..];
                    with_lanes!(@in family, rows_dot_with(
                        x: &[f32],
                        inputs: usize,
                        rows: &[f32],
                        next: &[f32],
                        out: &mut [f32],
                        out_stride: usize,
                    ));
                    let dots = out.to_vec();
                    let rows: Vec<&[f32]> = product_x.chunks(run).collect();
                    let (x, weight) = (&rows[..], &weight[..]);
                    // Written whole, whatever the buffer held.
                    let out = &mut vec![f32::NAN; rows_of_x * inputs][..];
                    with_lanes!(@in family, rows_times_rows_with(
                        x: &[&[f32]],
                        weight: &[f32],
                        next: &[f32],
                        out: &mut [f32],
                    ));
                    (dots, out.to_vec())
                })
                .collect();
            let (dots, products) = &results[0];
            for (family, result) in families_here().iter().zip(&results) {
                assert_eq!(result, &results[0], "{family:?}, {rows_of_x} rows");
            }
            for (index, &got) in dots.iter().enumerate() {
                let (row, table_row) = (index / count, index % count);
                let plain: f32 = (0..inputs)
                    .map(|k| dots_x[row * inputs + k] * table[table_row * inputs + k])
                    .sum();
                assert!((got - plain).abs() < 1e-4, "dot {index}: {got} vs {plain}");
            }
            for (index, &got) in products.iter().enumerate() {
                let (row, column) = (index / inputs, index % inputs);
                let plain: f32 = (0..run)
                    .map(|k| product_x[row * run + k] * weight[k * inputs + column])
                    .sum::<f32>();
                assert!(
                    (got - plain).abs() < 1e-4,
                    "product {index}: {got} vs {plain}"
                );
            }
        }
    }

    #[test]
    fn dot_products_of_many_rows_are_each_rows_own() {
        // 37 inputs: two whole chunks of lanes and a tail of 5.
        let inputs = 37;
        let value = |index: usize| ((index * 7919) % 211) as f32 / 105.0 - 1.0;
        let table: Vec<f32> = (0..11 * inputs).map(|index| value(index + 5000)).collect();
        let x: Vec<f32> = (0..8 * inputs).map(value).collect();
        let alone: Vec<Vec<f32>> = x
            .chunks_exact(inputs)
            .map(|row| {
                let mut out = vec![0.0; 11];
                rows_dot(row, inputs, &table, &[], &mut out, 11);
                out
            })
            .collect();
        for (row, out) in alone.iter().enumerate() {
            for (index, &got) in out.iter().enumerate() {
                let plain: f32 = (0..inputs)
                    .map(|k| x[row * inputs + k] * table[index * inputs + k])
                    .sum();
                assert!((got - plain).abs() < 1e-4, "row {row}, output {index}");
            }
        }
        for rows in 2..=8 {
            let mut out = vec![f32::NAN; rows * 13];
            rows_dot(&x[..rows * inputs], inputs, &table, &[], &mut out, 13);
            for (row, alone) in alone.iter().take(rows).enumerate() {
                assert_eq!(
                    &out[row * 13..row * 13 + 11],
                    &alone[..],
                    "{rows} rows, row {row}"
                );
            }
        }
    }

    #[test]
    fn dropout_drops_the_requested_share_reproducibly() {
        let x = vec![1.0f32; 100_000];
        let p = 0.25f32;
        let threshold = (p as f64 * 4_294_967_296.0) as u32;
        let mut first = vec![0.0; x.len()];
        dropout(&x, 7, 0, threshold, 1.0 / (1.0 - p), &mut first);
        let dropped = first.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(
            first
                .iter()
                .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
        );
        // The same key and indices give the same mask; blocks compose.
        let mut halves = vec![0.0; x.len()];
        let (low, high) = halves.split_at_mut(50_000);
        dropout(&x[..50_000], 7, 0, threshold, 1.0 / (1.0 - p), low);
        dropout(&x[50_000..], 7, 50_000, threshold, 1.0 / (1.0 - p), high);
        assert_eq!(first, halves);
        let mut other = vec![0.0; x.len()];
        dropout(&x, 8, 0, threshold, 1.0 / (1.0 - p), &mut other);
        assert_ne!(first, other);
    }
}
