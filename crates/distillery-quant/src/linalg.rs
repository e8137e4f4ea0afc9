//! The dense linear algebra GPTQ needs, on row-major `n x n` f64 matrices.

/// The lower-triangular `L` with `L Lᵀ = a`, or `None` when `a` is not positive definite.
pub fn cholesky_lower(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            let value = a[i * n + j] - dot;
            if i == j {
                if !(value > 0.0 && value.is_finite()) {
                    return None;
                }
                l[i * n + i] = value.sqrt();
            } else {
                l[i * n + j] = value / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// The inverse of a positive definite `a`, from its Cholesky factor.
pub fn spd_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let l = cholesky_lower(a, n)?;
    // L⁻¹ by forward substitution, column by column.
    let mut l_inv = vec![0.0; n * n];
    for column in 0..n {
        for i in column..n {
            let rhs = if i == column { 1.0 } else { 0.0 };
            let dot: f64 = (column..i)
                .map(|k| l[i * n + k] * l_inv[k * n + column])
                .sum();
            l_inv[i * n + column] = (rhs - dot) / l[i * n + i];
        }
    }
    // a⁻¹ = L⁻ᵀ L⁻¹.
    let mut inverse = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let value: f64 = (i..n).map(|k| l_inv[k * n + i] * l_inv[k * n + j]).sum();
            inverse[i * n + j] = value;
            inverse[j * n + i] = value;
        }
    }
    Some(inverse)
}

/// The upper-triangular `U` with `Uᵀ U = a`.
pub fn cholesky_upper(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let l = cholesky_lower(a, n)?;
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l[i * n + j];
        }
    }
    Some(u)
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

    #[test]
    fn factors_reproduce_the_matrix() {
        let l = cholesky_lower(&SPD, 3).unwrap();
        let rebuilt = product(&l, &transpose(&l, 3), 3);
        let u = cholesky_upper(&SPD, 3).unwrap();
        let rebuilt_upper = product(&transpose(&u, 3), &u, 3);
        for index in 0..9 {
            assert!((rebuilt[index] - SPD[index]).abs() < 1e-12);
            assert!((rebuilt_upper[index] - SPD[index]).abs() < 1e-12);
            if index % 3 < index / 3 {
                assert_eq!(u[index], 0.0, "U is upper triangular");
            }
        }
    }

    #[test]
    fn inverse_times_matrix_is_identity() {
        let inverse = spd_inverse(&SPD, 3).unwrap();
        let identity = product(&SPD, &inverse, 3);
        for i in 0..3 {
            for j in 0..3 {
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((identity[i * 3 + j] - expected).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn indefinite_matrices_are_refused() {
        assert!(cholesky_lower(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
        assert!(spd_inverse(&[0.0, 0.0, 0.0, 1.0], 2).is_none());
    }
}
