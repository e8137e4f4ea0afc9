//! Round-to-nearest and GPTQ (Frantar et al. 2022) quantization of one weight matrix.
//!
//! Matrices are row-major `rows x cols` with one row per output channel and one column per
//! input feature, the layout GPTQ's error propagation runs along (burn's `[in, out]` linear
//! weights are transposed at the call site).

use multiversion::multiversion;
use rayon::prelude::*;

use crate::QuantError;
use crate::grid::Grid;
use crate::linalg::inverse_cholesky_upper;
use crate::settings::{check_bits, check_group_size};

#[derive(Debug, Clone, PartialEq)]
pub struct QuantSettings {
    pub bits: u32,
    /// Input columns sharing one grid per output channel; the whole row when `None`.
    pub group_size: Option<usize>,
    pub symmetric: bool,
    /// Search each grid's range for the least rounding error ([`Grid::fit_clipped`]) instead
    /// of spanning all its values.
    pub clip_search: bool,
}

impl QuantSettings {
    /// The grid of one output channel's group of weights.
    pub fn fit(&self, values: &[f32]) -> Grid {
        if self.clip_search {
            Grid::fit_clipped(values, self.bits, self.symmetric)
        } else {
            Grid::fit(values.iter().copied(), self.bits, self.symmetric)
        }
    }

    pub fn validate(&self, cols: usize) -> Result<(), QuantError> {
        check_bits(self.bits)?;
        Ok(check_group_size(self.group_size, cols)?)
    }
}

fn group_count(group_size: Option<usize>, cols: usize) -> usize {
    group_size.map_or(1, |size| cols.div_ceil(size))
}

fn group_columns(group: usize, group_size: usize, cols: usize) -> std::ops::Range<usize> {
    group * group_size..((group + 1) * group_size).min(cols)
}

#[derive(Debug, Clone, PartialEq)]
pub struct GptqSettings {
    pub quant: QuantSettings,
    /// Dampening added to the Hessian's diagonal, as a share of its mean.
    pub damp_percent: f64,
    /// Columns quantized between two lazy updates of the rest of the matrix.
    pub block_size: usize,
    /// Quantize columns in order of decreasing Hessian diagonal (AutoGPTQ's `desc_act`).
    pub act_order: bool,
    /// Fit every group's grid before any column is quantized, so that act-order needs no
    /// per-column group lookup at inference.
    pub static_groups: bool,
}

/// A quantized matrix: codes, the grids they index and each column's group.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// `rows x cols` codes, row-major, in the original column order.
    pub codes: Vec<u8>,
    /// `groups x rows`: `grids[group * rows + row]`.
    pub grids: Vec<Grid>,
    /// The group of each column.
    pub group_index: Vec<u32>,
}

impl QuantizedMatrix {
    pub fn groups(&self) -> usize {
        self.grids.len() / self.rows
    }

    /// The weights the codes stand for, `rows x cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut weights = Vec::with_capacity(self.rows * self.cols);
        for row in 0..self.rows {
            for col in 0..self.cols {
                let grid = &self.grids[self.group_index[col] as usize * self.rows + row];
                weights.push(grid.decode(u32::from(self.codes[row * self.cols + col])));
            }
        }
        weights
    }
}

/// Each weight rounded to the nearest point of its row's (or row group's) grid.
pub fn round_to_nearest(
    weights: &[f32],
    rows: usize,
    cols: usize,
    settings: &QuantSettings,
) -> Result<QuantizedMatrix, QuantError> {
    settings.validate(cols)?;
    Ok(quantize_on_grids(
        weights,
        rows,
        cols,
        settings.bits,
        settings.group_size,
        |values| settings.fit(values),
    ))
}

