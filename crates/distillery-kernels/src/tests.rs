//! The fused kernels against burn's composed operations: outputs and every gradient.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};

use super::*;

const TOLERANCE: f32 = 2e-5;

fn random<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_into_vec_as::<f32>().unwrap()
}

fn assert_close(name: &str, fused: Vec<f32>, reference: Vec<f32>) {
    assert_eq!(fused.len(), reference.len(), "{name}: sizes");
    for (index, (a, b)) in fused.iter().zip(&reference).enumerate() {
        let bound = TOLERANCE * (1.0 + b.abs());
        assert!(
            (a - b).abs() <= bound,
            "{name}[{index}]: fused {a} vs composed {b}"
        );
    }
}

/// Runs `op` on fresh leaves through the fused and the composed path; compares the outputs and
/// the gradients of `sum(output * weights)` for every input.
fn compare<const D: usize, const O: usize>(
    name: &str,
    inputs: [Tensor<D>; O],
    fused_op: impl Fn(&[Tensor<D>]) -> Tensor<D>,
    composed_op: impl Fn(&[Tensor<D>]) -> Tensor<D>,
) {
    let (fused_output, fused_gradients) = output_and_gradients(&inputs, &fused_op);
    let (composed_output, composed_gradients) = output_and_gradients(&inputs, &composed_op);
    assert_close(&format!("{name} output"), fused_output, composed_output);
    for (index, (fused, composed)) in fused_gradients
        .into_iter()
        .zip(composed_gradients)
        .enumerate()
    {
        assert_close(
            &format!("{name} gradient of input {index}"),
            fused,
            composed,
        );
    }
}

/// `op`'s output on fresh leaves made of `inputs`, and the gradients of
/// `sum(output * weights)` for every input.
fn output_and_gradients<const D: usize>(
    inputs: &[Tensor<D>],
    op: &dyn Fn(&[Tensor<D>]) -> Tensor<D>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let leaves: Vec<Tensor<D>> = inputs
        .iter()
        .map(|input| input.clone().autodiff().require_grad())
        .collect();
    let output = op(&leaves);
    let weights = random(output.dims(), 99, &Device::flex().autodiff());
    let gradients = (output.clone() * weights).sum().backward();
    let input_gradients: Vec<Vec<f32>> = leaves
        .iter()
        .map(|leaf| values(leaf.grad(&gradients).expect("every input gets a gradient")))
        .collect();
    (values(output), input_gradients)
}

#[test]
fn attention_matches_composed_attention_with_grouped_heads_and_a_cache_offset() {
    let device = Device::flex();
    // 4 query heads over 2 key/value heads; 5 queries after 2 cached positions.
    let query = random([2, 4, 5, 8], 1, &device);
    let key = random([2, 2, 7, 8], 2, &device);
    let value = random([2, 2, 7, 8], 3, &device);
    compare(
        "attention",
        [query, key, value],
        |x| causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
        |x| composed::causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
    );
}

#[test]
fn many_queries_at_once_match_composed_attention() {
    let device = Device::flex();
    // 70 queries after 3 cached positions: more than are taken one by one, in three tiles of
    // queries, the last one partial.
    let query = random([1, 4, 70, 8], 11, &device);
    let key = random([1, 2, 73, 8], 12, &device);
    let value = random([1, 2, 73, 8], 13, &device);
    compare(
        "attention of many queries",
        [query, key, value],
        |x| causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
        |x| composed::causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
    );
}

/// A few queries at once give each query the bits it gets as a decode step of its own, over
/// the keys up to its position: what lets speculative decoding check drafted tokens in one pass
/// and still give the model's own greedy tokens.
#[test]
fn a_few_queries_attend_as_their_own_decode_steps() {
    let device = Device::flex();
    let query = random([1, 4, 5, 8], 14, &device);
    let key = random([1, 2, 9, 8], 15, &device);
    let value = random([1, 2, 9, 8], 16, &device);
    let together = values(causal_attention(query.clone(), key.clone(), value.clone()));
    for row in 0..5 {
        let visible = 9 - 5 + row + 1;
        let alone = values(causal_attention(
            query.clone().narrow(2, row, 1),
            key.clone().narrow(2, 0, visible),
            value.clone().narrow(2, 0, visible),
        ));
        for head in 0..4 {
            let at = (head * 5 + row) * 8;
            assert_eq!(
                together[at..at + 8],
                alone[head * 8..head * 8 + 8],
                "row {row}"
            );
        }
    }
}

