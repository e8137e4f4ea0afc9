//! Any bytes as the `model.safetensors` of a quantized (GPTQ-layout) folder with a small valid
//! config end in a model or an error, never a panic.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{
  "model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 32,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
  "max_position_embeddings": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": true
}"#;

const QUANTIZE_CONFIG: &str = r#"{
  "bits": 4, "group_size": 16, "damp_percent": 0.01, "desc_act": false,
  "static_groups": false, "sym": true, "true_sequential": true, "model_name_or_path": null,
  "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"
}"#;

fn folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("quantized-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        std::fs::write(dir.join("quantize_config.json"), QUANTIZE_CONFIG).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = distillery_formats::quantized::load(dir, &burn::tensor::Device::flex());
});
