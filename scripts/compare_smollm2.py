"""Compares distillery on SmolLM2-135M-Instruct (its Q4_1 GGUF file) with transformers and
llama.cpp on the same weights, in one sitting, for both of distillery's arithmetics:

- exact f32 activations (`--activations f32`) against transformers on the same dequantized
  weights (distillery's Hugging Face export of the file, loaded in float32): validation loss and
  top-1 accuracy on the same windows, and the greedy chat answer token for token;
- llama.cpp's arithmetic (`--activations int8`: activations rounded to int8 per 32 columns)
  against llama.cpp itself on the file (llama-cpp-python): validation loss on the same windows
  and top-1 agreement position by position.

    pip install torch transformers llama-cpp-python
    scripts/fetch-smollm2.sh
    python3 scripts/compare_smollm2.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --windows 40

The validation windows are distillery's (the last 10% of the token cache, windows of
`data.seq_len` predicted tokens), read from the token cache `distillery eval` builds.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from validation_split import evaluate_causal_lm, evaluate_llama_cpp, token_cache, validation_windows

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/smollm2.toml"
QUESTIONS = [
    "What is the capital of France?",
    "Write a short story about a dragon who learns to bake bread.",
]


def distillery(binary, *args):
    started = time.time()
    result = subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True,
                            cwd=ROOT)
    return result.stdout, time.time() - started


def llama_cpp_windows(gguf, validation, windows, seq_len, **settings):
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=seq_len + 1, n_batch=seq_len + 1, logits_all=True,
                n_threads=2, verbose=False, **settings)
    return evaluate_llama_cpp(llm, validation, windows, seq_len)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--distillery", default=str(ROOT / "target/release/distillery"))
    parser.add_argument("--windows", type=int, default=40, help="validation windows compared")
    parser.add_argument("--seq-len", type=int, default=256, help="configs/smollm2.toml's data.seq_len")
    args = parser.parse_args()
    gguf = Path(args.gguf).resolve()
    common = [CONFIG, "--set", f"model.from={gguf}", "--set", f"eval.max_windows={args.windows}"]
    report = {"windows": args.windows, "seq_len": args.seq_len}

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # distillery, both arithmetics.
        for activations in ["f32", "int8"]:
            predictions = work / f"predictions-{activations}.json"
            out, seconds = distillery(args.distillery, "eval", *common, "--checkpoint", gguf, "--json",
                                      "--activations", activations, "--predictions", predictions)
            row = json.loads(out)[0]
            report[f"distillery_{activations}"] = {
                "loss": row["loss"], "accuracy": row["accuracy"], "tokens": row["tokens"],
                "seconds": round(seconds, 1)}
            report[f"distillery_{activations}"]["predictions"] = json.loads(predictions.read_text())[0]
        chats = {}
        for question in QUESTIONS:
            for activations in ["f32", "int8"]:
                out, _ = distillery(args.distillery, "generate", *common, "--checkpoint", gguf, "--chat",
                                    question, "--temperature", "0", "--max-new-tokens", "64",
                                    "--activations", activations, "--json")
                chats[question, activations] = json.loads(out)

        validation, available = validation_windows(token_cache(49152), 0.1, args.seq_len)
        windows = min(args.windows, available)

        # transformers on the dequantized weights.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf_dir = work / "hf"
        distillery(args.distillery, "export", *common, "--checkpoint", gguf, "--format", "hf", "--out", hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model.eval()
        started = time.time()
        transformers_eval = evaluate_causal_lm(model, validation, windows, args.seq_len, 4)
        transformers_eval["seconds"] = round(time.time() - started, 1)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        transformers_chats = {}
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, return_tensors="pt")
            if not isinstance(prompt, torch.Tensor):
                prompt = prompt["input_ids"]
            with torch.no_grad():
                generated = model.generate(prompt, max_new_tokens=64, do_sample=False,
                                           eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
            transformers_chats[question] = generated[0, prompt.shape[1]:].tolist()

        # llama.cpp on the file.
        started = time.time()
        llama_eval, llama_predictions = llama_cpp_windows(gguf, validation, windows, args.seq_len)
        llama_eval["seconds"] = round(time.time() - started, 1)
        # llama.cpp against itself with only its KV cache's precision changed (f16 to f32): how
        # far top-1 agreement moves under a rounding change that leaves the loss all but equal.
        llama_f32_kv, llama_f32_kv_predictions = llama_cpp_windows(
            gguf, validation, windows, args.seq_len, type_k=0, type_v=0)

    f32 = report["distillery_f32"]
    int8 = report["distillery_int8"]
    int8_predictions = np.array(int8.pop("predictions")[:1000])
    f32_predictions = np.array(f32.pop("predictions")[:1000])
    agreement = np.mean(int8_predictions == np.array(llama_predictions[:1000]))
    f32_agreement_llama = np.mean(f32_predictions == np.array(llama_predictions[:1000]))
    report["int8_top1_agreement_with_f32_first_1000"] = float(np.mean(int8_predictions == f32_predictions))
    report["transformers_f32"] = transformers_eval
    report["llama_cpp"] = llama_eval
    report["f32_vs_transformers_loss_relative"] = abs(f32["loss"] / transformers_eval["loss"] - 1)
    report["int8_vs_llama_cpp_loss_relative"] = abs(int8["loss"] / llama_eval["loss"] - 1)
    report["int8_top1_agreement_with_llama_cpp_first_1000"] = float(agreement)
    report["llama_cpp_f32_kv_cache"] = {"loss": llama_f32_kv["loss"], "accuracy": llama_f32_kv["accuracy"]}
    report["llama_cpp_top1_agreement_with_its_f32_kv_cache_first_1000"] = float(
        np.mean(np.array(llama_predictions[:1000]) == np.array(llama_f32_kv_predictions[:1000])))
    report["f32_top1_agreement_with_llama_cpp_first_1000"] = float(f32_agreement_llama)
    report["chat"] = [{
        "question": question,
        "distillery_f32": chats[question, "f32"]["text"],
        "distillery_int8": chats[question, "int8"]["text"],
        "transformers": tokenizer.decode(transformers_chats[question], skip_special_tokens=True),
        "f32_tokens_equal_transformers": chats[question, "f32"]["tokens"] == transformers_chats[question],
        "tokens_compared": len(transformers_chats[question]),
    } for question in QUESTIONS]
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
