"""The tables of experiments/shakespeare-quant/RESULTS.md: every quantization of a trained model
that the page reports, then one `distillery eval` table of them all.

    cargo build --release
    python3 scripts/quant_results.py                                   # the distilled student
    python3 scripts/quant_results.py --config configs/shakespeare-teacher.toml

Each variant is one `distillery quantize CONFIG --set ...` run (its wall time is the
quantization itself, calibration forward passes included, loading and saving excluded). Two
scopes: `blocks` quantizes the 7 matrices of every decoder layer (AutoGPTQ's default), `all`
also the token embedding and the output head (what an edge deployment ships; a tied head is the
embedding). The configs' presets leave `tie_word_embeddings` false unless the config sets it.
"""

import argparse
import json
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = str(ROOT / "target/release/distillery")

# Grids searched for the least rounding error (the reference gptq.py's `mse` option).
CLIP = "quantize.clip_search=true"

VARIANTS = [
    ("int8", ['quantize.method="int8"', "quantize.bits=8", "quantize.group_size=-1"]),
    ("RTN 8-bit g128", ['quantize.method="rtn"', "quantize.bits=8"]),
    ("GPTQ 8-bit g128", ['quantize.method="gptq"', "quantize.bits=8"]),
    ("RTN 4-bit g128", ['quantize.method="rtn"', "quantize.bits=4"]),
    ("GPTQ 4-bit g128", ['quantize.method="gptq"', "quantize.bits=4"]),
    ("GPTQ 4-bit g128 act-order", ['quantize.method="gptq"', "quantize.bits=4",
                                    "quantize.act_order=true"]),
    ("GPTQ 4-bit g128 act-order, static groups",
     ['quantize.method="gptq"', "quantize.bits=4", "quantize.act_order=true",
      "quantize.static_groups=true"]),
    ("RTN 3-bit g128", ['quantize.method="rtn"', "quantize.bits=3"]),
    ("GPTQ 3-bit g128", ['quantize.method="gptq"', "quantize.bits=3"]),
    ("GPTQ 3-bit g128 act-order", ['quantize.method="gptq"', "quantize.bits=3",
                                    "quantize.act_order=true"]),
    ("RTN 4-bit g128 clip", ['quantize.method="rtn"', "quantize.bits=4", CLIP]),
    ("GPTQ 4-bit g128 clip", ['quantize.method="gptq"', "quantize.bits=4", CLIP]),
    ("RTN 3-bit g128 clip", ['quantize.method="rtn"', "quantize.bits=3", CLIP]),
    ("GPTQ 3-bit g128 clip", ['quantize.method="gptq"', "quantize.bits=3", CLIP]),
    ("GPTQ 3-bit g128 act-order clip", ['quantize.method="gptq"', "quantize.bits=3",
                                         "quantize.act_order=true", CLIP]),
]

# Every row states all of its settings, so a [quantize] section in the config changes nothing.
BASE = ["quantize.group_size=128", "quantize.sym=true", "quantize.act_order=false",
        "quantize.static_groups=false", "quantize.true_sequential=true",
        "quantize.damp_percent=0.01", "quantize.block_size=128", "quantize.nsamples=128",
        "quantize.clip_search=false"]


def scopes(tied):
    # A tied head is the embedding itself: quantizing the embedding quantizes both.
    blocks = ["quantize.quantize_embeddings=false", "quantize.quantize_lm_head=false"]
    every_matrix = ["quantize.quantize_embeddings=true",
                    f"quantize.quantize_lm_head={'false' if tied else 'true'}"]
    return {"blocks": blocks, "all": every_matrix}


def run(args):
    return subprocess.run([BINARY, *args], check=True, capture_output=True, text=True,
                          cwd=ROOT).stdout


def quantize(config, settings, name):
    args = ["quantize", config, "--json", "--set", f'quantize.name="{name}"']
    for setting in settings:
        args += ["--set", setting]
    return json.loads(run(args))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/shakespeare-student-distill.toml")
    args = parser.parse_args()
    with open(ROOT / args.config, "rb") as file:
        config = tomllib.load(file)
    run_name = config["run"]["name"]
    tied = config["model"].get("tie_word_embeddings", False)

    for scope, scope_settings in scopes(tied).items():
        outputs, seconds = [], {}
        for label, settings in VARIANTS:
            name = f"{run_name}-{label.lower().replace(' ', '-').replace(',', '')}-{scope}"
            report = quantize(args.config, BASE + settings + scope_settings, name)
            outputs.append((label, report["output"]))
            seconds[report["output"]] = report["seconds"]
            source = report["models"][0]["model"].split(" (")[0]
        rows = json.loads(run(["eval", args.config, "--json", "--checkpoint", source,
                               *[output for _, output in outputs]]))
        float_ppl = rows[0]["perplexity"]
        print(f"\n### Scope `{scope}`\n")
        print("| model | bits/weight | bits/weight (quantized matrices) | file bytes "
              "| size vs float | val ppl | Δ ppl | top-1 accuracy | quantization time |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        labels = ["float32"] + [label for label, _ in outputs]
        paths = [source] + [output for _, output in outputs]
        for label, path, row in zip(labels, paths, rows):
            quantized_bits = row.get("quantized_bits_per_weight")
            time = f"{seconds[path]:.2f} s" if path in seconds else "–"
            print(f"| {label} | {row['bits_per_weight']:.2f} "
                  f"| {'–' if quantized_bits is None else f'{quantized_bits:.2f}'} "
                  f"| {row['file_bytes']:,} | {100 * row['size_vs_float']:.1f}% "
                  f"| {row['perplexity']:.3f} | {row['delta_perplexity_percent']:+.2f}% "
                  f"| {row['accuracy']:.4f} | {time} |")
        by_label = dict(zip(labels, rows))

        def delta(label):
            return by_label[label]["perplexity"] - float_ppl

        for gptq, rtn in [("GPTQ 3-bit g128", "RTN 3-bit g128"),
                          ("GPTQ 3-bit g128 act-order", "RTN 3-bit g128"),
                          ("GPTQ 4-bit g128", "RTN 4-bit g128"),
                          ("GPTQ 3-bit g128 clip", "RTN 3-bit g128"),
                          ("GPTQ 3-bit g128 act-order clip", "RTN 3-bit g128"),
                          ("GPTQ 3-bit g128 clip", "RTN 3-bit g128 clip"),
                          ("GPTQ 3-bit g128 act-order clip", "RTN 3-bit g128 clip"),
                          ("GPTQ 4-bit g128 clip", "RTN 4-bit g128 clip")]:
            print(f"\n- {gptq} closes {100 * (1 - delta(gptq) / delta(rtn)):.0f}% of "
                  f"{rtn}'s perplexity gap to float.", end="")
        print()


if __name__ == "__main__":
    main()
