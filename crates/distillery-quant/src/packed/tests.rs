use super::*;
use crate::gptq::{QuantSettings, int8_absmax, round_to_nearest};
use crate::int8_inputs::{self, Int8Inputs};
use crate::interleaved::{self, Layout};
use crate::products::TILE_CHANNELS;
use crate::test_support::random_matrix;

fn quantized(rows: usize, cols: usize, bits: u32, group_size: Option<usize>) -> QuantizedMatrix {
    quantized_with(rows, cols, bits, group_size, false)
}

fn quantized_with(
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: Option<usize>,
    symmetric: bool,
) -> QuantizedMatrix {
    let settings = QuantSettings {
        bits,
        group_size,
        symmetric,
        clip_search: false,
    };
    round_to_nearest(
        &random_matrix(rows, cols, u64::from(bits)),
        rows,
        cols,
        &settings,
    )
    .unwrap()
}

#[test]
fn packed_matrices_decode_exactly_what_was_quantized() {
    // 100 columns end on a short group that is not a whole number of bytes of codes.
    for bits in [2, 3, 4, 8] {
        for cols in [96, 100] {
            for group_size in [None, Some(32), Some(40)] {
                let matrix = quantized(32, cols, bits, group_size);
                let packed = PackedMatrix::from_quantized(&matrix);
                assert_eq!(packed.dequantize(), matrix.dequantize(), "{bits} bits");
            }
        }
    }
}

#[test]
fn matmul_and_gather_agree_with_the_dequantized_matrix() {
    // 3 bits straddle words and act-order scatters groups: channels decode whole; 4 and 8
    // bits in groups of 16 (and a short last group) go group by group.
    for (bits, cols, group_index) in [
        (3, 64, None),
        (4, 64, None),
        (8, 72, None),
        (
            4,
            64,
            Some((0..64u32).map(|col| col % 4).collect::<Vec<_>>()),
        ),
        (
            3,
            64,
            Some((0..64u32).map(|col| (col * 5 + 2) % 4).collect::<Vec<_>>()),
        ),
    ] {
        let mut matrix = quantized(40, cols, bits, Some(16));
        if let Some(group_index) = group_index {
            matrix.group_index = group_index;
        }
        check_matmul(&PackedMatrix::from_quantized(&matrix));
    }
    // Two whole tiles of channels and a part of one.
    check_matmul(&PackedMatrix::from_quantized(&quantized(
        2 * TILE_CHANNELS + 9,
        64,
        4,
        Some(32),
    )));
}

fn check_matmul(packed: &PackedMatrix) {
    let (rows, cols, count) = (packed.rows(), packed.cols(), 3);
    let weights = packed.dequantize();
    let x = random_matrix(count, cols, 99);
    for y in [packed.matmul(&x, count), packed.matmul_in_tiles(&x, count)] {
        for sample in 0..count {
            for row in 0..rows {
                let expected: f32 = (0..cols)
                    .map(|col| x[sample * cols + col] * weights[row * cols + col])
                    .sum();
                let got = y[sample * rows + row];
                assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
            }
        }
    }
    assert_eq!(
        packed.gather_rows(&[3, 0]),
        [&weights[3 * cols..4 * cols], &weights[..cols]].concat()
    );
}

/// `packed`'s int8-input products equal its weights times the rounded inputs, within half an
/// input step per column of its exact products.
fn check_int8_inputs(packed: &PackedMatrix, group_size: Option<usize>) {
    let (rows, cols, count, bits) = (packed.rows(), packed.cols(), 3, packed.bits());
    assert!(packed.integer_group_size().is_some());
    let weights = packed.dequantize();
    let x = random_matrix(count, cols, 98);
    let y = packed.matmul_int8_inputs(&x, count);
    let exact = packed.matmul(&x, count);
    for (sample, input) in x.chunks_exact(cols).enumerate() {
        let blocks_per_group = group_size.unwrap_or(cols) / int8_inputs::BLOCK;
        let rounded = Int8Inputs::new(input, bits, blocks_per_group).dequantize();
        for row in 0..rows {
            let expected: f32 = (0..cols)
                .map(|col| rounded[col] * weights[row * cols + col])
                .sum();
            let got = y[sample * rows + row];
            assert!(
                (got - expected).abs() < 1e-4,
                "{bits} bits: {got} vs {expected}"
            );
            // Rounding the inputs moves each product by at most half an input step per
            // column: a bound, and a check that the inputs were rounded at all.
            let step_bound: f32 = (0..cols)
                .map(|col| weights[row * cols + col].abs() * (1.0 / 254.0))
                .sum();
            assert!((got - exact[sample * rows + row]).abs() <= step_bound);
        }
    }
}

