"""distillery's GPTQ against GPTQ in PyTorch on SmolLM2-135M-Instruct, in one sitting: the
same weights, 4-bit symmetric grids in groups of 128 columns, 128 calibration windows of 128
tokens from the Shakespeare training split, true-sequential, block size 128, damp 1%, 2 threads.

The PyTorch side follows the procedure of the reference implementation (Frantar et al.,
`gptq.py` with its `llama.py` driver), re-written here on transformers' Llama: layer by layer;
inside a layer, the sublayer groups (q,k,v; o; gate,up; down) in turn, each linear layer's
Hessian summed by a forward hook while the windows go through the layer one at a time; the
dampened Hessian's Cholesky factor, its inverse and that inverse's upper factor; columns
quantized one by one inside blocks of 128 with lazy updates of the rest; each group's grids
fitted when quantization reaches it. Both models are then scored on the validation split, the
PyTorch one by transformers and distillery's by `distillery quantize` itself.

    scripts/fetch-smollm2.sh && cargo build --release
    pip install torch transformers
    python3 scripts/gptq_vs_pytorch.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_split import (  # noqa: E402
    evaluate_causal_lm, read_tokens, token_cache, validation_windows)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/smollm2.toml"
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def distillery(binary, *args):
    result = subprocess.run([binary, *map(str, args)], check=True, capture_output=True,
                            text=True, cwd=ROOT)
    return result.stdout


class Grid:
    """Per-row grids of `bits` bits over a block of columns: symmetric around zero, or spanning
    each row's range; zero is always a grid point."""

    def __init__(self, weights, bits, symmetric):
        import torch
        top = 2 ** bits - 1
        low = torch.minimum(weights.min(dim=1).values, torch.zeros(1))
        high = torch.maximum(weights.max(dim=1).values, torch.zeros(1))
        if symmetric:
            high = torch.maximum(low.abs(), high)
            low = torch.where(low < 0, -high, low)
        empty = (low == 0) & (high == 0)
        low[empty], high[empty] = -1.0, 1.0
        self.scale = ((high - low) / top).unsqueeze(1)
        if symmetric:
            self.zero = torch.full_like(self.scale, (top + 1) / 2)
        else:
            self.zero = torch.round(-low / self.scale.squeeze(1)).unsqueeze(1)
        self.top = top

    def round(self, column):
        import torch
        scale, zero = self.scale.squeeze(1), self.zero.squeeze(1)
        code = torch.clamp(torch.round(column / scale) + zero, 0, self.top)
        return scale * (code - zero)


class HessianHook:
    """`2/N Σ x xᵀ` over the inputs a linear layer sees, N counting windows."""

    def __init__(self, columns):
        import torch
        self.hessian = torch.zeros(columns, columns)
        self.windows = 0

    def __call__(self, module, inputs, output):
        x = inputs[0].detach()
        count = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t().float()
        self.hessian *= self.windows / (self.windows + count)
        self.windows += count
        x = math.sqrt(2 / self.windows) * x
        self.hessian += x @ x.t()


