//! The time of one decoding step's quantized products, for 1 to 8 inputs a matrix, on matrices
//! shaped as SmolLM2-135M's (30 layers of 576 wide, 1,536 in the MLP, a 49,152-token head)
//! with random weights: what a batch or a speculative check pays per step against one token.
//!
//! `cargo run --release -p distillery-quant --example step_products -- [q8_0|q4_1] [STEPS] [COUNTS]`
//! (COUNTS: the input counts to time, comma-separated, 1,2,4,8 by default; each count's time
//! is also given as a ratio to one input's once 1 has run)
//! (`DISTILLERY_KERNELS` chooses a lower kernel family, as everywhere).

use std::time::Instant;

use distillery_quant::ggml::quantize_q8_0;
use distillery_quant::{BlockMatrix, GgmlType};

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV: usize = 192;
const INTERMEDIATE: usize = 1536;
const VOCAB: usize = 49152;

/// Random weights in `kind`'s blocks, from a small linear congruential generator.
fn matrix(kind: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> BlockMatrix {
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    };
    let bytes = match kind {
        GgmlType::Q8_0 => {
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            quantize_q8_0(&values)
        }
        GgmlType::Q4_1 => (0..rows * cols / 32)
            .flat_map(|_| {
                let mut block = vec![0u8; 20];
                // d = 2^-7, m = -2^-4, as half-precision numbers.
                block[..2].copy_from_slice(&0x2000u16.to_le_bytes());
                block[2..4].copy_from_slice(&0xAC00u16.to_le_bytes());
                for byte in &mut block[4..] {
                    *byte = next() as u8;
                }
                block
            })
            .collect(),
        other => panic!("{other} is not benchmarked"),
    };
    BlockMatrix::new(kind, rows, cols, bytes).expect("whole blocks")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = match args.next().as_deref().unwrap_or("q8_0") {
        "q4_1" => GgmlType::Q4_1,
        _ => GgmlType::Q8_0,
    };
    let steps: usize = args
        .next()
        .map_or(20, |steps| steps.parse().expect("a count"));
    let counts: Vec<usize> = args.next().map_or(vec![1, 2, 4, 8], |counts| {
        counts
            .split(',')
            .map(|count| count.parse().expect("input counts"))
            .collect()
    });
    let mut seed = 7;
    let layers: Vec<[BlockMatrix; 7]> = (0..LAYERS)
        .map(|_| {
            [
                matrix(kind, HIDDEN, HIDDEN, &mut seed),
                matrix(kind, KV, HIDDEN, &mut seed),
                matrix(kind, KV, HIDDEN, &mut seed),
                matrix(kind, HIDDEN, HIDDEN, &mut seed),
                matrix(kind, INTERMEDIATE, HIDDEN, &mut seed),
                matrix(kind, INTERMEDIATE, HIDDEN, &mut seed),
                matrix(kind, HIDDEN, INTERMEDIATE, &mut seed),
            ]
        })
        .collect();
    let head = matrix(kind, VOCAB, HIDDEN, &mut seed);
    let bytes: usize = layers
        .iter()
        .flatten()
        .chain([&head])
        .map(BlockMatrix::memory_bytes)
        .sum();
    println!(
        "{kind}, {:.1} MB of weights a step, {} threads",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    let step = |count: usize| {
        let x: Vec<f32> = (0..count * INTERMEDIATE)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let (narrow, wide) = (&x[..count * HIDDEN], &x[..count * INTERMEDIATE]);
        for [q, k, v, o, gate, up, down] in &layers {
            BlockMatrix::matmul_int8_inputs_together(&[q, k, v], narrow, count);
            o.matmul_int8_inputs(narrow, count);
            BlockMatrix::matmul_int8_inputs_together(&[gate, up], narrow, count);
            down.matmul_int8_inputs(wide, count);
        }
        head.matmul_int8_inputs(narrow, count);
    };
    let mut single = None;
    for count in counts {
        step(count);
        let started = Instant::now();
        for _ in 0..steps {
            step(count);
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / steps as f64;
        if count == 1 {
            single = Some(ms);
        }
        let ratio = single.map_or_else(String::new, |single| {
            format!(" ({:.2} of one input's)", ms / single)
        });
        println!(
            "{count} inputs: {ms:.2} ms a step{ratio}, {:.1} GB/s",
            bytes as f64 / ms / 1e6
        );
    }
}
