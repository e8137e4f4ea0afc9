"""Forward throughput of the SmolLM2 teacher (the pass `eval` and the teacher cache make) in
distillery against transformers on the same float weights, alternating the two so both see
the same machine load.

    scripts/fetch-smollm2.sh && cargo build --release
    pip install torch transformers
    python3 scripts/forward_vs_transformers.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf

distillery scores the validation windows (256 tokens, 4 at a time) with the file's weights
dequantized to f32 (`--activations f32`); its rate is the one `eval --json` reports, over every
batch after the file is loaded. transformers runs distillery's Hugging Face export of the same
file (float32, sdpa attention, `torch.no_grad`) over the same windows, 4 at a time, timed after
one warm-up batch. 2 threads each.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_split import token_cache, validation_windows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/smollm2.toml"
SEQ_LEN = 256
BATCH = 4


def distillery_rate(binary, gguf, windows):
    scored = subprocess.run([binary, "eval", CONFIG, "--set", f"model.from={gguf}",
                             "--checkpoint", gguf, "--activations", "f32",
                             "--set", f"eval.max_windows={windows}",
                             "--set", f"eval.batch_size={BATCH}", "--json"],
                            check=True, capture_output=True, cwd=ROOT, text=True)
    [row] = json.loads(scored.stdout[scored.stdout.index("["):])
    return row["tokens_per_sec"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--distillery", default=str(ROOT / "target/release/distillery"))
    parser.add_argument("--windows", type=int, default=33)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gguf = Path(args.gguf).resolve()

    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        hf_dir = Path(work) / "hf"
        subprocess.run([args.distillery, "export", CONFIG, "--set", f"model.from={gguf}",
                        "--checkpoint", gguf, "--format", "hf", "--out", hf_dir],
                       check=True, capture_output=True, cwd=ROOT)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    validation, available = validation_windows(token_cache(model.config.vocab_size), 0.1, SEQ_LEN)
    windows = min(args.windows, available)
    batches = [torch.tensor(np.stack([validation[i * SEQ_LEN:(i + 1) * SEQ_LEN]
                                      for i in range(first, min(first + BATCH, windows))]))
               for first in range(0, windows, BATCH)]

    def transformers_rate():
        with torch.no_grad():
            model(input_ids=batches[0])
            started = time.time()
            for batch in batches[1:]:
                model(input_ids=batch)
            seconds = time.time() - started
        return sum(batch.numel() for batch in batches[1:]) / seconds

    ours, theirs = [], []
    for round_index in range(args.rounds):
        ours.append(distillery_rate(args.distillery, gguf, windows))
        theirs.append(transformers_rate())
        print(f"round {round_index + 1}: distillery {ours[-1]:.0f} tokens/s, transformers "
              f"{theirs[-1]:.0f} tokens/s", flush=True)
    report = {
        "windows": windows,
        "seq_len": SEQ_LEN,
        "batch": BATCH,
        "threads": args.threads,
        "torch": torch.__version__,
        "distillery_tokens_per_sec": statistics.median(ours),
        "transformers_tokens_per_sec": statistics.median(theirs),
    }
    report["ratio"] = report["distillery_tokens_per_sec"] / report["transformers_tokens_per_sec"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
