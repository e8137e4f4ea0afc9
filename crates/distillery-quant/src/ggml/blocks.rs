//! The values of ggml's blocks, as `ggml-quants.c` and the `gguf` Python package dequantize
//! them (the same arithmetic in the same order, so the floats agree bit for bit), ggml's
//! quantization of Q8_0 and Q4_0 blocks for writing files, and the 32-value pieces the
//! integer products read.
//!
//! Layouts (`ggml-common.h`), every half-precision number little-endian:
//! - Q4_0 (18 bytes / 32 values): `d`, 16 bytes of codes; `x = d (q - 8)`.
//! - Q4_1 (20 / 32): `d`, `m`, 16 bytes of codes; `x = d q + m`.
//! - Q5_0 (22 / 32): `d`, 4 bytes of fifth bits, 16 bytes of low nibbles; `x = d (q - 16)`.
//! - Q5_1 (24 / 32): `d`, `m`, fifth bits, low nibbles; `x = d q + m`.
//! - Q8_0 (34 / 32): `d`, 32 signed codes; `x = d q`.
//!
//!   In the 32-value blocks byte `j` holds value `j` in its low nibble and value `j + 16` in
//!   its high one, and bit `j` of the fifth bits belongs to value `j`.
//! - Q2_K (84 / 256): 16 bytes of 4-bit scale and 4-bit minimum per 16 values, 64 bytes of
//!   2-bit codes, `d`, `dmin`; `x = (d sc) q - dmin m`.
//! - Q3_K (110 / 256): 32 bytes of high bits, 64 bytes of 2-bit low codes, 12 bytes of 6-bit
//!   scales per 16 values, `d`; `x = (d (sc - 32)) q`, `q` in -4..=3.
//! - Q4_K (144 / 256): `d`, `dmin`, 12 bytes of 6-bit scales and minima per 32 values, 128
//!   bytes of codes; `x = (d sc) q - dmin m`.
//! - Q5_K (176 / 256): as Q4_K with 32 bytes of fifth bits before the nibbles.
//! - Q6_K (210 / 256): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed
//!   scales per 16 values, `d`; `x = (d sc) (q - 32)`.
//!
//!   In a K-quant super-block, each 128 values take 32 bytes of 2-bit codes (value `32 s + j`
//!   of the half at bits `2 s` of byte `j`), the 4-bit codes take 32 bytes per 64 values (low
//!   nibbles first), and high bits sit at bit `i` of byte `j` for value `32 i + j`.

use multiversion::multiversion;

use super::types::{GgmlType, QK_K};
use crate::f16::{f16_to_f32, f32_to_f16};

/// Values in one piece: the unit the integer products work in, one input scale each.
pub const PIECE: usize = 32;

