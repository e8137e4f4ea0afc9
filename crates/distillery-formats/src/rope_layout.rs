//! The q/k row permutation between rotary layouts.
//!
//! distillery, like Hugging Face, rotates the pairs `(x[i], x[i + d/2])` of each head
//! ("rotate-half"); llama.cpp (GGUF) and burn's `RotaryEncoding` rotate adjacent pairs
//! `(x[2i], x[2i + 1])`. A query/key projection written for one layout serves the other once the
//! output rows of each head are permuted: row `2i` of a head takes row `i`, row `2i + 1` takes row
//! `i + d/2`. Attention scores are unchanged because queries and keys move together.

/// Permutes the rows of a `[heads * head_dim, columns]` row-major matrix (Hugging Face's
/// `[out, in]` projection layout) from rotate-half order to interleaved order.
pub fn rotate_half_to_interleaved<T: Copy>(
    rows: &[T],
    heads: usize,
    head_dim: usize,
    columns: usize,
) -> Vec<T> {
    permute_rows(rows, heads, head_dim, columns, |i, half| {
        // Destination row `r` of a head reads source row `r / 2 + (r % 2) * half`.
        i / 2 + (i % 2) * half
    })
}

/// The inverse of [`rotate_half_to_interleaved`].
pub fn interleaved_to_rotate_half<T: Copy>(
    rows: &[T],
    heads: usize,
    head_dim: usize,
    columns: usize,
) -> Vec<T> {
    permute_rows(rows, heads, head_dim, columns, |i, half| {
        if i < half { 2 * i } else { 2 * (i - half) + 1 }
    })
}

fn permute_rows<T: Copy>(
    rows: &[T],
    heads: usize,
    head_dim: usize,
    columns: usize,
    source_row: impl Fn(usize, usize) -> usize,
) -> Vec<T> {
    assert_eq!(rows.len(), heads * head_dim * columns, "matrix size");
    assert_eq!(head_dim % 2, 0, "rotary head dimension must be even");
    let half = head_dim / 2;
    let mut permuted = Vec::with_capacity(rows.len());
    for head in 0..heads {
        for row in 0..head_dim {
            let source = (head * head_dim + source_row(row, half)) * columns;
            permuted.extend_from_slice(&rows[source..source + columns]);
        }
    }
    permuted
}

#[cfg(test)]
mod tests {
    use burn::nn::RotaryEncodingConfig;
    use burn::tensor::{Device, Tensor, TensorData};
    use distillery_model::rope::RotaryTables;
    use rand::{RngExt, SeedableRng};

    use super::*;

    fn random(count: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..count).map(|_| rng.random::<f32>() - 0.5).collect()
    }

    #[test]
    fn permutation_moves_pairs_next_to_each_other() {
        // One head of dimension 4, one column: rows (a0, a1, b0, b1) pair a_i with b_i.
        let rows = ["a0", "a1", "b0", "b1"];
        assert_eq!(
            rotate_half_to_interleaved(&rows, 1, 4, 1),
            ["a0", "b0", "a1", "b1"]
        );
        let matrix: Vec<u32> = (0..2 * 6 * 3).collect();
        let there = rotate_half_to_interleaved(&matrix, 2, 6, 3);
        assert_ne!(there, matrix);
        assert_eq!(interleaved_to_rotate_half(&there, 2, 6, 3), matrix);
    }

    /// Rotating in distillery's layout and then permuting equals permuting and then rotating
    /// with burn's adjacent-pair `RotaryEncoding`: the permutation is the one between the two.
    #[test]
    fn rotate_half_rope_equals_adjacent_pair_rope_after_permutation() {
        let device = Device::flex();
        let (heads, positions, head_dim) = (3, 9, 8);
        let values = random(heads * positions * head_dim, 1);
        let x = Tensor::<4>::from_data(
            TensorData::new(values.clone(), [1, heads, positions, head_dim]),
            &device,
        );
        let ours = RotaryTables::new(32, head_dim, 10000.0, None, &device).apply(x, 0);
        let ours: Vec<f32> = ours.into_data().try_into_vec().unwrap();

        // Treat every (head, position) vector as one "row set" of head_dim rows, one column.
        let vectors = heads * positions;
        let interleaved_input = rotate_half_to_interleaved(&values, vectors, head_dim, 1);
        let burn_rope = RotaryEncodingConfig::new(32, head_dim).init(&device);
        let theirs = burn_rope.forward(Tensor::<4>::from_data(
            TensorData::new(interleaved_input, [1, heads, positions, head_dim]),
            &device,
        ));
        let theirs: Vec<f32> = theirs.into_data().try_into_vec().unwrap();
        let expected = rotate_half_to_interleaved(&ours, vectors, head_dim, 1);
        for (a, b) in theirs.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
