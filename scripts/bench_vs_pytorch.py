"""Training throughput and peak memory of distillery (burn-flex) against PyTorch on the same
model, alternating the two so both see the same machine load.

    cargo build --release
    pip install torch transformers
    python scripts/bench_vs_pytorch.py --rounds 5
    scripts/fetch-smollm2.sh && python scripts/bench_vs_pytorch.py --model smollm2-student

`--model shakespeare-teacher` (the default) is that preset: 4,262,144 parameters (256 hidden,
4 layers, 4 heads, 704 intermediate, vocabulary 2048, untied head), batch 8 x 128 tokens.
`--model smollm2-student` is `configs/smollm2-student.toml` with an untied head: SmolLM2's
width with 4 of its layers (576 hidden, 9 heads, 3 key/value heads, 1536 intermediate,
vocabulary 49,152), 70,784,064 parameters, batch 4 x 256 tokens. Both without dropout, AdamW
with gradient clipping, 2 threads.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    "shakespeare-teacher": {
        "config": "configs/shakespeare-teacher.toml",
        "overrides": ["train.batch_size=8", "model.dropout=0.0", "model.tie_word_embeddings=false"],
        "pytorch": ["--batch-size", "8", "--seq-len", "128"],
    },
    "smollm2-student": {
        "config": "configs/smollm2-student.toml",
        "overrides": ["model.tie_word_embeddings=false"],
        "pytorch": ["--batch-size", "4", "--seq-len", "256", "--vocab-size", "49152",
                    "--hidden-size", "576", "--intermediate-size", "1536", "--layers", "4",
                    "--heads", "9", "--kv-heads", "3"],
    },
}


def distillery(model, warmup, steps):
    overrides = [arg for key in model["overrides"] for arg in ("--set", key)]
    output = subprocess.run(
        [
            str(ROOT / "target/release/distillery"),
            "bench", "train", str(ROOT / model["config"]), *overrides,
            "--warmup", str(warmup), "--steps", str(steps), "--json",
        ],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    return json.loads(output)


def pytorch(model, warmup, steps, threads):
    output = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts/pytorch_train_bench.py"),
            "--threads", str(threads), *model["pytorch"],
            "--warmup", str(warmup), "--steps", str(steps),
        ],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="shakespeare-teacher")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = MODELS[args.model]
    ours, theirs = [], []
    for round_index in range(args.rounds):
        ours.append(distillery(model, args.warmup, args.steps))
        theirs.append(pytorch(model, args.warmup, args.steps, args.threads))
        print(f"round {round_index + 1}: distillery {ours[-1]['tokens_per_sec']:.0f} tokens/s "
              f"({ours[-1]['parameters']:,} parameters, peak {ours[-1]['peak_rss_mib']:.0f} MiB), "
              f"pytorch {theirs[-1]['tokens_per_sec']:.0f} tokens/s ({theirs[-1]['parameters']:,}, "
              f"peak {theirs[-1]['peak_rss_mib']:.0f} MiB)", flush=True)
    median_ours = statistics.median(run["tokens_per_sec"] for run in ours)
    median_theirs = statistics.median(run["tokens_per_sec"] for run in theirs)
    print(f"median: distillery {median_ours:.0f} tokens/s, pytorch {median_theirs:.0f} tokens/s, "
          f"ratio {median_ours / median_theirs:.2f}; peak memory distillery "
          f"{max(run['peak_rss_mib'] for run in ours):.0f} MiB, pytorch "
          f"{max(run['peak_rss_mib'] for run in theirs):.0f} MiB")


if __name__ == "__main__":
    main()
