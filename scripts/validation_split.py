"""distillery's validation split, read from a token cache, for the scripts that check exported
files against `distillery eval`."""

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def token_cache(vocab_size, tokenizer_sha256=None):
    """The newest Shakespeare token cache that distillery wrote for a tokenizer of `vocab_size`
    tokens (and of that sha256, as distillery records it, when one is given)."""
    caches = []
    for path in ROOT.glob("datasets/tinyshakespeare.txt.*.tokens"):
        header = json.loads(Path(str(path) + ".json").read_text())
        if header["vocab_size"] == vocab_size and tokenizer_sha256 in (None, header["tokenizer_sha256"]):
            caches.append(path)
    if not caches:
        sys.exit(f"no token cache of a {vocab_size}-token vocabulary; run `distillery bench generate` once")
    return max(caches, key=lambda path: path.stat().st_mtime)


def read_tokens(tokens_path):
    """Every token of a token cache (`.tokens` with its `.tokens.json` header)."""
    header = json.loads(Path(str(tokens_path) + ".json").read_text())
    dtype = {2: "<u2", 4: "<u4"}[header["id_bytes"]]
    tokens = np.fromfile(tokens_path, dtype=dtype).astype(np.int64)
    assert len(tokens) == header["num_tokens"], "the token cache does not match its header"
    return tokens


def validation_windows(tokens_path, validation_fraction, seq_len):
    """The validation tail of a token cache and how many non-overlapping windows of `seq_len`
    predicted tokens it holds."""
    tokens = read_tokens(tokens_path)
    # Rust's f64::round rounds halves away from zero.
    validation_len = int(math.floor(len(tokens) * validation_fraction + 0.5))
    validation = tokens[len(tokens) - validation_len:]
    return validation, (len(validation) - 1) // seq_len


def evaluate_causal_lm(model, validation, windows, seq_len, batch_size):
    """Validation loss, perplexity and top-1 accuracy of a transformers causal LM over the
    windows, as `distillery eval` computes them."""
    import torch

    loss_sum, correct, positions = 0.0, 0, 0
    with torch.no_grad():
        for first in range(0, windows, batch_size):
            batch = [
                validation[index * seq_len:index * seq_len + seq_len + 1]
                for index in range(first, min(first + batch_size, windows))
            ]
            batch = torch.tensor(np.stack(batch))
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(input_ids=inputs).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            correct += (logits.argmax(-1) == targets).sum().item()
            positions += targets.numel()
    return metrics(loss_sum, correct, positions)


def metrics(loss_sum, correct, positions):
    """The numbers `distillery eval` reports, from summed losses and correct predictions."""
    loss = loss_sum / positions
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct / positions,
        "tokens": positions,
    }


def evaluate_llama_cpp(llm, validation, windows, seq_len):
    """Validation loss, perplexity and top-1 accuracy of a llama-cpp-python model over the
    windows, each evaluated from an empty context as `distillery eval` does, and the most likely
    next token at every position."""
    loss_sum, correct, predictions = 0.0, 0, []
    for index in range(windows):
        window = validation[index * seq_len:index * seq_len + seq_len + 1]
        inputs, targets = window[:-1].tolist(), window[1:]
        llm.reset()
        llm.eval(inputs)
        logits = np.asarray(llm.scores[:len(inputs)], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum -= log_probs[np.arange(len(targets)), targets].sum()
        predictions.extend(logits.argmax(axis=1).tolist())
        correct += int((logits.argmax(axis=1) == targets).sum())
    return metrics(loss_sum, correct, windows * seq_len), predictions