#[test]
fn int8_input_products_are_the_rounded_inputs_times_the_weights() {
    let count = 3;
    for (bits, group_size) in [
        (3, Some(32)),
        (3, Some(64)),
        (4, Some(32)),
        (4, Some(64)),
        (8, Some(32)),
        (8, None),
    ] {
        check_int8_inputs(
            &PackedMatrix::from_quantized(&quantized(40, 128, bits, group_size)),
            group_size,
        );
    }
    // 2-bit codes and groups of 16 columns have no integer kernel: exact products.
    for (bits, group_size) in [(2, Some(32)), (4, Some(16))] {
        let packed = PackedMatrix::from_quantized(&quantized(40, 128, bits, group_size));
        let x = random_matrix(count, 128, 97);
        assert_eq!(
            packed.matmul_int8_inputs(&x, count),
            packed.matmul(&x, count)
        );
    }
}

/// Symmetric 4-bit matrices in groups of whole blocks (zero points every row shares) are kept
/// interleaved where the CPU has the kernel for them; they decode, compute and go to GPTQ
/// tensors as rows in file order do.
#[test]
fn interleaved_matrices_decode_and_compute_like_rows() {
    for group_size in [Some(32), Some(64), None] {
        let matrix = quantized_with(40, 128, 4, group_size, true);
        let packed = PackedMatrix::from_quantized(&matrix);
        assert_eq!(
            packed.interleaved.is_some(),
            interleaved::kernel(Layout::Packed).is_some()
        );
        assert_eq!(packed.dequantize(), matrix.dequantize());
        check_matmul(&packed);
        check_int8_inputs(&packed, group_size);
        let from_file = PackedMatrix::from_gptq(&packed.to_gptq().unwrap()).unwrap();
        assert_eq!(from_file.dequantize(), matrix.dequantize());
    }
    // 36 rows are not whole groups of eight.
    let rows = PackedMatrix::from_quantized(&quantized_with(36, 128, 4, Some(32), true));
    assert!(rows.interleaved.is_none());
}

#[test]
fn products_together_equal_products_one_by_one() {
    let x = random_matrix(2, 128, 95);
    // The first two round their inputs alike and share them.
    let integer = [
        PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32))),
        PackedMatrix::from_quantized(&quantized(48, 128, 4, Some(32))),
        PackedMatrix::from_quantized(&quantized(40, 128, 4, Some(64))),
        PackedMatrix::from_quantized(&quantized(96, 128, 8, None)),
        // Interleaved where the CPU has the kernel, which meets the inputs a block at a time:
        // the second shares the first's rounded inputs though its groups are 64 columns, and
        // the rows in groups of 64 after it do not.
        PackedMatrix::from_quantized(&quantized_with(40, 128, 4, Some(32), true)),
        PackedMatrix::from_quantized(&quantized_with(40, 128, 4, Some(64), true)),
        PackedMatrix::from_quantized(&quantized(40, 128, 4, Some(64))),
    ];
    // Groups of 16 have no integer kernel: every matrix is then computed on its own.
    let mixed = [
        PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32))),
        PackedMatrix::from_quantized(&quantized(32, 128, 4, Some(16))),
    ];
    for matrices in [&integer[..], &mixed[..]] {
        let references: Vec<&PackedMatrix> = matrices.iter().collect();
        let together = PackedMatrix::matmul_int8_inputs_together(&references, &x, 2);
        for (matrix, outputs) in matrices.iter().zip(together) {
            assert_eq!(outputs, matrix.matmul_int8_inputs(&x, 2));
        }
    }
}

