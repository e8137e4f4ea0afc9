//! Parameter names: distillery's module paths against Hugging Face's tensor names.
//!
//! distillery's paths are Hugging Face's names without the `model.` prefix, except the norm
//! gains, which burn calls `gamma`. An unknown name is an error, never passed through.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no Hugging Face name for parameter `{0}`")]
pub struct UnknownParameter(pub String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unexpected tensor `{0}` in a Hugging Face Llama checkpoint")]
pub struct UnknownTensor(pub String);

use distillery_model::LayerMatrix;

const LAYER_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// Whether a layer-local name is one of the layer's matrices (`self_attn.q_proj.weight`),
/// identical in both naming schemes.
fn is_layer_matrix(rest: &str) -> bool {
    rest.strip_suffix(".weight")
        .and_then(LayerMatrix::from_path)
        .is_some()
}

/// Hugging Face's names of a decoder layer's tensors.
pub struct LayerTensorNames {
    pub input_layernorm: String,
    pub post_attention_layernorm: String,
    /// In [`LayerMatrix::ALL`]'s order.
    pub matrices: [String; 7],
}

pub fn layer_tensor_names(layer: usize) -> LayerTensorNames {
    LayerTensorNames {
        input_layernorm: format!("model.layers.{layer}.input_layernorm.weight"),
        post_attention_layernorm: format!("model.layers.{layer}.post_attention_layernorm.weight"),
        matrices: LayerMatrix::ALL
            .map(|matrix| format!("model.layers.{layer}.{}.weight", matrix.path())),
    }
}

/// `layers.3.self_attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`.
pub fn hf_name(path: &str) -> Result<String, UnknownParameter> {
    let unknown = || UnknownParameter(path.to_string());
    match path {
        "embed_tokens" => return Ok("model.embed_tokens.weight".into()),
        "norm.gamma" => return Ok("model.norm.weight".into()),
        "lm_head.weight" => return Ok("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = split_layer(path, "layers.").ok_or_else(unknown)?;
    if is_layer_matrix(rest) {
        return Ok(format!("model.layers.{layer}.{rest}"));
    }
    match rest.strip_suffix(".gamma") {
        Some(norm) if LAYER_NORMS.contains(&norm) => {
            Ok(format!("model.layers.{layer}.{norm}.weight"))
        }
        _ => Err(unknown()),
    }
}

/// The inverse of [`hf_name`].
pub fn distillery_path(hf_name: &str) -> Result<String, UnknownTensor> {
    let unknown = || UnknownTensor(hf_name.to_string());
    match hf_name {
        "model.embed_tokens.weight" => return Ok("embed_tokens".into()),
        "model.norm.weight" => return Ok("norm.gamma".into()),
        "lm_head.weight" => return Ok("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = split_layer(hf_name, "model.layers.").ok_or_else(unknown)?;
    if is_layer_matrix(rest) {
        return Ok(format!("layers.{layer}.{rest}"));
    }
    match rest.strip_suffix(".weight") {
        Some(norm) if LAYER_NORMS.contains(&norm) => Ok(format!("layers.{layer}.{norm}.gamma")),
        _ => Err(unknown()),
    }
}

fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_llama_parameter_maps_both_ways() {
        let mut paths = vec![
            "embed_tokens".to_string(),
            "norm.gamma".into(),
            "lm_head.weight".into(),
        ];
        for layer in [0, 11] {
            for matrix in LayerMatrix::ALL {
                paths.push(format!("layers.{layer}.{}.weight", matrix.path()));
            }
            for norm in LAYER_NORMS {
                paths.push(format!("layers.{layer}.{norm}.gamma"));
            }
        }
        for path in &paths {
            let hf = hf_name(path).unwrap();
            assert_eq!(&distillery_path(&hf).unwrap(), path);
        }
        assert_eq!(
            hf_name("layers.11.input_layernorm.gamma").unwrap(),
            "model.layers.11.input_layernorm.weight"
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(hf_name("layers.0.self_attn.rotary.weight").is_err());
        assert!(hf_name("layers.x.mlp.up_proj.weight").is_err());
        assert!(distillery_path("model.layers.0.self_attn.rotary_emb.inv_freq").is_err());
        assert!(distillery_path("transformer.wte.weight").is_err());
    }
}
