//! ggml's block quantization formats as llama.cpp stores them: blocks of 32 values along a
//! row, each block an f16 scale followed by its codes.
//!
//! - Q8_0 (34 bytes a block): `d = absmax / 127`, codes `round(x / d)` as i8; `x ≈ d * q`.
//! - Q4_0 (18 bytes a block): `d = m / -8` where `m` is the value of largest magnitude (sign
//!   kept), codes `min(15, trunc(x / d + 8.5))`; `x ≈ d * (q - 8)`. Byte `j` holds value `j` in
//!   its low nibble and value `j + 16` in its high nibble.

pub const BLOCK: usize = 32;
pub const Q8_0_BYTES: usize = 2 + BLOCK;
pub const Q4_0_BYTES: usize = 2 + BLOCK / 2;

use distillery_quant::f16::{f16_to_f32, f32_to_f16};

/// Q8_0 blocks of `values` (a multiple of 32 long).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * Q8_0_BYTES);
    for block in values.chunks_exact(BLOCK) {
        let absmax = block.iter().fold(0.0f32, |max, v| max.max(v.abs()));
        let d = absmax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
    }
    out
}

pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(Q8_0_BYTES)
        .flat_map(|block| {
            let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
            block[2..].iter().map(move |&q| d * f32::from(q as i8))
        })
        .collect()
}

/// Q4_0 blocks of `values` (a multiple of 32 long).
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * Q4_0_BYTES);
    for block in values.chunks_exact(BLOCK) {
        let extreme = block
            .iter()
            .fold(0.0f32, |max, &v| if v.abs() > max.abs() { v } else { max });
        let d = extreme / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        let code = |v: f32| ((v * inverse + 8.5) as i8).min(15) as u8;
        for j in 0..BLOCK / 2 {
            out.push(code(block[j]) | code(block[j + BLOCK / 2]) << 4);
        }
    }
    out
}

pub fn dequantize_q4_0(bytes: &[u8]) -> Vec<f32> {
    let mut values = Vec::with_capacity(bytes.len() / Q4_0_BYTES * BLOCK);
    for block in bytes.chunks_exact(Q4_0_BYTES) {
        let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
        let codes = &block[2..];
        values.extend(codes.iter().map(|&byte| d * (f32::from(byte & 0xf) - 8.0)));
        values.extend(codes.iter().map(|&byte| d * (f32::from(byte >> 4) - 8.0)));
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u32) -> Vec<f32> {
        (0..BLOCK as u32)
            .map(|i| (((i * 2654435761 + seed) % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn q8_0_is_within_half_a_step_of_each_value() {
        let values = [block(1), block(2)].concat();
        let bytes = quantize_q8_0(&values);
        assert_eq!(bytes.len(), 2 * Q8_0_BYTES);
        let restored = dequantize_q8_0(&bytes);
        for (chunk, restored) in values.chunks(BLOCK).zip(restored.chunks(BLOCK)) {
            let absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = absmax / 127.0;
            for (v, r) in chunk.iter().zip(restored) {
                assert!((v - r).abs() <= step * 0.5 + step * 1e-3, "{v} -> {r}");
            }
        }
    }

    #[test]
    fn q4_0_nibbles_follow_llama_cpp_order() {
        // Largest magnitude -8 gives d = 1: codes are value + 8.
        let mut values = vec![0.0f32; BLOCK];
        values[0] = -8.0;
        values[1] = 3.0;
        values[16] = 7.0;
        values[17] = -1.0;
        let bytes = quantize_q4_0(&values);
        assert_eq!(bytes.len(), Q4_0_BYTES);
        assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), 0x3c00, "d = 1.0");
        // Value 0 (code 0) in the low nibble, value 16 (code 15) in the high one.
        assert_eq!(bytes[2], 15 << 4);
        assert_eq!(bytes[3], 11 | 7 << 4);
        assert_eq!(bytes[4], 8 | 8 << 4);
        assert_eq!(dequantize_q4_0(&bytes), values);
    }

    #[test]
    fn q4_0_is_within_one_step_of_each_value() {
        let values = block(3);
        let restored = dequantize_q4_0(&quantize_q4_0(&values));
        let extreme = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let step = extreme / 8.0;
        for (v, r) in values.iter().zip(&restored) {
            assert!((v - r).abs() <= step * 1.001, "{v} -> {r}");
        }
    }
}
