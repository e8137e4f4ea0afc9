"""Decoding speed of GGUF files in llama.cpp (llama-cpp-python), measured as `distillery bench
generate` measures distillery: greedy, a prompt of `--prompt-tokens` tokens from the start of
the validation split, then `--new-tokens` tokens one at a time; prefill time and decode
tokens/s, the median of `--runs` runs after one warm-up, 2 threads. Each new token is picked
by an arg max over its logits, as distillery's greedy decoding does.

    pip install llama-cpp-python
    python3 scripts/bench_llama_cpp.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --tokens datasets/tinyshakespeare.txt.<hash>.tokens
"""

import argparse
import json
import statistics
import time

import numpy as np
from llama_cpp import Llama

from validation_split import validation_windows


def bench(path, prompt, new_tokens, runs, threads):
    # llama-cpp-python keeps the logits of n_batch positions, so a prompt longer than one
    # batch of 512 has no row for its last position: one batch holds the whole context.
    context = len(prompt) + new_tokens + 1
    llm = Llama(model_path=path, n_ctx=context, n_batch=max(512, context),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    prefill, decode = [], []
    for run in range(runs + 1):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first_token = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        finished = time.perf_counter()
        if run > 0:
            prefill.append((first_token - started) * 1e3)
            decode.append((new_tokens - 1) / (finished - first_token))
    return {
        "model": path,
        "prompt_tokens": len(prompt),
        "prefill_ms": statistics.median(prefill),
        "new_tokens": new_tokens,
        "decode_tokens_per_sec": statistics.median(decode),
        "runs": runs,
        "threads": threads,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", nargs="+", required=True)
    parser.add_argument("--tokens", required=True, help="a distillery token cache of the file's tokenizer")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    validation, _ = validation_windows(args.tokens, 0.1, args.prompt_tokens)
    prompt = validation[:args.prompt_tokens].tolist()
    reports = [bench(path, prompt, args.new_tokens, args.runs, args.threads) for path in args.gguf]
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