/// The half-precision number at `bytes[at..at + 2]`: one F16C instruction in the AVX2 kernel
/// family (every block decodes a few), the same exact conversion in software otherwise.
#[inline]
fn half(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernel_family() >= crate::cpu::KernelFamily::Avx2 {
        // SAFETY: the AVX2 family includes F16C.
        return unsafe { f16c::to_f32(bits) };
    }
    f16_to_f32(bits)
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    #[target_feature(enable = "f16c")]
    pub(super) fn to_f32(bits: u16) -> f32 {
        use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
}

/// Writes the values of whole blocks of `kind` stored in `bytes` to `out`
/// (`bytes.len() / kind.block_bytes() * kind.block_values()` values). `kind` must be
/// [readable](GgmlType::is_readable).
pub fn dequantize(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let per_block = kind.block_values();
    let blocks = bytes.chunks_exact(kind.block_bytes());
    debug_assert_eq!(blocks.len() * per_block, out.len());
    // One loop per type, each simple enough to vectorize (prompts decode whole matrices).
    match kind {
        GgmlType::F32 => {
            for (block, value) in blocks.zip(out) {
                *value = f32::from_le_bytes(block.try_into().expect("4 bytes"));
            }
        }
        GgmlType::F16 => {
            for (block, value) in blocks.zip(out) {
                *value = half(block, 0);
            }
        }
        GgmlType::Bf16 => {
            for (block, value) in blocks.zip(out) {
                *value = f32::from_bits(u32::from(u16::from_le_bytes([block[0], block[1]])) << 16);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => nibble_blocks(kind, bytes, out),
        GgmlType::Q5_0 | GgmlType::Q5_1 => five_bit_blocks(kind, bytes, out),
        GgmlType::Q8_0 => byte_blocks(bytes, out),
        GgmlType::Q4K | GgmlType::Q5K => nibble_super_blocks(kind, bytes, out),
        GgmlType::Q6K => six_bit_super_blocks(bytes, out),
        GgmlType::Q2K | GgmlType::Q3K => {
            for (block, values) in blocks.zip(out.chunks_exact_mut(per_block)) {
                super_block(kind, block, values)
            }
        }
        other => unreachable!("{other} is not a readable type"),
    }
}

/// Q4_0 (`d (q - 8)`) and Q4_1 (`d q + m`) blocks.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn nibble_blocks(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let codes_at = if kind == GgmlType::Q4_0 { 2 } else { 4 };
    for (block, values) in bytes
        .chunks_exact(kind.block_bytes())
        .zip(out.chunks_exact_mut(PIECE))
    {
        let (first, second) = values.split_at_mut(PIECE / 2);
        let codes = first
            .iter_mut()
            .zip(second)
            .zip(&block[codes_at..codes_at + PIECE / 2]);
        let d = half(block, 0);
        if kind == GgmlType::Q4_0 {
            for ((low, high), &byte) in codes {
                *low = d * f32::from((byte & 0xf) as i8 - 8);
                *high = d * f32::from((byte >> 4) as i8 - 8);
            }
        } else {
            let m = half(block, 2);
            for ((low, high), &byte) in codes {
                *low = d * f32::from(byte & 0xf) + m;
                *high = d * f32::from(byte >> 4) + m;
            }
        }
    }
}

/// Q5_0 (`d (q - 16)`) and Q5_1 (`d q + m`) blocks.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn five_bit_blocks(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bits_at, codes_at) = if kind == GgmlType::Q5_0 {
        (2, 6)
    } else {
        (4, 8)
    };
    for (block, values) in bytes
        .chunks_exact(kind.block_bytes())
        .zip(out.chunks_exact_mut(PIECE))
    {
        let high = u32::from_le_bytes(block[bits_at..bits_at + 4].try_into().expect("4 bytes"));
        let codes = five_bit_codes(&block[codes_at..codes_at + PIECE / 2], high);
        let d = half(block, 0);
        if kind == GgmlType::Q5_0 {
            for (value, code) in values.iter_mut().zip(codes) {
                *value = d * f32::from(code as i8 - 16);
            }
        } else {
            let m = half(block, 2);
            for (value, code) in values.iter_mut().zip(codes) {
                *value = d * f32::from(code) + m;
            }
        }
    }
}

/// Q8_0 blocks: `q d`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn byte_blocks(bytes: &[u8], out: &mut [f32]) {
    let size = GgmlType::Q8_0.block_bytes();
    for (block, values) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(PIECE)) {
        let d = half(block, 0);
        for (value, &code) in values.iter_mut().zip(&block[2..34]) {
            *value = f32::from(code as i8) * d;
        }
    }
}

/// Q4_K and Q5_K super-blocks: each 32-value sub-block's `(d sc) q - dmin m`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn nibble_super_blocks(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    for (block, values) in bytes
        .chunks_exact(kind.block_bytes())
        .zip(out.chunks_exact_mut(QK_K))
    {
        let (d, dmin) = (half(block, 0), half(block, 2));
        let (high, codes) = match kind {
            GgmlType::Q5K => (Some(&block[16..48]), &block[48..176]),
            _ => (None, &block[16..144]),
        };
        for (sub, values) in values.chunks_exact_mut(PIECE).enumerate() {
            let (sc, m) = scale_min_k4(&block[4..16], sub);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let bytes = &codes[PIECE * (sub / 2)..PIECE * (sub / 2 + 1)];
            let shift = 4 * (sub % 2);
            match high {
                Some(high) => {
                    for ((value, &byte), &bits) in values.iter_mut().zip(bytes).zip(high) {
                        let code = (byte >> shift) & 0xf | ((bits >> sub) & 1) << 4;
                        *value = dl * f32::from(code) - ml;
                    }
                }
                None => {
                    for (value, &byte) in values.iter_mut().zip(bytes) {
                        *value = dl * f32::from((byte >> shift) & 0xf) - ml;
                    }
                }
            }
        }
    }
}