#[test]
fn act_order_matrices_compute_like_their_groups_in_runs() {
    // Column c = 4j + g of the scattered matrix is column 32g + j of the consecutive one:
    // its group is c % 4, and sorting by group gives back the consecutive order.
    let (rows, cols) = (32, 128);
    let spread = |col: usize| 32 * (col % 4) + col / 4;
    // Symmetric 4-bit codes are kept interleaved where the CPU has the kernel for them.
    for (bits, symmetric) in [(3, false), (4, false), (8, false), (4, true)] {
        let consecutive = quantized_with(rows, cols, bits, Some(32), symmetric);
        let mut scattered = consecutive.clone();
        for row in 0..rows {
            for col in 0..cols {
                scattered.codes[row * cols + col] = consecutive.codes[row * cols + spread(col)];
            }
        }
        scattered.group_index = (0..cols as u32).map(|col| col % 4).collect();
        let (consecutive, scattered) = (
            PackedMatrix::from_quantized(&consecutive),
            PackedMatrix::from_quantized(&scattered),
        );
        assert_eq!(
            scattered.interleaved.is_some(),
            symmetric && interleaved::kernel(Layout::Packed).is_some()
        );
        let x = random_matrix(2, cols, 96);
        let x_scattered: Vec<f32> = (0..2 * cols)
            .map(|index| x[index / cols * cols + spread(index % cols)])
            .collect();
        assert_eq!(
            scattered.matmul_int8_inputs(&x_scattered, 2),
            consecutive.matmul_int8_inputs(&x, 2),
            "{bits} bits"
        );
        assert_eq!(scattered.matmul(&x_scattered, 2), consecutive.matmul(&x, 2));
        let weights = consecutive.dequantize();
        let expected: Vec<f32> = (0..rows * cols)
            .map(|index| weights[index / cols * cols + spread(index % cols)])
            .collect();
        assert_eq!(scattered.dequantize(), expected);
        let tensors = scattered.to_gptq().unwrap();
        assert_eq!(tensors.g_idx, scattered.group_index);
        assert_eq!(PackedMatrix::from_gptq(&tensors).unwrap(), scattered);
        check_matmul(&scattered);
    }
}

#[test]
fn gptq_tensors_round_trip_and_store_zeros_minus_one() {
    for bits in [2, 3, 4, 8] {
        let packed = PackedMatrix::from_quantized(&quantized(32, 64, bits, Some(32)));
        let tensors = packed.to_gptq().unwrap();
        assert_eq!(tensors.qweight.len(), 64 * bits as usize / 32 * 32);
        assert_eq!(PackedMatrix::from_gptq(&tensors).unwrap(), packed);
    }
    // One output channel's grid with zero 8 stores 7 in its nibble.
    let int8 = int8_absmax(&random_matrix(32, 32, 4), 32, 32, None).unwrap();
    let tensors = PackedMatrix::from_quantized(&int8).to_gptq().unwrap();
    assert_eq!(tensors.qzeros[0], 0x7f7f_7f7f, "zero 128 is stored as 127");
}

#[test]
fn qweight_packs_each_output_channel_along_the_inputs() {
    // 32 outputs of 8 inputs at 4 bits: output `o` has codes (o + i) % 16, so its one word
    // of qweight holds nibbles o, o + 1, ..., o + 7 from the low end.
    let (rows, cols) = (32, 8);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|index| ((index / cols + index % cols) % 16) as u8)
        .collect();
    let grid = crate::Grid {
        scale: 1.0,
        zero: 8,
        max_code: 15,
    };
    let matrix = QuantizedMatrix {
        rows,
        cols,
        bits: 4,
        codes,
        grids: vec![grid; rows],
        group_index: vec![0; cols],
    };
    let tensors = PackedMatrix::from_quantized(&matrix).to_gptq().unwrap();
    assert_eq!(tensors.shapes()[0], vec![1, 32]);
    assert_eq!(tensors.qweight[0], 0x7654_3210);
    assert_eq!(tensors.qweight[1], 0x8765_4321);
    assert_eq!(tensors.qweight[9], 0x0FED_CBA9);
    assert_eq!(tensors.qzeros, vec![0x7777_7777; 4], "zero 8 stored as 7");
    assert_eq!(tensors.scales, vec![0x3c00; 32]);
}

#[test]
fn malformed_gptq_tensors_are_errors() {
    let good = PackedMatrix::from_quantized(&quantized(32, 64, 4, Some(32)))
        .to_gptq()
        .unwrap();
    let cases: Vec<(GptqTensors, &str)> = vec![
        (
            GptqTensors {
                bits: 5,
                ..good.clone()
            },
            "5 bits are not supported",
        ),
        (
            GptqTensors {
                qweight: good.qweight[1..].to_vec(),
                ..good.clone()
            },
            "qweight holds",
        ),
        (
            GptqTensors {
                g_idx: vec![2; 64],
                ..good.clone()
            },
            "g_idx names group 2",
        ),
        (
            GptqTensors {
                scales: vec![0x7c00; good.scales.len()],
                ..good.clone()
            },
            "not a positive number",
        ),
        (
            GptqTensors {
                cols: 63,
                ..good.clone()
            },
            "whole 32-bit words",
        ),
    ];
    for (tensors, message) in cases {
        let error = PackedMatrix::from_gptq(&tensors).unwrap_err().to_string();
        assert!(error.contains(message), "{error}");
    }
}

