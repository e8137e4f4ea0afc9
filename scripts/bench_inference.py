"""Decoding speed of distillery against llama.cpp on the same weights, in one sitting, and of
each quantized model against its own float model: the figures of
experiments/inference/RESULTS.md.

    python3 scripts/bench_inference.py [--rounds 2] [--runs 3] [--families auto avx2]

Prepares what is missing, once: SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh) written
again as F32, Q8_0 and Q4_0 GGUF files; the 31M model of configs/decode-bench-30m.toml,
trained, quantized to int8 and to 4 bits in groups of 32, and exported as F32, Q8_0 and Q4_0
GGUF. Then, `--rounds` times: `distillery bench generate` over every model under each kernel
family asked for (`auto` is the CPU's best; the others set DISTILLERY_KERNELS), and
scripts/bench_llama_cpp.py over every GGUF file. Each figure is the median over rounds of
each run's median; decode after a 32-token prompt, 128 new tokens, and prefill of
`--prefill-tokens` tokens, 2 threads. Prints a markdown table and the CPU's flags.

Needs target/release/distillery and llama-cpp-python.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_split import token_cache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "target/release/distillery"
BENCH = ROOT / "models/bench"
SMOLLM2 = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONFIG = "configs/smollm2.toml"
SMALL_CONFIG = "configs/decode-bench-30m.toml"
SMALL_RUN = ROOT / "checkpoints/decode-bench-30m"
SMALL_QUANTIZED = {
    "int8-g32": ["quantize.group_size=32"],
    "rtn-4bit-g32": ['quantize.method="rtn"', "quantize.bits=4", "quantize.group_size=32"],
}


def run(*args, env=None):
    result = subprocess.run([str(arg) for arg in args], cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True)
    return result.stdout


def distillery(*args, env=None):
    return run(BINARY, *args, env=env)


def settings(pairs):
    return [item for pair in pairs for item in ("--set", pair)]


def prepare():
    """Every model file the table measures, made where missing."""
    BENCH.mkdir(parents=True, exist_ok=True)
    if not SMOLLM2.is_file():
        run("bash", "scripts/fetch-smollm2.sh")
    smollm2 = {"F32": BENCH / "smollm2-f32.gguf", "Q8_0": BENCH / "smollm2-q8_0.gguf",
               "Q4_0": BENCH / "smollm2-q4_0.gguf"}
    for kind, path in smollm2.items():
        if not path.is_file():
            distillery("export", SMOLLM2_CONFIG, "--checkpoint", SMOLLM2, "--format", "gguf",
                       "--type", kind.lower(), "--out", path)
    smollm2["Q4_1"] = SMOLLM2
    # The most common download, made by llama.cpp's own quantizer (rows of 576 values are no
    # whole K-quant super-blocks, so most matrices fall back to Q5_0; ffn_down is Q4_K/Q6_K).
    smollm2["Q4_K_M"] = BENCH / "smollm2-q4_k_m.gguf"
    if not smollm2["Q4_K_M"].is_file():
        import ctypes
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        failed = llama_cpp.llama_model_quantize(str(smollm2["F32"]).encode(),
                                                str(smollm2["Q4_K_M"]).encode(), ctypes.byref(params))
        if failed:
            sys.exit("llama.cpp could not quantize SmolLM2 to Q4_K_M")
    if not (SMALL_RUN / "best").is_dir():
        distillery("train", SMALL_CONFIG)
    small = {"float": SMALL_RUN / "best"}
    for label, pairs in SMALL_QUANTIZED.items():
        path = ROOT / f"checkpoints/decode-bench-30m-{label}"
        if not path.is_dir():
            distillery("quantize", SMALL_CONFIG, *settings(pairs))
        small[label] = path
    small_gguf = {kind: BENCH / f"decode-30m-{kind.lower()}.gguf" for kind in ["F32", "Q8_0", "Q4_0"]}
    for kind, path in small_gguf.items():
        if not path.is_file():
            distillery("export", SMALL_CONFIG, "--checkpoint", small["float"], "--format", "gguf",
                       "--type", kind.lower(), "--out", path)
    return [
        ("SmolLM2-135M", SMOLLM2_CONFIG, smollm2, {}),
        ("decode-bench-30m", SMALL_CONFIG, small_gguf, small),
    ]


def distillery_speeds(config, models, family, prompt_tokens, new_tokens, runs):
    env = dict(os.environ)
    if family != "auto":
        env["DISTILLERY_KERNELS"] = family
    out = distillery("bench", "generate", config, "--checkpoint", *models, "--runs", runs,
                     "--prompt-tokens", prompt_tokens, "--new-tokens", new_tokens, "--json", env=env)
    return json.loads(out)


def llama_cpp_speeds(files, tokens, prompt_tokens, new_tokens, runs):
    out = run(sys.executable, "scripts/bench_llama_cpp.py", "--gguf", *files, "--tokens", tokens,
              "--prompt-tokens", prompt_tokens, "--new-tokens", new_tokens, "--runs", runs)
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["auto", "avx2"])
    parser.add_argument("--prefill-tokens", type=int, default=254,
                        help="the 31M model's context is 256 positions")
    args = parser.parse_args()
    suites = prepare()
    # name -> column -> list of (decode tokens/s, prefill ms) per round
    figures = {}

    def record(name, column, decode, prefill):
        figures.setdefault(name, {}).setdefault(column, []).append((decode, prefill))

    for _ in range(args.rounds):
        for suite, config, gguf, checkpoints in suites:
            if checkpoints:
                record_file = checkpoints["int8-g32"] / "distillery_quantization.json"
                tokens = token_cache(2048, json.loads(record_file.read_text())["tokenizer_sha256"])
            else:
                tokens = token_cache(49152)
            models = {**{f"{suite} {label}": path for label, path in checkpoints.items()},
                      **{f"{suite} GGUF {kind}": path for kind, path in gguf.items()}}
            for family in args.families:
                decode = distillery_speeds(config, list(models.values()), family, 32, 128, args.runs)
                prefill = distillery_speeds(config, list(models.values()), family,
                                            args.prefill_tokens, 2, args.runs)
                for name, speed, first in zip(models, decode, prefill):
                    record(name, f"distillery {family}", speed["decode_tokens_per_sec"],
                           first["prefill_ms"])
                    if speed["decode_vs_float"] is not None:
                        record(name, f"vs float {family}", speed["decode_vs_float"], float("nan"))
            files = list(gguf.values())
            decode = llama_cpp_speeds(files, tokens, 32, 128, args.runs)
            prefill = llama_cpp_speeds(files, tokens, args.prefill_tokens, 2, args.runs)
            for kind, speed, first in zip(gguf, decode, prefill):
                record(f"{suite} GGUF {kind}", "llama.cpp", speed["decode_tokens_per_sec"],
                       first["prefill_ms"])

    def median(name, column, part):
        values = figures.get(name, {}).get(column)
        return statistics.median(value[part] for value in values) if values else None

    families = args.families
    header = ["model"] + [f"decode, distillery {f}" for f in families] + ["decode, llama.cpp"] \
        + [f"distillery {f} / llama.cpp" for f in families] \
        + [f"vs its float ({f})" for f in families] \
        + [f"prefill {args.prefill_tokens}, distillery {families[0]}", "prefill, llama.cpp",
           "prefill ratio"]
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for name in figures:
        ours = [median(name, f"distillery {f}", 0) for f in families]
        theirs = median(name, "llama.cpp", 0)
        versus = [median(name, f"vs float {f}", 0) for f in families]
        our_prefill = median(name, f"distillery {families[0]}", 1)
        their_prefill = median(name, "llama.cpp", 1)
        cells = [name] + [f"{v:.0f} tok/s" for v in ours]
        cells.append(f"{theirs:.0f} tok/s" if theirs else "–")
        cells += [f"{v / theirs:.2f}x" if theirs else "–" for v in ours]
        cells += [f"{v:.2f}x" if v else "–" for v in versus]
        cells.append(f"{our_prefill:.0f} ms")
        cells.append(f"{their_prefill:.0f} ms" if their_prefill else "–")
        cells.append(f"{their_prefill / our_prefill:.2f}x" if their_prefill else "–")
        print("| " + " | ".join(cells) + " |")
    flags = run("bash", "-c", "lscpu | grep -E '^(Model name|Flags)'")
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"]
    present = [flag for flag in wanted if f" {flag}" in flags]
    print(f"\nCPU: {flags.splitlines()[0].split(':', 1)[1].strip()}; {', '.join(present)}; "
          f"{os.cpu_count()} cores; llama.cpp and distillery on 2 threads")


if __name__ == "__main__":
    main()