/// Q6_K super-blocks: each 16 values' `(d sc) (q - 32)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2+fma"))]
fn six_bit_super_blocks(bytes: &[u8], out: &mut [f32]) {
    let size = GgmlType::Q6K.block_bytes();
    for (block, values) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(QK_K)) {
        let (low, high, scales) = (&block[..128], &block[128..192], &block[192..208]);
        let d = half(block, 208);
        for (quarter, values) in values.chunks_exact_mut(PIECE).enumerate() {
            let (part, position) = (quarter / 4, quarter % 4);
            let nibbles = &low[64 * part + PIECE * (position % 2)..][..PIECE];
            let pairs = &high[PIECE * part..][..PIECE];
            let (nibble_shift, pair_shift) = (4 * (position / 2), 2 * position);
            for (half_index, values) in values.chunks_exact_mut(PIECE / 2).enumerate() {
                let dl = d * f32::from(scales[2 * quarter + half_index] as i8);
                let at = half_index * PIECE / 2;
                let codes = nibbles[at..at + PIECE / 2]
                    .iter()
                    .zip(&pairs[at..at + PIECE / 2]);
                for (value, (&nibble, &pair)) in values.iter_mut().zip(codes) {
                    let code = ((nibble >> nibble_shift) & 0xf) | ((pair >> pair_shift) & 3) << 4;
                    *value = dl * f32::from(code as i8 - 32);
                }
            }
        }
    }
}

/// The 32 codes of a 5-bit block: low nibbles from `low`, fifth bits from `high`.
fn five_bit_codes(low: &[u8], high: u32) -> impl Iterator<Item = u8> + '_ {
    (0..32).map(move |j| {
        let nibble = if j < 16 {
            low[j] & 0xf
        } else {
            low[j - 16] >> 4
        };
        nibble | (((high >> j) & 1) as u8) << 4
    })
}

/// The 6-bit scale and minimum of sub-block `index` (0..8) of a Q4_K or Q5_K super-block.
pub(crate) fn scale_min_k4(scales: &[u8], index: usize) -> (u8, u8) {
    if index < 4 {
        (scales[index] & 63, scales[index + 4] & 63)
    } else {
        (
            (scales[index + 4] & 0xf) | ((scales[index - 4] >> 6) << 4),
            (scales[index + 4] >> 4) | ((scales[index] >> 6) << 4),
        )
    }
}

/// The 6-bit scale of sub-block `index` (0..16) of a Q3_K super-block, as stored (biased by 32).
fn scale_q3k(scales: &[u8], index: usize) -> u8 {
    let low = if index < 8 {
        scales[index] & 0xf
    } else {
        scales[index - 8] >> 4
    };
    let high = (scales[8 + index % 4] >> (2 * (index / 4))) & 3;
    low | high << 4
}

fn super_block(kind: GgmlType, block: &[u8], values: &mut [f32]) {
    match kind {
        GgmlType::Q2K => {
            let (scales, codes) = (&block[..16], &block[16..80]);
            let (d, dmin) = (half(block, 80), half(block, 82));
            for (index, value) in values.iter_mut().enumerate() {
                let sc = scales[index / 16];
                let dl = d * f32::from(sc & 0xf);
                let ml = dmin * f32::from(sc >> 4);
                *value = dl * f32::from(two_bit_code(codes, index)) - ml;
            }
        }
        GgmlType::Q3K => {
            let (high, codes, scales) = (&block[..32], &block[32..96], &block[96..108]);
            let d = half(block, 108);
            for (index, value) in values.iter_mut().enumerate() {
                let dl = d * f32::from(scale_q3k(scales, index / 16) as i8 - 32);
                *value = dl * f32::from(q3k_code(high, codes, index));
            }
        }
        _ => unreachable!("Q2_K and Q3_K only"),
    }
}

