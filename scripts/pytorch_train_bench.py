"""Training throughput of the same Llama in PyTorch + transformers, for comparison with
`distillery bench train`.

    python scripts/pytorch_train_bench.py --threads 2 --batch-size 8 --seq-len 128
    python scripts/pytorch_train_bench.py --device cuda --dtype bf16 --hidden-size 768 \
        --intermediate-size 2048 --layers 14 --heads 12 --batch-size 8 --seq-len 256

Same shape as the `shakespeare-teacher` preset by default, the same optimizer (AdamW) and the
same timing rule (steps timed after warm-up, forward + backward + clip + update; on a GPU the
clock stops after the device has finished the step). `--dtype bf16` stores and computes
parameters and activations in bf16, as distillery's `run.dtype = "bf16"` does.
"""

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=704)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=args.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1)).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    durations = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        durations.append(time.perf_counter() - started)
    total = sum(durations)
    print(json.dumps({
        "torch": torch.__version__,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": args.batch_size * args.seq_len,
        "tokens_per_sec": args.batch_size * args.seq_len * args.steps / total,
        "step_ms_mean": 1e3 * total / args.steps,
        # Linux reports the peak resident set in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
