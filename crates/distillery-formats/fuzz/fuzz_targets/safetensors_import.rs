//! Any bytes as the `model.safetensors` of a Hugging Face folder with a small valid config end
//! in a model or an error, never a panic.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{
  "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
  "max_position_embeddings": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": true
}"#;

fn folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("safetensors-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = distillery_formats::hf::import(dir, &burn::tensor::Device::flex());
});