#[test]
fn symmetric_matrices_keep_one_row_of_zero_points() {
    for bits in [3, 4, 8] {
        let settings = QuantSettings {
            bits,
            group_size: Some(32),
            symmetric: true,
            clip_search: false,
        };
        // 32 channels: 3-bit zero points fill whole words only in multiples of 32.
        let matrix = round_to_nearest(&random_matrix(32, 128, 7), 32, 128, &settings).unwrap();
        let packed = PackedMatrix::from_quantized(&matrix);
        assert_eq!(packed.zeros, vec![1 << (bits - 1); 4], "{bits} bits");
        assert_eq!(packed.dequantize(), matrix.dequantize(), "{bits} bits");
        check_matmul(&packed);
        check_int8_inputs(&packed, Some(32));
        let tensors = packed.to_gptq().unwrap();
        assert_eq!(PackedMatrix::from_gptq(&tensors).unwrap(), packed);
    }
    let asymmetric = PackedMatrix::from_quantized(&quantized(32, 128, 4, Some(32)));
    assert_eq!(asymmetric.zeros.len(), 32 * 4);
}

#[test]
fn int8_in_blocks_of_32_is_recognized() {
    let weights = random_matrix(4, 64, 12);
    let by_32 = PackedMatrix::from_quantized(&int8_absmax(&weights, 4, 64, Some(32)).unwrap());
    assert!(by_32.is_int8_in_groups_of(32));
    let per_row = PackedMatrix::from_quantized(&int8_absmax(&weights, 4, 64, None).unwrap());
    assert!(!per_row.is_int8_in_groups_of(32));
    let rtn8 = PackedMatrix::from_quantized(&quantized(4, 64, 8, Some(32)));
    assert!(!rtn8.is_int8_in_groups_of(32), "asymmetric zeros");
}

#[test]
fn stored_bytes_count_every_gptq_tensor() {
    let packed = PackedMatrix::from_quantized(&quantized(64, 128, 4, Some(32)));
    let tensors = packed.to_gptq().unwrap();
    let bytes = 4 * (tensors.qweight.len() + tensors.qzeros.len() + tensors.g_idx.len())
        + 2 * tensors.scales.len();
    assert_eq!(packed.stored_bytes(), bytes);
}

/// A matrix of chosen rows gives each of them the products, exact and int8, that the whole
/// matrix gives that row: per-channel and shared zeros, interleaved 4-bit rows and act-order.
#[test]
fn selected_rows_keep_their_products() {
    let ids: Vec<usize> = (0..16).map(|index| (index * 7 + 3) % 40).collect();
    let act_order: Vec<u32> = (0..128u32).map(|col| (col * 5 + 2) % 4).collect();
    for (bits, symmetric, group_index) in [
        (8, true, None),
        (8, false, None),
        (4, true, None),
        (4, false, Some(act_order)),
        (3, false, None),
    ] {
        let mut matrix = quantized_with(40, 128, bits, Some(32), symmetric);
        if let Some(group_index) = group_index {
            matrix.group_index = group_index;
        }
        let packed = PackedMatrix::from_quantized(&matrix);
        let selected = packed.select_rows(&ids);
        assert_eq!(selected.interleaved.is_some(), packed.interleaved.is_some());
        assert_eq!(selected.zero_stride() == 0, packed.zero_stride() == 0);
        for count in [1, 3] {
            let x = random_matrix(count, 128, 11);
            for (how, whole, part) in [
                (
                    "exact",
                    packed.matmul(&x, count),
                    selected.matmul(&x, count),
                ),
                (
                    "int8",
                    packed.matmul_int8_inputs(&x, count),
                    selected.matmul_int8_inputs(&x, count),
                ),
            ] {
                let want: Vec<f32> = whole
                    .chunks_exact(40)
                    .flat_map(|outputs| ids.iter().map(|&id| outputs[id]))
                    .collect();
                assert_eq!(
                    part, want,
                    "{bits} bits, symmetric {symmetric}: {how} x{count}"
                );
            }
        }
    }
}