/// Symmetric absmax int8 of each row (or row group): codes -127..=127 stored as 8-bit codes
/// around 128, with `scale = absmax / 127`.
pub fn int8_absmax(
    weights: &[f32],
    rows: usize,
    cols: usize,
    group_size: Option<usize>,
) -> Result<QuantizedMatrix, QuantError> {
    check_group_size(group_size, cols)?;
    Ok(quantize_on_grids(
        weights,
        rows,
        cols,
        8,
        group_size,
        |values| Grid::absmax_int8(values.iter().copied()),
    ))
}

fn quantize_on_grids(
    weights: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: Option<usize>,
    fit: impl Fn(&[f32]) -> Grid + Sync,
) -> QuantizedMatrix {
    let size = group_size.unwrap_or(cols);
    let groups = group_count(group_size, cols);
    let grids: Vec<Grid> = (0..groups * rows)
        .into_par_iter()
        .map(|index| {
            let (group, row) = (index / rows, index % rows);
            let columns = group_columns(group, size, cols);
            let start = row * cols;
            fit(&weights[start + columns.start..start + columns.end])
        })
        .collect();
    let group_index: Vec<u32> = (0..cols).map(|col| (col / size) as u32).collect();
    let codes = (0..rows * cols)
        .map(|index| {
            let (row, col) = (index / cols, index % cols);
            grids[group_index[col] as usize * rows + row].encode(weights[index]) as u8
        })
        .collect();
    QuantizedMatrix {
        rows,
        cols,
        bits,
        codes,
        grids,
        group_index,
    }
}

/// The running mean of `2 x xᵀ` over a layer's calibration inputs.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub size: usize,
    samples: usize,
    values: Vec<f64>,
}

impl Hessian {
    pub fn new(size: usize) -> Self {
        Self {
            size,
            samples: 0,
            values: vec![0.0; size * size],
        }
    }

    /// Adds the rows of `inputs` (`count x size`, row-major), one input vector each.
    pub fn add(&mut self, inputs: &[f32]) {
        let n = self.size;
        let count = inputs.len() / n;
        let mut outer_products = vec![0.0f64; n * n];
        for x in inputs.chunks_exact(n) {
            for i in 0..n {
                let xi = f64::from(x[i]);
                let row = &mut outer_products[i * n..(i + 1) * n];
                for (value, &xj) in row.iter_mut().zip(x) {
                    *value += xi * f64::from(xj);
                }
            }
        }
        self.add_outer_products(&outer_products, count);
    }

