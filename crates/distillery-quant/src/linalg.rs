//! The dense linear algebra GPTQ needs, on row-major `n x n` f64 matrices. The work runs as
//! dot products over contiguous rows, spread over rows or columns in parallel, so that the
//! 1,536-wide Hessian of a SmolLM2 down projection factors in a fraction of a second.

use multiversion::multiversion;
use rayon::prelude::*;

/// `Σ a[k] b[k]` with eight running sums, which the compiler turns into vector lanes; the
/// summation order is fixed, so every CPU and thread count gives the same bits.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0f64; 8];
    let (a_lanes, b_lanes) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = a_lanes
        .remainder()
        .iter()
        .zip(b_lanes.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_lanes.zip(b_lanes) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// The lower-triangular `L` with `L Lᵀ = a`, or `None` when `a` is not positive definite.
/// Column by column: each column's entries below the diagonal are independent dot products.
fn cholesky_lower(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let (done, below) = l.split_at_mut((j + 1) * n);
        let row_j = &mut done[j * n..];
        let value = a[j * n + j] - dot(&row_j[..j], &row_j[..j]);
        if !(value > 0.0 && value.is_finite()) {
            return None;
        }
        let diagonal = value.sqrt();
        row_j[j] = diagonal;
        let row_j = &row_j[..j];
        below
            .par_chunks_mut(n)
            .with_min_len(16)
            .enumerate()
            .for_each(|(offset, row_i)| {
                let i = j + 1 + offset;
                row_i[j] = (a[i * n + j] - dot(&row_i[..j], row_j)) / diagonal;
            });
    }
    Some(l)
}

/// The columns of `L⁻¹` for a lower-triangular `L` with a positive diagonal, each stored as a
/// row (`columns[j * n + i] = (L⁻¹)[i][j]`), solved by forward substitution in parallel.
fn lower_inverse_columns(l: &[f64], n: usize) -> Vec<f64> {
    let mut columns = vec![0.0; n * n];
    columns
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(j, column)| {
            column[j] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                column[i] = -dot(&l[i * n + j..i * n + i], &column[j..i]) / l[i * n + i];
            }
        });
    columns
}

/// The upper-triangular `U` with `Uᵀ U = a⁻¹` (the factor GPTQ spreads rounding errors with),
/// or `None` when `a` is not positive definite. With `J` the matrix that reverses the order of
/// rows, factoring `J a J = L Lᵀ` gives `a⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)` where `J L⁻¹ J` is upper
/// triangular: one factorization and one triangular inverse, instead of inverting `a` and
/// factoring the inverse.
pub fn inverse_cholesky_upper(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let reversed: Vec<f64> = (0..n * n)
        .map(|index| a[(n - 1 - index / n) * n + (n - 1 - index % n)])
        .collect();
    let l = cholesky_lower(&reversed, n)?;
    let columns = lower_inverse_columns(&l, n);
    if columns.iter().any(|value| !value.is_finite()) {
        return None;
    }
    Some(
        (0..n * n)
            .map(|index| {
                let (i, j) = (index / n, index % n);
                columns[(n - 1 - j) * n + (n - 1 - i)]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                c[i * n + j] = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n)
            .map(|index| a[(index % n) * n + index / n])
            .collect()
    }

    const SPD: [f64; 9] = [4.0, 2.0, 0.4, 2.0, 5.0, 1.0, 0.4, 1.0, 3.0];

    /// A positive definite `n x n` matrix `B Bᵀ + n I` from a fixed pseudo-random `B`.
    fn spd(n: usize) -> Vec<f64> {
        let b: Vec<f64> = (0..n * n)
            .map(|index| ((index * 7919 + 13) % 101) as f64 / 50.0 - 1.0)
            .collect();
        let mut a = product(&b, &transpose(&b, n), n);
        for i in 0..n {
            a[i * n + i] += n as f64;
        }
        a
    }

    #[test]
    fn dot_matches_the_plain_sum_at_every_length() {
        for length in [0, 1, 7, 8, 9, 31] {
            let a: Vec<f64> = (0..length).map(|k| k as f64 * 0.5 - 3.0).collect();
            let b: Vec<f64> = (0..length).map(|k| 1.0 / (k as f64 + 1.0)).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12, "length {length}");
        }
    }

    #[test]
    fn the_factor_reproduces_the_matrix() {
        for (a, n) in [(SPD.to_vec(), 3), (spd(37), 37)] {
            let l = cholesky_lower(&a, n).unwrap();
            let rebuilt = product(&l, &transpose(&l, n), n);
            for index in 0..n * n {
                assert!((rebuilt[index] - a[index]).abs() < 1e-9, "n = {n}");
                if index % n > index / n {
                    assert_eq!(l[index], 0.0, "L is lower triangular");
                }
            }
        }
    }

    #[test]
    fn the_inverse_factor_is_upper_and_squares_to_the_inverse() {
        for (a, n) in [(SPD.to_vec(), 3), (spd(37), 37)] {
            let u = inverse_cholesky_upper(&a, n).unwrap();
            let inverse = product(&transpose(&u, n), &u, n);
            let identity = product(&a, &inverse, n);
            for i in 0..n {
                assert!(u[i * n + i] > 0.0);
                for j in 0..n {
                    let expected = if i == j { 1.0 } else { 0.0 };
                    assert!((identity[i * n + j] - expected).abs() < 1e-9, "n = {n}");
                    if j < i {
                        assert_eq!(u[i * n + j], 0.0, "U is upper triangular");
                    }
                }
            }
        }
    }

    #[test]
    fn the_inverse_factor_of_the_example_is_known() {
        // a = U⁻¹ U⁻ᵀ with U⁻¹ upper triangular, so a's last diagonal entry is the square of
        // U⁻¹'s, which is 1 / U[2][2]: U[2][2] = 1 / sqrt(3).
        let u = inverse_cholesky_upper(&SPD, 3).unwrap();
        assert!((u[8] - 1.0 / 3.0f64.sqrt()).abs() < 1e-12, "{}", u[8]);
    }

    #[test]
    fn indefinite_matrices_are_refused() {
        assert!(cholesky_lower(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
        assert!(inverse_cholesky_upper(&[0.0, 0.0, 0.0, 1.0], 2).is_none());
        assert!(inverse_cholesky_upper(&[1.0, f64::NAN, f64::NAN, 1.0], 2).is_none());
    }
}
