//! The seven weight matrices of a decoder layer: the one table the model's iteration, the file
//! formats' names, GPTQ's calibration order and the config checks derive from.

use crate::LlamaConfig;

/// A weight matrix of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerMatrix {
    Query,
    Key,
    Value,
    Output,
    Gate,
    Up,
    Down,
}

impl LayerMatrix {
    /// Every matrix, in the order the forward pass reaches them.
    pub const ALL: [LayerMatrix; 7] = [
        Self::Query,
        Self::Key,
        Self::Value,
        Self::Output,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The module path inside the layer, Hugging Face's name without `.weight`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Query => "self_attn.q_proj",
            Self::Key => "self_attn.k_proj",
            Self::Value => "self_attn.v_proj",
            Self::Output => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|matrix| matrix.path() == path)
    }

    /// `(inputs, outputs)` of the matrix in a model of `config`.
    pub fn shape(self, config: &LlamaConfig) -> (usize, usize) {
        let hidden = config.hidden_size;
        let kv_width = config.num_key_value_heads * config.head_dim();
        match self {
            Self::Query | Self::Output => (hidden, hidden),
            Self::Key | Self::Value => (hidden, kv_width),
            Self::Gate | Self::Up => (hidden, config.intermediate_size),
            Self::Down => (config.intermediate_size, hidden),
        }
    }

    /// The heads the matrix's outputs split into, for the ones the rotary embedding turns
    /// pairwise within each head (query and key), whose row order files disagree on.
    pub fn heads(self, config: &LlamaConfig) -> Option<usize> {
        match self {
            Self::Query => Some(config.num_attention_heads),
            Self::Key => Some(config.num_key_value_heads),
            _ => None,
        }
    }

    /// The matrices that read the same input, calibrated together by GPTQ's true-sequential
    /// order: q, k, v; then o; then gate, up; then down.
    pub const SEQUENTIAL_GROUPS: [&'static [LayerMatrix]; 4] = [
        &[Self::Query, Self::Key, Self::Value],
        &[Self::Output],
        &[Self::Gate, Self::Up],
        &[Self::Down],
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_groups_cover_every_matrix_once() {
        for matrix in LayerMatrix::ALL {
            assert_eq!(LayerMatrix::from_path(matrix.path()), Some(matrix));
        }
        assert_eq!(LayerMatrix::from_path("self_attn.rotary"), None);
        let grouped: Vec<LayerMatrix> = LayerMatrix::SEQUENTIAL_GROUPS.concat();
        assert_eq!(grouped, LayerMatrix::ALL);
    }
}
