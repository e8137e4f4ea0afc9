"""Training throughput of distillery (burn-flex) against PyTorch on the same model, alternating
the two so both see the same machine load.

    cargo build --release
    pip install torch transformers
    python scripts/bench_vs_pytorch.py --rounds 5

The model is the `shakespeare-teacher` preset (4,262,144 parameters: 256 hidden, 4 layers,
4 heads, 704 intermediate, vocabulary 2048, untied head), batch 8 x 128 tokens, no dropout,
AdamW with gradient clipping, 2 threads.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def distillery(steps):
    output = subprocess.run(
        [
            str(ROOT / "target/release/distillery"),
            "bench", "train", str(ROOT / "configs/shakespeare-teacher.toml"),
            "--set", "train.batch_size=8", "--set", "model.dropout=0.0",
            "--set", "model.tie_word_embeddings=false",
            "--warmup", "3", "--steps", str(steps), "--json",
        ],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    return json.loads(output)["tokens_per_sec"]


def pytorch(steps, threads):
    output = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts/pytorch_train_bench.py"),
            "--threads", str(threads), "--batch-size", "8", "--seq-len", "128",
            "--warmup", "3", "--steps", str(steps),
        ],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["tokens_per_sec"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ours, theirs = [], []
    for round_index in range(args.rounds):
        ours.append(distillery(args.steps))
        theirs.append(pytorch(args.steps, args.threads))
        print(f"round {round_index + 1}: distillery {ours[-1]:.0f} tokens/s, "
              f"pytorch {theirs[-1]:.0f} tokens/s", flush=True)
    median_ours, median_theirs = statistics.median(ours), statistics.median(theirs)
    print(f"median: distillery {median_ours:.0f} tokens/s, pytorch {median_theirs:.0f} tokens/s, "
          f"ratio {median_ours / median_theirs:.2f}")


if __name__ == "__main__":
    main()