#[test]
fn attention_reads_strided_inputs() {
    let device = Device::flex();
    // [batch, seq, heads, dim] viewed as [batch, heads, seq, dim]: not contiguous.
    let query = random([2, 6, 3, 4], 4, &device).swap_dims(1, 2);
    let key = random([2, 6, 3, 4], 5, &device).swap_dims(1, 2);
    let value = random([2, 6, 3, 4], 6, &device).swap_dims(1, 2);
    compare(
        "strided attention",
        [query, key, value],
        |x| causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
        |x| composed::causal_attention(x[0].clone(), x[1].clone(), x[2].clone()),
    );
}

#[test]
fn swiglu_matches_silu_times_up() {
    let device = Device::flex();
    compare(
        "swiglu",
        [random([3, 5, 7], 7, &device), random([3, 5, 7], 8, &device)],
        |x| swiglu(x[0].clone(), x[1].clone()),
        |x| composed::swiglu(x[0].clone(), x[1].clone()),
    );
}

#[test]
fn rms_norm_matches_the_composed_norm() {
    let device = Device::flex().autodiff();
    let x = random([3, 4, 9], 9, &device).require_grad();
    let gain = random([9], 10, &device).require_grad();
    let weights = random([3, 4, 9], 11, &device);
    let run = |op: &dyn Fn(Tensor<3>, Tensor<1>) -> Tensor<3>| {
        let (x, gain) = (
            x.clone().detach().require_grad(),
            gain.clone().detach().require_grad(),
        );
        let output = op(x.clone(), gain.clone());
        let gradients = (output.clone() * weights.clone()).sum().backward();
        (
            values(output),
            values(x.grad(&gradients).unwrap()),
            values(gain.grad(&gradients).unwrap()),
        )
    };
    let fused = run(&|x, gain| rms_norm(x, gain, 1e-5));
    let composed = run(&|x, gain| composed::rms_norm(x, gain, 1e-5));
    assert_close("rms_norm output", fused.0, composed.0);
    assert_close("rms_norm input gradient", fused.1, composed.1);
    assert_close("rms_norm gain gradient", fused.2, composed.2);
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather() {
    let device = Device::flex().autodiff();
    let logits = random([6, 11], 12, &device).require_grad();
    let targets =
        Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 10, 3, 3, 7, 1], [6]), &device);
    let weights = random([6], 13, &device);
    let run = |op: &dyn Fn(Tensor<2>, Tensor<1, Int>) -> Tensor<1>| {
        let logits = logits.clone().detach().require_grad();
        let losses = op(logits.clone(), targets.clone());
        let gradients = (losses.clone() * weights.clone()).sum().backward();
        (values(losses), values(logits.grad(&gradients).unwrap()))
    };
    let fused = run(&cross_entropy_rows);
    let composed = run(&composed::cross_entropy_rows);
    assert_close("cross-entropy", fused.0, composed.0);
    assert_close("cross-entropy gradient", fused.1, composed.1);
}

#[test]
fn forward_kl_matches_composed_log_softmaxes_with_a_constant_teacher() {
    let device = Device::flex().autodiff();
    let student = random([6, 11], 21, &device);
    let mut teacher = values(random([6, 11], 22, &device));
    // A row left out by a top-k teacher cache: every other logit at -1e9.
    for value in &mut teacher[11..19] {
        *value = -1e9;
    }
    let teacher = Tensor::<2>::from_data(TensorData::new(teacher, [6, 11]), &Device::flex());
    let weights = random([6], 23, &device);
    for temperature in [1.0, 2.0, 4.5] {
        let run = |op: &dyn Fn(Tensor<2>, Tensor<2>, f64) -> Tensor<1>| {
            let student = student.clone().detach().require_grad();
            let losses = op(student.clone(), teacher.clone(), temperature);
            let gradients = (losses.clone() * weights.clone()).sum().backward();
            (values(losses), values(student.grad(&gradients).unwrap()))
        };
        let fused = run(&forward_kl_rows);
        let composed = run(&composed::forward_kl_rows);
        assert_close("forward KL", fused.0, composed.0);
        assert_close("forward KL gradient", fused.1, composed.1);
    }
}