    /// Adds `count` input vectors given as the sum of their outer products `Σ x xᵀ`, which a
    /// caller computes as one matrix product `XᵀX`.
    pub fn add_outer_products(&mut self, sum: &[f64], count: usize) {
        if count == 0 {
            return;
        }
        let total = self.samples + count;
        let keep = self.samples as f64 / total as f64;
        let weight = 2.0 / total as f64;
        for (value, &added) in self.values.iter_mut().zip(sum) {
            *value = *value * keep + weight * added;
        }
        self.samples = total;
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    pub fn values(&self) -> &[f64] {
        &self.values
    }
}

/// A Hessian made ready for GPTQ: the order columns are quantized in, the dampening that
/// made it invertible and the upper Cholesky factor of its inverse. It depends on the layer's
/// inputs only, so the matrices that read one input (q, k and v; gate and up) share it.
#[derive(Debug, Clone)]
pub struct PreparedHessian {
    cols: usize,
    /// `order[position]` is the column quantized at `position`.
    order: Vec<usize>,
    /// Columns whose input never fired, by original index.
    dead: Vec<bool>,
    /// `cols x cols` in quantization order.
    inverse_factor: Vec<f64>,
    damp_percent: f64,
}

/// Dampening retries: each multiplies the dampening by ten.
const DAMP_RETRIES: usize = 4;

impl PreparedHessian {
    /// Orders the columns (by decreasing diagonal under act-order), dampens the diagonal and
    /// factors the inverse, raising the dampening tenfold while the Hessian stays singular.
    pub fn new(hessian: &Hessian, settings: &GptqSettings) -> Result<Self, QuantError> {
        let cols = hessian.size;
        let mut h = hessian.values().to_vec();
        // Inputs that never fire carry no information: their weights become exact zeros.
        let dead: Vec<bool> = (0..cols).map(|i| h[i * cols + i] == 0.0).collect();
        for i in (0..cols).filter(|&i| dead[i]) {
            h[i * cols + i] = 1.0;
        }
        let mut order: Vec<usize> = (0..cols).collect();
        if settings.act_order {
            order.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]).then(a.cmp(&b)));
        }
        let ordered: Vec<f64> = (0..cols * cols)
            .map(|index| h[order[index / cols] * cols + order[index % cols]])
            .collect();
        let mean_diagonal = (0..cols).map(|i| ordered[i * cols + i]).sum::<f64>() / cols as f64;
        let mut damp_percent = settings.damp_percent;
        for _ in 0..=DAMP_RETRIES {
            let mut dampened = ordered.clone();
            for i in 0..cols {
                dampened[i * cols + i] += damp_percent * mean_diagonal;
            }
            if let Some(inverse_factor) = inverse_cholesky_upper(&dampened, cols) {
                return Ok(Self {
                    cols,
                    order,
                    dead,
                    inverse_factor,
                    damp_percent,
                });
            }
            damp_percent *= 10.0;
        }
        Err(QuantError::NotPositiveDefinite {
            damp_percent: damp_percent / 10.0,
        })
    }

    /// The share of the mean diagonal added; larger than asked when the Hessian needed more.
    pub fn damp_percent(&self) -> f64 {
        self.damp_percent
    }
}

/// Output channels quantized together: each row of the inverse factor, read once from memory,
/// serves this many rows of weights.
const ROW_TILE: usize = 8;

/// GPTQ: columns quantized one at a time, each one's rounding error spread over the columns not
/// yet quantized through the inverse Hessian of the layer's inputs, so the layer's output on the
/// calibration inputs changes as little as possible. Output channels are independent given the
/// Hessian, so tiles of them run in parallel.
pub fn gptq(
    weights: &[f32],
    rows: usize,
    cols: usize,
    hessian: &PreparedHessian,
    settings: &GptqSettings,
) -> Result<QuantizedMatrix, QuantError> {
    settings.quant.validate(cols)?;
    if hessian.cols != cols {
        return Err(QuantError::HessianSize {
            hessian: hessian.cols,
            cols,
        });
    }
    let quant = &settings.quant;
    let group_size = quant.group_size.unwrap_or(cols);
    let groups = group_count(quant.group_size, cols);
    // Static groups (and ungrouped rows) have their grids fitted on the incoming weights in
    // column order; dynamic groups are fitted when quantization reaches them.
    let fit_upfront = quant.group_size.is_none() || settings.static_groups;
    let group_of_position: Vec<u32> = (0..cols)
        .map(|position| {
            if quant.group_size.is_none() {
                0
            } else if settings.static_groups {
                (hessian.order[position] / group_size) as u32
            } else {
                (position / group_size) as u32
            }
        })
        .collect();
    let tiles: Vec<(Vec<u8>, Vec<Grid>)> = (0..rows)
        .step_by(ROW_TILE)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let tile_rows = ROW_TILE.min(rows - first);
            let incoming: Vec<f64> = (0..tile_rows * cols)
                .map(|index| {
                    let col = index % cols;
                    if hessian.dead[col] {
                        0.0
                    } else {
                        f64::from(weights[(first + index / cols) * cols + col])
                    }
                })
                .collect();
            let mut grids: Vec<Option<Grid>> = vec![None; groups * tile_rows];
            if fit_upfront {
                for group in 0..groups {
                    let columns = group_columns(group, group_size, cols);
                    fit_rows(
                        quant,
                        &incoming,
                        cols,
                        columns,
                        &mut grids[group * tile_rows..],
                    );
                }
            }
            let mut w: Vec<f64> = (0..tile_rows * cols)
                .map(|index| incoming[(index / cols) * cols + hessian.order[index % cols]])
                .collect();
            let codes = quantize_tile(
                &mut w,
                tile_rows,
                cols,
                hessian,
                settings,
                &group_of_position,
                &mut grids,
            );
            let grids = grids
                .into_iter()
                .map(|grid| grid.expect("every group is fitted"))
                .collect();
            (codes, grids)
        })
        .collect();

    let mut codes = vec![0u8; rows * cols];
    for (tile, (tile_codes, _)) in tiles.iter().enumerate() {
        for (offset, tile_row) in tile_codes.chunks_exact(cols).enumerate() {
            let row = tile * ROW_TILE + offset;
            for (position, &col) in hessian.order.iter().enumerate() {
                codes[row * cols + col] = tile_row[position];
            }
        }
    }
    let grids = (0..groups * rows)
        .map(|index| {
            let (group, row) = (index / rows, index % rows);
            let (tile_codes, tile_grids) = &tiles[row / ROW_TILE];
            tile_grids[group * (tile_codes.len() / cols) + row % ROW_TILE]
        })
        .collect();
    let mut group_index = vec![0u32; cols];
    for (position, &col) in hessian.order.iter().enumerate() {
        group_index[col] = group_of_position[position];
    }
    Ok(QuantizedMatrix {
        rows,
        cols,
        bits: quant.bits,
        codes,
        grids,
        group_index,
    })
}