def quantize_linear(linear, hessian, bits, group_size, block_size, damp, symmetric):
    import torch
    weights = linear.weight.data.clone().float()
    columns = weights.shape[1]
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weights[:, dead] = 0
    hessian[range(columns), range(columns)] += damp * torch.mean(torch.diag(hessian))
    factor = torch.linalg.cholesky(hessian)
    factor = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    rounded = torch.zeros_like(weights)
    grid = None
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weights[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_factor = factor[start:end, start:end]
        for offset in range(end - start):
            column = start + offset
            # As in the reference, a grid is fitted on the matrix outside the block being
            # quantized: up to date when groups start on block boundaries, as here.
            if column % group_size == 0:
                grid = Grid(weights[:, column:column + group_size], bits, symmetric)
            value = block[:, offset]
            quantized = grid.round(value)
            rounded[:, column] = quantized
            error = (value - quantized) / block_factor[offset, offset]
            block[:, offset:] -= error.unsqueeze(1) @ block_factor[offset, offset:].unsqueeze(0)
            errors[:, offset] = error
        weights[:, end:] -= errors @ factor[start:end, end:]
    linear.weight.data = rounded.to(linear.weight.dtype)


def pytorch_gptq(model, windows, bits, group_size, block_size, damp, symmetric):
    """Quantizes `model` in place; returns the seconds it took."""
    import torch
    started = time.time()
    with torch.no_grad():
        hidden = [model.model.embed_tokens(window.unsqueeze(0)) for window in windows]
        positions = torch.arange(windows.shape[1]).unsqueeze(0)
        rotary = model.model.rotary_emb(hidden[0], positions)

        def run(layer, x):
            out = layer(x, attention_mask=None, position_ids=positions,
                        position_embeddings=rotary)
            return out[0] if isinstance(out, tuple) else out

        for layer in model.model.layers:
            modules = dict(layer.named_modules())
            for group in GROUPS:
                hooks = {name: HessianHook(modules[name].in_features) for name in group}
                handles = [modules[name].register_forward_hook(hook)
                           for name, hook in hooks.items()]
                for x in hidden:
                    run(layer, x)
                for handle in handles:
                    handle.remove()
                for name, hook in hooks.items():
                    quantize_linear(modules[name], hook.hessian, bits, group_size, block_size,
                                    damp, symmetric)
            hidden = [run(layer, x) for x in hidden]
    return time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--distillery", default=str(ROOT / "target/release/distillery"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window-tokens", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    args = parser.parse_args()
    gguf = Path(args.gguf).resolve()
    common = [CONFIG, "--set", f"model.from={gguf}"]
    report = {"settings": vars(args)}

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        out = distillery(
            args.distillery, "quantize", *common, "--json",
            "--set", f"run.checkpoint_dir={work}",
            "--set", "quantize.method=gptq", "--set", f"quantize.bits={args.bits}",
            "--set", f"quantize.group_size={args.group_size}",
            "--set", f"quantize.nsamples={args.windows}",
            "--set", f"quantize.seqlen={args.window_tokens}")
        ours = json.loads(out)
        float_model, quantized_model = ours["models"]
        report["distillery"] = {
            "seconds": ours["seconds"],
            "float_perplexity": float_model["perplexity"],
            "perplexity": quantized_model["perplexity"],
            "increase": quantized_model["perplexity"] / float_model["perplexity"] - 1,
        }
        print(f"distillery: {ours['seconds']:.1f} s, perplexity {float_model['perplexity']:.3f}"
              f" -> {quantized_model['perplexity']:.3f}", flush=True)

        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(args.threads)
        hf_dir = work / "hf"
        distillery(args.distillery, "export", *common, "--checkpoint", gguf, "--format", "hf",
                   "--out", hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model.eval()
        cache = token_cache(model.config.vocab_size)
        validation, available = validation_windows(cache, 0.1, args.eval_seq_len)
        tokens = read_tokens(cache)
        train = tokens[:len(tokens) - len(validation)]
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(train) - args.window_tokens, size=args.windows)
        windows = torch.tensor(np.stack([train[s:s + args.window_tokens] for s in starts]))
        before = evaluate_causal_lm(model, validation, available, args.eval_seq_len, 4)
        seconds = pytorch_gptq(model, windows, args.bits, args.group_size, 128, 0.01, True)
        after = evaluate_causal_lm(model, validation, available, args.eval_seq_len, 4)
        report["pytorch"] = {
            "seconds": seconds,
            "float_perplexity": before["perplexity"],
            "perplexity": after["perplexity"],
            "increase": after["perplexity"] / before["perplexity"] - 1,
            "torch": torch.__version__,
        }
        print(f"pytorch: {seconds:.1f} s, perplexity {before['perplexity']:.3f}"
              f" -> {after['perplexity']:.3f}", flush=True)

    report["speedup"] = report["pytorch"]["seconds"] / report["distillery"]["seconds"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