type SparseOp = dyn Fn(Tensor<2>, Tensor<2, Int>, Tensor<2>, f64) -> Tensor<1>;

/// The losses of `op` and the gradient of `sum(losses * weights)` for the student.
fn sparse_losses_and_gradient(
    op: &SparseOp,
    student: &Tensor<2>,
    ids: &Tensor<2, Int>,
    teacher: &Tensor<2>,
    temperature: f64,
    weights: &Tensor<1>,
) -> (Vec<f32>, Vec<f32>) {
    let student = student.clone().detach().require_grad();
    let losses = op(student.clone(), ids.clone(), teacher.clone(), temperature);
    let gradients = (losses.clone() * weights.clone()).sum().backward();
    (values(losses), values(student.grad(&gradients).unwrap()))
}

fn int_ids(ids: Vec<i64>, shape: [usize; 2]) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids, shape), &Device::flex())
}

#[test]
fn sparse_forward_kl_fused_matches_composed() {
    let device = Device::flex().autodiff();
    let student = random([5, 13], 31, &device);
    let ids = int_ids(
        vec![
            0, 4, 12, 7, //
            3, 2, 1, 0, //
            12, 11, 10, 9, //
            5, 6, 8, 1, //
            9, 3, 7, 2,
        ],
        [5, 4],
    );
    let teacher = log_softmax(random([5, 5], 32, &Device::flex()), 1);
    let weights = random([5], 33, &device);
    for temperature in [1.0, 2.0] {
        let run = |op: &SparseOp| {
            sparse_losses_and_gradient(op, &student, &ids, &teacher, temperature, &weights)
        };
        let fused = run(&sparse_forward_kl_rows);
        let composed = run(&composed::sparse_forward_kl_rows);
        assert_close("sparse forward KL", fused.0, composed.0);
        assert_close("sparse forward KL gradient", fused.1, composed.1);
    }
}

#[test]
fn sparse_forward_kl_counts_the_cached_tokens_and_the_rest_as_outcomes() {
    let device = Device::flex().autodiff();
    let student_logits = [1.0f64, 2.0, 0.5, -1.0];
    let teacher_probabilities = [0.5f64, 0.2, 0.3];
    let temperature = 2.0;
    // By hand: the student's softmax at T = 2, grouped as token 1, token 3, and the rest {0, 2}.
    let exps: Vec<f64> = student_logits
        .iter()
        .map(|logit| (logit / temperature).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let student_grouped = [
        exps[1] / total,
        exps[3] / total,
        (exps[0] + exps[2]) / total,
    ];
    let expected: f64 = temperature
        * temperature
        * teacher_probabilities
            .iter()
            .zip(&student_grouped)
            .map(|(p, q)| p * (p / q).ln())
            .sum::<f64>();
    let student = Tensor::<2>::from_data(
        TensorData::new(student_logits.map(|x| x as f32).to_vec(), [1, 4]),
        &device,
    );
    let teacher = Tensor::<2>::from_data(
        TensorData::new(
            teacher_probabilities.map(|p| p.ln() as f32).to_vec(),
            [1, 3],
        ),
        &Device::flex(),
    );
    let ids = int_ids(vec![1, 3], [1, 2]);
    for op in [
        &sparse_forward_kl_rows as &SparseOp,
        &composed::sparse_forward_kl_rows,
    ] {
        let loss = values(op(
            student.clone(),
            ids.clone(),
            teacher.clone(),
            temperature,
        ))[0];
        assert!(
            (f64::from(loss) - expected).abs() < 1e-5,
            "{loss} vs by hand {expected}"
        );
    }
}

#[test]
fn sparse_forward_kl_over_every_token_is_the_dense_divergence() {
    let device = Device::flex().autodiff();
    let student = random([3, 6], 34, &device);
    let teacher_logits = random([3, 6], 35, &Device::flex());
    let weights = random([3], 36, &device);
    let temperature = 1.5;
    // The ids list every token, out of order; the rest is empty and has no mass.
    let order = [4i64, 0, 5, 2, 1, 3];
    let ids = int_ids(order.repeat(3), [3, 6]);
    let log_p = log_softmax(teacher_logits.clone().div_scalar(temperature), 1);
    let teacher = Tensor::cat(
        vec![
            log_p.gather(1, ids.clone()),
            Tensor::full([3, 1], -1e9, &Device::flex()),
        ],
        1,
    );
    let dense = sparse_losses_and_gradient(
        &|student, _, teacher, temperature| forward_kl_rows(student, teacher, temperature),
        &student,
        &ids,
        &teacher_logits,
        temperature,
        &weights,
    );
    for op in [
        &sparse_forward_kl_rows as &SparseOp,
        &composed::sparse_forward_kl_rows,
    ] {
        let sparse =
            sparse_losses_and_gradient(op, &student, &ids, &teacher, temperature, &weights);
        assert_close("covering sparse forward KL", sparse.0, dense.0.clone());
        assert_close("covering sparse gradient", sparse.1, dense.1.clone());
    }
}

#[test]
fn inference_without_autodiff_uses_the_same_kernels() {
    let device = Device::flex();
    let query = random([1, 2, 3, 4], 14, &device);
    let key = random([1, 2, 3, 4], 15, &device);
    let value = random([1, 2, 3, 4], 16, &device);
    assert_close(
        "plain attention",
        values(causal_attention(query.clone(), key.clone(), value.clone())),
        values(composed::causal_attention(query, key, value)),
    );
}

#[test]
fn rotary_matches_the_composed_rotation_at_an_offset() {
    let device = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (positions, head_dim) = (12, 6);
    let angles: Vec<f32> = (0..positions * head_dim / 2)
        .map(|_| rng.random::<f32>() * 6.0)
        .collect();
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for row in angles.chunks(head_dim / 2) {
        for sign in [-1.0f32, 1.0] {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| sign * a.sin()));
        }
    }
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [positions, head_dim]), &device);
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [positions, head_dim]), &device);
    // A strided input: [batch, seq, heads, dim] viewed as [batch, heads, seq, dim].
    let x = random([2, 5, 3, head_dim], 18, &device).swap_dims(1, 2);
    compare(
        "rotary",
        [x],
        |x| {
            rotary(
                x[0].clone(),
                cos.clone().autodiff(),
                sin.clone().autodiff(),
                4,
            )
        },
        |x| {
            composed::rotary(
                x[0].clone(),
                cos.clone().autodiff(),
                sin.clone().autodiff(),
                4,
            )
        },
    );
}