/// GPTQ on `tile_rows` rows of weights already in quantization order; returns their codes in
/// that order. Inside a block of columns each rounding error reaches the block's later columns
/// at once; the columns after the block get the block's errors in one lazy pass.
fn quantize_tile(
    w: &mut [f64],
    tile_rows: usize,
    cols: usize,
    hessian: &PreparedHessian,
    settings: &GptqSettings,
    group_of_position: &[u32],
    grids: &mut [Option<Grid>],
) -> Vec<u8> {
    let quant = &settings.quant;
    let dynamic_groups = quant.group_size.filter(|_| !settings.static_groups);
    let block_size = settings.block_size.max(1);
    let factor = &hessian.inverse_factor;
    let mut codes = vec![0u8; tile_rows * cols];
    let mut errors = vec![0.0f64; tile_rows * block_size];
    for block_start in (0..cols).step_by(block_size) {
        let block_end = (block_start + block_size).min(cols);
        for position in block_start..block_end {
            let group = group_of_position[position] as usize;
            if let Some(size) = dynamic_groups
                && position.is_multiple_of(size)
            {
                let columns = group_columns(group, size, cols);
                fit_rows(quant, w, cols, columns, &mut grids[group * tile_rows..]);
            }
            let factor_row = &factor[position * cols..(position + 1) * cols];
            let diagonal = factor_row[position];
            let local = position - block_start;
            for row in 0..tile_rows {
                let grid = grids[group * tile_rows + row].expect("grids are fitted before use");
                let w_row = &mut w[row * cols..(row + 1) * cols];
                let value = w_row[position];
                let code = grid.encode(value as f32);
                codes[row * cols + position] = code as u8;
                let error = (value - f64::from(grid.decode(code))) / diagonal;
                errors[row * block_size + local] = error;
                subtract_scaled(
                    &mut w_row[position + 1..block_end],
                    error,
                    &factor_row[position + 1..block_end],
                );
            }
        }
        for local in 0..block_end - block_start {
            let factor_row =
                &factor[(block_start + local) * cols..(block_start + local + 1) * cols];
            for row in 0..tile_rows {
                subtract_scaled(
                    &mut w[row * cols + block_end..(row + 1) * cols],
                    errors[row * block_size + local],
                    &factor_row[block_end..],
                );
            }
        }
    }
    codes
}

