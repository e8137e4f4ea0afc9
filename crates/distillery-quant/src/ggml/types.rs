//! ggml's tensor types: their ids in GGUF files, names, block sizes and bytes per block, as
//! `ggml/src/ggml-common.h` lays the blocks out and `ggml.h` numbers them.

/// A tensor type a GGUF file may name. distillery computes with the float types and the
/// block-quantized types llama.cpp's Llama-family files commonly hold ([`GgmlType::is_readable`]);
/// the others are known by name and size, so a file holding them can be listed and refused
/// clearly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

/// Values in a K-quant super-block.
pub const QK_K: usize = 256;

/// (type, id, name, values per block, bytes per block).
const TABLE: [(GgmlType, u32, &str, usize, usize); 32] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2K, 10, "Q2_K", QK_K, 84),
    (GgmlType::Q3K, 11, "Q3_K", QK_K, 110),
    (GgmlType::Q4K, 12, "Q4_K", QK_K, 144),
    (GgmlType::Q5K, 13, "Q5_K", QK_K, 176),
    (GgmlType::Q6K, 14, "Q6_K", QK_K, 210),
    (GgmlType::Q8K, 15, "Q8_K", QK_K, 292),
    (GgmlType::Iq2Xxs, 16, "IQ2_XXS", QK_K, 66),
    (GgmlType::Iq2Xs, 17, "IQ2_XS", QK_K, 74),
    (GgmlType::Iq3Xxs, 18, "IQ3_XXS", QK_K, 98),
    (GgmlType::Iq1S, 19, "IQ1_S", QK_K, 50),
    (GgmlType::Iq4Nl, 20, "IQ4_NL", 32, 18),
    (GgmlType::Iq3S, 21, "IQ3_S", QK_K, 110),
    (GgmlType::Iq2S, 22, "IQ2_S", QK_K, 82),
    (GgmlType::Iq4Xs, 23, "IQ4_XS", QK_K, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::Iq1M, 29, "IQ1_M", QK_K, 56),
    (GgmlType::Bf16, 30, "BF16", 1, 2),
    (GgmlType::Tq1_0, 34, "TQ1_0", QK_K, 54),
    (GgmlType::Tq2_0, 35, "TQ2_0", QK_K, 66),
    (GgmlType::Mxfp4, 39, "MXFP4", 32, 17),
];

impl GgmlType {
    fn entry(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|entry| entry.0 == self)
            .expect("every type is in the table")
    }

    /// The type a GGUF tensor info's type id names; `None` for an id ggml has never used or
    /// has retired.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE
            .iter()
            .find(|entry| entry.1 == id)
            .map(|entry| entry.0)
    }

    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name: `Q4_K`, `IQ2_XXS`.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Values per block along a row.
    pub fn block_values(self) -> usize {
        self.entry().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.entry().4
    }

    /// Bytes of a row of `values` values, when it holds whole blocks and the size is a number.
    pub fn row_bytes(self, values: usize) -> Option<usize> {
        values
            .is_multiple_of(self.block_values())
            .then(|| (values / self.block_values()).checked_mul(self.block_bytes()))
            .flatten()
    }

    /// The types whose values distillery reads.
    pub const READABLE: [GgmlType; 13] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// Whether distillery reads the values of tensors of this type.
    pub fn is_readable(self) -> bool {
        Self::READABLE.contains(&self)
    }

    /// Whether the values are stored in quantized blocks rather than one number each.
    pub fn is_block_quantized(self) -> bool {
        self.block_values() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_unique_and_round_trip() {
        for (kind, id, name, _, _) in TABLE {
            assert_eq!(GgmlType::from_id(id), Some(kind));
            assert_eq!(kind.id(), id);
            assert_eq!(kind.name(), name);
            assert_eq!(TABLE.iter().filter(|entry| entry.2 == name).count(), 1);
        }
        // Retired ids (Q4_2, Q4_3, the interleaved Q4_0 variants) and unknown ones.
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 1000] {
            assert_eq!(GgmlType::from_id(id), None, "{id}");
        }
    }

    #[test]
    fn block_sizes_follow_ggml_common() {
        // Sizes from the block structs: halves, scales and quants.
        assert_eq!(GgmlType::Q4_1.block_bytes(), 2 + 2 + 16);
        assert_eq!(GgmlType::Q5_1.block_bytes(), 2 + 2 + 4 + 16);
        assert_eq!(GgmlType::Q2K.block_bytes(), 2 + 2 + QK_K / 16 + QK_K / 4);
        assert_eq!(GgmlType::Q3K.block_bytes(), 2 + QK_K / 4 + QK_K / 8 + 12);
        assert_eq!(GgmlType::Q4K.block_bytes(), 2 + 2 + 12 + QK_K / 2);
        assert_eq!(
            GgmlType::Q5K.block_bytes(),
            2 + 2 + 12 + QK_K / 2 + QK_K / 8
        );
        assert_eq!(
            GgmlType::Q6K.block_bytes(),
            2 + QK_K / 2 + QK_K / 4 + QK_K / 16
        );
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(
            GgmlType::Q4K.row_bytes(576),
            None,
            "576 is not a whole super-block"
        );
        assert_eq!(GgmlType::F32.row_bytes(3), Some(12));
    }
}
