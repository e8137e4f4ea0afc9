"""Runs a GGUF file written by `distillery export --format gguf` in llama.cpp (through the
llama-cpp-python bindings): checks that llama.cpp tokenizes text as the shipped tokenizer does,
and measures validation loss the way `distillery eval` does.

    pip install llama-cpp-python tokenizers     # llama-cpp-python builds llama.cpp (~10 min)
    target/release/distillery export configs/shakespeare-student-distill.toml \
        --checkpoint checkpoints/shakespeare-student-distill --format gguf --type q8_0 \
        --out /tmp/student-q8_0.gguf
    python3 scripts/check_gguf_llama_cpp.py --gguf /tmp/student-q8_0.gguf \
        --tokens datasets/tinyshakespeare.txt.948e46352ab4.tokens

Validation windows: the last `--validation-fraction` of the token cache, non-overlapping windows
of `--seq-len` predicted tokens, as distillery cuts them.
"""

import argparse
import json
from pathlib import Path

from llama_cpp import Llama
from tokenizers import Tokenizer

from validation_split import evaluate_llama_cpp, validation_windows

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--tokens", required=True, help="a distillery token cache (.tokens)")
    parser.add_argument("--tokenizer", default=str(ROOT / "datasets/shakespeare-bpe-2048.json"))
    parser.add_argument("--corpus", default=str(ROOT / "datasets/tinyshakespeare.txt"))
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=None, help="evaluate only the first N")
    args = parser.parse_args()

    llm = Llama(model_path=args.gguf, n_ctx=args.seq_len + 1, n_batch=args.seq_len + 1,
                logits_all=True, n_threads=2, verbose=False)

    # Tokenization: llama.cpp against the tokenizer.json, on the corpus's first 20,000 characters.
    reference = Tokenizer.from_file(args.tokenizer)
    sample = Path(args.corpus).read_text()[:20000]
    ours = reference.encode(sample).ids
    theirs = llm.tokenize(sample.encode(), add_bos=False, special=False)
    same_tokens = ours == theirs

    validation, windows = validation_windows(args.tokens, args.validation_fraction, args.seq_len)
    if args.windows is not None:
        windows = min(windows, args.windows)

    result, _ = evaluate_llama_cpp(llm, validation, windows, args.seq_len)
    print(json.dumps({"tokenization_matches": same_tokens, "tokens_compared": len(ours)} | result,
                     indent=2))


if __name__ == "__main__":
    main()