/// The grid of each of a tile's rows (`cols` weights each) over `columns`, into `grids`.
fn fit_rows(
    quant: &QuantSettings,
    weights: &[f64],
    cols: usize,
    columns: std::ops::Range<usize>,
    grids: &mut [Option<Grid>],
) {
    for (row, grid) in weights.chunks_exact(cols).zip(grids) {
        let values: Vec<f32> = row[columns.clone()].iter().map(|&w| w as f32).collect();
        *grid = Some(quant.fit(&values));
    }
}

/// `target -= scale * source`, element by element.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn subtract_scaled(target: &mut [f64], scale: f64, source: &[f64]) {
    for (value, &step) in target.iter_mut().zip(source) {
        *value -= scale * step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SettingsError;
    use crate::test_support::random_matrix;

    /// `count` inputs of `size` features with strong correlations: mixtures of a few sources.
    fn correlated_inputs(count: usize, size: usize, seed: u64) -> Vec<f32> {
        let mixing = random_matrix(size, 4, seed);
        let sources = random_matrix(count, 4, seed + 1);
        let noise = random_matrix(count, size, seed + 2);
        (0..count * size)
            .map(|index| {
                let (sample, feature) = (index / size, index % size);
                let mixed: f32 = (0..4)
                    .map(|k| mixing[feature * 4 + k] * sources[sample * 4 + k])
                    .sum();
                mixed + 0.05 * noise[index]
            })
            .collect()
    }

    fn output_error(original: &[f32], quantized: &[f32], inputs: &[f32], cols: usize) -> f64 {
        let rows = original.len() / cols;
        let mut total = 0.0;
        for x in inputs.chunks_exact(cols) {
            for row in 0..rows {
                let difference: f64 = (0..cols)
                    .map(|col| {
                        f64::from(original[row * cols + col] - quantized[row * cols + col])
                            * f64::from(x[col])
                    })
                    .sum();
                total += difference * difference;
            }
        }
        total
    }

    fn settings(bits: u32, group_size: Option<usize>) -> GptqSettings {
        GptqSettings {
            quant: QuantSettings {
                bits,
                group_size,
                symmetric: false,
                clip_search: false,
            },
            damp_percent: 0.01,
            block_size: 8,
            act_order: false,
            static_groups: false,
        }
    }

    fn run_gptq(
        weights: &[f32],
        rows: usize,
        cols: usize,
        hessian: &Hessian,
        settings: &GptqSettings,
    ) -> Result<QuantizedMatrix, QuantError> {
        let prepared = PreparedHessian::new(hessian, settings)?;
        gptq(weights, rows, cols, &prepared, settings)
    }

    fn identity_hessian(size: usize) -> Hessian {
        let mut hessian = Hessian::new(size);
        let mut inputs = vec![0.0f32; size * size];
        for i in 0..size {
            inputs[i * size + i] = (size as f32 / 2.0).sqrt();
        }
        hessian.add(&inputs);
        hessian
    }

    #[test]
    fn hessian_is_twice_the_mean_outer_product() {
        let mut hessian = Hessian::new(2);
        hessian.add(&[1.0, 2.0]);
        hessian.add(&[3.0, 0.0, 0.0, 1.0]);
        let expected = [
            2.0 * (1.0 + 9.0) / 3.0,
            2.0 * 2.0 / 3.0,
            2.0 * 2.0 / 3.0,
            2.0 * (4.0 + 1.0) / 3.0,
        ];
        for (got, want) in hessian.values().iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert_eq!(hessian.samples(), 3);
    }

    #[test]
    fn gptq_with_an_identity_hessian_is_round_to_nearest() {
        let (rows, cols) = (6, 16);
        let weights = random_matrix(rows, cols, 1);
        for group_size in [None, Some(4)] {
            for clip_search in [false, true] {
                let mut settings = settings(3, group_size);
                settings.quant.clip_search = clip_search;
                let rtn = round_to_nearest(&weights, rows, cols, &settings.quant).unwrap();
                let gptq =
                    run_gptq(&weights, rows, cols, &identity_hessian(cols), &settings).unwrap();
                assert_eq!(gptq, rtn, "group size {group_size:?}, clip {clip_search}");
            }
        }
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let (rows, cols) = (8, 32);
        let weights = random_matrix(rows, cols, 3);
        let inputs = correlated_inputs(256, cols, 4);
        let mut hessian = Hessian::new(cols);
        hessian.add(&inputs);
        for (bits, group_size) in [(3, None), (4, Some(8)), (2, Some(16))] {
            let settings = settings(bits, group_size);
            let rtn = round_to_nearest(&weights, rows, cols, &settings.quant).unwrap();
            let quantized = run_gptq(&weights, rows, cols, &hessian, &settings).unwrap();
            let rtn_error = output_error(&weights, &rtn.dequantize(), &inputs, cols);
            let gptq_error = output_error(&weights, &quantized.dequantize(), &inputs, cols);
            assert!(
                gptq_error < 0.5 * rtn_error,
                "{bits} bits, groups {group_size:?}: GPTQ {gptq_error} vs RTN {rtn_error}"
            );
        }
    }

    #[test]
    fn each_row_quantizes_as_it_would_alone() {
        // Two full tiles and a short one: every row's codes and grids must land where a
        // one-row matrix puts them, whatever tile computed them.
        let (rows, cols) = (2 * ROW_TILE + 3, 24);
        let weights = random_matrix(rows, cols, 11);
        let inputs = correlated_inputs(128, cols, 12);
        let mut hessian = Hessian::new(cols);
        hessian.add(&inputs);
        for (act_order, static_groups) in [(false, false), (true, false), (true, true)] {
            let mut settings = settings(3, Some(8));
            settings.act_order = act_order;
            settings.static_groups = static_groups;
            let prepared = PreparedHessian::new(&hessian, &settings).unwrap();
            let whole = gptq(&weights, rows, cols, &prepared, &settings).unwrap();
            for row in 0..rows {
                let alone = gptq(
                    &weights[row * cols..(row + 1) * cols],
                    1,
                    cols,
                    &prepared,
                    &settings,
                )
                .unwrap();
                assert_eq!(alone.codes[..], whole.codes[row * cols..(row + 1) * cols]);
                assert_eq!(alone.group_index, whole.group_index);
                for group in 0..whole.groups() {
                    assert_eq!(alone.grids[group], whole.grids[group * rows + row]);
                }
            }
        }
    }

    #[test]
    fn act_order_with_static_groups_keeps_groups_in_column_order() {
        let (rows, cols) = (4, 16);
        let weights = random_matrix(rows, cols, 5);
        // A diagonal Hessian with distinct entries: act-order reorders every column, yet no
        // error spreads, so each weight must land where round-to-nearest puts it.
        let mut hessian = Hessian::new(cols);
        let mut inputs = vec![0.0f32; cols * cols];
        for i in 0..cols {
            inputs[i * cols + i] = 1.0 + ((i * 7) % cols) as f32;
        }
        hessian.add(&inputs);
        let mut settings = settings(4, Some(4));
        settings.act_order = true;
        settings.static_groups = true;
        let quantized = run_gptq(&weights, rows, cols, &hessian, &settings).unwrap();
        let rtn = round_to_nearest(&weights, rows, cols, &settings.quant).unwrap();
        assert_eq!(quantized, rtn);
        assert_eq!(
            quantized.group_index,
            (0..cols as u32).map(|col| col / 4).collect::<Vec<_>>()
        );
    }

    #[test]
    fn act_order_without_static_groups_groups_columns_by_importance() {
        let (rows, cols) = (2, 8);
        let weights = random_matrix(rows, cols, 6);
        let mut hessian = Hessian::new(cols);
        let mut inputs = vec![0.0f32; cols * cols];
        for i in 0..cols {
            inputs[i * cols + i] = (cols - i) as f32 * if i % 2 == 0 { 1.0 } else { 0.1 };
        }
        hessian.add(&inputs);
        let mut settings = settings(4, Some(4));
        settings.act_order = true;
        let quantized = run_gptq(&weights, rows, cols, &hessian, &settings).unwrap();
        // Even columns have the larger diagonal: they come first and form group 0.
        assert_eq!(quantized.group_index, vec![0, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let (rows, cols) = (3, 8);
        let weights = random_matrix(rows, cols, 7);
        let mut inputs = correlated_inputs(64, cols, 8);
        for x in inputs.chunks_exact_mut(cols) {
            x[5] = 0.0;
        }
        let mut hessian = Hessian::new(cols);
        hessian.add(&inputs);
        let quantized = run_gptq(&weights, rows, cols, &hessian, &settings(4, None)).unwrap();
        let dequantized = quantized.dequantize();
        for row in 0..rows {
            assert_eq!(dequantized[row * cols + 5], 0.0);
        }
    }

    #[test]
    fn a_hessian_beyond_repair_is_an_error_not_nans() {
        let mut hessian = Hessian::new(2);
        hessian.add(&[f32::NAN, 1.0]);
        let error = run_gptq(&[0.5, -0.5], 1, 2, &hessian, &settings(4, None)).unwrap_err();
        assert!(
            matches!(error, QuantError::NotPositiveDefinite { .. }),
            "{error}"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let weights = random_matrix(2, 12, 9);
        let five_bits = QuantSettings {
            bits: 5,
            group_size: None,
            symmetric: false,
            clip_search: false,
        };
        let error = round_to_nearest(&weights, 2, 12, &five_bits).unwrap_err();
        assert!(
            matches!(
                error,
                QuantError::Settings(SettingsError::UnsupportedBits(5))
            ),
            "{error}"
        );
        let wider = SettingsError::GroupWiderThanInputs {
            size: 13,
            inputs: 12,
        };
        for (group_size, expected) in [(0, SettingsError::EmptyGroup), (13, wider)] {
            let bad_group = QuantSettings {
                bits: 4,
                group_size: Some(group_size),
                symmetric: false,
                clip_search: false,
            };
            let error = round_to_nearest(&weights, 2, 12, &bad_group).unwrap_err();
            assert!(
                matches!(&error, QuantError::Settings(found) if *found == expected),
                "{error}"
            );
        }
    }

    #[test]
    fn a_group_size_that_does_not_divide_the_width_leaves_a_short_last_group() {
        let (rows, cols) = (3, 10);
        let weights = random_matrix(rows, cols, 10);
        let settings = settings(4, Some(4));
        let rtn = round_to_nearest(&weights, rows, cols, &settings.quant).unwrap();
        assert_eq!(rtn.groups(), 3);
        assert_eq!(rtn.group_index, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
        let tail: Vec<f32> = weights[8..10].to_vec();
        assert_eq!(rtn.grids[2 * rows], Grid::fit(tail, 4, false));
        let quantized = run_gptq(&weights, rows, cols, &identity_hessian(cols), &settings).unwrap();
        assert_eq!(quantized, rtn);
    }

    #[test]
    fn int8_codes_are_absmax_scaled_around_128() {
        let weights = [0.5, -1.27, 0.0, 0.01, 2.54, -0.3];
        let matrix = int8_absmax(&weights, 2, 3, None).unwrap();
        assert_eq!(matrix.bits, 8);
        assert_eq!(matrix.codes[1], 1);
        assert_eq!(matrix.codes[2], 128);
        assert_eq!(matrix.codes[4], 255);
        for (value, restored) in weights.iter().zip(matrix.dequantize()) {
            assert!(
                (value - restored).abs() <= 0.01 + 1e-5,
                "{value} -> {restored}"
            );
        }
    }
}
