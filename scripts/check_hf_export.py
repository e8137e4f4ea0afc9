"""Loads a folder written by `distillery export --format hf` with transformers and measures its
validation loss the way `distillery eval` does, as an independent check of the export.

    pip install torch transformers
    target/release/distillery export configs/shakespeare-student-distill.toml \
        --checkpoint checkpoints/shakespeare-student-distill --format hf --out /tmp/student-hf
    python3 scripts/check_hf_export.py --hf-dir /tmp/student-hf \
        --tokens datasets/tinyshakespeare.txt.948e46352ab4.tokens

The validation split is the last `--validation-fraction` of the token cache, cut into
non-overlapping windows of `--seq-len` predicted tokens, as distillery cuts it.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from validation_split import evaluate_causal_lm, validation_windows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--tokens", required=True, help="a distillery token cache (.tokens)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    validation, windows = validation_windows(args.tokens, args.validation_fraction, args.seq_len)

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.eval()
    result = evaluate_causal_lm(model, validation, windows, args.seq_len, args.batch_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
