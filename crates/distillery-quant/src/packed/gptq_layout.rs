//! The GPTQ file layout (AutoGPTQ's v1 format) of a packed matrix: codes in 32-bit words along
//! the inputs, zeros packed along the outputs, f16 scales, and the group of every input column.

use super::PackedMatrix;
use crate::QuantError;
use crate::f16::f16_to_f32;
use crate::pack::{code_at, pack_bits, unpack_bits};
use crate::settings::{check_bits, check_whole_words};

/// A quantized matrix as GPTQ (AutoGPTQ's v1 format) stores it; `rows` are output channels.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    pub bits: u32,
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
    /// `[cols * bits / 32, rows]`, row-major.
    pub qweight: Vec<u32>,
    /// `[groups, rows * bits / 32]`: each group's zeros minus one, packed along the outputs.
    pub qzeros: Vec<u32>,
    /// `[groups, rows]` half-precision bit patterns.
    pub scales: Vec<u16>,
    /// `[cols]`.
    pub g_idx: Vec<u32>,
}

impl GptqTensors {
    /// The shapes of `qweight`, `qzeros`, `scales` and `g_idx`, in that order.
    pub fn shapes(&self) -> [Vec<usize>; 4] {
        let bits = self.bits as usize;
        [
            vec![self.cols * bits / 32, self.rows],
            vec![self.groups, self.rows * bits / 32],
            vec![self.groups, self.rows],
            vec![self.cols],
        ]
    }
}

impl PackedMatrix {
    /// The GPTQ tensors: whole 32-bit words of codes along the inputs and of zeros along the
    /// outputs ([`check_whole_words`]).
    pub fn to_gptq(&self) -> Result<GptqTensors, QuantError> {
        check_whole_words(self.bits, self.cols, self.rows)?;
        let bits = self.bits as usize;
        let packed_rows = self.cols * bits / 32;
        let mut qweight = vec![0u32; packed_rows * self.rows];
        let (mut code_buffer, mut scale_buffer) = (Vec::new(), Vec::new());
        for row in 0..self.rows {
            let (stored, _) = self.channel(row, &mut code_buffer, &mut scale_buffer);
            let words: Vec<u32> = match &self.order {
                None => stored
                    .chunks_exact(4)
                    .map(|word| u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
                    .collect(),
                Some(order) => {
                    let mut codes = vec![0u32; self.cols];
                    for (position, &col) in order.iter().enumerate() {
                        codes[col as usize] = code_at(stored, self.bits, position);
                    }
                    pack_bits(&codes, self.bits)
                }
            };
            for (packed_row, word) in words.into_iter().enumerate() {
                qweight[packed_row * self.rows + row] = word;
            }
        }
        let max_code = (1u32 << bits) - 1;
        let mut qzeros = Vec::with_capacity(self.groups * self.rows * bits / 32);
        let mut scales = Vec::with_capacity(self.groups * self.rows);
        for group in 0..self.groups {
            let stored: Vec<u32> = (0..self.rows)
                .map(|row| (u32::from(self.channel_zeros(row)[group]) - 1) & max_code)
                .collect();
            qzeros.extend(pack_bits(&stored, self.bits));
            scales.extend((0..self.rows).map(|row| self.scale_bits(row, group)));
        }
        Ok(GptqTensors {
            bits: self.bits,
            rows: self.rows,
            cols: self.cols,
            groups: self.groups,
            qweight,
            qzeros,
            scales,
            g_idx: self.group_index.clone(),
        })
    }

    /// Checks every length, index and value of GPTQ tensors read from a file.
    pub fn from_gptq(tensors: &GptqTensors) -> Result<Self, QuantError> {
        let GptqTensors {
            bits,
            rows,
            cols,
            groups,
            ..
        } = *tensors;
        let invalid = |message: String| Err(QuantError::Layout(message));
        check_bits(bits).map_err(|error| QuantError::Layout(error.to_string()))?;
        let width = bits as usize;
        if rows == 0 || cols == 0 || groups == 0 || groups > cols {
            return invalid(format!("{rows} outputs, {cols} inputs and {groups} groups"));
        }
        check_whole_words(bits, cols, rows)
            .map_err(|error| QuantError::Layout(error.to_string()))?;
        let expected = [
            cols * width / 32 * rows,
            groups * rows * width / 32,
            groups * rows,
            cols,
        ];
        let actual = [
            tensors.qweight.len(),
            tensors.qzeros.len(),
            tensors.scales.len(),
            tensors.g_idx.len(),
        ];
        for ((name, expected), actual) in ["qweight", "qzeros", "scales", "g_idx"]
            .iter()
            .zip(expected)
            .zip(actual)
        {
            if expected != actual {
                return invalid(format!(
                    "{name} holds {actual} values where {rows} outputs x {cols} inputs at \
                     {bits} bits in {groups} groups need {expected}"
                ));
            }
        }
        if let Some(&group) = tensors
            .g_idx
            .iter()
            .find(|&&group| group as usize >= groups)
        {
            return invalid(format!("g_idx names group {group} of {groups}"));
        }
        let max_code = (1u32 << bits) - 1;
        let bytes_per_row = cols * width / 8;
        let mut stream = vec![0u8; rows * bytes_per_row];
        for (index, &word) in tensors.qweight.iter().enumerate() {
            let (packed_row, row) = (index / rows, index % rows);
            let at = row * bytes_per_row + 4 * packed_row;
            stream[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        let mut scales = vec![0; rows * groups];
        let mut zeros = vec![0; rows * groups];
        let zero_words = rows * width / 32;
        for group in 0..groups {
            let stored = unpack_bits(
                &tensors.qzeros[group * zero_words..(group + 1) * zero_words],
                bits,
                rows,
            );
            for row in 0..rows {
                let scale = f16_to_f32(tensors.scales[group * rows + row]);
                if !(scale.is_finite() && scale > 0.0) {
                    return invalid(format!(
                        "scale {scale} of output {row} in group {group} is not a positive number"
                    ));
                }
                scales[row * groups + group] = tensors.scales[group * rows + row];
                zeros[row * groups + group] = ((stored[row] + 1) & max_code) as u8;
            }
        }
        Ok(Self::from_channels(
            (rows, cols, bits),
            stream,
            scales,
            zeros,
            tensors.g_idx.clone(),
        ))
    }
}
