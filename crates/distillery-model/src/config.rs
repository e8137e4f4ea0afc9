use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The architecture of a Llama model.
///
/// Field names are Hugging Face's `config.json` names, so writing and reading that file is a plain
/// serde mapping. The struct is strict: distillery writes every field, and a misspelled one in a
/// checkpoint's `config.json` is an error rather than a silently different model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// How rotary frequencies are stretched for contexts beyond the pretraining length;
    /// absent for plain rotary embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// A rotary-frequency scaling, as Hugging Face's `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5) names it by `rope_type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Positions divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Each rotary pair's frequency divided by its own factor, as GGUF files carry Llama 3.1's
    /// scaling (`rope_freqs.weight`); transformers has no such type.
    Factors { factors: Vec<f64> },
}

impl RopeScaling {
    /// Inverse frequency `inv_freq` of rotary pair `pair`, scaled (transformers'
    /// `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters`, llama.cpp's
    /// frequency factors).
    pub fn scale(&self, pair: usize, inv_freq: f64) -> f64 {
        match *self {
            Self::Factors { ref factors } => inv_freq / factors[pair],
            Self::Linear { factor } => inv_freq / factor,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let context = original_max_position_embeddings as f64;
                let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelength < context / high_freq_factor {
                    inv_freq
                } else if wavelength > context / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (context / wavelength - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }

    fn validate(&self, pairs: usize) -> Result<(), ModelError> {
        let invalid = |reason: String| {
            Err(ModelError::InvalidConfig {
                field: "rope_scaling",
                reason,
            })
        };
        match *self {
            Self::Factors { ref factors } if factors.len() != pairs => invalid(format!(
                "holds {} frequency factors for {pairs} rotary pairs",
                factors.len()
            )),
            Self::Factors { ref factors }
                if !factors
                    .iter()
                    .all(|factor| factor.is_finite() && *factor > 0.0) =>
            {
                invalid("frequency factors must be positive numbers".into())
            }
            Self::Linear { factor } | Self::Llama3 { factor, .. }
                if !(factor.is_finite() && factor >= 1.0) =>
            {
                invalid(format!("factor must be at least 1, got {factor}"))
            }
            Self::Llama3 {
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
                ..
            } if !(low_freq_factor > 0.0
                && high_freq_factor > low_freq_factor
                && original_max_position_embeddings > 0) =>
            {
                invalid(format!(
                    "llama3 needs 0 < low_freq_factor < high_freq_factor and a positive \
                     original_max_position_embeddings, got {low_freq_factor}, \
                     {high_freq_factor}, {original_max_position_embeddings}"
                ))
            }
            _ => Ok(()),
        }
    }
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// How many query heads share one key/value head (grouped-query attention).
    pub fn query_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks the invariants the model relies on, naming the field at fault.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::InvalidConfig {
                field: "hidden_size",
                reason: format!(
                    "{} is not divisible by num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ModelError::InvalidConfig {
                field: "num_key_value_heads",
                reason: format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            });
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::InvalidConfig {
                field: "hidden_size",
                reason: format!(
                    "the head dimension {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            });
        }
        let positive_floats = [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ];
        for (field, value) in positive_floats {
            if !(value.is_finite() && value > 0.0) {
                return Err(ModelError::InvalidConfig {
                    field,
                    reason: format!("must be a positive number, got {value}"),
                });
            }
        }
        if self.checked_parameters().is_none() {
            return Err(ModelError::InvalidConfig {
                field: "hidden_size",
                reason: "the model's parameter count overflows".into(),
            });
        }
        match &self.rope_scaling {
            Some(scaling) => scaling.validate(self.head_dim() / 2),
            None => Ok(()),
        }
    }

    /// Number of trainable parameters, counting a tied embedding once. A [validated]
    /// (Self::validate) config's count fits.
    pub fn num_parameters(&self) -> usize {
        self.checked_parameters()
            .expect("validated configs count their parameters")
    }

    /// [`Self::num_parameters`], or `None` when the count overflows (a hostile file's config).
    pub fn checked_parameters(&self) -> Option<usize> {
        let hidden = self.hidden_size;
        let kv_width = self.num_key_value_heads.checked_mul(self.head_dim())?;
        let attention = hidden
            .checked_mul(hidden)?
            .checked_add(hidden.checked_mul(kv_width)?)?
            .checked_mul(2)?;
        let mlp = hidden.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        let norms = hidden.checked_mul(2)?;
        let layers = self
            .num_hidden_layers
            .checked_mul(attention.checked_add(mlp)?.checked_add(norms)?)?;
        let embedding = self.vocab_size.checked_mul(hidden)?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding
            .checked_add(layers)?
            .checked_add(hidden)?
            .checked_add(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn small() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }

    #[test]
    fn valid_config_passes() {
        small().validate().unwrap();
    }

    #[test]
    fn heads_must_divide_hidden_size() {
        let config = LlamaConfig {
            num_attention_heads: 5,
            num_key_value_heads: 5,
            ..small()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("hidden_size"), "{error}");
    }

    #[test]
    fn kv_heads_must_divide_query_heads() {
        let config = LlamaConfig {
            num_key_value_heads: 3,
            ..small()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("num_key_value_heads"), "{error}");
    }

    #[test]
    fn parameter_count_matches_hand_count() {
        // embed 64*32 + head 64*32 + final norm 32
        // per layer: q,o 32*32 each, k,v 32*16 each, mlp 3*32*64, norms 2*32
        let per_layer = 2 * 1024 + 2 * 512 + 3 * 2048 + 64;
        assert_eq!(small().num_parameters(), 2 * 2048 + 32 + 2 * per_layer);
        let tied = LlamaConfig {
            tie_word_embeddings: true,
            ..small()
        };
        assert_eq!(tied.num_parameters(), 2048 + 32 + 2 * per_layer);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let json = r#"{"vocab_size":1,"hidden_size":2,"intermediate_size":2,"num_hidden_layers":1,
            "num_attention_heads":1,"num_key_value_heads":1,"max_position_embeddings":4,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"hiden":3}"#;
        let error = serde_json_error(json);
        assert!(error.contains("hiden"), "{error}");
    }

    fn serde_json_error(json: &str) -> String {
        match serde::Deserialize::deserialize(&mut serde_json::Deserializer::from_str(json)) {
            Ok(LlamaConfig { .. }) => panic!("accepted an unknown field"),
            Err(error) => error.to_string(),
        }
    }
}
