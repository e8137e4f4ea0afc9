"""Reads a folder written by `distillery export --format gptq` as GPTQ's v1 format defines it,
rebuilds the float weights in numpy, runs them in transformers' LlamaForCausalLM and measures
validation loss the way `distillery eval` does: an independent check of the GPTQ files.

    pip install torch transformers
    target/release/distillery quantize configs/shakespeare-student-distill.toml \
        --set quantize.method=gptq --set quantize.bits=4
    target/release/distillery export configs/shakespeare-student-distill.toml --format gptq \
        --checkpoint checkpoints/shakespeare-student-distill-gptq-4bit-g128 --out /tmp/student-gptq
    python3 scripts/check_gptq_export.py --gptq-dir /tmp/student-gptq \
        --tokens datasets/tinyshakespeare.txt.948e46352ab4.tokens

The format (AutoGPTQ's `QuantLinear`, `checkpoint_format = "gptq"`): `qweight` int32
`[in * bits / 32, out]` holds each output channel's codes as one little-endian bit stream down
its column; `qzeros` int32 `[groups, out * bits / 32]` holds each group's zeros minus one as a
bit stream along the outputs (read back as `(stored + 1) & (2^bits - 1)`); `scales` f16
`[groups, out]`; `g_idx` int32 `[in]` names each input's group; `w = scale * (q - zero)`.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from validation_split import evaluate_causal_lm, validation_windows


def bit_streams(words, bits, count):
    """Codes of `bits` bits from little-endian bit streams, one stream per row of `words`."""
    raw = np.ascontiguousarray(words.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, :count * bits]
    weights = (1 << np.arange(bits)).astype(np.int64)
    return stream.reshape(words.shape[0], count, bits).astype(np.int64) @ weights


def dequantize(tensors, prefix, bits):
    qweight = tensors[f"{prefix}.qweight"].view(np.uint32)
    qzeros = tensors[f"{prefix}.qzeros"].view(np.uint32)
    scales = tensors[f"{prefix}.scales"].astype(np.float32)
    g_idx = tensors[f"{prefix}.g_idx"].astype(np.int64)
    inputs, outputs = g_idx.shape[0], scales.shape[1]
    codes = bit_streams(qweight.T, bits, inputs)                      # [out, in]
    zeros = (bit_streams(qzeros, bits, outputs) + 1) & ((1 << bits) - 1)  # [groups, out]
    return scales[g_idx].T * (codes - zeros[g_idx].T)                  # [out, in]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gptq-dir", required=True)
    parser.add_argument("--tokens", required=True, help="a distillery token cache (.tokens)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    folder = Path(args.gptq_dir)
    config = json.loads((folder / "config.json").read_text())
    quantize_config = json.loads((folder / "quantize_config.json").read_text())
    assert config["quantization_config"] == quantize_config
    bits = quantize_config["bits"]
    tensors = load_file(folder / "model.safetensors")
    state = {}
    quantized = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")})
    for prefix in quantized:
        state[f"{prefix}.weight"] = torch.from_numpy(dequantize(tensors, prefix, bits))
    for name, values in tensors.items():
        if name.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx"):
            state[name] = torch.from_numpy(values.astype(np.float32))

    del config["quantization_config"]
    model = LlamaForCausalLM(LlamaConfig(**config)).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_head = ["lm_head.weight"] if config.get("tie_word_embeddings") else []
    assert list(missing) == tied_head and not unexpected, (missing, unexpected)
    model.eval()

    validation, windows = validation_windows(args.tokens, args.validation_fraction, args.seq_len)
    result = evaluate_causal_lm(model, validation, windows, args.seq_len, args.batch_size)
    print(json.dumps({"quantized_matrices": len(quantized), "bits": bits, **result}, indent=2))


if __name__ == "__main__":
    main()