#[test]
fn adamw_matches_the_composed_update() {
    let device = Device::flex();
    let step = AdamWStep {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 1.0 - 3e-3 * 0.1,
        first_correction: 1.0 - 0.9f32.powi(3),
        second_correction: 1.0 - 0.95f32.powi(3),
        grad_scale: 0.7,
    };
    let tensors = || {
        (
            random([50_000], 19, &device),
            random([50_000], 20, &device),
            random([50_000], 21, &device).mul_scalar(0.1),
            random([50_000], 22, &device).abs().mul_scalar(0.01),
        )
    };
    let (p, g, m, v) = tensors();
    let fused = adamw(p, g, m, v, step);
    let (p, g, m, v) = tensors();
    let composed = composed::adamw(p, g, m, v, step);
    assert_close("adamw parameter", values(fused.0), values(composed.0));
    assert_close("adamw first moment", values(fused.1), values(composed.1));
    assert_close("adamw second moment", values(fused.2), values(composed.2));
}

#[test]
fn dropout_gradient_uses_the_forward_mask() {
    let device = Device::flex().autodiff();
    let x = random([4, 64, 32], 23, &device).require_grad();
    let weights = random([4, 64, 32], 24, &device);
    let output = dropout(x.clone(), 0.3, 5);
    let gradients = (output.clone() * weights.clone()).sum().backward();
    let output = values(output);
    let inputs = values(x.clone());
    let gradient = values(x.grad(&gradients).unwrap());
    let weights = values(weights);
    let scale = 1.0 / 0.7;
    let mut dropped = 0;
    for i in 0..output.len() {
        if output[i] == 0.0 {
            dropped += 1;
            assert_eq!(gradient[i], 0.0);
        } else {
            assert!((output[i] - inputs[i] * scale).abs() < 1e-5);
            assert!((gradient[i] - weights[i] * scale).abs() < 1e-5);
        }
    }
    let share = dropped as f64 / output.len() as f64;
    assert!((share - 0.3).abs() < 0.03, "dropped {share}");
    assert_eq!(values(dropout(x.clone(), 0.3, 5)), output);
    assert_ne!(values(dropout(x, 0.3, 6)), output);
}

