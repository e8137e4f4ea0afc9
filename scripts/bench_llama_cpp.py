"""Decoding speed of GGUF files in llama.cpp (llama-cpp-python), measured as `distillery bench
generate` measures distillery: greedy, a prompt of `--prompt-tokens` tokens from the start of
the validation split, then `--new-tokens` tokens one at a time; prefill time and decode
tokens/s, the median of `--runs` runs after one warm-up, 2 threads. Each new token is picked
by an arg max over its logits, as distillery's greedy decoding does.

    pip install llama-cpp-python
    python3 scripts/bench_llama_cpp.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --tokens datasets/tinyshakespeare.txt.<hash>.tokens

With `--batch N` it measures as `distillery bench generate --batch N` does: the same N prompts
of the validation split, greedy, decoded one prompt at a time and then as one batch of N
sequences (one llama_decode per step over every sequence's new token, a unified KV cache),
the two taking turns for `--runs` rounds after a warm-up of each. Decoding tokens/s leave out
the prompts' reading (the time up to each prompt's first token).
"""

import argparse
import json
import statistics
import time

import llama_cpp
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


def batch_prompts(validation, batch, prompt_tokens):
    """The prompts of `distillery bench generate --batch`: the i-th starts at i * prompt_tokens
    and is prompt_tokens - i % ceil(prompt_tokens / 2) tokens long."""
    half = (prompt_tokens + 1) // 2
    return [validation[index * prompt_tokens:index * prompt_tokens + prompt_tokens - index % half].tolist()
            for index in range(batch)]


class Sequences:
    """A llama.cpp context of `count` sequences with one unified KV cache, decoded greedily."""

    def __init__(self, path, count, context, threads):
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context
        params.n_batch = context
        params.n_ubatch = context
        params.n_seq_max = count
        params.kv_unified = True
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(context, 0, 1)

    def close(self):
        """Frees the batch, the context and the model, so a run over several files holds one."""
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, entries):
        """Decodes (sequence, position, token, wants_logits) entries in one call; returns the
        arg max of each entry that wants logits, in order."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for index, (sequence, position, token, wants) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = wants
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        picks = []
        for index, (_, _, _, wants) in enumerate(entries):
            if wants:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.vocab,))
                picks.append(int(np.argmax(logits)))
        return picks


def bench_batch(path, prompts, new_tokens, runs, threads):
    context = sum(len(prompt) for prompt in prompts) + len(prompts) * (new_tokens + 1)
    sequences = Sequences(path, len(prompts), context, threads)

    def alone():
        started, reading, outputs = time.perf_counter(), 0.0, []
        for prompt in prompts:
            sequences.clear()
            prompt_started = time.perf_counter()
            last = len(prompt) - 1
            [token] = sequences.decode([(0, at, t, at == last) for at, t in enumerate(prompt)])
            reading += time.perf_counter() - prompt_started
            output = [token]
            for position in range(len(prompt), len(prompt) + new_tokens - 1):
                [token] = sequences.decode([(0, position, token, True)])
                output.append(token)
            outputs.append(output)
        return time.perf_counter() - started, reading, outputs

    def batched():
        sequences.clear()
        started = time.perf_counter()
        # Each prompt is read in its own call, as one sequence of the batch.
        outputs = []
        for sequence, prompt in enumerate(prompts):
            last = len(prompt) - 1
            outputs.append(sequences.decode([(sequence, at, t, at == last) for at, t in enumerate(prompt)]))
        reading = time.perf_counter() - started
        for step in range(new_tokens - 1):
            picks = sequences.decode([(sequence, len(prompt) + step, outputs[sequence][-1], True)
                                      for sequence, prompt in enumerate(prompts)])
            for output, token in zip(outputs, picks):
                output.append(token)
        return time.perf_counter() - started, reading, outputs

    decoded = (new_tokens - 1) * len(prompts)
    total = new_tokens * len(prompts)
    alone_speeds, batched_speeds, same = [], [], []
    alone_decode, batched_decode = [], []
    try:
        _, _, reference = alone()
        batched()
        for _ in range(max(runs, 1)):
            seconds, reading, _ = alone()
            alone_speeds.append(total / seconds)
            alone_decode.append(decoded / (seconds - reading))
            seconds, reading, outputs = batched()
            batched_speeds.append(total / seconds)
            batched_decode.append(decoded / (seconds - reading))
            same.append(sum(output == own for output, own in zip(outputs, reference)))
    finally:
        sequences.close()
    return {
        "model": path,
        "batch": len(prompts),
        "prompt_tokens": [len(prompt) for prompt in prompts],
        "new_tokens": new_tokens,
        "alone_tokens_per_sec": statistics.median(alone_speeds),
        "batched_tokens_per_sec": statistics.median(batched_speeds),
        "alone_decode_tokens_per_sec": statistics.median(alone_decode),
        "batched_decode_tokens_per_sec": statistics.median(batched_decode),
        "decode_speedup": statistics.median(batched_decode) / statistics.median(alone_decode),
        "decode_speedups": [b / a for a, b in zip(alone_decode, batched_decode)],
        "batched_outputs_equal_to_own": min(same),
        "runs": max(runs, 1),
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
    parser.add_argument("--batch", type=int, help="decode this many prompts one at a time and as one batch")
    args = parser.parse_args()
    validation, _ = validation_windows(args.tokens, 0.1, args.prompt_tokens)
    if args.batch:
        prompts = batch_prompts(validation, args.batch, args.prompt_tokens)
        reports = [bench_batch(path, prompts, args.new_tokens, args.runs, args.threads) for path in args.gguf]
        print(json.dumps(reports, indent=2))
        return
    prompt = validation[:args.prompt_tokens].tolist()
    reports = [bench(path, prompt, args.new_tokens, args.runs, args.threads) for path in args.gguf]
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