/// Code `index` of 2-bit codes laid out 128 values per 32 bytes.
fn two_bit_code(codes: &[u8], index: usize) -> u8 {
    let (half, rest) = (index / 128, index % 128);
    (codes[half * 32 + rest % 32] >> (2 * (rest / 32))) & 3
}

/// Code `index` of 4-bit codes laid out 64 values per 32 bytes, low nibbles first.
fn nibble_code(codes: &[u8], index: usize) -> u8 {
    let (group, rest) = (index / 64, index % 64);
    (codes[group * 32 + rest % 32] >> (4 * (rest / 32))) & 0xf
}

fn q3k_code(high: &[u8], codes: &[u8], index: usize) -> i8 {
    let low = two_bit_code(codes, index) as i8;
    let set = (high[index % 32] >> (index / 32)) & 1 == 1;
    if set { low } else { low - 4 }
}

fn q6k_code(low: &[u8], high: &[u8], index: usize) -> i8 {
    let (half, rest) = (index / 128, index % 128);
    let nibble = (low[half * 64 + rest % 64] >> (4 * (rest / 64))) & 0xf;
    let pair = (high[half * 32 + rest % 32] >> (2 * (rest / 32))) & 3;
    (nibble | pair << 4) as i8 - 32
}

/// A piece's values as `scale[h] * code + bias[h]` for the first (`h = 0`) and second
/// sixteen values: the form integer products use. Mathematically equal to the dequantized
/// values; the floats may differ in the last bit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PieceScales {
    pub scale: [f32; 2],
    pub bias: [f32; 2],
}

impl PieceScales {
    fn uniform(scale: f32, bias: f32) -> Self {
        Self {
            scale: [scale; 2],
            bias: [bias; 2],
        }
    }
}

/// Pieces per block of `kind`.
pub fn pieces_per_block(kind: GgmlType) -> usize {
    kind.block_values() / PIECE
}

/// Piece `piece` of a block of a readable block-quantized `kind`: its 32 codes, as small
/// signed integers, into `codes`, and its scales.
#[inline(always)]
pub fn decode_piece(
    kind: GgmlType,
    block: &[u8],
    piece: usize,
    codes: &mut [i8; PIECE],
) -> PieceScales {
    match kind {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let offset = if kind == GgmlType::Q4_0 { 8 } else { 0 };
            let start = if kind == GgmlType::Q4_0 { 2 } else { 4 };
            for (j, &byte) in block[start..start + 16].iter().enumerate() {
                codes[j] = (byte & 0xf) as i8 - offset;
                codes[j + 16] = (byte >> 4) as i8 - offset;
            }
            let d = half(block, 0);
            match kind {
                GgmlType::Q4_0 => PieceScales::uniform(d, 0.0),
                _ => PieceScales::uniform(d, half(block, 2)),
            }
        }
        GgmlType::Q5_0 => {
            let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for (code, value) in codes.iter_mut().zip(five_bit_codes(&block[6..22], high)) {
                *code = value as i8 - 16;
            }
            PieceScales::uniform(half(block, 0), 0.0)
        }
        GgmlType::Q5_1 => {
            let high = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
            for (code, value) in codes.iter_mut().zip(five_bit_codes(&block[8..24], high)) {
                *code = value as i8;
            }
            PieceScales::uniform(half(block, 0), half(block, 2))
        }
        GgmlType::Q8_0 => {
            for (code, &byte) in codes.iter_mut().zip(&block[2..34]) {
                *code = byte as i8;
            }
            PieceScales::uniform(half(block, 0), 0.0)
        }
        GgmlType::Q2K => {
            let first = piece * PIECE;
            for (j, code) in codes.iter_mut().enumerate() {
                *code = two_bit_code(&block[16..80], first + j) as i8;
            }
            let (d, dmin) = (half(block, 80), half(block, 82));
            let sub = |h: usize| block[2 * piece + h];
            PieceScales {
                scale: [0, 1].map(|h| d * f32::from(sub(h) & 0xf)),
                bias: [0, 1].map(|h| -(dmin * f32::from(sub(h) >> 4))),
            }
        }
        GgmlType::Q3K => {
            let first = piece * PIECE;
            for (j, code) in codes.iter_mut().enumerate() {
                *code = q3k_code(&block[..32], &block[32..96], first + j);
            }
            let d = half(block, 108);
            let scale =
                |h: usize| d * f32::from(scale_q3k(&block[96..108], 2 * piece + h) as i8 - 32);
            PieceScales {
                scale: [scale(0), scale(1)],
                bias: [0.0; 2],
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let first = piece * PIECE;
            let (high, low) = match kind {
                GgmlType::Q5K => (Some(&block[16..48]), &block[48..176]),
                _ => (None, &block[16..144]),
            };
            for (j, code) in codes.iter_mut().enumerate() {
                let nibble = nibble_code(low, first + j);
                let fifth = high.map_or(0, |high| ((high[j] >> piece) & 1) << 4);
                *code = (nibble | fifth) as i8;
            }
            let (sc, m) = scale_min_k4(&block[4..16], piece);
            PieceScales::uniform(
                half(block, 0) * f32::from(sc),
                -(half(block, 2) * f32::from(m)),
            )
        }
        GgmlType::Q6K => {
            let first = piece * PIECE;
            for (j, code) in codes.iter_mut().enumerate() {
                *code = q6k_code(&block[..128], &block[128..192], first + j);
            }
            let d = half(block, 208);
            let scale = |h: usize| d * f32::from(block[192 + 2 * piece + h] as i8);
            PieceScales {
                scale: [scale(0), scale(1)],
                bias: [0.0; 2],
            }
        }
        other => unreachable!("{other} has no integer pieces"),
    }
}