/// A few rows times a weight, and times a transposed table (a tied output head), equal burn's
/// product, with bits that depend neither on the thread count (1 or 3 workers) nor on the
/// other rows: each of eight rows (the first, which streams the weight, and the seven that meet
/// it in cache) gets what it gets alone.
#[test]
fn a_few_rows_times_a_matrix_match_the_product_on_any_thread_count() {
    let device = Device::flex();
    let x = random([8, 302], 31, &device);
    let weight = random([302, 1100], 32, &device);
    let table = random([1100, 302], 33, &device);
    let on_threads = |threads: usize, x: &Tensor<2>| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            (
                values(rows_times_matrix(x.clone(), weight.clone())),
                values(rows_times_matrix(x.clone(), table.clone().transpose())),
            )
        })
    };
    let (product, head) = on_threads(1, &x);
    assert_eq!(on_threads(3, &x), (product.clone(), head.clone()));
    for row in 0..8 {
        let (alone, alone_head) = on_threads(2, &x.clone().narrow(0, row, 1));
        assert_eq!(alone, product[row * 1100..(row + 1) * 1100], "row {row}");
        assert_eq!(alone_head, head[row * 1100..(row + 1) * 1100], "row {row}");
    }
    // A thread keeps its runs' partial sums from one product to the next: each product
    // writes over what the one before left there, for every row.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (again, rows_after) = pool.install(|| {
        rows_times_matrix(x.clone() * 2.0, weight.clone());
        let again = values(rows_times_matrix(x.clone(), weight.clone()));
        let rows_after: Vec<f32> = (0..8)
            .flat_map(|row| {
                values(rows_times_matrix(
                    x.clone().narrow(0, row, 1),
                    weight.clone(),
                ))
            })
            .collect();
        (again, rows_after)
    });
    assert_eq!(again, product);
    assert_eq!(rows_after, product);
    // The sums run over 302 products of up to 4 in size.
    let close = |name: &str, got: Vec<f32>, want: Vec<f32>| {
        for (index, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-3, "{name}[{index}]: {a} vs {b}");
        }
    };
    close("product", product, values(x.clone().matmul(weight)));
    close("head", head, values(x.matmul(table.transpose())));
}

/// The linear layers' product replaces burn's matmul on burn-flex with the same gemm call,
/// written in place: outputs and both gradients keep their bits, for a weight and for the
/// transposed view of a table (a tied output head), below and above the size where the
/// product splits over threads.
#[test]
fn linear_keeps_the_bits_of_the_matmul_it_replaces() {
    let device = Device::flex();
    for (rows, inputs, outputs) in [(5, 30, 7), (64, 300, 400)] {
        let x = random([rows, inputs], 51, &device);
        let weight = random([inputs, outputs], 52, &device);
        let table = random([outputs, inputs], 53, &device);
        for (name, transposed) in [("weight", false), ("table", true)] {
            let product = |operands: &[Tensor<2>], op: fn(Tensor<2>, Tensor<2>) -> Tensor<2>| {
                let weight = if transposed {
                    operands[1].clone().transpose()
                } else {
                    operands[1].clone()
                };
                op(operands[0].clone(), weight)
            };
            let operands = [
                x.clone(),
                if transposed {
                    table.clone()
                } else {
                    weight.clone()
                },
            ];
            assert_eq!(
                output_and_gradients(&operands, &|operands| product(operands, linear)),
                output_and_gradients(&operands, &|operands| product(operands, composed::linear)),
                "{name}, {rows} x {inputs} x {outputs}"
            );
        }
    }
}

