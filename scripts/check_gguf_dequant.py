"""Checks distillery's dequantization of GGUF tensors against the `gguf` Python package's,
bit for bit: every tensor of a GGUF file goes through `distillery export --format hf` (the
model's weights as f32 safetensors) and through `gguf.quants.dequantize`, and the two must hold
the same float bits (query and key rows moved to Hugging Face's rotary order, as the export
does).

Two files: the one given (SmolLM2-135M-Instruct's Q4_1 file holds Q4_1, Q8_0 and F32 tensors),
and a small Llama written here whose matrices cover every type distillery reads: F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (quantized by gguf from random weights) and Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K (random blocks with small positive scales).

    pip install gguf safetensors
    scripts/fetch-smollm2.sh
    python3 scripts/check_gguf_dequant.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from gguf_fields import copy_fields

ROOT = Path(__file__).resolve().parent.parent

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, short, _ = name.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[short]}.weight"


def rotate_half_rows(matrix, heads):
    """llama.cpp's interleaved rotary rows to Hugging Face's rotate-half order."""
    rows, cols = matrix.shape
    half = rows // heads // 2
    return matrix.reshape(heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def check(binary, path, work):
    out = work / (path.stem + "-hf")
    subprocess.run([binary, "export", str(ROOT / "configs/smollm2.toml"), "--set", f"model.from={path}",
                    "--checkpoint", str(path), "--format", "hf", "--out", str(out)],
                   check=True, capture_output=True)
    exported = load_file(str(out / "model.safetensors"))
    reader = gguf.GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    mismatches, by_type = 0, {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if ".attn_q." in tensor.name:
            values = rotate_half_rows(values, heads)
        elif ".attn_k." in tensor.name:
            values = rotate_half_rows(values, kv_heads)
        ours = exported[hf_name(tensor.name)]
        same = ours.shape == values.shape and np.array_equal(ours.view(np.uint32), values.view(np.uint32))
        kind = tensor.tensor_type.name
        count, equal = by_type.get(kind, (0, 0))
        by_type[kind] = (count + 1, equal + int(same))
        if not same:
            mismatches += 1
            print(f"  {tensor.name} ({kind}): DIFFERENT")
    summary = ", ".join(f"{kind} {equal}/{count}" for kind, (count, equal) in sorted(by_type.items()))
    print(f"{path.name}: {len(reader.tensors)} tensors, bit-identical by type: {summary}")
    return mismatches == 0


def small_llama(source, path, seed=7):
    """A two-layer Llama (hidden 256, feed-forward 512) whose tensors cover every readable type;
    the tokenizer is `source`'s."""
    rng = np.random.default_rng(seed)
    source_reader = gguf.GGUFReader(str(source))
    vocab = len(source_reader.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(str(path), "llama")
    hidden, ffn, heads, kv_heads, layers = 256, 512, 4, 2, 2
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    copy_fields(source_reader, writer, lambda key: key.startswith("tokenizer."))

    def k_blocks(kind, rows, cols):
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        blocks = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
        halves = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[kind]
        for at in halves:
            scales = (rng.random((rows, cols // block_values)) * 0.05 + 0.001).astype(np.float16)
            blocks[:, :, at:at + 2] = scales.view(np.uint8).reshape(rows, cols // block_values, 2)
        return blocks.reshape(rows, -1)

    def add(name, kind, rows, cols):
        if kind in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            data = k_blocks(kind, rows, cols)
        else:
            values = rng.normal(0.0, 0.05, size=(rows, cols)).astype(np.float32)
            data = values if kind == Q.F32 else gguf.quants.quantize(values, kind)
        writer.add_tensor(name, data, raw_dtype=kind)

    add("token_embd.weight", Q.Q6_K, vocab, hidden)
    add("output.weight", Q.Q5_K, vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    kinds = [[Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K],
             [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.Q4_0, Q.Q6_K]]
    kv = hidden // heads * kv_heads
    for layer in range(layers):
        shapes = [("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                  ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                  ("ffn_down", hidden, ffn)]
        for (short, rows, cols), kind in zip(shapes, kinds[layer]):
            add(f"blk.{layer}.{short}.weight", kind, rows, cols)
        norm = rng.normal(1.0, 0.1, size=hidden).astype(np.float32)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", norm)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", norm.astype(np.float16), raw_dtype=Q.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--distillery", default=str(ROOT / "target/release/distillery"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        synthetic = work / "every-type.gguf"
        small_llama(args.gguf, synthetic)
        ok = check(args.distillery, Path(args.gguf), work)
        ok &= check(args.distillery, synthetic, work)
    print("every tensor bit-identical" if ok else "DIFFERENCES FOUND")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