/// Q8_0 blocks of `values` (a multiple of 32 long): `d = absmax / 127`, codes rounded half away
/// from zero, as ggml's reference quantizer does.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let block_bytes = GgmlType::Q8_0.block_bytes();
    let mut out = Vec::with_capacity(values.len() / PIECE * block_bytes);
    for block in values.chunks_exact(PIECE) {
        let absmax = block.iter().fold(0.0f32, |max, v| max.max(v.abs()));
        let d = absmax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
    }
    out
}

/// Q4_0 blocks of `values` (a multiple of 32 long): `d = m / -8` where `m` is the value of
/// largest magnitude (sign kept), codes `min(15, trunc(x / d + 8.5))`.
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let block_bytes = GgmlType::Q4_0.block_bytes();
    let mut out = Vec::with_capacity(values.len() / PIECE * block_bytes);
    for block in values.chunks_exact(PIECE) {
        let extreme = block
            .iter()
            .fold(0.0f32, |max, &v| if v.abs() > max.abs() { v } else { max });
        let d = extreme / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        let code = |v: f32| ((v * inverse + 8.5) as i8).min(15) as u8;
        for j in 0..PIECE / 2 {
            out.push(code(block[j]) | code(block[j + PIECE / 2]) << 4);
        }
    }
    out
}