/// The head's total, per-row losses, and the gradients of three times the total with respect
/// to the hidden states and to a tied `[vocab, width]` table (the head is its transpose).
fn head_results(
    hidden: &Tensor<2>,
    table: &Tensor<2>,
    fused_path: bool,
    teacher: HeadTeacher,
) -> Vec<(String, Vec<f32>)> {
    let rows = hidden.dims()[0];
    let device = Device::flex().autodiff();
    let hidden = hidden.clone().autodiff().require_grad();
    let table = table.clone().autodiff().require_grad();
    let targets: Vec<i64> = (0..rows as i64).map(|row| (row * 29 + 3) % 67).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [rows]), &device);
    // Padding rows weigh nothing in either loss.
    let scale = |row: usize, factor: f32| {
        if row % 5 == 4 {
            0.0
        } else {
            factor / rows as f32
        }
    };
    let weights = RowWeights {
        cross_entropy: Tensor::from_data(
            TensorData::new((0..rows).map(|row| scale(row, 0.3)).collect(), [rows]),
            &device,
        ),
        divergence: Tensor::from_data(
            TensorData::new((0..rows).map(|row| scale(row, 0.7)).collect(), [rows]),
            &device,
        ),
    };
    let teacher = match teacher {
        HeadTeacher::Dense { hidden, weight } if !fused_path => HeadTeacher::Dense {
            hidden: hidden.autodiff(),
            weight: weight.autodiff(),
        },
        HeadTeacher::Sparse { ids, log_probs } if !fused_path => HeadTeacher::Sparse {
            ids: ids.autodiff(),
            log_probs: log_probs.autodiff(),
        },
        teacher => teacher,
    };
    let weight = table.clone().transpose();
    let losses = if fused_path {
        head_losses(hidden.clone(), weight, targets, teacher, weights, 2.0)
    } else {
        composed::head_losses(hidden.clone(), weight, targets, teacher, weights, 2.0)
    };
    let gradients = losses.total.clone().mul_scalar(3.0).backward();
    vec![
        ("total".into(), values(losses.total)),
        ("cross-entropy".into(), values(losses.cross_entropy)),
        ("divergence".into(), values(losses.divergence)),
        (
            "hidden gradient".into(),
            values(
                hidden
                    .grad(&gradients)
                    .expect("hidden states get a gradient"),
            ),
        ),
        (
            "table gradient".into(),
            values(table.grad(&gradients).expect("the table gets a gradient")),
        ),
    ]
}

#[test]
fn head_losses_in_chunks_match_whole_logits_for_labels_a_live_and_a_cached_teacher() {
    let device = Device::flex();
    // 70 rows: two whole row blocks and a partial one, each its own chunk in unit tests.
    let (rows, width, vocab, teacher_width, k) = (70, 12, 67, 9, 5);
    let hidden = random([rows, width], 1, &device);
    let table = random([vocab, width], 2, &device);
    let ids: Vec<i64> = (0..rows)
        .flat_map(|row| (0..k).map(move |slot| ((row * 7 + slot * 13) % vocab) as i64))
        .collect();
    // Teacher log-probabilities over k + 1 outcomes: a softmax of random scores.
    let log_probs = burn::tensor::activation::log_softmax(random([rows, k + 1], 5, &device), 1);
    let teachers = [
        ("labels", HeadTeacher::Labels),
        (
            "live teacher",
            HeadTeacher::Dense {
                hidden: random([rows, teacher_width], 3, &device),
                weight: random([teacher_width, vocab], 4, &device),
            },
        ),
        (
            "cached teacher",
            HeadTeacher::Sparse {
                ids: Tensor::from_data(TensorData::new(ids, [rows, k]), &device),
                log_probs,
            },
        ),
    ];
    for (name, teacher) in teachers {
        let fused = head_results(&hidden, &table, true, teacher.clone());
        let reference = head_results(&hidden, &table, false, teacher);
        for ((what, fused), (_, reference)) in fused.into_iter().zip(reference) {
            assert_close(&format!("{name}: {what}"), fused, reference);
        }
    }
}

#[test]
fn head_scores_in_chunks_are_the_losses_and_argmax_of_whole_logits() {
    let device = Device::flex();
    let (rows, width, vocab) = (70, 12, 67);
    let hidden = random([rows, width], 6, &device);
    let table = random([vocab, width], 7, &device);
    let targets: Vec<i64> = (0..rows as i64).map(|row| (row * 17 + 5) % 67).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [rows]), &device);
    let (losses, predicted) =
        head_scores(hidden.clone(), table.clone().transpose(), targets.clone());
    let logits = hidden.matmul(table.transpose());
    let expected_predictions: Vec<i64> = logits
        .clone()
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .try_into_vec()
        .unwrap();
    assert_close(
        "cross-entropy",
        values(losses),
        values(composed::cross_entropy_rows(logits, targets)),
    );
    let predicted: Vec<i64> = predicted
        .into_data()
        .convert::<i64>()
        .try_into_vec()
        .unwrap();
    assert_eq!(predicted, expected_predictions);
}
