//! Fixtures for the crate's tests.

use crate::TextTokenizer;

/// A byte-level tokenizer with ChatML's special tokens and SmolLM2's chat template.
pub fn chatml_tokenizer(dir: &std::path::Path) -> TextTokenizer {
    let tokenizer = TextTokenizer::train_bpe(
        &{
            let corpus = dir.join("corpus.txt");
            std::fs::write(
                &corpus,
                "hello there, how are you? fine thanks.\n".repeat(30),
            )
            .unwrap();
            corpus
        },
        300,
    )
    .unwrap();
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    for (id, content) in [(300, "<|im_start|>"), (301, "<|im_end|>")] {
        added.push(
            serde_json::json!({"id": id, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    std::fs::write(&path, json.to_string()).unwrap();
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        {{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}\
        {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}\
        {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let config = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    TextTokenizer::load(&path).unwrap()
}