/// The block-quantized types distillery reads.
#[cfg(test)]
pub(crate) const QUANTIZED_KINDS: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// `count` blocks of random bytes whose half-precision fields hold small positive numbers (a
/// half-precision matrix: small random values), so every value is finite.
#[cfg(test)]
pub(crate) fn random_blocks(
    kind: GgmlType,
    count: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<u8> {
    use rand::RngExt;
    let mut bytes: Vec<u8> = (0..count * kind.block_bytes())
        .map(|_| rng.random())
        .collect();
    let halves: &[usize] = match kind {
        GgmlType::F16 => {
            for value in bytes.chunks_exact_mut(2) {
                value.copy_from_slice(&f32_to_f16(rng.random::<f32>() - 0.5).to_le_bytes());
            }
            &[]
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        other => unreachable!("no random {other} blocks"),
    };
    for block in bytes.chunks_exact_mut(kind.block_bytes()) {
        for &at in halves {
            let value = rng.random::<f32>() * 0.05 + 0.001;
            block[at..at + 2].copy_from_slice(&f32_to_f16(value).to_le_bytes());
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const F16_ONE: [u8; 2] = 0x3c00u16.to_le_bytes();

    fn f16(value: f32) -> [u8; 2] {
        f32_to_f16(value).to_le_bytes()
    }

    fn values(kind: GgmlType, block: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; kind.block_values()];
        dequantize(kind, block, &mut out);
        out
    }

    #[test]
    fn thirty_two_value_blocks_decode_by_hand() {
        let mut q4_0 = vec![0u8; 18];
        q4_0[..2].copy_from_slice(&f16(0.5));
        q4_0[2] = 0x1f;
        let q4_0 = values(GgmlType::Q4_0, &q4_0);
        assert_eq!((q4_0[0], q4_0[16], q4_0[1]), (3.5, -3.5, -4.0));

        let mut q4_1 = vec![0u8; 20];
        q4_1[..2].copy_from_slice(&f16(0.25));
        q4_1[2..4].copy_from_slice(&f16(-1.0));
        q4_1[4 + 3] = 0xa2;
        let q4_1 = values(GgmlType::Q4_1, &q4_1);
        assert_eq!((q4_1[3], q4_1[19], q4_1[0]), (-0.5, 1.5, -1.0));

        let mut q5_0 = vec![0u8; 22];
        q5_0[..2].copy_from_slice(&F16_ONE);
        q5_0[2..6].copy_from_slice(&(1u32 << 5).to_le_bytes());
        q5_0[6 + 5] = 0x03;
        let q5_0 = values(GgmlType::Q5_0, &q5_0);
        assert_eq!((q5_0[5], q5_0[21]), (3.0, -16.0));

        let mut q5_1 = vec![0u8; 24];
        q5_1[..2].copy_from_slice(&f16(2.0));
        q5_1[2..4].copy_from_slice(&f16(0.5));
        q5_1[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
        q5_1[8 + 4] = 0x70;
        let q5_1 = values(GgmlType::Q5_1, &q5_1);
        assert_eq!((q5_1[20], q5_1[4]), (46.5, 0.5));

        let mut q8_0 = vec![0u8; 34];
        q8_0[..2].copy_from_slice(&f16(0.125));
        q8_0[2 + 7] = (-3i8) as u8;
        q8_0[2 + 8] = 127;
        let q8_0 = values(GgmlType::Q8_0, &q8_0);
        assert_eq!((q8_0[7], q8_0[8]), (-0.375, 15.875));
    }

    #[test]
    fn super_blocks_decode_by_hand() {
        // Q2_K, value 85: sub-block 5 (scale 2, minimum 3), code at bits 4..6 of byte 21.
        let mut q2 = vec![0u8; 84];
        q2[5] = 0x32;
        q2[16 + 21] = 0b0011_0000;
        q2[80..82].copy_from_slice(&f16(0.5));
        q2[82..84].copy_from_slice(&f16(0.25));
        assert_eq!(values(GgmlType::Q2K, &q2)[85], 0.5 * 2.0 * 3.0 - 0.25 * 3.0);

        // Q3_K, value 200: second half, code at bits 4..6 of byte 8, high bit 6 of byte 8
        // clear (so 4 is taken off), scale 12 = low nibble of byte 4 | bits 6..8 of byte 8.
        let mut q3 = vec![0u8; 110];
        q3[32 + 32 + 8] = 0b0010_0000;
        q3[96 + 4] = 0x50;
        q3[96 + 8] = 0b1000_0000;
        q3[108..110].copy_from_slice(&f16(0.5));
        let q3_values = values(GgmlType::Q3K, &q3);
        assert_eq!(q3_values[200], 0.5 * (37.0 - 32.0) * (2.0 - 4.0));
        q3[8] = 1 << 6;
        assert_eq!(values(GgmlType::Q3K, &q3)[200], 0.5 * 5.0 * 2.0);

        // Q4_K, value 170: sub-block 5 with scale 3 + 16 and minimum 7 + 32, code in the high
        // nibble of byte 74.
        let mut q4 = vec![0u8; 144];
        q4[..2].copy_from_slice(&F16_ONE);
        q4[2..4].copy_from_slice(&f16(0.5));
        q4[4 + 9] = 0x73;
        q4[4 + 1] = 0b0100_0000;
        q4[4 + 5] = 0b1000_0000;
        q4[16 + 74] = 0xb0;
        assert_eq!(values(GgmlType::Q4K, &q4)[170], 19.0 * 11.0 - 0.5 * 39.0);

        // Q5_K, the same value with its fifth bit (bit 5 of byte 10) set.
        let mut q5 = vec![0u8; 176];
        q5[..16].copy_from_slice(&q4[..16]);
        q5[16 + 10] = 1 << 5;
        q5[48 + 74] = 0xb0;
        assert_eq!(values(GgmlType::Q5K, &q5)[170], 19.0 * 27.0 - 0.5 * 39.0);

        // Q6_K, value 150: low nibble of byte 64 + 22, high pair at bits 0..2 of byte
        // 32 + 22, signed scale 9.
        let mut q6 = vec![0u8; 210];
        q6[86] = 0x05;
        q6[128 + 54] = 0x02;
        q6[192 + 9] = (-3i8) as u8;
        q6[208..210].copy_from_slice(&f16(0.25));
        assert_eq!(values(GgmlType::Q6K, &q6)[150], 0.25 * -3.0 * 5.0);
    }

    #[test]
    fn float_types_decode_by_hand() {
        assert_eq!(values(GgmlType::F32, &1.5f32.to_le_bytes()), [1.5]);
        assert_eq!(values(GgmlType::F16, &F16_ONE), [1.0]);
        // bf16 is the high half of an f32: 0x3fc0 is 1.5.
        assert_eq!(values(GgmlType::Bf16, &0x3fc0u16.to_le_bytes()), [1.5]);
    }

    #[test]
    fn pieces_restate_every_dequantized_value() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for kind in QUANTIZED_KINDS {
            for _ in 0..20 {
                let block = random_blocks(kind, 1, &mut rng);
                let expected = values(kind, &block);
                let mut codes = [0i8; PIECE];
                for piece in 0..pieces_per_block(kind) {
                    let scales = decode_piece(kind, &block, piece, &mut codes);
                    for (j, &code) in codes.iter().enumerate() {
                        let h = j / 16;
                        let restated = scales.scale[h] * f32::from(code) + scales.bias[h];
                        let want = expected[piece * PIECE + j];
                        assert!(
                            (restated - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{kind} piece {piece} value {j}: {restated} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_blocks_hold_values_within_a_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 64) as f32 / 8.0 - 4.0)
            .collect();
        for (kind, bytes, steps) in [
            (GgmlType::Q8_0, quantize_q8_0(&values), 127.0),
            (GgmlType::Q4_0, quantize_q4_0(&values), 8.0),
        ] {
            assert_eq!(bytes.len(), 2 * kind.block_bytes());
            let mut restored = vec![0.0; 64];
            dequantize(kind, &bytes, &mut restored);
            for (v, r) in values.iter().zip(&restored) {
                assert!((v - r).abs() <= 4.0 / steps * 1.001, "{kind}: {v} -> {r}");
            }
        }
    }

    #[test]
    fn q4_0_nibbles_follow_llama_cpp_order() {
        // Largest magnitude -8 gives d = 1: codes are value + 8.
        let mut values = vec![0.0f32; PIECE];
        values[0] = -8.0;
        values[1] = 3.0;
        values[16] = 7.0;
        values[17] = -1.0;
        let bytes = quantize_q4_0(&values);
        assert_eq!(bytes[..2], F16_ONE, "d = 1.0");
        // Value 0 (code 0) in the low nibble, value 16 (code 15) in the high one.
        assert_eq!(bytes[2], 15 << 4);
        assert_eq!(bytes[3], 11 | 7 << 4);
        assert_eq!(bytes[4], 8 | 8 << 4);
        let mut restored = vec![0.0; PIECE];
        dequantize(GgmlType::Q4_0, &bytes, &mut restored);
        assert_eq!(restored, values);
    }
}
